"""The engine's own fixed costs, measured through the real model and engine (`hetegen profile`).

A bandwidth model knows each linear's bytes; a real step also pays for what is not a linear
(norms, rotary, residual adds, the KV-cache append and the attention kernel, Python and kernel
launches) and for the engine itself (the hand-off to the CPU worker, the activation copies,
the join). These costs are a few percent of a 30B model's step and most of a small model's, so
the planner needs them measured (docs/profile.md, "Engine costs").

How: tiny synthetic models (measure.tiny_models: hidden 256, 4 heads of 64, FFN 512,
vocabulary 2048; one and six decoder layers; untied LM head) of each architecture family
(llama, opt) are written to a temporary folder and loaded as `run` loads them. Per backend
(the CPU, and the GPU when present) and per activation dtype:

- the stock model's prefill at several prompt lengths and its decode step at two context
  lengths, minus the same linears called alone (`F.linear`, same shapes, same device): the
  non-linear time. The 6-layer minus the 1-layer model, over 5, is the time per decoder layer;
  what is left of the 1-layer model is the time per step outside the layers (embedding, final
  norm, masks, the generation loop); sampling's cost per vocabulary entry is timed alone;
- the engine with every linear whole on the CPU (the inline path), split in halves (the
  copies of x and of the CPU result, the join) and wholly streamed, against the stock model:
  the engine's cost per linear and mode;
- on the CPU, the same models quantized to int4 and loaded as `run` loads a quantized model
  (hetegen's kernels, the fused decode steps where the architecture takes them): entries with
  `weights: int4`. Their prefill points subtract the quantized linears called alone, as above;
  their decode points subtract nothing: a fused step calls its linears from C, so calling
  them alone from Python would cost more than they do inside it. The tiny model's linears
  (about 0.4 MB a layer, read from cache) stay in those points; the plan prices a real
  model's quantized linears by their bytes alone on top (docs/plan.md §1d);
- on the CPU, a tiny quantized Qwen3-MoE (the `moe` family: 16 experts, 8 chosen per token,
  as Qwen3-30B-A3B and OLMoE choose) loaded the same way: a MoE layer's decode step (the
  fused attention and norms, the router, the top-k, transformers' MoE block) less its
  experts' one fused kernel call timed alone, which the plan prices from the real experts'
  bytes (plan.costmodel.experts.fused_call_s). Its prefill points are kept but not used.

Every figure is the fastest of `repeat` samples: on a shared machine noise only adds time. The result is the
profile's `engine` section (profile.document.EngineCosts); plan.costmodel.fixed turns it into the
cost model's fixed terms.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hetegen_cli.core.devices import Backend, CpuBackend, dtype_name, get_backend, torch_dtype
from hetegen_cli.engine.hetero_model import load_hetero_model
from hetegen_cli.measure.timing import SCALE_ENV, torch_threads
from hetegen_cli.measure.tiny_models import ARCHITECTURES, MOE, TinyShape, write_tiny_model
from hetegen_cli.models.formats.quant import QuantLinear
from hetegen_cli.models.formats.quant_experts import QuantExperts
from hetegen_cli.models.formats.quantized import quantize_folder
from hetegen_cli.models.loading.cache import cache_keyword, new_cache
from hetegen_cli.models.loading.loader import LoadedModel, load_model
from hetegen_cli.models.loading.quantized_loader import activation_dtype, load_quantized
from hetegen_cli.models.loading.source import ModelRef, resolve_model
from hetegen_cli.plan.document import RuntimeSettings
from hetegen_cli.plan.manual import manual_plan

ENGINE_COSTS_VERSION = 1
MODES = ("inline", "split", "stream")  # the CPU computes the whole linear / half / none of it
QUANT_FORMAT, QUANT_GROUP = "int4", 32  # the quantized entries' weights


@dataclass(frozen=True)
class CostSizes:
    """What to measure: prompt lengths (the prefills, and the contexts of the decode steps
    after them), decode steps per generation, generations per point (the fastest counts)."""

    prompts: tuple[int, ...] = (16, 128, 512)  # prefill lengths, and decode contexts
    decode_steps: int = 6
    repeat: int = 3
    shape: TinyShape = field(default_factory=TinyShape)


QUICK_COSTS = CostSizes()
FULL_COSTS = CostSizes(prompts=(16, 64, 256, 512, 1024), repeat=5)
#: with HETEGEN_PROFILE_SCALE set (tests): tiny models, short prompts, one sample
SCALED_COSTS = CostSizes(
    prompts=(4, 8, 16),
    decode_steps=2,
    repeat=1,
    shape=TinyShape(
        hidden=32,
        heads=2,
        intermediate=64,
        vocab=64,
        layers=(1, 2),
        max_positions=64,
        experts=4,
        experts_per_token=2,
        expert_intermediate=32,
    ),
)


# --- timing ----------------------------------------------------------------------------------


class _Clock:
    """perf_counter after synchronising the backend, or an injected timer (tests)."""

    def __init__(self, backend: Backend, timer: Callable[[], float] | None) -> None:
        self.backend, self.timer = backend, timer

    def __call__(self) -> float:
        self.backend.synchronize()
        return self.timer() if self.timer is not None else time.perf_counter()


def _generation(model: Any, device: Any, clock: _Clock, prompt: int, steps: int) -> tuple[float, float]:
    """(prefill seconds, fastest decode-step seconds) of one generation: a forward over
    `prompt` random tokens, then `steps` one-token forwards, each with argmax sampling."""
    cache_kw = cache_keyword(model)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(prompt)
    ids = torch.randint(3, vocab, (1, prompt), generator=gen).to(device)
    cache = new_cache(model, capacity=prompt + steps + 1)
    start = clock()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_kw: cache})
    token = int(out.logits[0, -1].argmax().item())
    prefill = clock() - start
    times = []
    for _ in range(steps):
        start = clock()
        step = torch.tensor([[token]], dtype=torch.long, device=device)
        out = model(input_ids=step, use_cache=True, logits_to_keep=1, **{cache_kw: cache})
        token = int(out.logits[0, -1].argmax().item())
        times.append(clock() - start)
    return prefill, min(times)


def _fastest(model: Any, device: Any, clock: _Clock, prompt: int, sizes: CostSizes) -> tuple[float, float]:
    """The fastest prefill and decode step over `repeat` generations (noise on a shared
    machine only ever adds time, so the minimum is the machine's own cost)."""
    runs = [_generation(model, device, clock, prompt, sizes.decode_steps) for _ in range(sizes.repeat)]
    return min(r[0] for r in runs), min(r[1] for r in runs)


def _linears_alone(
    model: Any, device: Any, dtype: torch.dtype, clock: _Clock, tokens: int, repeat: int
) -> float:
    """Fastest seconds of every linear of `model` (nn.Linear, or QuantLinear through its own
    kernel) called once with `tokens` tokens, in order, with its own weights (the LM head with
    one token: logits_to_keep=1)."""
    head = model.get_output_embeddings()
    inputs: dict[tuple[int, int], torch.Tensor] = {}
    calls: list[Callable[[], Any]] = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear | QuantLinear):
            n = 1 if m is head else tokens
            if (n, m.in_features) not in inputs:
                inputs[n, m.in_features] = torch.randn(1, n, m.in_features).to(device, dtype)
            x = inputs[n, m.in_features]
            if isinstance(m, QuantLinear):
                calls.append(lambda m=m, x=x: m(x))
            else:
                calls.append(lambda m=m, x=x: F.linear(x, m.weight, m.bias))
    return _fastest_calls(calls, clock, repeat)


