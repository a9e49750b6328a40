/* hetegen's CPU kernels for quantized weights in hetegen's storage layout (docs/quant.md).
 *
 * y [n, ldy] (columns [0, rows)) = x [n, k] float32 @ W^T, W [rows, k] quantized:
 *   int4: q uint8 [rows, k / 2] (even column in the low nibble), scale and min float16
 *         [rows, k / g]; w = q * scale + min.
 *         mn NULL: symmetric (GGUF Q4_0), w = (q - 8) * scale, and no mins are read.
 *   int8: q int8 [rows, k], scale float16 [rows]; w = q * scale.
 * x is quantized to int16 in blocks of 32 values with a float32 scale each (its rounding,
 * 1/65534 of a block's largest value, is far below bfloat16's), the products are summed
 * exactly in int32 (_mm256_madd_epi16) and each block's sum is scaled in float32. int4
 * blocks store x's even values, then its odd ones, so that a weight byte's two nibbles meet
 * their activations. Needs AVX2, FMA and F16C; k a multiple of 32. Threads: OpenMP, the
 * runtime torch already loaded (same soname), `threads` of them.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* below this many multiply-adds one thread answers sooner than waking the others */
#define PARALLEL_MIN_WORK (1 << 17)

int hetegen_kernels_version(void) { return 6; }

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* x [k] -> xq [k] int16 per block of 32 (de-interleaved when `split`: the block's even values,
 * then its odd ones), xs [k / 32] the blocks' scales, xsum [k / 32] the blocks' sums as
 * quantized (for int4's mins). Rounds to nearest even, as lrintf does. */
static void quantize_row(const float *x, int k, int16_t *xq, float *xs, float *xsum, int split) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    /* within each 128-bit lane of 8 int16: the even ones, then the odd ones */
    const __m256i evens_odds = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15, 0, 1, 4, 5, 8,
                                                9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
    for (int b = 0; b < k / 32; b++) {
        const float *v = x + 32 * b;
        __m256 f0 = _mm256_loadu_ps(v), f1 = _mm256_loadu_ps(v + 8), f2 = _mm256_loadu_ps(v + 16),
               f3 = _mm256_loadu_ps(v + 24);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, f0), _mm256_andnot_ps(sign, f1)),
                                 _mm256_max_ps(_mm256_andnot_ps(sign, f2), _mm256_andnot_ps(sign, f3)));
        float amax = hmax8(m);
        float d = amax / 32767.f, id = d > 0.f ? 1.f / d : 0.f;
        __m256 idv = _mm256_set1_ps(id);
        __m256i e0 = _mm256_cvtps_epi32(_mm256_mul_ps(f0, idv)), e1 = _mm256_cvtps_epi32(_mm256_mul_ps(f1, idv)),
                e2 = _mm256_cvtps_epi32(_mm256_mul_ps(f2, idv)), e3 = _mm256_cvtps_epi32(_mm256_mul_ps(f3, idv));
        __m256i sum = _mm256_add_epi32(_mm256_add_epi32(e0, e1), _mm256_add_epi32(e2, e3));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        /* int16 in order: values 0-15, 16-31 */
        __m256i w0 = _mm256_permute4x64_epi64(_mm256_packs_epi32(e0, e1), 0xD8);
        __m256i w1 = _mm256_permute4x64_epi64(_mm256_packs_epi32(e2, e3), 0xD8);
        int16_t *o = xq + 32 * b;
        if (split) {
            w0 = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(w0, evens_odds), 0xD8); /* evens 0-14, odds 1-15 */
            w1 = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(w1, evens_odds), 0xD8);
            __m256i ev = _mm256_permute2x128_si256(w0, w1, 0x20), od = _mm256_permute2x128_si256(w0, w1, 0x31);
            w0 = ev, w1 = od;
        }
        _mm256_storeu_si256((__m256i *)o, w0);
        _mm256_storeu_si256((__m256i *)(o + 16), w1);
        xs[b] = d;
        xsum[b] = d * (float)_mm_cvtsi128_si32(s4);
    }
}

