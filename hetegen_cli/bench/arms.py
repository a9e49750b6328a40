"""The arms of `hetegen bench`: why an arm cannot run here, and how each one is loaded.

Every builder returns an `ArmModel`: a `models.loading.loader.LoadedModel` (a model that answers
`model(input_ids, cache=..., use_cache=True)` like a stock transformers causal LM, the device
its inputs go to, a sync and a close) and what the document's `info` says of the arm.
bench.runner times all of them with the same generation loop.

| arm | what runs |
|---|---|
| hetegen | the plan for this budget through the engine (`load_hetero_model`), as `run` does |
| offload | the same engine, every cpu_fraction 0, the plan's resident set (optimised streaming) |
| accelerate | stock Accelerate hooks (`dispatch_model`): the plan's resident set on the GPU, the rest "cpu" |
| layer-split | decoder layers 0..k-1 on the GPU (k from the planner), the CPU the rest (decode format) |
| experts-on-cpu | a mixture-of-experts model's plan with every routed expert on the CPU and the rest |
|  | placed by the planner (llama.cpp's `--cpu-moe`), through the engine like `hetegen` |
| cpu | the CPU alone in an all-CPU plan's formats: plain transformers in D when both phases use D, |
|  | else the engine (CPU backend), the model in the prefill format, decode's linears in D |
| gpu | plain transformers model wholly on the GPU (when it fits the budget) |
| reference | plain transformers model on the CPU in the weights dtype (token and overhead reference) |
"""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import torch

from hetegen_cli.bench.layer_split import apply_layer_split
from hetegen_cli.bench.llama_cpp import LLAMA_MISSING, llama_cpp_available, llama_cpp_build, load_llama_cpp
from hetegen_cli.core.devices import Backend, CpuBackend, get_backend, torch_dtype
from hetegen_cli.core.dtypes import ComputeFormats, itemsize
from hetegen_cli.core.units import format_bytes
from hetegen_cli.engine.hetero_model import load_hetero_model
from hetegen_cli.models.loading.loader import LoadedModel, load_model
from hetegen_cli.models.loading.quantized_loader import load_quantized
from hetegen_cli.models.loading.source import ModelRef
from hetegen_cli.models.shapes.spec import ModelSpec
from hetegen_cli.plan.document import Plan
from hetegen_cli.plan.manual import manual_plan
from hetegen_cli.plan.memory import whole_model_gpu_bytes
from hetegen_cli.plan.request import PlanRequest

NO_CUDA = "no CUDA GPU"
ACCELERATE_MISSING = "accelerate is not installed (pip install 'hetegen[bench]')"
GPU_ARMS = ("offload", "accelerate", "layer-split", "gpu")
PLAN_ARMS = ("hetegen", "offload", "accelerate", "layer-split")
RAM_MARGIN_BYTES = 512 * 1024**2


@dataclass
class ArmContext:
    """What an arm needs to know for one GPU budget."""

    arm: str
    ref: ModelRef  # with a local path
    plan: Plan | None  # None when the planner refused this budget
    plan_error: str | None
    gpu_budget_bytes: int | None  # the GPU budget of this case
    has_cuda: bool
    threads: int  # torch intra-op threads for plain arms
    workload: dict  # prompt_len, max_new_tokens
    cpu_plan: Plan | None = None  # the all-CPU plan of the `cpu` arm (GPU budget 0)
    cpu_ref: ModelRef | None = None  # the model in the `cpu` arm's run dtype (its prefill format)
    gguf: Path | None = None  # the GGUF the model came from (the llama.cpp arm)
    moe_plan: Plan | None = None  # the experts-on-cpu plan (mixture-of-experts models only)
    moe_plan_error: str | None = None

    @property
    def spec(self) -> ModelSpec:
        return self.ref.spec

    @property
    def plan_of_arm(self) -> Plan | None:
        """The plan this arm runs: the experts-on-cpu plan for that arm, else the budget's."""
        return self.moe_plan if self.arm == "experts-on-cpu" else self.plan


@dataclass(frozen=True)
class ArmModel:
    """A loaded arm, and what the bench document's `info` says of it."""

    loaded: LoadedModel
    weights_dtype: str  # as the document shows it (a quantized model: its formats)
    device: str  # as the document shows it, e.g. "cuda:0", "cpu (CPU stand-in backend)"
    threads: int
    load_s: float
    config: dict | None = None  # the arm's own configuration (engine figures, split, ...)

    def info(self) -> dict:
        """The arm's `info` section (bench.runner adds the loading peak)."""
        doc = {
            "weights_dtype": self.weights_dtype,
            "compute_dtype": self.loaded.dtype,
            "device": self.device,
            "threads": self.threads,
            "load_s": self.load_s,
        }
        return doc if self.config is None else {**doc, "config": self.config}


