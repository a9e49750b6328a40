"""Hardware constants for the cost model, fitted from a profile document (pure, no torch).

`rates_from_profile(profile, weights_dtype)` reads a validated profile (profile.document.SCHEMA)
and returns `hardware.Rates` plus notes on fallbacks (docs/plan.md, "The cost model");
`phase_rates_from_profile` the rates of both phases, `standin_rates` those of the CPU stand-in.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from hetegen_cli.core import quant
from hetegen_cli.core.dtypes import itemsize
from hetegen_cli.core.errors import ProfileError
from hetegen_cli.plan.costmodel import hardware as cm
from hetegen_cli.profile.document import Profile, profile_sections


def _mean_s(entry: Any) -> float:
    return float(entry.seconds.mean)


def _nearest_flops(entries: list[Any], tokens: int) -> float | None:
    """FLOP/s of the GEMM measurement with the token count nearest `tokens` (log scale),
    the fastest shape among equals."""
    if not entries:
        return None
    key = lambda m: (abs(math.log(m.tokens / max(tokens, 1))), -m.flops_per_s)  # noqa: E731
    return float(min(entries, key=key).flops_per_s)


def _of_dtype(entries: list[Any], dtype: str, notes: list[str], what: str) -> list[Any]:
    """Entries of `dtype`, else of the first measured dtype (with a note)."""
    chosen = [m for m in entries if m.dtype == dtype]
    if chosen or not entries:
        return chosen
    other = entries[0].dtype
    notes.append(f"{what} not measured for {dtype}; used the {other} measurements")
    return [m for m in entries if m.dtype == other]


def _profile_error(message: str, hint: str = "re-run `hetegen profile`") -> ProfileError:
    return ProfileError(message, hint)


def rates_from_profile(
    profile: dict | Profile, weights_dtype: str, cpu_dtype: str | None = None, prefill_tokens: int = 512
) -> tuple[cm.Rates, list[str]]:
    """Fit `Rates` from a validated profile document; returns them with notes on fallbacks.

    CPU: GEMV t = call + weight_bytes / B_cpu, least squares over the measured shapes of
    `cpu_dtype` (default cpu.best_gemv_dtype, the fastest in params/s); F_cpu from the GEMM
    measurement nearest `prefill_tokens`; B_dram = cpu.memory_read_bytes_per_s. PCIe: B_pcie
    from the largest pinned H2D copy, the per-copy overhead from the smallest. GPU: GEMM FLOP/s
    of `weights_dtype`, GEMV fit for B_hbm and the launch cost. Concurrent rates scale the solo
    ones by gpu.concurrent's together/alone ratios.
    """
    notes: list[str] = []
    profile = profile_sections(profile)
    cpu = profile.cpu
    measured = sorted({m.dtype for m in cpu.gemv})
    cpu_dtype = cpu_dtype or cpu.best_gemv_dtype
    gemv = [m for m in cpu.gemv if m.dtype == cpu_dtype]
    if not gemv:
        raise _profile_error(
            f"the profile has no CPU GEMV measurements for {cpu_dtype}",
            f"pass --cpu-dtype {' or '.join(measured)}, or re-run `hetegen profile`",
        )
    threads = int(cpu.threads)
    gemv = [m for m in gemv if m.threads == threads] or gemv
    cpu_call_s, cpu_bw = cm.fit_affine([(m.weight_bytes, _mean_s(m)) for m in gemv])
    cpu_flops = _nearest_flops(_of_dtype(cpu.gemm, cpu_dtype, notes, "CPU GEMM"), prefill_tokens)
    if cpu_flops is None:
        raise _profile_error("the profile has no CPU GEMM measurements")
    dram = float(cpu.memory_read_bytes_per_s.mean)
    base = dict(
        weights_dtype=weights_dtype,
        cpu_dtype=cpu_dtype,
        cpu_threads=threads,
        cpu_call_s=cpu_call_s,
        cpu_bytes_per_s=cpu_bw,
        cpu_flops_per_s=cpu_flops,
        dram_bytes_per_s=dram,
    )
    gpu = profile.gpu
    if not gpu:
        return cm.Rates(has_gpu=False, cpu_bytes_per_s_concurrent=cpu_bw, **base), notes
    h2d = sorted(
        (t for t in gpu.transfers if t.direction == "h2d" and t.memory == "pinned"),
        key=lambda t: t.size_bytes,
    )
    if not h2d:
        raise _profile_error("the profile has no pinned host-to-GPU copy timings")
    pcie_bw = h2d[-1].size_bytes / _mean_s(h2d[-1])
    pcie_copy_s = max(0.0, _mean_s(h2d[0]) - h2d[0].size_bytes / pcie_bw) if len(h2d) > 1 else 0.0
    gpu_flops = _nearest_flops(_of_dtype(gpu.gemm, weights_dtype, notes, "GPU GEMM"), prefill_tokens)
    ggemv = _of_dtype(gpu.gemv, weights_dtype, notes, "GPU GEMV")
    if gpu_flops is None or not ggemv:
        raise _profile_error("the profile lacks GPU GEMM or GEMV measurements")
    gpu_call_s, hbm = cm.fit_affine([(m.weight_bytes, _mean_s(m)) for m in ggemv])
    conc = gpu.concurrent
    cpu_ratio = min(1.0, conc.cpu_gemv_weight_bytes_per_s / conc.cpu_gemv_alone_weight_bytes_per_s)
    pcie_ratio = min(1.0, conc.h2d_bytes_per_s / conc.h2d_alone_bytes_per_s)
    both = cpu_bw * cpu_ratio + pcie_bw * pcie_ratio
    if both > dram:  # CPU loads and DMA reads share DRAM: never more than B_dram together
        notes.append(
            f"concurrent CPU + PCIe rates ({both / 1e9:.1f} GB/s) exceed the measured "
            f"memory bandwidth ({dram / 1e9:.1f} GB/s); both scaled down to fit"
        )
        cpu_ratio, pcie_ratio = cpu_ratio * dram / both, pcie_ratio * dram / both
    probe = gpu.copy_engine_probe  # without it: one engine, the safe assumption
    return cm.Rates(
        has_gpu=True,
        h2d_copy_engines=int(probe.h2d_copy_engines) if probe and probe.h2d_copy_engines else 1,
        cpu_bytes_per_s_concurrent=cpu_bw * cpu_ratio,
        pcie_bytes_per_s=pcie_bw,
        pcie_bytes_per_s_concurrent=pcie_bw * pcie_ratio,
        pcie_copy_s=pcie_copy_s,
        gpu_call_s=gpu_call_s,
        gpu_bytes_per_s=hbm,
        gpu_flops_per_s=gpu_flops,
        **base,
    ), notes


def cpu_formats(profile: dict | Profile) -> list[str]:
    """CPU dtypes the profile measured both GEMV and GEMM for (the planner's candidates for
    the CPU share's format), in the order they were measured."""
    cpu = profile_sections(profile).cpu
    gemm = {m.dtype for m in cpu.gemm}
    return list(dict.fromkeys(m.dtype for m in cpu.gemv if m.dtype in gemm))


def quant_rates(
    profile: dict | Profile, base: cm.Rates, fmt: str, group_size: int
) -> tuple[cm.Rates, list[str]]:
    """The rates of linears stored as `fmt` (core.quant): `base` (a float format's) with the
    CPU GEMV fitted on the profile's quantized GEMVs (t = call + stored bytes / B, stored bytes
    = q + scales), the stored bytes per parameter on the host and over PCIe, and the GPU's
    dequantization traffic (it writes the share in the weights dtype and reads it again).
    The kernels' prefill FLOP rate is not measured: the base format's GEMM rate stands in."""
    notes = []
    profile = profile_sections(profile)
    entries = [m for m in profile.cpu.quant_gemv if m.format == fmt]
    per_param = quant.weight_bytes(fmt, 1, 4096, group_size) / 4096  # int8: 1 + 2/in at in=4096
    threads = int(profile.cpu.threads)
    entries = [m for m in entries if m.threads == threads] or entries
    if entries:
        call_s, bw = cm.fit_affine([(m.weight_bytes, _mean_s(m)) for m in entries])
    else:  # a profile from before quantized weights
        call_s, bw = base.cpu_call_s, base.cpu_bytes_per_s
        notes.append(
            f"the profile has no {fmt} CPU GEMV measurements: {fmt} linears assumed to read their "
            f"stored bytes at the {base.cpu_dtype} GEMV's byte rate; re-run `hetegen profile` to "
            "measure it"
        )
    ratio = base.cpu_bytes_per_s_concurrent / base.cpu_bytes_per_s if base.cpu_bytes_per_s else 1.0
    kernels = sorted({m.kernel or "torch" for m in entries})  # profiles before the field: torch's
    who = f"the {'/'.join(kernels)} {fmt} kernel" if entries else f"the {fmt} kernel"
    kernel = kernels[0] if len(kernels) == 1 else "torch"
    notes.append(
        f"{fmt} linears: the CPU share runs {who} "
        f"({bw / per_param / 1e9:.2f} Gparam/s fitted); prefill uses the {base.cpu_dtype} GEMM FLOP rate"
    )
    return replace(
        base,
        cpu_dtype=fmt,
        cpu_call_s=call_s,
        cpu_bytes_per_s=bw,
        cpu_bytes_per_s_concurrent=bw * ratio,
        weight_bytes_per_param=per_param,
        gpu_dequant_bytes_per_param=2.0 * itemsize(base.weights_dtype) if base.has_gpu else 0.0,
        cpu_kernel=kernel,
    ), notes


QuantFormats = Iterable[tuple[str, int]] | tuple[str, int] | None


def _quant_formats(quant_formats: QuantFormats) -> list[tuple[str, int]]:
    """The (format, group size) pairs of a model's quantized linears: every one of a mixed
    model (ModelSpec.quant_map's values), or the one pair callers passed before models mixed."""
    if quant_formats is None:
        return []
    if isinstance(quant_formats, tuple) and len(quant_formats) == 2 and isinstance(quant_formats[0], str):
        return [quant_formats]  # type: ignore[list-item]
    return list(dict.fromkeys(quant_formats))  # type: ignore[arg-type]


def phase_rates_from_profile(
    profile: dict | Profile,
    weights_dtype: str,
    cpu_dtypes: tuple[str, str],
    prefill_tokens: int,
    quant_formats: QuantFormats = None,
) -> tuple[cm.PhaseRates, list[str]]:
    """PhaseRates with the CPU share in cpu_dtypes = (prefill, decode), and the rates of a
    quantized model's linears: one entry per (format, group size) in `quant_formats` (a mixed
    GGUF Q4_K_M has int4 and int8 linears, each priced at its own bytes), plus the LM head's
    format (quant.HEAD_FORMAT); notes on fallbacks. A format has one group size per model."""
    notes: list[str] = []
    fitted: dict[str, cm.Rates] = {}
    for dtype in dict.fromkeys(cpu_dtypes):
        fitted[dtype], more = rates_from_profile(profile, weights_dtype, dtype, prefill_tokens)
        notes += [n for n in more if n not in notes]
    by_format: dict[str, cm.Rates] = {}
    formats = _quant_formats(quant_formats)
    groups = {fmt: group for fmt, group in formats}
    if len(groups) != len(formats):
        raise ValueError(f"one group size per format, not {formats}")
    if formats:  # the model's formats, and the LM head's
        groups.setdefault(quant.HEAD_FORMAT, quant.DEFAULT_GROUP_SIZE)
        for fmt, group in groups.items():
            by_format[fmt], more = quant_rates(profile, fitted[cpu_dtypes[1]], fmt, group)
            notes += [n for n in more if n not in notes]
    return cm.PhaseRates(fitted[cpu_dtypes[0]], fitted[cpu_dtypes[1]], by_format), notes


#: On the stand-in, the CPU share and the "GPU" share (and its "copy") run one after the other
#: on the same thread and cores. Modelled as both sides at half the CPU at once: for a balanced
#: split the pipeline's max(cpu, copy + gpu) then equals their sum at the full rate.
STANDIN_SHARE = 0.5


def standin_rates(rates: cm.PhaseRates, gpu_side: cm.Rates) -> cm.PhaseRates:
    """The rates of the CPU stand-in: the CPU share at `rates` (phase_rates_from_profile's), the
    "GPU" share at `gpu_side` (the CPU's rates in the weights dtype), the "copy" a memory copy
    (read and write: half the memory read rate); both sides at STANDIN_SHARE while they run
    together."""

    def standin(r: cm.Rates) -> cm.Rates:
        copy = r.dram_bytes_per_s / 2
        return replace(
            r,
            has_gpu=True,
            cpu_bytes_per_s_concurrent=r.cpu_bytes_per_s * STANDIN_SHARE,
            pcie_bytes_per_s=copy,
            pcie_bytes_per_s_concurrent=copy * STANDIN_SHARE,
            pcie_copy_s=0.0,
            gpu_call_s=gpu_side.cpu_call_s,
            gpu_bytes_per_s=gpu_side.cpu_bytes_per_s * STANDIN_SHARE,
            gpu_flops_per_s=gpu_side.cpu_flops_per_s * STANDIN_SHARE,
        )

    return cm.PhaseRates(standin(rates.prefill), standin(rates.decode), rates.quant)
