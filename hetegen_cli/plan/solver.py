"""The plan solver: per-linear CPU/GPU split per phase, GPU residency, memory, predictions.

Pure Python (no torch). `make_plan(spec, profile, request)` fits the cost model from a profile
document; `solve(spec, rates, request)` does the rest (tests give it made-up Rates):

1. cpu_fraction per linear and phase from the balance condition (costmodel.balanced_fraction),
   rounded to plan.document.ROW_GRANULARITY rows;
2. GPU memory: reserve + fixed bytes + KV cache + workspace + staging buffers + the untied LM
   head when it fits, then whole linears made resident greedily by g = T_cpu / M_gpu
   (plan.residency);
3. host memory against the CPU budget;
4. predictions for hetegen, pure offload, a static layer split and CPU-only, and the bounds
   (costmodel.strategies).
"""

from __future__ import annotations

from dataclasses import replace

from hetegen_cli.core.errors import PlanError, ProfileError
from hetegen_cli.core.units import format_bytes
from hetegen_cli.models.shapes.spec import ModelSpec
from hetegen_cli.plan import costmodel as cm
from hetegen_cli.plan.all_cpu import all_cpu_plan
from hetegen_cli.plan.assemble import assemble, check_host
from hetegen_cli.plan.costmodel.experts import active_bytes
from hetegen_cli.plan.costmodel.fit import cpu_formats
from hetegen_cli.plan.costmodel.fixed import FixedCosts
from hetegen_cli.plan.costmodel.predict import CostInputs
from hetegen_cli.plan.costmodel.strategies import (
    bounds,
    cpu_only_prediction,
    hetegen_prediction,
    layer_split_prediction,
    offload_prediction,
    quant_bytes,
    step_times,
)
from hetegen_cli.plan.document import LinearEstimate, LinearPlacement, Plan, RuntimeSettings
from hetegen_cli.plan.experts import place_experts
from hetegen_cli.plan.formats import Tried, candidate_pairs, pick
from hetegen_cli.plan.memory import (
    default_gpu_budget,
    dequant_bytes,
    experts_bytes,
    host_memory,
    workspace_bytes,
)
from hetegen_cli.plan.pipeline import refine_placements
from hetegen_cli.plan.request import PlanRequest
from hetegen_cli.plan.residency import candidate, choose_resident, staging_bytes
from hetegen_cli.plan.sections import Budget, GpuMemory, LinearTimes, MemoryUse, Predictions
from hetegen_cli.profile.document import Profile, available_ram, gpu_memory, profile_sections


def make_plan(
    spec: ModelSpec, profile: dict | Profile, req: PlanRequest, profile_identity: dict | None = None
) -> Plan:
    """Fit the cost model from a (validated) profile document and solve the plan, once per
    (prefill, decode) pair of CPU formats; keep the pair plan.formats.pick chooses."""
    profile = profile_sections(profile)
    free, total = gpu_memory(profile)
    forced = req.cpu_dtypes
    measured = check_forced_formats(profile, forced)
    plans: dict[tuple[str, str], Plan] = {}
    tried: list[Tried] = []
    errors: dict[tuple[str, str], PlanError] = {}
    inputs = CostInputs.of(profile, profile_identity)
    for pair in candidate_pairs(measured, forced):
        rates, notes = inputs.rates(spec, pair, req.batch_size * req.prompt_len, "cuda")
        try:
            plan = solve(
                spec,
                rates,
                req,
                gpu_free_bytes=free,
                gpu_total_bytes=total,
                cpu_available_bytes=available_ram(profile),
                profile_identity=profile_identity,
                notes=notes + list(inputs.notes),
                fixed=inputs.fixed,
            )
        except PlanError as exc:
            errors[pair] = exc
            tried.append(Tried(pair, error=exc.message))
            continue
        plans[pair] = plan
        hetegen = plan.predictions.hetegen
        tried.append(
            Tried(
                pair,
                hetegen.total_s,
                hetegen.prefill_s,
                hetegen.decode_s_per_token,
                plan.memory.host.total_bytes,
            )
        )
    if not plans:
        raise _least_memory_error(errors, spec.dtype)
    chosen, record = pick(tried, forced is not None)
    plan = plans[chosen.pair]
    return replace(plan, cpu_formats=record, notes=(*plan.notes, f"CPU share format: {record.reason}"))


