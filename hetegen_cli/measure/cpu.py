"""The host and CPU part of `hetegen profile`: host facts, DRAM read bandwidth, GEMV per dtype
(and per thread count), GEMM at prefill shapes. Timing rules: measure.timing."""

from __future__ import annotations

import os
import platform
from typing import Any

import psutil
import torch

from hetegen_cli.core.devices import dtype_name, torch_dtype
from hetegen_cli.core.quant import DEFAULT_GROUP_SIZE, QUANT_FORMATS
from hetegen_cli.core.stats import summarize
from hetegen_cli.measure.timing import (
    CPU_DTYPES,
    HostClock,
    MiB,
    Shape,
    Sizes,
    Steps,
    gemm_fn,
    gemv_fn,
    measure,
    quant_gemv_fn,
    random_tensor,
    torch_threads,
    weight_pool,
)
from hetegen_cli.models.formats import cpu_gemm, cpu_kernels
from hetegen_cli.profile.document import CPU_FEATURES, rate

# --- host ----------------------------------------------------------------------------------


def cpuinfo() -> tuple[str, set[str]]:
    """(model name, flags) from /proc/cpuinfo; ("", empty) where it does not exist."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware", "cpu model") and not model:
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, flags


def l3_cache_bytes() -> int | None:
    """Size of the largest (last-level) cache of CPU 0 from sysfs, or None."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    mult = {"K": 1024, "M": MiB, "G": 1024 * MiB}
    best = None
    try:
        entries = [e for e in os.listdir(base) if e.startswith("index")]
    except OSError:
        return None
    for entry in entries:
        try:
            with open(os.path.join(base, entry, "size"), encoding="ascii") as handle:
                text = handle.read().strip().upper()
            value = int(text.rstrip("KMG")) * mult.get(text[-1:], 1)
        except (OSError, ValueError):
            continue
        best = max(best or 0, value)
    return best


