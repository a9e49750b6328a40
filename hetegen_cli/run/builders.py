"""How run, serve and eval build their model: a ModelSetup is resolved (every check that needs
no weights: `resolve_setup`), its build decided for a workload (`decide_build`: a frozen
BuildRecord), then loaded (`load_build`).

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

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any

from hetegen_cli.core import paths
from hetegen_cli.core.console import note, warn
from hetegen_cli.core.devices import Backend, CpuBackend, cuda_available, get_backend
from hetegen_cli.core.dtypes import ComputeFormats
from hetegen_cli.core.errors import DeviceError, HetegenError
from hetegen_cli.engine.hetero_model import engine_formats, load_hetero_model
from hetegen_cli.measure.profile import load_or_measure
from hetegen_cli.models.loading.loader import (
    LoadedModel,
    import_model_code,
    load_model,
    load_tokenizer,
    resolve_dtype,
)
from hetegen_cli.models.loading.source import ModelRef, resolve_model
from hetegen_cli.models.shapes.spec import ModelSpec
from hetegen_cli.plan.costmodel.predict import spec_in
from hetegen_cli.plan.document import Plan, check_plan_matches
from hetegen_cli.plan.expert_use import load_expert_stats
from hetegen_cli.plan.load import load_plan
from hetegen_cli.plan.memory import whole_model_gpu_bytes
from hetegen_cli.plan.request import PlanRequest
from hetegen_cli.plan.solver import make_plan
from hetegen_cli.run.setup import ModelSetup, Workload


@dataclass(frozen=True)
class Resolved:
    """A setup after every check that needs no weights: its plan file (loaded, checked against
    this machine and the model), the model's files and headers, the tokenizer."""

    setup: ModelSetup
    ref: ModelRef
    tokenizer: Any
    plan: Plan | None  # the --plan file; None without one
    import_s: float = 0.0  # of the time resolving took, importing transformers' model code


class Origin(str, Enum):
    """How a build was chosen (the rules of this module, in their order)."""

    PLAN_FILE = "plan file"
    PLAIN_GPU = "plain GPU"  # the whole model fits in free GPU memory
    PLANNED = "planned on the fly"  # the engine with a plan made for this machine and workload
    PLANNED_PLAIN = "planned on the fly, no GPU share"  # ... which left nothing to the GPU
    CPU_FORMATS = "all-CPU, formats from the profile"
    PLAIN_CPU = "plain CPU"  # the run's --dtype (float32 for auto)
    QUANTIZED_CPU = "quantized, CPU kernels"


@dataclass(frozen=True)
class BuildRecord:
    """How a setup is built, decided before any weight is read (and what `run --json` reports).

    `ref` is the model as it is loaded (in the prefill format when the CPU formats need it);
    `spec` its shapes in the dtype it computes in (the reference for predictions); `plan` the
    plan the engine runs, None for the plain (or quantized) model.
    """

    ref: ModelRef
    spec: ModelSpec
    backend: Backend
    formats: ComputeFormats
    plan: Plan | None
    origin: Origin
    plan_path: Path | None = None  # Origin.PLAN_FILE: the file

    @property
    def origin_text(self) -> str:
        """How the plan came about, as the run document says it ("from plan.json", ...)."""
        return f"from {self.plan_path}" if self.origin is Origin.PLAN_FILE else self.origin.value

    def plan_section(self) -> dict[str, Any] | None:
        """The run document's `plan`: the plan's summary, where it came from, its backend."""
        if self.plan is None:
            return None
        return {**self.plan.summary(), "origin": self.origin_text, "backend": self.backend.name}


ModelLoader = Callable[[BuildRecord], LoadedModel]
"""How a decided build is loaded: `load_build`, or another loader (run.execute takes one)."""


def resolve_setup(setup: ModelSetup) -> Resolved:
    """Every check that needs no weights, cheapest first: the plan file, the plan against this
    machine, the model's files and headers, the plan against the model (its shapes, dtype and
    quantization); then the tokenizer. Shared by run, serve, eval."""
    plan = load_plan(setup.plan_path) if setup.plan_path is not None else None
    if plan is not None:
        check_plan_device(plan, setup.device, str(setup.plan_path))
    ref = resolve_model(
        setup.model, need_weights=True, quant=setup.quant, allow_float_copy=setup.allow_float_copy
    )
    for message in ref.warnings:
        warn(message)
    if plan is not None:
        check_plan_matches(plan, ref.spec)
    import_s = import_model_code(ref.spec.architecture)
    return Resolved(setup, ref, load_tokenizer(ref.path), plan, import_s)


