"""Synthetic checkpoints (streamed safetensors writer) and the static layer-split baseline."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from hetegen_cli.errors import ModelError
from hetegen_cli.layer_split import apply_layer_split, decoder_layers
from hetegen_cli.synthetic import RandomPool, tensor_shapes, write_safetensors_streaming


def test_streaming_writer_round_trips_through_safetensors(tmp_path):
    shapes = [("a.weight", (33, 7)), ("b.bias", (5,)), ("c.norm.weight", (8,))]
    pool = RandomPool(torch.Generator().manual_seed(1), torch.bfloat16)
    made = {}

    def make(name, shape):
        made[name] = pool.sample("bias" if name.endswith("bias") else
                                 "norm" if "norm" in name else "weight", shape)
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
    from hetegen_cli.presets import preset_config

    names = dict(tensor_shapes(preset_config("opt-125m")))
    assert names["model.decoder.layers.0.fc1.weight"] == (3072, 768)
    assert "lm_head.weight" not in names  # tied to the embeddings, as save_pretrained does


def test_build_synthetic_model_is_loadable_and_cached(tmp_path):
    from transformers import AutoModelForCausalLM

    from hetegen_cli.model_spec import spec_from_folder
    from hetegen_cli.synthetic import build_synthetic_model

    folder = build_synthetic_model("opt-125m", "float16", tmp_path)
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "float16"
    assert spec_from_folder(folder).dtype == "float16"
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert build_synthetic_model("opt-125m", "float16", tmp_path) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert not any(p.is_meta for p in model.parameters())
    with pytest.raises(ModelError):
        build_synthetic_model("opt-7b", "float16", tmp_path)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_opt_dir"])
@pytest.mark.parametrize("gpu_layers", [0, 1, 2])
def test_layer_split_matches_plain_greedy_tokens(fixture, gpu_layers, request):
    from transformers import AutoModelForCausalLM

    folder = request.getfixturevalue(fixture)
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    apply_layer_split(model, gpu_layers, torch.device("cpu"), torch.float32, torch.float32)
    assert model.hetegen_layer_split == {"gpu_layers": gpu_layers, "cpu_layers": 2 - gpu_layers}
    ids = torch.tensor([[5, 17, 42, 9, 100]])
    expected = reference.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), expected)


def test_layer_split_casts_cpu_layers_to_the_cpu_dtype(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    apply_layer_split(model, 1, torch.device("cpu"), torch.float32, torch.bfloat16)
    layers = decoder_layers(model)
    assert next(layers[0].parameters()).dtype == torch.float32
    assert next(layers[1].parameters()).dtype == torch.bfloat16
    with torch.inference_mode():
        out = model(torch.tensor([[5, 6, 7]]))
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()


def test_decoder_layers_refuses_unknown_models():
    with pytest.raises(ModelError):
        decoder_layers(torch.nn.Linear(2, 2))


def test_layer_split_never_moves_cpu_layers_through_the_device(tiny_opt_dir, monkeypatch):
    """CPU layers must not visit the device while the rest moves (a big model would not fit)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_opt_dir).eval()
    cpu_layer = decoder_layers(model)[1]
    seen = []
    original = torch.nn.Module._apply  # .to() recurses into children through _apply

    def spy(self, *args, **kwargs):
        seen.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "_apply", spy)
    apply_layer_split(model, 1, torch.device("cpu"), torch.float32, torch.bfloat16)
    assert model in seen                      # the rest moved in one call
    assert decoder_layers(model)[1] is cpu_layer
    assert seen.count(cpu_layer) == 1         # only its own move to the CPU dtype