def check_forced_formats(profile: dict | Profile, forced: tuple[str, str] | None) -> list[str]:
    """The CPU formats the profile measured; ProfileError when a forced one is not among them."""
    measured = cpu_formats(profile)
    missing = [d for d in dict.fromkeys(forced or ()) if d not in measured]
    if missing:
        raise ProfileError(
            f"the profile has no CPU GEMV and GEMM measurements for {missing[0]}",
            f"pass --cpu-dtype {' or '.join(measured)}, or re-run `hetegen profile`",
        )
    return measured


def _least_memory_error(errors: dict[tuple[str, str], PlanError], weights_dtype: str) -> PlanError:
    """When no pair has a plan: the error of the pair that needs the least host memory (the
    weights dtype in both phases, no second copy) when it was tried, else the first."""
    return errors.get((weights_dtype, weights_dtype)) or next(iter(errors.values()))


def _layout(spec, rates, req, items, room: int, buffers: int) -> dict:
    """Resident set, placements and step times for one staging-buffer count."""
    resident = choose_resident(items, room, buffers)
    head = spec.lm_head.name
    placements = tuple(
        LinearPlacement.of(i.spec, True)
        if i.spec.name in resident
        else LinearPlacement.of(i.spec, False, i.rows_prefill, i.rows_decode)
        for i in items
        if not (i.spec.name == head and i.spec.name in resident)
    )
    head_on_gpu = spec.tie_word_embeddings or head in resident
    if req.objective == "pipeline":  # per-linear fractions chosen for the whole step (plan.pipeline)
        placements = refine_placements(spec, rates, req, placements, buffers, staging_bytes(items, resident))
    times, totals = {}, {}
    for phase in ("prefill", "decode"):
        times[phase], totals[phase] = step_times(rates, spec, req, placements, phase, buffers, head_on_gpu)
    return {
        "buffers": buffers,
        "resident": resident,
        "placements": placements,
        "head_on_gpu": head_on_gpu,
        "times": times,
        "totals": totals,
        "total_s": totals["prefill"] + (req.max_new_tokens - 1) * totals["decode"],
    }


# --- the solver ----------------------------------------------------------------------------