def pick_device(setup: ModelSetup, ref: ModelRef, workload: Workload) -> tuple[Backend, str, bool]:
    """(backend, dtype, fits): --device auto uses the GPU plainly only when the whole model fits
    in free memory; otherwise the heterogeneous engine runs it (decide_build). A quantized
    model on a GPU always goes through the engine (its resident linears stay quantized there)."""
    kind = setup.device
    if kind == "auto" and not cuda_available():
        kind = "cpu"
    try:
        backend = get_backend("cuda" if kind in ("auto", "cuda") else "cpu")
    except DeviceError as exc:
        raise DeviceError(exc.message, "run without --device cuda (or with --device cpu)") from exc
    if ref.spec.quant is not None:  # stored quantized: its float parts in the stored dtype
        return backend, ref.spec.dtype, False
    dtype = resolve_dtype(setup.dtype, ref.spec.dtype, "cuda" if backend.is_cuda else "cpu")
    if not backend.is_cuda:
        return backend, dtype, False
    req = PlanRequest(prompt_len=workload.prompt_tokens, max_new_tokens=workload.max_new_tokens)
    free, _ = backend.memory_info()
    if whole_model_gpu_bytes(ref.spec, req, dtype) <= free:
        return backend, dtype, True
    if kind == "cuda":
        return backend, dtype, False
    return CpuBackend(), resolve_dtype(setup.dtype, ref.spec.dtype, "cpu"), False


def check_plan_device(plan: Plan, device: str, origin: str) -> None:
    """DeviceError when a plan that needs a GPU meets a machine without one (and no --device
    cpu asked for the stand-in): checked before anything slow."""
    if plan.runtime.requires_gpu and device != "cpu" and not cuda_available():
        raise DeviceError(
            f"plan {origin} needs a GPU and this machine has no CUDA GPU",
            "re-plan here with `hetegen plan` (a CPU-only profile gives an all-CPU "
            "plan), or pass --device cpu to run it on the CPU stand-in (slow)",
        )


def decide_build(resolved: Resolved, workload: Workload) -> BuildRecord:
    """The build of `resolved` for `workload`, by the rules of this module. Validates the plan
    first; plans on the fly (and notes it) where the rules say so; reads no weights."""
    setup, ref = resolved.setup, resolved.ref
    backend, dtype, fits = pick_device(setup, ref, workload)
    plain = _plain_record(ref, backend, dtype)
    if resolved.plan is not None:
        plan = resolved.plan
        check_plan_device(plan, setup.device, str(setup.plan_path))
        if plan.runtime.requires_gpu and setup.device == "cpu":
            warn(
                "running a GPU plan on the CPU stand-in backend: the GPU share is computed on the "
                "CPU (for testing; not fast)"
            )
        cpu = setup.device == "cpu" or not plan.runtime.requires_gpu
        engine = CpuBackend() if cpu else get_backend("cuda")
        return replace(_engine_record(ref, plan, engine, Origin.PLAN_FILE), plan_path=setup.plan_path)
    if not cuda_available() or setup.device == "cpu":
        if setup.gpu_budget_bytes is not None and setup.device != "cpu":
            raise DeviceError(
                "--gpu-memory needs a CUDA GPU and this machine has none",
                "drop --gpu-memory (the model then runs on the CPU)",
            )
        if ref.spec.quant is not None:  # packed CPU kernels for every quantized linear
            formats = ComputeFormats(ref.spec.dtype, quant="+".join(ref.spec.quant_formats))
            return replace(plain, formats=formats, origin=Origin.QUANTIZED_CPU)
        return _cpu_formats_record(resolved, workload, dtype) or plain
    if setup.gpu_budget_bytes is None and fits:
        return replace(plain, origin=Origin.PLAIN_GPU)  # the whole model fits
    plan = _plan_on_the_fly(resolved, workload)
    if not plan.runtime.requires_gpu:
        return replace(plain, origin=Origin.PLANNED_PLAIN)
    return _engine_record(ref, plan, get_backend("cuda"), Origin.PLANNED)


