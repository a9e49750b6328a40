"""The one atomic writer: no partial file on error, the usual file mode, text and bytes."""

from __future__ import annotations

import os

import pytest

from hetegen_cli.core.jsonio import atomic_write


def test_atomic_write_leaves_no_partial_file_on_error(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    target = folder / "doc.json"
    target.write_text("old")
    with pytest.raises(TypeError):
        atomic_write(target, 12345)  # not text: fails while writing
    assert target.read_text() == "old"
    assert [p.name for p in folder.iterdir()] == ["doc.json"]  # no temp file left
    atomic_write(target, "new")
    assert target.read_text() == "new"
    assert oct(os.stat(target).st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode


def test_atomic_write_takes_bytes_with_the_same_guarantees(tmp_path):
    folder = tmp_path / "out"
    target = folder / "plot.png"
    atomic_write(target, b"\x89PNG\r\n")
    assert target.read_bytes() == b"\x89PNG\r\n"
    assert os.stat(target).st_mode & 0o777 != 0o600
    assert [p.name for p in folder.iterdir()] == ["plot.png"]
