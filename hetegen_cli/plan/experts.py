"""Which routed experts of a mixture-of-experts model sit on the GPU side (pure Python;
docs/plan.md, "Experts").

The solver places the linears first (attention, the shared experts and the router's gate with
the fixed tensors, the KV cache): then the GPU memory left goes to routed experts by the
decode time each saves per byte (costmodel.experts.expert_priority: uniform use, top_k / E
per token, until expert statistics exist), ties to the lower layer and expert number; every
other expert is computed by the CPU from host RAM. `--cpu-moe` keeps every routed expert on
the CPU and `--n-cpu-moe N` those of decoder layers 0..N-1, as llama.cpp's flags do.
Statistics of expert use (a calibration run) would replace the uniform priority here: one
priority per expert instead of one per layer.
"""

from __future__ import annotations

from hetegen_cli.core.units import format_bytes
from hetegen_cli.models.shapes.spec import ModelSpec
from hetegen_cli.plan.costmodel import hardware as cm
from hetegen_cli.plan.costmodel.experts import expert_priority
from hetegen_cli.plan.document import ExpertsPlacement
from hetegen_cli.plan.request import PlanRequest

#: how the plan chose its experts (the residency section and a note say it)
UNIFORM = "uniform use: top_k / E per token"


def place_experts(
    spec: ModelSpec, rates: cm.PhaseRates, req: PlanRequest, room: int
) -> tuple[tuple[ExpertsPlacement, ...], int, list[str]]:
    """(one placement per MoE layer, GPU bytes of the placed experts, notes) with `room` bytes
    of GPU memory left after everything else; (), 0, [] for a dense model."""
    if not spec.experts:
        return (), 0, []
    ranked = []
    for x in spec.experts:
        if req.cpu_moe or x.layer_index < req.n_cpu_moe:
            continue
        g = expert_priority(rates.decode, x, req.batch_size)
        if g > 0:  # an expert the GPU computes no faster stays on the CPU
            ranked += [(-g, x.layer_index, e, x) for e in range(x.num_experts)]
    ranked.sort(key=lambda item: item[:3])
    chosen: dict[str, list[int]] = {x.name: [] for x in spec.experts}
    used = 0
    for _, _, e, x in ranked:
        if used + x.expert_bytes <= room:
            chosen[x.name].append(e)
            used += x.expert_bytes
    placements = tuple(ExpertsPlacement.of(x, chosen[x.name]) for x in spec.experts)
    on_gpu = sum(len(p.gpu) for p in placements)
    total = sum(x.num_experts for x in spec.experts)
    notes = [
        f"experts: {on_gpu} of {total} routed experts on the GPU side ({format_bytes(used)}), the "
        f"others computed by the CPU from host RAM when chosen; placed by decode time saved per "
        f"byte with {UNIFORM}"
    ]
    if req.cpu_moe:
        notes.append("--cpu-moe: every routed expert on the CPU")
    elif req.n_cpu_moe:
        notes.append(
            f"--n-cpu-moe {req.n_cpu_moe}: the experts of decoder layers 0-{req.n_cpu_moe - 1} on the CPU"
        )
    return placements, used, notes
