"""Placing and pricing routed experts by measured use (`plan --expert-use FILE`, plan.expert_use,
plan.expert_stats): each expert's chance of being chosen per token, as `hetegen eval
--expert-use` counted it, instead of uniform top_k / E.

Uniform counts give the uniform figures; with skewed counts the hottest experts go to the GPU
side first and the plan is never predicted slower than the uniform placement priced with the
same counts; a file counted on another model is refused; the plan records which statistics it
used, and plans without that record still load.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hetegen_cli.core.errors import InputError, PlanError
from hetegen_cli.models.architecture.spec import spec_from_config
from hetegen_cli.models.shapes import presets
from hetegen_cli.plan import costmodel as cm
from hetegen_cli.plan.costmodel.experts import (
    active_bytes,
    expert_priorities,
    expert_priority,
    expert_s,
    experts_step_s,
)
from hetegen_cli.plan.costmodel.strategies import hetegen_prediction
from hetegen_cli.plan.document import ExpertsPlacement
from hetegen_cli.plan.expert_use import expert_stats, load_expert_stats
from hetegen_cli.plan.load import plan_from_dict
from hetegen_cli.plan.request import PlanRequest
from hetegen_cli.plan.solver import solve
from hetegen_cli.profile.expert_use import ExpertUse, LayerUse, save_expert_use
from tests.fakes import DESKTOP_RATES
from tests.mutations import property_settings

GiB = 2**30
RATES = cm.PhaseRates.of(DESKTOP_RATES)


@pytest.fixture(scope="module")
def olmoe():
    """16 MoE layers of 64 experts, top-8."""
    return spec_from_config(presets.preset_config("olmoe-1b-7b"), "olmoe-1b-7b")


def use_for(spec, counts: dict[int, list[int]], tokens: int, **over) -> ExpertUse:
    """An expert-use document for `spec` with these counts per layer."""
    x = spec.experts[0]
    doc = dict(
        model=spec.name,
        architecture=spec.architecture,
        config_hash=spec.config_hash,
        num_experts=x.num_experts,
        top_k=x.top_k,
        tokens=tokens,
        text="test text",
        text_sha256="00",
        layers=[LayerUse(layer=layer, counts=c) for layer, c in sorted(counts.items())],
    )
    return ExpertUse(**{**doc, **over})


def routed(spec, seed: int, skew: float, tokens: int) -> ExpertUse:
    """Counts of `tokens` tokens each choosing top_k distinct experts per layer, expert e with
    weight 1 / rank^skew (ranks shuffled per layer; weighted sampling without replacement)."""
    rng = random.Random(seed)
    counts = {}
    for x in spec.experts:
        weights = [1 / (rank + 1) ** skew for rank in range(x.num_experts)]
        rng.shuffle(weights)
        c = [0] * x.num_experts
        for _ in range(tokens):
            keys = sorted(range(x.num_experts), key=lambda e: -(rng.random() ** (1 / weights[e])))
            for e in keys[: x.top_k]:
                c[e] += 1
        counts[x.layer_index] = c
    return use_for(spec, counts, tokens)


def uniform_use(spec) -> ExpertUse:
    """Every expert chosen equally often: top_k / E per token."""
    x = spec.experts[0]
    tokens = x.num_experts  # each expert chosen top_k times
    return use_for(spec, {y.layer_index: [x.top_k] * x.num_experts for y in spec.experts}, tokens)


# --- the cost model ------------------------------------------------------------------------------


def test_uniform_counts_give_the_uniform_figures(olmoe):
    stats, warnings = expert_stats(uniform_use(olmoe), olmoe)
    assert warnings == [] and stats.record.source == "measured"
    x = olmoe.experts[0]
    rates = RATES.decode
    placed = [ExpertsPlacement.of(y, range(y.layer_index)) for y in olmoe.experts]  # layer i: i on GPU
    for tokens in (1, 4, 512):
        uniform = experts_step_s(rates, olmoe.experts, placed, tokens)
        measured = experts_step_s(rates, olmoe.experts, placed, tokens, use=stats)
        assert measured == pytest.approx(uniform, rel=1e-9)
        assert active_bytes(olmoe.experts, placed, tokens, stats) == pytest.approx(
            active_bytes(olmoe.experts, placed, tokens), rel=1e-9
        )
    for batch in (1, 3):
        per_token = stats.per_token(0)
        assert expert_priorities(rates, x, batch, per_token) == pytest.approx(
            [expert_priority(rates, x, batch)] * x.num_experts, rel=1e-9
        )


def test_a_step_costs_each_cpu_expert_its_chance_of_being_active(olmoe):
    """Decode at batch 1: the CPU side is the sum of p_e x one expert's CPU time; at n tokens
    each expert is active with 1 - (1 - p_e)^n."""
    x = olmoe.experts[0]
    counts = [10] * 4 + [5] * 8 + [0] * 52  # 10 tokens x top-8 = 80 choices
    use = use_for(olmoe, {y.layer_index: counts for y in olmoe.experts}, 10)
    stats, _ = expert_stats(use, olmoe)
    p = stats.per_token(0)
    assert p[0] == 1.0 and p[4] == 0.5 and p[20] == 0.0
    rates = RATES.decode
    one_cpu, one_gpu = expert_s(rates, x, 1, False), expert_s(rates, x, 1, True)
    hot_on_gpu = [ExpertsPlacement.of(x, range(4))]
    # 8 experts at 0.5 each on the CPU: 4 experts' time; the 4 always chosen on the GPU side
    assert experts_step_s(rates, [x], hot_on_gpu, 1, use=stats) == pytest.approx(
        max(4 * one_cpu, 4 * one_gpu)
    )
    # 3 tokens: each CPU expert active with 1 - 0.5^3 = 0.875, on 3 x 0.5 / 0.875 ~ 2 tokens
    assert experts_step_s(rates, [x], hot_on_gpu, 3, use=stats) == pytest.approx(
        8 * 0.875 * expert_s(rates, x, 2, False), rel=1e-9
    )


# --- placing by use ----------------------------------------------------------------------------


def _base_bytes(spec) -> int:
    """GPU bytes of everything but the routed experts (every linear resident)."""
    plan = solve(spec, RATES, PlanRequest(prompt_len=512, max_new_tokens=64, gpu_budget_bytes=80 * GiB))
    return plan.memory.gpu.total_bytes - plan.memory.gpu.resident_expert_bytes


@property_settings(25)
@given(
    seed=st.integers(0, 2**16),
    skew=st.floats(0.3, 4.0),
    tokens=st.integers(4, 60),
    fits=st.integers(1, 16 * 64 - 1),
)
def test_the_hottest_experts_go_first_and_decode_is_never_slower_than_uniform(
    olmoe, olmoe_base, seed, skew, tokens, fits
):
    stats, _ = expert_stats(routed(olmoe, seed, skew, tokens), olmoe)
    budget = olmoe_base + fits * olmoe.experts[0].expert_bytes
    uniform_req = PlanRequest(prompt_len=512, max_new_tokens=64, gpu_budget_bytes=budget)
    req = replace(uniform_req, expert_use=stats)
    plan, uniform = solve(olmoe, RATES, req), solve(olmoe, RATES, uniform_req)
    # every expert on the GPU side is chosen at least as often as any expert left on the CPU
    on_gpu = [stats.per_token(x.layer_index)[e] for x in plan.experts for e in x.gpu]
    on_cpu = [stats.per_token(x.layer_index)[e] for x in plan.experts for e in x.cpu]
    assert len(on_gpu) <= fits and (not on_cpu or not on_gpu or min(on_gpu) >= max(on_cpu))
    room = fits - -(-(plan.memory.gpu.expert_staging_bytes or 0) // olmoe.experts[0].expert_bytes)
    assert len(on_gpu) == min(max(0, room), sum(p > 0 for p in on_gpu + on_cpu))
    # the uniform placement (first layers first) priced with the same counts is never faster
    assert uniform.placements == plan.placements
    priced = hetegen_prediction(
        RATES,
        olmoe,
        req,
        uniform.placements,
        uniform.runtime.staging_buffers,
        uniform.runtime.lm_head_on_gpu,
        0,
        None,
        experts=uniform.experts,
    )
    assert plan.predictions.hetegen.decode_s_per_token <= priced.decode_s_per_token * (1 + 1e-12)


@pytest.fixture(scope="module")
def olmoe_base(olmoe):
    return _base_bytes(olmoe)


def test_the_plan_records_the_statistics_and_older_plans_still_load(olmoe, tmp_path):
    path = save_expert_use(routed(olmoe, 1, 1.5, 20), tmp_path / "use.json")
    stats, _ = load_expert_stats(path, olmoe)
    req = PlanRequest(prompt_len=64, max_new_tokens=8, gpu_budget_bytes=8 * GiB, expert_use=stats)
    plan = solve(olmoe, RATES, req)
    record = plan.expert_use
    assert record.source == "measured" and record.tokens == 20 and record.path == str(path)
    assert len(record.sha256) == 64 and record.model == olmoe.name and record.text == "test text"
    assert any("measured use (use.json: 20 tokens" in n for n in plan.notes)
    doc = json.loads(json.dumps(plan.to_dict()))
    back = plan_from_dict(doc)
    assert back.expert_use == record and back.experts == plan.experts
    older = {k: v for k, v in doc.items() if k != "expert_use"}  # a plan written before it
    assert plan_from_dict(older).expert_use is None and plan_from_dict(older).experts == plan.experts
    with pytest.raises(PlanError, match="expert_use"):
        plan_from_dict({**doc, "expert_use": {"source": "guessed"}})
    uniform = solve(olmoe, RATES, replace(req, expert_use=None))
    assert uniform.expert_use.source == "uniform" and "expert_use" in uniform.to_dict()


def test_run_and_export_predict_a_moe_plan_as_the_planner_did(olmoe):
    """costmodel.predict (run --json, bench, --export) prices the plan's own experts placement
    with the request's statistics: the planner's figure, not every expert on the CPU."""
    from hetegen_cli.plan.costmodel.predict import CostInputs, Execution, predict
    from hetegen_cli.plan.solver import make_plan
    from tests.fakes import make_profile

    profile = make_profile(ram_available=64 * GiB)
    stats, _ = expert_stats(routed(olmoe, 2, 1.2, 30), olmoe)
    for use in (None, stats):
        req = PlanRequest(prompt_len=128, max_new_tokens=16, gpu_budget_bytes=5 * GiB, expert_use=use)
        plan = make_plan(olmoe, profile, req)
        assert sum(len(x.gpu) for x in plan.experts) > 0
        fig = predict(olmoe, Execution(plan, "cuda"), req, CostInputs.of(profile))
        assert fig.decode_s_per_token == pytest.approx(plan.predictions.hetegen.decode_s_per_token, rel=1e-9)


# --- refused files -------------------------------------------------------------------------------


def test_a_file_for_another_model_is_refused_with_one_clear_error(olmoe):
    qwen = spec_from_config(presets.preset_config("qwen3-30b-a3b"), "qwen3-30b-a3b")
    dense = spec_from_config(presets.preset_config("llama-2-7b"), "llama-2-7b")
    use = uniform_use(olmoe)
    cases = [
        (use, qwen, "counted on olmoe-1b-7b (olmoe), not a qwen3_moe model"),
        (use.model_copy(update={"architecture": "qwen3_moe"}), qwen, "64 experts per layer, top-8"),
        (use, dense, "dense model"),
        (use.model_copy(update={"layers": use.layers[:-1]}), olmoe, "15 mixture-of-experts layers"),
    ]
    for bad, spec, needle in cases:
        with pytest.raises(InputError, match=re.escape(needle)) as info:
            expert_stats(bad, spec, "use.json")
        assert info.value.hint and "\n" not in info.value.message
    other = use.model_copy(update={"config_hash": "0123"})
    _, warnings = expert_stats(other, olmoe, "use.json")
    assert len(warnings) == 1 and "config hash 0123" in warnings[0]


# --- eval -> plan -> run on a tiny MoE model -----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    """A tiny random Qwen3-MoE folder: 2 layers of 8 experts, top-2."""
    from tests.helpers import tiny_moe_folder

    return tiny_moe_folder(tmp_path_factory.mktemp("moe-use"))


def test_eval_counts_feed_plan_and_run_executes_the_plan(tiny_moe, tmp_path):
    from hetegen_cli.models.architecture.folder import spec_from_folder
    from hetegen_cli.profile.expert_use import load_expert_use
    from tests.cli.test_run import PROMPT, _run
    from tests.fakes import make_profile
    from tests.helpers import assert_error, cli, count_expert_use

    use = count_expert_use(tiny_moe, tmp_path)
    counts = load_expert_use(use)
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(make_profile()))
    spec, _ = spec_from_folder(tiny_moe)
    args = ["plan", "--model", str(tiny_moe), "--profile", str(profile), "--prompt-len", "16"]
    args += ["--max-new-tokens", "8", "--cpu-dtype", "float32"]
    everything = json.loads(cli(*args, "--gpu-memory", "4GiB", "--cpu-moe", "--json").stdout)
    three = everything["memory"]["gpu"]["total_bytes"] + 3 * spec.experts[0].expert_bytes
    out = tmp_path / "plan.json"
    made = cli(*args, "--gpu-memory", str(three), "--expert-use", str(use), "--output", str(out), "--json")
    assert made.exit_code == 0, made.stderr
    doc = json.loads(made.stdout)
    record = doc["expert_use"]
    assert record["source"] == "measured" and record["tokens"] == counts.tokens and record["path"] == str(use)
    # the three experts chosen most often (ties: lower layer, lower number) on the GPU side
    ranked = sorted((-c, u.layer, e) for u in counts.layers for e, c in enumerate(u.counts))
    hottest = {(layer, e) for _, layer, e in ranked[:3]}
    assert {(x["layer_index"], e) for x in doc["experts"] for e in x["gpu"]} == hottest
    ran = _run(
        "--model",
        str(tiny_moe),
        "--prompt",
        PROMPT,
        "-n",
        "4",
        "--json",
        "--plan",
        str(out),
        "--device",
        "cpu",
    )
    assert ran.exit_code == 0, ran.stderr
    assert json.loads(ran.stdout)["plan"]["experts_on_gpu"] == 3
    # a file for another model, a damaged one
    wrong = cli("plan", "--model", "olmoe-1b-7b", "--profile", str(profile), "--expert-use", str(use))
    assert_error(wrong, "was counted on", "not a olmoe model", "hetegen eval")
    damaged = tmp_path / "damaged.json"
    damaged.write_text(use.read_text()[:-20])
    assert_error(cli(*args, "--expert-use", str(damaged)), str(damaged))
    assert_error(cli(*args, "--expert-use", str(tmp_path / "none.json")), "does not exist")


def test_run_and_bench_plan_on_the_fly_with_the_counts(tiny_moe, tmp_path, monkeypatch):
    """`run --gpu-memory B --expert-use FILE` and `bench --expert-use FILE` place the experts
    by the counts as `plan --expert-use` does (CUDA faked by the CPU stand-in); with --plan
    the flag is refused."""
    from hetegen_cli.bench import prepare
    from hetegen_cli.core.devices import CpuBackend
    from hetegen_cli.models.architecture.folder import spec_from_folder
    from hetegen_cli.profile.document import save_profile
    from hetegen_cli.profile.expert_use import load_expert_use
    from hetegen_cli.run import builders
    from tests.cli.test_run import PROMPT, _run
    from tests.fakes import make_profile
    from tests.helpers import assert_error, cli, count_expert_use, fake_cuda_for_bench, quick_bench_options

    use = count_expert_use(tiny_moe, tmp_path)
    counts = load_expert_use(use)
    ranked = sorted((-c, u.layer, e) for u in counts.layers for e, c in enumerate(u.counts))
    hottest = {(layer, e) for _, layer, e in ranked[:3]}
    profile = tmp_path / "profile.json"
    save_profile(make_profile(gpu=True), profile)
    spec, _ = spec_from_folder(tiny_moe)
    args = ["plan", "--model", str(tiny_moe), "--profile", str(profile), "--prompt-len", "16"]
    args += ["--max-new-tokens", "8", "--cpu-dtype", "float32", "--gpu-memory", "4GiB", "--cpu-moe", "--json"]
    base = json.loads(cli(*args).stdout)["memory"]["gpu"]["total_bytes"]
    three = str(base + 3 * spec.experts[0].expert_bytes)

    monkeypatch.setattr(builders, "cuda_available", lambda: True)
    monkeypatch.setattr(builders, "get_backend", lambda kind="auto": CpuBackend())
    run_args = ("--model", str(tiny_moe), "--prompt", PROMPT, "-n", "4", "--json", "--profile", str(profile))
    ran = _run(*run_args, "--gpu-memory", three, "--expert-use", str(use))
    assert ran.exit_code == 0, ran.stderr
    doc = json.loads(ran.stdout)
    assert doc["plan"]["origin"] == "planned on the fly" and doc["plan"]["experts_on_gpu"] == 3
    assert any(f"measured use (use.json: {counts.tokens} tokens" in n for n in doc["plan"]["notes"])
    assert_error(_run(*run_args, "--plan", str(use), "--expert-use", str(use)), "--expert-use", exit_code=2)

    fake_cuda_for_bench(monkeypatch)
    options = quick_bench_options(tiny_moe, profile, (int(three),), ("hetegen",), expert_use_path=use)
    case = prepare.make_cases(
        prepare.resolve_bench_model(options)[0], options, *prepare.load_or_measure(profile)
    )[0]
    assert {(x.layer_index, e) for x in case.plan.experts for e in x.gpu} == hottest
    assert case.plan.expert_use.source == "measured" and case.moe_plan.summary()["experts_on_gpu"] == 0