static int quantize_x(const float *x, int n, int k, int split, int threads, int16_t **xq, float **xs,
                      float **xsum) {
    int nb = k / 32;
    *xq = (int16_t *)malloc(sizeof(int16_t) * (size_t)n * k);
    *xs = (float *)malloc(sizeof(float) * (size_t)n * nb);
    *xsum = (float *)malloc(sizeof(float) * (size_t)n * nb);
    if (!*xq || !*xs || !*xsum) {
        free(*xq), free(*xs), free(*xsum);
        return -1;
    }
#pragma omp parallel for num_threads(threads) schedule(static) if ((size_t)n * k >= PARALLEL_MIN_WORK)
    for (int t = 0; t < n; t++)
        quantize_row(x + (size_t)t * k, k, *xq + (size_t)t * k, *xs + (size_t)t * nb, *xsum + (size_t)t * nb, split);
    return 0;
}

/* comb[b] = the weight's scale of block b times x's; returns the mins' term sum_g min_g sum x_g
 * (mr NULL: min_g = -8 scale_g) */
static inline float int4_scales(const uint16_t *sr, const uint16_t *mr, const float *xst, const float *xsumt,
                                int nb, int gpb, float *comb) {
    float macc = 0.f;
    if (gpb == 1) {
        int b = 0;
        __m256 mv = _mm256_setzero_ps();
        const __m256 m8 = _mm256_set1_ps(-8.f);
        for (; b + 8 <= nb; b += 8) {
            __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sr + b)));
            _mm256_storeu_ps(comb + b, _mm256_mul_ps(s, _mm256_loadu_ps(xst + b)));
            __m256 m = mr ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mr + b))) : _mm256_mul_ps(s, m8);
            mv = _mm256_fmadd_ps(m, _mm256_loadu_ps(xsumt + b), mv);
        }
        for (; b < nb; b++) {
            float s = _cvtsh_ss(sr[b]);
            comb[b] = s * xst[b];
            macc += (mr ? _cvtsh_ss(mr[b]) : -8.f * s) * xsumt[b];
        }
        return macc + hsum8(mv);
    }
    for (int gi = 0, b = 0; b < nb; gi++) {
        float s = _cvtsh_ss(sr[gi]), xsg = 0.f;
        for (int j = 0; j < gpb; j++, b++) {
            comb[b] = s * xst[b];
            xsg += xsumt[b];
        }
        macc += (mr ? _cvtsh_ss(mr[gi]) : -8.f * s) * xsg;
    }
    return macc;
}

/* one block's 32 products of int4 weights (16 bytes, widened to int16) with x's block as int32 x 8 */
static inline __m256i int4_block(__m256i w, const int16_t *xb) {
    const __m256i m4 = _mm256_set1_epi16(0x0F);
    const __m256i *xv = (const __m256i *)xb;
    return _mm256_add_epi32(_mm256_madd_epi16(_mm256_and_si256(w, m4), _mm256_loadu_si256(xv)),
                            _mm256_madd_epi16(_mm256_srli_epi16(w, 4), _mm256_loadu_si256(xv + 1)));
}

/* one row of int4 weights . one token's x (quantized, split): four independent sums, so that
 * the FMA latency does not bound a one-token product */
static inline __attribute__((always_inline)) float int4_row(const uint8_t *qr, const uint16_t *sr, const uint16_t *mr, int nb, int gpb,
                             const int16_t *xqt, const float *xst, const float *xsumt, float *comb) {
    float macc = int4_scales(sr, mr, xst, xsumt, nb, gpb, comb);
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int b = 0;
    for (; b + 4 <= nb; b += 4) {
        for (int j = 0; j < 4; j++) {
            __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(qr + 16 * (b + j))));
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(int4_block(w, xqt + 32 * (b + j))),
                                     _mm256_set1_ps(comb[b + j]), acc[j]);
        }
    }
    for (; b < nb; b++) {
        __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(qr + 16 * b)));
        acc[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(int4_block(w, xqt + 32 * b)), _mm256_set1_ps(comb[b]), acc[0]);
    }
    return hsum8(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]))) + macc;
}

