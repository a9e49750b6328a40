"""A model's tensors by their GGUF (llama.cpp) names: `blk.3.ffn_up`, `output`, ... for the
transformers module names hetegen's specs use, from the gguf package's own name table (the one
llama.cpp's converter writes with). Needs the gguf package (a project dependency; not on every
GPU image: ModelError then)."""

from __future__ import annotations

from collections.abc import Callable

from hetegen_cli.core.errors import ModelError
from hetegen_cli.models.formats.gguf_read import GGUF_MODEL_TYPES

#: transformers model types llama.cpp converts as another architecture (convert_hf_to_gguf.py
#: registers MixtralForCausalLM as a llama model: its experts as blk.N.ffn_*_exps)
_SAME_AS = {"mixtral": "llama"}


def llama_cpp_arch(model_type: str) -> str | None:
    """llama.cpp's architecture name for a transformers `model_type`, or None when llama.cpp
    has none (e.g. OPT)."""
    try:
        from gguf import MODEL_ARCH_NAMES
    except ImportError:
        raise ModelError(
            "naming tensors as llama.cpp does needs the gguf package, which is not installed",
            "pip install gguf (it comes with hetegen's own install)",
        ) from None
    by_type = {hf: arch for arch, hf in GGUF_MODEL_TYPES.items()}
    names = set(MODEL_ARCH_NAMES.values())
    for arch in (by_type.get(model_type), _SAME_AS.get(model_type), model_type, model_type.replace("_", "")):
        if arch in names:
            return arch
    return None


def gguf_tensor_names(model_type: str, num_layers: int) -> Callable[[str], str | None]:
    """A function from a module name (`model.layers.3.mlp.up_proj`) to its GGUF tensor name
    without suffix (`blk.3.ffn_up`); None for a module llama.cpp names otherwise or not at all.
    ModelError when llama.cpp has no such architecture."""
    arch = llama_cpp_arch(model_type)
    if arch is None:
        raise ModelError(
            f"llama.cpp has no {model_type!r} architecture, so there are no llama.cpp flags for it",
            "export a plan of a model llama.cpp runs (llama, qwen, gemma, phi, mistral, ...)",
        )
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    table = get_tensor_name_map({v: k for k, v in MODEL_ARCH_NAMES.items()}[arch], num_layers)
    return table.get_name
