"""The fused decode steps of attention, of a whole decoder layer and of the whole model
(models.formats.fused, hetegen_attention_decode): an attention module in one kernel call at
one token, a pre-norm layer in one Python call, the model's layers called straight, against
transformers' own forwards on the same quantized weights, for each form they take; anything
else keeps transformers' forward."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM

from hetegen_cli.models.formats import cpu_kernels, fused
from hetegen_cli.models.formats.quant import QuantLinear, quantize
from hetegen_cli.models.loading.cache import cache_keyword, new_cache
from hetegen_cli.models.loading.quantized_loader import fuse_for_decode
from tests.tiny_models import TINY_DECODER, greedy_steps

pytestmark = pytest.mark.skipif(cpu_kernels.kernels() is None, reason="hetegen's CPU kernels are unavailable")

COMMON = TINY_DECODER
#: model type -> (config extras, attentions fused, decoder layers fused): GQA (llama), q/k/v
#: biases (qwen2), q/k norms per head (qwen3), over the whole projection (olmoe, whose MoE
#: layers are not pre-norm MLP layers), Gemma's (1 + w) norms and query_pre_attn_scalar with
#: one sliding layer left to transformers (gemma3_text, four norms a layer)
ARCHS = {
    "llama": ({}, 2, 2),
    "qwen2": ({}, 2, 2),
    "qwen3": ({"head_dim": 16}, 2, 2),
    "olmoe": ({"num_experts": 4, "num_experts_per_tok": 2}, 2, 0),
    "gemma3_text": (
        {
            "head_dim": 16,
            "query_pre_attn_scalar": 24,
            "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention"],
        },
        1,
        0,
    ),
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
KW = cache_keyword(LlamaForCausalLM)  # transformers < 5.2x: past_key_values


def quantized_attention_model(model_type: str, fmt: str = "int4") -> torch.nn.Module:
    """A tiny random model whose attention projections and dense MLPs are QuantLinears
    (biases kept)."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **COMMON, **ARCHS[model_type][0])
    model = AutoModelForCausalLM.from_config(config).eval()
    for layer in model.model.layers:
        attn = layer.self_attn
        parts = [(attn, n) for n in PROJECTIONS]
        parts += [(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj") if hasattr(layer.mlp, n)]
        for owner, name in parts:
            linear = getattr(owner, name)
            setattr(owner, name, QuantLinear(quantize(linear.weight.detach(), fmt, 32), linear.bias))
        with torch.no_grad():  # norms away from their initial 1 (or 0), so that a wrong shift shows
            for norm in (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)):
                if norm is not None:
                    norm.weight.add_(0.3 * torch.randn(norm.weight.shape))
    return model


def taken(model) -> int:
    """Fused attention steps taken (inside fused layers too)."""
    return sum(getattr(layer.self_attn.forward, "taken", 0) for layer in model.model.layers)


def layers_taken(model) -> int:
    return sum(getattr(layer.forward, "taken", 0) for layer in model.model.layers)


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_fused_attention_gives_transformers_logits(model_type):
    reference = quantized_attention_model(model_type)
    model = quantized_attention_model(model_type)
    fusions = fuse_for_decode(model)
    assert (fusions.attentions, fusions.layers) == ARCHS[model_type][1:] and fusions.rejected == 0
    assert fusions.model == (fusions.layers == 2)  # every layer fused: the model step too
    prompt = [5, 9, 11, 17, 3]
    want_tokens, want = greedy_steps(reference, new_cache(reference, 32), prompt, 10)
    got_tokens, got = greedy_steps(model, new_cache(model, 32), prompt, 10)
    assert taken(model) == 10 * fusions.attentions  # every decode step of every fused attention
    assert layers_taken(model) == 10 * fusions.layers
    assert got_tokens == want_tokens
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


@pytest.mark.parametrize("threads", [1, 2])
def test_a_long_cache_shared_by_threads_gives_transformers_logits(threads):
    """Wide enough for the kernel's threads to share the heads (four query heads on each KV
    head) and 300 positions in the cache: transformers' logits and tokens, at one thread and
    two (the tiny models above are below the kernel's work threshold for a second thread)."""
    wide = {**COMMON, "hidden_size": 512, "intermediate_size": 256, "num_attention_heads": 8}
    wide |= {"num_key_value_heads": 2, "max_position_embeddings": 512}

    def build():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **wide)).eval()
        for layer in model.model.layers:
            for name in PROJECTIONS:
                linear = getattr(layer.self_attn, name)
                setattr(layer.self_attn, name, QuantLinear(quantize(linear.weight.detach(), "int4", 32)))
        return model

    reference, model = build(), build()
    assert fuse_for_decode(model).attentions == 2
    prompt = [int(t) for t in torch.randint(4, 128, (300,))]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        want_tokens, want = greedy_steps(reference, new_cache(reference, 310), prompt, 4)
        got_tokens, got = greedy_steps(model, new_cache(model, 310), prompt, 4)
    finally:
        torch.set_num_threads(before)
    assert taken(model) == 4 * 2 and got_tokens == want_tokens
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_fused_attention_grows_a_full_cache_and_keeps_its_past():
    """Room for 7 positions, 12 used: the step makes room the way the cache's own update does."""
    reference, model = quantized_attention_model("llama"), quantized_attention_model("llama")
    fuse_for_decode(model)
    want_tokens, want = greedy_steps(reference, new_cache(reference, 7), [5, 9, 11], 9)
    got_tokens, got = greedy_steps(model, new_cache(model, 7), [5, 9, 11], 9)
    assert got_tokens == want_tokens and taken(model) == 18 and layers_taken(model) == 18
    torch.testing.assert_close(got[-1], want[-1], rtol=1e-4, atol=1e-5)


