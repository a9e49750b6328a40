"""Planning quantized models (issue 11): bytes per parameter per format on each side, the
quantized CPU kernels' measured rates, residency in stored bytes. Pure: presets' shapes and a
made-up profile."""

from __future__ import annotations

from dataclasses import replace

import pytest

from hetegen_cli.core.errors import PlanError
from hetegen_cli.models.architecture.spec import spec_from_config
from hetegen_cli.models.shapes.presets import preset_config
from hetegen_cli.plan import costmodel as cm
from hetegen_cli.plan import residency
from hetegen_cli.plan.document import check_plan_matches
from hetegen_cli.plan.memory import dequant_bytes
from hetegen_cli.plan.request import PlanRequest
from hetegen_cli.plan.solver import make_plan
from tests.fakes import GB, make_profile

GiB = 2**30


def _spec(fmt: str | None, name: str = "llama-2-7b"):
    sp = spec_from_config(preset_config(name), name, "float16")
    if fmt is None:
        return sp
    return replace(sp, dtype="bfloat16").quantized(fmt, 32)


def _profile(**over):
    # int8 and int4 kernels read their stored bytes at 80% of the float GEMV's byte rate
    base = dict(
        best="bfloat16",
        cpu_dtypes={"bfloat16": 20 * GB, "float16": 20 * GB},
        quant_bw={"int8": 16 * GB, "int4": 16 * GB},
        pcie_bw=16 * GB,
        hbm=800 * GB,
        free=24 * GiB,
        total=24 * GiB,
    )
    base.update(over)
    return make_profile(**base)


def _req(budget=4 * GiB):
    return PlanRequest(prompt_len=128, max_new_tokens=32, gpu_budget_bytes=budget, cpu_budget_bytes=64 * GiB)


@pytest.fixture(scope="module")
def plans():
    profile = _profile()
    return {fmt: make_plan(_spec(fmt), profile, _req()) for fmt in (None, "int8", "int4")}


def test_quantized_plans_hold_and_stream_fewer_bytes_and_predict_faster_decode(plans):
    f, i8, i4 = plans[None], plans["int8"], plans["int4"]
    assert i4.model.quant == "int4-g32" and i8.model.quant == "int8" and f.model.quant is None
    host = {k: p.memory.host.weights_bytes + p.memory.host.cpu_copy_bytes for k, p in plans.items()}
    assert host["int4"] < host["int8"] < host[None]
    resident = {k: p.residency.resident_count for k, p in plans.items()}
    assert resident["int4"] > resident["int8"] > resident[None]  # the same budget holds more
    decode = {k: p.predictions.hetegen.decode_tokens_per_s for k, p in plans.items()}
    assert decode["int4"] > decode["int8"] > decode[None]
    assert i4.memory.gpu.dequant_bytes == dequant_bytes(_spec("int4")) > 0
    assert f.memory.gpu.dequant_bytes is None
    for p in plans.values():
        assert p.memory.gpu.total_bytes <= 4 * GiB


def test_quantized_linears_balance_on_their_own_rates(plans):
    """The balanced split of an int4 linear (plan.residency.candidate) equates its CPU share
    at the int4 kernel's stored-bytes rate with its streamed share at 0.625 bytes per
    parameter over PCIe plus the GPU's dequantization traffic."""
    plan = plans["int4"]
    q = cm.Rates.from_dict(plan.rates.quant["int4"])
    decode = cm.Rates.from_dict(plan.rates.decode)
    assert q.weight_bytes == pytest.approx(0.625) and q.cpu_dtype == "int4"
    assert q.gpu_dequant_bytes_per_param == 4.0  # writes and reads the bfloat16 share
    rates = cm.PhaseRates(cm.Rates.from_dict(plan.rates.prefill), decode, {"int4": q})
    req = _req()
    for lin in _spec("int4").linears[:7]:
        c = residency.candidate(rates, lin, req)
        t = cm.split_times(q, lin.out_features, lin.in_features, c.rows_decode, 1)
        assert 0 < c.rows_decode < lin.out_features
        assert t.cpu_s == pytest.approx(t.transfer_s + t.gpu_s, rel=0.05), lin.name
        rows = lin.out_features - c.rows_decode
        assert t.transfer_s == pytest.approx(rows * lin.in_features * 0.625 / q.pcie_bytes_per_s_concurrent)
        float_c = residency.candidate(rates, replace(lin, quant=None, group_size=None), req)
        assert float_c.rows_decode != c.rows_decode  # the float rates give another split


