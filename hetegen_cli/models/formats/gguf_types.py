"""Which GGUF types a file's linears use, and which hetegen format each loads as (docs/models.md,
"GGUF types"): the counts are read from the metadata only and cached in $HETEGEN_HOME/gguf-meta;
types with no mapping are refused with the supported list unless a float copy is allowed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections import Counter
from pathlib import Path

from hetegen_cli.core import paths
from hetegen_cli.core.console import note
from hetegen_cli.core.errors import HetegenError, ModelError
from hetegen_cli.core.jsonio import atomic_write
from hetegen_cli.core.units import format_bytes
from hetegen_cli.models.formats.gguf_read import GgufTensorInfo, read_gguf_layout
from hetegen_cli.models.shapes.spec import MIXED

#: GGUF type -> the hetegen format its linears load as (the rest: FLOAT_TYPES or unmapped)
NATIVE = {
    "Q4_0": "int4",
    "Q4_1": "int4",
    "Q4_K": "int4",
    "Q5_0": "int8",
    "Q5_1": "int8",
    "Q5_K": "int8",
    "Q6_K": "int8",
    "Q8_0": "int8",
}
FLOAT_TYPES = ("F32", "F16", "BF16")


def supported_types() -> tuple[str, ...]:
    """GGUF types a linear may be stored in, in the order docs/models.md lists them."""
    return (*NATIVE, *FLOAT_TYPES)


def ggml_type(kind: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[kind]


def row_bytes(kind: str, in_features: int) -> int:
    """Bytes one row of `in_features` weights takes in GGUF type `kind`."""
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[ggml_type(kind)]
    if in_features % block:
        raise ValueError(f"{in_features} inputs are not a multiple of {kind}'s block of {block}")
    return in_features // block * size


FLOAT_COPY_FLAG = "--allow-float-copy"


def type_name(type_id: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"type {type_id}"


#: the version of gguf_linear_types' cached answer (2: a MoE file's expert tensors counted)
_CACHE_VERSION = 2


def is_block_linear(info: GgufTensorInfo) -> bool:
    """A block's linear weight: 2-D, or a MoE layer's 3-D expert tensor (`ffn_*_exps`, one
    matrix per expert), each a quantized tensor hetegen loads in a format of its own."""
    if not (info.name.startswith("blk.") and info.name.endswith(".weight")):
        return False
    return len(info.shape) == 2 or (len(info.shape) == 3 and "_exps." in info.name)


def gguf_linear_types(gguf: Path) -> Counter:
    """How many block linears (2-D `blk.*` weights, and a MoE layer's 3-D expert tensors) of
    each GGUF type the file holds (metadata only), kept in HETEGEN_HOME, keyed by the file's
    name, size and modification time, and read again only when the file changes."""
    cache = _meta_cache_path(gguf)
    if cache is not None:
        try:
            cached = json.loads(cache.read_text())
            if cached.get("version") == _CACHE_VERSION:
                return Counter(cached["block_linear_types"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # absent, damaged or of an older hetegen: read the file
    layout = read_gguf_layout(gguf)
    counts = Counter(type_name(t.type_id) for t in layout.tensors.values() if is_block_linear(t))
    if cache is not None:
        with contextlib.suppress(HetegenError):  # a read-only home: just not cached
            doc = {"version": _CACHE_VERSION, "gguf": str(gguf), "block_linear_types": dict(counts)}
            atomic_write(cache, json.dumps(doc))
    return counts


def _meta_cache_path(gguf: Path) -> Path | None:
    """Where gguf_linear_types keeps its answer for this version of the file (None: unknown)."""
    try:
        info = Path(gguf).stat()
    except OSError:
        return None
    key = hashlib.sha256(f"{Path(gguf).resolve()}|{info.st_size}|{info.st_mtime_ns}".encode()).hexdigest()
    return paths.home() / "gguf-meta" / f"{key[:16]}.json"


def unmapped_types(counts: Counter) -> list[str]:
    """The GGUF types among `counts` that no hetegen format takes (neither NATIVE nor float)."""
    return sorted(t for t in counts if t not in NATIVE and t not in FLOAT_TYPES)


def check_types(gguf: Path, allow_float_copy: bool = False, announce: bool = True) -> Counter:
    """The block linear types of `gguf`; ModelError naming the unmapped ones and the supported
    list, unless `allow_float_copy` (then a note says what their bfloat16 copy costs, unless
    `announce` is off: it was said already)."""
    counts = gguf_linear_types(gguf)
    unmapped = unmapped_types(counts)
    if not unmapped:
        return counts
    if not allow_float_copy:
        raise ModelError(
            f"GGUF file {gguf.name} stores linears as {', '.join(unmapped)}, which hetegen cannot load "
            "without a float copy",
            f"supported GGUF types: {', '.join(supported_types())}; pass {FLOAT_COPY_FLAG} to dequantize "
            "those linears to bfloat16 (the cost is printed first), --quant int8 to re-quantize them, or "
            "use a Q4_K_M / Q4_0 / Q8_0 file",
        )
    if not announce:
        return counts
    layout = read_gguf_layout(gguf)
    stored = copied = 0
    for t in layout.tensors.values():
        if is_block_linear(t) and type_name(t.type_id) in unmapped:
            stored += tensor_bytes(t)
            copied += 2 * math.prod(t.shape)
    count = sum(counts[t] for t in unmapped)
    note(
        f"{FLOAT_COPY_FLAG}: {count} linear{'s' if count != 1 else ''} in {', '.join(unmapped)} "
        f"({format_bytes(stored)} in the file) "
        f"will be dequantized to bfloat16: {format_bytes(copied)} on disk and in memory, "
        f"{copied / max(stored, 1):.1f}x their GGUF size"
    )
    return counts


def native_format(gguf: Path, allow_float_copy: bool = False) -> str:
    """The hetegen format a GGUF's linears load as: int4 (Q4_0/Q4_1/Q4_K), int8 (Q5_*/Q6_K/
    Q8_0), MIXED when both occur, "bfloat16" when every quantized linear is a float copy
    (`allow_float_copy`), "none" for a floating-point file. ModelError for unmapped types
    without `allow_float_copy` (check_types)."""
    counts = check_types(gguf, allow_float_copy)
    formats = sorted({NATIVE[t] for t in counts if t in NATIVE})
    if len(formats) > 1:
        return MIXED
    if formats:
        return formats[0]
    return "bfloat16" if unmapped_types(counts) else "none"


def tensor_bytes(info: GgufTensorInfo) -> int:
    rows = 1
    for d in info.shape[:-1]:
        rows *= d
    return rows * row_bytes(type_name(info.type_id), info.shape[-1])