def test_a_plain_cache_gets_transformers_forward():
    """A cache layer that cannot reserve room (transformers' DynamicCache): the module's own
    forward, and the same tokens."""
    reference, model = quantized_attention_model("llama"), quantized_attention_model("llama")
    fuse_for_decode(model)
    want, _ = greedy_steps(reference, DynamicCache(config=reference.config), [5, 9, 11], 6)
    assert greedy_steps(model, DynamicCache(config=model.config), [5, 9, 11], 6)[0] == want
    assert taken(model) == 0 and layers_taken(model) == 0


def test_a_mask_or_moved_weights_get_transformers_forward():
    model = quantized_attention_model("llama")
    fuse_for_decode(model)
    attn = model.model.layers[0].self_attn
    cache = new_cache(model, 16)
    greedy_steps(model, cache, [5, 9, 11], 0)  # the prompt: transformers' forward fills the cache
    x = torch.randn(1, 1, COMMON["hidden_size"])
    rope = model.model.rotary_emb(x, torch.tensor([[3]]))
    with torch.inference_mode():
        mask = torch.zeros(1, 1, 1, 4)  # padding or a window: transformers applies it
        call = dict(hidden_states=x, position_embeddings=rope, attention_mask=mask, **{KW: cache})
        want = LlamaAttention.forward(attn, **call)
        cache.crop(-1)
        got = attn(**call)
        assert torch.equal(got[0], want[0])
        assert attn.forward.taken == 0
        attn._apply(lambda t: t.clone())  # what .to() does: the described addresses are stale
        attn(hidden_states=x, position_embeddings=rope, attention_mask=None, **{KW: cache})
        assert attn.forward.taken == 0


class DoubledAttention(LlamaAttention):
    """Shaped like LLaMA's attention, computing something else."""

    def forward(self, *args, **kwargs):
        out, weights = super().forward(*args, **kwargs)
        return 2 * out, weights


def test_an_attention_that_computes_something_else_is_rejected():
    model = quantized_attention_model("llama")
    for layer in model.model.layers:
        old = layer.self_attn
        layer.self_attn = DoubledAttention(model.config, old.layer_idx)
        layer.self_attn.load_state_dict(old.state_dict(), strict=False)
        for name in PROJECTIONS:
            setattr(layer.self_attn, name, getattr(old, name))
    fusions = fuse_for_decode(model)
    assert fusions.attentions == 0 and fusions.rejected == 2
    assert all("forward" not in vars(layer.self_attn) for layer in model.model.layers)


