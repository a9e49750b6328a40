"""Property: a damaged config.json is either accepted or refused with ModelError; an accepted
one gives a spec whose tensor list transformers agrees with, and the model builds on meta."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hetegen_cli.core.errors import ModelError
from hetegen_cli.models.architecture.spec import spec_from_config
from hetegen_cli.models.loading.meta import meta_model
from tests.mutations import mutated, property_settings

LLAMA = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 136,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 320,
    "max_position_embeddings": 128,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}
OPT = {
    "model_type": "opt",
    "architectures": ["OPTForCausalLM"],
    "hidden_size": 64,
    "ffn_dim": 200,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 320,
    "max_position_embeddings": 128,
    "word_embed_proj_dim": 64,
    "do_layer_norm_before": True,
    "enable_bias": True,
    "activation_function": "relu",
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}
EXAMPLES = 150  # per source config


@pytest.mark.parametrize("source", [LLAMA, OPT], ids=["llama", "opt"])
@property_settings(EXAMPLES)
@given(data=st.data())
def test_damaged_configs_are_accepted_or_refused_with_model_error(source, data, tmp_path_factory):
    config = data.draw(mutated(source))
    try:
        spec = spec_from_config(config, "damaged")
    except ModelError:
        return
    assert spec.linears and spec.tensors
    folder = tmp_path_factory.mktemp("config")
    (folder / "config.json").write_text(json.dumps(config))
    try:
        model = meta_model(folder, torch.float32)
    except ModelError:
        return  # transformers refused it: a handled error with its reason
    built = {
        name: tuple(t.shape)
        for name, t in model.state_dict().items()
        if not (spec.tie_word_embeddings and name == "lm_head.weight")
    }
    assert built == spec.tensors
