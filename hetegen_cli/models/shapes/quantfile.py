"""The quantization document of a quantized model folder (`quantization.json`) and the check
of the folder's quantized tensors (pure Python, no torch; models.formats.quantized writes the
tensors, models.loading.quantized_loader loads them).

Each quantized linear `X` is stored as `X.weight.q` (int8 [out, in] or uint8 [out, in / 2]),
`X.weight.scale` (float16 [out] or [out, in / group]) and, for int4, `X.weight.min`
(core.quant's layout); every other tensor in bfloat16.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from hetegen_cli.core import quant
from hetegen_cli.core.errors import ModelError
from hetegen_cli.models.shapes.spec import ModelSpec

QUANT_FILE = "quantization.json"
QUANT_KIND = "hetegen.quantization"
REST_DTYPE = "bfloat16"  # every tensor that is not a quantized linear
PARTS = ("q", "scale", "min")


def read_quantization(folder: Path) -> dict | None:
    """The folder's quantization.json (validated), or None for a floating-point folder."""
    path = Path(folder) / QUANT_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}", "quantize the model again") from None
    ok = (
        isinstance(doc, dict)
        and doc.get("kind") == QUANT_KIND
        and doc.get("schema_version") == 1
        and doc.get("format") in quant.QUANT_FORMATS
        and isinstance(doc.get("linears"), list)
        and all(isinstance(n, str) for n in doc["linears"])
        and (doc["format"] != "int4" or doc.get("group_size") in quant.INT4_GROUP_SIZES)
    )
    if not ok:
        raise ModelError(
            f"{path} is not a hetegen quantization document of schema 1", "quantize the model again"
        )
    return doc


def spec_with_quantization(spec: ModelSpec, doc: dict) -> ModelSpec:
    """`spec` (of the folder's config) with the linears of `doc` quantized, the rest bfloat16."""
    spec = replace(spec, dtype=REST_DTYPE)
    return spec.quantized(
        doc["format"], int(doc.get("group_size") or quant.DEFAULT_GROUP_SIZE), set(doc["linears"])
    )


def virtual_index(index: dict, doc: dict) -> dict:
    """A tensor index in which each quantized linear's parts appear as one `X.weight` of its
    float shape (so models.shapes.folder checks the folder like any other). ModelError when a part
    is missing or its shape does not belong to the others."""
    out = dict(index)
    g = doc.get("group_size")
    for name in doc["linears"]:
        keys = [f"{name}.weight.{p}" for p in PARTS[: 3 if doc["format"] == "int4" else 2]]
        missing = [k for k in keys if k not in index]
        if missing:
            raise ModelError(f"the quantized checkpoint lacks {missing[0]}", "quantize the model again")
        file, _, qshape = index[keys[0]]
        rows, cols = qshape
        inp = cols * 2 if doc["format"] == "int4" else cols
        want = {keys[1]: (rows, inp // g) if g and doc["format"] == "int4" else (rows,)}
        if doc["format"] == "int4":
            want[keys[2]] = (rows, inp // g)
        for key, shape in want.items():
            if tuple(index[key][2]) != shape:
                raise ModelError(
                    f"quantized tensor {key} has shape {list(index[key][2])}, expected {list(shape)}",
                    "quantize the model again",
                )
        for key in keys:
            del out[key]
        out[f"{name}.weight"] = (file, REST_DTYPE, (rows, inp))
    return out


def quantized_folder_name(name: str, fmt: str, group: int) -> str:
    return f"{name}-{fmt}" + (f"-g{group}" if fmt == "int4" else "")


def quantization_doc(fmt: str, group: int, spec: ModelSpec, source: dict, seconds: float) -> dict:
    quantized = [lin.name for lin in spec.linears if lin.quant]
    kept = [lin.name for lin in spec.linears if not lin.quant]
    return {
        "schema_version": 1,
        "kind": QUANT_KIND,
        "format": fmt,
        "group_size": group if fmt == "int4" else None,
        "rest_dtype": REST_DTYPE,
        "linears": quantized,
        "kept_float": kept,
        "kept_float_reason": "the CPU kernel cannot take their shape (core.quant.kernel_takes)"
        if kept
        else None,
        "source": source,
        "quantize_s": round(seconds, 2),
    }