def solve(
    spec: ModelSpec,
    rates: cm.Rates | cm.PhaseRates,
    req: PlanRequest,
    *,
    gpu_free_bytes: int | None = None,
    gpu_total_bytes: int | None = None,
    cpu_available_bytes: int | None = None,
    profile_identity: dict | None = None,
    notes: list[str] | tuple = (),
    fixed: FixedCosts | None = None,
) -> Plan:
    """Solve the plan for `spec` on hardware `rates` (see module docstring); one Rates is
    used for both phases. `fixed`: the engine's fixed costs (costmodel.fixed), added to
    every strategy's prediction."""
    rates = cm.PhaseRates.of(rates)
    spec.check_context(req.prompt_len, req.max_new_tokens, "--prompt-len")
    notes, warnings = list(notes), []
    if req.gpu_budget_bytes is None:
        budget, source = default_gpu_budget(gpu_free_bytes, gpu_total_bytes), "profile free memory"
    else:
        budget, source = req.gpu_budget_bytes, "--gpu-memory"
    cpu_budget = req.cpu_budget_bytes if req.cpu_budget_bytes is not None else cpu_available_bytes
    cpu_source = "--cpu-memory" if req.cpu_budget_bytes is not None else "profile available RAM"
    if cpu_budget is None:
        notes.append("no CPU memory budget known; host memory not checked")
    all_cpu_why = None
    if not rates.has_gpu:
        if req.gpu_budget_bytes:
            notes.append("--gpu-memory ignored: the profile has no GPU")
        all_cpu_why = "the profile has no GPU"
    elif budget == 0:
        all_cpu_why = f"GPU budget 0 ({source})"
    if all_cpu_why is not None:
        notes.append(f"{all_cpu_why}: all-CPU plan (every cpu_fraction = 1)")
        return all_cpu_plan(
            spec, rates, req, profile_identity, (cpu_budget, cpu_source), notes, warnings, fixed
        )

    lins = list(spec.linears) + ([] if spec.tie_word_embeddings else [spec.lm_head])
    items = [candidate(rates, lin, req) for lin in lins]
    ctx = req.prompt_len + req.max_new_tokens
    gpu_mem = {
        "reserve_bytes": req.reserve_bytes,
        "fixed_bytes": spec.fixed_bytes,
        "kv_cache_bytes": spec.kv_cache_bytes(ctx, req.batch_size),
        "workspace_bytes": workspace_bytes(spec, req),
    }
    if spec.quant is not None:
        gpu_mem["dequant_bytes"] = dequant_bytes(spec)
    base = sum(gpu_mem.values())
    one_buffer = staging_bytes(items, set())
    minimum = base + one_buffer
    if budget < minimum:
        raise PlanError(
            f"GPU budget {format_bytes(budget)} ({source}) is below the {format_bytes(minimum)} "
            f"{spec.name} needs on the GPU: fixed {format_bytes(gpu_mem['fixed_bytes'])} + KV cache "
            f"{format_bytes(gpu_mem['kv_cache_bytes'])} + workspace "
            f"{format_bytes(gpu_mem['workspace_bytes'])} + one staging buffer "
            f"{format_bytes(one_buffer)} + reserve {format_bytes(req.reserve_bytes)}",
            f"give --gpu-memory {format_bytes(minimum)} or more, lower --prompt-len, "
            "--max-new-tokens or --batch-size, or lower --reserve",
        )
    best = None  # the fastest layout over staging-buffer counts; ties keep more buffers
    for buffers in range(req.staging_buffers, 0, -1):
        if base + buffers * one_buffer <= budget:
            lay = _layout(spec, rates, req, items, budget - base, buffers)
            if best is None or lay["total_s"] < best["total_s"] * (1 - 1e-12):
                best = lay
    buffers, resident, placements = best["buffers"], best["resident"], best["placements"]
    if buffers < req.staging_buffers and any(not p.resident for p in placements):
        notes.append(
            f"{buffers} staging buffer(s) instead of {req.staging_buffers}: the memory "
            "of another buffer holds weights, which the cost model values more"
        )
    head = spec.lm_head.name
    head_on_gpu = best["head_on_gpu"]
    gpu_mem["lm_head_bytes"] = spec.lm_head.weight_bytes if head in resident else 0
    gpu_mem["staging_bytes"] = buffers * staging_bytes(items, resident)
    gpu_mem["resident_linear_bytes"] = sum(
        i.spec.weight_bytes for i in items if i.spec.name in resident and i.spec.name != head
    )
    experts, expert_gpu, expert_staging, expert_notes = place_experts(
        spec, rates, req, budget - sum(gpu_mem.values())
    )
    notes += expert_notes
    if spec.experts:
        gpu_mem["resident_expert_bytes"] = expert_gpu
        gpu_mem["expert_staging_bytes"] = expert_staging
    gpu_mem["total_bytes"] = sum(gpu_mem.values())
    assert gpu_mem["total_bytes"] <= budget, (gpu_mem, budget)

    expert_host = experts_bytes(spec, experts, rates.decode.cpu_dtype)[1] if spec.experts else None
    host = host_memory(
        placements, rates.weights_dtype, rates.cpu_dtypes, quant=spec.quant_map(), expert_bytes=expert_host
    )
    check_host(host, cpu_budget, cpu_source, rates)
    split = [p for p in placements if not p.resident]
    if not split and not any(p.cpu for p in experts):
        warnings.append(
            "everything fits in the GPU budget: this plan is plain GPU inference "
            "(no weights on the host, no CPU work)"
        )
    elif gpu_free_bytes and req.gpu_budget_bytes is not None:
        whole = base + sum(lin.weight_bytes for lin in lins) + spec.expert_weight_bytes
        if whole <= default_gpu_budget(gpu_free_bytes, gpu_total_bytes):
            warnings.append(
                f"the whole model would fit in this GPU's free memory ({format_bytes(whole)} "
                f"needed) but --gpu-memory {format_bytes(budget)} puts "
                f"{format_bytes(host.weights_bytes)} of weights on the host; raise "
                f"--gpu-memory for plain GPU inference"
            )

    phase_times = best["times"]
    by_name = {i.spec.name: i for i in items}
    estimates = tuple(
        LinearEstimate(
            by_name[p.name].spec.weight_bytes,
            by_name[p.name].priority_g,
            LinearTimes(**phase_times["prefill"][k].to_dict()),
            LinearTimes(**phase_times["decode"][k].to_dict()),
        )
        for k, p in enumerate(placements)
    )
    active_gpu, active_host = active_bytes(spec.experts, experts, req.batch_size, req.expert_use)
    w_gpu = gpu_mem["resident_linear_bytes"] + (spec.lm_head.weight_bytes if head_on_gpu else 0)
    w_gpu += round(active_gpu)
    held = {lin.name: lin.weight_bytes for lin in lins}
    w_host = sum(held[p.name] for p in split) + round(active_host)
    used = gpu_mem["total_bytes"]
    if fixed is not None and not fixed.has("cuda"):
        notes.append(
            "the profile has no engine costs measured on the GPU: GPU-side predictions leave out "
            "the non-linear work and the engine's cost per linear; re-run `hetegen profile` on this machine"
        )
    predictions = Predictions(
        hetegen=hetegen_prediction(
            rates, spec, req, placements, buffers, head_on_gpu, used, fixed, experts=experts
        ),
        offload=offload_prediction(
            rates, spec, req, placements, head_on_gpu, buffers, used, fixed, experts=experts
        ),
        layer_split=layer_split_prediction(
            rates, spec, req, budget, req.reserve_bytes + spec.fixed_bytes + gpu_mem["workspace_bytes"], fixed
        ),
        cpu_only=cpu_only_prediction(rates, spec, req, fixed),
    )
    runtime = RuntimeSettings(
        weights_dtype=spec.dtype,
        cpu_dtype_prefill=rates.prefill.cpu_dtype,
        cpu_dtype_decode=rates.decode.cpu_dtype,
        cpu_threads=rates.decode.cpu_threads,
        staging_buffers=buffers,
        prefetch_depth=buffers - 1,
        pin_weights=True,
        lm_head_on_gpu=head_on_gpu,
        requires_gpu=True,
        copy_engines=rates.decode.h2d_copy_engines,
    )
    bnds = bounds(rates, w_gpu, w_host, predictions.hetegen.decode_s_per_token, quant=quant_bytes(spec))
    return assemble(
        spec,
        req,
        placements,
        runtime,
        estimates,
        predictions,
        bnds,
        budget=Budget(
            gpu_budget_bytes=budget,
            gpu_budget_source=source,
            gpu_minimum_bytes=minimum,
            gpu_unused_bytes=budget - used,
            cpu_budget_bytes=cpu_budget,
            cpu_budget_source=cpu_source,
        ),
        memory=MemoryUse(gpu=GpuMemory(**gpu_mem), host=host),
        rates=rates,
        profile_identity=profile_identity,
        warnings=warnings,
        notes=notes,
        experts=experts,
    )