def test_all_cpu_quantized_plan_uses_the_kernel_rate():
    profile = _profile(gpu=False)
    f = make_plan(_spec(None), profile, _req(0))
    i4 = make_plan(_spec("int4"), profile, _req(0))
    ratio = f.predictions.cpu_only.decode_s_per_token / i4.predictions.cpu_only.decode_s_per_token
    # bytes per parameter 2 -> 0.625 at 20 -> 16 GB/s: 2.56x on the linears; the float head
    # and attention keep the ratio below that
    assert 1.8 < ratio < 2.56
    assert i4.bounds.w_host_bytes < f.bounds.w_host_bytes / 2.5


def test_a_profile_without_quantized_gemv_plans_at_the_float_byte_rate_with_a_note():
    plan = make_plan(_spec("int4"), _profile(quant_bw=None), _req())
    q = plan.rates.quant["int4"]
    assert q["cpu_bytes_per_s"] == pytest.approx(plan.rates.decode["cpu_bytes_per_s"])
    assert any("no int4 CPU GEMV" in n and "hetegen profile" in n for n in plan.notes)


def test_a_float_plan_does_not_run_a_quantized_model(plans):
    with pytest.raises(PlanError, match="in floating point") as err:
        check_plan_matches(plans[None], _spec("int4"))
    assert "--quant int4" in err.value.hint
    with pytest.raises(PlanError, match=r"quantized \(int4-g32\)"):
        check_plan_matches(plans["int4"], _spec("int8"))
    check_plan_matches(plans["int4"], _spec("int4"))


@pytest.mark.parametrize("backend", ["standin", "cuda"])
def test_a_quantized_plan_is_predicted_from_a_profile_without_quantized_rates(backend):
    """A profile from before quantized GEMVs: `run --plan` and bench predictions on the
    stand-in once ended in `KeyError: 'int4'` (the stand-in's rates lacked the format)."""
    from hetegen_cli.plan.costmodel.predict import CostInputs, Execution, predict

    spec = _spec("int4")
    profile = _profile(quant_bw={})
    assert not profile["cpu"].get("quant_gemv")
    plan = make_plan(spec, profile, _req())
    _, notes = CostInputs(profile).rates(spec, plan.runtime.cpu_dtypes, 128, backend)
    assert any("no int4 CPU GEMV measurements" in n for n in notes)
    fig = predict(spec, Execution(plan, backend), _req(), CostInputs(profile))
    assert fig.decode_tokens_per_s > 0


# --- mixed models (a GGUF Q4_K_M: Q4_K linears in int4, Q6_K ones in int8) ----------------


def _mixed(name: str = "llama-2-7b"):
    """llama-quantize's Q4_K_M layout on a preset: v and down in int8 in the layers its
    use_more_bits picks, every other linear int4 (groups of 32)."""
    from hetegen_cli.models.formats.gguf_write import use_more_bits

    sp = replace(spec_from_config(preset_config(name), name, "float16"), dtype="bfloat16")
    formats = {}
    for lin in sp.linears:
        int8 = lin.role in ("v", "down") and use_more_bits(lin.layer_index, sp.num_layers)
        formats[lin.name] = ("int8", 32) if int8 else ("int4", 32)
    return sp.with_quant_map(formats)


