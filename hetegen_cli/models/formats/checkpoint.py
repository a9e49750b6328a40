"""Read tensors, or row ranges of them, from a folder's safetensors files in chunks
(`safe_open(..., framework="pt").get_slice`), copying each chunk straight into its final home:
the model is never held twice in RAM. Never reads pickles.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from safetensors import safe_open

from hetegen_cli.core.dtypes import DTYPES
from hetegen_cli.core.errors import ModelError
from hetegen_cli.models.shapes.experts import legacy_names
from hetegen_cli.models.shapes.headers import folder_tensor_index

CHUNK_BYTES = 32 * 1024 * 1024  # rows are read and converted this many source bytes at a time


class CheckpointReader:
    """Reads named tensors or their row ranges from a folder's *.safetensors files.

    Use as a context manager (closes the memory-mapped handles). `key_for` maps a transformers
    parameter name to the stored key (with or without the base-model prefix).
    """

    def __init__(self, folder: Path, base_model_prefix: str = "model") -> None:
        self.folder = Path(folder)
        self.index = folder_tensor_index(self.folder)  # key -> (file, dtype name, shape)
        if not self.index:
            raise ModelError(
                f"model folder {folder} has no *.safetensors weights",
                "hetegen loads safetensors only; re-download or convert the model",
            )
        self.prefix = base_model_prefix
        self._stack = contextlib.ExitStack()
        self._handles: dict[Path, object] = {}
        self.bytes_read = 0

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._handles.clear()
        self._stack.close()

    def key_for(self, name: str) -> str | None:
        """The stored key for parameter `name`, trying with and without the base-model prefix,
        then a MoE router's older names (Mixtral's block_sparse_moe)."""
        for each in (name, *legacy_names(name)):
            candidates = [each]
            if self.prefix and each.startswith(self.prefix + "."):
                candidates.append(each[len(self.prefix) + 1 :])
            elif self.prefix:
                candidates.append(f"{self.prefix}.{each}")
            key = next((c for c in candidates if c in self.index), None)
            if key is not None:
                return key
        return None

    def shape(self, key: str) -> tuple[int, ...]:
        return self.index[key][2]

    def _handle(self, key: str):
        file = self.index[key][0]
        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = self._stack.enter_context(safe_open(str(file), framework="pt"))
            except Exception as exc:  # corrupt header, unreadable file
                raise ModelError(
                    f"cannot read {file} ({exc})", "the file may be corrupt; re-download or convert the model"
                ) from exc
            self._handles[file] = handle
        return handle

    def copy_rows(self, key: str, dest: torch.Tensor, start: int = 0) -> None:
        """Copy rows [start, start + len(dest)) of tensor `key` into `dest` (any device/dtype).

        Reads at most CHUNK_BYTES of source rows at a time, so the transient host memory is one
        chunk, not one tensor. 0-d and 1-d tensors are read whole.
        """
        shape = self.shape(key)
        rows = dest.shape[0] if dest.dim() else 1
        if tuple(dest.shape[1:]) != tuple(shape[1:]) or (dest.dim() and start + rows > shape[0]):
            raise ModelError(
                f"tensor {key} has shape {list(shape)}, which does not fit "
                f"rows [{start}, {start + rows}) of a {list(dest.shape)} destination",
                "the checkpoint does not match its config.json",
            )
        if dest.dim() <= 1:  # norms, biases: small, read whole
            whole = self._handle(key).get_tensor(key)
            self._copy(dest, whole[start : start + rows] if dest.dim() else whole)
            return
        sl = self._handle(key).get_slice(key)
        row_bytes = max(1, math.prod(shape[1:]) * _itemsize(self.index[key][1]))
        step = max(1, CHUNK_BYTES // row_bytes)
        for lo in range(0, rows, step):
            hi = min(rows, lo + step)
            self._copy(dest[lo:hi], sl[start + lo : start + hi])

    def raw(self, key: str) -> torch.Tensor:
        """Tensor `key` whole, as stored (quantized parts, small tensors), in memory of its own:
        safetensors may hand out views of its memory map, which closing the reader unmaps."""
        tensor = self._handle(key).get_tensor(key).clone()
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def read(self, key: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The whole tensor `key` as a new tensor of `dtype` on `device`, filled chunk by chunk."""
        dest = torch.empty(self.shape(key), dtype=dtype, device=device)
        self.copy_rows(key, dest)
        return dest

    def _copy(self, dest: torch.Tensor, src: torch.Tensor) -> None:
        with torch.no_grad():
            dest.copy_(src)
        self.bytes_read += src.numel() * src.element_size()


def _itemsize(dtype_name: str) -> int:
    """Bytes per element of a stored dtype (4 when the name is unknown)."""
    return DTYPES[dtype_name].itemsize if dtype_name in DTYPES else 4
