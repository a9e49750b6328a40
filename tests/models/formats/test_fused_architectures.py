"""The decode fusions (models.formats.fused) never change what a model computes: across
decoder-only architectures transformers knows, each a tiny random model whose linears are
QuantLinears, the fused model's greedy tokens and logits equal the unfused model's, whatever
the fusions took or refused (partial or interleaved rotary, sliding windows, extra norms,
multipliers)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from hetegen_cli.models.formats import cpu_kernels
from hetegen_cli.models.formats.quant import QuantLinear, quantize
from hetegen_cli.models.loading.cache import new_cache
from hetegen_cli.models.loading.quantized_loader import fuse_for_decode
from tests.tiny_models import TINY_DECODER, greedy_steps

pytestmark = pytest.mark.skipif(cpu_kernels.kernels() is None, reason="hetegen's CPU kernels are unavailable")

COMMON = {**TINY_DECODER, "head_dim": 16, "pad_token_id": 0}
#: model types, with what sets them apart from LLaMA's decode step
ARCHS = [
    "glm",  # partial, interleaved rotary
    "glm4",  # the same, and norms after attention and MLP
    "granite",  # multipliers (1.0 by default)
    "mistral",  # a sliding window in the config
    "smollm3",  # no rotary on some layers
    "olmo2",  # q/k norms over the whole projection, norms after attention and MLP
    "phi3",  # fused qkv and gate_up projections
    "stablelm",  # LayerNorm, partial rotary
    "cohere",  # LayerNorm, interleaved rotary, parallel attention and MLP
    "gemma2",  # logit soft-capping, four norms a layer
    "helium",
    "exaone4",
    "arcee",  # a non-gated MLP
    "seed_oss",
    "hunyuan_v1_dense",
    "ministral",
]


def quantized(model_type: str, **extra) -> nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**COMMON, **extra})
    model = AutoModelForCausalLM.from_config(config).eval()
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and module.in_features % 32 == 0 and name != "lm_head":
            parent, leaf = name.rsplit(".", 1)
            weight = quantize(module.weight.detach(), "int4", 32)
            setattr(model.get_submodule(parent), leaf, QuantLinear(weight, module.bias))
    return model


def same_as_unfused(model_type: str, **extra):
    reference, model = quantized(model_type, **extra), quantized(model_type, **extra)
    fusions = fuse_for_decode(model)
    want_tokens, want = greedy_steps(reference, new_cache(reference, 32), [5, 9, 11], 6)
    got_tokens, got = greedy_steps(model, new_cache(model, 32), [5, 9, 11], 6)
    assert got_tokens == want_tokens
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
    return fusions


@pytest.mark.parametrize("model_type", ARCHS)
def test_fusions_leave_every_architecture_as_it_computes(model_type):
    same_as_unfused(model_type)


def test_a_layer_or_model_with_multipliers_is_left_to_transformers():
    """Granite scales the residual, the embedding and the logits: its attentions fuse, its
    layers and the model step fail their check."""
    fusions = same_as_unfused(
        "granite", residual_multiplier=0.5, embedding_multiplier=2.0, logits_scaling=3.0
    )
    assert fusions.attentions == 2 and fusions.layers == 0 and fusions.model == 0 and fusions.rejected >= 1
