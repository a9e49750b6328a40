"""Trace replay on recorded traces (engine.trace on the strict stand-in, plan.simulate) and the
trace proxy of a plan (run.simulate)."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from hetegen_cli.core.errors import InputError
from hetegen_cli.engine.hetero_model import load_hetero_model
from hetegen_cli.engine.trace import trace_steps
from hetegen_cli.models.architecture.spec import spec_from_config
from hetegen_cli.models.loading.source import resolve_model
from hetegen_cli.models.shapes.presets import preset_config
from hetegen_cli.plan import costmodel as cm
from hetegen_cli.plan import replay as rp
from hetegen_cli.plan import simulate as sim
from hetegen_cli.plan import trace_pricing as tp
from hetegen_cli.plan.costmodel.experts import experts_step_s, placement_parts, step_tokens
from hetegen_cli.plan.costmodel.strategies import step_times
from hetegen_cli.plan.document import LinearPlacement, RuntimeSettings
from hetegen_cli.plan.manual import manual_plan
from hetegen_cli.plan.request import PlanRequest
from hetegen_cli.run.simulate import proxy_config, proxy_experts, proxy_placements
from tests.engine.conftest import EXPERTS, expert_placements, placements
from tests.engine.test_strict_backend import FP32
from tests.fakes import DESKTOP_RATES
from tests.models.architecture.test_architectures import _tiny
from tests.strict import StrictBackend

PROMPT = 8
REQ = PlanRequest(prompt_len=PROMPT, max_new_tokens=8)


def record(ref, plan_placements, buffers, engines):
    rt = RuntimeSettings(
        weights_dtype="float32",
        cpu_dtype_prefill="float32",
        cpu_dtype_decode="float32",
        staging_buffers=buffers,
        prefetch_depth=buffers - 1,
        copy_engines=engines,
    )
    with load_hetero_model(ref, plan_placements, rt, StrictBackend(), progress=False) as lm:
        return trace_steps(lm.model, PROMPT, ref.spec.vocab_size)


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return resolve_model(str(tiny_llama_dir), need_weights=True, dtype="float32")


def pipeline_compatible(lin, i):
    """Streamed whole (k = 0) where the next linear shares the input (q, k; gate), so no CPU
    share starts early on a shared host copy of its input; the rest split, the same rows in
    both phases (the copies carried into prefill have the decode rows)."""
    if lin.role in ("q", "k", "gate"):
        return False, 0, 0
    rows = 16 if lin.out_features > 16 else 8
    return False, rows, rows


#: the tests' desktop rates, and the same with a PCIe so slow that the GPU path is the bottleneck
RATE_SETS = {
    "desktop": replace(DESKTOP_RATES, weights_dtype="float32", h2d_copy_engines=2),
    "slow-pcie": replace(
        DESKTOP_RATES,
        weights_dtype="float32",
        h2d_copy_engines=2,
        pcie_bytes_per_s=0.3e9,
        pcie_bytes_per_s_concurrent=0.3e9,
    ),
}


def ideal_replay(trace, places, rates, phase, spec, buffers_unused=None, **kw):
    pricing = tp.Pricing(
        tuple(places), rates, spec, REQ, phase, small_copies=False, bias=False, attention="end"
    )
    carry = tp.carried_copies(trace["phases"]["decode"])
    return tp.replay(trace["phases"][phase], pricing, copy_engines=2, carry=carry, **kw)


@pytest.mark.parametrize("rate_set", sorted(RATE_SETS))
@pytest.mark.parametrize("buffers", [1, 2, 3])
def test_a_recorded_trace_replays_to_the_pipeline_model(llama, buffers, rate_set):
    """Host time, activation copies and bias kernels free, two copy engines: the replay of the
    engine's own trace is costmodel.pipeline_time over the same linears plus the same
    attention and LM head terms."""
    places = placements(llama.spec, pipeline_compatible)
    trace = record(llama, places, buffers, engines=2)
    rates = cm.PhaseRates.of(RATE_SETS[rate_set])
    assert len(tp.carried_copies(trace["phases"]["decode"])) == buffers - 1  # prefetch wraps around
    for phase in sim.PHASES:
        replayed = ideal_replay(trace, places, rates, phase, llama.spec, host_scale=0.0)
        _, expected = step_times(rates, llama.spec, REQ, places, phase, buffers, True)
        assert replayed.step_s == pytest.approx(expected, rel=1e-9), phase
        # the recorded host time only ever adds to it
        assert ideal_replay(trace, places, rates, phase, llama.spec).step_s > replayed.step_s


def test_resident_linears_let_the_engine_run_ahead_of_the_pipeline_model(llama):
    """A resident linear is launched without the host waiting for it, and the next weight copy
    is issued then: earlier than costmodel.pipeline_time assumes (after the linear before it
    started), so where the copies are the bottleneck the replay is faster."""
    places = placements(
        llama.spec, lambda lin, i: (True, 0, 0) if i % 3 == 0 else pipeline_compatible(lin, i)
    )
    trace = record(llama, places, 2, engines=2)
    rates = cm.PhaseRates.of(RATE_SETS["slow-pcie"])
    replayed = ideal_replay(trace, places, rates, "decode", llama.spec, host_scale=0.0)
    _, expected = step_times(rates, llama.spec, REQ, places, "decode", 2, True)
    assert replayed.step_s < expected * 0.99


def test_prepare_inserts_residents_attention_and_the_head(llama):
    def mixed(lin, i):
        if i % 3 == 0:
            return True, 0, 0
        return False, 16 if lin.out_features > 16 else 8, 0 if lin.role == "down" else 8

    places = placements(llama.spec, mixed)
    trace = record(llama, places, 2, engines=1)
    rates = cm.PhaseRates.of(replace(DESKTOP_RATES, weights_dtype="float32"))
    pricing = tp.Pricing(tuple(places), rates, llama.spec, REQ, "decode")
    ops = tp.prepare(trace["phases"]["decode"], pricing, tp.carried_copies(trace["phases"]["decode"]))
    kinds = [op.get("kind") for op in ops if op["op"] == "kernel"]
    assert kinds.count("resident") == sum(p.resident for p in places)
    assert kinds.count("attention") == llama.spec.num_layers
    assert ops[-1]["kind"] == "lm head" and ops[-1]["dur"] > 0
    # attention comes right before each layer's output projection (resident or not)
    kernels = [op for op in ops if op["op"] == "kernel" and op.get("what") not in ("bias", "dequant")]
    o_proj = {p.name for p in places if p.role == "o"}
    after = [b.get("linear") for a, b in itertools.pairwise(kernels) if a.get("kind") == "attention"]
    assert sorted(after) == sorted(o_proj)
    # every op of the trace priced: copies, kernels and CPU shares carry a duration
    assert all("dur" in op for op in ops if op["op"] in ("copy", "kernel", "cpu"))
    result = rp.run_ops(ops, copy_engines=1)
    assert result.step_s > 0 and result.busy_s["gpu"] > 0 and result.cpu_s > 0
    host = sim.host_by_mode(trace["phases"]["decode"], tuple(places), "decode")
    counts = {mode: e["count"] for mode, e in host["linears"].items()}
    assert counts == {"split": sum(1 for p in places if not p.resident and p.role != "down"),
                      "stream": sum(1 for p in places if not p.resident and p.role == "down")}  # fmt: skip
    assert host["total_s"] == pytest.approx(sum(op["gap_s"] for op in trace["phases"]["decode"]))


def test_a_trace_of_another_plan_is_refused(llama):
    places = placements(llama.spec, lambda lin, i: (False, 8, 8))
    trace = record(llama, places, 2, engines=1)
    other = [replace(p, resident=True, cpu_rows_prefill=0, cpu_rows_decode=0) if p.role == "o" else p
             for p in places]  # fmt: skip
    pricing = tp.Pricing(tuple(other[:-1]), cm.PhaseRates.of(DESKTOP_RATES), llama.spec, REQ, "decode")
    with pytest.raises(ValueError, match="does not place"):
        tp.prepare(trace["phases"]["decode"], pricing)


def test_the_proxy_keeps_names_layers_residency_and_modes():
    config = preset_config("opt-30b")
    spec = spec_from_config(config, "opt-30b")
    proxy_cfg = proxy_config(config, 512)
    proxy = spec_from_config(proxy_cfg, "proxy")
    assert [lin.name for lin in proxy.linears] == [lin.name for lin in spec.linears]
    assert proxy.hidden_size == 64 and proxy.num_layers == 48 and proxy.max_positions >= 520
    assert proxy.vocab_size == 512 and proxy.dtype == "float32"
    out = spec.linears[0].out_features  # 7168
    choices = [(True, 0, 0), (False, 0, 0), (False, out, out), (False, 16, out - 16),
               (False, 4000, 4016), (False, 4016, 4000), (False, 3000, 3000)]  # fmt: skip
    places = tuple(
        LinearPlacement(
            lin.name, lin.layer_index, lin.role, lin.out_features, lin.in_features, *choices[i % 7]
        )
        for i, lin in enumerate(spec.linears)
    )
    plan = manual_plan(spec, cpu_fraction_prefill=0.0, cpu_fraction_decode=0.0)
    plan = replace(plan, placements=places)
    mapped = proxy_placements(plan, proxy)
    for p, q in zip(places, mapped, strict=True):
        assert p.name == q.name and p.resident == q.resident
        for phase in sim.PHASES:
            k, kq = p.cpu_rows(phase), q.cpu_rows(phase)
            assert (k == 0) == (kq == 0) and (k == p.out_features) == (kq == q.out_features)
        if 0 < p.cpu_rows_prefill < p.out_features and 0 < p.cpu_rows_decode < p.out_features:
            order = (p.cpu_rows_prefill > p.cpu_rows_decode) - (p.cpu_rows_prefill < p.cpu_rows_decode)
            assert (q.cpu_rows_prefill > q.cpu_rows_decode) - (
                q.cpu_rows_prefill < q.cpu_rows_decode
            ) == order


def test_the_llama_proxy_keeps_grouped_query_attention():
    config = preset_config("llama-2-70b")  # 64 heads, 8 KV heads
    proxy = spec_from_config(proxy_config(config, 100), "proxy")
    assert proxy.num_heads == 4 and proxy.num_kv_heads == 1 and proxy.num_layers == 80
    assert [lin.name for lin in proxy.linears] == [lin.name for lin in spec_from_config(config, "x").linears]


# --- mixture-of-experts plans ------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3_moe")
    _tiny("qwen3_moe", folder)
    return resolve_model(str(folder), need_weights=True, dtype="float32")


def record_moe(ref, plan_placements, experts):
    backend = StrictBackend()
    with load_hetero_model(ref, plan_placements, FP32, backend, progress=False, experts=experts) as lm:
        return trace_steps(lm.model, PROMPT, ref.spec.vocab_size)


def moe_replay(trace, places, experts, rates, phase, spec, **kw):
    pricing = tp.Pricing(tuple(places), rates, spec, REQ, phase, small_copies=False, bias=False,
                         attention="end", experts=tuple(experts))  # fmt: skip
    return tp.replay(trace["phases"][phase], pricing, copy_engines=2, host_scale=0.0, **kw)


def analytic(rates, spec, places, experts, phase):
    """The plan's own prediction of one step: the linears' pipeline, attention and head
    (step_times) plus every MoE layer's experts (experts_step_s)."""
    _, linears = step_times(rates, spec, REQ, places, phase, 2, True)
    tokens = step_tokens(REQ, phase)
    moe = experts_step_s(rates[phase], spec.experts, experts, tokens, prefill=phase == "prefill",
                         quant=rates.quant)  # fmt: skip
    return linears + moe