#define TILE 4 /* tokens that share one widening of a weight block */

int hetegen_int4_gemm(const uint8_t *q, const uint16_t *scale, const uint16_t *mn, int rows, int k, int g,
                      const float *x, int n, float *y, int ldy, int threads) {
    if (k % 32 || g % 32 || k % g) return -2;
    int nb = k / 32, gpb = g / 32, ng = k / g;
    int16_t *xq;
    float *xs, *xsum;
    if (quantize_x(x, n, k, 1, threads, &xq, &xs, &xsum)) return -1;
    int team = (size_t)rows * k * n >= PARALLEL_MIN_WORK ? threads : 1;
#pragma omp parallel num_threads(team)
    {
        float *comb = (float *)malloc(sizeof(float) * nb * TILE);
#pragma omp for schedule(static)
        for (int r = 0; r < rows; r++) {
            const uint8_t *qr = q + (size_t)r * (k / 2);
            const uint16_t *sr = scale + (size_t)r * ng, *mr = mn ? mn + (size_t)r * ng : NULL;
            int t = 0;
            for (; t + TILE <= n; t += TILE) {
                float macc[TILE];
                __m256 acc[TILE];
                for (int j = 0; j < TILE; j++) {
                    size_t o = (size_t)(t + j) * nb;
                    macc[j] = int4_scales(sr, mr, xs + o, xsum + o, nb, gpb, comb + j * nb);
                    acc[j] = _mm256_setzero_ps();
                }
                for (int b = 0; b < nb; b++) {
                    __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(qr + 16 * b)));
                    for (int j = 0; j < TILE; j++) {
                        __m256i s32 = int4_block(w, xq + (size_t)(t + j) * k + 32 * b);
                        acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), _mm256_set1_ps(comb[j * nb + b]), acc[j]);
                    }
                }
                for (int j = 0; j < TILE; j++) y[(size_t)(t + j) * ldy + r] = hsum8(acc[j]) + macc[j];
            }
            for (; t < n; t++)
                y[(size_t)t * ldy + r] = int4_row(qr, sr, mr, nb, gpb, xq + (size_t)t * k, xs + (size_t)t * nb,
                                                  xsum + (size_t)t * nb, comb);
        }
        free(comb);
    }
    free(xq), free(xs), free(xsum);
    return 0;
}

int hetegen_int8_gemm(const int8_t *q, const uint16_t *scale, int rows, int k, const float *x, int n, float *y,
                      int ldy, int threads) {
    if (k % 32) return -2;
    int nb = k / 32;
    int16_t *xq;
    float *xs, *xsum;
    if (quantize_x(x, n, k, 0, threads, &xq, &xs, &xsum)) return -1;
    int team = (size_t)rows * k * n >= PARALLEL_MIN_WORK ? threads : 1;
#pragma omp parallel for num_threads(team) schedule(static)
    for (int r = 0; r < rows; r++) {
        const int8_t *qr = q + (size_t)r * k;
        float s = _cvtsh_ss(scale[r]);
        for (int t = 0; t < n; t += TILE) {
            int tile = n - t < TILE ? n - t : TILE;
            __m256 acc[TILE];
            for (int j = 0; j < tile; j++) acc[j] = _mm256_setzero_ps();
            for (int b = 0; b < nb; b++) {
                __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qr + 32 * b)));
                __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qr + 32 * b + 16)));
                for (int j = 0; j < tile; j++) {
                    const __m256i *xv = (const __m256i *)(xq + (size_t)(t + j) * k + 32 * b);
                    __m256i s32 = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256(xv)),
                                                   _mm256_madd_epi16(w1, _mm256_loadu_si256(xv + 1)));
                    acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), _mm256_set1_ps(xs[(size_t)(t + j) * nb + b]),
                                             acc[j]);
                }
            }
            for (int j = 0; j < tile; j++) y[(size_t)(t + j) * ldy + r] = hsum8(acc[j]) * s;
        }
    }
    free(xq), free(xs), free(xsum);
    return 0;
}

