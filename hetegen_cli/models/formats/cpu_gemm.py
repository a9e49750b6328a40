"""The float32 GEMM behind CPU prompt products: torch's BLAS or oneDNN's, whichever is faster here.

A quantized linear multiplies a prompt (at least `cpu_kernels.DENSE_TOKENS` tokens) through its
dequantized float32 weight (models.formats.cpu_kernels). `torch.mm` calls the BLAS torch was
built with (MKL on x86); torch also carries oneDNN, whose float32 GEMM it reaches through
`torch.ops.mkldnn._linear_pointwise`. On a 2-core AMD EPYC the latter made a 1.7B model's
128-token prefill 1.22x faster and its 512-token one 0.97x (docs/quant.md, "Prompt products");
another CPU may rank them the other way. So the choice is measured, per class of product
(`CLASSES`: weights below or above SMALL_WEIGHTS values, prompts below or from LONG_TOKENS
tokens): once per (CPU, torch version, thread count, class), by 12 calls of the class's product
the first time a product of that class runs, and kept in $HETEGEN_HOME/cpu-gemm.json.
`HETEGEN_CPU_GEMM=torch` or `=onednn` skips the measurement.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from hetegen_cli.core import paths
from hetegen_cli.core.console import note
from hetegen_cli.core.errors import HetegenError, InputError
from hetegen_cli.core.jsonio import atomic_write

ENV = "HETEGEN_CPU_GEMM"  # "auto" (default), "torch" or "onednn"
BACKENDS = ("torch", "onednn")
SMALL_WEIGHTS = 1 << 20  # values of W: below, a "small" class, else a "large" one
LONG_TOKENS = 256  # tokens of x: below, a "short" class, else a "long" one
#: the product measured for each class, (tokens, in, out): the weight of a 0.1B model's MLP or
#: of a 1-2B model's attention, times 128 or 512 tokens
CLASSES = {
    "small/short": (128, 576, 1536),
    "large/short": (128, 1024, 4096),
    "small/long": (512, 576, 1536),
    "large/long": (512, 1024, 4096),
}
ROUNDS = 5  # interleaved timed calls of each, after one untimed call each
MARGIN = 1.05  # oneDNN is taken only when its median call is at least this much faster


@dataclass(frozen=True)
class Choice:
    """The GEMM prompt products use, and why: `torch_us`/`onednn_us` are the median
    microseconds of the measured call (None when it was not measured)."""

    backend: str
    reason: str  # "measured", "HETEGEN_CPU_GEMM", or why oneDNN cannot run
    torch_us: float | None = None
    onednn_us: float | None = None


_CHOSEN: dict[tuple[int, str], Choice] = {}  # by (thread count, class)
_LOCK = threading.Lock()


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [n, in] float32 @ w [out, in] float32 ^T -> [n, out] float32, through the GEMM chosen
    for the product's class."""
    if choice(class_of(x.shape[0], w.numel())).backend == "onednn":
        return _onednn(x, w)
    return torch.mm(x, w.t())


def class_of(tokens: int, weights: int) -> str:
    """The class (a key of CLASSES) of a product of `tokens` rows of x by a W of `weights` values."""
    return ("small" if weights < SMALL_WEIGHTS else "large") + ("/short" if tokens < LONG_TOKENS else "/long")


def choice(cls: str) -> Choice:
    """The GEMM for products of class `cls` (a key of CLASSES) at this process's current thread
    count (measured, or read from the cache, on first call)."""
    key = (torch.get_num_threads(), cls)
    got = _CHOSEN.get(key)
    if got is None:
        with _LOCK:
            got = _CHOSEN.get(key) or _choose(*key)
            _CHOSEN[key] = got
    return got


def force(backend: str) -> None:
    """Every class uses `backend` at this thread count from now on, measured or not (for scripts
    that compare the two GEMMs in one process)."""
    for cls in CLASSES:
        _CHOSEN[torch.get_num_threads(), cls] = Choice(backend, "forced")


