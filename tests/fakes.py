"""Made-up hardware for pure tests: schema-valid profile documents and cost-model rates with
round numbers, so results can be checked by hand."""

from __future__ import annotations

import itertools

from hetegen_cli.core import quant
from hetegen_cli.measure import timing
from hetegen_cli.measure.profile import run_profile
from hetegen_cli.plan import costmodel as cm

GB = 1e9
HUGE = 1e30  # a rate so high its term vanishes


def _stats(seconds: float) -> dict:
    return {"mean": seconds, "sd": 0.0, "samples": [seconds]}


def _quant_gemv(quant_bw: dict, call_s: float, threads: int) -> list[dict]:
    out = []
    for fmt, bw in quant_bw.items():
        for rows, cols in ((512, 512), (4096, 4096), (11008, 4096)):
            wb = quant.weight_bytes(fmt, rows, cols)
            sec = call_s + wb / bw
            out.append(
                {
                    "format": fmt,
                    "group_size": 32 if fmt == "int4" else None,
                    "out_features": rows,
                    "in_features": cols,
                    "weight_bytes": wb,
                    "threads": threads,
                    "seconds": _stats(sec),
                    "weight_bytes_per_s": wb / sec,
                    "params_per_s": rows * cols / sec,
                }
            )
    return out


def make_profile(
    *,
    cpu_bw: float = 50 * GB,
    cpu_call_s: float = 0.0,
    cpu_flops: float = 1e12,
    cpu_dtypes: dict | None = None,
    cpu_gemm: dict | None = None,
    best: str = "float16",
    dram: float = 70 * GB,
    gpu: bool = True,
    pcie_bw: float = 25 * GB,
    pcie_copy_s: float = 0.0,
    hbm: float = 1000 * GB,
    gpu_call_s: float = 0.0,
    gpu_flops: float = 100e12,
    free: int = 7 * 2**30,
    total: int = 8 * 2**30,
    cpu_ratio: float = 1.0,
    pcie_ratio: float = 1.0,
    ram_available: int = 64 * 2**30,
    threads: int = 8,
    created_utc: str = "2026-01-01T00:00:00Z",
    quant_bw: dict | None = None,
) -> dict:
    """A schema-valid profile document (profile.document.SCHEMA) with exactly these rates.

    cpu_dtypes: dtype -> GEMV bytes/s (default: `best` at cpu_bw, float32 at cpu_bw, i.e.
    half the params/s). cpu_gemm: dtype -> GEMM FLOP/s (default cpu_flops for each).
    quant_bw: format (int8, int4) -> quantized GEMV stored bytes/s (default: none measured).
    Timings are t = call + bytes / rate on a few shapes.
    """
    cpu_dtypes = cpu_dtypes or {best: cpu_bw, "float32": cpu_bw}
    size = {"float32": 4, "float16": 2, "bfloat16": 2}
    gemv, gemm = [], []
    for dtype, bw in cpu_dtypes.items():
        for out, inp in ((512, 512), (2048, 2048), (4096, 4096), (11008, 4096)):
            wb = out * inp * size[dtype]
            sec = cpu_call_s + wb / bw
            gemv.append(
                {
                    "dtype": dtype,
                    "out_features": out,
                    "in_features": inp,
                    "weight_bytes": wb,
                    "threads": threads,
                    "seconds": _stats(sec),
                    "weight_bytes_per_s": wb / sec,
                    "params_per_s": out * inp / sec,
                }
            )
        flops = (cpu_gemm or {}).get(dtype, cpu_flops)
        for tokens in (128, 512):
            sec = 2 * tokens * 4096 * 4096 / flops
            gemm.append(
                {
                    "dtype": dtype,
                    "tokens": tokens,
                    "out_features": 4096,
                    "in_features": 4096,
                    "threads": threads,
                    "seconds": _stats(sec),
                    "flops_per_s": flops,
                }
            )
    doc = {
        "schema_version": 1,
        "kind": "hetegen.profile",
        "hetegen_version": "0.1.0",
        "created_utc": created_utc,
        "quick": True,
        "host": {
            "cpu_model": "Made-up CPU (test)",
            "physical_cores": threads,
            "logical_cores": 2 * threads,
            "ram_total_bytes": 2 * ram_available,
            "ram_available_bytes": ram_available,
            "features": {},
            "os": "Linux",
            "python": "3.12",
            "torch": "2.13",
        },
        "cpu": {
            "threads": threads,
            "memory_read_bytes_per_s": _stats(dram),
            "gemv": gemv,
            "gemm": gemm,
            "thread_sweep": [],
            "best_gemv_dtype": best,
            "quant_gemv": _quant_gemv(quant_bw or {}, cpu_call_s, threads),
        },
        "gpu": None,
        "gpu_note": "no CUDA GPU: GPU measurements skipped",
    }
    if gpu:
        transfers = []
        for nbytes in (2**20, 16 * 2**20, 128 * 2**20):
            sec = pcie_copy_s + nbytes / pcie_bw
            transfers.append(
                {
                    "direction": "h2d",
                    "memory": "pinned",
                    "size_bytes": nbytes,
                    "seconds": _stats(sec),
                    "bytes_per_s": nbytes / sec,
                }
            )
            transfers.append(
                {
                    "direction": "h2d",
                    "memory": "pageable",
                    "size_bytes": nbytes,
                    "seconds": _stats(2 * sec),
                    "bytes_per_s": nbytes / sec / 2,
                }
            )
        ggemv, ggemm = [], []
        for dtype in ("float16", "bfloat16"):
            for out, inp in ((4096, 4096), (11008, 4096)):
                wb = out * inp * 2
                sec = gpu_call_s + wb / hbm
                ggemv.append(
                    {
                        "dtype": dtype,
                        "out_features": out,
                        "in_features": inp,
                        "weight_bytes": wb,
                        "seconds": _stats(sec),
                        "weight_bytes_per_s": wb / sec,
                    }
                )
            for tokens in (128, 512):
                ggemm.append(
                    {
                        "dtype": dtype,
                        "tokens": tokens,
                        "out_features": 4096,
                        "in_features": 4096,
                        "seconds": _stats(2 * tokens * 4096 * 4096 / gpu_flops),
                        "flops_per_s": gpu_flops,
                    }
                )
        doc["gpu"] = {
            "name": "Made-up GPU (test)",
            "total_memory_bytes": total,
            "free_memory_bytes": free,
            "compute_capability": "8.6",
            "gemm": ggemm,
            "gemv": ggemv,
            "transfers": transfers,
            "concurrent": {
                "dtype": best,
                "size_bytes": 64 * 2**20,
                "h2d_alone_bytes_per_s": pcie_bw,
                "h2d_bytes_per_s": pcie_bw * pcie_ratio,
                "cpu_gemv_alone_weight_bytes_per_s": cpu_bw,
                "cpu_gemv_weight_bytes_per_s": cpu_bw * cpu_ratio,
            },
        }
        doc["gpu_note"] = None
    return doc