/* W rows [0, rows) dequantized into w [rows, k] float32 (prefill: a BLAS GEMM beats the
 * integer products once enough tokens share each weight). int4: scale/min per group. */
int hetegen_int4_dequant(const uint8_t *q, const uint16_t *scale, const uint16_t *mn, int rows, int k, int g,
                         float *w, int threads) {
    if (k % 32 || g % 32 || k % g) return -2;
    int ng = k / g;
    const __m256i m4 = _mm256_set1_epi32(0x0F);
    int team = (size_t)rows * k >= PARALLEL_MIN_WORK ? threads : 1;
#pragma omp parallel for num_threads(team) schedule(static)
    for (int r = 0; r < rows; r++) {
        const uint8_t *qr = q + (size_t)r * (k / 2);
        float *wr = w + (size_t)r * k;
        for (int gi = 0; gi < ng; gi++) {
            float sv = _cvtsh_ss(scale[(size_t)r * ng + gi]);
            __m256 s = _mm256_set1_ps(sv);
            __m256 m = _mm256_set1_ps(mn ? _cvtsh_ss(mn[(size_t)r * ng + gi]) : -8.f * sv);
            for (int j = gi * g; j < (gi + 1) * g; j += 16) { /* 8 bytes -> 16 values, even low */
                __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qr + j / 2)));
                __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, m4));
                __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
                __m256 vlo = _mm256_fmadd_ps(lo, s, m), vhi = _mm256_fmadd_ps(hi, s, m);
                /* interleave: value 2i = lo[i], 2i + 1 = hi[i] */
                __m256 a = _mm256_unpacklo_ps(vlo, vhi), c = _mm256_unpackhi_ps(vlo, vhi);
                _mm256_storeu_ps(wr + j, _mm256_permute2f128_ps(a, c, 0x20));
                _mm256_storeu_ps(wr + j + 8, _mm256_permute2f128_ps(a, c, 0x31));
            }
        }
    }
    return 0;
}

int hetegen_int8_dequant(const int8_t *q, const uint16_t *scale, int rows, int k, float *w, int threads) {
    if (k % 32) return -2;
    int team = (size_t)rows * k >= PARALLEL_MIN_WORK ? threads : 1;
#pragma omp parallel for num_threads(team) schedule(static)
    for (int r = 0; r < rows; r++) {
        __m256 s = _mm256_set1_ps(_cvtsh_ss(scale[r]));
        const int8_t *qr = q + (size_t)r * k;
        float *wr = w + (size_t)r * k;
        for (int j = 0; j < k; j += 8) {
            __m256i b = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qr + j)));
            _mm256_storeu_ps(wr + j, _mm256_mul_ps(_mm256_cvtepi32_ps(b), s));
        }
    }
    return 0;
}

/* ---- decode fusions: one call for a whole gated MLP (or a MoE layer's chosen experts) and
 * for an RMS norm, so that a token pays one Python call where it paid eight to twelve. ---- */

/* one matrix: {format (0 int4, 1 int8), q, scale, min (int4), rows, k, group} as int64 */
enum { D_FMT, D_Q, D_SCALE, D_MIN, D_ROWS, D_K, D_G, D_LEN };

/* row r of a matrix . x (x quantized for the matrix's format: split for int4) */
static inline __attribute__((always_inline)) float row_dot(const int64_t *d, int r, const int16_t *xq, const float *xs, const float *xsum,
                            float *comb) {
    int k = (int)d[D_K], nb = k / 32;
    if (d[D_FMT] == 1) {
        const int8_t *qr = (const int8_t *)d[D_Q] + (size_t)r * k;
        __m256 acc = _mm256_setzero_ps();
        for (int b = 0; b < nb; b++) {
            __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qr + 32 * b)));
            __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qr + 32 * b + 16)));
            const __m256i *xv = (const __m256i *)(xq + 32 * b);
            __m256i s32 = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256(xv)),
                                           _mm256_madd_epi16(w1, _mm256_loadu_si256(xv + 1)));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), _mm256_set1_ps(xs[b]), acc);
        }
        return hsum8(acc) * _cvtsh_ss(((const uint16_t *)d[D_SCALE])[r]);
    }
    int g = (int)d[D_G], ng = k / g;
    const uint8_t *qr = (const uint8_t *)d[D_Q] + (size_t)r * (k / 2);
    const uint16_t *sr = (const uint16_t *)d[D_SCALE] + (size_t)r * ng;
    const uint16_t *mr = d[D_MIN] ? (const uint16_t *)d[D_MIN] + (size_t)r * ng : NULL;
    return int4_row(qr, sr, mr, nb, g / 32, xq, xs, xsum, comb);
}

