"""The arms of `hetegen bench`: why an arm cannot run here, and how each one is loaded.

Every builder returns a `Built`: a module that answers `model(input_ids, cache=...,
use_cache=True)` like a stock transformers causal LM, the device its inputs go to, and a
close function. `bench.py` times all of them with the same generation loop.

| arm | what runs |
|---|---|
| hetegen | the plan for this budget through the engine (`load_hetero_model`), as `run` does |
| offload | the same engine, every cpu_fraction 0, the plan's resident set (optimised streaming) |
| accelerate | stock Accelerate hooks: `dispatch_model` with the plan's resident set on the GPU, every other module "cpu" |
| layer-split | decoder layers 0..k-1 on the GPU (k from the planner), the CPU computes the rest |
| cpu | plain transformers model on the CPU in the CPU dtype |
| gpu | plain transformers model wholly on the GPU (when it fits the budget) |
| reference | plain transformers model on the CPU in the weights dtype (token and overhead reference) |
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable

from hetegen_cli.model_spec import DTYPE_BYTES
from hetegen_cli.units import format_bytes

NO_CUDA = "no CUDA GPU"
ACCELERATE_MISSING = "accelerate is not installed (pip install 'hetegen[bench]')"
GPU_ARMS = ("offload", "accelerate", "layer-split", "gpu")
PLAN_ARMS = ("hetegen", "offload", "accelerate", "layer-split")
RAM_MARGIN_BYTES = 512 * 1024 ** 2


@dataclass
class ArmContext:
    """What an arm needs to know for one GPU budget."""

    arm: str
    ref: Any                        # model_source.ModelRef (with a local path)
    plan: Any                       # plan.Plan, or None when the planner refused this budget
    plan_error: str | None
    budget_bytes: int | None        # the GPU budget of this case
    has_cuda: bool
    threads: int                    # torch intra-op threads for plain arms
    workload: dict                  # prompt_len, max_new_tokens

    @property
    def spec(self) -> Any:
        return self.ref.spec


@dataclass
class Built:
    """A loaded arm, ready for generate.generate()."""

    model: Any
    device: Any
    sync: Callable[[], None]
    close: Callable[[], None]
    info: dict = field(default_factory=dict)     # weights_dtype, compute_dtype, device, config
    stats: Callable[[], dict] | None = None      # engine counters (engine arms)
    reset_stats: Callable[[], None] | None = None


def accelerate_available() -> bool:
    return importlib.util.find_spec("accelerate") is not None


def gpu_need_bytes(ctx: ArmContext) -> int:
    """GPU bytes of the whole model + KV cache + workspace + reserve (the `gpu` arm)."""
    from hetegen_cli import planner

    spec, w = ctx.spec, ctx.workload
    req = planner.PlanRequest(prompt_len=w["prompt_len"], max_new_tokens=w["max_new_tokens"])
    return (spec.total_weight_bytes + spec.kv_cache_bytes(w["prompt_len"] + w["max_new_tokens"])
            + planner.workspace_bytes(spec, req) + req.reserve_bytes)


def _available_ram() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def skip_reason(ctx: ArmContext) -> str | None:
    """Why `ctx.arm` cannot run here (None: it can). Needs no weights."""
    arm, reasons = ctx.arm, []
    if arm in GPU_ARMS and not ctx.has_cuda:
        reasons.append(NO_CUDA)
    if arm == "accelerate" and not accelerate_available():
        reasons.append(ACCELERATE_MISSING)
    if reasons:
        return "; ".join(reasons)
    if arm in PLAN_ARMS and ctx.plan is None:
        return f"no plan for this budget: {ctx.plan_error}"
    if arm in ("offload", "accelerate", "layer-split") and not ctx.plan.runtime.requires_gpu:
        return "the plan for this budget is all-CPU (profile without a GPU, or budget 0)"
    if arm == "layer-split" and not (ctx.plan.predictions or {}).get("layer_split"):
        return "the plan has no layer-split prediction to take the GPU layer count from"
    if arm == "gpu" and ctx.budget_bytes is not None and gpu_need_bytes(ctx) > ctx.budget_bytes:
        return (f"the whole model needs {format_bytes(gpu_need_bytes(ctx))} of GPU memory, "
                f"the budget is {format_bytes(ctx.budget_bytes)}")
    if arm in ("cpu", "reference"):
        dtype = ctx.spec.dtype if arm == "reference" else _cpu_dtype(ctx)
        need = ctx.spec.parameter_count * DTYPE_BYTES[dtype]
        if need + RAM_MARGIN_BYTES > _available_ram():
            return (f"the model needs {format_bytes(need)} of RAM in {dtype}, "
                    f"{format_bytes(_available_ram())} is available")
    return None


def _cpu_dtype(ctx: ArmContext) -> str:
    return ctx.plan.runtime.cpu_dtype if ctx.plan is not None else ctx.spec.dtype


# --- builders -------------------------------------------------------------------------------

class _Threads:
    """Set torch intra-op threads for a plain arm; restore on close."""

    def __init__(self, n: int) -> None:
        import torch

        self.before = torch.get_num_threads()
        torch.set_num_threads(max(1, n))

    def restore(self) -> None:
        import torch

        torch.set_num_threads(self.before)


def _plain(ctx: ArmContext, dtype: str, device: str, compute_dtype: str) -> Built:
    from hetegen_cli.devices import get_backend
    from hetegen_cli.loader import load_model

    threads = _Threads(ctx.threads)
    try:
        loaded = load_model(ctx.ref, dtype=dtype, device=device)
    except BaseException:
        threads.restore()
        raise
    sync = get_backend("cuda").synchronize if device != "cpu" else (lambda: None)
    return Built(loaded.model, loaded.device, sync, threads.restore,
                 {"weights_dtype": dtype, "compute_dtype": compute_dtype, "device": loaded.device,
                  "threads": ctx.threads, "load_s": loaded.load_s})


def build_reference(ctx: ArmContext) -> Built:
    return _plain(ctx, ctx.spec.dtype, "cpu", ctx.spec.dtype)


def build_cpu(ctx: ArmContext) -> Built:
    dtype = _cpu_dtype(ctx)
    return _plain(ctx, dtype, "cpu", dtype)


def build_gpu(ctx: ArmContext) -> Built:
    return _plain(ctx, ctx.spec.dtype, "cuda:0", ctx.spec.dtype)


def _engine(ctx: ArmContext, plan: Any, config: dict) -> Built:
    import time

    from hetegen_cli.devices import CpuBackend, get_backend
    from hetegen_cli.engine import load_hetero_model

    backend = get_backend("cuda") if ctx.has_cuda else CpuBackend()
    start = time.perf_counter()
    hm = load_hetero_model(ctx.ref, plan.placements, plan.runtime, backend, progress=False)
    rt = plan.runtime
    cpu_rows = any(p.max_cpu_rows for p in plan.placements)
    compute = rt.weights_dtype if not cpu_rows or rt.cpu_dtype == rt.weights_dtype \
        else f"{rt.weights_dtype}+{rt.cpu_dtype}"
    info = {"weights_dtype": rt.weights_dtype, "compute_dtype": compute,
            "device": str(backend.device) + ("" if backend.is_cuda else " (CPU stand-in backend)"),
            "threads": rt.cpu_threads, "load_s": time.perf_counter() - start, "config": config}
    return Built(hm.model, hm.device, backend.synchronize, hm.close, info, hm.stats, hm.reset_stats)


def plan_config(plan: Any, rows: bool = False) -> dict:
    """A short description of a plan's placements; with `rows` every linear's CPU rows too
    (the cache key of engine arms)."""
    split = [p for p in plan.placements if not p.resident]
    mean = (lambda xs: sum(xs) / len(xs) if xs else 0.0)
    extra = {"cpu_rows": [[p.cpu_rows_prefill, p.cpu_rows_decode] for p in plan.placements]} if rows else {}
    return {**extra, "resident_count": len(plan.placements) - len(split),
            "split_count": len(split),
            "mean_cpu_fraction_prefill": mean([p.cpu_fraction_prefill for p in split]),
            "mean_cpu_fraction_decode": mean([p.cpu_fraction_decode for p in split]),
            "lm_head_on_gpu": plan.runtime.lm_head_on_gpu,
            "staging_buffers": plan.runtime.staging_buffers,
            "cpu_dtype": plan.runtime.cpu_dtype, "cpu_threads": plan.runtime.cpu_threads}


def offload_plan(plan: Any, spec: Any) -> Any:
    """The plan's resident set and runtime with every other cpu_fraction 0 (pure offload)."""
    from hetegen_cli.plan import manual_plan

    return manual_plan(spec, cpu_fraction_prefill=0.0, cpu_fraction_decode=0.0,
                       resident={p.name for p in plan.placements if p.resident},
                       runtime=plan.runtime, workload=plan.workload)


