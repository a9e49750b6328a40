"""The GPU part of `hetegen profile`: matmul, GEMV bandwidth, H2D/D2H copies, concurrency.

Touches CUDA only through `devices` (backend, pinned memory, CUDA-event clock). Timing rules
are measure.timing.measure's; GPU work is timed with CUDA events unless a timer is injected (then
with that timer after a device synchronize).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from hetegen_cli.core import devices
from hetegen_cli.measure.timing import (
    GPU_DTYPES,
    HostClock,
    MiB,
    Sizes,
    Steps,
    gemm_fn,
    gemv_fn,
    measure,
    random_tensor,
    weight_pool,
)
from hetegen_cli.profile.document import rate


def measure_gpu(
    sizes: Sizes,
    cpu: dict[str, Any],
    host: dict[str, Any],
    pool_bytes: int,
    timer: Callable[[], float] | None,
    steps: Steps,
    backend: devices.Backend | None = None,
) -> dict[str, Any]:
    """The document's "gpu" section. `cpu` is the measured "cpu" section (for concurrency).

    `backend` defaults to the CUDA device; tests pass the CPU stand-in with a timer.
    """
    backend = backend or devices.get_backend("cuda")
    dev = backend.device

    def clock() -> Any:
        if timer is not None or not backend.is_cuda:
            return HostClock(timer, backend.synchronize)
        return devices.event_clock(backend)

    m = dict(repeat=sizes.repeat, warmup=sizes.warmup, min_sample_s=sizes.min_sample_s)
    props = backend.properties()
    free, total = backend.memory_info()

    gemm = []
    for dtype in GPU_DTYPES:
        for shape in sizes.gpu_gemm_shapes:
            for tokens in sizes.gemm_tokens:
                with steps.step(f"GPU GEMM {dtype} {tokens} tokens"):
                    sec = measure(gemm_fn(shape, tokens, devices.torch_dtype(dtype), dev), clock(), **m)
                    gemm.append(
                        {
                            "dtype": dtype,
                            "tokens": tokens,
                            "out_features": shape[0],
                            "in_features": shape[1],
                            "seconds": sec,
                            "flops_per_s": rate(2.0 * tokens * shape[0] * shape[1], sec),
                        }
                    )
    gemv = []
    gpu_pool = min(sizes.gpu_pool_bytes, free // 4)
    for dtype in GPU_DTYPES:
        pool = weight_pool(devices.torch_dtype(dtype), sizes.gpu_gemv_shapes, gpu_pool, dev)
        for shape in sizes.gpu_gemv_shapes:
            with steps.step(f"GPU GEMV {dtype} {shape[0]}x{shape[1]}"):
                fn, weight_bytes, copies = gemv_fn(shape, pool, gpu_pool)
                sec = measure(fn, clock(), **m)
                gemv.append(
                    {
                        "dtype": dtype,
                        "out_features": shape[0],
                        "in_features": shape[1],
                        "weight_bytes": weight_bytes,
                        "seconds": sec,
                        "weight_bytes_per_s": rate(weight_bytes, sec),
                        "pool_copies": copies,
                    }
                )
                del fn
        del pool

    limit = min(host["ram_available_bytes"] // 4, free // 4)
    transfers = []
    for size in sizes.transfer_sizes:
        for memory in ("pinned", "pageable"):
            for direction in ("h2d", "d2h"):
                with steps.step(f"{direction.upper()} {memory} {size >> 20} MiB"):
                    if size > limit:
                        continue
                    copy = _copy_fn(backend, direction, memory, size)
                    sec = measure(copy, clock(), **m)
                    transfers.append(
                        {
                            "direction": direction,
                            "memory": memory,
                            "size_bytes": size,
                            "seconds": sec,
                            "bytes_per_s": rate(size, sec),
                        }
                    )
                    del copy

    with steps.step("H2D while the CPU runs a GEMV"):
        concurrent = _concurrent(
            backend, cpu, sizes, pool_bytes, min(sizes.concurrent_bytes, limit), clock, timer
        )
        # the stand-ins copy synchronously: a small big copy there, the answer is "unknown"
        probe, probe_error = None, None
        try:
            probe = copy_engine_probe(
                backend, big_bytes=min(PROBE_BIG_BYTES if backend.is_cuda else 4 * MiB, limit)
            )
        except Exception as exc:  # an extra: its failure must not cost the rest of the profile
            probe_error = f"{type(exc).__name__}: {exc}"[:500]
    return {
        "name": props.get("name", "unknown"),
        "total_memory_bytes": int(props.get("total_memory_bytes", total)),
        "free_memory_bytes": int(free),
        "compute_capability": props.get("compute_capability", "unknown"),
        "multiprocessor_count": props.get("multiprocessor_count"),
        "gemm": gemm,
        "gemv": gemv,
        "transfers": transfers,
        "concurrent": concurrent,
        "copy_engine_probe": probe,
        **({"copy_engine_probe_error": probe_error} if probe_error else {}),
    }


def _copy_fn(backend: devices.Backend, direction: str, memory: str, size: int) -> Callable[[], Any]:
    """One H2D or D2H copy of `size` random bytes between a pinned/pageable host buffer and
    the device; asynchronous (non_blocking) from pinned memory."""
    host = random_tensor(size // 4, torch.float32).view(torch.uint8)
    if memory == "pinned":
        host = backend.empty_pinned((host.numel(),), torch.uint8).copy_(host)
    device = torch.empty(host.numel(), dtype=torch.uint8, device=backend.device)
    device.copy_(host)
    non_blocking = memory == "pinned"
    if direction == "h2d":
        return lambda: device.copy_(host, non_blocking=non_blocking)
    return lambda: host.copy_(device, non_blocking=non_blocking)


def _concurrent(
    backend: devices.Backend,
    cpu: dict[str, Any],
    sizes: Sizes,
    pool_bytes: int,
    size: int,
    clock: Callable[[], Any],
    timer: Callable[[], float] | None,
) -> dict[str, Any]:
    """Pinned H2D of `size` bytes alone and while the CPU runs its best GEMV on a thread."""
    dtype = cpu["best_gemv_dtype"]
    shape = max(sizes.gemv_shapes, key=lambda s: s[0] * s[1])
    pool = weight_pool(devices.torch_dtype(dtype), [shape], pool_bytes)
    cpu_fn, weight_bytes, _ = gemv_fn(shape, pool, pool_bytes)
    copy = _copy_fn(backend, "h2d", "pinned", size)
    window = max(sizes.min_sample_s, 0.05)  # long enough for many GEMV calls
    alone = measure(copy, clock(), repeat=sizes.repeat, warmup=sizes.warmup, min_sample_s=window)
    cpu_alone = measure(
        cpu_fn, HostClock(timer), repeat=sizes.repeat, warmup=sizes.warmup, min_sample_s=sizes.min_sample_s
    )
    together, cpu_s = concurrent_rates(copy, clock(), cpu_fn, cpu["threads"], timer, sizes.repeat, window)
    return {
        "dtype": dtype,
        "size_bytes": size,
        "threads": cpu["threads"],
        "out_features": shape[0],
        "in_features": shape[1],
        "h2d_alone_bytes_per_s": rate(size, alone),
        "h2d_bytes_per_s": rate(size, together),
        "cpu_gemv_alone_weight_bytes_per_s": rate(weight_bytes, cpu_alone),
        "cpu_gemv_weight_bytes_per_s": weight_bytes / cpu_s if cpu_s > 0 else 0.0,
        "h2d_alone_seconds": alone,
        "h2d_seconds": together,
    }


def concurrent_rates(
    copy: Callable[[], Any],
    copy_clock: Any,
    cpu_fn: Callable[[], Any],
    threads: int,
    timer: Callable[[], float] | None,
    repeat: int,
    min_sample_s: float,
) -> tuple[dict[str, Any], float]:
    """Time `copy` while a thread runs `cpu_fn` in a loop: (copy seconds stats, CPU s/call).

    The CPU rate counts only calls completed while the copies ran (plus the last one).
    """
    timer = timer or time.perf_counter
    stop, started = threading.Event(), threading.Event()
    result: dict[str, Any] = {}

    def worker() -> None:
        try:
            torch.set_num_threads(threads)  # per-thread under some OpenMP builds
            with torch.inference_mode():
                cpu_fn()
                started.set()
                calls, t0 = 0, timer()
                while True:
                    cpu_fn()
                    calls += 1
                    if stop.is_set():
                        break
                result["s"] = (timer() - t0) / calls
        except BaseException as exc:  # re-raised in the caller
            result["error"] = exc
            started.set()

    thread = threading.Thread(target=worker, name="hetegen-profile-gemv", daemon=True)
    thread.start()
    try:
        started.wait()
        sec = measure(copy, copy_clock, repeat=repeat, warmup=1, min_sample_s=min_sample_s)
    finally:
        stop.set()
        thread.join()
    if "error" in result:
        raise result["error"]
    return sec, result["s"]


PROBE_SMALL_BYTES = 16 * 1024  # a join's result copy
PROBE_BIG_BYTES = 256 * MiB  # a prefetch of weight shares
#: the small copy queued behind the big one when it ends at least this far into what was left
#: of the big copy when it was issued
QUEUED_FRACTION = 0.5


def copy_engine_probe(
    backend: devices.Backend,
    small_bytes: int = PROBE_SMALL_BYTES,
    big_bytes: int = PROBE_BIG_BYTES,
    repeat: int = 3,
) -> dict[str, Any]:
    """Whether a small host-to-device copy waits behind a big one on another stream.

    Times (device timing events, fastest of `repeat`) a `small_bytes` pinned H2D copy alone,
    the `big_bytes` pinned H2D copy alone, and the small copy issued on a second stream just
    after the big one. With one copy engine for that direction (NVIDIA's default for most
    GPUs), the small copy ends only after the big one: its latency is close to the big copy's
    remaining time; with two, it ends at about its own time. `h2d_copy_engines` is 1 or 2,
    or None when the big copy had finished before the small one was issued (the stand-ins,
    whose copies are synchronous): then nothing can be told.
    """
    small_host = backend.empty_pinned((small_bytes,), torch.uint8).fill_(1)
    big_host = backend.empty_pinned((big_bytes,), torch.uint8).fill_(2)
    small_dev = torch.empty(small_bytes, dtype=torch.uint8, device=backend.device)
    big_dev = torch.empty(big_bytes, dtype=torch.uint8, device=backend.device)
    big_stream, small_stream = backend.new_stream(), backend.new_stream()

    def small_alone() -> float:
        start = backend.timing_event(small_stream)
        backend.to_device_async(small_dev, small_host, small_stream)
        return backend.elapsed_s(start, backend.timing_event(small_stream))

    def big_alone() -> float:
        start = backend.timing_event(big_stream)
        backend.to_device_async(big_dev, big_host, big_stream)
        return backend.elapsed_s(start, backend.timing_event(big_stream))

    def together() -> tuple[float, float, float]:
        """(small copy's latency, big copy's time, big copy's time left at the small's start)."""
        big_start = backend.timing_event(big_stream)
        backend.to_device_async(big_dev, big_host, big_stream)
        big_end = backend.timing_event(big_stream)
        small_start = backend.timing_event(small_stream)
        backend.to_device_async(small_dev, small_host, small_stream)
        small_end = backend.timing_event(small_stream)
        return (
            backend.elapsed_s(small_start, small_end),
            backend.elapsed_s(big_start, big_end),
            backend.elapsed_s(small_start, big_end),
        )

    small_alone(), big_alone()  # warm-up
    backend.synchronize()
    alone = min(small_alone() for _ in range(repeat))
    big = min(big_alone() for _ in range(repeat))
    runs = []
    for _ in range(repeat):
        backend.synchronize()
        runs.append(together())
    during, big_s, left = min(runs)  # the least-delayed small copy decides
    return {
        "small_copy_bytes": small_bytes,
        "big_copy_bytes": big_bytes,
        "small_copy_alone_s": max(alone, 0.0),
        "small_copy_during_big_s": max(during, 0.0),
        "big_copy_s": max(big, 0.0),
        "big_copy_during_s": max(big_s, 0.0),
        "big_copy_left_s": max(left, 0.0),
        "h2d_copy_engines": copy_engines(alone, during, left),
    }


def copy_engines(alone_s: float, during_s: float, big_left_s: float) -> int | None:
    """1 when the small copy (`during_s`) ended about when the big one did (it queued behind
    it: one copy engine), 2 when it ended about in its own time (`alone_s`), None when the big
    copy had (about) ended before the small one started: no overlap to learn from."""
    if big_left_s <= 2 * alone_s:
        return None
    return 1 if during_s >= QUEUED_FRACTION * big_left_s else 2
