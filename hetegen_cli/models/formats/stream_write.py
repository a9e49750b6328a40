"""One safetensors file written tensor by tensor, so a conversion never holds the whole model.

safetensors' own `save_file` takes every tensor at once (a converted 70B model would sit in
RAM whole before a byte reaches the disk). The format is simple enough to write as it comes:
an 8-byte little-endian header length, a JSON header naming each tensor's dtype, shape and
byte range, padded with spaces to a multiple of 8, then the tensors' bytes back to back. The
header is known before any tensor is computed (the names, dtypes and shapes come from the
model's spec), so `write_safetensors` writes it first and then each tensor's bytes as the
producer yields them, checking that every tensor arrives in header order with the declared
dtype and shape (a tensor may arrive in row chunks). The file is fsynced; the folder it lives
in is renamed into place by its caller (models.formats.quantized.write_folder).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from hetegen_cli.core.dtypes import to_safetensors

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.int8: "int8",
    torch.uint8: "uint8",
    torch.int32: "int32",
    torch.int64: "int64",
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the file: its name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class TensorStream:
    """The tensors of one file: their entries in order, and `produce()`, which yields
    (name, tensor) pairs in that order (a tensor whole or in row chunks)."""

    entries: list[TensorEntry]
    produce: Callable[[], Iterator[tuple[str, torch.Tensor]]]

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor]) -> TensorStream:
        """The stream of tensors already in memory, in the dict's order."""
        entries = [TensorEntry(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
        return cls(entries, lambda: iter(tensors.items()))


def header_bytes(entries: Iterable[TensorEntry], metadata: dict[str, str] | None = None) -> bytes:
    """The length prefix and JSON header of a file holding `entries` in this order."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for e in entries:
        if e.name in header:
            raise ValueError(f"tensor {e.name} is listed twice")
        header[e.name] = {
            "dtype": to_safetensors(_DTYPE_NAMES[e.dtype]),
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def write_safetensors(
    path: Path,
    entries: list[TensorEntry],
    tensors: Iterator[tuple[str, torch.Tensor]],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write `entries` to `path`, their bytes taken from `tensors`: (name, tensor) pairs in
    header order, a tensor whole or as consecutive row chunks. Returns the bytes written.
    ValueError when a tensor arrives out of order, in another dtype or shape, or short."""
    head = header_bytes(entries, metadata)
    written = 0
    index, filled = 0, 0  # the entry being filled and its bytes so far
    with open(path, "wb") as out:
        out.write(head)
        for name, tensor in tensors:
            if tensor.numel() == 0:
                continue  # nothing to write (an empty entry is complete from the start)
            while index < len(entries) and filled == entries[index].nbytes:
                index, filled = index + 1, 0
            if index == len(entries) or entries[index].name != name:
                expected = entries[index].name if index < len(entries) else "nothing more"
                raise ValueError(f"tensor {name} arrived where {expected} was expected")
            entry = entries[index]
            if tensor.dtype != entry.dtype or tuple(tensor.shape[1:]) != tuple(entry.shape[1:]):
                raise ValueError(
                    f"tensor {name} arrived as {tensor.dtype} {list(tensor.shape)}, "
                    f"declared {entry.dtype} {list(entry.shape)}"
                )
            data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            if filled + data.nbytes > entry.nbytes:
                raise ValueError(f"tensor {name} has more bytes than its declared shape {list(entry.shape)}")
            out.write(memoryview(data))
            filled += data.nbytes
            written += data.nbytes
        while index < len(entries) and filled == entries[index].nbytes:
            index, filled = index + 1, 0
        if index < len(entries):
            raise ValueError(f"tensor {entries[index].name} was not written in full")
        out.flush()
        os.fsync(out.fileno())
    return len(head) + written
