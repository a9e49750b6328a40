"""The engine's fixed costs in the cost model (plan.costmodel.fixed): the fit, and every strategy."""

from __future__ import annotations

import pytest

from hetegen_cli.models.architecture.spec import spec_from_config
from hetegen_cli.models.shapes.presets import preset_config
from hetegen_cli.plan.costmodel import fixed as oh
from hetegen_cli.plan.request import PlanRequest
from hetegen_cli.plan.solver import make_plan
from hetegen_cli.profile.document import EngineEntry, EngineModel, validate_profile
from tests.fakes import GB, make_profile
from tests.plan.engine_fakes import MODEL, TERMS, engine_section, with_engine

GiB = 1024**3


def test_nonnegative_fit_recovers_known_terms_and_never_goes_negative():
    rows = [[1.0, x, x * x] for x in (1.0, 2.0, 5.0, 9.0)]
    ys = [0.5 + 2 * x + 0.1 * x * x for x in (1.0, 2.0, 5.0, 9.0)]
    assert oh.nonnegative_fit(rows, ys) == pytest.approx([0.5, 2.0, 0.1], rel=1e-6)
    falling = [3.0 - 0.2 * x for x in (1.0, 2.0, 5.0, 9.0)]  # a negative slope: clamped to 0
    fit = oh.nonnegative_fit([[1.0, x] for x in (1.0, 2.0, 5.0, 9.0)], falling)
    assert fit[1] == 0.0 and fit[0] == pytest.approx(sum(falling) / 4)


def test_fit_entry_recovers_the_terms_it_was_made_from():
    entry = engine_section(devices=("cpu",), dtypes=("float32",))["entries"][0]
    costs = oh.fit_entry(EngineEntry.model_validate(entry), EngineModel.model_validate(MODEL))
    (pa, pc, pe, s0, s1), (da, db, ds0), sample, _ = TERMS["cpu"]
    assert costs.prefill.layer_s == pytest.approx(pa, rel=1e-6)
    assert costs.prefill.layer_token_s == pytest.approx(pc, rel=1e-6)  # per token x hidden unit
    assert costs.prefill.layer_pair_s == pytest.approx(pe, rel=1e-6)  # per token pair x query width
    assert costs.prefill.step_s == pytest.approx(
        s0, rel=1e-6
    ) and costs.prefill.step_token_s == pytest.approx(s1)
    assert costs.decode.layer_s == pytest.approx(da, rel=1e-6)
    assert costs.decode.layer_kv_s == pytest.approx(db, rel=1e-6)
    assert costs.decode.step_s == pytest.approx(ds0, rel=1e-6) and costs.sample_s_per_vocab == sample


def test_fixed_terms_scale_with_the_models_layers_and_context():
    profile = dict(make_profile(gpu=False), schema_version=2, engine=engine_section(devices=("cpu",)))
    o = oh.fixed_costs_from_profile(profile)
    small = spec_from_config(preset_config("opt-1.3b"), "opt-1.3b", dtype="float32")
    args = dict(prompt_len=128, max_new_tokens=32, batch=1)
    one = oh.fixed_s(o, "cpu", "float32", small, "decode", layers=1, outside=False, **args)
    all_layers = oh.fixed_s(
        o, "cpu", "float32", small, "decode", layers=small.num_layers, outside=False, **args
    )
    assert all_layers == pytest.approx(small.num_layers * one)
    longer = oh.fixed_s(
        o, "cpu", "float32", small, "decode", layers=1, outside=False, **dict(args, prompt_len=1024)
    )
    assert longer > one  # the KV cache grows with the context
    assert oh.fixed_s(o, "cuda", "float32", small, "decode", layers=1, **args) is None  # not measured


def _plans(engine: bool, **profile_over):
    base = dict(gpu=True, free=24 * GiB, total=24 * GiB, ram_available=256 * GiB)
    base.update(profile_over)
    profile = make_profile(**base)
    if engine:
        profile = with_engine(profile)
        validate_profile(profile)
    spec = spec_from_config(preset_config("llama-2-7b"), "llama-2-7b")
    req = PlanRequest(prompt_len=256, max_new_tokens=32, gpu_budget_bytes=6 * GiB)
    return make_plan(spec, profile, req)


