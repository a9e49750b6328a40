"""Trace replay: the engine's recorded operations timed with a profile's rates (pure Python).

`engine.trace` records what the engine issues, in order, for one prefill and one decode
forward (copies, kernels, the CPU share, events, host waits, the host time between them) on the
CPU stand-in; `run.simulate` records it on a small proxy of the plan's model. This module
replays such an op list in a discrete-event model of one GPU machine (docs/plan.md, "Trace
replay"):

host, streams and resources as in plan.replay (the discrete-event core).

Each op is priced by plan.trace_pricing (durations from the cost model at the plan's sizes)
and replayed by plan.replay; this module builds the plan's `simulation` section.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from hetegen_cli.core.errors import PlanError
from hetegen_cli.core.phase import PHASES
from hetegen_cli.models.shapes.spec import ModelSpec
from hetegen_cli.plan import costmodel as cm
from hetegen_cli.plan.costmodel.fixed import linear_mode
from hetegen_cli.plan.costmodel.strategies import figures, with_speedups
from hetegen_cli.plan.document import LinearPlacement, Plan
from hetegen_cli.plan.expert_stats import ExpertStats
from hetegen_cli.plan.replay import Replay
from hetegen_cli.plan.request import PlanRequest
from hetegen_cli.plan.sections import HostPart
from hetegen_cli.plan.trace_pricing import Pricing, carried_copies, replay, segments

#: the kinds a timeline draws, in legend order
KINDS = (
    "host",
    "cpu",
    "blocked",
    "weight copy",
    "y copy",
    "x copy",
    "matmul",
    "resident",
    "attention",
    "lm head",
    "bias",
    "expert copy",
    "experts",
)
#: trace prompt lengths above this are recorded at this length (run.simulate)
TRACE_PROMPT_CAP = 512


# --- host time per linear ---------------------------------------------------------------------


def host_by_mode(ops: list[dict], placements: tuple[LinearPlacement, ...], phase: str) -> dict[str, Any]:
    """The trace's host seconds (the recorded gaps) of one pass: in total, and per traced
    linear by mode (split, stream: all on the GPU, inline: all on the CPU), each linear's
    from its forward's start to the next one's (so the model's own work between linears,
    norms and attention included, lands on the linear after it)."""
    order = [pl for pl in placements if not pl.resident]
    starts = segments(ops, [pl.name for pl in order])
    bounds = [starts[pl.name] for pl in order] + [len(ops)]
    gaps = [float(op.get("gap_s") or 0.0) for op in ops]
    modes: dict[str, dict[str, float]] = {}
    for i, pl in enumerate(order):
        mode = linear_mode(pl, phase) or "resident"
        seg = gaps[bounds[i] : bounds[i + 1]]
        entry = modes.setdefault(mode, {"count": 0, "total_s": 0.0, "within_s": 0.0})
        entry["count"] += 1
        entry["total_s"] += sum(seg)
        entry["within_s"] += sum(seg[1:])  # without the gap before its first op
    for entry in modes.values():
        entry["mean_s"] = entry["total_s"] / entry["count"]
        entry["within_mean_s"] = entry["within_s"] / entry["count"]
    return {"total_s": sum(gaps), "outside_s": sum(gaps[: bounds[0]]), "linears": modes}


# --- a plan's simulation ---------------------------------------------------------------------


def trace_phases(trace: dict) -> dict[str, list[dict]]:
    """The trace's op lists by phase, without the host time before the first traced pass: a
    Tracer made before trace_steps' untraced warm-up counts the warm-up there. (The decode
    pass's own `pass` gap stays: the prefill's tail, LM head and token choice, the host work
    between two steps.)"""
    phases = {phase: list(ops) for phase, ops in trace["phases"].items()}
    first = phases.get("prefill") or []
    if first and first[0]["op"] == "pass":
        first[0] = {**first[0], "gap_s": 0.0}
    return phases


def phase_rates_of(plan: Plan) -> cm.PhaseRates:
    """The PhaseRates a plan was priced with (its `rates` section)."""
    r = plan.rates
    if r is None:
        raise PlanError("the plan has no `rates` section to price its trace with", "re-run `hetegen plan`")
    quant = {fmt: cm.Rates.from_dict(v) for fmt, v in (r.quant or {}).items()}
    return cm.PhaseRates(cm.Rates.from_dict(r.prefill), cm.Rates.from_dict(r.decode), quant)


def request_of(plan: Plan) -> PlanRequest:
    w = plan.workload
    return PlanRequest(prompt_len=w.prompt_len, max_new_tokens=w.max_new_tokens, batch_size=w.batch_size)


@dataclass
class PhaseSimulation:
    phase: str
    simulated: Replay
    ideal: Replay  # no host cost
    host: dict[str, Any]


def simulate_plan(
    plan: Plan,
    spec: ModelSpec,
    trace: dict,
    *,
    copy_engines: int | None = None,
    host_scale: float = 1.0,
    rates: cm.PhaseRates | None = None,
    use: ExpertStats | None = None,
) -> dict[str, PhaseSimulation]:
    """Replay both phases of `trace` (engine.trace.trace_steps of the plan, or of a proxy with
    the same linears and experts) with the plan's sizes and rates; `copy_engines` defaults to
    the plan's; `use`: the expert use the plan was made with (None: uniform)."""
    rates = rates or phase_rates_of(plan)
    engines = copy_engines or plan.runtime.copy_engines
    req = request_of(plan)
    head_on_gpu = plan.runtime.lm_head_on_gpu
    phases = trace_phases(trace)
    carry = carried_copies(phases["decode"])  # the pass before either phase: a decode step
    out = {}
    for phase in PHASES:
        pricing = Pricing(
            plan.placements, rates, spec, req, phase, head_on_gpu, experts=plan.experts, use=use
        )
        ops = phases[phase]
        out[phase] = PhaseSimulation(
            phase,
            replay(ops, pricing, copy_engines=engines, host_scale=host_scale, carry=carry),
            replay(ops, pricing, copy_engines=engines, host_scale=0.0, carry=carry),
            host_by_mode(ops, plan.placements, phase),
        )
    return out


