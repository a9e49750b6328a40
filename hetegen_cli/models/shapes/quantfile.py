"""The quantization document of a quantized model folder (`quantization.json`) and the check
of the folder's quantized tensors (pure Python, no torch; models.formats.quantized writes the
tensors, models.loading.quantized_loader loads them).

Each quantized linear `X` is stored as `X.weight.q` (int8 [out, in] or uint8 [out, in / 2]),
`X.weight.scale` (float16 [out] or [out, in / group]) and, for int4, `X.weight.min`
(core.quant's layout); every other tensor in bfloat16.

Schema 1 has one `format` (int8 or int4, with `group_size`) for every linear in `linears`.
Schema 2 is a mixed model's (a GGUF Q4_K_M: Q4_K linears in int4, Q6_K ones in int8):
`format` is "mixed" and `formats` maps each linear to its own; hetegen before it refuses the
file instead of misreading an int8 linear as int4. Schema 3 adds `experts`, a MoE model's
routed experts stored quantized: experts module -> the format of each part (gate, up, down;
null for a part kept bfloat16), every expert of the module alike, each stored under
models.shapes.experts.quant_expert_key (`{module}.{e}.gate_proj.weight.q`, ...); `format` is
then the one format of linears and experts, or "mixed". hetegen before schema 3 refuses such a
folder rather than load its experts as missing.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from hetegen_cli.core import paths, quant
from hetegen_cli.core.errors import ModelError
from hetegen_cli.models.shapes.experts import PARTS as EXPERT_PARTS
from hetegen_cli.models.shapes.experts import quant_expert_key
from hetegen_cli.models.shapes.spec import MIXED, ModelSpec

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
    if not _valid(doc):
        raise ModelError(
            f"{path} is not a hetegen quantization document of schema 1, 2 or 3", "quantize the model again"
        )
    return doc


def _valid(doc: object) -> bool:
    if not (
        isinstance(doc, dict)
        and doc.get("kind") == QUANT_KIND
        and doc.get("schema_version") in (1, 2, 3)
        and isinstance(doc.get("linears"), list)
        and all(isinstance(n, str) for n in doc["linears"])
    ):
        return False
    experts = doc.get("experts")
    if doc["schema_version"] == 3 and not _valid_experts(experts):
        return False
    expert_used = set()
    if doc["schema_version"] == 3:
        expert_used = {f for parts in experts.values() for f in parts if f}
    if doc["schema_version"] >= 2 and doc.get("format") == MIXED:
        formats = doc.get("formats")
        if not (
            isinstance(formats, dict)
            and set(formats) == set(doc["linears"])
            and all(f in quant.QUANT_FORMATS for f in formats.values())
        ):
            return False
        used = set(formats.values())
    elif doc.get("format") in quant.QUANT_FORMATS:
        used = {doc["format"]}
        if not expert_used <= used:
            return False
    else:
        return False
    return "int4" not in used | expert_used or doc.get("group_size") in quant.INT4_GROUP_SIZES


def _valid_experts(experts: object) -> bool:
    """`experts` of a schema 3 document: module -> three formats (or null), one quantized."""
    return (
        isinstance(experts, dict)
        and bool(experts)
        and all(
            isinstance(name, str)
            and isinstance(parts, list)
            and len(parts) == len(EXPERT_PARTS)
            and all(f is None or f in quant.QUANT_FORMATS for f in parts)
            and any(parts)
            for name, parts in experts.items()
        )
    )


def linear_formats(doc: dict) -> dict[str, tuple[str, int | None]]:
    """{linear: (format, group size or None)} of a validated quantization document: each
    linear's own format in a mixed document (schema 2), the one format otherwise."""
    per_linear = doc["formats"] if doc["format"] == MIXED else {}
    out = {}
    for name in doc["linears"]:
        fmt = per_linear.get(name, doc["format"])
        out[name] = (fmt, doc.get("group_size") if fmt == "int4" else None)
    return out


def expert_formats(doc: dict) -> dict[str, tuple[tuple[str, int] | None, ...]]:
    """{experts module: each part's (format, group size) or None} of a validated document
    ({} before schema 3 or for a dense model)."""
    group = int(doc.get("group_size") or quant.DEFAULT_GROUP_SIZE)
    pick = lambda f: None if f is None else (f, group if f == "int4" else quant.DEFAULT_GROUP_SIZE)  # noqa: E731
    return {name: tuple(map(pick, parts)) for name, parts in (doc.get("experts") or {}).items()}


def quant_label(doc: dict) -> str:
    """'int8', 'int4-g32' or, for a mixed document, 'int4-g32+int8' (ModelSpec.quant_label):
    the linears' formats and the routed experts'."""
    pairs = set(linear_formats(doc).values())
    pairs |= {q for parts in expert_formats(doc).values() for q in parts if q}
    labels = {fmt if fmt == "int8" else f"{fmt}-g{group}" for fmt, group in pairs}
    return "+".join(sorted(labels)) or doc["format"]