def _fastest_calls(calls: list[Callable[[], Any]], clock: _Clock, repeat: int) -> float:
    """Fastest seconds of `calls` made in order, over `repeat` samples after a warm-up one."""
    samples = []
    for _ in range(repeat + 1):
        start = clock()
        for call in calls:
            call()
        samples.append(clock() - start)
    return min(samples[1:])


def _experts_alone(model: Any, clock: _Clock, repeat: int) -> float:
    """Fastest seconds of every MoE layer's fused experts call (QuantExperts with hetegen's
    kernels) at one token, in order, with the first top-k experts chosen: what a decode step
    spends in them. 0 for a model without such layers (a dense model)."""
    layers = [m for m in model.modules() if isinstance(m, QuantExperts) and m.fused is not None]
    if not layers:
        return 0.0
    calls: list[Callable[[], Any]] = []
    for m in layers:
        k = m.spec.top_k
        x = torch.randn(1, m.fused.hidden)
        out = torch.zeros(1, m.fused.hidden)
        calls.append(lambda m=m, k=k, x=x, out=out: m.fused.add(x, list(range(k)), [1.0 / k] * k, out))
    return _fastest_calls(calls, clock, repeat)


def _sample_s_per_vocab(clock: _Clock, device: Any, repeat: int) -> float:
    """Seconds per vocabulary entry of greedy sampling (argmax of fp32 logits, to the host)."""
    vocab = 65536
    logits = torch.randn(vocab).to(device)
    samples = []
    for _ in range(repeat + 1):
        start = clock()
        for _ in range(8):
            int(logits.argmax().item())
        samples.append((clock() - start) / 8)
    return min(samples[1:]) / vocab