def accelerate_available() -> bool:
    return importlib.util.find_spec("accelerate") is not None


def gpu_need_bytes(ctx: ArmContext) -> int:
    """GPU bytes to run the whole model on the GPU (the `gpu` arm), from plan.memory."""
    w = ctx.workload
    req = PlanRequest(prompt_len=w["prompt_len"], max_new_tokens=w["max_new_tokens"])
    return whole_model_gpu_bytes(ctx.spec, req)


def _available_ram() -> int:
    return int(psutil.virtual_memory().available)


def skip_reason(ctx: ArmContext) -> str | None:
    """Why `ctx.arm` cannot run here (None: it can). Needs no weights."""
    arm, reasons = ctx.arm, []
    if arm in GPU_ARMS and not ctx.has_cuda:
        reasons.append(NO_CUDA)
    if arm == "accelerate" and not accelerate_available():
        reasons.append(ACCELERATE_MISSING)
    if arm == "llama.cpp":
        if not llama_cpp_available():
            reasons.append(LLAMA_MISSING)
        elif ctx.gguf is None:
            reasons.append(
                "llama.cpp runs GGUF files: pass --model FILE.gguf (or use the default model), "
                "or --synthetic PRESET --synthetic-format gguf-q4_0"
            )
    if reasons:
        return "; ".join(reasons)
    if ctx.spec.quant is not None and arm in ("accelerate", "gpu"):
        return (
            f"the model is quantized ({ctx.spec.quant}); this arm runs floating-point weights (--quant none)"
        )
    if arm == "experts-on-cpu" and not ctx.spec.experts:
        return "a dense model: it has no routed experts to keep on the CPU"
    if arm == "experts-on-cpu" and ctx.moe_plan is None:
        return f"no experts-on-cpu plan for this budget: {ctx.moe_plan_error}"
    if arm == "experts-on-cpu" and not ctx.moe_plan.runtime.requires_gpu:
        return "the experts-on-cpu plan for this budget is all-CPU (profile without a GPU, or budget 0)"
    if arm in PLAN_ARMS and ctx.plan is None:
        return f"no plan for this budget: {ctx.plan_error}"
    if arm in ("offload", "accelerate", "layer-split") and not ctx.plan.runtime.requires_gpu:
        return "the plan for this budget is all-CPU (profile without a GPU, or budget 0)"
    if arm == "layer-split" and ctx.plan.predictions.layer_split is None:
        return "the plan has no layer-split prediction to take the GPU layer count from"
    if arm == "gpu" and ctx.gpu_budget_bytes is not None and gpu_need_bytes(ctx) > ctx.gpu_budget_bytes:
        return (
            f"the whole model needs {format_bytes(gpu_need_bytes(ctx))} of GPU memory, "
            f"the budget is {format_bytes(ctx.gpu_budget_bytes)}"
        )
    if arm in ("cpu", "reference"):
        # the cpu arm holds the model in its prefill format and the decode format's copy
        dtypes = [ctx.spec.dtype] if arm == "reference" else list(dict.fromkeys(_cpu_dtypes(ctx)))
        dtype = "+".join(dtypes)
        need = ctx.spec.parameter_count * sum(itemsize(d) for d in dtypes)
        if need + RAM_MARGIN_BYTES > _available_ram():
            return (
                f"the model needs {format_bytes(need)} of RAM in {dtype}, "
                f"{format_bytes(_available_ram())} is available"
            )
    return None


def _cpu_dtypes(ctx: ArmContext) -> tuple[str, str]:
    """(prefill, decode) formats of the `cpu` arm: its all-CPU plan's, else the weights dtype."""
    plan = ctx.cpu_plan
    return plan.runtime.cpu_dtypes if plan is not None else (ctx.spec.dtype, ctx.spec.dtype)


# --- builders -------------------------------------------------------------------------------


class _Threads:
    """Set torch intra-op threads for a plain arm; restore on close."""

    def __init__(self, n: int) -> None:
        self.before = torch.get_num_threads()
        torch.set_num_threads(max(1, n))

    def restore(self) -> None:
        torch.set_num_threads(self.before)