def simple_rates(**over) -> cm.Rates:
    """B_cpu 50 GB/s, B_pcie 25 GB/s, no overheads, an infinitely fast GPU, fp16 on both."""
    base = dict(
        weights_dtype="float16",
        cpu_dtype="float16",
        cpu_bytes_per_s=50 * GB,
        cpu_bytes_per_s_concurrent=50 * GB,
        cpu_flops_per_s=1e12,
        dram_bytes_per_s=HUGE,
        pcie_bytes_per_s=25 * GB,
        pcie_bytes_per_s_concurrent=25 * GB,
        gpu_bytes_per_s=HUGE,
        gpu_flops_per_s=HUGE,
    )
    base.update(over)
    return cm.Rates(**base)


#: a desktop-like machine with per-call overheads: the tests' common non-trivial rates
DESKTOP_RATES = simple_rates(
    cpu_call_s=30e-6,
    pcie_copy_s=10e-6,
    gpu_call_s=8e-6,
    gpu_bytes_per_s=900 * GB,
    gpu_flops_per_s=80e12,
    cpu_bytes_per_s_concurrent=40 * GB,
    pcie_bytes_per_s_concurrent=22 * GB,
)

#: QUICK shrunk 20x: shapes like 208x208, pools of a few hundred KiB (runs in about a second).
TINY = timing.QUICK.scaled(0.05)
TICK = 0.25  # a power of two: differences of multiples are exact in binary floating point
TOP_FIELDS = (
    "schema_version",
    "kind",
    "hetegen_version",
    "created_utc",
    "quick",
    "host",
    "cpu",
    "gpu",
    "gpu_note",
)


def fake_timer(tick: float = TICK):
    """A clock that advances `tick` seconds per reading."""
    counter = itertools.count()
    return lambda: next(counter) * tick


def tiny_profile(**kwargs) -> dict:
    return run_profile(quick=True, sizes=TINY, timer=fake_timer(), **kwargs)
