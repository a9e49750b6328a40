"""Property: a safetensors file with a damaged header (or damaged length, or cut short) is
either refused with ModelError, or truly readable: the safetensors library then opens it
and reads every tensor."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save

from hetegen_cli.core.errors import ModelError
from hetegen_cli.models.shapes.headers import folder_tensor_index, read_safetensors_header
from tests.mutations import mutated, property_settings

RAW = save(
    {
        "model.embed.weight": torch.arange(12, dtype=torch.float32).view(3, 4),
        "model.norm.weight": torch.ones(4, dtype=torch.bfloat16),
        "model.empty": torch.zeros(0, dtype=torch.float16),
        "model.ids": torch.arange(3, dtype=torch.int64),
    },
    metadata={"format": "pt"},
)
(LENGTH,) = struct.unpack("<Q", RAW[:8])
HEADER = json.loads(RAW[8 : 8 + LENGTH])
DATA = RAW[8 + LENGTH :]
EXAMPLES = 400


def _file(header: object, data: bytes = DATA, length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def _check(path) -> None:
    try:
        read_safetensors_header(path)
        folder_tensor_index(path.parent)
    except ModelError:
        return
    with safe_open(str(path), framework="pt") as handle:  # accepted: really readable
        for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
            handle.get_tensor(key)


@property_settings(EXAMPLES)
@given(header=mutated(HEADER))
def test_damaged_headers_are_refused_or_readable(header, tmp_path_factory):
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    path.write_bytes(_file(header))
    _check(path)


@property_settings(100)
@given(
    cut=st.integers(0, len(RAW)),
    length=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    extra=st.binary(max_size=16),
)
def test_damaged_lengths_and_truncations_are_refused_or_readable(cut, length, extra, tmp_path_factory):
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    data = _file(HEADER, length=length)[:cut] + extra if length is not None else RAW[:cut] + extra
    path.write_bytes(data)
    _check(path)


def test_the_undamaged_file_reads():
    assert read_safetensors_header is not None
    with pytest.raises(ModelError, match="list"):
        import tempfile
        from pathlib import Path

        folder = Path(tempfile.mkdtemp())
        (folder / "m.safetensors").write_bytes(_file([1, 2]))
        read_safetensors_header(folder / "m.safetensors")