def _plain(ctx: ArmContext, dtype: str, device: str) -> ArmModel:
    threads = _Threads(ctx.threads)
    try:
        if ctx.spec.quant is not None:  # the plain model of a quantized copy: its CPU kernels
            loaded = load_quantized(ctx.ref)
            dtype = loaded.dtype
        else:
            loaded = load_model(ctx.ref, dtype=dtype, device=device)
    except BaseException:
        threads.restore()
        raise
    loaded.on_close = threads.restore
    return ArmModel(loaded, dtype, loaded.device, ctx.threads, loaded.load_s)


def build_reference(ctx: ArmContext) -> ArmModel:
    return _plain(ctx, ctx.spec.dtype, "cpu")


def build_cpu(ctx: ArmContext) -> ArmModel:
    prefill, decode = _cpu_dtypes(ctx)
    if prefill == decode:
        return _plain(ctx, prefill, "cpu")
    plan = ctx.cpu_plan
    return _engine(ctx, plan, plan_config(plan), CpuBackend(), ctx.cpu_ref)


def build_gpu(ctx: ArmContext) -> ArmModel:
    return _plain(ctx, ctx.spec.dtype, "cuda:0")


def _engine(
    ctx: ArmContext, plan: Plan, config: dict, backend: Backend | None = None, ref: ModelRef | None = None
) -> ArmModel:
    backend = backend or (get_backend("cuda") if ctx.has_cuda else CpuBackend())
    start = time.perf_counter()
    loaded = load_hetero_model(
        ref or ctx.ref, plan.placements, plan.runtime, backend, progress=False, experts=plan.experts
    )
    rt = plan.runtime
    device = loaded.device + ("" if backend.is_cuda else " (CPU stand-in backend)")
    return ArmModel(loaded, rt.weights_dtype, device, rt.cpu_threads, time.perf_counter() - start, config)


def plan_config(plan: Plan, rows: bool = False) -> dict:
    """The engine configuration of a plan (Plan.summary's placement figures and runtime);
    with `rows` every linear's CPU rows too (the cache key of engine arms)."""
    summary = plan.summary()
    extra = {"cpu_rows": [[p.cpu_rows_prefill, p.cpu_rows_decode] for p in plan.placements]} if rows else {}
    return {
        **extra,
        **{
            k: summary[k]
            for k in (
                "resident_count",
                "split_count",
                "mean_cpu_fraction_prefill",
                "mean_cpu_fraction_decode",
            )
        },
        "lm_head_on_gpu": plan.runtime.lm_head_on_gpu,
        "staging_buffers": plan.runtime.staging_buffers,
        "cpu_dtype_prefill": plan.runtime.cpu_dtype_prefill,
        "cpu_dtype_decode": plan.runtime.cpu_dtype_decode,
        "cpu_threads": plan.runtime.cpu_threads,
    }


def offload_plan(plan: Plan, spec: ModelSpec) -> Plan:
    """The plan's resident set and runtime with every other cpu_fraction 0 (pure offload)."""
    return manual_plan(
        spec,
        cpu_fraction_prefill=0.0,
        cpu_fraction_decode=0.0,
        resident={p.name for p in plan.placements if p.resident},
        runtime=plan.runtime,
        workload=plan.workload,
    )


def build_hetegen(ctx: ArmContext) -> ArmModel:
    return _engine(ctx, ctx.plan, plan_config(ctx.plan))


def build_experts_on_cpu(ctx: ArmContext) -> ArmModel:
    return _engine(ctx, ctx.moe_plan, plan_config(ctx.moe_plan))


def build_offload(ctx: ArmContext) -> ArmModel:
    plan = offload_plan(ctx.plan, ctx.spec)
    return _engine(ctx, plan, plan_config(plan))


def layer_split_layers(ctx: ArmContext) -> int:
    return int(ctx.plan.predictions.layer_split.gpu_layers)


def build_layer_split(ctx: ArmContext) -> ArmModel:
    rt, k = ctx.plan.runtime, layer_split_layers(ctx)
    cpu_dtype = rt.cpu_dtype_decode  # one format for both phases, as llama.cpp's split runs
    arm = _plain(ctx, rt.weights_dtype, "cpu")
    built, backend = arm.loaded, get_backend("cuda")
    built.model = apply_layer_split(
        built.model, k, backend.device, torch_dtype(rt.weights_dtype), torch_dtype(cpu_dtype)
    )
    built.device, built.sync = str(backend.device), backend.synchronize
    built.formats = ComputeFormats(rt.weights_dtype, (cpu_dtype, cpu_dtype))
    config = {"gpu_layers": k, "cpu_layers": ctx.spec.num_layers - k, "cpu_dtype": cpu_dtype}
    return replace(arm, device=built.device, config=config)