# --- one backend, one dtype, one architecture --------------------------------------------------


def _plain(ref: ModelRef, dtype: str, backend: Backend) -> LoadedModel:
    return load_model(ref, dtype=dtype, device=str(backend.device) if backend.is_cuda else "cpu")


def _engine(ref: ModelRef, dtype: str, backend: Backend, mode: str, threads: int) -> LoadedModel:
    fraction = {"inline": 1.0, "split": 0.5, "stream": 0.0}[mode]
    runtime = RuntimeSettings(
        weights_dtype=dtype,
        cpu_dtype_prefill=dtype,
        cpu_dtype_decode=dtype,
        cpu_threads=threads,
        staging_buffers=2,
        prefetch_depth=1,
        pin_weights=backend.is_cuda,
        lm_head_on_gpu=False,
        requires_gpu=mode != "inline",
    )
    spec = ref.spec
    plan = manual_plan(spec, cpu_fraction_prefill=fraction, cpu_fraction_decode=fraction, runtime=runtime)
    return load_hetero_model(ref, plan.placements, runtime, backend, progress=False)


def _quantized(ref: ModelRef, folder: Path) -> ModelRef:
    """The tiny float model `ref` quantized (QUANT_FORMAT) into `folder`, resolved as `run`
    resolves a quantized folder."""
    quantize_folder(ref, QUANT_FORMAT, QUANT_GROUP, folder)
    return resolve_model(str(folder), need_weights=True, quant="auto")


