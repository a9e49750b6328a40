"""Load a tokenizer and a stock transformers model from a local safetensors folder, and
`LoadedModel`, the one holder of a model ready to generate (plain or engine-run).

Safety: safetensors only (`use_safetensors=True`), never pickles, never remote code, never the
network (`local_files_only=True`). Failures become ModelError with a hint. The tokenizer is
loaded separately so the engine, which places weights itself, can reuse `load_tokenizer`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hetegen_cli.core.console import activity
from hetegen_cli.core.devices import get_backend, out_of_memory_as_error, torch_dtype
from hetegen_cli.core.dtypes import DTYPE_CHOICES, ComputeFormats
from hetegen_cli.core.errors import ModelError
from hetegen_cli.models.architecture.build import quiet_transformers

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _no_sync() -> None:
    pass


@dataclass
class LoadedModel:
    """A model ready for `run.generate`, plain or through the heterogeneous engine.

    `model` answers `model(input_ids, cache=..., use_cache=True)` like a stock transformers
    causal LM; input ids go to `device`; `sync` waits for the device before a clock read.
    `close()` releases what the engine holds (worker thread, pinned memory); idempotent.
    """

    model: Any  # transformers PreTrainedModel (…ForCausalLM)
    device: str  # "cpu" or "cuda:0"
    formats: ComputeFormats  # what it computes in: weights dtype, CPU formats per phase, quant
    load_s: float  # wall seconds to read the weights and place them
    engine: str = "plain"  # "plain" or "hetegen"
    sync: Callable[[], None] = _no_sync
    folder: str | None = None  # where the weights were read from
    memory: dict[str, int] = field(default_factory=dict)  # bytes by home (engine)
    counters: Any = None  # engine counters with as_dict() and reset(), or None
    fused: dict[str, int] | None = None  # models.formats.fused: modules given one-call forwards
    on_close: Callable[[], None] | None = None

    @property
    def dtype(self) -> str:
        """The formats as people read them: "float32", "float16+float32" (GPU + CPU share)."""
        return self.formats.label

    def stats(self) -> dict[str, Any] | None:
        """Engine counters and memory by home; None for a plain model."""
        if self.counters is None:
            return None
        return {**self.counters.as_dict(), **self.memory}

    def reset_stats(self) -> None:
        if self.counters is not None:
            self.counters.reset()

    def close(self) -> None:
        closer, self.on_close = self.on_close, None
        if closer is not None:
            closer()

    def __enter__(self) -> LoadedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def folder_of(ref_or_folder: Any) -> Path:
    """The local folder of a ModelRef (or a path); ModelError for shapes-only presets."""
    path = getattr(ref_or_folder, "path", ref_or_folder)
    if path is None:
        name = getattr(ref_or_folder, "name", "model")
        raise ModelError(
            f"model {name!r} has no local weights (it is a shapes-only preset)",
            "download it, or pass a local folder with --model PATH",
        )
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


def import_model_code(model_type: str) -> float:
    """Import what loading a `model_type` model and its tokenizer takes from transformers (the
    package, its causal LM and config classes, the tokenizer classes); the seconds it took.
    `run` calls it before the tokenizer and the weights so that its timing line can tell the
    imports (most of a cold start: docs/run.md) from resolving and loading. Import errors are
    left to the loaders, which report them with the model's name."""
    start = time.perf_counter()
    try:
        import transformers
        from transformers import AutoTokenizer  # noqa: F401  (the import is the point)
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
        if isinstance(name, str):
            getattr(transformers, name)  # the lazy module imports the model's code here
    except Exception:  # reported by the loader that needs the missing part
        pass
    return time.perf_counter() - start


def load_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer (fast, local files only). ModelError when missing or unreadable."""
    folder = folder_of(folder)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelError(
            f"model folder {folder} has no tokenizer files",
            "it needs tokenizer.json (or tokenizer_config.json with vocab files); "
            "save the tokenizer with save_pretrained into the same folder",
        )
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except MemoryError:
        raise
    except Exception as exc:
        raise ModelError(
            f"cannot load the tokenizer of {folder}: {_short(exc)}",
            "check tokenizer.json / tokenizer_config.json, or re-save the tokenizer with save_pretrained",
        ) from exc


def load_model(ref_or_folder: Any, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """Load the stock transformers causal LM from a local folder onto `device` in `dtype`.

    `dtype` is float32, bfloat16 or float16 (resolve 'auto' with `resolve_dtype` first).
    """
    from transformers import AutoModelForCausalLM

    folder = folder_of(ref_or_folder)
    if dtype == "auto":
        raise ValueError("resolve dtype 'auto' with resolve_dtype() before load_model()")
    start = time.perf_counter()
    try:
        with quiet_transformers(), activity(f"loading {folder.name}"):
            model = AutoModelForCausalLM.from_pretrained(
                str(folder),
                dtype=torch_dtype(dtype),
                use_safetensors=True,
                trust_remote_code=False,
                local_files_only=True,
            )
    except MemoryError:
        raise
    except Exception as exc:  # safetensors, OSError, ValueError, KeyError ...
        raise ModelError(
            f"cannot load the weights of {folder}: {_short(exc)}",
            "the folder may be incomplete or corrupt; re-download or re-convert it "
            "(hetegen loads *.safetensors only)",
        ) from exc
    model.eval()
    sync = _no_sync
    if str(device) != "cpu":
        backend = get_backend("cuda")
        with out_of_memory_as_error("loading the model onto the GPU"):
            model.to(device)
            backend.synchronize()
        sync = backend.synchronize
    return LoadedModel(
        model=model,
        device=str(device),
        formats=ComputeFormats(dtype),
        load_s=time.perf_counter() - start,
        sync=sync,
        folder=str(folder),
    )


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{exc.__class__.__name__}: {text[:200]}" if text else exc.__class__.__name__
