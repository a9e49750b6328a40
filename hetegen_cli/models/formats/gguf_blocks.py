"""GGUF tensor types -> hetegen's quantized layout (core.quant), one tensor's raw block bytes at
a time; and the two K-quant encoders the synthetic GGUF writer needs (the `gguf` package
dequantizes K-quants but cannot quantize them).

Which hetegen format each GGUF type becomes (`NATIVE`, docs/models.md "GGUF types"):

- **int4, groups of 32** from Q4_0 and Q4_1 (the same scales and mins: exact) and from Q4_K.
  A Q4_K super-block of 256 weights holds float16 super-scales d and dmin and, per 32-weight
  sub-block, 6-bit integers sc and m: w = d*sc*q - dmin*m, q in [0, 15]. That is int4's
  w = q*scale + min with scale = d*sc and min = -dmin*m per group of 32, but hetegen stores
  scale and min in float16 and d*sc needs up to 17 significant bits: each is rounded to the
  nearest float16, so a weight is within float16 rounding of its group's scale and offset
  (relative error of each at most 2^-11; exact when the product fits, tested and measured).
- **int8, per row** from Q5_0, Q5_1, Q5_K, Q6_K and Q8_0: five or six bits (or Q8_0's block
  scales) do not fit int4, and torch's int8 kernel takes one scale per row, so each row is
  re-quantized from the exact values (`gguf.quants.dequantize`), rows a chunk at a time.
- F32, F16 and BF16 linears stay floating point (bfloat16).

Every other type (Q2_K, Q3_K, the IQ*, TQ* and MXFP4 types, ...) has no honest mapping:
it is refused before any conversion, or with --allow-float-copy dequantized to bfloat16.
"""

from __future__ import annotations

import numpy as np
import torch

from hetegen_cli.models.formats.gguf_types import FLOAT_TYPES, NATIVE, ggml_type, row_bytes, supported_types  # noqa: F401
from hetegen_cli.models.formats.quant import GGUF_BLOCK, QuantWeight, from_gguf_blocks, pack_nibbles, quantize

#: GGUF types whose int4 values, scales and mins are the file's own (no rounding at all)
EXACT_INT4 = ("Q4_0", "Q4_1")
SUPER_BLOCK = 256  # weights per K-quant super-block (QK_K)
Q4_K_BYTES = 144  # d, dmin (2 + 2), 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
Q6_K_BYTES = 210  # 128 bytes low nibbles, 64 bytes high bits, 16 int8 scales, d
#: values dequantized at once (a tensor re-quantized per row, a float copy): 4 MiB of
#: float32; gguf's numpy decoders hold a few arrays of that size while they work
CHUNK_VALUES = 1024 * 1024


def dequantize_rows(kind: str, raw: np.ndarray | torch.Tensor, in_features: int) -> torch.Tensor:
    """Rows of GGUF type `kind` (raw bytes uint8 [rows, row_bytes]) as float32 [rows, in]: the
    `gguf` package's own dequantization, the reference."""
    from gguf import quants

    array = raw.numpy() if isinstance(raw, torch.Tensor) else raw
    if kind == "F32":
        values = array.view(np.float32)
    elif kind == "F16":
        values = array.view(np.float16).astype(np.float32)
    elif kind == "BF16":
        return (
            torch.from_numpy(array.view(np.int16).copy())
            .view(torch.bfloat16)
            .float()
            .reshape(-1, in_features)
        )
    else:
        values = quants.dequantize(array, ggml_type(kind))
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(-1, in_features)