def accelerate_device_map(module_names: list[str], resident: set[str], offloaded: set[str]) -> dict:
    """Accelerate device_map: every module with its own tensors -> 0, linears in `offloaded`
    (host-held in the plan) and not in `resident` -> "cpu"."""
    return {name: ("cpu" if name in offloaded and name not in resident else 0) for name in module_names}


def _tensor_modules(model: Any) -> list[str]:
    """Names of modules that hold parameters or buffers themselves (not via children)."""
    names = []
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        if own and name:
            names.append(name)
    return names


def build_accelerate(ctx: ArmContext) -> ArmModel:
    from accelerate import dispatch_model

    plan = ctx.plan
    arm = _plain(ctx, plan.runtime.weights_dtype, "cpu")
    built = arm.loaded
    resident = {p.name for p in plan.placements if p.resident}
    offloaded = {p.name for p in plan.placements if not p.resident}
    device_map = accelerate_device_map(_tensor_modules(built.model), resident, offloaded)
    backend = get_backend("cuda")
    built.model = dispatch_model(built.model, device_map=device_map, main_device=backend.index)
    built.device, built.sync = str(backend.device), backend.synchronize
    config = {
        "offloaded_modules": sum(v == "cpu" for v in device_map.values()),
        "gpu_modules": sum(v == 0 for v in device_map.values()),
    }
    return replace(arm, device=built.device, config=config)


def build_llama_cpp(ctx: ArmContext) -> ArmModel:
    import llama_cpp
    from transformers import AutoConfig

    gpu_layers = 0
    if ctx.has_cuda and llama_cpp.llama_supports_gpu_offload() and ctx.plan is not None:
        gpu_layers = layer_split_layers(ctx) if ctx.plan.predictions.layer_split else 0
    config = AutoConfig.from_pretrained(str(ctx.ref.path), local_files_only=True, trust_remote_code=False)
    # llama.cpp pads its context to a multiple of 256 (at least 512 here)
    need = ctx.workload["prompt_len"] + ctx.workload["max_new_tokens"] + 16
    n_ctx = max(512, -(-need // 256) * 256)
    loaded = load_llama_cpp(ctx.gguf, config, ctx.threads, n_ctx, gpu_layers)
    system_info, extra_bufts = llama_cpp_build()
    return ArmModel(
        loaded,
        "gguf",
        "cpu" if not gpu_layers else f"cpu + {gpu_layers} layers on the GPU",
        ctx.threads,
        loaded.load_s,
        {
            "gguf": str(ctx.gguf),
            "llama_cpp_version": getattr(llama_cpp, "__version__", None),
            "n_gpu_layers": gpu_layers,
            "extra_buffer_types": extra_bufts,
            "system_info": system_info,
        },
    )


BUILDERS: dict[str, Callable[[ArmContext], ArmModel]] = {
    "hetegen": build_hetegen,
    "offload": build_offload,
    "accelerate": build_accelerate,
    "layer-split": build_layer_split,
    "experts-on-cpu": build_experts_on_cpu,
    "cpu": build_cpu,
    "gpu": build_gpu,
    "reference": build_reference,
    "llama.cpp": build_llama_cpp,
}


def cache_key(ctx: ArmContext) -> str:
    """Arms with equal keys measure the same thing: budgets reuse the measurement."""
    if ctx.arm == "llama.cpp":
        split = ctx.has_cuda and ctx.plan is not None and ctx.plan.predictions.layer_split is not None
        extra: Any = [str(ctx.gguf), layer_split_layers(ctx) if split else 0]
    elif ctx.arm in ("cpu", "reference", "gpu"):
        extra = _cpu_dtypes(ctx) if ctx.arm == "cpu" else None
    elif ctx.arm in ("hetegen", "experts-on-cpu"):
        plan = ctx.plan if ctx.arm == "hetegen" else ctx.moe_plan
        extra = [plan_config(plan, rows=True), [e.to_dict() for e in plan.experts]]
    elif ctx.arm == "layer-split":
        extra = [layer_split_layers(ctx), ctx.plan.runtime.cpu_dtype_decode]
    else:  # offload, accelerate: the resident set and the runtime
        extra = [
            sorted(p.name for p in ctx.plan.placements if p.resident),
            ctx.plan.runtime.staging_buffers,
            ctx.plan.runtime.lm_head_on_gpu,
        ]
    return json.dumps([ctx.arm, extra], sort_keys=True)
