"""Model specs: the tensors a checkpoint must hold, per architecture, agree with what
transformers builds; linears and sizes follow the config."""

from __future__ import annotations

import json

import pytest
import torch

from hetegen_cli.core.errors import ModelError
from hetegen_cli.models.architecture.spec import spec_from_config
from hetegen_cli.models.loading.meta import meta_model
from hetegen_cli.models.shapes.presets import preset_config, preset_names


@pytest.mark.parametrize("name", preset_names())
def test_expected_tensors_equal_the_transformers_model(name, tmp_path):
    """For every preset (2 layers, on the meta device): spec.tensors is exactly the model's
    state_dict, less a tied LM head."""
    config = {**preset_config(name), "num_hidden_layers": 2}
    if "layer_types" in config:  # one per layer
        config["layer_types"] = config["layer_types"][:2]
    spec = spec_from_config(config, name)
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = meta_model(tmp_path, torch.float16)
    built = {
        k: tuple(t.shape)
        for k, t in model.state_dict().items()
        if not (spec.tie_word_embeddings and k == "lm_head.weight")
    }
    assert built == spec.tensors
    linear_bytes = sum(lin.weight_bytes for lin in spec.linears)
    experts = sum(x.weight_bytes for x in spec.experts)  # MoE models' routed experts
    assert spec.total_weight_bytes == spec.fixed_bytes + linear_bytes + experts + (
        0 if spec.tie_word_embeddings else spec.lm_head.weight_bytes
    )
    assert spec.total_weight_bytes == spec.parameter_count * spec.dtype_bytes


@pytest.mark.parametrize(
    "variant",
    [
        {"model_type": "opt", "do_layer_norm_before": False},
        {"model_type": "opt", "word_embed_proj_dim": 32},
        {"model_type": "opt", "enable_bias": False},
        {"model_type": "llama", "attention_bias": True, "mlp_bias": True},
        {"model_type": "llama", "tie_word_embeddings": True},
        {"model_type": "mistral"},
        {"model_type": "qwen2"},
    ],
)
def test_architecture_variants(variant, tmp_path):
    base = preset_config("opt-125m" if variant["model_type"] == "opt" else "llama-2-7b")
    config = {
        **base,
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2 if variant["model_type"] != "opt" else None,
        "intermediate_size": 136,
        "ffn_dim": 200,
        "vocab_size": 320,
        **variant,
    }
    config = {k: v for k, v in config.items() if v is not None}
    spec = spec_from_config(config, "variant")
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = meta_model(tmp_path, torch.float32)
    built = {
        k: tuple(t.shape)
        for k, t in model.state_dict().items()
        if not (spec.tie_word_embeddings and k == "lm_head.weight")
    }
    assert built == spec.tensors


@pytest.mark.parametrize(
    "edit, field",
    [
        ({"hidden_size": "64"}, "hidden_size"),
        ({"num_attention_heads": 0}, "num_attention_heads"),
        ({"intermediate_size": None}, "intermediate_size"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"rope_theta": "big"}, "rope_theta"),
        ({"hidden_act": "magic"}, "hidden_act"),
        ({"torch_dtype": "int8"}, "torch_dtype"),
        ({"model_type": "gpt2"}, "gpt2"),
    ],
)
def test_bad_config_fields_are_named(edit, field):
    config = {**preset_config("llama-2-7b"), **edit}
    with pytest.raises(ModelError, match=field):
        spec_from_config(config, "bad")