def q4_k_to_int4(raw: torch.Tensor, out: int, inp: int) -> QuantWeight:
    """Q4_K rows (raw uint8 [out, inp / 256 * 144]) -> int4 with groups of 32: the same q
    values, scale = d*sc and min = -dmin*m per 32-weight sub-block, each rounded to float16
    (module docstring). ValueError when a scale or min overflows float16."""
    blocks = inp // SUPER_BLOCK
    b = raw.reshape(out, blocks, Q4_K_BYTES)
    d = b[..., 0:2].contiguous().view(torch.float16).reshape(out, blocks, 1).to(torch.float32)
    dmin = b[..., 2:4].contiguous().view(torch.float16).reshape(out, blocks, 1).to(torch.float32)
    sc, m = _q4_k_scales(b[..., 4:16].to(torch.int32))
    scale = (d * sc.to(torch.float32)).to(torch.float16)  # d*sc exact in float32, then rounded
    low = (-(dmin * m.to(torch.float32))).to(torch.float16)
    if not (torch.isfinite(scale).all() and torch.isfinite(low).all()):
        raise ValueError("a Q4_K sub-block scale or min does not fit float16")
    # nibbles: 4 runs of 32 bytes; the low nibbles are sub-block 2p, the high ones 2p + 1
    qs = b[..., 16:].reshape(out, blocks, 4, 1, 32)
    values = torch.cat((qs & 0x0F, qs >> 4), dim=3).reshape(out, inp)
    groups = blocks * (SUPER_BLOCK // GGUF_BLOCK)
    return QuantWeight(
        "int4",
        out,
        inp,
        pack_nibbles(values),
        scale.reshape(out, groups),
        low.reshape(out, groups),
        GGUF_BLOCK,
    )


def _q4_k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed bytes of a Q4_K/Q5_K super-block -> (sc, m), 8 six-bit values each:
    bytes 0-3 hold sc 0-3 (low 6 bits) and the top 2 bits of sc 4-7, bytes 4-7 the same for
    m, bytes 8-11 the low 4 bits of sc 4-7 (low nibble) and of m 4-7 (high nibble)."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc, mn


def int8_from_rows(kind: str, raw: torch.Tensor, out: int, inp: int) -> QuantWeight:
    """Rows of any GGUF type -> int8 per row, re-quantized from the exact dequantized values
    (a chunk of rows at a time: never the whole tensor in float32)."""
    rows = max(1, CHUNK_VALUES // inp)
    parts = [quantize(dequantize_rows(kind, raw[r : r + rows], inp), "int8") for r in range(0, out, rows)]
    q = torch.cat([p.q for p in parts]) if len(parts) > 1 else parts[0].q
    scale = torch.cat([p.scale for p in parts]) if len(parts) > 1 else parts[0].scale
    return QuantWeight("int8", out, inp, q, scale)


def to_quant_weight(kind: str, raw: torch.Tensor, out: int, inp: int, fmt: str | None = None) -> QuantWeight:
    """One GGUF linear (raw uint8 [out, row bytes]) in hetegen's layout: `fmt` (default: its
    NATIVE format). Q4_0/Q4_1/Q4_K to int4 g32 from their blocks; anything to int8 from the
    exact values. ValueError for a type or format this module cannot produce."""
    fmt = fmt or NATIVE.get(kind)
    if fmt == "int4" and kind in EXACT_INT4:
        return from_gguf_blocks(kind, raw, out, inp)
    if fmt == "int4" and kind == "Q4_K":
        return q4_k_to_int4(raw, out, inp)
    if fmt == "int8":
        return int8_from_rows(kind, raw, out, inp)
    raise ValueError(f"GGUF type {kind} has no mapping onto {fmt}")


# --- encoders (gguf has no Q4_K or Q6_K quantizer) --------------------------------------


def _round(x: np.ndarray) -> np.ndarray:
    """Round half away from zero (ggml's nearest_int)."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def _float16_up(x: np.ndarray) -> np.ndarray:
    """`x` (>= 0) as float16, rounded up: a super-scale never smaller than asked."""
    f = x.astype(np.float16)
    return np.where(f.astype(np.float32) < x, np.nextafter(f, np.float16(np.inf)), f).astype(np.float16)


def quantize_q4_k(values: np.ndarray) -> np.ndarray:
    """float32 [rows, n] (n a multiple of 256) -> Q4_K blocks uint8 [rows, n / 256 * 144].

    Per 32-weight sub-block: min = min(0, lowest value), scale = (highest - min) / 15. The
    super-block's d = max scale / 63 and dmin = max(-min) / 63 (float16, rounded up); sc and m
    are the 6-bit multiples rounded up, so no weight falls below q = 0 or far above q = 15;
    q = round((w + dmin*m) / (d*sc)). Simpler than llama.cpp's search for the best scales,
    and a valid Q4_K that llama.cpp reads the same."""
    x = np.asarray(values, dtype=np.float32)
    rows, n = x.shape
    if n % SUPER_BLOCK:
        raise ValueError(f"Q4_K needs a multiple of {SUPER_BLOCK} inputs, not {n}")
    blocks = x.reshape(-1, 8, 32)
    low = np.minimum(blocks.min(axis=-1), 0.0)  # [nb, 8], <= 0
    scale = (blocks.max(axis=-1) - low) / 15.0
    d = _float16_up(scale.max(axis=-1, keepdims=True) / 63.0)
    dmin = _float16_up(-low.min(axis=-1, keepdims=True) / 63.0)
    d32, dmin32 = d.astype(np.float32), dmin.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32 > 0, np.ceil(scale / d32), 0).clip(0, 63).astype(np.uint8)
        m = np.where(dmin32 > 0, np.ceil(-low / dmin32), 0).clip(0, 63).astype(np.uint8)
        step = (d32 * sc.astype(np.float32))[..., None]
        offset = (dmin32 * m.astype(np.float32))[..., None]
        q = np.where(step > 0, _round((blocks + offset) / step), 0).clip(0, 15).astype(np.uint8)
    packed = np.empty((blocks.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    q = q.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(-1, 128)
    out = np.concatenate([d.view(np.uint8), dmin.view(np.uint8), packed, qs], axis=1)
    return out.reshape(rows, -1)


def quantize_q6_k(values: np.ndarray) -> np.ndarray:
    """float32 [rows, n] (n a multiple of 256) -> Q6_K blocks uint8 [rows, n / 256 * 210].

    Per 16-weight sub-block a signed scale s = (the value of largest magnitude) / -32, so that
    value lands on q = -32; the super-block's d = max |s| / 127 (float16, rounded up) and each
    s its int8 multiple, rounded away from zero (a step never too small to reach the largest
    value); q = round(w / (d*s)) in [-32, 31], stored + 32 as 6 bits (low nibble in ql, top 2
    bits in qh, ggml's order)."""
    x = np.asarray(values, dtype=np.float32)
    rows, n = x.shape
    if n % SUPER_BLOCK:
        raise ValueError(f"Q6_K needs a multiple of {SUPER_BLOCK} inputs, not {n}")
    blocks = x.reshape(-1, 16, 16)
    nb = blocks.shape[0]
    big = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    s = big / -32.0  # [nb, 16]
    d = _float16_up(np.abs(s).max(axis=-1, keepdims=True) / 127.0)
    d32 = d.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32 > 0, np.sign(s) * np.ceil(np.abs(s) / d32), 0).clip(-128, 127).astype(np.int8)
        step = (d32 * sc.astype(np.float32))[..., None]
        q = np.where(step != 0, _round(blocks / step), 0).clip(-32, 31)
    q = (q + 32).astype(np.uint8).reshape(nb, 2, 128)  # two halves of 128 weights
    low, high = q & 0x0F, q >> 4
    # ql: per half, 64 bytes: weights l (low nibble) and l + 64 (high nibble)
    ql = (low[:, :, :64] | (low[:, :, 64:] << 4)).reshape(nb, 128)
    # qh: per half, 32 bytes: weights l, l + 32, l + 64, l + 96 in bits 0-1, 2-3, 4-5, 6-7
    h = high.reshape(nb, 2, 4, 32)
    qh = (h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)).reshape(nb, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8)], axis=1)
    return out.reshape(rows, -1)