def _nonlinear(
    refs: dict[int, ModelRef],
    dtype: str,
    backend: Backend,
    clock: _Clock,
    sizes: CostSizes,
    load: Callable[[ModelRef], LoadedModel] | None = None,
) -> dict[str, Any]:
    """Per-layer and per-step non-linear seconds of the stock model, prefill and decode: one
    generation per prompt length gives the prefill at that length and decode steps at that
    context; the linears alone are subtracted.

    `load`: how to load a model (default the stock model in `dtype` on `backend`). A loader
    that gives a quantized model (load_quantized) keeps its decode steps whole: their
    linears are not subtracted (the module docstring says why), only a MoE layer's fused
    experts call (_experts_alone)."""
    tdt = torch_dtype(dtype)
    few, many = sizes.shape.layers
    points: dict[int, dict[str, list[float]]] = {}
    for layers in (few, many):
        loading = load(refs[layers]) if load is not None else _plain(refs[layers], dtype, backend)
        with loading as loaded, torch.inference_mode():
            model, device = loaded.model, loaded.device
            _generation(model, device, clock, sizes.prompts[0], 2)  # warm-up
            if load is not None:
                lin1 = _experts_alone(model, clock, sizes.repeat)
            else:
                lin1 = _linears_alone(model, device, tdt, clock, 1, sizes.repeat)
            pre, dec = [], []
            for n in sizes.prompts:
                prefill, step = _fastest(model, device, clock, n, sizes)
                pre.append(max(0.0, prefill - _linears_alone(model, device, tdt, clock, n, sizes.repeat)))
                dec.append(max(0.0, step - lin1))
            points[layers] = {"prefill": pre, "decode": dec}
    span = many - few
    result: dict[str, list[dict[str, float]]] = {"prefill": [], "decode": []}
    for phase, key in (("prefill", "tokens"), ("decode", "context")):
        for i, n in enumerate(sizes.prompts):
            per_layer = max(0.0, (points[many][phase][i] - points[few][phase][i]) / span)
            outside = max(0.0, points[few][phase][i] - few * per_layer)
            at = n if phase == "prefill" else n + sizes.decode_steps // 2
            result[phase].append({key: at, "layer_s": per_layer, "token_s": outside})
    return result


def _linear_overheads(
    ref: ModelRef, dtype: str, backend: Backend, clock: _Clock, sizes: CostSizes, threads: int
) -> dict[str, dict[str, float]]:
    """Seconds per linear the engine adds in each mode and phase, over the stock model."""
    n_linears = len(ref.spec.linears) + 1  # + the LM head, planned as a linear
    prompt = sizes.prompts[1] if len(sizes.prompts) > 1 else sizes.prompts[0]

    def fastest(loaded: LoadedModel) -> tuple[float, float]:
        _generation(loaded.model, loaded.device, clock, prompt, 2)  # warm-up
        return _fastest(loaded.model, loaded.device, clock, prompt, sizes)

    with _plain(ref, dtype, backend) as loaded, torch.inference_mode():
        base = fastest(loaded)
    result: dict[str, dict[str, float]] = {}
    for mode in MODES:
        if mode == "inline" and backend.is_cuda:
            continue  # on a GPU machine whole-CPU linears take the pipelined path ("split" costs)
        with _engine(ref, dtype, backend, mode, threads) as loaded, torch.inference_mode():
            times = fastest(loaded)
        result[mode] = {
            phase: max(0.0, (t - b) / n_linears)
            for phase, t, b in zip(("prefill", "decode"), times, base, strict=False)
        }
    return result