class PostNormLayer(LlamaDecoderLayer):
    """A LLaMA layer's parts, put together another way (norms after the residual adds)."""

    def forward(self, hidden_states, **kwargs):
        kwargs.pop("position_ids", None), kwargs.pop("use_cache", None)
        h = self.input_layernorm(hidden_states + self.self_attn(hidden_states=hidden_states, **kwargs)[0])
        return self.post_attention_layernorm(h + self.mlp(h))


def test_a_layer_that_puts_its_parts_together_otherwise_is_rejected():
    model = quantized_attention_model("llama")
    for i, old in enumerate(model.model.layers):
        layer = PostNormLayer(model.config, i)
        for name in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"):
            setattr(layer, name, getattr(old, name))
        model.model.layers[i] = layer
    fusions = fuse_for_decode(model)
    assert (fusions.attentions, fusions.layers, fusions.rejected) == (2, 0, 2)
    assert all("forward" not in vars(layer) for layer in model.model.layers)


def test_a_fused_layer_hands_a_masked_step_to_its_own_forward():
    model = quantized_attention_model("llama")
    fuse_for_decode(model)
    layer = model.model.layers[0]
    cache = new_cache(model, 16)
    greedy_steps(model, cache, [5, 9, 11], 0)
    x = torch.randn(1, 1, COMMON["hidden_size"])
    call = dict(
        attention_mask=torch.zeros(1, 1, 1, 4),
        position_embeddings=model.model.rotary_emb(x, torch.tensor([[3]])),
        **{KW: cache},
    )
    with torch.inference_mode():
        want = LlamaDecoderLayer.forward(layer, x, **call)
        cache.crop(-1)
        assert torch.equal(layer(x, **call), want)
    assert layer.forward.taken == 0


def test_attention_is_fused_only_with_a_cache_to_check_it_on():
    model = quantized_attention_model("llama")
    assert fused.fuse_model(model).attentions == 0
    both = fuse_for_decode(model)
    assert (both.attentions, both.layers, both.model) == (2, 2, 1)
    assert fuse_for_decode(model) == fused.Fusions()  # fused already: left as it is


def test_int8_projections_fuse_too():
    reference, model = quantized_attention_model("qwen3", "int8"), quantized_attention_model("qwen3", "int8")
    assert fuse_for_decode(model).attentions == 2
    want_tokens, want = greedy_steps(reference, new_cache(reference, 32), [5, 9, 11], 6)
    got_tokens, got = greedy_steps(model, new_cache(model, 32), [5, 9, 11], 6)
    assert got_tokens == want_tokens and taken(model) == 12
    torch.testing.assert_close(got[-1], want[-1], rtol=1e-4, atol=1e-5)


def test_the_model_step_keeps_the_signature_and_hands_other_calls_to_the_model():
    """Callers inspect model.forward (run.generate asks for logits_to_keep and the cache's
    keyword): the fused step shows the model's own signature. A prompt, a mask or more than
    one token go to the model's own forward."""
    import inspect

    from hetegen_cli.run.generate import _supports_logits_to_keep

    reference, model = quantized_attention_model("qwen3"), quantized_attention_model("qwen3")
    own_params = inspect.signature(model.forward).parameters
    assert fuse_for_decode(model).model == 1
    assert "forward" in vars(model) and inspect.signature(model.forward).parameters == own_params
    assert _supports_logits_to_keep(model)
    cache, want_cache = new_cache(model, 32), new_cache(reference, 32)
    with torch.inference_mode():
        ids = torch.tensor([[5, 9, 11]])
        got = model(input_ids=ids, use_cache=True, **{KW: cache}).logits  # a prompt: own forward
        want = reference(input_ids=ids, use_cache=True, **{KW: want_cache}).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        step = torch.tensor([[7]])
        mask = torch.ones(1, 4, dtype=torch.long)
        got = model(input_ids=step, attention_mask=mask, use_cache=True, **{KW: cache}).logits
        want = reference(input_ids=step, attention_mask=mask, use_cache=True, **{KW: want_cache}).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert model.forward.taken == 0
        got = model(input_ids=torch.tensor([[3]]), use_cache=True, **{KW: cache}, logits_to_keep=1)
        want = reference(input_ids=torch.tensor([[3]]), use_cache=True, **{KW: want_cache}, logits_to_keep=1)
        assert model.forward.taken == 1 and got.logits.shape == want.logits.shape
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)
