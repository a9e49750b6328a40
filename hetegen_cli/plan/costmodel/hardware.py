"""The time model of one linear's CPU share, PCIe transfer and GPU share (pure, no torch).

Every cost is affine in the rows of a share (docs/method.md §4-6):

    T_cpu(r)      = cpu_call_s  + r * in * max(cpu_dtype_bytes / B_cpu, 2 n / F_cpu)
    T_transfer(r) = pcie_copy_s + r * in * weight_bytes / B_pcie
    T_gpu(r)      = gpu_call_s  + r * in * max(weight_bytes / B_hbm, 2 n / F_gpu)

(each 0 when r == 0), n = tokens in the step; F_cpu is at least 2 B_cpu / cpu_dtype_bytes, the
FLOP rate of the profile's GEMVs (cpu_row_s). The balanced split solves
T_cpu(f out) = T_transfer((1-f) out) + T_gpu((1-f) out) in closed form (`balanced_fraction`).
`Rates` holds the fitted constants; `costmodel.fit.rates_from_profile` fits them from a profile.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from hetegen_cli.core.dtypes import itemsize


@dataclass(frozen=True)
class Rates:
    """Fitted hardware constants. Rates in bytes/s or FLOP/s, overheads in seconds per call.

    `*_concurrent` rates are those measured with CPU GEMV and PCIe copies running together
    (they share DRAM); split linears use them, strategies that use one path alone do not.
    """

    weights_dtype: str = "float16"
    cpu_dtype: str = "float32"
    cpu_threads: int = 1
    cpu_call_s: float = 0.0  # fixed cost of one CPU GEMV/GEMM call
    cpu_bytes_per_s: float = 50e9  # B_cpu: weight bytes (cpu dtype) read per second
    cpu_bytes_per_s_concurrent: float = 50e9
    cpu_flops_per_s: float = 1e12  # F_cpu at prefill shapes
    dram_bytes_per_s: float = 60e9  # B_dram: measured memory read bandwidth
    has_gpu: bool = True
    pcie_bytes_per_s: float = 25e9  # B_pcie: pinned host->GPU copies
    pcie_bytes_per_s_concurrent: float = 25e9
    pcie_copy_s: float = 0.0  # fixed cost of one copy
    gpu_call_s: float = 0.0  # fixed cost of one GPU matmul (launch)
    gpu_bytes_per_s: float = 1e12  # B_hbm: GEMV weight-read rate
    gpu_flops_per_s: float = 100e12  # F_gpu at prefill shapes
    h2d_copy_engines: int = 1  # host-to-device copies served at once (the profile's probe)
    # quantized linears (costmodel.fit.quant_rates): bytes per parameter held, streamed and read
    # by the CPU kernel (0: the dtype's itemsize), and the bytes per parameter the GPU writes
    # and reads again dequantizing a share into the weights dtype before its matmul
    weight_bytes_per_param: float = 0.0
    gpu_dequant_bytes_per_param: float = 0.0
    # the quantized CPU kernel the profile measured (quantized rates only): "hetegen-avx2"
    # (float32 activations) or "torch" (bfloat16), models.formats.cpu_kernels
    cpu_kernel: str = ""

    @property
    def weight_bytes(self) -> float:
        """Bytes per parameter held on the host and streamed over PCIe."""
        return self.weight_bytes_per_param or itemsize(self.weights_dtype)

    @property
    def cpu_dtype_bytes(self) -> float:
        """Bytes per parameter the CPU share reads."""
        return self.weight_bytes_per_param or itemsize(self.cpu_dtype)

    @property
    def cpu_params_per_s(self) -> float:
        return self.cpu_bytes_per_s / self.cpu_dtype_bytes

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Rates:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class PhaseRates:
    """The hardware as each phase sees it: the same GPU, PCIe and DRAM, the CPU share in that
    phase's format (its GEMM rate matters in prefill, its GEMV rate in decode)."""

    prefill: Rates
    decode: Rates
    #: the rates of quantized linears by format (both phases: the CPU share runs the format's
    #: packed kernel whatever the float formats are); costmodel.fit.quant_rates fits them
    quant: dict[str, Rates] = field(default_factory=dict)

    @classmethod
    def of(cls, rates: Rates | PhaseRates) -> PhaseRates:
        """`rates` itself, or one Rates used for both phases."""
        return rates if isinstance(rates, PhaseRates) else cls(rates, rates)

    def __getitem__(self, phase: str) -> Rates:
        return self.prefill if phase == "prefill" else self.decode

    def of_linear(self, phase: str, quant: str | None) -> Rates:
        """The rates a linear sees in `phase`: its quantized format's, or the phase's."""
        if quant is None:
            return self[phase]
        if quant not in self.quant:  # a caller built these rates without the model's format
            raise ValueError(f"no rates for {quant} linears: pass the model's quant format")
        return self.quant[quant]

    @property
    def has_gpu(self) -> bool:
        return self.decode.has_gpu

    @property
    def weights_dtype(self) -> str:
        return self.decode.weights_dtype

    @property
    def weight_bytes(self) -> int:
        return self.decode.weight_bytes

    @property
    def cpu_dtypes(self) -> tuple[str, str]:
        """(prefill, decode) CPU dtypes."""
        return self.prefill.cpu_dtype, self.decode.cpu_dtype

    def to_dict(self) -> dict:
        out = {"prefill": self.prefill.to_dict(), "decode": self.decode.to_dict()}
        if self.quant:
            out["quant"] = {fmt: r.to_dict() for fmt, r in self.quant.items()}
        return out


