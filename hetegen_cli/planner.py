"""The plan solver: per-linear CPU/GPU split per phase, GPU residency, memory, predictions.

Pure Python (no torch). `make_plan(spec, profile, request)` fits the cost model from a profile
document; `solve(spec, rates, request)` does the rest (tests give it made-up Rates):

1. cpu_fraction per linear and phase from the balance condition (costmodel.balanced_fraction),
   rounded to plan.ROW_GRANULARITY rows;
2. GPU memory: reserve + fixed bytes + KV cache + workspace + staging buffers + the untied LM
   head when it fits, then whole linears made resident greedily by g = T_cpu / M_gpu;
3. host memory against the CPU budget;
4. predictions for hetegen, pure offload, a static layer split and CPU-only, and the bounds
   (predictions.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from hetegen_cli import costmodel as cm
from hetegen_cli.errors import InputError, PlanError
from hetegen_cli.model_spec import DTYPE_BYTES, LinearSpec, ModelSpec
from hetegen_cli.plan import (LinearEstimate, LinearPlacement, Plan, RuntimeSettings,
                              model_identity, round_rows)
from hetegen_cli.predictions import (bounds, cpu_only_prediction, figures,
                                     layer_split_prediction, offload_prediction, step_times,
                                     tokens_for)
from hetegen_cli.units import format_bytes

GiB = 1024 ** 3
#: GPU memory held back for the CUDA context, kernels and allocator fragmentation
#: (Accelerate's docs advise leaving 1-2 GB); --reserve changes it.
DEFAULT_RESERVE_BYTES = 1 * GiB
#: Without --gpu-memory the budget is the profiled free memory less this share of the total.
FREE_MEMORY_MARGIN = 0.05


@dataclass(frozen=True)
class PlanRequest:
    """What the user asked for. Sizes in bytes; None = take it from the profile."""

    prompt_len: int = 512
    max_new_tokens: int = 64
    batch_size: int = 1
    gpu_budget_bytes: int | None = None
    cpu_budget_bytes: int | None = None
    cpu_dtype: str | None = None          # None: the profile's fastest GEMV dtype
    reserve_bytes: int = DEFAULT_RESERVE_BYTES
    staging_buffers: int = 2
    model_arg: str = ""


def validate_request(spec: ModelSpec, req: PlanRequest) -> None:
    """InputError for lengths or sizes the model cannot take."""
    for value, flag in ((req.prompt_len, "--prompt-len"), (req.max_new_tokens, "--max-new-tokens"),
                        (req.batch_size, "--batch-size"), (req.staging_buffers, "staging buffers")):
        if value < 1:
            raise InputError(f"{flag} is {value}; it must be at least 1", f"pass {flag} 1 or more")
    total = req.prompt_len + req.max_new_tokens
    if total > spec.max_positions:
        raise InputError(
            f"--prompt-len {req.prompt_len} + --max-new-tokens {req.max_new_tokens} = {total} "
            f"tokens exceeds the context of {spec.name} ({spec.max_positions} tokens)",
            "lower --prompt-len or --max-new-tokens")
    if req.cpu_dtype is not None and req.cpu_dtype not in DTYPE_BYTES:
        raise InputError(f"unknown --cpu-dtype {req.cpu_dtype!r}",
                         f"use one of {', '.join(DTYPE_BYTES)}")
    for value, flag in ((req.gpu_budget_bytes, "--gpu-memory"), (req.cpu_budget_bytes, "--cpu-memory"),
                        (req.reserve_bytes, "--reserve")):
        if value is not None and value < 0:
            raise InputError(f"{flag} is negative", "give a size of zero or more")


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
    inter = max(l.out_features for l in spec.linears)
    acts = b * n * (6 * spec.hidden_size + 2 * inter) * nbytes
    scores = b * spec.num_heads * n * n * nbytes
    return acts + scores + 4 * b * spec.vocab_size


@dataclass(frozen=True)
class _Item:
    """A plannable linear with its balanced rows per phase."""

    spec: LinearSpec
    rows_prefill: int
    rows_decode: int
    priority_g: float

    @property
    def stream_bytes(self) -> int:
        """Largest GPU share that crosses PCIe in any phase."""
        return (self.spec.out_features - min(self.rows_prefill, self.rows_decode)) \
            * self.spec.in_features * self.spec.dtype_bytes


def _item(rates: cm.Rates, lin: LinearSpec, req: PlanRequest) -> _Item:
    rows = {}
    for phase in ("prefill", "decode"):
        f = cm.balanced_fraction(rates, lin.out_features, lin.in_features, tokens_for(lin.role, req, phase))
        rows[phase] = round_rows(f, lin.out_features)
        if phase == "decode":  # T_cpu at the balanced split = the split step time
            k = f * lin.out_features
            t = cm.split_times(rates, lin.out_features, lin.in_features, k, req.batch_size)
            t_cpu = max(t.cpu_s, t.transfer_s + t.gpu_s)  # the path time where f clamps to 0
    return _Item(lin, rows["prefill"], rows["decode"], t_cpu / lin.weight_bytes)


def _staging(items: list[_Item], resident: set[str]) -> int:
    return max((i.stream_bytes for i in items if i.spec.name not in resident), default=0)


def choose_resident(items: list[_Item], room: int, buffers: int) -> set[str]:
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
        free = room - used - buffers * _staging(items, resident)
        added = False
        for item in order:
            if item.spec.name not in resident and item.spec.weight_bytes <= free:
                resident.add(item.spec.name)
                used += item.spec.weight_bytes
                free -= item.spec.weight_bytes
                added = True
        if not added:
            return resident


def make_plan(spec: ModelSpec, profile: dict, req: PlanRequest,
              profile_identity: dict | None = None) -> Plan:
    """Fit the cost model from a (validated) profile document and solve the plan."""
    validate_request(spec, req)
    rates, notes = cm.rates_from_profile(profile, spec.dtype, req.cpu_dtype,
                                         req.batch_size * req.prompt_len)
    free, total = cm.profile_gpu_memory(profile)
    return solve(spec, rates, req, gpu_free_bytes=free, gpu_total_bytes=total,
                 cpu_available_bytes=cm.profile_available_ram(profile),
                 profile_identity=profile_identity, notes=notes)


def _layout(spec, rates, req, items, room: int, buffers: int) -> dict:
    """Resident set, placements and step times for one staging-buffer count."""
    resident = choose_resident(items, room, buffers)
    head = spec.lm_head.name
    placements = tuple(
        LinearPlacement(i.spec.name, i.spec.layer_index, i.spec.role, i.spec.out_features,
                        i.spec.in_features, i.spec.name in resident,
                        0 if i.spec.name in resident else i.rows_prefill,
                        0 if i.spec.name in resident else i.rows_decode)
        for i in items if not (i.spec.name == head and i.spec.name in resident))
    head_on_gpu = spec.tie_word_embeddings or head in resident
    times, totals = {}, {}
    for phase in ("prefill", "decode"):
        times[phase], totals[phase] = step_times(rates, spec, req, placements, phase, buffers, head_on_gpu)
    return {"buffers": buffers, "resident": resident, "placements": placements,
            "head_on_gpu": head_on_gpu, "times": times, "totals": totals,
            "total_s": totals["prefill"] + (req.max_new_tokens - 1) * totals["decode"]}


# --- the solver ----------------------------------------------------------------------------

def host_memory(placements, rates: cm.Rates, extra_bytes: int = 0) -> dict:
    """Host bytes: each host-held weight in the weights dtype (pinned for streaming) + a
    cpu-dtype copy of its CPU rows when the dtypes differ (a linear the CPU computes whole
    in both phases then keeps only that copy)."""
    differ = rates.cpu_dtype != rates.weights_dtype
    weights = copy = 0
    for p in placements:
        if p.resident:
            continue
        cpu_only = p.cpu_rows_prefill == p.cpu_rows_decode == p.out_features
        if not (differ and cpu_only):
            weights += p.out_features * p.in_features * rates.weight_bytes
        if differ:
            copy += p.max_cpu_rows * p.in_features * rates.cpu_dtype_bytes
    return {"weights_bytes": weights, "cpu_copy_bytes": copy, "other_bytes": extra_bytes,
            "total_bytes": weights + copy + extra_bytes}


def _check_host(host: dict, budget: int | None, source: str) -> None:
    if budget is not None and host["total_bytes"] > budget:
        raise PlanError(
            f"the plan needs {format_bytes(host['total_bytes'])} of host memory (weights "
            f"{format_bytes(host['weights_bytes'])} + CPU-dtype copy {format_bytes(host['cpu_copy_bytes'])}"
            f" + other {format_bytes(host['other_bytes'])}) but the CPU budget ({source}) is "
            f"{format_bytes(budget)}",
            "free RAM or raise --cpu-memory, give more --gpu-memory, or pass --cpu-dtype equal "
            "to the weights dtype to drop the second copy")


def solve(spec: ModelSpec, rates: cm.Rates, req: PlanRequest, *, gpu_free_bytes: int | None = None,
          gpu_total_bytes: int | None = None, cpu_available_bytes: int | None = None,
          profile_identity: dict | None = None, notes: list[str] | tuple = ()) -> Plan:
    """Solve the plan for `spec` on hardware `rates` (see module docstring)."""
    validate_request(spec, req)
    notes, warnings = list(notes), []
    if req.gpu_budget_bytes is None:
        budget, source = default_gpu_budget(gpu_free_bytes, gpu_total_bytes), "profile free memory"
    else:
        budget, source = req.gpu_budget_bytes, "--gpu-memory"
    cpu_budget = req.cpu_budget_bytes if req.cpu_budget_bytes is not None else cpu_available_bytes
    cpu_source = "--cpu-memory" if req.cpu_budget_bytes is not None else "profile available RAM"
    if cpu_budget is None:
        notes.append("no CPU memory budget known; host memory not checked")
    common = dict(spec=spec, rates=rates, req=req, profile_identity=profile_identity,
                  cpu_budget=cpu_budget, cpu_source=cpu_source)
    if not rates.has_gpu:
        if req.gpu_budget_bytes:
            notes.append("--gpu-memory ignored: the profile has no GPU")
        notes.append("the profile has no GPU: all-CPU plan (every cpu_fraction = 1)")
        return _all_cpu_plan(notes=notes, warnings=warnings, gpu_budget=0, **common)
    if budget == 0:
        notes.append(f"GPU budget 0 ({source}): all-CPU plan (every cpu_fraction = 1)")
        return _all_cpu_plan(notes=notes, warnings=warnings, gpu_budget=0, **common)

    lins = list(spec.linears) + ([] if spec.tie_word_embeddings else [spec.lm_head])
    items = [_item(rates, l, req) for l in lins]
    ctx = req.prompt_len + req.max_new_tokens
    gpu_mem = {"reserve_bytes": req.reserve_bytes, "fixed_bytes": spec.fixed_bytes,
               "kv_cache_bytes": spec.kv_cache_bytes(ctx, req.batch_size),
               "workspace_bytes": workspace_bytes(spec, req)}
    base = sum(gpu_mem.values())
    one_buffer = _staging(items, set())
    minimum = base + one_buffer
    if budget < minimum:
        raise PlanError(
            f"GPU budget {format_bytes(budget)} ({source}) is below the {format_bytes(minimum)} "
            f"{spec.name} needs on the GPU: fixed {format_bytes(gpu_mem['fixed_bytes'])} + KV cache "
            f"{format_bytes(gpu_mem['kv_cache_bytes'])} + workspace "
            f"{format_bytes(gpu_mem['workspace_bytes'])} + one staging buffer "
            f"{format_bytes(one_buffer)} + reserve {format_bytes(req.reserve_bytes)}",
            f"give --gpu-memory {format_bytes(minimum)} or more, lower --prompt-len, "
            "--max-new-tokens or --batch-size, or lower --reserve")
    best = None  # the fastest layout over staging-buffer counts; ties keep more buffers
    for buffers in range(req.staging_buffers, 0, -1):
        if base + buffers * one_buffer <= budget:
            lay = _layout(spec, rates, req, items, budget - base, buffers)
            if best is None or lay["total_s"] < best["total_s"] * (1 - 1e-12):
                best = lay
    buffers, resident, placements = best["buffers"], best["resident"], best["placements"]
    if buffers < req.staging_buffers and any(not p.resident for p in placements):
        notes.append(f"{buffers} staging buffer(s) instead of {req.staging_buffers}: the memory "
                     "of another buffer holds weights, which the cost model values more")
    head = spec.lm_head.name
    head_on_gpu = best["head_on_gpu"]
    gpu_mem["lm_head_bytes"] = spec.lm_head.weight_bytes if head in resident else 0
    gpu_mem["staging_bytes"] = buffers * _staging(items, resident)
    gpu_mem["resident_linear_bytes"] = sum(
        i.spec.weight_bytes for i in items if i.spec.name in resident and i.spec.name != head)
    gpu_mem["total_bytes"] = sum(gpu_mem.values())
    assert gpu_mem["total_bytes"] <= budget, (gpu_mem, budget)

    host = host_memory(placements, rates)
    _check_host(host, cpu_budget, cpu_source)
    split = [p for p in placements if not p.resident]
    if not split:
        warnings.append("everything fits in the GPU budget: this plan is plain GPU inference "
                        "(no weights on the host, no CPU work)")
    elif gpu_free_bytes and req.gpu_budget_bytes is not None:
        whole = base + sum(l.weight_bytes for l in lins)
        if whole <= default_gpu_budget(gpu_free_bytes, gpu_total_bytes):
            warnings.append(
                f"the whole model would fit in this GPU's free memory ({format_bytes(whole)} "
                f"needed) but --gpu-memory {format_bytes(budget)} puts "
                f"{format_bytes(host['weights_bytes'])} of weights on the host; raise "
                f"--gpu-memory for plain GPU inference")

    phase_times, totals = best["times"], best["totals"]
    by_name = {i.spec.name: i for i in items}
    estimates = tuple(
        LinearEstimate(by_name[p.name].spec.weight_bytes, by_name[p.name].priority_g,
                       phase_times["prefill"][k].to_dict(), phase_times["decode"][k].to_dict())
        for k, p in enumerate(placements))
    w_gpu = gpu_mem["resident_linear_bytes"] + (spec.lm_head.weight_bytes if head_on_gpu else 0)
    w_host = sum(p.out_features * p.in_features * rates.weight_bytes for p in split)
    predictions = {
        "hetegen": figures(req, totals["prefill"], totals["decode"], gpu_mem["total_bytes"]),
        "offload": offload_prediction(rates, spec, req, placements, head_on_gpu, buffers,
                                      gpu_mem["total_bytes"]),
        "layer_split": layer_split_prediction(
            rates, spec, req, budget, req.reserve_bytes + spec.fixed_bytes + gpu_mem["workspace_bytes"]),
        "cpu_only": cpu_only_prediction(rates, spec, req),
    }
    runtime = RuntimeSettings(weights_dtype=spec.dtype, cpu_dtype=rates.cpu_dtype,
                              cpu_threads=rates.cpu_threads, staging_buffers=buffers,
                              prefetch_depth=buffers - 1, pin_weights=True,
                              lm_head_on_gpu=head_on_gpu, requires_gpu=True)
    return _assemble(spec, req, placements, runtime, estimates, predictions,
                     bounds(rates, w_gpu, w_host, totals["decode"]),
                     budget={"gpu_budget_bytes": budget, "gpu_budget_source": source,
                             "gpu_minimum_bytes": minimum,
                             "gpu_unused_bytes": budget - gpu_mem["total_bytes"],
                             "cpu_budget_bytes": cpu_budget, "cpu_budget_source": cpu_source},
                     memory={"gpu": gpu_mem, "host": host}, rates=rates,
                     profile_identity=profile_identity, warnings=warnings, notes=notes)


def _assemble(spec, req, placements, runtime, estimates, predictions, bnds, *, budget, memory,
              rates, profile_identity, warnings, notes) -> Plan:
    hetegen = predictions["hetegen"]
    for key, other in predictions.items():
        if other is not None and key != "hetegen" and other.get("decode_tokens_per_s"):
            other["hetegen_decode_speedup"] = other["decode_s_per_token"] / hetegen["decode_s_per_token"]
            other["hetegen_end_to_end_speedup"] = other["total_s"] / hetegen["total_s"]
    return Plan(
        placements=placements, runtime=runtime, model=model_identity(spec, req.model_arg),
        workload={"prompt_len": req.prompt_len, "max_new_tokens": req.max_new_tokens,
                  "batch_size": req.batch_size, "prefill_tokens": req.batch_size * req.prompt_len,
                  "decode_tokens": req.batch_size,
                  "context_tokens": req.prompt_len + req.max_new_tokens},
        budget=budget, memory=memory, profile=profile_identity, estimates=estimates,
        predictions=predictions, bounds=bnds,
        residency={"priority": "g = T_cpu / M_gpu (decode, balanced split)", "phase": "decode",
                   "order": "g descending, then layer index, then name; LM head first",
                   "resident_count": sum(p.resident for p in placements),
                   "split_count": sum(not p.resident for p in placements)},
        rates=rates.to_dict(), warnings=tuple(warnings), notes=tuple(notes),
        created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def _all_cpu_plan(*, spec, rates, req, profile_identity, cpu_budget, cpu_source, notes, warnings,
                  gpu_budget) -> Plan:
    """Every linear (and an untied LM head) computed whole on the CPU; no GPU needed."""
    lins = list(spec.linears) + ([] if spec.tie_word_embeddings else [spec.lm_head])
    placements = tuple(LinearPlacement(l.name, l.layer_index, l.role, l.out_features,
                                       l.in_features, False, l.out_features, l.out_features)
                       for l in lins)
    ctx = req.prompt_len + req.max_new_tokens
    other = spec.fixed_bytes + spec.kv_cache_bytes(ctx, req.batch_size) + workspace_bytes(spec, req)
    host = host_memory(placements, rates, other)
    _check_host(host, cpu_budget, cpu_source)
    estimates, cpu_pred = [], cpu_only_prediction(rates, spec, req)
    for l in lins:
        times = [cm.split_times(rates, l.out_features, l.in_features, l.out_features,
                                tokens_for(l.role, req, ph), concurrent=False).to_dict()
                 for ph in ("prefill", "decode")]
        g = times[1]["cpu_s"] / l.weight_bytes
        estimates.append(LinearEstimate(l.weight_bytes, g, times[0], times[1]))
    gpu_mem = {k: 0 for k in ("reserve_bytes", "fixed_bytes", "kv_cache_bytes", "workspace_bytes",
                              "lm_head_bytes", "staging_bytes", "resident_linear_bytes", "total_bytes")}
    runtime = RuntimeSettings(weights_dtype=spec.dtype, cpu_dtype=rates.cpu_dtype,
                              cpu_threads=rates.cpu_threads, staging_buffers=0, prefetch_depth=0,
                              pin_weights=False, lm_head_on_gpu=spec.tie_word_embeddings,
                              requires_gpu=False)
    w_host = sum(l.weight_bytes for l in lins) + (spec.lm_head.weight_bytes if spec.tie_word_embeddings else 0)
    return _assemble(spec, req, placements, runtime, tuple(estimates),
                     {"hetegen": dict(cpu_pred), "offload": None, "layer_split": None,
                      "cpu_only": cpu_pred},
                     bounds(rates, 0, w_host, cpu_pred["decode_s_per_token"], cpu_plan=True),
                     budget={"gpu_budget_bytes": gpu_budget, "gpu_budget_source": "none",
                             "gpu_minimum_bytes": 0, "gpu_unused_bytes": 0,
                             "cpu_budget_bytes": cpu_budget, "cpu_budget_source": cpu_source},
                     memory={"gpu": gpu_mem, "host": host}, rates=rates,
                     profile_identity=profile_identity, warnings=warnings, notes=notes)