def build_hetegen(ctx: ArmContext) -> Built:
    return _engine(ctx, ctx.plan, plan_config(ctx.plan))


def build_offload(ctx: ArmContext) -> Built:
    plan = offload_plan(ctx.plan, ctx.spec)
    return _engine(ctx, plan, plan_config(plan))


def layer_split_layers(ctx: ArmContext) -> int:
    return int(ctx.plan.predictions["layer_split"]["gpu_layers"])


def build_layer_split(ctx: ArmContext) -> Built:
    from hetegen_cli.devices import get_backend
    from hetegen_cli.layer_split import apply_layer_split
    from hetegen_cli.loader import torch_dtype

    rt, k = ctx.plan.runtime, layer_split_layers(ctx)
    built = _plain(ctx, rt.weights_dtype, "cpu", f"{rt.weights_dtype}+{rt.cpu_dtype}")
    backend = get_backend("cuda")
    model = apply_layer_split(built.model, k, backend.device, torch_dtype(rt.weights_dtype),
                              torch_dtype(rt.cpu_dtype))
    built.model, built.device, built.sync = model, backend.device, backend.synchronize
    built.info.update(device=str(backend.device), config={
        "gpu_layers": k, "cpu_layers": ctx.spec.num_layers - k, "cpu_dtype": rt.cpu_dtype})
    return built


