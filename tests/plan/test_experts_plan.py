"""Planning mixture-of-experts models: the linears (attention, shared experts, router with the
fixed tensors) and the KV cache first, then routed experts by decode time saved per byte
(uniform use), the rest on the CPU; --cpu-moe and --n-cpu-moe; the plan document's experts
section (written, validated, older plans still loading); predictions from the expected
number of distinct experts per step."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from hetegen_cli.core.dtypes import itemsize
from hetegen_cli.core.errors import PlanError, UsageError
from hetegen_cli.models.architecture.spec import spec_from_config
from hetegen_cli.models.shapes import presets
from hetegen_cli.plan.costmodel.experts import expert_copy_s, expert_s, experts_step_s
from hetegen_cli.plan.document import ExpertsPlacement, check_plan_matches
from hetegen_cli.plan.load import plan_from_dict
from hetegen_cli.plan.manual import manual_plan
from hetegen_cli.plan.request import PlanRequest
from hetegen_cli.plan.solver import make_plan
from tests.fakes import make_profile, simple_rates
from tests.helpers import assert_error, cli

GiB = 2**30


@pytest.fixture(scope="module")
def spec():
    return spec_from_config(presets.preset_config("qwen3-30b-a3b"), "qwen3-30b-a3b")


@pytest.fixture(scope="module")
def profile():
    return make_profile(ram_available=512 * GiB)


def _plan(spec, profile, gib: float, **kw):
    req = PlanRequest(prompt_len=512, max_new_tokens=64, gpu_budget_bytes=int(gib * GiB), **kw)
    return make_plan(spec, profile, req)


def _gpu_experts(plan) -> int:
    return sum(len(x.gpu) for x in plan.experts)


@pytest.mark.parametrize("gib", [6, 8, 12, 24])
def test_linears_and_kv_come_before_any_expert_and_the_budget_holds(spec, profile, gib):
    plan = _plan(spec, profile, gib)
    gpu = plan.memory.gpu
    assert gpu.total_bytes <= gib * GiB
    assert len(plan.experts) == len(spec.experts) == 48
    placed = _gpu_experts(plan)
    if placed:
        assert plan.split_count == 0  # every linear resident before the first expert
    by_name = {x.name: x for x in spec.experts}
    assert gpu.resident_expert_bytes == sum(len(p.gpu) * by_name[p.name].expert_bytes for p in plan.experts)
    cpu_params = sum(len(p.cpu) * by_name[p.name].expert_parameters for p in plan.experts)
    assert plan.memory.host.expert_bytes == cpu_params * 2  # the decode CPU format: bfloat16 here
    assert any("routed experts on the GPU side" in n for n in plan.notes)


def test_more_gpu_memory_holds_more_experts_and_decodes_faster(spec, profile):
    plans = [_plan(spec, profile, gib) for gib in (8, 12, 24, 80)]
    placed = [_gpu_experts(p) for p in plans]
    speed = [p.predictions.hetegen.decode_tokens_per_s for p in plans]
    assert placed == sorted(placed) and placed[0] > 0 and placed[-1] == 48 * 128
    assert speed == sorted(speed) and speed[-1] > speed[0]
    assert plans[-1].memory.host.expert_bytes == 0
    assert any("plain GPU inference" in w for w in plans[-1].warnings)


def test_experts_fill_the_lowest_layers_first_under_uniform_use(spec, profile):
    plan = _plan(spec, profile, 8)
    counts = [len(x.gpu) for x in plan.experts]
    full = counts.index(next(c for c in counts if c < 128))
    assert all(c == 128 for c in counts[:full]) and sum(counts[full + 1 :]) == 0


def test_cpu_moe_keeps_every_routed_expert_on_the_cpu_and_predicts_slower(spec, profile):
    default, cpu = _plan(spec, profile, 12), _plan(spec, profile, 12, cpu_moe=True)
    assert _gpu_experts(default) > 0 and _gpu_experts(cpu) == 0
    assert cpu.memory.gpu.resident_expert_bytes == 0
    assert cpu.predictions.hetegen.decode_tokens_per_s < default.predictions.hetegen.decode_tokens_per_s
    assert any("--cpu-moe" in n for n in cpu.notes)


def test_n_cpu_moe_keeps_the_first_layers_experts_on_the_cpu(spec, profile):
    plan = _plan(spec, profile, 24, n_cpu_moe=10)
    assert all(not x.gpu for x in plan.experts if x.layer_index < 10)
    assert _gpu_experts(plan) > 0 and len(plan.experts[10].gpu) == 128


def test_the_moe_flags_are_checked(spec):
    with pytest.raises(UsageError, match="--cpu-moe and --n-cpu-moe"):
        PlanRequest(cpu_moe=True, n_cpu_moe=2)
    with pytest.raises(UsageError, match="--n-cpu-moe is -1"):
        PlanRequest(n_cpu_moe=-1)


def test_decode_uses_top_k_experts_per_token_and_prefill_the_expected_distinct_ones(spec):
    rates = simple_rates()
    x = spec.experts[0]
    one = expert_s(rates, x, 1, False, concurrent=True)
    assert experts_step_s(rates, [x], None, 1) == pytest.approx(x.top_k * one)
    everything_on_gpu = [ExpertsPlacement.of(x, range(x.num_experts))]
    assert experts_step_s(rates, [x], everything_on_gpu, 1) == pytest.approx(
        x.top_k * expert_s(rates, x, 1, True)
    )
    # 512 tokens choose nearly all 128 experts, each for ~32 tokens
    assert experts_step_s(rates, [x], None, 512) == pytest.approx(
        128 * (1 - (1 - 8 / 128) ** 512) * expert_s(rates, x, 32, False), rel=1e-6
    )


def test_the_all_cpu_plan_puts_every_expert_on_the_cpu(spec):
    plan = make_plan(spec, make_profile(gpu=False, ram_available=512 * GiB), PlanRequest())
    assert len(plan.experts) == 48 and _gpu_experts(plan) == 0
    size = itemsize(plan.runtime.cpu_dtype_decode)  # the decode CPU format holds them
    assert plan.memory.host.expert_bytes == spec.expert_weight_bytes // 2 * size
    assert plan.predictions.hetegen.decode_tokens_per_s > 0


def test_the_experts_section_round_trips_and_is_validated(spec, profile):
    plan = _plan(spec, profile, 8)
    doc = json.loads(json.dumps(plan.to_dict()))
    back = plan_from_dict(doc)
    assert back.experts == plan.experts
    check_plan_matches(back, spec)
    bad = json.loads(json.dumps(doc))
    bad["experts"][0]["gpu"] = [3, 1]
    with pytest.raises(PlanError, match="not distinct and ascending"):
        plan_from_dict(bad)
    bad["experts"][0]["gpu"] = [0, 128]
    with pytest.raises(PlanError, match="gpu expert 128 is not below num_experts 128"):
        plan_from_dict(bad)
    older = {k: v for k, v in doc.items() if k != "experts"}  # a plan written before experts
    with pytest.raises(PlanError, match="places no experts"):
        check_plan_matches(plan_from_dict(older), spec)


def test_a_dense_plan_has_no_experts_section():
    dense = spec_from_config(presets.preset_config("llama-2-7b"), "llama-2-7b")
    plan = manual_plan(dense, cpu_fraction_prefill=1.0, cpu_fraction_decode=1.0)
    assert plan.experts == () and "experts" not in plan.to_dict()
    assert plan_from_dict(json.loads(json.dumps(plan.to_dict()))).experts == ()


def test_a_manual_plan_places_experts_and_refuses_unknown_modules(spec):
    name = spec.experts[3].name
    plan = manual_plan(spec, cpu_fraction_prefill=1.0, cpu_fraction_decode=1.0, experts_gpu={name: [5, 2]})
    assert plan.experts[3].gpu == (2, 5) and plan.experts[0].gpu == ()
    with pytest.raises(ValueError, match="unknown experts"):
        manual_plan(spec, cpu_fraction_prefill=1.0, cpu_fraction_decode=1.0, experts_gpu={"x": [1]})
    wrong = replace(plan, experts=(*plan.experts[:-1], replace(plan.experts[-1], num_experts=64)))
    with pytest.raises(PlanError, match="64 experts"):
        check_plan_matches(wrong, spec)


def test_plan_on_the_command_line_with_the_moe_flags(tmp_path):
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(make_profile(ram_available=512 * GiB)))
    args = ["plan", "--model", "olmoe-1b-7b", "--profile", str(profile), "--gpu-memory", "4GiB"]
    made = cli(*args, "--cpu-moe", "--json")
    assert made.exit_code == 0, made.output
    doc = json.loads(made.stdout)
    assert [x["gpu"] for x in doc["experts"]] == [[]] * 16
    assert_error(cli(*args, "--cpu-moe", "--n-cpu-moe", "2"), "--cpu-moe and --n-cpu-moe", exit_code=2)


@pytest.mark.parametrize("flags", [(), ("--cpu-moe",)])
def test_plan_simulate_replays_a_moe_plan(tmp_path, flags):
    """The trace of a proxy with the model's 16 layers of 64 experts, replayed: its CPU
    experts are on the step's critical path, and without host time the replay is within 1 % of
    the plan's own prediction (it adds the experts' activation copies, which the prediction
    leaves out; weight copies on the experts' stream overlap the linears)."""
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(make_profile(ram_available=512 * GiB)))
    args = ["plan", "--model", "olmoe-1b-7b", "--profile", str(profile), "--gpu-memory", "4GiB"]
    made = cli(*args, "--prompt-len", "16", "--simulate", "--json", *flags)
    assert made.exit_code == 0, made.output
    doc = json.loads(made.stdout)
    sim = doc["simulation"]
    assert sim["recorded"]["proxy"]["expert_ffn"] == 64 and sim["recorded"]["proxy"]["num_layers"] == 16
    assert sim["host_term_added"]
    dec = sim["decode"]
    assert "CPU experts" in {c["item"] for c in dec["ideal_critical_path"]}
    host = dec["host"]["total_s"]
    assert dec["ideal_s"] == pytest.approx(dec["predicted_s"] - host, rel=1e-2)
    assert dec["simulated_s"] > dec["ideal_s"]


