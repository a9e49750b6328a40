"""Trace replay: the engine's recorded operations timed with a profile's rates (pure Python).

`engine.trace` records what the engine issues, in order, for one prefill and one decode
forward (copies, kernels, the CPU share, events, host waits, the host time between them) on the
CPU stand-in; `run.simulate` records it on a small proxy of the plan's model. This module
replays such an op list in a discrete-event model of one GPU machine (docs/plan.md, "Trace
replay"):

host, streams and resources as in plan.replay (the discrete-event core).

Durations come from the cost model the planner uses (plan.costmodel), with sizes from the
plan's placements, never from the trace (whose rows are the proxy's): a weight copy is
`transfer_time` of the streamed rows (concurrent rates when the linear is split, as
`split_times`), a matmul `gpu_time`, a CPU share `cpu_time`, the activation copies `pcie_copy_s
+ bytes / B_pcie` (x: tokens x in, y: tokens x CPU rows, in the weights dtype), a bias kernel
`gpu_call_s`; a dequantization kernel costs 0 because its traffic is already in `gpu_time`
(`gpu_dequant_bytes_per_param`). Work the trace does not show is added as compute-stream
kernels: resident linears (plain device linears, `gpu_time` of the whole weight) where they
run, each layer's share of the plan's attention term before its attention output projection,
and the LM head (when it is not a placement) at the end.

Copies issued at the end of the previous pass for this one (prefetch wraps around; they have
the decode rows) are issued again at time 0 here, as `costmodel.pipeline_time` assumes; events
recorded before the pass (a buffer's "free" event, an output slot's "read" event) are complete
at time 0.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from hetegen_cli.core.dtypes import itemsize
from hetegen_cli.core.phase import PHASES
from hetegen_cli.models.spec import ModelSpec
from hetegen_cli.plan import costmodel as cm
from hetegen_cli.plan.document import LinearPlacement, Plan
from hetegen_cli.plan.overheads import linear_mode
from hetegen_cli.plan.predictions import attention_for, figures, head_time, tokens_for
from hetegen_cli.plan.replay import Replay, run_ops
from hetegen_cli.plan.request import PlanRequest

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
)
#: trace prompt lengths above this are recorded at this length (run.simulate)
TRACE_PROMPT_CAP = 512


# --- pricing a trace with the plan's sizes and the profile's rates ---------------------------


@dataclass(frozen=True)
class Pricing:
    """What the replay of one phase needs besides the ops: the plan's placements (execution
    order), the rates as the plan prices them, the model's shapes and the workload."""

    placements: tuple[LinearPlacement, ...]
    rates: cm.PhaseRates
    spec: ModelSpec
    req: PlanRequest
    phase: str
    head_on_gpu: bool = True
    small_copies: bool = True  # price the x and y copies (False: free, the analytic model's view)
    bias: bool = True  # price bias kernels
    attention: str = "layer"  # "layer": before each attention output projection; "end"; "none"

    def rates_of(self, name: str, phase: str) -> cm.Rates:
        quant = self.spec.quant_map().get(name)
        return self.rates.of_linear(phase, quant[0] if quant else None)

    def tokens(self, role: str) -> int:
        return tokens_for(role, self.req, self.phase)


def _owner(op: dict) -> str | None:
    """The linear whose own forward issued `op` (None for prefetch copies, events, waits)."""
    if op["op"] in ("kernel", "cpu") or (op["op"] == "copy" and op.get("what") in ("x", "y")):
        return op.get("linear")
    return None


def _matmuls(ops: list[dict]) -> dict[str, int]:
    """Where each linear's GPU matmul is issued (its weight share is acquired before it)."""
    out: dict[str, int] = {}
    for i, op in enumerate(ops):
        if op["op"] == "kernel" and op.get("what") == "matmul":
            out.setdefault(op.get("linear"), i)
    return out


