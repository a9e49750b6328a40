"""`hetegen profile`: measure the host, its CPU kernels and, when present, the GPU and PCIe.

How every timing is taken (`measure`): `warmup` calls whose times are discarded (the last
one is timed to choose how many calls one sample spans, at least `min_sample_s` long), then
`repeat` samples; seconds per call = sample / calls. Devices are synchronised before each clock read (CUDA events on
the GPU). Data are random, never all-zero. GEMV weights rotate over a pool of copies larger
than the last-level cache, so the rates are DRAM rates, not cache rates.
Shapes: a linear's weight is [out_features, in_features]; GEMV input [1, in], GEMM [tokens, in].
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from hetegen_cli import devices
from hetegen_cli.errors import InputError
from hetegen_cli.profile_doc import (CPU_FEATURES, GPU_SKIPPED_NOTE, build_profile, rate,
                                     stats)

MiB = 1024**2
CPU_DTYPES = ("float32", "bfloat16", "float16")
GPU_DTYPES = ("float16", "bfloat16")
SCALE_ENV = "HETEGEN_PROFILE_SCALE"  # internal: shrink all sizes (tests)
Shape = tuple[int, int]


@dataclass(frozen=True)
class Sizes:
    """What to measure. Byte sizes in bytes; shapes are (out_features, in_features)."""

    gemv_shapes: tuple[Shape, ...]
    gemm_shapes: tuple[Shape, ...]
    gemm_tokens: tuple[int, ...]
    repeat: int
    warmup: int
    min_sample_s: float
    thread_sweep: bool
    gpu_gemv_shapes: tuple[Shape, ...]
    gpu_gemm_shapes: tuple[Shape, ...]
    transfer_sizes: tuple[int, ...]
    concurrent_bytes: int
    gpu_pool_bytes: int
    pool_bytes: int | None = None  # host pool; None: max(256 MiB, 2 x L3), capped by RAM / 4

    def scaled(self, factor: float) -> "Sizes":
        """Every dimension times `factor` (multiples of 16), byte sizes times factor²."""
        def dim(n: int) -> int:
            return max(16, int(round(n * factor / 16)) * 16)

        def shapes(s: tuple[Shape, ...]) -> tuple[Shape, ...]:
            return tuple((dim(o), dim(i)) for o, i in s)

        def nbytes(n: int) -> int:
            return max(4096, int(n * factor * factor) // 4096 * 4096)

        return replace(self, gemv_shapes=shapes(self.gemv_shapes),
                       gemm_shapes=shapes(self.gemm_shapes),
                       gpu_gemv_shapes=shapes(self.gpu_gemv_shapes),
                       gpu_gemm_shapes=shapes(self.gpu_gemm_shapes),
                       transfer_sizes=tuple(nbytes(n) for n in self.transfer_sizes),
                       concurrent_bytes=nbytes(self.concurrent_bytes),
                       gpu_pool_bytes=nbytes(self.gpu_pool_bytes),
                       pool_bytes=nbytes(self.pool_bytes or 256 * MiB),
                       min_sample_s=self.min_sample_s * factor)


QUICK = Sizes(gemv_shapes=((2048, 2048), (4096, 4096), (11008, 4096)),
              gemm_shapes=((4096, 4096),), gemm_tokens=(128, 512),
              repeat=3, warmup=1, min_sample_s=0.02, thread_sweep=False,
              gpu_gemv_shapes=((4096, 4096), (11008, 4096)), gpu_gemm_shapes=((4096, 4096),),
              transfer_sizes=(1 * MiB, 16 * MiB, 128 * MiB), concurrent_bytes=64 * MiB,
              gpu_pool_bytes=512 * MiB)
FULL = Sizes(gemv_shapes=((2048, 2048), (4096, 4096), (11008, 4096), (4096, 11008),
                          (8192, 8192)),
             gemm_shapes=((4096, 4096), (11008, 4096)), gemm_tokens=(128, 512),
             repeat=5, warmup=2, min_sample_s=0.05, thread_sweep=True,
             gpu_gemv_shapes=((4096, 4096), (11008, 4096), (8192, 8192)),
             gpu_gemm_shapes=((4096, 4096), (11008, 4096)),
             transfer_sizes=tuple(n * MiB for n in (1, 4, 16, 64, 256, 1024)),
             concurrent_bytes=256 * MiB, gpu_pool_bytes=1024 * MiB)


def sizes_for(quick: bool, repeat: int | None = None) -> Sizes:
    """QUICK or FULL, shrunk by $HETEGEN_PROFILE_SCALE (0 < s <= 1) if set."""
    sizes = QUICK if quick else FULL
    scale = os.environ.get(SCALE_ENV)
    if scale:
        try:
            factor = float(scale)
        except ValueError:
            factor = 0.0
        if not 0 < factor <= 1:
            raise InputError(f"{SCALE_ENV}={scale!r} is not a number in (0, 1]",
                             f"unset {SCALE_ENV}")
        sizes = sizes.scaled(factor)
    return replace(sizes, repeat=repeat) if repeat else sizes


# --- clocks and the measurement loop -----------------------------------------------------

class HostClock:
    """`timer()` seconds read after `sync()` (default time.perf_counter, no sync)."""

    def __init__(self, timer: Callable[[], float] | None = None,
                 sync: Callable[[], None] | None = None) -> None:
        self.timer = timer or time.perf_counter
        self.sync = sync or (lambda: None)
        self._t0 = 0.0

    def start(self) -> None:
        self.sync()
        self._t0 = self.timer()

    def stop(self) -> float:
        self.sync()
        return self.timer() - self._t0


def measure(fn: Callable[[], Any], clock: Any, repeat: int, warmup: int,
            min_sample_s: float, max_calls: int = 10_000) -> dict[str, Any]:
    """Stats of seconds per call of `fn` (see the module docstring)."""
    for _ in range(max(0, warmup - 1)):
        fn()
    clock.start()
    fn()
    once = clock.stop()
    calls = 1 if once >= min_sample_s else min(max_calls, math.ceil(min_sample_s / max(once, 1e-9)))
    samples = []
    for _ in range(repeat):
        clock.start()
        for _ in range(calls):
            fn()
        samples.append(clock.stop() / calls)
    out = stats(samples)
    out["calls_per_sample"] = calls
    return out


def random_tensor(numel: int, dtype: torch.dtype, device: Any = "cpu", seed: int = 0
                  ) -> torch.Tensor:
    """`numel` uniform values in [-1, 1): a random block of up to 4 Mi values, tiled (fast)."""
    gen = torch.Generator().manual_seed(seed)
    block = (torch.rand(min(numel, 1 << 22), generator=gen) * 2 - 1).to(device=device,
                                                                         dtype=dtype)
    if block.numel() == numel:
        return block
    return block.repeat(math.ceil(numel / block.numel()))[:numel]


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def weight_pool(dtype: torch.dtype, shapes: Any, pool_bytes: int, device: Any = "cpu"
                ) -> torch.Tensor:
    """A random 1-D buffer large enough for `gemv_fn` at each of `shapes` (built once per
    dtype: max(pool_bytes, two copies of the largest weight))."""
    size = element_size(dtype)
    need = max(max(2 * o * i * size, pool_bytes) for o, i in shapes)
    return random_tensor(need // size, dtype, device)


def gemv_fn(shape: Shape, pool: torch.Tensor, pool_bytes: int
            ) -> tuple[Callable[[], Any], int, int]:
    """(fn, weight_bytes, copies): fn computes x[1, in] @ W[out, in]ᵀ, rotating over
    `copies` = max(2, pool_bytes // weight_bytes) weights carved from `pool` (weight_pool)."""
    out, inp = shape
    weight_bytes = out * inp * pool.element_size()
    copies = max(2, pool_bytes // weight_bytes)
    weights = pool[:copies * out * inp].view(copies, out, inp).unbind(0)
    x = random_tensor(inp, pool.dtype, pool.device, seed=1).view(1, inp)
    turn = [0]

    def fn() -> torch.Tensor:
        turn[0] = (turn[0] + 1) % copies
        return F.linear(x, weights[turn[0]])

    return fn, weight_bytes, copies


def gemm_fn(shape: Shape, tokens: int, dtype: torch.dtype, device: Any = "cpu"
            ) -> Callable[[], Any]:
    """fn computing x[tokens, in] @ W[out, in]ᵀ on random data."""
    out, inp = shape
    w = random_tensor(out * inp, dtype, device).view(out, inp)
    x = random_tensor(tokens * inp, dtype, device, seed=1).view(tokens, inp)
    return lambda: F.linear(x, w)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Set torch's intra-op thread count for the block, then restore it."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class Steps:
    """Advances one progress task (Rich Progress or output's no-op stand-in)."""

    def __init__(self, progress: Any, total: int) -> None:
        self.progress = progress
        self.task = progress.add_task("profiling", total=total) if progress else None

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        if self.progress:
            self.progress.update(self.task, description=description)
        yield
        if self.progress:
            self.progress.advance(self.task)


# --- host ----------------------------------------------------------------------------------

def _cpuinfo() -> tuple[str, set[str]]:
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


def host_info() -> dict[str, Any]:
    """CPU model, cores, RAM, matrix-kernel CPU flags and software versions."""
    import psutil

    model, flags = _cpuinfo()
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

def _dt(name: str) -> torch.dtype:
    return getattr(torch, name)


def measure_cpu(sizes: Sizes, threads: int, sweep_counts: list[int], pool_bytes: int,
                clock: HostClock, steps: Steps) -> dict[str, Any]:
    """The document's "cpu" section (run under `threads` intra-op threads; the GEMV at the
    largest shape is repeated for each thread count in `sweep_counts`)."""
    m = dict(repeat=sizes.repeat, warmup=sizes.warmup, min_sample_s=sizes.min_sample_s)
    largest = max(sizes.gemv_shapes, key=lambda s: s[0] * s[1])
    gemv, sweep, memory = [], [], {}
    for dtype in CPU_DTYPES:
        pool = weight_pool(_dt(dtype), sizes.gemv_shapes, pool_bytes)
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
                sweep.append({k: g[k] for k in ("threads", "dtype", "out_features",
                                                "in_features", "weight_bytes_per_s")})
        del pool
    sweep.sort(key=lambda e: e["threads"])  # stable: dtype order within a thread count
    at_largest = [g for g in gemv if (g["out_features"], g["in_features"]) == largest]
    best = max(at_largest, key=lambda g: g["params_per_s"])["dtype"]

    gemm = []
    for dtype in CPU_DTYPES:
        for shape in sizes.gemm_shapes:
            for tokens in sizes.gemm_tokens:
                with steps.step(f"CPU GEMM {dtype} {tokens} tokens"):
                    sec = measure(gemm_fn(shape, tokens, _dt(dtype)), clock, **m)
                    gemm.append({"dtype": dtype, "tokens": tokens, "out_features": shape[0],
                                 "in_features": shape[1], "threads": threads, "seconds": sec,
                                 "flops_per_s": rate(2.0 * tokens * shape[0] * shape[1], sec)})

    return {"threads": threads, "memory_read_bytes_per_s": memory, "gemv": gemv, "gemm": gemm,
            "thread_sweep": sweep, "best_gemv_dtype": best, "pool_bytes": pool_bytes}


def _memory_read(pool: torch.Tensor, clock: HostClock, m: dict) -> dict[str, Any]:
    """Read bandwidth: stream the fp32 pool once per call with a matrix-vector product
    over [rows, 4096] (one multiply-add per 4 bytes read); stats of bytes/s."""
    cols = 4096 if pool.numel() >= 4096 * 16 else 64
    buf = pool[:pool.numel() // cols * cols].view(-1, cols)
    vec = random_tensor(cols, torch.float32, seed=1)
    sec = measure(lambda: torch.mv(buf, vec), clock, **m)
    memory = stats([buf.numel() * 4 / s for s in sec["samples"]])
    memory.update(method="fp32 matrix-vector product", buffer_bytes=buf.numel() * 4)
    return memory


def _cpu_gemv(shape: Shape, pool: torch.Tensor, threads: int, pool_bytes: int,
              clock: HostClock, m: dict) -> dict[str, Any]:
    fn, weight_bytes, copies = gemv_fn(shape, pool, pool_bytes)
    sec = measure(fn, clock, **m)
    return {"dtype": str(pool.dtype).removeprefix("torch."), "out_features": shape[0],
            "in_features": shape[1], "weight_bytes": weight_bytes, "threads": threads,
            "seconds": sec, "weight_bytes_per_s": rate(weight_bytes, sec),
            "params_per_s": rate(shape[0] * shape[1], sec), "pool_copies": copies}


def default_threads(physical_cores: int, has_gpu: bool) -> int:
    """Intra-op threads for the CPU share: all physical cores, less one on a GPU machine with
    4+ cores, which leaves room for the main thread launching CUDA work (method.md section 10).
    Hyperthreads add no memory bandwidth, so logical cores are not counted."""
    if has_gpu and physical_cores >= 4:
        return physical_cores - 1
    return max(1, physical_cores)


def sweep_threads(threads: int, physical_cores: int) -> list[int]:
    """1, half and all physical cores, plus `threads` (deduplicated, ascending)."""
    return sorted({1, max(1, physical_cores // 2), physical_cores, threads})


# --- the whole profile -------------------------------------------------------------------

def run_profile(quick: bool, threads: int | None = None, repeat: int | None = None,
                progress: Any = None, timer: Callable[[], float] | None = None,
                sizes: Sizes | None = None, gpu_backend: Any = None) -> dict[str, Any]:
    """Measure this machine and return the profile document (see profile_doc.SCHEMA).

    `threads`: CPU intra-op threads (default: default_threads()). `repeat`: samples per
    measurement. `progress`: a Rich Progress-like object. `timer`: seconds clock for every
    measurement (default time.perf_counter; injecting one also replaces CUDA events).
    `sizes`: what to measure (default QUICK or FULL, see sizes_for). `gpu_backend`: measure
    the GPU part on this devices.Backend (tests: the CPU stand-in); default CUDA if present.
    """
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be at least 1, got {threads}", "e.g. --threads 4")
    if repeat is not None and repeat < 1:
        raise InputError(f"--repeat must be at least 1, got {repeat}", "e.g. --repeat 5")
    if sizes is None:
        sizes = sizes_for(quick, repeat)
    elif repeat:
        sizes = replace(sizes, repeat=repeat)
    host = host_info()
    has_gpu = gpu_backend is not None or devices.cuda_available()
    threads = threads or default_threads(host["physical_cores"], has_gpu)
    pool = sizes.pool_bytes or max(256 * MiB, 2 * (host["last_level_cache_bytes"] or 0))
    pool = max(4096, min(pool, host["ram_available_bytes"] // 4))
    sweep = sweep_threads(threads, host["physical_cores"]) if sizes.thread_sweep else []
    steps = Steps(progress, count_steps(sizes, len(sweep), has_gpu))
    clock = HostClock(timer)
    with torch_threads(threads), torch.inference_mode():
        cpu = measure_cpu(sizes, threads, sweep, pool, clock, steps)
        gpu, note = None, GPU_SKIPPED_NOTE
        if has_gpu:
            from hetegen_cli.hardware_gpu import measure_gpu

            with devices.out_of_memory_as_error("profiling the GPU"):
                gpu = measure_gpu(sizes, cpu, host, pool, timer, steps, gpu_backend)
            note = None
    return build_profile(host, cpu, gpu, note, quick)


def count_steps(sizes: Sizes, sweep_counts: int, has_gpu: bool) -> int:
    """Number of progress steps of one profile run."""
    n = 1 + len(CPU_DTYPES) * (len(sizes.gemv_shapes)
                               + len(sizes.gemm_shapes) * len(sizes.gemm_tokens))
    n += len(CPU_DTYPES) * sweep_counts
    if has_gpu:
        n += len(GPU_DTYPES) * (len(sizes.gpu_gemv_shapes)
                                + len(sizes.gpu_gemm_shapes) * len(sizes.gemm_tokens))
        n += 4 * len(sizes.transfer_sizes) + 1
    return n
