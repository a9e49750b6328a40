"""How `run` executes: plainly (the model fits, or no GPU) or through the heterogeneous engine.

Rules, in order:
- `--plan PATH`: the plan is checked against the model; one that needs a GPU is refused on a
  machine without CUDA unless `--device cpu` asks for the CPU stand-in (slow; for testing).
- no plan, CUDA present, the whole model fits in free GPU memory (and no --gpu-memory): plain GPU.
- no plan, CUDA present, otherwise: plan on the fly from the saved profile (measured quickly
  when missing) and the --gpu-memory budget, then run the engine. A note says so.
- no plan, no CUDA: plain CPU. An all-CPU plan is exactly that, and needs no profile.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hetegen_cli.errors import DeviceError
from hetegen_cli.output import note, warn


@dataclass(frozen=True)
class EngineOptions:
    plan_path: Path | None = None
    gpu_memory: str | None = None      # budget text for planning on the fly
    profile_path: Path | None = None


def plan_summary(plan: Any) -> dict[str, Any]:
    """A short description of a plan for the run document and the stderr note."""
    pred = (plan.predictions or {}).get("hetegen") or {}
    return {
        "model": plan.model.get("name"), "created_utc": plan.created_utc,
        "split_linears": plan.split_count, "resident_linears": plan.resident_count,
        "gpu_budget_bytes": (plan.budget or {}).get("gpu_bytes"),
        "cpu_dtype": plan.runtime.cpu_dtype, "weights_dtype": plan.runtime.weights_dtype,
        "cpu_threads": plan.runtime.cpu_threads, "requires_gpu": plan.runtime.requires_gpu,
        "predicted_decode_tokens_per_s": pred.get("decode_tokens_per_s"),
        "predicted_prefill_s": pred.get("prefill_s"),
    }


def _plan_on_the_fly(ctx: Any, engine: EngineOptions) -> Any:
    from hetegen_cli import planner
    from hetegen_cli.cli_plan import load_or_measure_profile
    from hetegen_cli.units import parse_size

    req = planner.PlanRequest(
        prompt_len=len(ctx.prompt_ids), max_new_tokens=ctx.options.max_new_tokens,
        gpu_budget_bytes=parse_size(engine.gpu_memory, "--gpu-memory") if engine.gpu_memory else None,
        model_arg=ctx.options.model or "")
    planner.validate_request(ctx.ref.spec, req)
    doc, identity = load_or_measure_profile(engine.profile_path, quiet=True)
    plan = planner.make_plan(ctx.ref.spec, doc, req, profile_identity=identity)
    s = plan_summary(plan)
    note(f"no --plan given: planned on the fly for this machine ({s['split_linears']} split, "
         f"{s['resident_linears']} resident linears; predicted "
         f"{(s['predicted_decode_tokens_per_s'] or 0):.2f} decode tok/s). "
         "Save one with `hetegen plan --output PLAN.json`.")
    for message in plan.warnings:
        warn(message)
    return plan


def choose_builder(ctx: Any, engine: EngineOptions) -> Any:
    """A ModelBuilder for `execute_run`, or None for the plain model. Validates the plan first."""
    from hetegen_cli.devices import CpuBackend, cuda_available, get_backend
    from hetegen_cli.plan import check_plan_matches, load_plan

    device = ctx.options.device
    if engine.plan_path is not None:
        plan = load_plan(engine.plan_path)
        check_plan_matches(plan, ctx.ref.spec)
        if plan.runtime.requires_gpu and device != "cpu" and not cuda_available():
            raise DeviceError(f"plan {engine.plan_path} needs a GPU and this machine has no CUDA GPU",
                              "re-plan here with `hetegen plan` (a CPU-only profile gives an all-CPU "
                              "plan), or pass --device cpu to run it on the CPU stand-in (slow)")
        if plan.runtime.requires_gpu and device == "cpu":
            warn("running a GPU plan on the CPU stand-in backend: the GPU share is computed on the "
                 "CPU (for testing; not fast)")
        backend = CpuBackend() if device == "cpu" or not plan.runtime.requires_gpu else get_backend("cuda")
        return _engine_builder(plan, backend, "from " + str(engine.plan_path))
    if not cuda_available() or device == "cpu":
        if engine.gpu_memory is not None and device != "cpu":
            raise DeviceError("--gpu-memory needs a CUDA GPU and this machine has none",
                              "drop --gpu-memory (the model then runs on the CPU)")
        return None
    if engine.gpu_memory is None and ctx.backend.is_cuda:
        return None  # pick_device found that the whole model fits: plain GPU inference
    plan = _plan_on_the_fly(ctx, engine)
    if not plan.runtime.requires_gpu:
        return None
    return _engine_builder(plan, get_backend("cuda"), "planned on the fly")


def _engine_builder(plan: Any, backend: Any, origin: str) -> Any:
    from hetegen_cli.cli_run import BuiltModel

    def build(ctx: Any) -> BuiltModel:
        from hetegen_cli.engine import load_hetero_model

        start = time.perf_counter()
        hetero = load_hetero_model(ctx.ref, plan.placements, plan.runtime, backend,
                                   progress=True)
        load_s = time.perf_counter() - start
        summary = {**plan_summary(plan), "origin": origin, "backend": backend.name}
        return BuiltModel(hetero.model, "hetegen", str(hetero.device), plan.runtime.weights_dtype,
                          load_s, extra={"plan": summary, "hetero": hetero})

    return build