# --- prefill streaming of CPU-side experts ---------------------------------------------------


def _no_stream(experts):
    return tuple(replace(x, stream_prefill=False) for x in experts)


def test_prefill_streams_the_cpu_experts_where_pcie_beats_the_cpu(spec):
    """At 2,048 prompt tokens nearly every expert is active: a 1 TFLOP/s CPU takes longer over
    a layer's CPU-side experts than PCIe at 25 GB/s takes to bring them, so those layers stream
    in prefill, through two experts' staging buffers, and predict a shorter prefill; decode is
    priced as before. At 1 GB/s PCIe no layer streams, and without a GPU nothing does."""
    req = PlanRequest(prompt_len=2048, max_new_tokens=64, gpu_budget_bytes=8 * GiB)
    plan = make_plan(spec, make_profile(ram_available=512 * GiB), req)
    streamed = [x for x in plan.experts if x.stream_prefill]
    assert streamed and all(x.cpu for x in streamed)
    assert not [x for x in plan.experts if not x.cpu and x.stream_prefill]
    gpu = plan.memory.gpu
    held = itemsize(plan.runtime.cpu_dtype_decode)
    assert gpu.expert_staging_bytes == 2 * spec.experts[0].expert_parameters * held
    assert gpu.total_bytes <= 8 * GiB and any(n.startswith("prefill: ") for n in plan.notes)
    rates = simple_rates(cpu_dtype="bfloat16", weights_dtype="bfloat16")
    tokens = req.prompt_len
    with_stream = experts_step_s(rates, spec.experts, plan.experts, tokens, prefill=True)
    without = experts_step_s(rates, spec.experts, _no_stream(plan.experts), tokens, prefill=True)
    assert with_stream < without
    # decode never streams
    assert experts_step_s(rates, spec.experts, plan.experts, 1) == experts_step_s(
        rates, spec.experts, _no_stream(plan.experts), 1
    )
    slow = make_plan(spec, make_profile(ram_available=512 * GiB, pcie_bw=1e9), req)
    assert not any(x.stream_prefill for x in slow.experts) and not slow.memory.gpu.expert_staging_bytes
    cpu_only = make_plan(
        spec, make_profile(gpu=False, ram_available=512 * GiB), replace(req, gpu_budget_bytes=None)
    )
    assert not any(x.stream_prefill for x in cpu_only.experts)