RESIDENT = lambda lin, i: (True, 0, 0)  # noqa: E731


@pytest.mark.parametrize("rate_set", sorted(RATE_SETS))
def test_a_moe_trace_replays_to_the_plans_experts_terms(qwen3_moe, rate_set):
    """Dense linears resident, every other expert on the GPU side, the rest on the CPU: with
    host time and activation copies free the replay of the engine's trace is the plan's own
    prediction, each MoE layer the longer of its CPU and GPU sides after the layer's linears."""
    ref = qwen3_moe
    places = placements(ref.spec, RESIDENT)
    experts = expert_placements(ref.spec, EXPERTS["mixed"])
    trace = record_moe(ref, places, experts)
    rates = cm.PhaseRates.of(RATE_SETS[rate_set])
    for phase in sim.PHASES:
        assert sum(op["op"] == "experts" for op in trace["phases"][phase]) == len(ref.spec.experts)
        replayed = moe_replay(trace, places, experts, rates, phase, ref.spec)
        assert replayed.step_s == pytest.approx(analytic(rates, ref.spec, places, experts, phase), rel=1e-9)
        assert replayed.cpu_s > 0 and replayed.busy_s["gpu"] > 0
        # each layer's resident linears run between the experts of the layer before and its own
        pricing = tp.Pricing(tuple(places), rates, ref.spec, REQ, phase, experts=tuple(experts))
        layer_of = {p.name: p.layer_index for p in places}
        seen = set()
        for op in tp.prepare(trace["phases"][phase], pricing):
            seen.update([op["experts"]] if "experts" in op else [])
            if op.get("kind") == "resident":
                assert len(seen) == layer_of[op["linear"]], op["linear"]
    # every expert on the CPU: the GPU only runs the linears, attention and head
    on_cpu = expert_placements(ref.spec, EXPERTS["all_cpu"])
    trace = record_moe(ref, places, on_cpu)
    replayed = moe_replay(trace, places, on_cpu, rates, "decode", ref.spec)
    assert replayed.step_s == pytest.approx(analytic(rates, ref.spec, places, on_cpu, "decode"), rel=1e-9)