def label() -> str:
    """Which GEMM prompt products use (measuring every class not chosen yet): "torch", "onednn",
    or each class's, e.g. "small/short: torch, large/short: onednn, ..."."""
    got = {cls: choice(cls).backend for cls in CLASSES}
    if len(set(got.values())) == 1:
        return next(iter(got.values()))
    return ", ".join(f"{cls}: {backend}" for cls, backend in got.items())


def _onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def _choose(threads: int, cls: str) -> Choice:
    forced = os.environ.get(ENV, "auto")
    if forced not in ("auto", *BACKENDS):
        raise InputError(f"{ENV}={forced!r} is not one of auto, torch, onednn", f"unset {ENV}, or use torch")
    why_not = _onednn_missing()
    if forced == "onednn" and why_not:
        raise InputError(f"{ENV}=onednn, but {why_not}", f"unset {ENV}, or use torch")
    if forced != "auto":
        return Choice(forced, ENV)
    if why_not:
        return Choice("torch", why_not)
    key = _machine_key(threads, cls)
    cached = _read_cache().get(key)
    if isinstance(cached, dict) and cached.get("backend") in BACKENDS:
        return Choice(cached["backend"], "measured", cached.get("torch_us"), cached.get("onednn_us"))
    got = _measure(CLASSES[cls])
    _write_cache(key, got)
    return got


def _onednn_missing() -> str | None:
    """Why oneDNN's GEMM cannot run in this torch, or None when it can."""
    if not torch.backends.mkldnn.is_available():
        return "this torch is built without oneDNN"
    try:
        x, w = torch.ones(2, 8), torch.ones(3, 8)
        ok = torch.equal(_onednn(x, w), torch.full((2, 3), 8.0))
    except (RuntimeError, AttributeError) as exc:
        return f"oneDNN's linear is not usable here ({str(exc).splitlines()[0][:80]})"
    return None if ok else "oneDNN's linear gave a wrong product"


def _measure(shape: tuple[int, int, int]) -> Choice:
    """Time both GEMMs on `shape` (tokens, in, out), interleaved; oneDNN must also agree with
    torch's product."""
    n, k, m = shape
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(n, k, generator=gen), torch.randn(m, k, generator=gen)
    want = torch.mm(x, w.t())
    if not torch.allclose(_onednn(x, w), want, rtol=1e-4, atol=1e-3):
        return Choice("torch", "oneDNN's product differed from torch's")
    calls: dict[str, Callable[[], torch.Tensor]] = {
        "torch": lambda: torch.mm(x, w.t()),
        "onednn": lambda: _onednn(x, w),
    }
    spent: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(ROUNDS):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            spent[name].append((time.perf_counter() - start) * 1e6)
    t_us, o_us = (statistics.median(spent[name]) for name in BACKENDS)
    return Choice("onednn" if t_us >= MARGIN * o_us else "torch", "measured", round(t_us, 1), round(o_us, 1))


def _machine_key(threads: int, cls: str) -> str:
    return f"{_cpu_name()}|torch {torch.__version__}|{threads} threads|{cls}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_path() -> Path:
    return paths.home() / "cpu-gemm.json"


def _read_cache() -> dict:
    try:
        got = json.loads(_cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return got if isinstance(got, dict) else {}


def _write_cache(key: str, got: Choice) -> None:
    """Keep a measured choice; a cache that cannot be written only costs the next process
    the measurement."""
    if got.reason != "measured":
        return
    doc = _read_cache()
    doc[key] = {"backend": got.backend, "torch_us": got.torch_us, "onednn_us": got.onednn_us}
    try:
        atomic_write(_cache_path(), json.dumps(doc, indent=1, sort_keys=True) + "\n")
    except HetegenError as exc:
        note(f"cannot keep the CPU GEMM choice: {exc}")