def measure_engine_costs(
    backends: list[Backend] | None = None,
    *,
    threads: int,
    dtypes: dict[str, tuple[str, ...]] | None = None,
    architectures: tuple[str, ...] = ARCHITECTURES,
    quantized: tuple[str, ...] = (*ARCHITECTURES, MOE),
    sizes: CostSizes = QUICK_COSTS,
    timer: Callable[[], float] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The profile's `engine` section: fixed costs per backend, dtype and architecture.

    `backends`: default the CPU stand-in only (the caller adds a CudaBackend when CUDA is
    present). `dtypes`: activation dtypes per backend name (default float32 and bfloat16 on
    the CPU, float16 and bfloat16 on a GPU). `quantized`: the families also measured
    quantized, on the CPU. `timer` replaces the clock (tests).
    """
    backends = backends or [CpuBackend()]
    default_dtypes = {"cpu": ("float32", "bfloat16")}
    entries = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hetegen-engine-costs-") as tmp, torch_threads(threads):
        refs = {
            arch: {
                n: write_tiny_model(Path(tmp) / f"{arch}-{n}", arch, sizes.shape, n)
                for n in sizes.shape.layers
            }
            for arch in dict.fromkeys((*architectures, *quantized))
        }
        for backend in backends:
            clock = _Clock(backend, timer)
            kind = "cuda" if backend.is_cuda else "cpu"
            chosen = (
                (dtypes or {}).get(backend.name)
                or default_dtypes.get(backend.name)
                or ("float16", "bfloat16")
            )
            sample = _sample_s_per_vocab(clock, backend.device, sizes.repeat)
            for dtype in chosen:
                for arch in architectures:
                    if progress:
                        progress(f"engine costs: {arch} {dtype} on {backend.name}")
                    entry = {
                        "device": kind,
                        "backend": backend.name,
                        "dtype": dtype,
                        "architecture": arch,
                        "threads": threads,
                        "sample_s_per_vocab": sample,
                        **_nonlinear(refs[arch], dtype, backend, clock, sizes),
                    }
                    if arch == architectures[0] and dtype == chosen[0]:
                        many = refs[arch][sizes.shape.layers[-1]]
                        entry["linear_s"] = _linear_overheads(many, dtype, backend, clock, sizes, threads)
                    entries.append(entry)
            if backend.is_cuda:
                continue
            act = dtype_name(activation_dtype())  # the quantized model's activations
            for arch in quantized:  # the quantized model as `run` loads it: CPU only
                if progress:
                    progress(f"engine costs: {arch} {QUANT_FORMAT} on {backend.name}")
                folders = {
                    n: _quantized(ref, Path(tmp) / f"{arch}-{n}-{QUANT_FORMAT}")
                    for n, ref in refs[arch].items()
                }
                entries.append(
                    {
                        "device": kind,
                        "backend": backend.name,
                        "dtype": act,
                        "architecture": arch,
                        "weights": QUANT_FORMAT,
                        "threads": threads,
                        "sample_s_per_vocab": sample,
                        **_nonlinear(folders, act, backend, clock, sizes, load=load_quantized),
                    }
                )
    shape = sizes.shape
    return {
        "version": ENGINE_COSTS_VERSION,
        "method": "tiny synthetic models through the stock model and the engine; fastest of repeat",
        "model": {
            "hidden_size": shape.hidden,
            "num_heads": shape.heads,
            "head_dim": shape.head_dim,
            "kv_width": shape.heads * shape.head_dim,
            "intermediate_size": shape.intermediate,
            "vocab_size": shape.vocab,
            "layers": list(shape.layers),
            **(
                {
                    "experts": shape.experts,
                    "experts_per_token": shape.experts_per_token,
                    "expert_intermediate_size": shape.expert_intermediate,
                }
                if MOE in quantized
                else {}
            ),
        },
        "repeat": sizes.repeat,
        "seconds": time.perf_counter() - start,
        "entries": entries,
    }


def measure_for_profile(*, threads: int, quick: bool, gpu_backend: Backend | None = None) -> dict[str, Any]:
    """The `engine` section `hetegen profile` saves: the CPU (stand-in backend), and the GPU
    (`gpu_backend`, a CUDA backend where the profile measures one)."""
    backends: list[Backend] = [CpuBackend()]
    if gpu_backend is not None:
        backends.append(gpu_backend)
    sizes = QUICK_COSTS if quick else FULL_COSTS
    if os.environ.get(SCALE_ENV):  # tests: shrink as the rest of the profile shrinks
        sizes = SCALED_COSTS
    return measure_engine_costs(backends, threads=threads, sizes=sizes)


def measure_for_document(doc: dict[str, Any], *, quick: bool) -> dict[str, Any]:
    """The `engine` section for a measured profile `doc` (measure.profile.with_engine_costs):
    with its CPU threads, and on its GPU when it measured one."""
    gpu_backend = get_backend("cuda") if doc.get("gpu") else None
    return measure_for_profile(threads=int(doc["cpu"]["threads"]), quick=quick, gpu_backend=gpu_backend)
