"""`hetegen profile` as a whole: `run_profile` measures this machine into a profile document,
`with_engine_costs` adds the engine's fixed costs (measure.engine_costs), and
`load_or_measure` gives plan, run and bench the saved profile (measured first when missing,
engine costs included)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from hetegen_cli.core import devices, paths
from hetegen_cli.core.console import activity, note, warn
from hetegen_cli.core.errors import UsageError, describe_error
from hetegen_cli.core.paths import check_writable_folder, probe
from hetegen_cli.core.quant import QUANT_FORMATS
from hetegen_cli.measure import engine_costs
from hetegen_cli.measure.cpu import cpu_pressure, default_threads, host_info, measure_cpu, sweep_threads
from hetegen_cli.measure.gpu import measure_gpu
from hetegen_cli.measure.timing import (
    CPU_DTYPES,
    GPU_DTYPES,
    HostClock,
    MiB,
    Sizes,
    Steps,
    sizes_for,
    torch_threads,
)
from hetegen_cli.profile.document import (
    GPU_SKIPPED_NOTE,
    assess_busy,
    build_profile,
    busy_warning,
    identity,
    load_profile,
    save_profile,
    validate_profile,
)

# --- the whole profile -------------------------------------------------------------------


def run_profile(
    quick: bool,
    threads: int | None = None,
    repeat: int | None = None,
    progress: Any = None,
    timer: Callable[[], float] | None = None,
    sizes: Sizes | None = None,
    gpu_backend: Any = None,
) -> dict[str, Any]:
    """Measure this machine and return the profile document (see profile.document.SCHEMA),
    without the engine's fixed costs (with_engine_costs adds them).

    `threads`: CPU intra-op threads (default: default_threads()). `repeat`: samples per
    measurement. `progress`: a Rich Progress-like object. `timer`: seconds clock for every
    measurement (default time.perf_counter; injecting one also replaces CUDA events).
    `sizes`: what to measure (default QUICK or FULL, see sizes_for). `gpu_backend`: measure
    the GPU part on this devices.Backend (tests: the CPU stand-in); default CUDA if present.
    """
    if threads is not None and not 1 <= threads <= 4096:
        raise UsageError(f"--threads must be in [1, 4096], got {threads}", "e.g. --threads 4")
    if repeat is not None and not 1 <= repeat <= 1000:
        raise UsageError(f"--repeat must be in [1, 1000], got {repeat}", "e.g. --repeat 5")
    if sizes is None:
        sizes = sizes_for(quick, repeat)
    elif repeat:
        sizes = replace(sizes, repeat=repeat)
    host = host_info()
    pressure = cpu_pressure()  # before our own threads start
    has_gpu = gpu_backend is not None or devices.cuda_available()
    threads = threads or default_threads(host["physical_cores"], has_gpu)
    pool = sizes.pool_bytes or max(256 * MiB, 2 * (host["last_level_cache_bytes"] or 0))
    pool = max(4096, min(pool, host["ram_available_bytes"] // 4))
    sweep = sweep_threads(threads, host["physical_cores"]) if sizes.thread_sweep else []
    steps = Steps(progress, count_steps(sizes, len(sweep), has_gpu))
    clock = HostClock(timer)
    with torch_threads(threads), torch.inference_mode(), activity("measuring this machine"):
        cpu = measure_cpu(sizes, threads, sweep, pool, clock, steps)
        gpu, note = None, GPU_SKIPPED_NOTE
        if has_gpu:
            with devices.out_of_memory_as_error("profiling the GPU"):
                gpu = measure_gpu(sizes, cpu, host, pool, timer, steps, gpu_backend)
            note = None
    doc = build_profile(host, cpu, gpu, note, quick)
    doc["busy"] = assess_busy(
        host.get("load_average_1m"), pressure, gemv_relative_sd(cpu), host["logical_cores"]
    )
    return doc


def gemv_relative_sd(cpu: dict[str, Any]) -> float | None:
    """Median sd / mean of the CPU GEMV timings: repeats that disagree mean other work ran."""
    spreads = sorted(
        m["seconds"]["sd"] / m["seconds"]["mean"] for m in cpu.get("gemv", []) if m["seconds"]["mean"] > 0
    )
    return spreads[len(spreads) // 2] if spreads else None


def count_steps(sizes: Sizes, sweep_counts: int, has_gpu: bool) -> int:
    """Number of progress steps of one profile run."""
    n = 2 + len(CPU_DTYPES) * (len(sizes.gemv_shapes) + len(sizes.gemm_shapes) * len(sizes.gemm_tokens))
    n += len(QUANT_FORMATS) * len(sizes.gemv_shapes)
    n += len(CPU_DTYPES) * sweep_counts
    if has_gpu:
        n += len(GPU_DTYPES) * (
            len(sizes.gpu_gemv_shapes) + len(sizes.gpu_gemm_shapes) * len(sizes.gemm_tokens)
        )
        n += 4 * len(sizes.transfer_sizes) + 1
    return n


def with_engine_costs(doc: dict[str, Any], quick: bool) -> dict[str, Any]:
    """`doc` with its `engine` section measured (measure.engine_costs.measure_for_document);
    if that fails in any way, `doc` without it and with `engine_error` (type, message, the
    traceback's last lines), and a one-line warning: the rest of the profile stands."""
    try:
        with activity("measuring the engine's fixed costs"):
            engine = engine_costs.measure_for_document(doc, quick=quick)
        return validate_profile({**doc, "engine": engine})
    except Exception as exc:  # recorded: the rest of the profile stands without it
        error = describe_error(exc)
        warn(
            f"the engine's fixed costs could not be measured ({error['type']}: "
            f"{(error['message'].splitlines() or [''])[0][:200]}); the profile is saved without "
            "them, with `engine_error`"
        )
        return {**doc, "engine": None, "engine_error": error}


def load_or_measure(path: str | Path | None, progress: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(profile document, identity) of `path`, or of this machine's saved profile, which is
    measured (`hetegen profile --quick`, the engine's fixed costs included) and saved first
    when missing. Used by plan, run and bench; `progress` (a Rich Progress-like object, or
    None) shows the measurement."""
    if path is None:
        path = paths.default_profile_path()
        if probe(path, "the saved profile") is None:
            check_writable_folder(
                path.parent,
                "HETEGEN_HOME",
                f"set {paths.HOME_ENV} to a writable folder, or pass --profile PATH",
            )
            note(f"no hardware profile at {path}: measuring a quick one (`hetegen profile --quick`)")
            doc = with_engine_costs(run_profile(quick=True, progress=progress), quick=True)
            save_profile(doc, path)
            note(f"profile saved to {path}")
    doc = load_profile(path)
    warning = busy_warning(doc, path)
    if warning:
        warn(warning)
    return doc, identity(doc, path)
