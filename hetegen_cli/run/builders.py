"""How `run` builds its model: plainly, or through the heterogeneous engine.

Rules, in order:
- `--plan PATH`: the plan is checked against the model; one that needs a GPU is refused on a
  machine without CUDA unless `--device cpu` asks for the CPU stand-in (slow; for testing).
- no plan, CUDA present, the whole model fits in free GPU memory (plan.memory's answer) and no
  --gpu-memory: plain GPU.
- no plan, CUDA present, otherwise: plan on the fly from the saved profile (measured quickly
  when missing) and the --gpu-memory budget, then run the engine. A note says so.
- no plan, no CUDA: plain CPU. An all-CPU plan is exactly that, and needs no profile.
"""

from __future__ import annotations

from hetegen_cli.core.console import note, warn
from hetegen_cli.core.devices import Backend, CpuBackend, cuda_available, get_backend
from hetegen_cli.core.errors import DeviceError
from hetegen_cli.engine.hetero_model import load_hetero_model
from hetegen_cli.models.loader import LoadedModel, load_model, resolve_dtype
from hetegen_cli.models.source import ModelRef
from hetegen_cli.plan.document import Plan
from hetegen_cli.plan.memory import whole_model_gpu_bytes
from hetegen_cli.plan.request import PlanRequest
from hetegen_cli.plan.solver import make_plan
from hetegen_cli.profile.measure import load_or_measure
from hetegen_cli.run.context import EngineOptions, ModelBuilder, RunContext, RunOptions


def pick_device(options: RunOptions, ref: ModelRef, prompt_tokens: int) -> tuple[Backend, str, bool]:
    """(backend, dtype, fits): --device auto uses the GPU plainly only when the whole model fits
    in free memory; otherwise the heterogeneous engine runs it (choose_builder)."""
    kind = options.device
    if kind == "auto" and not cuda_available():
        kind = "cpu"
    try:
        backend = get_backend("cuda" if kind in ("auto", "cuda") else "cpu")
    except DeviceError as exc:
        raise DeviceError(exc.message, "run without --device cuda (or with --device cpu)") from exc
    dtype = resolve_dtype(options.dtype, ref.spec.dtype, "cuda" if backend.is_cuda else "cpu")
    if not backend.is_cuda:
        return backend, dtype, False
    req = PlanRequest(prompt_len=prompt_tokens, max_new_tokens=options.max_new_tokens)
    free, _ = backend.memory_info()
    if whole_model_gpu_bytes(ref.spec, req, dtype) <= free:
        return backend, dtype, True
    if kind == "cuda":
        return backend, dtype, False
    return CpuBackend(), resolve_dtype(options.dtype, ref.spec.dtype, "cpu"), False


def build_plain_model(ctx: RunContext) -> LoadedModel:
    """The stock transformers model, whole, on the chosen device."""
    return load_model(ctx.ref, dtype=ctx.dtype, device=str(ctx.backend.device))


def _plan_on_the_fly(ctx: RunContext, engine: EngineOptions) -> Plan:
    req = PlanRequest(
        prompt_len=len(ctx.prompt_ids),
        max_new_tokens=ctx.options.max_new_tokens,
        gpu_budget_bytes=engine.gpu_budget_bytes,
        model_arg=ctx.options.model or "",
    )
    doc, identity = load_or_measure(engine.profile_path)
    plan = make_plan(ctx.ref.spec, doc, req, profile_identity=identity)
    predicted = (plan.predictions.get("hetegen") or {}).get("decode_tokens_per_s") or 0.0
    note(
        f"no --plan given: planned on the fly for this machine ({plan.split_count} split, "
        f"{plan.resident_count} resident linears; predicted {predicted:.2f} decode tok/s). "
        "Save one with `hetegen plan --output PLAN.json`."
    )
    for message in plan.warnings:
        warn(message)
    return plan


def check_plan_device(plan: Plan, device: str, origin: str) -> None:
    """DeviceError when a plan that needs a GPU meets a machine without one (and no --device
    cpu asked for the stand-in): checked before anything slow."""
    if plan.runtime.requires_gpu and device != "cpu" and not cuda_available():
        raise DeviceError(
            f"plan {origin} needs a GPU and this machine has no CUDA GPU",
            "re-plan here with `hetegen plan` (a CPU-only profile gives an all-CPU "
            "plan), or pass --device cpu to run it on the CPU stand-in (slow)",
        )


def choose_builder(ctx: RunContext, engine: EngineOptions) -> ModelBuilder | None:
    """The engine's ModelBuilder, or None for the plain model. Validates the plan first."""
    device = ctx.options.device
    if ctx.plan is not None:
        plan = ctx.plan
        check_plan_device(plan, device, str(engine.plan_path))
        if plan.runtime.requires_gpu and device == "cpu":
            warn(
                "running a GPU plan on the CPU stand-in backend: the GPU share is computed on the "
                "CPU (for testing; not fast)"
            )
        backend = CpuBackend() if device == "cpu" or not plan.runtime.requires_gpu else get_backend("cuda")
        return engine_builder(plan, backend, "from " + str(engine.plan_path))
    if not cuda_available() or device == "cpu":
        if engine.gpu_budget_bytes is not None and device != "cpu":
            raise DeviceError(
                "--gpu-memory needs a CUDA GPU and this machine has none",
                "drop --gpu-memory (the model then runs on the CPU)",
            )
        return None
    if engine.gpu_budget_bytes is None and ctx.fits_on_gpu:
        return None  # the whole model fits: plain GPU inference
    plan = _plan_on_the_fly(ctx, engine)
    if not plan.runtime.requires_gpu:
        return None
    return engine_builder(plan, get_backend("cuda"), "planned on the fly")


def engine_builder(plan: Plan, backend: Backend, origin: str) -> ModelBuilder:
    """A ModelBuilder that loads the model through the engine with `plan` on `backend`."""

    def build(ctx: RunContext) -> LoadedModel:
        loaded = load_hetero_model(ctx.ref, plan.placements, plan.runtime, backend, progress=True)
        loaded.info["plan"] = {**plan.summary(), "origin": origin, "backend": backend.name}
        return loaded

    return build
