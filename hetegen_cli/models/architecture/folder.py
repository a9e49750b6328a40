"""A local model folder: its config, its safetensors headers, and the check that they agree,
done before any weight byte is read (pure Python, no torch).

Every tensor the architecture needs must be stored, with its shape and a floating-point dtype
(a tied LM head excepted, as the config says); a checkpoint that lacks one would otherwise
load with random values and generate garbage. Tensors the architecture does not use are
reported as warnings and ignored (docs/validation.md).
"""

from __future__ import annotations

from pathlib import Path

from hetegen_cli.core.dtypes import DTYPES
from hetegen_cli.core.errors import ModelError
from hetegen_cli.models.architecture.spec import spec_from_config
from hetegen_cli.models.shapes.config import read_config
from hetegen_cli.models.shapes.experts import check_expert_tensors, legacy_names
from hetegen_cli.models.shapes.headers import TensorIndex, folder_tensor_index
from hetegen_cli.models.shapes.quantfile import (
    REST_DTYPE,
    read_quantization,
    spec_with_quantization,
    virtual_index,
)
from hetegen_cli.models.shapes.spec import ModelSpec

#: stored tensors transformers ignores on load (old rotary tables, attention masks)
IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.masked_bias", ".attn.bias")
_REFETCH = "the checkpoint is incomplete or does not match its config.json; fetch or convert it again"


def stored_key(name: str, index: TensorIndex, prefix: str = "model") -> str | None:
    """The key under which tensor `name` is stored: as is, or with/without `prefix.`, or under
    an older name of a MoE router (models.shapes.experts.legacy_names)."""
    key = _stored_key(name, index, prefix)
    if key is None:
        key = next((k for k in (_stored_key(n, index, prefix) for n in legacy_names(name)) if k), None)
    return key


def _stored_key(name: str, index: TensorIndex, prefix: str) -> str | None:
    if name in index:
        return name
    if name.startswith(prefix + "."):
        bare = name[len(prefix) + 1 :]
        return bare if bare in index else None
    prefixed = f"{prefix}.{name}"
    return prefixed if prefixed in index else None


def check_tensors(spec: ModelSpec, index: TensorIndex, folder: Path) -> tuple[str, ...]:
    """ModelError unless every tensor of `spec.tensors` is stored with its shape and a
    floating-point dtype; returns warnings about stored tensors the architecture ignores."""
    used: set[str] = set()
    for experts in spec.experts:  # fused, or one tensor per expert and part
        used |= check_expert_tensors(
            experts, lambda name: stored_key(name, index), lambda key: index[key][2], str(folder)
        )
    expert_tensors = {name for experts in spec.experts for name in experts.tensors}
    missing = []
    for name, shape in spec.tensors.items():
        if name in expert_tensors:
            continue
        key = stored_key(name, index)
        if key is None:
            missing.append(name)
            continue
        used.add(key)
        _, dtype, stored = index[key]
        if stored != shape:
            raise ModelError(
                f"{folder}: tensor {key} has shape {list(stored)}, but config.json says {list(shape)}",
                _REFETCH,
            )
        if dtype not in DTYPES or not DTYPES[dtype].floating:
            raise ModelError(
                f"{folder}: tensor {key} is stored as {dtype}; hetegen loads "
                "floating-point weights (float16, bfloat16, float32)",
                _REFETCH,
            )
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelError(
            f"{folder} lacks {len(missing)} tensor{'s' if len(missing) > 1 else ''} "
            f"the {spec.architecture} architecture needs: "
            f"{', '.join(missing[:3])}{more}",
            _REFETCH,
        )
    head = stored_key("lm_head.weight", index)
    extra = sorted(
        k
        for k in index
        if k not in used and not k.endswith(IGNORED_SUFFIXES) and not (spec.tie_word_embeddings and k == head)
    )
    if not extra:
        return ()
    more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
    return (
        f"{folder}: {len(extra)} stored tensor{'s' if len(extra) > 1 else ''} not used by the "
        f"{spec.architecture} architecture, ignored: {', '.join(extra[:3])}{more}",
    )


def spec_from_folder(
    folder: Path, name: str | None = None, dtype: str | None = None
) -> tuple[ModelSpec, tuple[str, ...]]:
    """(spec, warnings) of a local folder whose safetensors hold every tensor its config needs.

    The dtype defaults to the dtype of the stored weights when they all share one.
    """
    config = read_config(folder)
    index = folder_tensor_index(folder)
    if not index:
        raise ModelError(
            f"model folder {folder} has no *.safetensors weights",
            "hetegen loads safetensors only (never pickles); convert the checkpoint "
            "with transformers' save_pretrained(safe_serialization=True)",
        )
    quantization = read_quantization(folder)
    if quantization is not None:  # a quantized folder (models.shapes.quantfile): its own dtypes
        spec = spec_from_config(config, name or str(folder), REST_DTYPE, str(folder / "config.json"))
        index = virtual_index(index, quantization, spec)
        warnings = check_tensors(spec, index, folder)
        return spec_with_quantization(spec, quantization), warnings
    stored = {dt for (_, dt, _) in index.values() if dt in ("float32", "bfloat16", "float16")}
    if dtype is None and len(stored) == 1:
        dtype = stored.pop()
    spec = spec_from_config(config, name or str(folder), dtype, str(folder / "config.json"))
    return spec, check_tensors(spec, index, folder)