def test_a_mixed_model_is_labelled_and_priced_per_linear_at_its_own_format(plans):
    from hetegen_cli.plan.memory import host_memory

    spec = _mixed()
    assert spec.quant == "mixed" and spec.quant_label == "int4-g32+int8"
    assert spec.quant_formats == ("int4", "int8")
    int8 = [lin for lin in spec.linears if lin.quant == "int8"]
    assert len(int8) == 2 * 16  # v and down in 16 of llama-2-7b's 32 layers
    plan = make_plan(spec, _profile(), _req())
    assert plan.model.quant == "int4-g32+int8"
    assert set(plan.rates.quant) == {"int4", "int8"}
    rates = cm.PhaseRates(
        cm.Rates.from_dict(plan.rates.prefill),
        cm.Rates.from_dict(plan.rates.decode),
        {f: cm.Rates.from_dict(r) for f, r in plan.rates.quant.items()},
    )
    assert rates.quant["int4"].weight_bytes == pytest.approx(0.625)
    assert rates.quant["int8"].weight_bytes == pytest.approx(1 + 2 / 4096)
    for lin in (int8[0], next(lin for lin in spec.linears if lin.role == "v" and lin.quant == "int4")):
        c = residency.candidate(rates, lin, _req())
        q = rates.quant[lin.quant]
        t = cm.split_times(q, lin.out_features, lin.in_features, c.rows_decode, 1)
        rows = lin.out_features - c.rows_decode
        per_param = q.weight_bytes
        assert t.transfer_s == pytest.approx(
            rows * lin.in_features * per_param / q.pcie_bytes_per_s_concurrent
        )
    split = [p for p in plan.placements if not p.resident]
    held = host_memory(split, plan.runtime.weights_dtype, plan.runtime.cpu_dtypes, quant=spec.quant_map())
    assert plan.memory.host.weights_bytes == held.weights_bytes
    # between the all-int4 and all-int8 models, in host bytes and in predicted decode
    host = {k: p.memory.host.weights_bytes + p.memory.host.cpu_copy_bytes for k, p in plans.items()}
    mixed_host = plan.memory.host.weights_bytes + plan.memory.host.cpu_copy_bytes
    assert host["int4"] < mixed_host < host["int8"]
    decode = plan.predictions.hetegen.decode_tokens_per_s
    assert plans["int8"].predictions.hetegen.decode_tokens_per_s < decode
    assert decode < plans["int4"].predictions.hetegen.decode_tokens_per_s
    assert plan.bounds.bound_s_per_token > 0


def test_the_bound_of_a_mixed_model_weighs_each_format_by_its_bytes():
    from hetegen_cli.plan.costmodel.fit import phase_rates_from_profile
    from hetegen_cli.plan.costmodel.strategies import bounds, quant_bytes

    spec = _mixed()
    profile = _profile(quant_bw={"int8": 16 * GB, "int4": 8 * GB}, gpu=False)
    rates, _ = phase_rates_from_profile(
        profile, "bfloat16", ("bfloat16", "bfloat16"), 128, [("int4", 32), ("int8", 32)]
    )
    shares = quant_bytes(spec)
    assert set(shares) == {"int4", "int8"} and sum(shares.values()) == spec.linear_weight_bytes
    w = int(10 * GB)
    got = bounds(rates, 0, w, 1.0, True, shares).b_cpu_bytes_per_s
    b = {f: rates.quant[f].cpu_params_per_s * rates.quant[f].weight_bytes for f in ("int4", "int8")}
    want = sum(shares.values()) / sum(n / b[f] for f, n in shares.items())
    assert got == pytest.approx(want) and b["int4"] < got < b["int8"]
    assert bounds(rates, 0, w, 1.0, True, "int4").b_cpu_bytes_per_s == pytest.approx(b["int4"])


def test_rates_for_every_format_present_and_one_group_per_format():
    from hetegen_cli.plan.costmodel.fit import phase_rates_from_profile

    profile = _profile()
    rates, _ = phase_rates_from_profile(
        profile, "bfloat16", ("bfloat16", "bfloat16"), 128, [("int4", 32), ("int8", 32)]
    )
    assert set(rates.quant) == {"int4", "int8"}
    one, _ = phase_rates_from_profile(profile, "bfloat16", ("bfloat16", "bfloat16"), 128, ("int4", 32))
    assert set(one.quant) == {"int4", "int8"}  # the LM head's int8 as well
    assert one.quant["int4"] == rates.quant["int4"]
    assert phase_rates_from_profile(profile, "bfloat16", ("bfloat16", "bfloat16"), 128)[0].quant == {}
    with pytest.raises(ValueError, match="one group size per format"):
        phase_rates_from_profile(profile, "bfloat16", ("bfloat16",) * 2, 128, [("int4", 32), ("int4", 64)])