def test_split_and_streamed_experts_copy_on_their_own_stream(qwen3_moe):
    """A decode split and prefill streaming: the pieces' copies run on the experts' side stream
    from the moment they are issued, so they overlap the layer's resident linears, which the
    plan's prediction adds after them: the replay lies between the prediction less those
    linears and the prediction, and the copies take the plan's seconds."""
    ref = qwen3_moe
    places = placements(ref.spec, RESIDENT)
    x = ref.spec.experts[0]
    experts = [replace(p, split_units=x.split_step, stream_prefill=True)
               for p in expert_placements(ref.spec, EXPERTS["mixed"])]  # fmt: skip
    trace = record_moe(ref, places, experts)
    rates = cm.PhaseRates.of(RATE_SETS["slow-pcie"])
    for phase in sim.PHASES:
        replayed = moe_replay(trace, places, experts, rates, phase, ref.spec)
        want = analytic(rates, ref.spec, places, experts, phase)
        resident = sum(cm.gpu_time(rates[phase], p.out_features, p.in_features, step_tokens(REQ, phase))
                       for p in places)  # fmt: skip
        assert want - resident - 1e-12 <= replayed.step_s <= want * (1 + 1e-9), phase
        tokens = step_tokens(REQ, phase)
        copies = sum(
            placement_parts(rates[phase], s, p, None, tokens, phase == "prefill", True, rates.quant).copy_s
            for s, p in zip(ref.spec.experts, experts, strict=True)
        )
        copied = sum(i.end - i.start for i in replayed.items if i.kind == "expert copy")
        assert copies > 0 and copied == pytest.approx(copies, rel=1e-9)
        assert all(i.lane == "h2d:copy" for i in replayed.items if i.kind == "expert copy")
    # prefill streaming leaves the CPU nothing to do in prefill
    assert moe_replay(trace, places, experts, rates, "prefill", ref.spec).cpu_s == 0


