"""The growing KV cache (models.loading.cache): transformers' logits, no copy of the past."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache
from transformers.models.llama.modeling_llama import LlamaForCausalLM

from hetegen_cli.models.loading import cache as cache_mod
from hetegen_cli.models.loading.cache import cache_keyword, new_cache

KW = cache_keyword(LlamaForCausalLM)  # transformers < 5.2x: past_key_values
COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny(model_type: str, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **COMMON, **extra)
    return AutoModelForCausalLM.from_config(config).eval()


def steps(model, cache, prompt: list[int], n: int, crop_at: int | None = None) -> list[torch.Tensor]:
    """Logits [V] of a prefill and n greedy one-token steps (cache.crop(-2) after step crop_at)."""
    out = []
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt]), use_cache=True, **{KW: cache}).logits[0, -1]
        out.append(logits)
        for i in range(n):
            if i == crop_at:
                cache.crop(-2)
            token = int(logits.argmax())
            logits = model(input_ids=torch.tensor([[token]]), use_cache=True, **{KW: cache}).logits[0, -1]
            out.append(logits)
    return out


@pytest.mark.parametrize("capacity", [None, 7, 64])
def test_growing_cache_gives_dynamic_cache_logits(monkeypatch, capacity):
    """Room for the whole run (64), too little (7: grows once), none given (doubles from 2)."""
    monkeypatch.setattr(cache_mod, "MIN_ROOM", 2)
    model = tiny("llama")
    want = steps(model, DynamicCache(config=model.config), [5, 9, 11], 12)
    got = steps(model, new_cache(model, capacity=capacity), [5, 9, 11], 12)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_growing_cache_writes_in_place_when_it_has_room():
    model = tiny("llama")
    cache = new_cache(model, capacity=20)
    steps(model, cache, [5, 9, 11], 1)
    first = [layer.keys.data_ptr() for layer in cache.layers]
    steps(model, cache, [3], 5)  # the cache keeps its buffers: same addresses
    assert [layer.keys.data_ptr() for layer in cache.layers] == first
    assert cache.get_seq_length() == 3 + 1 + 1 + 5
    assert all(layer.keys.shape[-2] == 10 for layer in cache.layers)


def test_crop_is_adopted():
    model = tiny("llama")
    want = steps(model, DynamicCache(config=model.config), [5, 9, 11, 4], 6, crop_at=3)
    got = steps(model, new_cache(model, capacity=32), [5, 9, 11, 4], 6, crop_at=3)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_sliding_window_layers_stay_transformers_own():
    from transformers.cache_utils import DynamicLayer

    layer_types = ["sliding_attention", "full_attention"]
    model = tiny("gemma3_text", head_dim=8, sliding_window=4, layer_types=layer_types)
    cache = new_cache(model, capacity=16)
    kinds = [type(layer).__name__ for layer in cache.layers]
    assert kinds[0] != "GrowingLayer" and kinds[1] == "GrowingLayer"
    assert isinstance(cache.layers[1], DynamicLayer)
    want = steps(model, DynamicCache(config=model.config), [5, 9, 11, 4, 7, 8], 8)
    got = steps(model, cache, [5, 9, 11, 4, 7, 8], 8)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