# --- per-row costs (seconds per output row of a share) -------------------------------------


def cpu_row_s(rates: Rates, in_features: int, tokens: int, concurrent: bool = True) -> float:
    """CPU seconds per output row: bandwidth- or compute-bound, whichever is slower. The FLOP
    rate is at least the one the GEMV fit implies (2 FLOPs per weight read at B_cpu), so a
    one-token product costs what the profile measured for it: the GEMM rate of prefill shapes
    can be below it (a quantized format priced at the bfloat16 GEMM's rate)."""
    bw = rates.cpu_bytes_per_s_concurrent if concurrent else rates.cpu_bytes_per_s
    flops = max(rates.cpu_flops_per_s, 2.0 * rates.cpu_bytes_per_s / rates.cpu_dtype_bytes)
    return in_features * max(rates.cpu_dtype_bytes / bw, 2.0 * tokens / flops)


def transfer_row_s(rates: Rates, in_features: int, concurrent: bool = True) -> float:
    bw = rates.pcie_bytes_per_s_concurrent if concurrent else rates.pcie_bytes_per_s
    return in_features * rates.weight_bytes / bw


def gpu_row_s(rates: Rates, in_features: int, tokens: int) -> float:
    read = rates.weight_bytes + rates.gpu_dequant_bytes_per_param
    return in_features * max(read / rates.gpu_bytes_per_s, 2.0 * tokens / rates.gpu_flops_per_s)


# --- share times ---------------------------------------------------------------------------


def cpu_time(rates: Rates, rows: int, in_features: int, tokens: int, concurrent: bool = True) -> float:
    """Seconds for the CPU to compute `rows` output rows for `tokens` tokens."""
    if rows <= 0:
        return 0.0
    return rates.cpu_call_s + rows * cpu_row_s(rates, in_features, tokens, concurrent)


def transfer_time(rates: Rates, rows: int, in_features: int, concurrent: bool = True) -> float:
    """Seconds to copy `rows` weight rows host->GPU."""
    if rows <= 0:
        return 0.0
    return rates.pcie_copy_s + rows * transfer_row_s(rates, in_features, concurrent)


def gpu_time(rates: Rates, rows: int, in_features: int, tokens: int) -> float:
    """Seconds for the GPU to multiply `rows` output rows (weights already on the GPU)."""
    if rows <= 0:
        return 0.0
    return rates.gpu_call_s + rows * gpu_row_s(rates, in_features, tokens)


@dataclass(frozen=True)
class ShareTimes:
    """Predicted seconds of one linear in one phase. layer_s = max(cpu_s, transfer_s + gpu_s)."""

    cpu_s: float
    transfer_s: float
    gpu_s: float

    @property
    def layer_s(self) -> float:
        return max(self.cpu_s, self.transfer_s + self.gpu_s)

    def to_dict(self) -> dict:
        return {
            "cpu_s": self.cpu_s,
            "transfer_s": self.transfer_s,
            "gpu_s": self.gpu_s,
            "layer_s": self.layer_s,
        }


def split_times(
    rates: Rates,
    out_features: int,
    in_features: int,
    cpu_rows: int,
    tokens: int,
    *,
    resident: bool = False,
    concurrent: bool = True,
) -> ShareTimes:
    """Times of a linear with `cpu_rows` on the CPU and the rest streamed (or resident)."""
    if resident:
        return ShareTimes(0.0, 0.0, gpu_time(rates, out_features, in_features, tokens))
    gpu_rows = out_features - cpu_rows
    both = concurrent and 0 < cpu_rows < out_features
    return ShareTimes(
        cpu_time(rates, cpu_rows, in_features, tokens, both),
        transfer_time(rates, gpu_rows, in_features, both),
        gpu_time(rates, gpu_rows, in_features, tokens),
    )