def test_a_moe_trace_of_another_model_is_refused(qwen3_moe):
    ref = qwen3_moe
    places = placements(ref.spec, RESIDENT)
    experts = expert_placements(ref.spec, EXPERTS["mixed"])
    ops = record_moe(ref, places, experts)["phases"]["decode"]
    rates = cm.PhaseRates.of(DESKTOP_RATES)
    missing = [op for op in ops if op.get("experts") != ref.spec.experts[-1].name]
    pricing = tp.Pricing(tuple(places), rates, ref.spec, REQ, "decode", experts=tuple(experts))
    with pytest.raises(ValueError, match="no operations of the experts"):
        tp.prepare(missing, pricing)
    extra = [*ops, {"op": "experts", "experts": "model.layers.9.mlp.experts", "tokens": 1, "gap_s": 0.0}]
    with pytest.raises(ValueError, match="which the model does not have"):
        tp.prepare(extra, pricing)


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "mixtral-8x7b", "olmoe-1b-7b"])
def test_the_moe_proxy_keeps_experts_top_k_and_placements(name):
    config = preset_config(name)
    spec = spec_from_config(config, name)
    proxy = spec_from_config(proxy_config(config, 64), "proxy")
    assert [(x.name, x.num_experts, x.top_k) for x in proxy.experts] == [
        (x.name, x.num_experts, x.top_k) for x in spec.experts
    ]
    assert [lin.name for lin in proxy.linears] == [lin.name for lin in spec.linears]
    assert {x.intermediate_size for x in proxy.experts} == {64}
    plan = manual_plan(spec, cpu_fraction_prefill=1.0, cpu_fraction_decode=1.0)
    x = spec.experts[0]
    plan = replace(plan, experts=(
        replace(plan.experts[0], gpu=(1, 3), split_units=x.split_step * 3, stream_prefill=True),
        *plan.experts[1:],
    ))  # fmt: skip
    mapped = proxy_experts(plan, proxy)
    assert mapped[0].gpu == (1, 3) and mapped[0].stream_prefill and mapped[0].split_units == 32
    assert all(m.split_units == 0 and m.gpu == () for m in mapped[1:])
    more = replace(plan.experts[0], num_experts=x.num_experts + 1)
    wrong = replace(plan, experts=(more, *plan.experts[1:]))
    with pytest.raises(InputError, match="no experts"):
        proxy_experts(wrong, proxy)
