"""Any decoder-only architecture transformers implements: the shapes derived from its own model
(models.architecture), and the engine's greedy tokens equal to transformers' `generate` on a
tiny random model of each tested architecture, under all-CPU, all-streamed and mixed plans on
the CPU stand-in and on the strict stand-in (CUDA's hazards on the CPU)."""

from __future__ import annotations

import pytest
import torch

from hetegen_cli.core.devices import CpuBackend
from hetegen_cli.core.errors import ModelError
from hetegen_cli.engine.hetero_model import load_hetero_model
from hetegen_cli.models.architecture.derive import derive_layout
from hetegen_cli.models.architecture.spec import spec_from_config
from hetegen_cli.models.loading.source import resolve_model
from hetegen_cli.models.shapes import presets
from hetegen_cli.models.shapes.config import TESTED_ARCHITECTURES
from hetegen_cli.plan.document import RuntimeSettings
from tests.engine.conftest import EXPERTS, PLANS, expert_placements, placements
from tests.engine.test_strict_backend import FP32, _generate
from tests.models.architecture.legacy_spec import legacy_spec
from tests.strict import StrictBackend
from tests.tiny_models import TINY_OPT, VOCAB_SIZE, build_tokenizer

PROMPT = [5, 17, 42, 99, 7, 250, 31, 64, 12]  # longer than the sliding windows below
NEW_TOKENS = 8
_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=112,  # not a multiple of 16
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
#: tiny configs; what is not the common shape is what the architecture needs to be itself
TINY = {
    "opt": TINY_OPT,
    "llama": dict(_COMMON, rope_scaling=None),
    "mistral": dict(_COMMON, sliding_window=4),
    "qwen2": dict(_COMMON),
    "qwen3": dict(_COMMON, head_dim=16),  # q/k norms
    "gemma2": dict(_COMMON, head_dim=16, sliding_window=4, final_logit_softcapping=30.0),
    "gemma3_text": dict(
        _COMMON, head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"]
    ),
    "phi3": dict(_COMMON),  # fused qkv_proj and gate_up_proj
    "olmo2": dict(_COMMON),
    "granite": dict(_COMMON, embedding_multiplier=2.0, logits_scaling=4.0, residual_multiplier=0.5),
    "smollm3": dict(_COMMON, no_rope_layers=[1, 0]),
    # mixture of experts (routed experts: engine.experts); widths not multiples of 16
    "qwen3_moe": dict(_COMMON, head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=40),
    "qwen2_moe": dict(
        _COMMON,
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=40,
        shared_expert_intermediate_size=96,
    ),
    "mixtral": dict(_COMMON, num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(_COMMON, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
}
#: Llama 3.1's rope scaling, checked on the llama model as a second config
LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def test_every_tested_architecture_has_a_tiny_config():
    assert set(TINY) == set(TESTED_ARCHITECTURES)


@pytest.mark.parametrize("name", presets.preset_names())
def test_the_derived_shapes_equal_the_hand_written_table_for_every_old_preset(name):
    config = presets.preset_config(name)
    if config["model_type"] not in ("opt", "llama", "mistral", "qwen2"):
        pytest.skip("the old table knew four architectures")
    derived, old = spec_from_config(config, name), legacy_spec(config, name)
    assert derived == old
    assert derived.tensors == old.tensors


def _tiny(arch: str, folder, extra: dict | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(arch, **{**TINY[arch], **(extra or {})})
    model = AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
    model.save_pretrained(folder, safe_serialization=True)
    build_tokenizer(folder)
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(PROMPT) :].tolist()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """arch -> (ModelRef, transformers' greedy tokens)."""
    out = {}
    for arch in TESTED_ARCHITECTURES:
        folder = tmp_path_factory.mktemp(arch)
        want = _tiny(arch, folder)
        out[arch] = (resolve_model(str(folder), need_weights=True), want)
    folder = tmp_path_factory.mktemp("llama31")
    want = _tiny("llama", folder, {"rope_scaling": LLAMA31_ROPE, "max_position_embeddings": 512})
    out["llama-3.1-rope"] = (resolve_model(str(folder), need_weights=True), want)
    return out


def _engine_tokens(ref, plan_name: str, backend) -> list[int]:
    plan = placements(ref.spec, PLANS[plan_name])
    experts = expert_placements(ref.spec, EXPERTS[plan_name])
    runtime = RuntimeSettings(**{**FP32.__dict__, "requires_gpu": plan_name != "all_cpu"})
    with load_hetero_model(ref, plan, runtime, backend, progress=False, experts=experts) as loaded:
        return _generate(loaded, PROMPT, NEW_TOKENS)


@pytest.mark.parametrize("arch", [*TESTED_ARCHITECTURES, "llama-3.1-rope"])
@pytest.mark.parametrize(
    "plan_name, backend",
    [
        ("all_cpu", "cpu"),
        ("all_streamed", "cpu"),
        ("mixed", "cpu"),
        ("all_streamed", "strict"),
        ("mixed", "strict"),
    ],
)
def test_greedy_tokens_equal_transformers_generate(tiny, arch, plan_name, backend):
    ref, want = tiny[arch]
    assert len(want) == NEW_TOKENS
    got = _engine_tokens(ref, plan_name, CpuBackend() if backend == "cpu" else StrictBackend())
    assert got == want


def test_fused_projections_are_planned_as_one_linear_each(tiny):
    spec = tiny["phi3"][0].spec
    roles = [lin.role for lin in spec.linears if lin.layer_index == 0]
    assert roles == ["qkv", "o", "gate_up", "down"]
    qkv = spec.linears[0]
    assert qkv.out_features == (4 + 2 * 2) * 16  # q heads + k and v heads, head_dim 16


def test_sliding_window_layers_cap_the_kv_cache(tiny):
    spec = tiny["gemma3_text"][0].spec
    assert spec.layer_types == ("sliding_attention", "full_attention") and spec.sliding_window == 4
    per_layer_token = 2 * spec.num_kv_heads * spec.head_dim * spec.dtype_bytes
    assert spec.kv_cache_bytes(100) == per_layer_token * (4 + 100)
    assert spec.kv_cache_bytes(3) == per_layer_token * (3 + 3)


def test_qwen3_q_and_k_norms_are_fixed_tensors(tiny):
    spec = tiny["qwen3"][0].spec
    assert "model.layers.0.self_attn.q_norm.weight" in spec.tensors
    assert all("norm" not in lin.name for lin in spec.linears)


@pytest.mark.parametrize(
    "config, reason",
    [
        ({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 320}, "Conv1D"),
        (
            {"model_type": "t5", "d_model": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 320},
            "causal LM",
        ),
        ({"model_type": "no-such-model"}, "does not know"),
    ],
)
def test_unsupported_models_are_refused_before_loading_with_the_reason(config, reason):
    config = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 320,
        **config,
    }
    with pytest.raises(ModelError, match=reason):
        spec_from_config(config, "x")


@pytest.mark.parametrize("arch", TESTED_ARCHITECTURES)
def test_linears_are_listed_in_the_order_the_forward_calls_them(arch):
    from transformers import AutoConfig

    config = AutoConfig.for_model(arch, **TINY[arch]).to_dict()
    layout = derive_layout(config, arch)
    assert layout["order"] == "forward"  # traced, not the modules' registration order
    first = [name.rsplit(".", 1)[-1] for name, layer, *_ in layout["linears"] if layer == 0]
    attention_out = {"o_proj", "out_proj"}
    qkv = {"q_proj", "k_proj", "v_proj", "qkv_proj"}
    assert max(first.index(n) for n in qkv if n in first) < min(
        first.index(n) for n in attention_out & set(first)
    )


#: four layers of mixed kinds where the architecture has kinds: sliding and global attention,
#: layers without rotary positions, a dense layer among mixture-of-experts ones
_KINDS = {
    "gemma3_text": dict(layer_types=["sliding_attention", "full_attention"] * 2),
    "smollm3": dict(no_rope_layers=[1, 0, 1, 1]),
    "qwen3_moe": dict(mlp_only_layers=[2]),
    "qwen2_moe": dict(mlp_only_layers=[2]),
}


@pytest.mark.parametrize("arch", TESTED_ARCHITECTURES)
def test_one_traced_layer_per_kind_lists_the_linears_as_tracing_every_layer_does(arch):
    from torch import nn
    from transformers import AutoConfig

    from hetegen_cli.models.architecture import derive

    config = AutoConfig.for_model(arch, **{**TINY[arch], "num_hidden_layers": 4, **_KINDS.get(arch, {})})
    model = derive.meta_causal_lm(config, arch, dtype=torch.float32)
    head = {id(model.get_output_embeddings())}
    head_name = next(n for n, m in model.named_modules() if id(m) in head)
    layers_name, _ = derive._decoder_layers(model, config, arch)
    experts = {rec[0] for rec in derive._experts(model, layers_name, config, arch)}
    every = derive._forward_order(model, head_name, experts)
    called: list[str] = []
    hooks = [
        m.register_forward_hook(lambda *_a, n=n: called.append(n))
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.startswith(f"{layers_name}.3.")
    ]
    per_kind = derive._forward_order(model, head_name, experts, layers_name)
    for h in hooks:
        h.remove()
    assert every is not None and per_kind == every
    layers = model.get_submodule(layers_name)
    two_kinds = (*_KINDS, "gemma2")  # gemma2 alternates sliding and global attention by default
    assert len({derive._layer_kind(layer) for layer in layers}) == (2 if arch in two_kinds else 1)
    assert called == []  # the last layer is of an earlier kind: answered, not run
    assert not any("forward" in vars(layer) for layer in layers)  # the patches are gone


#: parameter counts the model cards state (billions, as rounded there; Gemma 3's text decoder
#: without its 0.4B vision tower)
CARD_PARAMETERS = {
    "llama-3.1-8b": 8.03,
    "llama-3.1-70b": 70.6,
    "qwen2.5-7b": 7.61,
    "qwen2.5-14b": 14.7,
    "qwen2.5-32b": 32.5,
    "qwen2.5-72b": 72.7,
    "qwen3-8b": 8.2,
    "qwen3-14b": 14.8,
    "qwen3-32b": 32.8,
    "gemma-3-12b": 11.8,
    "gemma-3-27b": 27.0,
    "phi-4": 14.7,
    "mistral-small-24b": 23.6,
}


@pytest.mark.parametrize("name", sorted(CARD_PARAMETERS))
def test_new_presets_hold_the_parameters_their_model_cards_state_and_plan(name):
    from hetegen_cli.plan.request import PlanRequest
    from hetegen_cli.plan.solver import make_plan
    from tests.fakes import make_profile

    GiB = 2**30

    spec = spec_from_config(presets.preset_config(name), name)
    assert spec.parameter_count / 1e9 == pytest.approx(CARD_PARAMETERS[name], rel=0.015)
    plan = make_plan(
        spec,
        make_profile(ram_available=512 * GiB),
        PlanRequest(prompt_len=512, max_new_tokens=64, gpu_budget_bytes=12 * GiB),
    )
    assert plan.memory.gpu.total_bytes <= 12 * GiB
    assert plan.predictions.hetegen.decode_tokens_per_s > 0
    assert len(plan.placements) == len(spec.linears) + (0 if spec.tie_word_embeddings else 1) - (
        1 if plan.runtime.lm_head_on_gpu and not spec.tie_word_embeddings else 0
    )
