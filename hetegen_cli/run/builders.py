"""How `run` builds its model: plainly, or through the heterogeneous engine.

Rules, in order:
- `--plan PATH`: the plan is checked against the model; one that needs a GPU is refused on a
  machine without CUDA unless `--device cpu` asks for the CPU stand-in (slow; for testing).
- no plan, CUDA present, the whole model fits in free GPU memory (plan.memory's answer) and no
  --gpu-memory: plain GPU.
- no plan, CUDA present, otherwise: plan on the fly from the saved profile (measured quickly
  when missing) and the --gpu-memory budget, then run the engine. A note says so.
- no plan, no CUDA (or --device cpu): the CPU computes everything. With --dtype auto and a
  profile (saved, or --profile), an all-CPU plan picks the CPU format of each phase
  (docs/plan.md, section 1b): one format D for both phases runs the plain model in D; two run
  the engine with the model in the prefill format and decode's linears in the decode format.
  Without a profile, with --dtype, or when the choice is float32 in both phases, the plain
  model runs in the --dtype (float32 for auto).
- a quantized model (--quant, or stored so) follows the same rules, except that without a
  plan on the CPU it runs plainly on its packed kernels, and on a GPU it always goes through
  the engine (planned on the fly when no plan is given; resident linears stay quantized).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hetegen_cli.core import paths
from hetegen_cli.core.console import note, warn
from hetegen_cli.core.devices import Backend, CpuBackend, cuda_available, get_backend
from hetegen_cli.core.errors import DeviceError, HetegenError
from hetegen_cli.engine.hetero_model import load_hetero_model
from hetegen_cli.models.loading.loader import LoadedModel, load_model, load_tokenizer, resolve_dtype
from hetegen_cli.models.loading.source import ModelRef, resolve_model
from hetegen_cli.plan.document import Plan, check_plan_matches
from hetegen_cli.plan.load import load_plan
from hetegen_cli.plan.memory import whole_model_gpu_bytes
from hetegen_cli.plan.request import PlanRequest
from hetegen_cli.plan.solver import make_plan
from hetegen_cli.run.context import EngineOptions, ModelBuilder, RunContext, RunOptions
from hetegen_cli.run.engine_costs import load_or_measure


def pick_device(options: RunOptions, ref: ModelRef, prompt_tokens: int) -> tuple[Backend, str, bool]:
    """(backend, dtype, fits): --device auto uses the GPU plainly only when the whole model fits
    in free memory; otherwise the heterogeneous engine runs it (choose_builder). A quantized
    model on a GPU always goes through the engine (its resident linears stay quantized there)."""
    kind = options.device
    if kind == "auto" and not cuda_available():
        kind = "cpu"
    try:
        backend = get_backend("cuda" if kind in ("auto", "cuda") else "cpu")
    except DeviceError as exc:
        raise DeviceError(exc.message, "run without --device cuda (or with --device cpu)") from exc
    if ref.spec.quant is not None:  # stored quantized: its float parts in the stored dtype
        return backend, ref.spec.dtype, False
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


def resolve_checked(options: RunOptions, engine: EngineOptions) -> tuple[Plan | None, ModelRef, Any]:
    """(plan, model, tokenizer) after every check that needs no weights, cheapest first: the
    plan file, the plan against this machine, the model's files and headers, the plan against
    the model (its shapes, dtype and quantization). Shared by run, serve, eval."""
    plan = load_plan(engine.plan_path) if engine.plan_path is not None else None
    if plan is not None:
        check_plan_device(plan, options.device, str(engine.plan_path))
    ref = resolve_model(
        options.model, need_weights=True, quant=options.quant, allow_float_copy=options.allow_float_copy
    )
    for message in ref.warnings:
        warn(message)
    if plan is not None:
        check_plan_matches(plan, ref.spec)
    return plan, ref, load_tokenizer(ref.path)


def build_quantized_model(ctx: RunContext) -> LoadedModel:
    """The quantized model on the CPU (models.loading.quantized_loader: packed int8/int4 kernels)."""
    from hetegen_cli.models.loading.quantized_loader import load_quantized

    return load_quantized(ctx.ref)


def build_plain_model(ctx: RunContext) -> LoadedModel:
    """The stock transformers model, whole, on the chosen device."""
    return load_model(ctx.ref, dtype=ctx.dtype, device=str(ctx.backend.device))


def _plan_on_the_fly(ctx: RunContext, engine: EngineOptions) -> Plan:
    req = PlanRequest(
        prompt_len=ctx.planned_prompt_tokens,
        max_new_tokens=ctx.options.max_new_tokens,
        gpu_budget_bytes=engine.gpu_budget_bytes,
        model_arg=ctx.options.model or "",
    )
    doc, identity = load_or_measure(engine.profile_path)
    plan = make_plan(ctx.ref.spec, doc, req, profile_identity=identity)
    hetegen = plan.predictions.hetegen
    predicted = hetegen.decode_tokens_per_s or 0.0 if hetegen else 0.0
    note(
        f"no --plan given: planned on the fly for this machine ({plan.split_count} split, "
        f"{plan.resident_count} resident linears; predicted {predicted:.2f} decode tok/s). "
        "Save one with `hetegen plan --output PLAN.json`."
    )
    for message in plan.warnings:
        warn(message)
    return plan


def all_cpu_formats_plan(
    ref: ModelRef, profile: dict, identity: dict, req: PlanRequest
) -> tuple[Plan, ModelRef]:
    """How the CPU alone runs `ref` fastest in the profile's formats: an all-CPU plan
    (`req` with GPU budget 0) chooses the CPU formats (P, D) of prefill and decode; the model
    then runs in P (embeddings, norms, attention and KV cache too, which makes them cheaper)
    with decode's linears in D. Returns (plan, `ref` in P); the plan keeps the choice's record."""
    req = replace(req, gpu_budget_bytes=0)
    first = make_plan(ref.spec, profile, req, profile_identity=identity)
    prefill, decode = first.runtime.cpu_dtypes
    if ref.spec.dtype == prefill or ref.path is None:
        return first, ref
    ref_p = replace(ref, spec=resolve_model(str(ref.path), need_weights=True, dtype=prefill).spec)
    plan = make_plan(ref_p.spec, profile, replace(req, cpu_dtype=f"{prefill},{decode}"), identity)
    note = f"the model runs in {prefill}, the prefill format; decode's linears in {decode}"
    return replace(plan, cpu_formats=first.cpu_formats, notes=(*first.notes, note)), ref_p


def _cpu_formats_builder(ctx: RunContext, engine: EngineOptions) -> ModelBuilder | None:
    """The CPU model in the profile's best format per phase (docs/plan.md, section 1b) when
    --dtype is auto and a profile exists: plain in D when both phases use one dtype D, else the
    engine with all_cpu_formats_plan. None (the plain model in the run's dtype) when the
    profile's choice is the run's dtype in both phases or there is no profile. A profile that
    cannot be used is a warning here, not an error."""
    if ctx.options.dtype != "auto":
        return None
    if engine.profile_path is None and paths.probe(paths.default_profile_path(), "the saved profile") is None:
        return None  # no profile: do not spend a minute measuring one for a plain CPU run
    try:
        doc, identity = load_or_measure(engine.profile_path)
        ref = ctx.ref
        if ref.spec.dtype != ctx.dtype:
            ref = replace(ref, spec=resolve_model(str(ref.path), need_weights=True, dtype=ctx.dtype).spec)
        req = PlanRequest(
            prompt_len=ctx.planned_prompt_tokens,
            max_new_tokens=ctx.options.max_new_tokens,
            model_arg=ctx.options.model or "",
        )
        plan, ref = all_cpu_formats_plan(ref, doc, identity, req)
    except HetegenError as exc:
        warn(f"the profile's CPU formats are not used ({exc.message}); running in {ctx.dtype}")
        return None
    prefill, decode = plan.runtime.cpu_dtypes
    if (prefill, decode) == (ctx.dtype, ctx.dtype):
        return None
    if prefill == decode:
        note(f"running in {prefill}, the profile's fastest CPU format for this run; --dtype forces another")
        return lambda c: load_model(c.ref, dtype=prefill, device="cpu")
    note(
        f"running in {prefill} with decode's linears in {decode}: the CPU formats chosen from the "
        "profile for this run; --dtype forces one format"
    )
    return engine_builder(plan, CpuBackend(), "all-CPU, formats from the profile", ref)


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
        if ctx.ref.spec.quant is not None:  # packed CPU kernels for every quantized linear
            return build_quantized_model
        return _cpu_formats_builder(ctx, engine)
    if engine.gpu_budget_bytes is None and ctx.fits_on_gpu:
        return None  # the whole model fits: plain GPU inference
    plan = _plan_on_the_fly(ctx, engine)
    if not plan.runtime.requires_gpu:
        return None
    return engine_builder(plan, get_backend("cuda"), "planned on the fly")


def engine_builder(plan: Plan, backend: Backend, origin: str, ref: ModelRef | None = None) -> ModelBuilder:
    """A ModelBuilder that loads the model (`ref`, default the run's) through the engine with
    `plan` on `backend`."""

    def build(ctx: RunContext) -> LoadedModel:
        loaded = load_hetero_model(ref or ctx.ref, plan.placements, plan.runtime, backend, progress=True)
        loaded.info["plan"] = {**plan.summary(), "origin": origin, "backend": backend.name}
        return loaded

    build.plan = plan  # type: ignore[attr-defined]  # run.execute predicts the run from it
    return build