def test_quantized_experts_stream_as_stored(spec):
    """Int4 experts cross PCIe as stored (under a third of their bfloat16 copy time), the
    staging buffers hold two stored experts, and the layers that stream predict a shorter
    prefill."""
    q4 = spec.quantized("int4", 32)
    x = q4.experts[0]
    req = PlanRequest(prompt_len=2048, max_new_tokens=64, gpu_budget_bytes=8 * GiB)
    plan = make_plan(q4, make_profile(ram_available=512 * GiB), req)
    assert any(p.stream_prefill for p in plan.experts)
    assert plan.memory.gpu.expert_staging_bytes == 2 * x.host_expert_bytes(2)
    assert x.host_expert_bytes(2) < x.expert_parameters  # under a byte a weight
    rates = simple_rates(cpu_dtype="bfloat16", weights_dtype="bfloat16")
    assert expert_copy_s(rates, x) < expert_copy_s(rates, spec.experts[0]) / 3
    tokens = req.prompt_len
    with_stream = experts_step_s(rates, q4.experts, plan.experts, tokens, prefill=True)
    without = experts_step_s(rates, q4.experts, _no_stream(plan.experts), tokens, prefill=True)
    assert with_stream < without


def test_stream_prefill_round_trips_and_older_plans_read_it_as_off(spec):
    req = PlanRequest(prompt_len=2048, max_new_tokens=64, gpu_budget_bytes=8 * GiB)
    plan = make_plan(spec, make_profile(ram_available=512 * GiB), req)
    doc = plan.to_dict()
    assert plan_from_dict(doc).experts == plan.experts and any(x.stream_prefill for x in plan.experts)
    for x in doc["experts"]:
        del x["stream_prefill"]
    assert plan_from_dict(doc).experts == _no_stream(plan.experts)