def _for_next_pass(ops: list[dict]) -> list[bool]:
    """For each op: is it a weight copy issued for the next pass? (prefetch wraps around: a
    copy of a linear that has no matmul left in this pass)."""
    matmul = _matmuls(ops)
    return [
        op["op"] == "copy" and op.get("what") == "weight" and i > matmul.get(op.get("linear"), -1)
        for i, op in enumerate(ops)
    ]


def carried_copies(ops: list[dict]) -> list[dict]:
    """The weight copies a pass issues for the next pass, in order."""
    return [op for op, nxt in zip(ops, _for_next_pass(ops), strict=True) if nxt]


def segments(ops: list[dict], order: list[str]) -> dict[str, int]:
    """Where each traced linear's forward starts in `ops`: the first op after the previous
    linear's own work that is its own (an activation copy, a kernel, its CPU share) or a
    compute-stream wait (the acquire of its weight share). `order`: the traced linears in
    execution order. ValueError when a linear of the plan is missing from the trace."""
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, op in enumerate(ops):
        name = _owner(op)
        if name is not None:
            first.setdefault(name, i)
            last[name] = i
    starts: dict[str, int] = {}
    after = -1
    for name in order:
        if name not in first:
            raise ValueError(
                f"the trace has no operations of linear {name}: it was recorded for another plan"
            )
        j = after + 1
        while j < first[name]:
            op = ops[j]
            if op["op"] == "wait" and op.get("stream") == "compute":
                break
            j += 1
        starts[name] = j
        after = last[name]
    return starts


