"""Load a stock transformers model for heterogeneous execution and run it.

`load_hetero_model` builds the model on the meta device (no weight bytes), replaces every
split linear named in the placements with a `HeteroLinear`, then reads each tensor from the
safetensors files straight into its final home:

- split linears: rows into host buffers (weights dtype, pinned on CUDA when asked), plus a
  copy of the CPU rows in each phase's CPU dtype that differs from it; a quantized model's
  quantized linears (models.shapes.quantfile) keep their stored parts there instead, with a packed
  CPU kernel per CPU share (engine.quant_host);
- resident quantized linears: their parts on the device, dequantized per forward;
- routed experts of a MoE model (engine.experts): each where the plan's ExpertsPlacement puts
  it, quantized ones as stored;
- everything else (embeddings, norms, biases, resident linears, the LM head unless a placement
  names "lm_head"): the backend's device, in the weights dtype.

The result is a `models.loading.loader.LoadedModel` whose `.model` is still a normal transformers
model (`model(input_ids, cache=..., use_cache=True)`, `model.generate(...)`); a forward pre-hook
tells the engine whether each forward is a prefill (more than one new token) or a decode step.
`engine_context(model)` gives the engine state behind it (`model.hetegen_engine`).
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Sequence
from pathlib import Path

import psutil
import torch
from torch import nn

from hetegen_cli.core import console
from hetegen_cli.core.devices import Backend, out_of_memory_as_error, torch_dtype
from hetegen_cli.core.dtypes import ComputeFormats
from hetegen_cli.core.errors import ModelError, PlanError
from hetegen_cli.core.units import format_bytes
from hetegen_cli.engine.experts import ExpertStream, checked_split, install_experts
from hetegen_cli.engine.host_weight import HostArena, HostLayout, HostWeight
from hetegen_cli.engine.quant_host import DequantLinear, QuantHostWeight, StoredLinear
from hetegen_cli.engine.split_linear import EngineContext, HeteroLinear
from hetegen_cli.models.formats import fused
from hetegen_cli.models.formats.checkpoint import CheckpointReader
from hetegen_cli.models.loading.loader import LoadedModel
from hetegen_cli.models.loading.meta import (
    check_no_meta,
    embedding_key,
    load_generation_config,
    load_rest,
    make_buffers,
    meta_model,
    named_tensors,
    set_module,
    tied_head,
)
from hetegen_cli.models.loading.quantized_loader import fuse_for_decode, quantize_head
from hetegen_cli.models.loading.source import ModelRef
from hetegen_cli.plan.document import ExpertsPlacement, LinearPlacement, RuntimeSettings
from hetegen_cli.plan.memory import experts_bytes, host_memory

RAM_MARGIN_BYTES = 512 * 1024 * 1024  # keep this much RAM free beyond the host-held weights


def engine_context(model: nn.Module) -> EngineContext | None:
    """The engine state of a model loaded by load_hetero_model (None for other models)."""
    return getattr(model, "hetegen_engine", None)


def engine_formats(
    placements: Sequence[LinearPlacement], runtime: RuntimeSettings, quant: str | None
) -> ComputeFormats:
    """What the engine computes in with these placements: the weights dtype, the CPU formats
    per phase when some split linear has rows on the CPU, the quantized linears' format."""
    cpu_rows = any(p.max_cpu_rows for p in placements if not p.resident)
    return ComputeFormats(runtime.weights_dtype, runtime.cpu_dtypes if cpu_rows else None, quant)