def test_every_strategy_gets_the_fixed_terms():
    bare, full = _plans(False), _plans(True)
    assert oh.NO_ENGINE_NOTE in bare.notes and oh.NO_ENGINE_NOTE not in full.notes
    for key in ("hetegen", "offload", "layer_split", "cpu_only"):
        b, f = getattr(bare.predictions, key), getattr(full.predictions, key)
        for phase in ("prefill", "decode"):
            fixed = f.fixed.seconds(phase)
            assert fixed > 0, (key, phase)
            assert f.seconds(phase) == pytest.approx(f.linear.seconds(phase) + fixed)
        assert f.decode_tokens_per_s < b.decode_tokens_per_s, key
    # the CPU pays more per layer than the GPU here: the all-CPU strategy gains the most time
    gained = {k: getattr(full.predictions, k).fixed.decode_s_per_token for k in ("hetegen", "cpu_only")}
    assert gained["cpu_only"] > gained["hetegen"]


def test_a_profile_without_gpu_engine_costs_says_so():
    base = make_profile(gpu=True, free=24 * GiB, total=24 * GiB, ram_available=256 * GiB)
    profile = dict(base, schema_version=2, engine=engine_section(devices=("cpu",)))
    spec = spec_from_config(preset_config("llama-2-7b"), "llama-2-7b")
    plan = make_plan(spec, profile, PlanRequest(prompt_len=64, max_new_tokens=8, gpu_budget_bytes=6 * GiB))
    assert any("no engine costs measured on the GPU" in n for n in plan.notes)
    assert plan.predictions.cpu_only.fixed.decode_s_per_token > 0


def test_all_cpu_plans_count_the_inline_cost_per_linear():
    profile = with_engine(make_profile(gpu=False, cpu_dtypes={"float32": 20 * GB}, best="float32"))
    spec = spec_from_config(preset_config("opt-1.3b"), "opt-1.3b", dtype="float32")
    plan = make_plan(spec, profile, PlanRequest(prompt_len=64, max_new_tokens=8))
    h, c = plan.predictions.hetegen, plan.predictions.cpu_only
    per_linear = TERMS["cpu"][3]
    assert h.fixed.decode_s_per_token - c.fixed.decode_s_per_token == pytest.approx(
        len(plan.placements) * per_linear
    )


def _all_cpu(spec, quantized_entries: bool, moe: bool = False):
    """The all-CPU plan of `spec` on a profile whose GEMVs cost 30 us a call, with or without
    the engine section's quantized (int4) entries (`moe`: and the moe family's)."""
    profile = make_profile(
        gpu=False,
        cpu_call_s=30e-6,
        best="bfloat16",
        cpu_dtypes={"bfloat16": 20 * GB, "float32": 20 * GB},
        quant_bw={"int8": 16 * GB, "int4": 16 * GB},
    )
    profile = with_engine(profile, dtypes=("float32", "bfloat16"), quantized=quantized_entries, moe=moe)
    validate_profile(profile)
    return make_plan(spec, profile, PlanRequest(prompt_len=128, max_new_tokens=32, gpu_budget_bytes=0))


def _int4(name: str):
    return spec_from_config(preset_config(name), name, "bfloat16").quantized("int4", 32)


@pytest.mark.parametrize("name", ["llama-2-7b", "opt-1.3b"])
def test_a_quantized_models_cpu_decode_is_priced_from_the_quantized_entries_without_call_costs(name):
    """The int4 entries' decode terms hold the linears' calls: each linear (and the LM head)
    loses exactly its call cost, the fixed part is the int4 entry's terms, and the engine adds
    nothing per linear (it calls the plain model's modules). Prefill keeps its call costs."""
    spec = _int4(name)
    old, new = _all_cpu(spec, False), _all_cpu(spec, True)
    assert oh.NO_QUANT_NOTE in old.notes and oh.NO_QUANT_NOTE not in new.notes
    calls = len(spec.linears) + 1  # + the LM head
    call_s = new.rates.quant["int4"]["cpu_call_s"]
    assert call_s == pytest.approx(30e-6, rel=0.05)
    fixed = oh.fixed_costs_from_profile(with_engine(make_profile(gpu=False), quantized=True))
    expected = oh.fixed_s(
        fixed,
        "cpu",
        spec.dtype,
        spec,
        "decode",
        prompt_len=128,
        max_new_tokens=32,
        batch=1,
        layers=spec.num_layers,
        weights="int4",
    )
    da = TERMS["cpu-int4"][1][0]  # the int4 entries' decode cost per layer
    assert expected > spec.num_layers * da
    for key in ("hetegen", "cpu_only"):
        o, n = getattr(old.predictions, key), getattr(new.predictions, key)
        assert o.linear.decode_s_per_token - n.linear.decode_s_per_token == pytest.approx(
            calls * call_s, rel=1e-3
        )
        assert n.linear.prefill_s == pytest.approx(o.linear.prefill_s)
        assert n.fixed.decode_s_per_token == pytest.approx(expected)
    # the engine's cost per linear is gone: the all-CPU plan predicts what the plain model does
    assert new.predictions.hetegen.decode_s_per_token == pytest.approx(
        new.predictions.cpu_only.decode_s_per_token
    )
    assert old.predictions.hetegen.decode_s_per_token > old.predictions.cpu_only.decode_s_per_token