def with_simulation(
    plan: Plan,
    spec: ModelSpec,
    trace: dict,
    *,
    fixed_costs_on_gpu: bool,
    copy_engines: int | None = None,
    recorded: dict | None = None,
    use: ExpertStats | None = None,
) -> tuple[Plan, dict[str, PhaseSimulation]]:
    """`plan` with a `simulation` section (docs/plan.md, "Trace replay") and, unless the
    profile measured the engine's costs on the GPU (`fixed_costs_on_gpu`: they are in the
    prediction already), the trace's host time added to its hetegen prediction."""
    sims = simulate_plan(plan, spec, trace, copy_engines=copy_engines, use=use)
    engines = copy_engines or plan.runtime.copy_engines
    req = request_of(plan)
    notes = list(plan.notes)
    predictions, bounds = plan.predictions, plan.bounds
    host_term = {ph: sims[ph].host["total_s"] for ph in PHASES}
    hetegen = predictions.hetegen
    added = False
    if hetegen and not fixed_costs_on_gpu:
        new = figures(
            req,
            hetegen.prefill_s + host_term["prefill"],
            hetegen.decode_s_per_token + host_term["decode"],
            hetegen.gpu_memory_bytes,
        )
        carried = {k: getattr(hetegen, k) for k in hetegen.model_fields_set if k not in new.model_fields_set}
        hetegen = new.model_copy(
            update={
                **carried,
                "host": HostPart(
                    prefill_s=host_term["prefill"],
                    decode_s_per_token=host_term["decode"],
                    source="trace replay (the engine's host time on the CPU stand-in)",
                ),
            }
        )
        predictions = with_speedups(predictions.model_copy(update={"hetegen": hetegen}))
        if bounds is not None and bounds.bound_s_per_token and hetegen.decode_s_per_token > 0:
            fraction = bounds.bound_s_per_token / hetegen.decode_s_per_token
            bounds = bounds.model_copy(update={"plan_fraction_of_bound": fraction})
        added = True
        notes.append(
            f"the hetegen prediction includes the engine's host time from the trace replay "
            f"({host_term['decode'] * 1e3:.2f} ms per decode step, {host_term['prefill'] * 1e3:.1f} ms "
            "per prefill): the profile has no engine costs measured on the GPU; the other "
            "strategies' predictions leave it out"
        )
    elif hetegen:
        notes.append(
            "the trace's host time is not added to the prediction: the profile's engine costs, "
            "measured on the GPU, are in it already"
        )
    section: dict[str, Any] = {
        "copy_engines": engines,
        "host_scale": 1.0,
        "host_term_added": added,
        "recorded": dict(recorded or {}),
    }
    for phase in PHASES:
        sim = sims[phase]
        predicted = hetegen.seconds(phase) if hetegen else None
        entry = {
            "simulated_s": sim.simulated.step_s,
            "ideal_s": sim.ideal.step_s,
            "predicted_s": predicted,
            "simulated_over_predicted_time": (sim.simulated.step_s / predicted if predicted else None),
            **{k: v for k, v in sim.simulated.to_dict().items() if k != "step_s"},
            "ideal_critical_path": sim.ideal.to_dict()["critical_path"],
            "host": _host_summary(sim.host),
        }
        if phase == "decode":
            b = req.batch_size
            entry["simulated_tokens_per_s"] = b / sim.simulated.step_s if sim.simulated.step_s > 0 else None
            entry["ideal_tokens_per_s"] = b / sim.ideal.step_s if sim.ideal.step_s > 0 else None
            entry["predicted_tokens_per_s"] = hetegen.decode_tokens_per_s if hetegen else None
            if entry["predicted_tokens_per_s"] and entry["simulated_tokens_per_s"]:
                entry["simulated_fraction_of_predicted"] = (
                    entry["simulated_tokens_per_s"] / entry["predicted_tokens_per_s"]
                )
        section[phase] = entry
    return replace(plan, predictions=predictions, bounds=bounds, notes=tuple(notes), simulation=section), sims


def _host_summary(host: dict) -> dict:
    return {
        "total_s": host["total_s"],
        "per_linear": {
            mode: {"count": e["count"], "mean_s": e["mean_s"], "within_forward_mean_s": e["within_mean_s"]}
            for mode, e in host["linears"].items()
        },
    }
