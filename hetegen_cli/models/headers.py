"""safetensors headers: what a checkpoint holds (name, dtype, shape, offsets) without
reading a weight byte (pure Python, no torch)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from hetegen_cli.core import dtypes
from hetegen_cli.core.errors import ModelError

#: name -> (file, dtype name, shape) over all safetensors files of a folder
TensorIndex = dict[str, tuple[Path, str, tuple[int, ...]]]


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file (tensor name -> dtype, shape, offsets).

    Reads only the first 8 + header-length bytes. Raises ModelError on corrupt files.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than its 8-byte header length")
            (length,) = struct.unpack("<Q", raw)
            if length > min(size - 8, 100_000_000):
                raise ValueError("header length beyond the end of the file")
            header = json.loads(handle.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ModelError(
            f"{path} is not a valid safetensors file ({exc})",
            "the download or conversion may be incomplete; fetch or convert it again",
        ) from exc
    data_end = (
        8
        + length
        + max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    )
    if data_end > size:
        raise ModelError(
            f"{path} is truncated: its header describes {data_end} bytes but the file has {size}",
            "the download or conversion was cut short; fetch or convert it again",
        )
    return header


def safetensors_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def folder_tensor_index(folder: Path) -> TensorIndex:
    """tensor name -> (file, dtype name, shape) over all safetensors files of a folder."""
    index: TensorIndex = {}
    for file in safetensors_files(folder):
        for key, meta in read_safetensors_header(file).items():
            if key == "__metadata__":
                continue
            code = str(meta.get("dtype"))
            dtype = dtypes.from_safetensors(code) or code.lower()
            index[key] = (file, dtype, tuple(int(d) for d in meta["shape"]))
    return index
