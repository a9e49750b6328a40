"""Resolving --model: folders, presets, hub ids, the default; every kind of bad path or folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hetegen_cli.core.errors import ModelError
from hetegen_cli.models.loading import source as model_source
from hetegen_cli.models.loading.source import resolve_model
from tests.helpers import assert_error, run_quick

# ------------------------------------------------------------------------------- good paths


def test_missing_model_path(tmp_path):
    assert_error(run_quick("--model", str(tmp_path / "nope")), "does not exist")


def test_unreadable_folder(tiny_copy, monkeypatch):
    if os.geteuid() == 0:  # root reads everything; simulate the permission check failing
        real = os.access
        monkeypatch.setattr(
            model_source.os, "access", lambda p, *a, **k: False if Path(p) == tiny_copy else real(p, *a, **k)
        )
    else:
        tiny_copy.chmod(0)
    try:
        assert_error(run_quick("--model", str(tiny_copy)), "not readable", "permissions")
    finally:
        tiny_copy.chmod(0o755)


def test_folder_with_only_pickle_weights(tiny_copy):
    for file in tiny_copy.glob("*.safetensors"):
        file.rename(file.with_name("pytorch_model.bin"))
    assert_error(run_quick("--model", str(tiny_copy)), "no *.safetensors", "never loads")


def test_corrupt_safetensors(tiny_copy):
    (tiny_copy / "model.safetensors").write_bytes(os.urandom(4096))
    assert_error(run_quick("--model", str(tiny_copy)), "not a valid safetensors file")


def test_truncated_safetensors(tiny_copy):
    weights = tiny_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert_error(run_quick("--model", str(tiny_copy)), "truncated")


def test_missing_tokenizer(tiny_copy):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tiny_copy / name).unlink()
    assert_error(run_quick("--model", str(tiny_copy)), "no tokenizer files")


def test_unknown_short_name_suggests_close_match():
    assert_error(run_quick("--model", "opt-6.7"), "unknown model 'opt-6.7'", "did you mean opt-6.7b")


def test_uncached_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_quick("--model", "hetegen-test/not-a-real-model")
    assert_error(result, "not in the local cache and the hub cannot be reached", "download")


def test_preset_without_cached_weights_offline():
    assert_error(run_quick("--model", "opt-6.7b"), "'facebook/opt-6.7b' is not in the local cache")


def test_non_gguf_file(tmp_path):
    file = tmp_path / "weights.txt"
    file.write_text("hello")
    assert_error(run_quick("--model", str(file)), "not a .gguf file")


# ------------------------------------------------------------------------------------- GGUF


def test_missing_relative_path_under_an_existing_folder_is_a_path_error(tmp_path, monkeypatch):
    """`models/opt` where ./models exists is a missing path, not an uncached hub id."""

    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model("models/opt", need_weights=True)
    with pytest.raises(ModelError, match="not in the local cache"):
        resolve_model("someorg/somemodel", need_weights=True)


# ---------------------------------------------------------------------------------- imports


def test_importing_source_imports_no_torch():
    """--model resolution needs torch only to convert or quantize (docs/architecture.md)."""
    code = "import sys, hetegen_cli.models.loading.source; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_resolving_a_converted_gguf_imports_no_transformers(tiny_gguf):
    """A cold `hetegen run` paid ~1 s importing transformers to resolve a model whose
    conversion, GGUF types and layout are all cached; resolving now reads only those files
    (transformers' model code is imported once, by run.builders, and timed as import)."""
    path = tiny_gguf[0]
    code = (
        "import sys\n"
        "from hetegen_cli.models.loading.source import resolve_model\n"
        f"ref = resolve_model({str(path)!r}, need_weights=True, quant='auto')\n"
        "print(ref.spec.quant, sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))\n"
    )
    env = {**os.environ, "HETEGEN_HOME": str(path.parent / "home")}  # where tiny_gguf converted it
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["int4", "[]"]