/* out [h] += sum over j < nsel of coef[j] * down_j(silu(gate_j(x)) * up_j(x)), one token x [h].
 * desc: 3 matrices (gate, up, down) of D_LEN int64 per expert; sel [nsel] the experts, in the
 * order their terms are added. One OpenMP team for the whole call. */
int hetegen_gated_ffn(const int64_t *desc, int nsel, const int32_t *sel, const float *coef, const float *x, int h,
                      float *out, int threads) {
    if (h % 32) return -2;
    int inter_max = 0;
    for (int j = 0; j < nsel; j++) {
        const int64_t *e = desc + (size_t)sel[j] * 3 * D_LEN;
        int inter = (int)e[D_ROWS];
        if (e[D_K] != h || e[D_LEN + D_K] != h || e[D_LEN + D_ROWS] != inter || e[2 * D_LEN + D_K] != inter ||
            e[2 * D_LEN + D_ROWS] != h || inter % 32)
            return -2;
        if (inter > inter_max) inter_max = inter;
    }
    int nbh = h / 32, nbi = inter_max / 32, nbmax = nbh > nbi ? nbh : nbi;
    int16_t *xq = (int16_t *)malloc(sizeof(int16_t) * 2 * h), *hq = (int16_t *)malloc(sizeof(int16_t) * inter_max);
    float *xs = (float *)malloc(sizeof(float) * 4 * nbh), *hs = (float *)malloc(sizeof(float) * 2 * nbi);
    float *gu = (float *)malloc(sizeof(float) * 2 * inter_max);
    if (!xq || !hq || !xs || !hs || !gu) {
        free(xq), free(hq), free(xs), free(hs), free(gu);
        return -1;
    }
    /* x in both layouts: [0, h) split for int4, [h, 2h) plain for int8 */
    quantize_row(x, h, xq, xs, xs + nbh, 1);
    quantize_row(x, h, xq + h, xs + 2 * nbh, xs + 3 * nbh, 0);
    size_t work = 0;
    for (int j = 0; j < nsel; j++) work += (size_t)3 * h * desc[(size_t)sel[j] * 3 * D_LEN + D_ROWS];
    int team = work >= PARALLEL_MIN_WORK ? threads : 1;
#pragma omp parallel num_threads(team)
    {
        float *comb = (float *)malloc(sizeof(float) * nbmax);
        for (int j = 0; j < nsel; j++) {
            const int64_t *e = desc + (size_t)sel[j] * 3 * D_LEN;
            int inter = (int)e[D_ROWS];
#pragma omp for schedule(static)
            for (int r = 0; r < 2 * inter; r++) {
                const int64_t *d = r < inter ? e : e + D_LEN;
                int i8 = d[D_FMT] == 1;
                gu[r] = row_dot(d, r < inter ? r : r - inter, xq + (i8 ? h : 0), xs + (i8 ? 2 * nbh : 0),
                                xs + (i8 ? 3 * nbh : nbh), comb);
            }
            const int64_t *dd = e + 2 * D_LEN;
            int split = dd[D_FMT] == 0;
#pragma omp for schedule(static)
            for (int b = 0; b < inter / 32; b++) {
                float v[32];
                for (int i = 0; i < 32; i++) {
                    float gv = gu[32 * b + i];
                    v[i] = gv / (1.f + expf(-gv)) * gu[inter + 32 * b + i];
                }
                quantize_row(v, 32, hq + 32 * b, hs + b, hs + nbi + b, split);
            }
            float c = coef[j];
#pragma omp for schedule(static)
            for (int r = 0; r < h; r++) out[r] += c * row_dot(dd, r, hq, hs, hs + nbi, comb);
        }
        free(comb);
    }
    free(xq), free(hq), free(xs), free(hs), free(gu);
    return 0;
}

