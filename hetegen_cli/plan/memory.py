"""The memory model: bytes on the GPU and in host RAM for a model and a plan (pure, no torch).

One answer each, used by the solver, the engine (its RAM check and its host buffers), `run`
(does the whole model fit on the GPU) and `bench` (can the `gpu` arm run).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from hetegen_cli.core import quant as qfmt
from hetegen_cli.core.dtypes import itemsize
from hetegen_cli.models.shapes.spec import LinearSpec, ModelSpec
from hetegen_cli.plan.document import ExpertsPlacement, LinearPlacement
from hetegen_cli.plan.request import PlanRequest
from hetegen_cli.plan.sections import HostMemory

#: Without --gpu-memory the budget is the profiled free memory less this share of the total.
FREE_MEMORY_MARGIN = 0.05
#: every weight in the host arena starts at a multiple of this many bytes (engine.host_weight)
ARENA_ALIGN = 64


def arena_bytes(nbytes: int) -> int:
    """Bytes one buffer of `nbytes` takes in the host arena: rounded up to ARENA_ALIGN."""
    return -(-nbytes // ARENA_ALIGN) * ARENA_ALIGN


def rows_bytes(rows: int, in_features: int, weights_dtype: str, quant: tuple[str, int] | None = None) -> int:
    """Bytes of `rows` rows of one linear's weight as the engine holds and streams them: in the
    weights dtype, or as the parts of a quantized weight (`quant` = (format, group size),
    core.quant.part_shapes), each part aligned to ARENA_ALIGN."""
    if rows <= 0:
        return 0
    if quant is None:
        return arena_bytes(rows * in_features * itemsize(weights_dtype))
    parts = qfmt.part_shapes(quant[0], rows, in_features, quant[1]).values()
    return sum(arena_bytes(math.prod(shape) * size) for shape, size in parts)


def linear_rows_bytes(lin: LinearSpec, rows: int) -> int:
    """rows_bytes of `rows` rows of `lin` (its stored format)."""
    if rows <= 0:
        return 0
    if lin.quant is not None:
        return rows_bytes(rows, lin.in_features, "", (lin.quant, lin.group_size or qfmt.DEFAULT_GROUP_SIZE))
    return arena_bytes(rows * lin.in_features * lin.dtype_bytes)


def dequant_bytes(spec: ModelSpec) -> int:
    """GPU bytes the engine's dequantization of the largest quantized linear or expert part
    holds at once: its uint8 values and the weights-dtype result (engine.quant_host.dequantize;
    a GPU-side expert is dequantized one part at a time, engine.experts); 0 for a float
    model."""
    sizes = [lin.out_features * lin.in_features for lin in spec.linears if lin.quant]
    sizes += [x.hidden_size * x.intermediate_size for x in spec.experts if x.part_quant]
    return max(sizes, default=0) * (1 + spec.dtype_bytes)


def held_quant_rows(cpu_rows: tuple[int, int]) -> tuple[int, tuple[int, ...]]:
    """(row0, CPU kernels) of a quantized split linear with CPU rows (prefill, decode): rows
    [row0, out) are held as stored (the GPU share of either phase is a view of them) and the
    CPU computes from a packed copy of rows [0, k) for each distinct k > 0 (torch's packed
    int4 layout cannot be sliced at arbitrary rows)."""
    return min(cpu_rows), tuple(sorted({k for k in cpu_rows if k > 0}))


def default_gpu_budget(gpu_free_bytes: int | None, gpu_total_bytes: int | None) -> int:
    """Free GPU memory less FREE_MEMORY_MARGIN of the total (0 without a GPU)."""
    if not gpu_free_bytes:
        return 0
    margin = int(FREE_MEMORY_MARGIN * (gpu_total_bytes or gpu_free_bytes))
    return max(0, gpu_free_bytes - margin)


def workspace_bytes(spec: ModelSpec, req: PlanRequest) -> int:
    """Activation workspace estimate for the prefill step (the larger phase), in bytes.

    b n (6 d + 2 I) activations (hidden states, q/k/v/o, MLP intermediates, CPU partial
    outputs) + b heads n^2 attention scores, at the weights dtype, + float32 logits b V.
    """
    b, n, nbytes = req.batch_size, req.prompt_len, spec.dtype_bytes
    inter = max(lin.out_features for lin in spec.linears)
    acts = b * n * (6 * spec.hidden_size + 2 * inter) * nbytes
    scores = b * spec.num_heads * n * n * nbytes
    return acts + scores + 4 * b * spec.vocab_size


def whole_model_gpu_bytes(spec: ModelSpec, req: PlanRequest, dtype: str | None = None) -> int:
    """GPU bytes to run the whole model there in `dtype` (default the spec's): weights, KV
    cache for the request's context, workspace, and the reserve."""
    scale = itemsize(dtype or spec.dtype) / spec.dtype_bytes
    model = (
        spec.total_weight_bytes
        + spec.kv_cache_bytes(req.context_tokens, req.batch_size)
        + workspace_bytes(spec, req)
    )
    return int(model * scale) + req.reserve_bytes


def held_rows(
    out_features: int, cpu_rows: tuple[int, int], cpu_dtypes: tuple[str, str], weights_dtype: str
) -> tuple[int, dict[str, int]]:
    """(row0, {dtype: rows}) of one split linear's host buffers, for CPU rows (prefill,
    decode) computed in `cpu_dtypes` (prefill, decode).

    Rows [row0, out) are held in the weights dtype: the GPU share of either phase, rows
    [k, out), is a view of them, and so is a CPU share computed in the weights dtype (then
    row0 = 0). Each other CPU dtype gets its own copy of rows [0, max k of the phases using
    it). Rows no phase streams or computes in the weights dtype are not kept in it.
    """
    row0 = min(cpu_rows)
    copies: dict[str, int] = {}
    for k, dtype in zip(cpu_rows, cpu_dtypes, strict=True):
        if k == 0:
            continue
        if dtype == weights_dtype:
            row0 = 0
        else:
            copies[dtype] = max(copies.get(dtype, 0), k)
    return row0, copies


def host_memory(
    placements: Iterable[LinearPlacement],
    weights_dtype: str,
    cpu_dtypes: tuple[str, str],
    other_bytes: int = 0,
    quant: Mapping[str, tuple[str, int]] | None = None,
    expert_bytes: int | None = None,
) -> HostMemory:
    """Host bytes of the split linears' buffers (held_rows) plus `other_bytes`: exactly what
    the engine allocates. `weights_bytes` is the arena (pinned on a GPU machine), aligned per
    weight; `cpu_copy_bytes` the copies in other CPU dtypes (pageable). `quant` maps the
    quantized linears to (format, group size): their rows as stored (held_quant_rows);
    `expert_bytes` the CPU's routed experts of a MoE model (experts_bytes)."""
    wbytes = itemsize(weights_dtype)
    weights = copy = 0
    for p in placements:
        if p.resident:
            continue
        q = quant.get(p.name) if quant else None
        if q is not None:
            row0, kernels = held_quant_rows((p.cpu_rows_prefill, p.cpu_rows_decode))
            weights += rows_bytes(p.out_features - row0, p.in_features, weights_dtype, q)
            copy += sum(qfmt.weight_bytes(q[0], k, p.in_features, q[1]) for k in kernels)
            continue
        row0, copies = held_rows(
            p.out_features, (p.cpu_rows_prefill, p.cpu_rows_decode), cpu_dtypes, weights_dtype
        )
        weights += arena_bytes((p.out_features - row0) * p.in_features * wbytes)
        copy += sum(rows * p.in_features * itemsize(d) for d, rows in copies.items())
    experts = {} if expert_bytes is None else {"expert_bytes": expert_bytes}
    return HostMemory(
        weights_bytes=weights,
        cpu_copy_bytes=copy,
        other_bytes=other_bytes,
        **experts,
        total_bytes=weights + copy + other_bytes + (expert_bytes or 0),
    )


def experts_bytes(spec: ModelSpec, placements: Iterable[ExpertsPlacement], cpu_dtype: str) -> tuple[int, int]:
    """(GPU bytes, host bytes) of the routed experts as the engine holds them (engine.experts):
    the GPU side's whole, as stored (ExpertsSpec.expert_bytes: quantized parts quantized, the
    others in the weights dtype); the CPU's quantized parts as stored (their packed kernels)
    and the others in `cpu_dtype` (the decode CPU format, which serves both phases); a split
    expert as its two pieces (ExpertsSpec.split_extra_bytes)."""
    by_name = {x.name: x for x in spec.experts}
    gpu = host = 0
    for p in placements:
        x = by_name[p.name]
        gpu += len(p.gpu) * x.expert_bytes
        host += len(p.cpu) * x.host_expert_bytes(itemsize(cpu_dtype))
        host += len(p.cpu) * (x.split_extra_bytes if p.split_units else 0)
    return gpu, host
