"""The `llama.cpp` arm of `hetegen bench`: llama.cpp (llama-cpp-python, optional) on the same
GGUF file, timed by the same generation loop as every other arm.

`LlamaCppModel` answers `model(input_ids=..., cache=..., use_cache=True)` like a transformers
causal LM, so run.generate drives it: a new cache object starts a new sequence (llama.cpp's
state is reset), each call evaluates the new tokens and returns the last position's logits.
Same prompt ids, same greedy decode, same clock; llama.cpp computes with its own kernels
(8-bit activations for quantized matmuls), so its tokens may differ from hetegen's.

Threads: the arm's thread count for both batch and decode. With a CUDA build and a GPU,
`n_gpu_layers` is the planner's layer-split count for the budget (docs/bench.md); the CPU build
runs everything on the CPU. When llama.cpp was built with its AMX kernels and the CPU has AMX,
its extra buffer types (AMX and repack: one switch) are turned off: its AMX matmul crashed
(SIGSEGV in ggml_backend_amx_mul_mat) on the development machine with llama-cpp-python 0.3.36.
That also loses the repacked Q4_0 kernels, which decoded 1.8x faster there: build llama.cpp
without AMX on such CPUs (docs/bench.md) and the extra buffer types stay on.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hetegen_cli.core.dtypes import ComputeFormats
from hetegen_cli.models.loading.loader import LoadedModel

LLAMA_MISSING = (
    "llama-cpp-python is not installed (pip install 'hetegen[llama]'; it builds llama.cpp, ~15 min)"
)


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def cpu_has_amx() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def build_has_amx(system_info: str) -> bool:
    """True when llama.cpp's system info (`llama_print_system_info`) lists its AMX kernels."""
    return "AMX_INT8 = 1" in system_info


class _Output:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


class LlamaCppModel(nn.Module):
    """llama.cpp behind the interface run.generate drives (see the module docstring)."""

    def __init__(self, llm: Any, config: Any) -> None:
        super().__init__()
        self.llm = llm
        self.config = config
        self._cache: Any = None

    def forward(
        self, input_ids: torch.Tensor, cache: Any = None, use_cache: bool = True, **_: Any
    ) -> _Output:
        if cache is not self._cache:  # a new generation: start from an empty context
            self.llm.reset()
            self._cache = cache  # held, so a later cache can never be mistaken for it
        self.llm.eval([int(t) for t in input_ids[0].tolist()])
        return _Output(last_logits(self.llm).view(1, 1, -1))


def last_logits(llm: Any) -> torch.Tensor:
    """float32 [V]: llama.cpp's logits of the last evaluated token, copied out of its context.

    Read from the context, not from `Llama.scores`: llama-cpp-python 0.3.36 fills `scores`
    only with `logits_all=True` (it stayed all zeros here, and every greedy token was 0).
    """
    import llama_cpp
    import numpy as np

    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy())


def llama_cpp_build() -> tuple[str, bool]:
    """(llama.cpp's system info, whether its extra buffer types stay on: off when both the
    build and the CPU have AMX, see the module docstring)."""
    import llama_cpp

    system_info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    return system_info, not (cpu_has_amx() and build_has_amx(system_info))


def load_llama_cpp(gguf: Path, config: Any, threads: int, n_ctx: int, gpu_layers: int = 0) -> LoadedModel:
    """llama.cpp on `gguf` as a LoadedModel (device "cpu": ids stay on the host)."""
    import llama_cpp
    import llama_cpp.llama as llama_module

    _, extra_bufts = llama_cpp_build()
    defaults = llama_module.llama_cpp.llama_model_default_params

    def params() -> Any:
        p = defaults()
        p.use_extra_bufts = extra_bufts
        return p

    start = time.perf_counter()
    llama_module.llama_cpp.llama_model_default_params = params
    try:
        llm = llama_cpp.Llama(
            model_path=str(gguf),
            n_threads=threads,
            n_threads_batch=threads,
            n_ctx=n_ctx,
            n_batch=min(n_ctx, 2048),
            n_gpu_layers=gpu_layers,
            logits_all=False,
            verbose=False,
        )
    finally:
        llama_module.llama_cpp.llama_model_default_params = defaults
    return LoadedModel(
        model=LlamaCppModel(llm, config),
        device="cpu",
        formats=ComputeFormats("gguf"),  # llama.cpp's own formats, as the file stores them
        load_s=time.perf_counter() - start,
        engine="llama.cpp",
        folder=str(gguf),
        on_close=llm.close if hasattr(llm, "close") else None,
    )
