"""GPU residency: which whole linears stay on the GPU (docs/method.md §7; pure Python).

Every plannable linear is a `Candidate` with its balanced rows per phase and its priority
g = T_cpu / M_gpu (decode time saved per byte of GPU memory); `choose_resident` fills the
room greedily by g.
"""

from __future__ import annotations

from dataclasses import dataclass

from hetegen_cli.models.shapes.spec import LinearSpec
from hetegen_cli.plan import costmodel as cm
from hetegen_cli.plan.costmodel.strategies import tokens_for
from hetegen_cli.plan.document import round_rows
from hetegen_cli.plan.memory import linear_rows_bytes
from hetegen_cli.plan.request import PlanRequest


@dataclass(frozen=True)
class Candidate:
    """A plannable linear with its balanced rows per phase."""

    spec: LinearSpec
    rows_prefill: int
    rows_decode: int
    priority_g: float

    @property
    def stream_bytes(self) -> int:
        """Largest GPU share that crosses PCIe in any phase (bytes as held: plan.memory)."""
        return linear_rows_bytes(self.spec, self.spec.out_features - min(self.rows_prefill, self.rows_decode))


def candidate(phase_rates: cm.PhaseRates, lin: LinearSpec, req: PlanRequest) -> Candidate:
    """`lin` at its balanced split per phase (each phase's CPU format), with its residency
    priority g (s/B)."""
    rows = {}
    for phase in ("prefill", "decode"):
        rates = phase_rates.of_linear(phase, lin.quant)
        f = cm.balanced_fraction(rates, lin.out_features, lin.in_features, tokens_for(lin.role, req, phase))
        rows[phase] = round_rows(f, lin.out_features)
        if phase == "decode":  # T_cpu at the balanced split = the split step time
            k = f * lin.out_features
            t = cm.split_times(rates, lin.out_features, lin.in_features, k, req.batch_size)
            t_cpu = max(t.cpu_s, t.transfer_s + t.gpu_s)  # the path time where f clamps to 0
    return Candidate(lin, rows["prefill"], rows["decode"], t_cpu / lin.weight_bytes)


def staging_bytes(items: list[Candidate], resident: set[str]) -> int:
    """Bytes of one staging buffer: the largest GPU share any non-resident linear streams."""
    return max((i.stream_bytes for i in items if i.spec.name not in resident), default=0)


def choose_resident(items: list[Candidate], room: int, buffers: int) -> set[str]:
    """Greedy by g descending (tie-break layer index, name): resident while it fits.

    `room` is the GPU memory left for resident weights and the staging buffers; residents
    shrink the largest streamed share, so passes repeat until nothing more fits.
    """
    order = sorted(items, key=lambda i: (-i.priority_g, i.spec.layer_index, i.spec.name))
    heads = [i for i in order if i.spec.role == "lm_head"]
    order = heads + [i for i in order if i.spec.role != "lm_head"]  # the LM head goes first
    resident: set[str] = set()
    used = 0
    while True:
        free = room - used - buffers * staging_bytes(items, resident)
        added = False
        for item in order:
            if item.spec.name not in resident and item.spec.weight_bytes <= free:
                resident.add(item.spec.name)
                used += item.spec.weight_bytes
                free -= item.spec.weight_bytes
                added = True
        if not added:
            return resident
