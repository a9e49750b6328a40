"""Load a tokenizer and a stock transformers model from a local safetensors folder.

Safety: safetensors only (`use_safetensors=True`), never pickles, never remote code, never the
network (`local_files_only=True`). Failures become ModelError with a hint. The tokenizer is
loaded separately so engines that place weights themselves can reuse `load_tokenizer`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hetegen_cli.errors import ModelError

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclass
class LoadedModel:
    """A model ready for `generate`: eval mode, on `device`, weights in `dtype`."""

    model: Any            # transformers PreTrainedModel (…ForCausalLM)
    folder: Path
    dtype: str            # float32 | bfloat16 | float16
    device: str           # "cpu" or "cuda:0"
    load_s: float         # wall seconds to read the weights and place them on `device`


def folder_of(ref_or_folder: Any) -> Path:
    """The local folder of a ModelRef (or a path); ModelError for shapes-only presets."""
    path = getattr(ref_or_folder, "path", ref_or_folder)
    if path is None:
        name = getattr(ref_or_folder, "name", "model")
        raise ModelError(f"model {name!r} has no local weights (it is a shapes-only preset)",
                         "download it, or pass a local folder with --model PATH")
    return Path(path)


def resolve_dtype(requested: str, stored: str, device_type: str) -> str:
    """The dtype to run in. 'auto': float32 on the CPU; on a GPU the stored half dtype, else float16."""
    if requested not in DTYPE_CHOICES:
        raise ModelError(f"unknown dtype {requested!r}", "use one of: " + ", ".join(DTYPE_CHOICES))
    if requested != "auto":
        return requested
    if device_type == "cpu":
        return "float32"
    return stored if stored in ("float16", "bfloat16") else "float16"


def torch_dtype(name: str) -> Any:
    """'float16' | 'bfloat16' | 'float32' -> torch dtype (the engine's mapping)."""
    from hetegen_cli.weight_store import torch_dtype as engine_torch_dtype

    return engine_torch_dtype(name)


def load_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer (fast, local files only). ModelError when missing or unreadable."""
    folder = folder_of(folder)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelError(f"model folder {folder} has no tokenizer files",
                         "it needs tokenizer.json (or tokenizer_config.json with vocab files); "
                         "save the tokenizer with save_pretrained into the same folder")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                             trust_remote_code=False)
    except MemoryError:
        raise
    except Exception as exc:
        raise ModelError(f"cannot load the tokenizer of {folder}: {_short(exc)}",
                         "check tokenizer.json / tokenizer_config.json, or re-save the tokenizer "
                         "with save_pretrained") from exc


def load_model(ref_or_folder: Any, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """Load the stock transformers causal LM from a local folder onto `device` in `dtype`.

    `dtype` is float32, bfloat16 or float16 (resolve 'auto' with `resolve_dtype` first).
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # hetegen reports the load time itself
    folder = folder_of(ref_or_folder)
    if dtype == "auto":
        raise ValueError("resolve dtype 'auto' with resolve_dtype() before load_model()")
    start = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch_dtype(dtype), use_safetensors=True,
            trust_remote_code=False, local_files_only=True)
    except MemoryError:
        raise
    except Exception as exc:  # safetensors, OSError, ValueError, KeyError ...
        raise ModelError(f"cannot load the weights of {folder}: {_short(exc)}",
                         "the folder may be incomplete or corrupt; re-download or re-convert it "
                         "(hetegen loads *.safetensors only)") from exc
    model.eval()
    if str(device) != "cpu":
        from hetegen_cli.devices import get_backend, out_of_memory_as_error

        with out_of_memory_as_error("loading the model onto the GPU"):
            model.to(device)
            get_backend("cuda").synchronize()
    return LoadedModel(model=model, folder=folder, dtype=dtype, device=str(device),
                       load_s=time.perf_counter() - start)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{exc.__class__.__name__}: {text[:200]}" if text else exc.__class__.__name__