@pytest.mark.parametrize("backend", ["standin", "cuda"])
def test_a_mixed_plan_is_predicted_and_checked_against_its_model(backend):
    from hetegen_cli.plan.costmodel.predict import CostInputs, Execution, predict

    spec = _mixed()
    plan = make_plan(spec, _profile(), _req())
    fig = predict(spec, Execution(plan, backend), _req(), CostInputs(_profile()))
    assert fig.decode_tokens_per_s > 0
    check_plan_matches(plan, spec)
    with pytest.raises(PlanError, match=r"stored quantized \(int4-g32\).*int4-g32\+int8") as err:
        check_plan_matches(make_plan(_spec("int4"), _profile(), _req()), spec)
    assert err.value.hint.endswith("--quant auto")


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_a_quantized_moe_model_places_its_experts_at_their_quantized_bytes(fmt):
    """Qwen3-30B-A3B with its routed experts quantized: the GPU budget holds every expert it
    places at its stored bytes (ExpertsSpec.expert_bytes: about 0.50 / 0.31 of bfloat16's), so
    the same budget places about 2.0x / 3.2x the experts of the float model; the host holds the
    others as stored; the plan records the quantized label."""
    from hetegen_cli.core.quant import weight_bytes

    name = "qwen3-30b-a3b"
    budget = 16 * GiB
    req = PlanRequest(prompt_len=128, max_new_tokens=32, gpu_budget_bytes=budget, cpu_budget_bytes=256 * GiB)
    profile = _profile(free=80 * GiB, total=80 * GiB, ram_available=512 * GiB)
    spec = _spec(fmt, name)
    x = spec.experts[0]
    assert x.expert_bytes == 2 * weight_bytes(fmt, 768, 2048) + weight_bytes(fmt, 2048, 768)
    float_spec = replace(_spec(None, name), dtype="bfloat16").in_dtype("bfloat16")
    plan, float_plan = make_plan(spec, profile, req), make_plan(float_spec, profile, req)
    gpu = plan.memory.gpu
    assert gpu.total_bytes <= budget and plan.model.quant == spec.quant_label
    placed = sum(len(p.gpu) for p in plan.experts)
    assert gpu.resident_expert_bytes == placed * x.expert_bytes > 0
    extra = {p.name: x.split_extra_bytes if p.split_units else 0 for p in plan.experts}
    held = [len(p.cpu) * (x.expert_bytes + extra[p.name]) for p in plan.experts]
    assert plan.memory.host.expert_bytes == sum(held)  # a split int8 expert: down's scales twice
    assert gpu.dequant_bytes >= x.hidden_size * x.intermediate_size * 3  # a part's values and result
    float_placed = sum(len(p.gpu) for p in float_plan.experts)
    ratio = x.expert_parameters * 2 / x.expert_bytes
    assert placed >= 0.9 * float_placed * ratio


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_experts_are_priced_at_their_kernels_rates(fmt):
    """A CPU expert stored as int8/int4 reads its stored bytes: priced at its format's rates
    (PhaseRates.quant, the profile's quantized GEMV), its decode on the CPU is faster than the
    same expert in bfloat16, and an experts-on-CPU plan of the quantized model predicts faster
    decode than the float model's."""
    from hetegen_cli.plan.costmodel.experts import expert_s
    from hetegen_cli.plan.costmodel.hardware import Rates

    name = "qwen3-30b-a3b"
    req = PlanRequest(
        prompt_len=128, max_new_tokens=32, gpu_budget_bytes=16 * GiB, cpu_budget_bytes=256 * GiB, cpu_moe=True
    )
    profile = _profile(free=80 * GiB, total=80 * GiB, ram_available=512 * GiB)
    spec = _spec(fmt, name)
    float_spec = replace(_spec(None, name), dtype="bfloat16").in_dtype("bfloat16")
    plan, float_plan = make_plan(spec, profile, req), make_plan(float_spec, profile, req)
    assert plan.rates.quant and fmt in plan.rates.quant
    quant = {k: Rates.from_dict(v) for k, v in plan.rates.quant.items()}
    x, fx, r = spec.experts[0], float_spec.experts[0], Rates.from_dict(plan.rates.decode)
    assert expert_s(r, x, 1, False, quant=quant) < expert_s(r, fx, 1, False) == expert_s(r, x, 1, False)
    assert plan.predictions.hetegen.decode_tokens_per_s > float_plan.predictions.hetegen.decode_tokens_per_s


def _with_kernel(profile: dict, kernel: str | None) -> dict:
    for entry in profile["cpu"]["quant_gemv"]:
        entry["kernel"] = kernel
    return profile