/* y [n, k] = x * rsqrt(mean(x^2) + eps) * (w + shift), per row, as transformers' RMSNorm
 * (shift 1 for Gemma's (1 + w)); float32, summed in float32. */
int hetegen_rms_norm(const float *x, const float *w, int n, int k, float eps, float shift, float *y) {
    for (int t = 0; t < n; t++) {
        const float *xr = x + (size_t)t * k;
        float *yr = y + (size_t)t * k;
        __m256 acc = _mm256_setzero_ps();
        int i = 0;
        for (; i + 8 <= k; i += 8) {
            __m256 v = _mm256_loadu_ps(xr + i);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        float ss = hsum8(acc);
        for (; i < k; i++) ss += xr[i] * xr[i];
        float inv = 1.f / sqrtf(ss / (float)k + eps);
        for (i = 0; i < k; i++) yr[i] = (w[i] + shift) * (xr[i] * inv);
    }
    return 0;
}

/* ---- one decode step of attention in one call: q, k, v, optional q/k RMS norms, rotary
 * (rotate-half), the new key and value written into the cache, attention of one query over
 * the cache and o; each head's softmax in float32. ---- */

/* ints a[]: sizes and pointers (as int64; 0 none); floats f[] */
enum { A_H, A_NH, A_NKV, A_HD, A_QNORM, A_KNORM, A_ROOM, A_POS, A_BQ, A_BK, A_BV, A_BO, A_QW, A_KW, A_ADD, A_LEN };
enum { F_QEPS, F_QSHIFT, F_KEPS, F_KSHIFT, F_SCALE, F_LEN };

/* v [k] *= rsqrt(mean(v^2) + eps) * (w + shift) */
static void rms_row(float *v, int k, const float *w, float eps, float shift) {
    float ss = 0.f;
    for (int i = 0; i < k; i++) ss += v[i] * v[i];
    float inv = 1.f / sqrtf(ss / (float)k + eps);
    for (int i = 0; i < k; i++) v[i] = (w[i] + shift) * (v[i] * inv);
}

/* mode 1: per head of hd values (w [hd]); mode 2: over all `heads * hd` values (w [heads * hd]) */
static void qk_norm(float *v, int heads, int hd, int mode, const float *w, float eps, float shift) {
    if (mode == 1)
        for (int j = 0; j < heads; j++) rms_row(v + (size_t)j * hd, hd, w, eps, shift);
    else if (mode == 2)
        rms_row(v, heads * hd, w, eps, shift);
}

/* v [hd] = v * cos + rotate_half(v) * sin, rotate_half(v) = (-v[hd/2:], v[:hd/2]) */
static void rotate(float *v, int hd, const float *cs, const float *sn) {
    int half = hd / 2;
    for (int i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * cs[i] - b * sn[i];
        v[i + half] = b * cs[i + half] + a * sn[i + half];
    }
}

/* e^x, 8 at a time (Cephes' expf polynomial; within 2 ulp of expf for x in [-87, 88]; x below
 * -87 gives e^-87, which a softmax over a maximum of 1 cannot tell from 0) */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.3762626647949f));
    __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* the sums of 8 vectors, as one vector: lane j = sum of a[j]'s 8 lanes */