def prepare(ops: list[dict], pricing: Pricing, carry: list[dict] | None = None) -> list[dict]:
    """The ops of one traced pass, priced (each copy, kernel and CPU share gains `dur` and a
    `label`), with the work the trace does not show inserted (module docstring) and the copies
    carried from the pass before (`carry`, from `carried_copies`) issued first."""
    p = pricing
    by_name = {pl.name: pl for pl in p.placements}
    order = [pl.name for pl in p.placements if not pl.resident]
    starts = segments(ops, order)
    next_pass = _for_next_pass(ops)
    wdt = itemsize(p.rates[p.phase].weights_dtype)
    rates = p.rates[p.phase]

    def pcie(nbytes: float) -> float:
        if not p.small_copies or nbytes <= 0:
            return 0.0
        return rates.pcie_copy_s + nbytes / rates.pcie_bytes_per_s

    def role(name: str | None) -> str:
        return by_name[name].role if name in by_name else "?"

    def weight_copy(op: dict, rows_phase: str) -> dict:
        pl = by_name.get(op.get("linear"))
        if pl is None:
            raise ValueError(f"the trace copies {op.get('linear')}, which the plan does not place")
        k = pl.cpu_rows(rows_phase)
        dur = cm.transfer_time(
            p.rates_of(pl.name, rows_phase), pl.out_features - k, pl.in_features, 0 < k < pl.out_features
        )
        return {**op, "dur": dur, "label": f"weight copy ({pl.role})", "rows_phase": rows_phase}

    def for_next(op: dict) -> dict:  # a weight copy, or the record after one, for the next pass
        return {**op, "next_pass": True}

    def price(op: dict, index: int) -> dict:
        kind = op["op"]
        name = op.get("linear")
        if kind == "copy" and op.get("what") == "weight":
            # for this pass, or (prefetch wraps around) for the next one, a decode step
            if next_pass[index]:
                return for_next(weight_copy(op, "decode"))
            return weight_copy(op, p.phase)
        if op.get("stream") == "copy" and (
            (kind == "record" and index and next_pass[index - 1])  # its "ready" event
            or (kind == "wait" and index + 1 < len(ops) and next_pass[index + 1])  # its buffer's
        ):
            return for_next(op)  # around a copy for the next pass
        if kind not in ("copy", "kernel", "cpu"):
            return dict(op)
        pl = by_name.get(name)
        if pl is None:
            raise ValueError(f"the trace runs {name}, which the plan does not place")
        k = pl.cpu_rows(p.phase)
        n = p.tokens(pl.role)
        r = p.rates_of(name, p.phase)
        split = 0 < k < pl.out_features
        what = op.get("what")
        if kind == "cpu":
            return {
                **op,
                "dur": cm.cpu_time(r, k, pl.in_features, n, split),
                "label": f"CPU share ({pl.role})",
            }
        if kind == "copy":  # activations: x to the host, the CPU result back
            nbytes = n * (pl.in_features if what == "x" else k) * wdt
            label = "x copy to host" if what == "x" else "CPU result copy"
            return {**op, "dur": pcie(nbytes), "label": label}
        if what == "matmul":
            dur = cm.gpu_time(r, pl.out_features - k, pl.in_features, n)
            return {**op, "dur": dur, "label": f"GPU matmul ({pl.role})"}
        if what == "bias":
            return {**op, "dur": rates.gpu_call_s if p.bias else 0.0, "label": "bias"}
        # dequantization: its traffic is in gpu_time (gpu_dequant_bytes_per_param)
        return {**op, "dur": 0.0, "label": "dequantize"}

    layers = max(1, p.spec.num_layers)
    attn_total = attention_for(rates, p.spec, p.req, p.phase, p.spec.num_layers, True)
    has_o = any(pl.role == "o" for pl in p.placements)
    per_layer = p.attention == "layer" and has_o

    def kernel(kind: str, label: str, dur: float, name: str | None = None) -> dict:
        return {"op": "kernel", "stream": "compute", "what": kind, "kind": kind, "label": label,
                "linear": name, "gap_s": 0.0, "dur": dur}  # fmt: skip

    inserts: dict[int, list[dict]] = {}
    pending: list[dict] = []
    for pl in p.placements:
        if per_layer and pl.role == "o":
            pending.append(kernel("attention", "attention (GPU)", attn_total / layers))
        if pl.resident:
            n = p.tokens(pl.role)
            dur = cm.gpu_time(p.rates_of(pl.name, p.phase), pl.out_features, pl.in_features, n)
            pending.append(kernel("resident", f"GPU matmul, resident ({pl.role})", dur, pl.name))
        elif pending:
            inserts.setdefault(starts[pl.name], []).extend(pending)
            pending = []
    tail = list(pending)
    if p.attention == "end" or (p.attention == "layer" and not has_o):
        tail.append(kernel("attention", "attention (GPU)", attn_total))
    if p.head_on_gpu and p.spec.lm_head.name not in by_name:
        tail.append(kernel("lm head", "LM head (GPU)", head_time(rates, p.spec, p.req, True), "lm_head"))

    out: list[dict] = []
    # copies issued in the pass before, for this one: again at time 0, as pipeline_time has it
    carried: dict[str, int] = {}
    for j, op in enumerate(carry or []):
        if op.get("linear") not in by_name:
            continue
        event = -(j + 1)
        carried[op["linear"]] = event
        out.append({**weight_copy(op, "decode"), "gap_s": 0.0})
        out.append({"op": "record", "stream": "copy", "event": event, "gap_s": 0.0})
    recorded = {op["event"] for op in ops if op["op"] == "record"}
    for i, op in enumerate(ops):
        out.extend(inserts.get(i, ()))
        priced = price(op, i)
        if op["op"] == "wait" and op.get("stream") == "compute" and op.get("event") not in recorded:
            nxt = next((o for o in ops[i + 1 :] if o["op"] == "kernel"), None)
            name = nxt.get("linear") if nxt else None
            if name in carried:  # the acquire of a copy issued in the pass before
                priced["event"] = carried.pop(name)
        out.append(priced)
    out.extend(tail)
    return out