def balanced_fraction(rates: Rates, out_features: int, in_features: int, tokens: int) -> float:
    """cpu_fraction in [0, 1] with T_cpu == T_transfer + T_gpu (before row rounding).

    Closed form on the affine model: o_c + f*out*c = o_p + (1-f)*out*g, with c, g the
    per-row CPU and GPU-path costs and o_c, o_p their per-call overheads.
    Without a GPU the answer is 1.
    """
    if not rates.has_gpu:
        return 1.0
    c = cpu_row_s(rates, in_features, tokens, True)
    g = transfer_row_s(rates, in_features, True) + gpu_row_s(rates, in_features, tokens)
    o_c = rates.cpu_call_s
    o_p = rates.pcie_copy_s + rates.gpu_call_s
    fraction = (o_p - o_c + out_features * g) / (out_features * (c + g))
    return min(1.0, max(0.0, fraction))


def pipeline_time(steps: list[tuple[float, float, float]], buffers: int, copy_engines: int = 1) -> float:
    """Seconds for linears run in order, each (cpu_s, transfer_s, gpu_s) (docs/method.md §9).

    Linear m's CPU share and GPU math need its input x (the end of linear m-1); its weight copy
    does not. The engine issues the copy for linear m when linear m - depth starts (with two or
    more host-to-device `copy_engines`) or after its join (with one, so the join's small copy
    never waits behind a weight copy); prefetch depth = buffers - 1, and the first `depth`
    linears' copies were issued during the pass before. Copies run in order on one copy stream
    into `buffers` rotating staging buffers (a buffer is refilled once the kernel that read it
    finished). With one buffer nothing runs ahead and each linear takes
    max(cpu_s, transfer_s + gpu_s). The join's small copies themselves, and host time, are left
    to the trace replay (plan.simulate).
    """
    depth = max(0, buffers - 1)
    copy_end = layer_end = 0.0
    early = copy_engines >= 2
    ends: list[float] = []  # end (join) of every linear
    starts: list[float] = []  # start (input ready) of every linear
    kernel_ends: list[float] = []  # GPU end times of streamed linears, in order
    for m, (cpu_s, transfer_s, gpu_s) in enumerate(steps):
        x = layer_end
        starts.append(x)
        gpu_start = x
        if transfer_s > 0:
            if depth == 0:
                issue = x
            elif m < depth:
                issue = 0.0
            else:
                issue = starts[m - depth] if early else ends[m - depth]
            free = kernel_ends[-buffers] if len(kernel_ends) >= buffers else 0.0
            copy_end = max(copy_end, free, issue) + transfer_s
            gpu_start = max(x, copy_end)
        gpu_end = gpu_start + gpu_s
        if transfer_s > 0:
            kernel_ends.append(gpu_end)
        layer_end = max(x + cpu_s, gpu_end)
        ends.append(layer_end)
    return layer_end


# --- attention and other per-step GPU work (not linears) -----------------------------------


def attention_time(
    rates: Rates,
    *,
    num_layers: int,
    num_heads: int,
    head_dim: int,
    kv_bytes: int,
    query_tokens: int,
    context_tokens: int,
    batch: int,
    on_gpu: bool,
) -> float:
    """Seconds of attention math for one step over `num_layers` layers.

    max(QK^T + PV FLOPs = 4 b L q c h d / F, KV bytes read / B) on the chosen side, where
    `kv_bytes` is the K and V held for those layers at `context_tokens`.
    """
    flops = 4.0 * batch * num_layers * query_tokens * context_tokens * num_heads * head_dim
    if on_gpu:
        return max(flops / rates.gpu_flops_per_s, kv_bytes / rates.gpu_bytes_per_s)
    return max(flops / rates.cpu_flops_per_s, kv_bytes / rates.dram_bytes_per_s)


# --- fitting helper used by costmodel.fit -----------------------------------------------


def fit_affine(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares t = a + x / rate over (x, t) points; returns (a >= 0, rate > 0).

    One point, or a fit with a negative intercept or slope, falls back to a line through the
    origin and the largest x (the asymptotic rate).
    """
    pts = [(float(x), float(t)) for x, t in points if x > 0 and t > 0]
    if not pts:
        raise ValueError("no positive measurements to fit")
    largest = max(pts)
    if len(pts) >= 2:
        n = len(pts)
        mx = sum(x for x, _ in pts) / n
        mt = sum(t for _, t in pts) / n
        sxx = sum((x - mx) ** 2 for x, _ in pts)
        if sxx > 0:
            slope = sum((x - mx) * (t - mt) for x, t in pts) / sxx
            a = mt - slope * mx
            if slope > 0 and a >= 0:
                return a, 1.0 / slope
    return 0.0, largest[0] / largest[1]