@pytest.mark.parametrize(
    ("kernel", "dtype"), [("hetegen-avx2", "float32"), ("torch", "bfloat16"), (None, "bfloat16")]
)
def test_an_all_cpu_quantized_plan_computes_in_what_the_profiles_kernel_takes(kernel, dtype):
    """hetegen's kernels take float32: the plain quantized model's choice, and the all-CPU
    plan's, with the float tensors and the KV cache counted at that dtype; torch's (and a
    profile from before the field) keep the model's bfloat16."""
    spec = _spec("int4")
    plan = make_plan(spec, _with_kernel(_profile(gpu=False), kernel), _req(0))
    bf16 = make_plan(spec, _with_kernel(_profile(gpu=False), "torch"), _req(0))
    assert plan.runtime.weights_dtype == dtype and plan.rates.quant["int4"]["cpu_kernel"] == (
        kernel or "torch"
    )
    held = spec.in_dtype(dtype)
    extra = (held.fixed_bytes - spec.fixed_bytes) + (
        held.kv_cache_bytes(1, 1) - spec.kv_cache_bytes(1, 1)
    ) * (_req(0).prompt_len + _req(0).max_new_tokens)
    assert plan.memory.host.other_bytes - bf16.memory.host.other_bytes >= extra
    assert (dtype == "float32") == (extra > 0) == any("activations in float32" in n for n in plan.notes)
    check_plan_matches(plan, spec)  # a float32 rest is a plan for the bfloat16-stored model
    with pytest.raises(PlanError, match="made for"):
        check_plan_matches(
            plan.__class__(**{**plan.__dict__, "runtime": replace(plan.runtime, weights_dtype="float16")}),
            spec,
        )


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_a_decode_steps_cpu_experts_pay_one_call_each_with_hetegens_kernels(fmt):
    """With hetegen's kernels the engine computes a one-token step's chosen CPU-side experts
    of a layer in one call (models.formats.fused): each expert costs its bytes and one per-call
    cost, not two, under uniform and measured use. With torch's kernels, and in prefill, each
    expert pays its own two calls. The fused plan predicts faster decode."""
    from hetegen_cli.models.shapes.experts import expected_distinct
    from hetegen_cli.plan.costmodel.experts import expert_s, fused_call_s, layer_s, measured_layer_s
    from hetegen_cli.plan.costmodel.hardware import Rates

    spec = _spec(fmt, "qwen3-30b-a3b")
    x = spec.experts[0]
    req = PlanRequest(prompt_len=128, max_new_tokens=32, gpu_budget_bytes=0, cpu_budget_bytes=256 * GiB)
    by_kernel = {}
    for kernel in ("hetegen-avx2", "torch"):
        profile = _with_kernel(_profile(gpu=False, cpu_call_s=30e-6, ram_available=512 * GiB), kernel)
        plan = make_plan(spec, profile, req)
        quant = {k: Rates.from_dict(v) for k, v in plan.rates.quant.items()}
        by_kernel[kernel] = (plan, Rates.from_dict(plan.rates.decode), quant)
    plan, r, quant = by_kernel["hetegen-avx2"]
    call, k = quant[fmt].cpu_call_s, x.top_k
    assert call == pytest.approx(30e-6, rel=0.05)
    assert fused_call_s(r, x, 1, quant) == call and fused_call_s(r, x, 128, quant) is None
    whole = expert_s(r, x, 1, False, quant=quant)
    bytes_only = expert_s(r, x, 1, False, quant=quant, calls=False)
    assert whole - bytes_only == pytest.approx(2 * call)
    cpu, gpu = layer_s(r, x, 0, 1, quant=quant)
    assert gpu == 0 and cpu == pytest.approx(k * (bytes_only + call))
    uniform = [k / x.num_experts] * x.num_experts
    assert measured_layer_s(r, x, uniform, (), 1, quant=quant)[0] == pytest.approx(cpu)
    active = expected_distinct(x.num_experts, k, 128)  # prefill: each expert its own calls
    per_expert = expert_s(r, x, 128 * k / active, False, quant=quant)
    assert layer_s(r, x, 0, 128, quant=quant)[0] == pytest.approx(active * per_expert)
    torch_plan, tr, tquant = by_kernel["torch"]
    assert fused_call_s(tr, x, 1, tquant) is None
    assert layer_s(tr, x, 0, 1, quant=tquant)[0] == pytest.approx(k * expert_s(tr, x, 1, False, quant=tquant))
    assert plan.predictions.hetegen.decode_tokens_per_s > torch_plan.predictions.hetegen.decode_tokens_per_s