def _load_average() -> float | None:
    """1-minute load average when profiling started (busy machines give noisy numbers)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def cpu_pressure() -> float | None:
    """Linux's CPU pressure: % of the last 10 s in which some runnable task waited for a core
    (/proc/pressure/cpu, "some avg10"), or None where the kernel does not report it."""
    try:
        with open("/proc/pressure/cpu", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("some"):
                    fields = dict(part.split("=", 1) for part in line.split()[1:])
                    return float(fields["avg10"])
    except (OSError, ValueError, KeyError):
        pass
    return None


def host_info() -> dict[str, Any]:
    """CPU model, cores, RAM, matrix-kernel CPU flags and software versions."""
    model, flags = cpuinfo()
    vm = psutil.virtual_memory()
    physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return {
        "cpu_model": model or platform.processor() or platform.machine() or "unknown",
        "physical_cores": int(physical),
        "logical_cores": int(psutil.cpu_count(logical=True) or physical),
        "ram_total_bytes": int(vm.total),
        "ram_available_bytes": int(vm.available),
        "features": {name: name in flags for name in CPU_FEATURES},
        "torch_cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
        "load_average_1m": _load_average(),
        "last_level_cache_bytes": l3_cache_bytes(),
        "os": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


# --- CPU -----------------------------------------------------------------------------------


def measure_cpu(
    sizes: Sizes, threads: int, sweep_counts: list[int], pool_bytes: int, clock: HostClock, steps: Steps
) -> dict[str, Any]:
    """The document's "cpu" section (run under `threads` intra-op threads; the GEMV at the
    largest shape is repeated for each thread count in `sweep_counts`)."""
    m = dict(repeat=sizes.repeat, warmup=sizes.warmup, min_sample_s=sizes.min_sample_s)
    largest = max(sizes.gemv_shapes, key=lambda s: s[0] * s[1])
    gemv, sweep, memory = [], [], {}
    for dtype in CPU_DTYPES:
        pool = weight_pool(torch_dtype(dtype), sizes.gemv_shapes, pool_bytes)
        if dtype == "float32":
            with steps.step("CPU memory read bandwidth"):
                memory = _memory_read(pool, clock, m)
        for shape in sizes.gemv_shapes:
            with steps.step(f"CPU GEMV {dtype} {shape[0]}x{shape[1]}"):
                gemv.append(_cpu_gemv(shape, pool, threads, pool_bytes, clock, m))
        for count in sweep_counts:
            with steps.step(f"CPU GEMV {dtype}, {count} threads"):
                if count == threads:
                    g = gemv[-len(sizes.gemv_shapes) + sizes.gemv_shapes.index(largest)]
                else:
                    with torch_threads(count):
                        g = _cpu_gemv(largest, pool, count, pool_bytes, clock, m)
                sweep.append(
                    {
                        k: g[k]
                        for k in ("threads", "dtype", "out_features", "in_features", "weight_bytes_per_s")
                    }
                )
        del pool
    sweep.sort(key=lambda e: e["threads"])  # stable: dtype order within a thread count
    quantized = []
    for fmt in QUANT_FORMATS:
        for shape in sizes.gemv_shapes:
            with steps.step(f"CPU GEMV {fmt} {shape[0]}x{shape[1]}"):
                made = quant_gemv_fn(fmt, shape, pool_bytes)
                if made is None:
                    continue
                fn, weight_bytes, _ = made
                kind = {
                    "format": fmt,
                    "group_size": DEFAULT_GROUP_SIZE if fmt == "int4" else None,
                    "kernel": cpu_kernels.label(),
                }
                quantized.append(_gemv_entry(kind, shape, weight_bytes, threads, measure(fn, clock, **m)))
    with steps.step("CPU GEMM for prompts: torch's or oneDNN's"):
        prompt_gemm = {cls: cpu_gemm.choice(cls).backend for cls in cpu_gemm.CLASSES}
    at_largest = [g for g in gemv if (g["out_features"], g["in_features"]) == largest]
    best = max(at_largest, key=lambda g: g["params_per_s"])["dtype"]

    gemm = []
    for dtype in CPU_DTYPES:
        for shape in sizes.gemm_shapes:
            for tokens in sizes.gemm_tokens:
                with steps.step(f"CPU GEMM {dtype} {tokens} tokens"):
                    sec = measure(gemm_fn(shape, tokens, torch_dtype(dtype)), clock, **m)
                    gemm.append(
                        {
                            "dtype": dtype,
                            "tokens": tokens,
                            "out_features": shape[0],
                            "in_features": shape[1],
                            "threads": threads,
                            "seconds": sec,
                            "flops_per_s": rate(2.0 * tokens * shape[0] * shape[1], sec),
                        }
                    )

    return {
        "threads": threads,
        "memory_read_bytes_per_s": memory,
        "gemv": gemv,
        "gemm": gemm,
        "thread_sweep": sweep,
        "quant_gemv": quantized,
        "prompt_gemm": prompt_gemm,
        "best_gemv_dtype": best,
        "pool_bytes": pool_bytes,
    }


def _memory_read(pool: torch.Tensor, clock: HostClock, m: dict) -> dict[str, Any]:
    """Read bandwidth: stream the fp32 pool once per call with a matrix-vector product
    over [rows, 4096] (one multiply-add per 4 bytes read); stats of bytes/s."""
    cols = 4096 if pool.numel() >= 4096 * 16 else 64
    buf = pool[: pool.numel() // cols * cols].view(-1, cols)
    vec = random_tensor(cols, torch.float32, seed=1)
    sec = measure(lambda: torch.mv(buf, vec), clock, **m)
    memory = summarize([buf.numel() * 4 / s for s in sec["samples"]])
    memory.update(method="fp32 matrix-vector product", buffer_bytes=buf.numel() * 4)
    return memory


def _cpu_gemv(
    shape: Shape, pool: torch.Tensor, threads: int, pool_bytes: int, clock: HostClock, m: dict
) -> dict[str, Any]:
    fn, weight_bytes, copies = gemv_fn(shape, pool, pool_bytes)
    entry = _gemv_entry(
        {"dtype": dtype_name(pool.dtype)}, shape, weight_bytes, threads, measure(fn, clock, **m)
    )
    return {**entry, "pool_copies": copies}


def _gemv_entry(kind: dict, shape: Shape, weight_bytes: int, threads: int, sec: dict) -> dict[str, Any]:
    """One GEMV measurement: `kind` (dtype, or format and group) first, then shape and rates."""
    return {
        **kind,
        "out_features": shape[0],
        "in_features": shape[1],
        "weight_bytes": weight_bytes,
        "threads": threads,
        "seconds": sec,
        "weight_bytes_per_s": rate(weight_bytes, sec),
        "params_per_s": rate(shape[0] * shape[1], sec),
    }


def default_threads(physical_cores: int, has_gpu: bool) -> int:
    """Intra-op threads for the CPU share: all physical cores, less one on a GPU machine with
    4+ cores, which leaves room for the main thread launching CUDA work (docs/method.md §10).
    Hyperthreads add no memory bandwidth, so logical cores are not counted."""
    if has_gpu and physical_cores >= 4:
        return physical_cores - 1
    return max(1, physical_cores)


def sweep_threads(threads: int, physical_cores: int) -> list[int]:
    """1, half and all physical cores, plus `threads` (deduplicated, ascending)."""
    return sorted({1, max(1, physical_cores // 2), physical_cores, threads})