def test_float_models_ignore_the_quantized_entries():
    spec = spec_from_config(preset_config("llama-2-7b"), "llama-2-7b", dtype="bfloat16")
    old, new = _all_cpu(spec, False, moe=True), _all_cpu(spec, True, moe=True)
    assert oh.NO_QUANT_NOTE not in old.notes + new.notes
    assert new.predictions.model_dump() == old.predictions.model_dump()


def test_a_quantized_moe_model_ignores_the_dense_quantized_entries_and_says_so():
    """Routed experts are not what the dense tiny models measured: without the moe entry an
    int4 MoE model keeps the float terms, and the plan says which entry is missing."""
    spec = _int4("olmoe-1b-7b")
    old, new = _all_cpu(spec, False), _all_cpu(spec, True)
    assert oh.NO_QUANT_NOTE in old.notes and oh.NO_MOE_NOTE in new.notes
    assert new.predictions.model_dump() == old.predictions.model_dump()


@pytest.mark.parametrize("name", ["olmoe-1b-7b", "qwen3-30b-a3b", "mixtral-8x7b"])
def test_a_quantized_moe_models_cpu_decode_is_priced_from_the_moe_entry(name):
    """With the moe entry, decode takes its terms (per layer and outside the layers) and the
    dense linears and the LM head lose their call cost; the routed experts keep their price
    (the entry leaves their fused call out); prefill keeps the float terms."""
    spec = _int4(name)
    old, new = _all_cpu(spec, True), _all_cpu(spec, True, moe=True)
    assert oh.NO_MOE_NOTE in old.notes and oh.NO_MOE_NOTE not in new.notes
    fixed = oh.fixed_costs_from_profile(with_engine(make_profile(gpu=False), quantized=True, moe=True))
    assert fixed.pick("cpu", spec.dtype, spec, "int4").architecture == "moe"
    args = dict(prompt_len=128, max_new_tokens=32, batch=1, layers=spec.num_layers)
    expected = oh.fixed_s(fixed, "cpu", spec.dtype, spec, "decode", weights="int4", **args)
    da = TERMS["cpu-moe-int4"][1][0]  # the moe entry's decode cost per layer
    assert expected > spec.num_layers * da
    call_s = new.rates.quant["int4"]["cpu_call_s"]
    calls = len(spec.linears) + 1  # the dense linears (the router among them) + the LM head
    for key in ("hetegen", "cpu_only"):
        o, n = getattr(old.predictions, key), getattr(new.predictions, key)
        assert n.fixed.decode_s_per_token == pytest.approx(expected)
        assert o.linear.decode_s_per_token - n.linear.decode_s_per_token == pytest.approx(
            calls * call_s, rel=1e-3
        )
        assert n.linear.prefill_s == pytest.approx(o.linear.prefill_s)
    o, n = old.predictions.cpu_only, new.predictions.cpu_only  # the stock model: no engine terms
    assert n.fixed.prefill_s == pytest.approx(o.fixed.prefill_s)
    # the engine's cost per linear is gone: the all-CPU plan predicts what the plain model does
    assert new.predictions.hetegen.decode_s_per_token == pytest.approx(
        new.predictions.cpu_only.decode_s_per_token
    )
    # a dense int4 model is still priced from the llama entry
    dense = _int4("llama-2-7b")
    assert fixed.pick("cpu", dense.dtype, dense, "int4").architecture == "llama"
