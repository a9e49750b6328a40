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

Prefill routes the whole prompt, so nearly every expert is active: a layer whose CPU-side
experts take longer on the CPU than their weights take to cross PCIe (while the GPU computes
every active expert) streams them in prefill (`stream_prefill`, the break-even llama.cpp users
set by hand), through two staging buffers of one expert each on the GPU.

Decode computes only the chosen experts, on the side that holds them: a layer whose CPU side
is the longer one splits its CPU-side experts by intermediate units (`split_units`, the HeteGen
row split applied to an expert): the first units of each chosen one cross PCIe through the same
staging buffers and the GPU computes them while the CPU computes the rest, at the split that
makes the layer's decode step shortest (costmodel.experts.split_layer_s).
"""

from __future__ import annotations

from dataclasses import replace

from hetegen_cli.core.units import format_bytes
from hetegen_cli.models.shapes.spec import ModelSpec
from hetegen_cli.plan.costmodel import hardware as cm
from hetegen_cli.plan.costmodel.experts import (
    expert_priorities,
    expert_priority,
    placed_layer_s,
    split_layer_s,
    step_tokens,
    streamed_layer_s,
)
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
            g = expert_priority(rates.decode, x, req.batch_size, rates.quant)
            ranked += [(g, x.layer_index, e) for e in range(x.num_experts)] if g > 0 else []
        else:
            gs = expert_priorities(rates.decode, x, req.batch_size, per_token, rates.quant)
            ranked += [(g, x.layer_index, e) for e, g in enumerate(gs) if g > 0]
    ranked.sort(key=lambda item: (-item[0], item[1], item[2]))
    return ranked


def place_experts(
    spec: ModelSpec, rates: cm.PhaseRates, req: PlanRequest, room: int
) -> tuple[tuple[ExpertsPlacement, ...], int, int, list[str]]:
    """(one placement per MoE layer, GPU bytes of the placed experts, of the staging buffers,
    notes) with `room` bytes of GPU memory left after everything else; (), 0, 0, [] for a
    dense model. The staging buffers are set aside first when streaming in prefill or a
    decode split would pay for a layer whose experts are all on the CPU."""
    if not spec.experts:
        return (), 0, 0, []
    all_cpu = tuple(ExpertsPlacement.of(x) for x in spec.experts)
    reserve = staging_bytes(spec, rates) if staging_bytes(spec, rates) <= room else 0
    if reserve and not _stream_and_split(spec, rates, req, all_cpu)[1]:
        reserve = 0
    placements, used = _fill(spec, rates, req, room - reserve)
    stream_note: list[str] = []
    if reserve:
        placements, stream_note = _stream_and_split(spec, rates, req, placements)
        if not stream_note:  # the experts placed left no layer worth staging: place again
            placements, used = _fill(spec, rates, req, room)
    on_gpu = sum(len(p.gpu) for p in placements)
    total = sum(x.num_experts for x in spec.experts)
    how = req.expert_use.describe() if req.expert_use is not None else UNIFORM
    notes = [
        f"experts: {on_gpu} of {total} routed experts on the GPU side ({format_bytes(used)}), the "
        f"others computed by the CPU from host RAM when chosen; placed by decode time saved per "
        f"byte with {how}"
    ]
    notes += stream_note
    if req.cpu_moe:
        notes.append("--cpu-moe: every routed expert on the CPU")
    elif req.n_cpu_moe:
        notes.append(
            f"--n-cpu-moe {req.n_cpu_moe}: the experts of decoder layers 0-{req.n_cpu_moe - 1} on the CPU"
        )
    return placements, used, reserve if stream_note else 0, notes


def _fill(
    spec: ModelSpec, rates: cm.PhaseRates, req: PlanRequest, room: int
) -> tuple[tuple[ExpertsPlacement, ...], int]:
    """(placements, GPU bytes): the best-ranked experts that fit in `room` on the GPU side."""
    by_layer = {x.layer_index: x for x in spec.experts}
    chosen: dict[str, list[int]] = {x.name: [] for x in spec.experts}
    used = 0
    for _, layer, e in ranked_experts(spec, rates, req):
        x = by_layer[layer]
        if used + x.expert_bytes <= room:
            chosen[x.name].append(e)
            used += x.expert_bytes
    return tuple(ExpertsPlacement.of(x, chosen[x.name]) for x in spec.experts), used


def staging_bytes(spec: ModelSpec, rates: cm.PhaseRates) -> int:
    """GPU bytes of the two staging buffers prefill streaming passes experts through: two
    experts as the host holds them (quantized parts as stored, the others in the decode CPU
    format; engine.experts). A quantized expert is then dequantized one part at a time into
    the memory plan.memory.dequant_bytes sets aside."""
    return 2 * round(max(x.host_expert_bytes(rates.decode.cpu_dtype_bytes) for x in spec.experts))


def stream_in_prefill(
    spec: ModelSpec, rates: cm.PhaseRates, req: PlanRequest, placements: tuple[ExpertsPlacement, ...]
) -> tuple[tuple[ExpertsPlacement, ...], list[str]]:
    """`placements` with `stream_prefill` on the layers where streaming the CPU-side experts to
    the GPU beats computing them on the CPU in prefill, and a note ([] when none streams)."""
    if not rates.prefill.has_gpu:
        return placements, []
    use, tokens = req.expert_use, step_tokens(req, "prefill")
    by_name = {x.name: x for x in spec.experts}
    out, saved = [], 0.0
    for p in placements:
        x = by_name[p.name]
        per_token = use.per_token(x.layer_index) if use is not None else None
        on_cpu = placed_layer_s(rates.prefill, x, per_token, p.gpu, tokens, quant=rates.quant)
        streamed = streamed_layer_s(rates.prefill, x, per_token, p.gpu, tokens)
        stream = bool(p.cpu) and streamed < on_cpu
        saved += on_cpu - streamed if stream else 0.0
        out.append(replace(p, stream_prefill=stream))
    layers = sum(p.stream_prefill for p in out)
    if not layers:
        return placements, []
    note = (
        f"prefill: {layers} of {len(out)} MoE layers stream their CPU-side experts to the GPU "
        f"(through {format_bytes(staging_bytes(spec, rates))} of staging buffers), {saved:.3g} s less than "
        f"computing them on the CPU at {tokens} prompt tokens"
    )
    return tuple(out), [note]


def _stream_and_split(
    spec: ModelSpec, rates: cm.PhaseRates, req: PlanRequest, placements: tuple[ExpertsPlacement, ...]
) -> tuple[tuple[ExpertsPlacement, ...], list[str]]:
    """`placements` streaming in prefill and split in decode where either pays, and their
    notes ([] when neither does: the staging buffers would go unused)."""
    placements, notes = stream_in_prefill(spec, rates, req, placements)
    placements, split_notes = split_in_decode(spec, rates, req, placements)
    return placements, notes + split_notes


#: a decode split must save at least this share of its layer's experts time (a smaller gain
#: is within the cost model's error, and the split costs copies and launches)
MIN_SPLIT_GAIN = 0.05


def split_in_decode(
    spec: ModelSpec, rates: cm.PhaseRates, req: PlanRequest, placements: tuple[ExpertsPlacement, ...]
) -> tuple[tuple[ExpertsPlacement, ...], list[str]]:
    """`placements` with `split_units` on the layers where splitting each chosen CPU-side
    expert between the CPU and the GPU shortens the decode step (the best multiple of the
    layer's split step), and a note ([] when none splits)."""
    if not rates.decode.has_gpu or not req.expert_split:
        return placements, []
    use, tokens = req.expert_use, step_tokens(req, "decode")
    by_name = {x.name: x for x in spec.experts}
    out, saved, units = [], 0.0, []
    for p in placements:
        x = by_name[p.name]
        per_token = use.per_token(x.layer_index) if use is not None else None
        whole = split_layer_s(rates.decode, x, per_token, p.gpu, tokens, 0, rates.quant)
        best, best_s = 0, whole
        if p.cpu:
            for k in range(x.split_step, x.intermediate_size, x.split_step):
                t = split_layer_s(rates.decode, x, per_token, p.gpu, tokens, k, rates.quant)
                if t < best_s:
                    best, best_s = k, t
        if best and whole - best_s < MIN_SPLIT_GAIN * whole:
            best, best_s = 0, whole
        saved += whole - best_s
        out.append(replace(p, split_units=best))
        if best:
            units.append(best / x.intermediate_size)
    if not units:
        return placements, []
    share = f"{min(units):.0%}" if min(units) == max(units) else f"{min(units):.0%}-{max(units):.0%}"
    note = (
        f"decode: {len(units)} of {len(out)} MoE layers split each chosen CPU-side expert, "
        f"{share} of its intermediate units computed on the GPU "
        f"(streamed through the staging buffers) while the CPU computes the rest, "
        f"{saved * 1e3:.3g} ms a step less"
    )
    return tuple(out), [note]