def spec_with_quantization(spec: ModelSpec, doc: dict) -> ModelSpec:
    """`spec` (of the folder's config) with the linears and routed experts of `doc`
    quantized, each in its own format, the rest bfloat16."""
    spec = replace(spec, dtype=REST_DTYPE)
    formats = linear_formats(doc)
    spec = spec.with_quant_map(
        {name: (fmt, int(group or quant.DEFAULT_GROUP_SIZE)) for name, (fmt, group) in formats.items()}
    )
    return spec.with_expert_quant(expert_formats(doc))


def virtual_index(index: dict, doc: dict, spec: ModelSpec | None = None) -> dict:
    """A tensor index in which each quantized linear's parts appear as one `X.weight` of its
    float shape, and so does each quantized part of each routed expert of `spec` (so
    models.architecture.folder checks the folder like any other). ModelError when a part is
    missing or its shape does not belong to the others, or when the document names experts
    the model does not have."""
    out = dict(index)
    for name, (fmt, g) in linear_formats(doc).items():
        _virtualize(index, out, name, fmt, g, "")
    experts = expert_formats(doc)
    by_name = {x.name: x for x in (spec.experts if spec is not None else ())}
    for module, parts in experts.items():
        x = by_name.get(module)
        if x is None:
            raise ModelError(
                f"quantization.json names routed experts {module}, which the model does not have",
                "quantize the model again",
            )
        for e in range(x.num_experts):
            for part, q in zip(EXPERT_PARTS, parts, strict=True):
                if q is not None:
                    what = f" (the {part} weight of expert {e} of {x.num_experts} in layer {x.layer_index})"
                    key = quant_expert_key(module, e, part).removesuffix(".weight")
                    _virtualize(index, out, key, q[0], q[1], what)
    return out


def _virtualize(index: dict, out: dict, name: str, fmt: str, g: int | None, what: str) -> None:
    """Replace quantized `name`'s stored parts in `out` by one `name.weight` of its float shape."""
    int4 = fmt == "int4"
    keys = [f"{name}.weight.{p}" for p in PARTS[: 3 if int4 else 2]]
    missing = [k for k in keys if k not in index]
    if missing:
        raise ModelError(f"the quantized checkpoint lacks {missing[0]}{what}", "quantize the model again")
    file, _, qshape = index[keys[0]]
    rows, cols = qshape
    inp = cols * 2 if int4 else cols
    want = {keys[1]: (rows, inp // g) if g and int4 else (rows,)}
    if int4:
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


def quantized_folder_name(name: str, fmt: str, group: int) -> str:
    return f"{name}-{fmt}" + (f"-g{group}" if fmt in ("int4", MIXED) else "")


def quantization_doc(
    fmt: str, group: int, spec: ModelSpec, source: dict, seconds: float, kept_reason: str | None = None
) -> dict:
    """The quantization document of `spec`'s quantized linears and routed experts: `fmt` and
    `group` when they share one format; a mixed document (`format` MIXED and `formats`, each
    linear's own) when they do not; schema 3 with `experts` when routed experts are stored
    quantized. `kept_reason` says why the other linears stayed bfloat16 (default: the kernel
    cannot take their shape)."""
    qmap = spec.quant_map()
    experts = spec.expert_quant_map()
    used = sorted({f for f, _ in qmap.values()} | {q[0] for parts in experts.values() for q in parts if q})
    mixed = len(used) > 1
    quantized = [lin.name for lin in spec.linears if lin.quant]
    kept = [lin.name for lin in spec.linears if not lin.quant]
    doc = {
        "schema_version": 3 if experts else 2 if mixed else 1,
        "kind": QUANT_KIND,
        "format": MIXED if mixed else (used[0] if used else fmt),
        "group_size": group if "int4" in (used or [fmt]) else None,
        "rest_dtype": REST_DTYPE,
        "linears": quantized,
    }
    if mixed:
        doc["formats"] = {name: f for name, (f, _) in qmap.items()}
    if experts:
        doc["experts"] = {name: [q[0] if q else None for q in parts] for name, parts in experts.items()}
    return {
        **doc,
        "kept_float": kept,
        "kept_float_reason": (
            kept_reason or "the CPU kernel cannot take their shape (core.quant.kernel_takes)"
        )
        if kept
        else None,
        "source": source,
        "quantize_s": round(seconds, 2),
    }


def made_quantized(folder: Path, name: str, fmt: str, group: int, output: Path | None = None) -> Path | None:
    """The folder of the model in `folder` in `fmt` when it exists already: `folder` itself
    (stored so) or the copy made before under $HETEGEN_HOME/models (or at `output`); None when
    one must be made (models.formats.quantized.ensure_quantized). ModelError when `folder` is
    quantized in another format."""
    doc = read_quantization(folder)
    if doc is not None:
        if doc["format"] == fmt and (fmt != "int4" or doc["group_size"] == group):
            return folder
        raise ModelError(
            f"{name} is already quantized ({doc['format']}); it cannot be re-quantized to {fmt}",
            "quantize the floating-point model instead",
        )
    target = output or paths.models_dir() / quantized_folder_name(name, fmt, group)
    if output is None and read_quantization(target) is not None and (target / "model.safetensors").is_file():
        return target
    return None
