"""The routed experts of mixture-of-experts layers in the cost model (pure Python; docs/plan.md,
"Experts").

Uniform use (no statistics): each of a step's n tokens picks top_k of the E experts, so a step
activates D(n) = E (1 - (1 - k/E)^n) distinct experts per layer
(models.shapes.experts.expected_distinct), each seeing n k / D(n) tokens on average. Measured
use (`use`, plan.expert_use.ExpertStats): expert e, chosen per token with probability p_e, is
active in a step with probability P_e = 1 - (1 - p_e)^n and then sees n p_e / P_e tokens on
average; a side's expected work is the sum over its experts of P_e times the expert's time.
With p_e = k/E for every expert both give the same figures. An expert on the GPU side is
computed there; any other one by the CPU from host RAM, whole (its three matrices), only when
active. The two sides of a layer run at once (engine.experts), so the layer takes the longer
of the two. Each CPU-side expert pays its two kernels' per-call costs, except in a one-token
step whose experts are quantized and run by hetegen's kernels: the engine computes them in one
call, and each pays one (fused_call_s).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from hetegen_cli.models.shapes.experts import ExpertsSpec, expected_distinct
from hetegen_cli.plan.costmodel import hardware as cm
from hetegen_cli.plan.document import ExpertsPlacement
from hetegen_cli.plan.expert_stats import ExpertStats


@dataclass(frozen=True)
class LayerParts:
    """One MoE layer's experts in a step as the engine runs them (engine.experts), in seconds:
    the CPU side's work (on the main thread); on the GPU, `gpu_s` of work that needs no weight
    copy, `copy_s` of weight copies on the experts' side stream that run meanwhile, and
    `last_s` of work that waits for the last copy. The layer takes `step_s`."""

    cpu_s: float = 0.0
    gpu_s: float = 0.0
    copy_s: float = 0.0
    last_s: float = 0.0

    @property
    def step_s(self) -> float:
        return max(self.cpu_s, max(self.gpu_s, self.copy_s) + self.last_s)


def step_tokens(req, phase: str) -> int:
    """Tokens one step routes: the prompt in prefill, one per sequence in decode."""
    return req.batch_size * (req.prompt_len if phase == "prefill" else 1)


#: the rates of each quantized format (PhaseRates.quant): quantized expert parts are priced at
#: their format's (their kernels' bytes and speed), the others at the phase's
Quant = Mapping[str, cm.Rates]


def expert_s(
    rates: cm.Rates,
    x: ExpertsSpec,
    tokens: float,
    on_gpu: bool,
    concurrent: bool = True,
    quant: Quant | None = None,
    units: int | None = None,
    calls: bool = True,
) -> float:
    """Seconds of one active expert (gate and up [2I, H], down [H, I]) on `tokens` tokens;
    with `units`, of that many of its I intermediate units (a decode split's piece). `calls`
    False: without the CPU kernels' per-call cost (the expert is part of a fused call,
    fused_call_s)."""
    n, total, quant = max(1, round(tokens)), 0.0, quant or {}
    i = x.intermediate_size if units is None else units
    if i <= 0:
        return 0.0
    # gate and up run as one kernel [2I, H] (they share a format), down as another [H, I]
    for part, rows, inputs in (("gate", 2 * i, x.hidden_size), ("down", x.hidden_size, i)):
        stored = x.part_format(part)
        r = quant.get(stored[0], rates) if stored else rates
        if on_gpu:
            total += cm.gpu_time(r, rows, inputs, n)
        else:
            total += cm.cpu_time(r, rows, inputs, n, concurrent) - (0.0 if calls else r.cpu_call_s)
    return total


def fused_call_s(rates: cm.Rates, x: ExpertsSpec, tokens: int, quant: Quant | None) -> float | None:
    """The fixed cost each CPU-side expert pays where the engine computes a step's chosen ones
    in one kernel call (engine.experts, models.formats.fused: a step of one token, every part
    stored quantized and run by hetegen's kernels): one per-call cost of its gate/up format an
    expert, not one per kernel (docs/plan.md, "Experts"); None where each expert runs its
    own two kernels."""
    if tokens != 1 or not quant or not x.part_quant or not all(x.part_quant):
        return None
    formats = [quant.get(q[0]) for q in x.part_quant]
    if any(r is None or not r.cpu_kernel.startswith("hetegen") for r in formats):
        return None
    return formats[0].cpu_call_s  # gate's (PARTS order)


def cpu_expert_s(
    rates: cm.Rates,
    x: ExpertsSpec,
    tokens: float,
    step_tokens: int,
    concurrent: bool = True,
    quant: Quant | None = None,
    units: int | None = None,
) -> float:
    """Seconds of one active CPU-side expert seeing `tokens` of a step of `step_tokens`:
    expert_s, or where the engine fuses the step's experts (fused_call_s) its bytes and one
    per-call cost."""
    call = fused_call_s(rates, x, step_tokens, quant)
    if call is None:
        return expert_s(rates, x, tokens, False, concurrent, quant, units)
    return expert_s(rates, x, tokens, False, concurrent, quant, units, calls=False) + call


def cpu_side_s(
    rates: cm.Rates,
    x: ExpertsSpec,
    active: Mapping[int, float],
    tokens: int,
    concurrent: bool = True,
    quant: Quant | None = None,
    units: int | None = None,
) -> float:
    """Seconds of a step of `tokens` tokens' CPU-side experts of one layer, `active` mapping
    the tokens an active one sees to their expected number (_cpu_side_active); with `units`,
    that many of each one's units (a decode split's CPU piece)."""
    return sum(
        count * cpu_expert_s(rates, x, n, tokens, concurrent, quant, units) for n, count in active.items()
    )


def layer_s(
    rates: cm.Rates,
    x: ExpertsSpec,
    gpu_experts: int,
    tokens: int,
    concurrent: bool = True,
    quant: Quant | None = None,
) -> tuple[float, float]:
    """(CPU side, GPU side) seconds of one layer's experts in a step of `tokens` tokens with
    `gpu_experts` of them on the GPU side (uniform use)."""
    active = expected_distinct(x.num_experts, x.top_k, tokens)
    if active <= 0:
        return 0.0, 0.0
    per_expert = tokens * x.top_k / active
    share_gpu = gpu_experts / x.num_experts
    gpu = active * share_gpu * expert_s(rates, x, per_expert, True, quant=quant) if gpu_experts else 0.0
    on_cpu = {max(1, round(per_expert)): active * (1 - share_gpu)} if gpu_experts < x.num_experts else {}
    return cpu_side_s(rates, x, on_cpu, tokens, concurrent, quant), gpu


def active_probability(per_token: float, tokens: int) -> float:
    """P(an expert chosen with probability `per_token` by each token is active in a step of
    `tokens` tokens) = 1 - (1 - p)^n."""
    return 1.0 - (1.0 - min(1.0, max(0.0, per_token))) ** tokens


def measured_layer_s(
    rates: cm.Rates,
    x: ExpertsSpec,
    per_token: Sequence[float],
    gpu: Collection[int],
    tokens: int,
    concurrent: bool = True,
    quant: Quant | None = None,
) -> tuple[float, float]:
    """(CPU side, GPU side) seconds of one layer's experts in a step of `tokens` tokens, expert
    e chosen per token with probability `per_token[e]` and on the GPU side when in `gpu`."""
    gpu_side = 0.0
    seconds: dict[int, float] = {}  # experts seeing as many tokens cost the same
    for e, p in enumerate(per_token):
        active = active_probability(p, tokens)
        if active <= 0 or e not in gpu:
            continue
        n = max(1, round(tokens * p / active))
        if n not in seconds:
            seconds[n] = expert_s(rates, x, n, True, concurrent, quant)
        gpu_side += active * seconds[n]
    cpu = cpu_side_s(rates, x, _cpu_side_active(x, per_token, gpu, tokens), tokens, concurrent, quant)
    return cpu, gpu_side


def placed_layer_s(
    rates: cm.Rates,
    x: ExpertsSpec,
    per_token: Sequence[float] | None,
    gpu: Collection[int],
    tokens: int,
    concurrent: bool = True,
    quant: Quant | None = None,
) -> float:
    """Seconds of one layer's experts in a step, `gpu` on the GPU side and the rest on the CPU
    at once: the longer side; `per_token` None: uniform use."""
    return max(layer_sides(rates, x, per_token, gpu, tokens, concurrent, quant))


def layer_sides(
    rates: cm.Rates,
    x: ExpertsSpec,
    per_token: Sequence[float] | None,
    gpu: Collection[int],
    tokens: int,
    concurrent: bool = True,
    quant: Quant | None = None,
) -> tuple[float, float]:
    """(CPU side, GPU side) seconds of one layer's experts in a step (layer_s under uniform
    use, `per_token` None; else measured_layer_s)."""
    if per_token is None:
        return layer_s(rates, x, len(gpu), tokens, concurrent, quant)
    return measured_layer_s(rates, x, per_token, set(gpu), tokens, concurrent, quant)


def expert_copy_s(rates: cm.Rates, x: ExpertsSpec, units: int | None = None) -> float:
    """Seconds to copy one CPU-side expert's weights host -> GPU as the host holds them: in
    the CPU format, gate and up [2I, H] and down [H, I] in two copies; quantized, as stored:
    one copy of the pinned block that holds every part (engine.experts), or up to three
    tensors (q, scale, min) a part when a part is floating point. With `units`: that many of
    its I units (a decode split's piece, held in a block of its own)."""
    copies = 2  # the CPU format's gate_up and down
    if x.part_quant:
        copies = 1 if all(x.part_quant) else 3 * len(x.part_quant)
    share = 1.0 if units is None else units / x.intermediate_size
    held = x.host_expert_bytes(rates.cpu_dtype_bytes) * share
    return copies * rates.pcie_copy_s + held / rates.pcie_bytes_per_s


def split_layer_s(
    rates: cm.Rates,
    x: ExpertsSpec,
    per_token: Sequence[float] | None,
    gpu: Collection[int],
    tokens: int,
    units: int,
    quant: Quant | None = None,
) -> float:
    """Seconds of one layer's experts in a decode step whose CPU-side experts are split at
    `units` (engine.experts, "decode split"): the CPU computes the other units of each active
    one while their first `units` cross PCIe one expert after another and the GPU computes
    them after its own experts (the longer side). `units` 0: placed_layer_s."""
    if not units:
        return placed_layer_s(rates, x, per_token, gpu, tokens, True, quant)
    return split_parts(rates, x, per_token, gpu, tokens, units, quant).step_s


def split_parts(
    rates: cm.Rates,
    x: ExpertsSpec,
    per_token: Sequence[float] | None,
    gpu: Collection[int],
    tokens: int,
    units: int,
    quant: Quant | None = None,
) -> LayerParts:
    """split_layer_s's parts: the CPU's other units; on the GPU its own experts and the
    streamed pieces but the last, the pieces' copies, and the last piece after its copy."""
    _, gpu_s = layer_sides(rates, x, per_token, gpu, tokens, True, quant)
    active = _cpu_side_active(x, per_token, gpu, tokens)  # tokens each -> expected count
    cpu = cpu_side_s(rates, x, active, tokens, True, quant, x.intermediate_size - units)
    streamed = sum(
        count * expert_s(rates, x, n, True, quant=quant, units=units) for n, count in active.items()
    )
    moved = sum(active.values())
    last = streamed / moved if moved else 0.0  # the last piece computes after its copy
    return LayerParts(cpu, gpu_s + streamed - last, moved * expert_copy_s(rates, x, units), last)


def _cpu_side_active(
    x: ExpertsSpec, per_token: Sequence[float] | None, gpu: Collection[int], tokens: int
) -> dict[int, float]:
    """Tokens an active CPU-side expert sees (rounded, at least 1: expert_s prices whole
    tokens) -> expected number of such experts active in a step."""
    if per_token is None:
        active = expected_distinct(x.num_experts, x.top_k, tokens)
        if active <= 0:
            return {}
        return {max(1, round(tokens * x.top_k / active)): active * (1 - len(gpu) / x.num_experts)}
    held, out = set(gpu), {}
    for e, p in enumerate(per_token):
        active = active_probability(p, tokens)
        if e not in held and active > 0:
            n = max(1, round(tokens * p / active))
            out[n] = out.get(n, 0.0) + active
    return out


def streamed_layer_s(
    rates: cm.Rates, x: ExpertsSpec, per_token: Sequence[float] | None, gpu: Collection[int], tokens: int
) -> float:
    """Seconds of one layer's experts in a step whose CPU-side experts are streamed: the active
    ones' weights cross PCIe one after another while the GPU computes every active expert
    (the longer of the two; engine.experts, "prefill streaming")."""
    return streamed_parts(rates, x, per_token, gpu, tokens).step_s


def streamed_parts(
    rates: cm.Rates, x: ExpertsSpec, per_token: Sequence[float] | None, gpu: Collection[int], tokens: int
) -> LayerParts:
    """streamed_layer_s's parts: every active expert on the GPU, the CPU side's copies."""
    gpu_s = placed_layer_s(rates, x, per_token, range(x.num_experts), tokens)
    moved = sum(_cpu_side_active(x, per_token, gpu, tokens).values())
    return LayerParts(0.0, gpu_s, moved * expert_copy_s(rates, x))


def placement_parts(
    rates: cm.Rates,
    x: ExpertsSpec,
    placement: ExpertsPlacement | None,
    per_token: Sequence[float] | None,
    tokens: int,
    prefill: bool,
    concurrent: bool = True,
    quant: Quant | None = None,
) -> LayerParts:
    """The parts of one layer's experts in a step as `placement` runs them (None: every
    expert on the CPU): streamed in prefill with `stream_prefill`, split in decode with
    `split_units`, else each side computing its own."""
    gpu = placement.gpu if placement is not None else ()
    if prefill and placement is not None and placement.stream_prefill:
        return streamed_parts(rates, x, per_token, gpu, tokens)
    if not prefill and placement is not None and placement.split_units:
        return split_parts(rates, x, per_token, gpu, tokens, placement.split_units, quant)
    return LayerParts(*layer_sides(rates, x, per_token, gpu, tokens, concurrent, quant))


def experts_step_s(
    rates: cm.Rates,
    specs: Iterable[ExpertsSpec],
    placements: Iterable[ExpertsPlacement] | None,
    tokens: int,
    concurrent: bool = True,
    gpu_layers: int | None = None,
    use: ExpertStats | None = None,
    prefill: bool = False,
    quant: Quant | None = None,
) -> float:
    """Seconds of every MoE layer's experts in one step: each layer the longer of its two
    sides. `placements` None: every expert on the CPU, or with `gpu_layers` every expert of the
    layers below it on the GPU (a layer split). `use`: measured use (None: uniform). In
    `prefill`, a layer placed with `stream_prefill` streams its CPU-side experts instead; in
    decode, one placed with `split_units` splits them (split_layer_s)."""
    placed = {p.name: p for p in placements or ()}
    total = 0.0
    for x in specs:
        per_token = use.per_token(x.layer_index) if use is not None else None
        if gpu_layers is not None:
            gpu = range(x.num_experts) if x.layer_index < gpu_layers else ()
            total += placed_layer_s(rates, x, per_token, gpu, tokens, concurrent, quant)
        else:
            p = placed.get(x.name)
            total += placement_parts(rates, x, p, per_token, tokens, prefill, concurrent, quant).step_s
    return total


def active_bytes(
    specs: Iterable[ExpertsSpec],
    placements: Iterable[ExpertsPlacement],
    tokens: int,
    use: ExpertStats | None = None,
) -> tuple[float, float]:
    """(GPU, host) bytes of the experts one step of `tokens` tokens reads (expected)."""
    on_gpu = {p.name: p.gpu for p in placements}
    gpu = host = 0.0
    for x in specs:
        placed = on_gpu.get(x.name, ())
        per_token = use.per_token(x.layer_index) if use is not None else None
        if per_token is None:
            active = expected_distinct(x.num_experts, x.top_k, tokens) * x.expert_bytes
            share = len(placed) / x.num_experts
            gpu += active * share
            host += active * (1 - share)
            continue
        chosen = set(placed)
        for e, p in enumerate(per_token):
            active = active_probability(p, tokens) * x.expert_bytes
            gpu, host = (gpu + active, host) if e in chosen else (gpu, host + active)
    return gpu, host


def expert_priority(rates: cm.Rates, x: ExpertsSpec, batch: int, quant: Quant | None = None) -> float:
    """Decode seconds saved per byte of GPU memory by holding one expert of `x` on the GPU
    side (uniform use: the chance it is active in a step times its CPU time less its GPU time)."""
    active = expected_distinct(x.num_experts, x.top_k, batch)
    tokens = batch * x.top_k / active if active else 1
    p_active = active / x.num_experts
    saved = cpu_expert_s(rates, x, tokens, batch, quant=quant) - expert_s(rates, x, tokens, True, quant=quant)
    return max(0.0, p_active * saved) / x.expert_bytes


def expert_priorities(
    rates: cm.Rates, x: ExpertsSpec, batch: int, per_token: Sequence[float], quant: Quant | None = None
) -> list[float]:
    """expert_priority for each expert of `x` under measured use: the chance expert e is active
    in a decode step (1 - (1 - p_e)^batch) times its CPU time less its GPU time, per byte."""
    out = []
    saved: dict[int, float] = {}
    for p in per_token:
        active = active_probability(p, batch)
        if active <= 0:
            out.append(0.0)
            continue
        n = max(1, round(batch * p / active))
        if n not in saved:
            saved[n] = cpu_expert_s(rates, x, n, batch, quant=quant) - expert_s(
                rates, x, n, True, quant=quant
            )
        out.append(max(0.0, active * saved[n]) / x.expert_bytes)
    return out
