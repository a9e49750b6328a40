"""Pricing a trace (pure Python): each recorded op gets the duration the cost model gives it at
the plan's sizes, ready for the discrete-event core (plan.replay); plan.simulate builds the
plan's simulation section from the result.

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

import math
from dataclasses import dataclass

from hetegen_cli.core.dtypes import itemsize
from hetegen_cli.models.shapes.spec import ModelSpec
from hetegen_cli.plan import costmodel as cm
from hetegen_cli.plan.costmodel.experts import placement_parts, step_tokens
from hetegen_cli.plan.costmodel.strategies import attention_for, head_time, tokens_for
from hetegen_cli.plan.document import ExpertsPlacement, LinearPlacement
from hetegen_cli.plan.expert_stats import ExpertStats
from hetegen_cli.plan.replay import Replay, run_ops
from hetegen_cli.plan.request import PlanRequest


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
    experts: tuple[ExpertsPlacement, ...] = ()  # the plan's, one per MoE layer
    use: ExpertStats | None = None  # the expert use the plan was made with (None: uniform)

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


#: event ids of the ops an `experts` op expands into: above any the trace records
_EXPERT_EVENTS = 1_000_000_000


def expert_ops(op: dict, index: int, pricing: Pricing) -> list[dict]:
    """The ops of one traced `experts` op (at `index`) with the plan's durations
    (costmodel.experts.placement_parts): with a CPU side, the layer input's copy to the host
    on the compute stream; the GPU side's kernel, and when weights cross (a decode split,
    prefill streaming) their copies on the experts' side stream and the kernel that waits for
    the last; then the host waits for the input, computes the CPU side and copies its sum
    back on the compute stream. The recorded host time comes before that wait (the host
    issued the GPU side's work first), or first when there is no CPU side."""
    p = pricing
    specs = {x.name: x for x in p.spec.experts}
    x = specs.get(op.get("experts"))
    if x is None:
        raise ValueError(f"the trace runs the experts {op.get('experts')}, which the model does not have")
    placed = {e.name: e for e in p.experts}.get(x.name)
    prefill = p.phase == "prefill"
    rates = p.rates[p.phase]
    per_token = p.use.per_token(x.layer_index) if p.use is not None else None
    tokens = step_tokens(p.req, p.phase)
    parts = placement_parts(rates, x, placed, per_token, tokens, prefill, True, p.rates.quant)
    streams = prefill and placed is not None and placed.stream_prefill
    cpu_side = (placed is None or bool(placed.cpu)) and not streams
    nbytes = tokens * x.hidden_size * itemsize(rates.weights_dtype)
    act = rates.pcie_copy_s + nbytes / rates.pcie_bytes_per_s if p.small_copies else 0.0
    x_ready, copied = _EXPERT_EVENTS + 2 * index, _EXPERT_EVENTS + 2 * index + 1
    tag = {"experts": x.name, "gap_s": 0.0}
    out: list[dict] = []
    if cpu_side:
        out.append({"op": "copy", "dir": "d2h", "stream": "compute", "what": "x", "dur": act,
                    "label": "x copy to host (experts)", **tag})  # fmt: skip
        out.append({"op": "record", "stream": "compute", "event": x_ready, **tag})
    if parts.copy_s > 0:
        out.append({"op": "copy", "dir": "h2d", "stream": "experts", "what": "experts",
                    "dur": parts.copy_s, "label": "expert weight copy", **tag})  # fmt: skip
        out.append({"op": "record", "stream": "experts", "event": copied, **tag})
    if parts.gpu_s > 0:
        out.append({"op": "kernel", "stream": "compute", "what": "experts", "kind": "experts",
                    "dur": parts.gpu_s, "label": "GPU experts", **tag})  # fmt: skip
    if parts.copy_s > 0:
        out.append({"op": "wait", "stream": "compute", "event": copied, **tag})
        out.append({"op": "kernel", "stream": "compute", "what": "experts", "kind": "experts",
                    "dur": parts.last_s, "label": "GPU experts (streamed)", **tag})  # fmt: skip
    gap_s = float(op.get("gap_s") or 0.0)
    gap = {"op": "sync", "event": x_ready if cpu_side else None, **tag, "gap_s": gap_s}
    if not cpu_side:
        return [gap, *out]
    out.append(gap)
    out.append({"op": "cpu", "dur": parts.cpu_s, "label": "CPU experts", **tag})
    out.append({"op": "copy", "dir": "h2d", "stream": "compute", "what": "y", "dur": act,
                "label": "CPU experts' result copy", **tag})  # fmt: skip
    return out


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

    def flush(at: int) -> None:
        if pending:
            inserts.setdefault(at, []).extend(pending)
            pending.clear()

    # a MoE layer's experts run after every linear of their layer: their op is where the work
    # of the resident linears before it goes
    experts_at = {op["experts"]: i for i, op in enumerate(ops) if op["op"] == "experts"}
    moe = sorted(p.spec.experts, key=lambda x: x.layer_index)

    def experts_before(layer: float) -> None:
        while moe and moe[0].layer_index < layer:
            x = moe.pop(0)
            if x.name not in experts_at:
                raise ValueError(
                    f"the trace has no operations of the experts {x.name}: it was recorded for another plan"
                )
            flush(experts_at[x.name])

    for pl in p.placements:
        experts_before(pl.layer_index if pl.layer_index >= 0 else math.inf)
        if per_layer and pl.role == "o":
            pending.append(kernel("attention", "attention (GPU)", attn_total / layers))
        if pl.resident:
            n = p.tokens(pl.role)
            dur = cm.gpu_time(p.rates_of(pl.name, p.phase), pl.out_features, pl.in_features, n)
            pending.append(kernel("resident", f"GPU matmul, resident ({pl.role})", dur, pl.name))
        else:
            flush(starts[pl.name])
    experts_before(math.inf)
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
        if op["op"] == "experts":
            out.extend(expert_ops(op, i, p))
            continue
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