def load_build(record: BuildRecord) -> LoadedModel:
    """Read the weights as `record` says: through the engine with its plan, the quantized CPU
    kernels, or the stock model in its dtype on its device."""
    if record.plan is not None:
        plan = record.plan
        return load_hetero_model(
            record.ref, plan.placements, plan.runtime, record.backend, progress=True, experts=plan.experts
        )
    if record.origin is Origin.QUANTIZED_CPU:
        from hetegen_cli.models.loading.quantized_loader import load_quantized

        return load_quantized(record.ref)
    return load_model(record.ref, dtype=record.formats.weights, device=str(record.backend.device))


def _plain_record(ref: ModelRef, backend: Backend, dtype: str) -> BuildRecord:
    """The stock model, whole, in `dtype` on `backend`."""
    formats = ComputeFormats(dtype)
    return BuildRecord(ref, spec_in(ref.spec, dtype), backend, formats, None, Origin.PLAIN_CPU)


def _engine_record(ref: ModelRef, plan: Plan, backend: Backend, origin: Origin) -> BuildRecord:
    """The engine running `plan` on `backend`, the model being `ref`."""
    formats = engine_formats(plan.placements, plan.runtime, "+".join(ref.spec.quant_formats) or None)
    spec = spec_in(ref.spec, plan.runtime.weights_dtype)
    return BuildRecord(ref, spec, backend, formats, plan, origin)


def _plan_on_the_fly(resolved: Resolved, workload: Workload) -> Plan:
    setup = resolved.setup
    req = PlanRequest(
        prompt_len=workload.prompt_tokens,
        max_new_tokens=workload.max_new_tokens,
        gpu_budget_bytes=setup.gpu_budget_bytes,
        model_arg=setup.model or "",
        cpu_moe=setup.cpu_moe,
        n_cpu_moe=setup.n_cpu_moe,
        expert_split=setup.expert_split,
    )
    if setup.expert_use_path is not None:
        stats, use_warnings = load_expert_stats(setup.expert_use_path, resolved.ref.spec)
        req = replace(req, expert_use=stats)
        for message in use_warnings:
            warn(message)
    doc, identity = load_or_measure(setup.profile_path)
    plan = make_plan(resolved.ref.spec, doc, req, profile_identity=identity)
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


def _cpu_formats_record(resolved: Resolved, workload: Workload, dtype: str) -> BuildRecord | None:
    """The CPU model in the profile's best format per phase (docs/plan.md, section 1b) when
    --dtype is auto and a profile exists: plain in D when both phases use one dtype D, else the
    engine with all_cpu_formats_plan. None (the plain model in the run's dtype) when the
    profile's choice is the run's dtype in both phases or there is no profile. A profile that
    cannot be used is a warning here, not an error."""
    setup = resolved.setup
    if setup.dtype != "auto":
        return None
    if setup.profile_path is None and paths.probe(paths.default_profile_path(), "the saved profile") is None:
        return None  # no profile: do not spend a minute measuring one for a plain CPU run
    try:
        doc, identity = load_or_measure(setup.profile_path)
        ref = resolved.ref
        if ref.spec.dtype != dtype:
            ref = replace(ref, spec=resolve_model(str(ref.path), need_weights=True, dtype=dtype).spec)
        req = PlanRequest(
            prompt_len=workload.prompt_tokens,
            max_new_tokens=workload.max_new_tokens,
            model_arg=setup.model or "",
        )
        plan, ref = all_cpu_formats_plan(ref, doc, identity, req)
    except HetegenError as exc:
        warn(f"the profile's CPU formats are not used ({exc.message}); running in {dtype}")
        return None
    prefill, decode = plan.runtime.cpu_dtypes
    if (prefill, decode) == (dtype, dtype):
        return None
    if prefill == decode:
        note(f"running in {prefill}, the profile's fastest CPU format for this run; --dtype forces another")
        plain = _plain_record(resolved.ref, CpuBackend(), prefill)
        return replace(plain, origin=Origin.CPU_FORMATS)
    note(
        f"running in {prefill} with decode's linears in {decode}: the CPU formats chosen from the "
        "profile for this run; --dtype forces one format"
    )
    return _engine_record(ref, plan, CpuBackend(), Origin.CPU_FORMATS)
