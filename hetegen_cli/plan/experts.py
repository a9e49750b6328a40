"""Which routed experts of a mixture-of-experts model sit on the GPU side (pure Python;
docs/plan.md, "Experts").

The solver places the linears first (attention, the shared experts and the router's gate with
the fixed tensors, the KV cache): then the GPU memory left goes to routed experts by the
decode time each saves per byte, ties to the lower layer and expert number; every other
expert is computed by the CPU from host RAM. Without statistics use is uniform (top_k / E per
token: costmodel.experts.expert_priority, one priority per layer, so the first layers fill
first); with measured use (`plan --expert-use FILE`, plan.expert_use) each expert has its own
priority, weighted by its own chance of being active in a decode step
(costmodel.experts.expert_priorities), so the hottest experts go first. `--cpu-moe` keeps every
routed expert on the CPU and `--n-cpu-moe N` those of decoder layers 0..N-1, as llama.cpp's
flags do.
"""

from __future__ import annotations

from hetegen_cli.core.units import format_bytes
from hetegen_cli.models.shapes.spec import ModelSpec
from hetegen_cli.plan.costmodel import hardware as cm
from hetegen_cli.plan.costmodel.experts import expert_priorities, expert_priority
from hetegen_cli.plan.document import ExpertsPlacement
from hetegen_cli.plan.request import PlanRequest

#: how the plan chose its experts (the residency section and a note say it)
UNIFORM = "uniform use: top_k / E per token"


def ranked_experts(spec: ModelSpec, rates: cm.PhaseRates, req: PlanRequest) -> list[tuple[float, int, int]]:
    """(priority g in s/B, layer index, expert) of every expert the GPU side may hold, best
    first (ties: lower layer, then lower expert); experts the GPU computes no faster, or never
    chosen, are left out (they stay on the CPU)."""
    ranked = []
    use = req.expert_use
    for x in spec.experts:
        if req.cpu_moe or x.layer_index < req.n_cpu_moe:
            continue
        per_token = use.per_token(x.layer_index) if use is not None else None
        if per_token is None:
            g = expert_priority(rates.decode, x, req.batch_size)
            ranked += [(g, x.layer_index, e) for e in range(x.num_experts)] if g > 0 else []
        else:
            gs = expert_priorities(rates.decode, x, req.batch_size, per_token)
            ranked += [(g, x.layer_index, e) for e, g in enumerate(gs) if g > 0]
    ranked.sort(key=lambda item: (-item[0], item[1], item[2]))
    return ranked


def place_experts(
    spec: ModelSpec, rates: cm.PhaseRates, req: PlanRequest, room: int
) -> tuple[tuple[ExpertsPlacement, ...], int, list[str]]:
    """(one placement per MoE layer, GPU bytes of the placed experts, notes) with `room` bytes
    of GPU memory left after everything else; (), 0, [] for a dense model."""
    if not spec.experts:
        return (), 0, []
    by_layer = {x.layer_index: x for x in spec.experts}
    chosen: dict[str, list[int]] = {x.name: [] for x in spec.experts}
    used = 0
    for _, layer, e in ranked_experts(spec, rates, req):
        x = by_layer[layer]
        if used + x.expert_bytes <= room:
            chosen[x.name].append(e)
            used += x.expert_bytes
    placements = tuple(ExpertsPlacement.of(x, chosen[x.name]) for x in spec.experts)
    on_gpu = sum(len(p.gpu) for p in placements)
    total = sum(x.num_experts for x in spec.experts)
    how = req.expert_use.describe() if req.expert_use is not None else UNIFORM
    notes = [
        f"experts: {on_gpu} of {total} routed experts on the GPU side ({format_bytes(used)}), the "
        f"others computed by the CPU from host RAM when chosen; placed by decode time saved per "
        f"byte with {how}"
    ]
    if req.cpu_moe:
        notes.append("--cpu-moe: every routed expert on the CPU")
    elif req.n_cpu_moe:
        notes.append(
            f"--n-cpu-moe {req.n_cpu_moe}: the experts of decoder layers 0-{req.n_cpu_moe - 1} on the CPU"
        )
    return placements, used, notes