def accelerate_device_map(module_names: list[str], resident: set[str], offloaded: set[str]) -> dict:
    """Accelerate device_map: every module with its own tensors -> 0, linears in `offloaded`
    (host-held in the plan) and not in `resident` -> "cpu"."""
    return {name: ("cpu" if name in offloaded and name not in resident else 0)
            for name in module_names}


def _tensor_modules(model: Any) -> list[str]:
    """Names of modules that hold parameters or buffers themselves (not via children)."""
    names = []
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        if own and name:
            names.append(name)
    return names


def build_accelerate(ctx: ArmContext) -> Built:
    from accelerate import dispatch_model

    from hetegen_cli.devices import get_backend

    plan = ctx.plan
    built = _plain(ctx, plan.runtime.weights_dtype, "cpu", plan.runtime.weights_dtype)
    resident = {p.name for p in plan.placements if p.resident}
    offloaded = {p.name for p in plan.placements if not p.resident}
    device_map = accelerate_device_map(_tensor_modules(built.model), resident, offloaded)
    backend = get_backend("cuda")
    built.model = dispatch_model(built.model, device_map=device_map, main_device=backend.index)
    built.device, built.sync = backend.device, backend.synchronize
    built.info.update(device=str(backend.device), config={
        "offloaded_modules": sum(v == "cpu" for v in device_map.values()),
        "gpu_modules": sum(v == 0 for v in device_map.values())})
    return built


BUILDERS: dict[str, Callable[[ArmContext], Built]] = {
    "hetegen": build_hetegen, "offload": build_offload, "accelerate": build_accelerate,
    "layer-split": build_layer_split, "cpu": build_cpu, "gpu": build_gpu,
    "reference": build_reference,
}


def cache_key(ctx: ArmContext) -> str:
    """Arms with equal keys measure the same thing: budgets reuse the measurement."""
    import json

    if ctx.arm in ("cpu", "reference", "gpu"):
        extra: Any = _cpu_dtype(ctx) if ctx.arm == "cpu" else None
    elif ctx.arm == "hetegen":
        extra = plan_config(ctx.plan, rows=True)
    elif ctx.arm == "layer-split":
        extra = [layer_split_layers(ctx), ctx.plan.runtime.cpu_dtype]
    else:  # offload, accelerate: the resident set and the runtime
        extra = [sorted(p.name for p in ctx.plan.placements if p.resident),
                 ctx.plan.runtime.staging_buffers, ctx.plan.runtime.lm_head_on_gpu]
    return json.dumps([ctx.arm, extra], sort_keys=True)