def replay(
    ops: list[dict],
    pricing: Pricing,
    *,
    copy_engines: int = 1,
    host_scale: float = 1.0,
    carry: list[dict] | None = None,
) -> Replay:
    """Price one traced pass with the plan (`prepare`) and replay it (`run_ops`)."""
    return run_ops(prepare(ops, pricing, carry), copy_engines=copy_engines, host_scale=host_scale)


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
    quant = {fmt: cm.Rates.from_dict(v) for fmt, v in (r.get("quant") or {}).items()}
    return cm.PhaseRates(cm.Rates.from_dict(r["prefill"]), cm.Rates.from_dict(r["decode"]), quant)


def request_of(plan: Plan) -> PlanRequest:
    w = plan.workload
    return PlanRequest(
        prompt_len=int(w["prompt_len"]),
        max_new_tokens=int(w["max_new_tokens"]),
        batch_size=int(w["batch_size"]),
    )


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
) -> dict[str, PhaseSimulation]:
    """Replay both phases of `trace` (engine.trace.trace_steps of the plan, or of a proxy with
    the same linears) with the plan's sizes and rates; `copy_engines` defaults to the plan's."""
    rates = rates or phase_rates_of(plan)
    engines = copy_engines or plan.runtime.copy_engines
    req = request_of(plan)
    head_on_gpu = plan.runtime.lm_head_on_gpu
    phases = trace_phases(trace)
    carry = carried_copies(phases["decode"])  # the pass before either phase: a decode step
    out = {}
    for phase in PHASES:
        pricing = Pricing(plan.placements, rates, spec, req, phase, head_on_gpu)
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
    engine_costs_on_gpu: bool,
    copy_engines: int | None = None,
    recorded: dict | None = None,
) -> tuple[Plan, dict[str, PhaseSimulation]]:
    """`plan` with a `simulation` section (docs/plan.md, "Trace replay") and, unless the
    profile measured the engine's costs on the GPU (`engine_costs_on_gpu`: they are in the
    prediction already), the trace's host time added to its hetegen prediction."""
    sims = simulate_plan(plan, spec, trace, copy_engines=copy_engines)
    engines = copy_engines or plan.runtime.copy_engines
    req = request_of(plan)
    notes = list(plan.notes)
    predictions = {k: (dict(v) if isinstance(v, dict) else v) for k, v in plan.predictions.items()}
    bounds = dict(plan.bounds)
    host_term = {ph: sims[ph].host["total_s"] for ph in PHASES}
    hetegen = predictions.get("hetegen")
    added = False
    if hetegen and not engine_costs_on_gpu:
        new = figures(
            req,
            hetegen["prefill_s"] + host_term["prefill"],
            hetegen["decode_s_per_token"] + host_term["decode"],
            hetegen["gpu_memory_bytes"],
        )
        extras = {k: v for k, v in hetegen.items() if k not in new}
        new.update(extras)
        new["host"] = {
            "prefill_s": host_term["prefill"],
            "decode_s_per_token": host_term["decode"],
            "source": "trace replay (the engine's host time on the CPU stand-in)",
        }
        predictions["hetegen"] = new
        for key, other in predictions.items():
            if key != "hetegen" and other and other.get("decode_tokens_per_s"):
                other["hetegen_decode_speedup"] = other["decode_s_per_token"] / new["decode_s_per_token"]
                other["hetegen_end_to_end_speedup"] = other["total_s"] / new["total_s"]
        if bounds.get("bound_s_per_token") and new["decode_s_per_token"] > 0:
            bounds["plan_fraction_of_bound"] = bounds["bound_s_per_token"] / new["decode_s_per_token"]
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
    pred = predictions.get("hetegen") or {}
    section: dict[str, Any] = {
        "copy_engines": engines,
        "host_scale": 1.0,
        "host_term_added": added,
        "recorded": dict(recorded or {}),
    }
    for phase in PHASES:
        sim = sims[phase]
        predicted = pred.get("prefill_s" if phase == "prefill" else "decode_s_per_token")
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
            entry["predicted_tokens_per_s"] = pred.get("decode_tokens_per_s")
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