def load_hetero_model(
    ref: ModelRef,
    placements: Sequence[LinearPlacement],
    runtime: RuntimeSettings,
    backend: Backend,
    *,
    progress: bool = True,
    experts: Sequence[ExpertsPlacement] = (),
) -> LoadedModel:
    """Load `ref.path` with the given placements (`experts`: one per mixture-of-experts layer,
    engine.experts). Raises ModelError / PlanError before reading any weights when the plan
    does not fit the model or the RAM."""
    if ref.path is None:
        raise ModelError(
            f"model {ref.name!r} has no local weights",
            "pass a model folder, a .gguf file, or a hub id that is cached locally",
        )
    folder = Path(ref.path)
    wdt = torch_dtype(runtime.weights_dtype)
    cdt = tuple(torch_dtype(d) for d in runtime.cpu_dtypes)  # (prefill, decode)
    model = meta_model(folder, wdt)
    modules = dict(model.named_modules())
    _check_projections(ref, modules)
    split = _check_placements(placements, modules)
    if split and not runtime.pin_weights and not backend.device_is_host:
        raise PlanError(
            "the plan keeps the host-held weights in pageable memory (runtime.pin_weights is "
            "false): on a GPU every weight copy would then block the host at half the bandwidth",
            "set runtime.pin_weights to true in the plan, or plan again with `hetegen plan`",
        )
    tied = tied_head(model)
    quant = ref.spec.quant_map()
    _check_experts(ref, experts)
    _check_ram(model, split, runtime, backend, quant, ref.spec, experts)

    start = time.perf_counter()
    context = EngineContext(backend, runtime)
    try:
        need = sum(
            QuantHostWeight.arena_need(p.out_features, p.in_features, _rows(p), quant[p.name])
            if p.name in quant
            else HostLayout(p.out_features, p.in_features, _rows(p), wdt, cdt).arena_need
            for p in split
        )
        context.arena = HostArena(need, backend, runtime.pin_weights)
    except BaseException:
        context.close()
        raise
    try:
        with (
            CheckpointReader(folder, getattr(model, "base_model_prefix", "model")) as reader,
            out_of_memory_as_error("loading the model"),
            console.activity(f"loading {ref.name} through the engine"),
            console.progress(progress) as bar,
        ):
            total = len(split) + len(experts) + sum(1 for t in named_tensors(model) if t[1].is_meta)
            task = bar.add_task(f"Loading {ref.name}", total=total)
            embed_key = embedding_key(model, reader)
            by_name = {x.name: x for x in ref.spec.experts}
            for x in experts:
                context.experts.append(install_experts(model, x, by_name[x.name], reader, context))
                bar.advance(task)
            streaming = [m.stream_bytes for m in context.experts if m.streams or m.splits]
            if streaming:  # one pair of staging slots for every layer (plan: expert_staging_bytes)
                context.expert_stream = ExpertStream(backend, max(streaming))
            for p in split:
                _install_split(
                    model, modules[p.name], p, reader, context, wdt, cdt, tied, embed_key, quant.get(p.name)
                )
                bar.advance(task)
            for p in placements:
                if p.resident and p.name in quant:
                    bias = _read_bias(modules[p.name], p.name, reader, wdt, backend.device)
                    shape = (p.out_features, p.in_features)
                    resident = DequantLinear.load(
                        StoredLinear(reader, p.name, shape, quant[p.name]), backend.device, bias
                    )
                    set_module(model, p.name, resident)
                    bar.advance(task)
            load_rest(model, reader, backend.device, wdt, tied, bar, task)
        make_buffers(model, backend.device)
        check_no_meta(model)
        head_placed = ref.spec.lm_head.name in {p.name for p in placements}
        if ref.spec.quant and not backend.is_cuda and not head_placed:
            quantize_head(model)  # on the CPU, as the plain quantized model holds it
        context.finalize()
        memory = _memory_report(model, context)  # before direct modules bring host views in
        fusions = _call_whole_linears_directly(model, context, int8_head=bool(ref.spec.quant) and head_placed)
    except BaseException:
        context.close()
        raise
    model.eval()
    model.register_forward_pre_hook(_phase_hook(context), with_kwargs=True)
    model.hetegen_engine = context
    load_generation_config(model, folder)
    return LoadedModel(
        model=model,
        device=str(backend.device),
        formats=engine_formats(placements, runtime, "+".join(ref.spec.quant_formats) or None),
        load_s=time.perf_counter() - start,
        engine="hetegen",
        sync=backend.synchronize,
        folder=str(folder),
        memory=memory,
        counters=context.stats,
        on_close=context.close,
        fused=None if fusions is None else fusions.as_dict(),
    )


def _rows(p: LinearPlacement) -> tuple[int, int]:
    return p.cpu_rows_prefill, p.cpu_rows_decode


