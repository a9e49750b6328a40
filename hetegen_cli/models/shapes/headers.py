"""safetensors headers: what a checkpoint holds (name, dtype, shape, offsets), read and
validated without touching a weight byte (pure Python, no torch).

A header passes only if the safetensors library would accept the file too: a JSON object of
entries {dtype, shape, data_offsets}, offsets that tile the data section from 0 to its end
with no gap or overlap, and sizes that agree with dtype x shape (docs/validation.md).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, StrictInt, StrictStr

from hetegen_cli.core import dtypes
from hetegen_cli.core.errors import ModelError
from hetegen_cli.core.paths import path_error
from hetegen_cli.core.validation import Closed, check

#: name -> (file, dtype name, shape) over all safetensors files of a folder
TensorIndex = dict[str, tuple[Path, str, tuple[int, ...]]]
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
#: every dtype code the safetensors format defines -> bytes per element (None: sub-byte)
SAFETENSORS_CODES: dict[str, float | None] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "C64": 8,
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F4": None,
    "F6_E2M3": None,
    "F6_E3M2": None,
}
_Dim = Annotated[StrictInt, Field(ge=0, le=2**40)]
_Offset = Annotated[StrictInt, Field(ge=0, le=2**53)]


class Entry(Closed):
    dtype: StrictStr
    shape: Annotated[list[_Dim], Field(max_length=8)]
    data_offsets: Annotated[list[_Offset], Field(min_length=2, max_length=2)]


def _damaged(path: Path, why: str) -> ModelError:
    return ModelError(
        f"{path} is not a valid safetensors file: {why}",
        "the download or conversion may be incomplete or damaged; fetch or convert it again",
    )


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The validated JSON header of a .safetensors file (tensor name -> dtype, shape, offsets).

    Reads only the first 8 + header-length bytes. ModelError names what is wrong.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                raise _damaged(path, "shorter than its 8-byte header length")
            (length,) = struct.unpack("<Q", raw)
            if length > min(size - 8, MAX_HEADER_BYTES):
                raise _damaged(path, f"its header length {length} runs past the end of the file")
            text = handle.read(length)
    except PermissionError:
        raise ModelError(f"cannot read {path}: permission denied", "check its permissions") from None
    except OSError as exc:
        raise path_error(exc, path, "weights file") from None
    try:
        header = json.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise _damaged(path, "its header is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise _damaged(path, f"its header is not JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise _damaged(path, "its header nests too deeply") from None
    _validate(path, header, size - 8 - length)
    return header


def _validate(path: Path, header: Any, data_bytes: int) -> None:
    """ModelError unless `header` describes a data section of exactly `data_bytes` bytes."""
    if not isinstance(header, dict):
        raise _damaged(path, f"its header is a JSON {type(header).__name__}, not an object")
    spans = []
    for name, meta in header.items():
        if name == "__metadata__":
            if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
                raise _damaged(path, "its __metadata__ is not an object of strings")
            continue
        entry = check(
            Entry,
            meta,
            source=f"{path} is not a valid safetensors file: tensor {name!r}",
            error=ModelError,
            hint="the file is damaged; fetch or convert it again",
        )
        begin, end = entry.data_offsets
        if begin > end:
            raise _damaged(path, f"tensor {name!r} has data_offsets [{begin}, {end}] that run backwards")
        if entry.dtype not in SAFETENSORS_CODES:
            raise _damaged(
                path, f"tensor {name!r} has dtype {entry.dtype!r}, which safetensors does not define"
            )
        size = SAFETENSORS_CODES[entry.dtype]
        need = math.prod(entry.shape) * size if size is not None else None
        if need is not None and end - begin != need:
            raise _damaged(
                path,
                f"tensor {name!r} holds {end - begin} bytes; {entry.dtype} x {entry.shape} is {int(need)}",
            )
        spans.append((begin, end, name))
    spans.sort()
    position = 0
    for begin, end, name in spans:
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else "leaves a gap before it"
            raise _damaged(path, f"tensor {name!r} {what} (data_offsets [{begin}, {end}])")
        position = end
    if position > data_bytes:
        raise ModelError(
            f"{path} is truncated: its header describes {position} bytes of data but "
            f"the file holds {data_bytes}",
            "the download or conversion was cut short; fetch or convert it again",
        )
    if position < data_bytes:
        raise _damaged(path, f"{data_bytes - position} bytes follow the last tensor")


def safetensors_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def folder_tensor_index(folder: Path) -> TensorIndex:
    """tensor name -> (file, dtype name, shape) over all safetensors files of a folder. Dtype
    names come from core.dtypes; unknown codes keep their safetensors spelling (e.g. F8_E4M3)."""
    index: TensorIndex = {}
    for file in safetensors_files(folder):
        for key, meta in read_safetensors_header(file).items():
            if key == "__metadata__":
                continue
            if key in index:
                raise ModelError(
                    f"tensor {key!r} is stored twice, in {index[key][0].name} and {file.name}",
                    "remove the stray file from the model folder",
                )
            code = str(meta["dtype"])
            index[key] = (file, dtypes.from_safetensors(code) or code, tuple(meta["shape"]))
    return index