static inline __m256 hsum8x8(const __m256 *a) {
    __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

/* one head: o [hd] = softmax(scale * K q) V over n positions of kh, vh [n, hd]; sc [n] scratch.
 * Scores 8 positions at a time (independent sums), exponentials 8 at a time, o held in
 * registers 64 values at a time. */
static void attend(const float *qh, const float *kh, const float *vh, int n, int hd, float scale, float *sc,
                   float *o) {
    int p = 0;
    if (hd % 8 == 0)
        for (; p + 8 <= n; p += 8) {
            __m256 acc[8];
            for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
            for (int i = 0; i < hd; i += 8) {
                __m256 qv = _mm256_loadu_ps(qh + i);
                for (int j = 0; j < 8; j++)
                    acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kh + (size_t)(p + j) * hd + i), acc[j]);
            }
            _mm256_storeu_ps(sc + p, _mm256_mul_ps(hsum8x8(acc), _mm256_set1_ps(scale)));
        }
    for (; p < n; p++) {
        float s = 0.f;
        for (int i = 0; i < hd; i++) s += qh[i] * kh[(size_t)p * hd + i];
        sc[p] = s * scale;
    }
    float mx = -INFINITY, sum = 0.f;
    for (p = 0; p < n; p++) mx = fmaxf(mx, sc[p]);
    __m256 sumv = _mm256_setzero_ps();
    for (p = 0; p + 8 <= n; p += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + p), _mm256_set1_ps(mx)));
        _mm256_storeu_ps(sc + p, e);
        sumv = _mm256_add_ps(sumv, e);
    }
    for (; p < n; p++) sum += (sc[p] = expf(sc[p] - mx));
    float inv = 1.f / (sum + hsum8(sumv));
    if (hd % 8 == 0) {
        for (int i0 = 0; i0 < hd; i0 += 64) {
            int nv = (hd - i0 < 64 ? hd - i0 : 64) / 8;
            __m256 acc[8];
            for (int v = 0; v < 8; v++) acc[v] = _mm256_setzero_ps();
            for (p = 0; p < n; p++) {
                __m256 w = _mm256_set1_ps(sc[p]);
                const float *vp = vh + (size_t)p * hd + i0;
                for (int v = 0; v < nv; v++) acc[v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vp + 8 * v), acc[v]);
            }
            for (int v = 0; v < nv; v++) _mm256_storeu_ps(o + i0 + 8 * v, _mm256_mul_ps(acc[v], _mm256_set1_ps(inv)));
        }
        return;
    }
    for (int i = 0; i < hd; i++) o[i] = 0.f;
    for (p = 0; p < n; p++)
        for (int i = 0; i < hd; i++) o[i] += sc[p] * vh[(size_t)p * hd + i];
    for (int i = 0; i < hd; i++) o[i] *= inv;
}

/* One token x [h] at position a[A_POS] of a cache of a[A_ROOM] positions: kbuf and vbuf
 * [nkv, room, hd] float32 receive its key and value at pos; out [h] = o(attention), or out +=
 * o(attention) when a[A_ADD] (a residual connection). desc: 4
 * matrices (q, k, v, o) of D_LEN int64; cs, sn [hd] its rotary cos and sin. */
