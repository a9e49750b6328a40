"""Loading a stock transformers model and its tokenizer from a folder; dtype rules; load errors."""

from __future__ import annotations

import pytest

from hetegen_cli.core.errors import ModelError
from hetegen_cli.models.loading.loader import load_model, load_tokenizer, resolve_dtype
from hetegen_cli.models.loading.source import resolve_model


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


def test_loader_maps_corrupt_weights_to_model_error(tiny_copy):
    """Without resolve_model's header checks, the loader itself still fails cleanly."""
    (tiny_copy / "model.safetensors").write_bytes(b"\x08" + bytes(15) + b"garbage!")
    with pytest.raises(ModelError, match="cannot load the weights"):
        load_model(tiny_copy)
