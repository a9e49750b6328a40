"""A solved plan put together: its typed sections from the solver's results, and the host
memory check (pure Python). Shared by the solver and the all-CPU plan."""

from __future__ import annotations

import time

from hetegen_cli.core.errors import PlanError
from hetegen_cli.core.units import format_bytes
from hetegen_cli.plan import costmodel as cm
from hetegen_cli.plan.costmodel.strategies import with_speedups
from hetegen_cli.plan.document import Plan, model_identity
from hetegen_cli.plan.expert_stats import UNIFORM_RECORD
from hetegen_cli.plan.sections import HostMemory, ProfileIdentity, RatesRecord, Residency, Workload


def check_host(host: HostMemory, budget: int | None, source: str, rates: cm.PhaseRates) -> None:
    """PlanError when the plan's host memory exceeds the CPU budget."""
    if budget is not None and host.total_bytes > budget:
        hint = "free RAM or raise --cpu-memory, or give more --gpu-memory"
        if host.cpu_copy_bytes:
            hint += f"; --cpu-dtype {rates.weights_dtype} drops the CPU-dtype copy"
        raise PlanError(
            f"the plan needs {format_bytes(host.total_bytes)} of host memory (weights "
            f"{format_bytes(host.weights_bytes)} + CPU-dtype copy {format_bytes(host.cpu_copy_bytes)}"
            f" + other {format_bytes(host.other_bytes)}) but the CPU budget ({source}) is "
            f"{format_bytes(budget)}",
            hint,
        )


def assemble(
    spec,
    req,
    placements,
    runtime,
    estimates,
    predictions,
    bnds,
    *,
    budget,
    memory,
    rates,
    profile_identity,
    warnings,
    notes,
    experts=(),
) -> Plan:
    use = req.expert_use.record if req.expert_use is not None else UNIFORM_RECORD
    return Plan(
        placements=placements,
        runtime=runtime,
        model=model_identity(spec, req.model_arg),
        workload=Workload(
            prompt_len=req.prompt_len,
            max_new_tokens=req.max_new_tokens,
            batch_size=req.batch_size,
            prefill_tokens=req.batch_size * req.prompt_len,
            decode_tokens=req.batch_size,
            context_tokens=req.prompt_len + req.max_new_tokens,
        ),
        budget=budget,
        memory=memory,
        profile=ProfileIdentity(**profile_identity) if profile_identity is not None else None,
        estimates=estimates,
        predictions=with_speedups(predictions),
        bounds=bnds,
        residency=Residency(
            priority="g = T_cpu / M_gpu (decode, balanced split)",
            phase="decode",
            order="g descending, then layer index, then name; LM head first",
            resident_count=sum(p.resident for p in placements),
            split_count=sum(not p.resident for p in placements),
        ),
        rates=RatesRecord(**rates.to_dict()),
        warnings=tuple(warnings),
        notes=tuple(notes),
        created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        experts=tuple(experts),
        expert_use=use if spec.experts else None,
    )