def _desktop():
    """The made-up PCIe 4 desktop of docs/plan.md section 5."""
    return make_profile(
        cpu_dtypes={"bfloat16": 56e9, "float16": 20e9, "float32": 60e9},
        best="bfloat16",
        cpu_call_s=30e-6,
        cpu_flops=0.8e12,
        dram=70e9,
        pcie_bw=25e9,
        pcie_copy_s=10e-6,
        hbm=900e9,
        gpu_call_s=8e-6,
        gpu_flops=150e12,
        free=23 * GiB,
        total=24 * GiB,
        cpu_ratio=0.8,
        pcie_ratio=0.94,
        ram_available=120 * GiB,
        threads=14,
    )


@pytest.mark.parametrize("quant", [None, "int4"])
def test_decode_splits_the_cpu_experts_where_it_shortens_the_step(spec, quant):
    """On the made-up desktop the CPU side of a layer is the longer one in decode: each chosen
    CPU-side expert is split, the best multiple of the split step on the GPU (no other split
    on the grid predicts the layer shorter), staging is set aside, and the plan predicts a
    faster decode than the same plan with `--no-expert-split`; a layer whose experts all sit
    on the GPU side splits nothing, and neither does a plan without a GPU."""
    model = spec.quantized(quant, 32) if quant else spec
    req = PlanRequest(prompt_len=512, max_new_tokens=64, gpu_budget_bytes=8 * GiB)
    plan = make_plan(model, _desktop(), req)
    whole = make_plan(model, _desktop(), replace(req, expert_split=False))
    split = [p for p in plan.experts if p.split_units]
    assert split and not any(p.split_units for p in whole.experts)
    assert any(n.startswith("decode: ") for n in plan.notes)
    assert plan.memory.gpu.expert_staging_bytes > 0 and plan.memory.gpu.total_bytes <= 8 * GiB
    by_name = {x.name: x for x in model.experts}
    assert plan.predictions.hetegen.decode_tokens_per_s > whole.predictions.hetegen.decode_tokens_per_s
    for p in split:
        x = by_name[p.name]
        assert p.cpu and p.split_units % x.split_step == 0 and 0 < p.split_units < x.intermediate_size
    cpu_only = make_plan(
        model, make_profile(gpu=False, ram_available=512 * GiB), replace(req, gpu_budget_bytes=None)
    )
    assert not any(p.split_units for p in cpu_only.experts)


def test_the_chosen_split_is_the_best_on_its_grid(spec):
    """split_in_decode picks, per layer, the split step multiple with the shortest predicted
    decode step (split_layer_s), and units 0 prices the layer as placed_layer_s does."""
    from hetegen_cli.plan.costmodel.experts import placed_layer_s, split_layer_s
    from hetegen_cli.plan.costmodel.predict import CostInputs
    from hetegen_cli.plan.experts import MIN_SPLIT_GAIN

    q4 = spec.quantized("int4", 32)
    req = PlanRequest(prompt_len=512, max_new_tokens=64, gpu_budget_bytes=8 * GiB)
    plan = make_plan(q4, _desktop(), req)
    pair = (plan.runtime.cpu_dtype_prefill, plan.runtime.cpu_dtype_decode)
    rates, _ = CostInputs.of(_desktop()).rates(q4, pair, req.prompt_len, "cuda")
    x = q4.experts[0]
    for p in plan.experts[:4]:
        grid = {k: split_layer_s(rates.decode, x, None, p.gpu, 1, k, rates.quant) for k in range(0, 768, 32)}
        assert grid[0] == placed_layer_s(rates.decode, x, None, p.gpu, 1, quant=rates.quant)
        best = min(grid, key=grid.get)
        if grid[0] - grid[best] >= MIN_SPLIT_GAIN * grid[0]:
            assert p.split_units == best
        else:
            assert p.split_units == 0


def test_split_units_round_trip_and_older_plans_read_them_as_none(spec):
    q4 = spec.quantized("int4", 32)
    req = PlanRequest(prompt_len=512, max_new_tokens=64, gpu_budget_bytes=8 * GiB)
    plan = make_plan(q4, _desktop(), req)
    doc = plan.to_dict()
    assert plan_from_dict(doc).experts == plan.experts and any(x.split_units for x in plan.experts)
    assert plan.summary()["expert_layers_split_in_decode"] == sum(bool(x.split_units) for x in plan.experts)
    for x in doc["experts"]:
        del x["split_units"]
    assert plan_from_dict(doc).experts == tuple(replace(x, split_units=0) for x in plan.experts)
    doc["experts"][0]["split_units"] = -32
    with pytest.raises(PlanError):
        plan_from_dict(doc)