def _check_projections(ref: ModelRef, modules: dict[str, nn.Module]) -> None:
    for spec in ref.spec.linears:
        module = modules.get(spec.name)
        if not isinstance(module, nn.Linear):
            what = "missing" if module is None else type(module).__name__
            raise ModelError(
                f"{ref.name}: projection {spec.name} is {what}, not nn.Linear",
                "hetegen splits nn.Linear projections only; this model is not supported",
            )


def _check_experts(ref: ModelRef, experts: Sequence[ExpertsPlacement]) -> None:
    """PlanError unless `experts` places each of the model's MoE layers once, with its count
    and a split it can take."""
    want = {x.name: x.num_experts for x in ref.spec.experts}
    by_name = {x.name: x for x in ref.spec.experts}
    hint = "re-run `hetegen plan` for this model"
    seen: set[str] = set()
    for x in experts:
        if want.get(x.name) != x.num_experts or x.name in seen:
            why = (
                "twice" if x.name in seen else f"with {x.num_experts} experts, which this model does not have"
            )
            raise PlanError(f"the plan places the experts {x.name} {why}", hint)
        checked_split(x, by_name[x.name])
        seen.add(x.name)
    if set(want) - seen:
        raise PlanError(f"the plan places no experts for {sorted(set(want) - seen)[0]}", hint)


def _check_placements(
    placements: Sequence[LinearPlacement], modules: dict[str, nn.Module]
) -> list[LinearPlacement]:
    """Validate names, types and shapes; return the split (non-resident) placements."""
    seen: set[str] = set()
    linear_names = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    for p in placements:
        if p.name in seen:
            raise PlanError(f"the plan places {p.name} twice", "re-create the plan with `hetegen plan`")
        seen.add(p.name)
        module = modules.get(p.name)
        if module is None:
            close = difflib.get_close_matches(p.name, linear_names, n=2)
            hint = (
                f"did you mean {', '.join(close)}? " if close else ""
            ) + "the plan was made for another model; re-run `hetegen plan` for this one"
            raise PlanError(f"the plan places {p.name}, which this model does not have", hint)
        if not isinstance(module, nn.Linear):
            raise PlanError(
                f"the plan places {p.name}, which is a {type(module).__name__}, not nn.Linear",
                "re-run `hetegen plan` for this model",
            )
        if (module.out_features, module.in_features) != (p.out_features, p.in_features):
            raise PlanError(
                f"{p.name} is [{module.out_features}, {module.in_features}] in this model "
                f"but [{p.out_features}, {p.in_features}] in the plan",
                "the plan was made for another model; re-run `hetegen plan`",
            )
    return [p for p in placements if not p.resident]


def _check_ram(
    model: nn.Module,
    split: list[LinearPlacement],
    runtime: RuntimeSettings,
    backend: Backend,
    quant: dict[str, tuple[str, int]],
    spec,
    experts: Sequence[ExpertsPlacement],
) -> None:
    """Refuse before loading when the host-held weights would not fit in available RAM."""
    gpu_experts, cpu_experts = experts_bytes(spec, experts, runtime.cpu_dtype_decode)
    need = (
        host_memory(split, runtime.weights_dtype, runtime.cpu_dtypes, quant=quant).total_bytes + cpu_experts
    )
    if not backend.is_cuda:  # the stand-in "device" is host memory too
        skip = {p.name for p in split} | {x.name for x in experts}
        rest = {id(t): t.numel() for n, t in named_tensors(model) if n.rpartition(".")[0] not in skip}
        need += sum(rest.values()) * torch_dtype(runtime.weights_dtype).itemsize + gpu_experts
    available = int(psutil.virtual_memory().available)
    if need + RAM_MARGIN_BYTES > available:
        raise ModelError(
            f"the host-held weights need {format_bytes(need)} of RAM but only "
            f"{format_bytes(available)} is available",
            "close other programs, keep more of the model on the GPU, or use a smaller model",
        )


