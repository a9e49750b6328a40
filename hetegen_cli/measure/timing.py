"""The measuring toolbox of `hetegen profile`: what to measure (Sizes), clocks, the
measurement loop and random operands.

How every timing is taken (`measure`): `warmup` calls whose times are discarded (the last
one is timed to choose how many calls one sample spans, at least `min_sample_s` long), then
`repeat` samples; seconds per call = sample / calls. Devices are synchronised before each
clock read (CUDA events on the GPU). Data are random, never all-zero. GEMV weights rotate over
a pool of copies larger than the last-level cache, so the rates are DRAM rates, not cache rates.
Shapes: a linear's weight is [out_features, in_features]; GEMV input [1, in], GEMM [tokens, in].
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from hetegen_cli.core import quant
from hetegen_cli.core.errors import InputError
from hetegen_cli.core.stats import summarize
from hetegen_cli.models.formats.quant import QuantLinear, QuantWeight

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

    def scaled(self, factor: float) -> Sizes:
        """Every dimension times `factor` (multiples of 16), byte sizes times factor²."""

        def dim(n: int) -> int:
            return max(16, round(n * factor / 16) * 16)

        def shapes(s: tuple[Shape, ...]) -> tuple[Shape, ...]:
            return tuple((dim(o), dim(i)) for o, i in s)

        def nbytes(n: int) -> int:
            return max(4096, int(n * factor * factor) // 4096 * 4096)

        return replace(
            self,
            gemv_shapes=shapes(self.gemv_shapes),
            gemm_shapes=shapes(self.gemm_shapes),
            gpu_gemv_shapes=shapes(self.gpu_gemv_shapes),
            gpu_gemm_shapes=shapes(self.gpu_gemm_shapes),
            transfer_sizes=tuple(nbytes(n) for n in self.transfer_sizes),
            concurrent_bytes=nbytes(self.concurrent_bytes),
            gpu_pool_bytes=nbytes(self.gpu_pool_bytes),
            pool_bytes=nbytes(self.pool_bytes or 256 * MiB),
            min_sample_s=self.min_sample_s * factor,
        )


QUICK = Sizes(
    gemv_shapes=((512, 512), (2048, 2048), (4096, 4096), (11008, 4096)),
    gemm_shapes=((4096, 4096),),
    gemm_tokens=(128, 512),
    repeat=3,
    warmup=1,
    min_sample_s=0.02,
    thread_sweep=False,
    gpu_gemv_shapes=((4096, 4096), (11008, 4096)),
    gpu_gemm_shapes=((4096, 4096),),
    transfer_sizes=(1 * MiB, 16 * MiB, 128 * MiB),
    concurrent_bytes=64 * MiB,
    gpu_pool_bytes=512 * MiB,
)
FULL = Sizes(
    gemv_shapes=((512, 512), (2048, 2048), (4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192)),
    gemm_shapes=((4096, 4096), (11008, 4096)),
    gemm_tokens=(128, 512),
    repeat=5,
    warmup=2,
    min_sample_s=0.05,
    thread_sweep=True,
    gpu_gemv_shapes=((4096, 4096), (11008, 4096), (8192, 8192)),
    gpu_gemm_shapes=((4096, 4096), (11008, 4096)),
    transfer_sizes=tuple(n * MiB for n in (1, 4, 16, 64, 256, 1024)),
    concurrent_bytes=256 * MiB,
    gpu_pool_bytes=1024 * MiB,
)


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
            raise InputError(f"{SCALE_ENV}={scale!r} is not a number in (0, 1]", f"unset {SCALE_ENV}")
        sizes = sizes.scaled(factor)
    return replace(sizes, repeat=repeat) if repeat else sizes


# --- clocks and the measurement loop -----------------------------------------------------


class HostClock:
    """`timer()` seconds read after `sync()` (default time.perf_counter, no sync)."""

    def __init__(
        self, timer: Callable[[], float] | None = None, sync: Callable[[], None] | None = None
    ) -> None:
        self.timer = timer or time.perf_counter
        self.sync = sync or (lambda: None)
        self._t0 = 0.0

    def start(self) -> None:
        self.sync()
        self._t0 = self.timer()

    def stop(self) -> float:
        self.sync()
        return self.timer() - self._t0


def measure(
    fn: Callable[[], Any], clock: Any, repeat: int, warmup: int, min_sample_s: float, max_calls: int = 10_000
) -> dict[str, Any]:
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
    out = summarize(samples)
    out["calls_per_sample"] = calls
    return out


def random_tensor(numel: int, dtype: torch.dtype, device: Any = "cpu", seed: int = 0) -> torch.Tensor:
    """`numel` uniform values in [-1, 1): a random block of up to 4 Mi values, tiled (fast)."""
    gen = torch.Generator().manual_seed(seed)
    block = (torch.rand(min(numel, 1 << 22), generator=gen) * 2 - 1).to(device=device, dtype=dtype)
    if block.numel() == numel:
        return block
    return block.repeat(math.ceil(numel / block.numel()))[:numel]


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def weight_pool(dtype: torch.dtype, shapes: Any, pool_bytes: int, device: Any = "cpu") -> torch.Tensor:
    """A random 1-D buffer large enough for `gemv_fn` at each of `shapes` (built once per
    dtype: max(pool_bytes, two copies of the largest weight))."""
    size = element_size(dtype)
    need = max(max(2 * o * i * size, pool_bytes) for o, i in shapes)
    return random_tensor(need // size, dtype, device)


def gemv_fn(shape: Shape, pool: torch.Tensor, pool_bytes: int) -> tuple[Callable[[], Any], int, int]:
    """(fn, weight_bytes, copies): fn computes x[1, in] @ W[out, in]ᵀ, rotating over
    `copies` = max(2, pool_bytes // weight_bytes) weights carved from `pool` (weight_pool)."""
    out, inp = shape
    weight_bytes = out * inp * pool.element_size()
    copies = max(2, pool_bytes // weight_bytes)
    weights = pool[: copies * out * inp].view(copies, out, inp).unbind(0)
    x = random_tensor(inp, pool.dtype, pool.device, seed=1).view(1, inp)
    turn = [0]

    def fn() -> torch.Tensor:
        turn[0] = (turn[0] + 1) % copies
        return F.linear(x, weights[turn[0]])

    return fn, weight_bytes, copies


def quant_gemv_fn(fmt: str, shape: Shape, pool_bytes: int) -> tuple[Callable[[], Any], int, int] | None:
    """(fn, weight_bytes, copies) for a quantized GEMV through QuantLinear, the kernel a
    quantized model uses (models.formats.cpu_kernels: hetegen's where available, else
    torch's packed one; int8 per row, int4 in groups of 32; float32 activations), rotating
    over copies like gemv_fn; None when the kernel cannot take `shape`."""
    out, inp = shape
    if not quant.kernel_takes(fmt, out, inp):
        return None
    group = quant.DEFAULT_GROUP_SIZE
    weight_bytes = quant.weight_bytes(fmt, out, inp)
    copies = max(2, pool_bytes // weight_bytes)
    gen = torch.Generator().manual_seed(0)
    x = random_tensor(inp, torch.float32, seed=1).view(1, inp)
    if fmt == "int8":
        q = torch.randint(-127, 128, (out, inp), dtype=torch.int8, generator=gen)
        scale = (torch.rand(out, generator=gen) * 0.01).to(torch.float16)
        weight = QuantWeight("int8", out, inp, q, scale)
    else:
        q = torch.randint(0, 256, (out, inp // 2), dtype=torch.uint8, generator=gen)
        scale = (torch.rand(out, inp // group, generator=gen) * 0.01).to(torch.float16)
        weight = QuantWeight("int4", out, inp, q, scale, -8 * scale, group)
    kernels = [QuantLinear(weight)] + [QuantLinear(_copy(weight)) for _ in range(copies - 1)]
    turn = [0]

    def fn() -> torch.Tensor:
        turn[0] = (turn[0] + 1) % copies
        return kernels[turn[0]](x)

    return fn, weight_bytes, copies


def _copy(weight: QuantWeight) -> QuantWeight:
    """`weight` in new memory (QuantLinear keeps the storage layout's tensors as they are)."""
    parts = [None if t is None else t.clone() for t in (weight.q, weight.scale, weight.min)]
    return QuantWeight(weight.format, weight.out_features, weight.in_features, *parts, weight.group_size)


def gemm_fn(shape: Shape, tokens: int, dtype: torch.dtype, device: Any = "cpu") -> Callable[[], Any]:
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