int hetegen_attention_decode(const int64_t *desc, const int64_t *a, const float *f, const float *x, const float *cs,
                             const float *sn, float *kbuf, float *vbuf, float *out, int threads) {
    int h = (int)a[A_H], nh = (int)a[A_NH], nkv = (int)a[A_NKV], hd = (int)a[A_HD];
    int room = (int)a[A_ROOM], pos = (int)a[A_POS], qw = nh * hd, kw = nkv * hd;
    const int64_t *dq = desc, *dk = desc + D_LEN, *dv = desc + 2 * D_LEN, *dout = desc + 3 * D_LEN;
    if (h % 32 || qw % 32 || hd % 2 || nkv < 1 || nh % nkv || pos < 0 || pos >= room) return -2;
    if (dq[D_K] != h || dk[D_K] != h || dv[D_K] != h || dq[D_ROWS] != qw || dk[D_ROWS] != kw ||
        dv[D_ROWS] != kw || dout[D_K] != qw || dout[D_ROWS] != h)
        return -2;
    int n = pos + 1, group = nh / nkv, nbh = h / 32, nbq = qw / 32, nbmax = nbh > nbq ? nbh : nbq;
    int16_t *xq = (int16_t *)malloc(sizeof(int16_t) * 2 * h), *aq = (int16_t *)malloc(sizeof(int16_t) * qw);
    float *xs = (float *)malloc(sizeof(float) * 4 * nbh), *as = (float *)malloc(sizeof(float) * 2 * nbq);
    float *qkv = (float *)malloc(sizeof(float) * (qw + 2 * kw)), *att = (float *)malloc(sizeof(float) * qw);
    if (!xq || !aq || !xs || !as || !qkv || !att) {
        free(xq), free(aq), free(xs), free(as), free(qkv), free(att);
        return -1;
    }
    quantize_row(x, h, xq, xs, xs + nbh, 1);
    quantize_row(x, h, xq + h, xs + 2 * nbh, xs + 3 * nbh, 0);
    float *q = qkv, *k = qkv + qw, *v = qkv + qw + kw;
    size_t work = (size_t)h * (qw + 2 * kw) + (size_t)qw * h + (size_t)2 * qw * n;
    int team = work >= PARALLEL_MIN_WORK ? threads : 1, failed = 0;
#pragma omp parallel num_threads(team)
    {
        float *comb = (float *)malloc(sizeof(float) * nbmax), *sc = (float *)malloc(sizeof(float) * n);
        if (!comb || !sc) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(static)
            for (int r = 0; r < qw + 2 * kw; r++) {
                const int64_t *d = r < qw ? dq : r < qw + kw ? dk : dv;
                int i8 = d[D_FMT] == 1;
                qkv[r] = row_dot(d, r < qw ? r : r < qw + kw ? r - qw : r - qw - kw, xq + (i8 ? h : 0),
                                 xs + (i8 ? 2 * nbh : 0), xs + (i8 ? 3 * nbh : nbh), comb);
            }
#pragma omp single
            {
                const float *bq = (const float *)a[A_BQ], *bk = (const float *)a[A_BK], *bv = (const float *)a[A_BV];
                for (int i = 0; bq && i < qw; i++) q[i] += bq[i];
                for (int i = 0; bk && i < kw; i++) k[i] += bk[i];
                for (int i = 0; bv && i < kw; i++) v[i] += bv[i];
                qk_norm(q, nh, hd, (int)a[A_QNORM], (const float *)a[A_QW], f[F_QEPS], f[F_QSHIFT]);
                qk_norm(k, nkv, hd, (int)a[A_KNORM], (const float *)a[A_KW], f[F_KEPS], f[F_KSHIFT]);
                for (int j = 0; j < nh; j++) rotate(q + (size_t)j * hd, hd, cs, sn);
                for (int j = 0; j < nkv; j++) {
                    rotate(k + (size_t)j * hd, hd, cs, sn);
                    for (int i = 0; i < hd; i++) {
                        kbuf[((size_t)j * room + pos) * hd + i] = k[(size_t)j * hd + i];
                        vbuf[((size_t)j * room + pos) * hd + i] = v[(size_t)j * hd + i];
                    }
                }
            }
            float scale = f[F_SCALE];
#pragma omp for schedule(static)
            for (int j = 0; j < nh; j++)
                attend(q + (size_t)j * hd, kbuf + (size_t)(j / group) * room * hd,
                       vbuf + (size_t)(j / group) * room * hd, n, hd, scale, sc, att + (size_t)j * hd);
            int split = dout[D_FMT] == 0;
#pragma omp for schedule(static)
            for (int b = 0; b < nbq; b++) quantize_row(att + 32 * b, 32, aq + 32 * b, as + b, as + nbq + b, split);
            const float *bo = (const float *)a[A_BO];
            int add = a[A_ADD] != 0;
#pragma omp for schedule(static)
            for (int r = 0; r < h; r++)
                out[r] = (add ? out[r] : 0.f) + row_dot(dout, r, aq, as, as + nbq, comb) + (bo ? bo[r] : 0.f);
        }
        free(comb), free(sc);
    }
    free(xq), free(aq), free(xs), free(as), free(qkv), free(att);
    return failed ? -1 : 0;
}
