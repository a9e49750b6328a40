"""Synthetic checkpoints: the streaming safetensors writer, shapes, a cached loadable folder."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from hetegen_cli.core.errors import ModelError
from hetegen_cli.models.formats.synthetic import RandomPool, tensor_shapes, write_safetensors_streaming


def test_streaming_writer_round_trips_through_safetensors(tmp_path):
    shapes = [("a.weight", (33, 7)), ("b.bias", (5,)), ("c.norm.weight", (8,))]
    pool = RandomPool(torch.Generator().manual_seed(1), torch.bfloat16)
    made = {}

    def make(name, shape):
        made[name] = pool.sample(
            "bias" if name.endswith("bias") else "norm" if "norm" in name else "weight", shape
        )
        return made[name]

    path = tmp_path / "x.safetensors"
    write_safetensors_streaming(path, shapes, torch.bfloat16, make)
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == sorted(n for n, _ in shapes)
        for name, shape in shapes:
            t = f.get_tensor(name)
            assert tuple(t.shape) == shape and t.dtype == torch.bfloat16
            assert torch.equal(t, made[name])
            assert t.abs().sum() > 0  # never all-zero data
    norm = made["c.norm.weight"].float()
    assert (norm - 1).abs().max() < 0.2  # norm weights sit around 1


def test_tensor_shapes_follow_transformers_and_skip_tied_head():
    from hetegen_cli.models.shapes.presets import preset_config

    names = dict(tensor_shapes(preset_config("opt-125m")))
    assert names["model.decoder.layers.0.fc1.weight"] == (3072, 768)
    assert "lm_head.weight" not in names  # tied to the embeddings, as save_pretrained does


def test_build_synthetic_model_is_loadable_and_cached(tmp_path):
    from transformers import AutoModelForCausalLM

    from hetegen_cli.models.architecture.folder import spec_from_folder
    from hetegen_cli.models.formats.synthetic import build_synthetic_model

    folder = build_synthetic_model("opt-125m", "float16", tmp_path)
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "float16"
    spec, warnings = spec_from_folder(folder)
    assert spec.dtype == "float16" and warnings == ()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert build_synthetic_model("opt-125m", "float16", tmp_path) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert not any(p.is_meta for p in model.parameters())
    with pytest.raises(ModelError):
        build_synthetic_model("opt-7b", "float16", tmp_path)