def _install_split(
    model: nn.Module,
    linear: nn.Linear,
    p: LinearPlacement,
    reader: CheckpointReader,
    context: EngineContext,
    wdt: torch.dtype,
    cdt: tuple[torch.dtype, torch.dtype],
    tied: bool,
    embed_key: str | None,
    quant: tuple[str, int] | None,
) -> None:
    """Read one split linear's rows into host buffers and swap in a HeteroLinear."""
    bias = _read_bias(linear, p.name, reader, wdt, context.backend.device)
    if quant is not None:
        shape = (p.out_features, p.in_features)
        host = QuantHostWeight.load(StoredLinear(reader, p.name, shape, quant), _rows(p), context.arena)
        set_module(model, p.name, HeteroLinear(p, host, bias, context))
        return
    key = reader.key_for(f"{p.name}.weight")
    if key is None and tied and linear is model.get_output_embeddings():
        key = embed_key
    if key is None:
        raise ModelError(f"the checkpoint lacks {p.name}.weight", "re-download or convert the model")
    layout = HostLayout(p.out_features, p.in_features, _rows(p), wdt, cdt)
    host = HostWeight.allocate(layout, context.arena)
    reader.copy_rows(key, host.gpu_home, start=host.row0)
    for copy in host.copies.values():
        reader.copy_rows(key, copy, start=0)
    set_module(model, p.name, HeteroLinear(p, host, bias, context))


def _read_bias(
    linear: nn.Linear, name: str, reader: CheckpointReader, wdt: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """The linear's bias in the weights dtype on `device` (None when it has none)."""
    if linear.bias is None:
        return None
    key = reader.key_for(f"{name}.bias")
    if key is None:
        raise ModelError(f"the checkpoint lacks {name}.bias", "re-download or convert the model")
    return reader.read(key, wdt, device)


def _call_whole_linears_directly(
    model: nn.Module, context: EngineContext, int8_head: bool = False
) -> fused.Fusions | None:
    """Without a pipeline (every linear whole on the CPU backend), the model calls each linear's
    direct module (HeteroLinear.direct_module: its packed kernel, or a CpuLinear) instead of
    the HeteroLinear, which stays registered with the context for its memory and counters.
    `int8_head` (a quantized model whose plan places the LM head): the head's direct module
    is quantized to int8 first, as the plain quantized model holds it and the plan prices it
    (costmodel.strategies.cpu_head_rates)."""
    if context.streaming:
        return None
    for name, module in list(model.named_modules()):
        direct = module.direct_module() if isinstance(module, HeteroLinear) else None
        if direct is not None:
            set_module(model, name, direct)
            context.direct_linears += 1
    if int8_head:
        quantize_head(model)
    return fuse_for_decode(model)  # their attentions, MLPs, experts and norms: one call each a token


def _phase_hook(context: EngineContext):
    """Forward pre-hook on the whole model: more than one new token per sequence = prefill."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        tokens = kwargs.get("input_ids")
        if tokens is None:
            tokens = args[0] if args else kwargs.get("inputs_embeds")
        n = tokens.shape[1] if tokens is not None and tokens.dim() >= 2 else 1
        context.begin_pass("prefill" if n > 1 else "decode")

    return hook


def _memory_report(model: nn.Module, context: EngineContext) -> dict[str, int]:
    """Bytes by home, as held (the arena with its alignment). On the CPU stand-in, "device"
    bytes are host RAM as well. Pinned scratch grows while running: EngineStats counts it."""
    hosts = [lin.host for lin in context.linears]
    device_bytes = sum(
        t.numel() * t.element_size() for t in {id(t): t for _, t in named_tensors(model)}.values()
    )
    arena = context.arena.nbytes if context.arena is not None else 0
    copies = sum(h.cpu_copy_bytes for h in hosts)
    experts = sum(x.host_bytes for x in context.experts)
    return {
        "split_linears": len(hosts),
        "host_weight_bytes": arena + copies + experts,
        "pinned_bytes": arena if context.arena is not None and context.arena.pinned else 0,
        "cpu_copy_bytes": copies,
        "device_weight_bytes": device_bytes,
        "staging_bytes": context.scheduler.staging_bytes if context.scheduler else 0,
        "expert_staging_bytes": context.expert_stream.nbytes if context.expert_stream else 0,
    }
