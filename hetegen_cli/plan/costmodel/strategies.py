"""Predicted step times of every strategy: the plan's pipeline, pure offload, a static layer
split, CPU-only, and the physical bounds of docs/method.md §11 (pure Python, no torch).

Each strategy's step is the sum of its terms, each added once (`compose`): the linears through
the bandwidth model (costmodel.hardware), then per part of the decoder layers either the
engine's measured fixed costs on that device (costmodel.fixed) or, where the profile has
none, the bandwidth model's attention term. `req` is a plan.request.PlanRequest; `placements`
are plan.LinearPlacement in execution order; times are seconds per step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from hetegen_cli.core.phase import PHASES
from hetegen_cli.core.quant import HEAD_FORMAT, kernel_takes
from hetegen_cli.models.shapes.spec import MIXED, ModelSpec
from hetegen_cli.plan.costmodel import hardware as cm
from hetegen_cli.plan.costmodel.experts import experts_step_s, step_tokens
from hetegen_cli.plan.costmodel.fixed import QUANT_ENTRY, FixedCosts, fixed_s, linears_s
from hetegen_cli.plan.document import LinearPlacement
from hetegen_cli.plan.request import PlanRequest
from hetegen_cli.plan.sections import Bounds, Figures, FixedPart, PhaseSeconds, Predictions


def tokens_for(role: str, req: PlanRequest, phase: str) -> int:
    """Tokens a linear sees in a step: the LM head only needs the last position."""
    if phase == "decode" or role == "lm_head":
        return req.batch_size
    return req.batch_size * req.prompt_len


# --- the terms -------------------------------------------------------------------------------


def attention_for(
    rates: cm.Rates, spec: ModelSpec, req: PlanRequest, phase: str, layers: int, on_gpu: bool
) -> float:
    """Attention math of `layers` layers in one step; decode at the mean decode context."""
    if layers <= 0:
        return 0.0
    if phase == "prefill":
        q, c = req.prompt_len, float(req.prompt_len)
    else:
        q, c = 1, req.prompt_len + req.max_new_tokens / 2
    kv = spec.kv_cache_bytes(1, req.batch_size) * c * layers / spec.num_layers
    return cm.attention_time(
        rates,
        num_layers=layers,
        num_heads=spec.num_heads,
        head_dim=spec.head_dim,
        kv_bytes=kv,
        query_tokens=q,
        context_tokens=c,
        batch=req.batch_size,
        on_gpu=on_gpu,
    )


def head_time(rates: cm.Rates, spec: ModelSpec, req: PlanRequest, on_gpu: bool) -> float:
    """The LM head when it is not a placement (tied, or resident): last position only."""
    h = spec.lm_head
    if on_gpu:
        return cm.gpu_time(rates, h.out_features, h.in_features, req.batch_size)
    return cm.cpu_time(rates, h.out_features, h.in_features, req.batch_size, concurrent=False)


def cpu_head_rates(phase_rates: cm.PhaseRates, phase: str, spec: ModelSpec) -> cm.Rates:
    """The rates of an LM head the CPU computes: a quantized model holds it as int8
    (core.quant.HEAD_FORMAT) when the kernel takes it."""
    h = spec.lm_head
    if spec.quant is not None and kernel_takes(HEAD_FORMAT, h.out_features, h.in_features):
        return phase_rates.quant.get(HEAD_FORMAT, phase_rates[phase])
    return phase_rates[phase]


def linear_step(rates: cm.PhaseRates, spec, req, placements, phase, buffers, head_on_gpu, concurrent=True):
    """(per-linear ShareTimes, seconds): the linears through the copy/compute pipeline, then
    the LM head on the GPU when it is not a placement. Quantized linears (spec.quant_map) at
    their format's rates. Attention and the fixed costs are not included (`compose`)."""
    quant = spec.quant_map()
    times = [
        cm.split_times(
            rates.of_linear(phase, quant.get(p.name, (None,))[0]),
            p.out_features,
            p.in_features,
            p.cpu_rows(phase),
            tokens_for(p.role, req, phase),
            resident=p.resident,
            concurrent=concurrent,
        )
        for p in placements
    ]
    t = cm.pipeline_time(
        [(x.cpu_s, x.transfer_s, x.gpu_s) for x in times], buffers, rates[phase].h2d_copy_engines
    )
    head = head_time(rates[phase], spec, req, True) if head_on_gpu else 0.0
    return times, t + head


def step_times(rates: cm.PhaseRates, spec, req, placements, phase, buffers, head_on_gpu):
    """(per-linear ShareTimes, seconds): `linear_step` plus the attention of every layer on the
    GPU: the step of the bandwidth model alone (the solver compares layouts by it)."""
    times, t = linear_step(rates, spec, req, placements, phase, buffers, head_on_gpu)
    return times, t + attention_for(rates[phase], spec, req, phase, spec.num_layers, True)


@dataclass(frozen=True)
class Part:
    """Decoder layers of one step computed on one device ("cpu" or the GPU side's), priced
    with the fixed costs measured with `weights` ("float", or "int4": FixedCosts.quantized_decode);
    in prefill with `prefill_weights` where given."""

    device: str
    layers: int
    on_gpu: bool
    weights: str = "float"
    prefill_weights: str | None = None

    def weights_in(self, phase: str) -> str:
        return self.prefill_weights if phase == "prefill" and self.prefill_weights else self.weights


@dataclass(frozen=True)
class Engine:
    """The engine's own cost per linear: `placements` run by the engine on `device` (none for
    the stock model)."""

    device: str = "cpu"
    placements: tuple[LinearPlacement, ...] = ()


def compose(
    rates: cm.PhaseRates,
    spec: ModelSpec,
    req: PlanRequest,
    fixed: FixedCosts | None,
    linear_s: dict[str, float],
    parts: list[Part],
    engine: Engine,
    gpu_memory_bytes: int,
) -> Figures:
    """One strategy's figures: per phase, `linear_s` (the linears' bandwidth-model seconds)
    + for each part of the layers its fixed costs on its device when the profile measured that
    device (the first part also carries the step's work outside the layers), else the
    attention term + the engine's cost per linear. Each term is added once; the calibration's
    factor scales the fixed costs of its device and phase."""
    if fixed is None:
        seconds = {
            ph: linear_s[ph] + sum(attention_for(rates[ph], spec, req, ph, p.layers, p.on_gpu) for p in parts)
            for ph in PHASES
        }
        return figures(req, seconds["prefill"], seconds["decode"], gpu_memory_bytes)
    dtype = spec.dtype  # activations are in the model's dtype on either side
    args = dict(prompt_len=req.prompt_len, max_new_tokens=req.max_new_tokens, batch=req.batch_size)
    linear, raw, scaled = {}, {}, {}
    for ph in PHASES:
        lin = linears_s(fixed, engine.device, dtype, engine.placements, ph) if engine.placements else 0.0
        linear[ph], raw[ph], scaled[ph] = linear_s[ph], lin, lin * fixed.factor(engine.device, ph)
        for i, p in enumerate(parts):
            w = p.weights_in(ph)
            t = fixed_s(fixed, p.device, dtype, spec, ph, layers=p.layers, outside=i == 0, weights=w, **args)
            if t is None:
                linear[ph] += attention_for(rates[ph], spec, req, ph, p.layers, p.on_gpu)
            else:
                raw[ph] += t
                scaled[ph] += t * fixed.factor(p.device, ph)
    out = figures(
        req, linear["prefill"] + scaled["prefill"], linear["decode"] + scaled["decode"], gpu_memory_bytes
    )
    return out.model_copy(
        update={
            "linear": PhaseSeconds(prefill_s=linear["prefill"], decode_s_per_token=linear["decode"]),
            "fixed": FixedPart(
                prefill_s=scaled["prefill"],
                decode_s_per_token=scaled["decode"],
                calibrated=bool(fixed.scale),
                **(
                    {"uncalibrated": PhaseSeconds(prefill_s=raw["prefill"], decode_s_per_token=raw["decode"])}
                    if fixed.scale
                    else {}
                ),
            ),
        }
    )


def figures(req: PlanRequest, prefill_s: float, decode_s: float, gpu_memory_bytes: int) -> Figures:
    """Figures of a prefill step and one decode step (one token per sequence)."""
    total = prefill_s + (req.max_new_tokens - 1) * decode_s
    return Figures(
        prefill_s=prefill_s,
        decode_s_per_token=decode_s,
        decode_tokens_per_s=req.batch_size / decode_s if decode_s > 0 else None,
        end_to_end_tokens_per_s=req.batch_size * req.max_new_tokens / total if total > 0 else None,
        total_s=total,
        gpu_memory_bytes=gpu_memory_bytes,
    )


def with_speedups(predictions: Predictions) -> Predictions:
    """Every other strategy's decode and end-to-end time over hetegen's."""
    hetegen = predictions.hetegen
    if hetegen is None:
        return predictions
    update = {
        key: fig.model_copy(
            update={
                "hetegen_decode_speedup": fig.decode_s_per_token / hetegen.decode_s_per_token,
                "hetegen_end_to_end_speedup": fig.total_s / hetegen.total_s,
            }
        )
        for key, fig in predictions.items()
        if key != "hetegen" and fig.decode_tokens_per_s
    }
    return predictions.model_copy(update=update)


# --- the strategies ----------------------------------------------------------------------------


def with_experts(rates: cm.PhaseRates, spec, req, linear_s: dict, experts=None, **how) -> dict[str, float]:
    """`linear_s` per phase plus the routed experts of a MoE model placed as `experts`
    (costmodel.experts.experts_step_s; None: every expert on the CPU), used as `req.expert_use`
    says (None: uniform use)."""
    if not spec.experts:
        return linear_s
    use = req.expert_use
    return {
        ph: linear_s[ph]
        + experts_step_s(
            rates[ph],
            spec.experts,
            experts,
            step_tokens(req, ph),
            use=use,
            prefill=ph == "prefill",
            quant=rates.quant,
            **how,
        )
        for ph in PHASES
    }


def hetegen_prediction(
    rates: cm.PhaseRates,
    spec,
    req,
    placements,
    buffers,
    head_on_gpu,
    gpu_bytes,
    fixed,
    gpu_device="cuda",
    experts=(),
) -> Figures:
    """The plan's pipeline on a GPU (`gpu_device`: "cpu" on the CPU stand-in), its experts
    placed as `experts`, the CPU's at the contended rate."""
    lin = {ph: linear_step(rates, spec, req, placements, ph, buffers, head_on_gpu)[1] for ph in PHASES}
    lin = with_experts(rates, spec, req, lin, experts)
    parts = [Part(gpu_device, spec.num_layers, True)]
    return compose(rates, spec, req, fixed, lin, parts, Engine(gpu_device, tuple(placements)), gpu_bytes)


def offload_prediction(
    rates: cm.PhaseRates, spec, req, placements, head_on_gpu, buffers, gpu_bytes, fixed, experts=()
) -> Figures:
    """Pure offloading (optimised streaming): the same resident set and staging buffers, every
    other weight streamed whole (cpu_fraction 0) at the solo PCIe rate, same pipeline; a MoE
    model's experts placed as the plan's (the comparison is about the linears)."""
    zero = tuple(LinearPlacement.of(p, p.resident) for p in placements)
    lin = {
        ph: linear_step(rates, spec, req, zero, ph, buffers, head_on_gpu, concurrent=False)[1]
        for ph in PHASES
    }
    lin = with_experts(rates, spec, req, lin, experts)
    parts = [Part("cuda", spec.num_layers, True)]
    return compose(rates, spec, req, fixed, lin, parts, Engine("cuda", zero), gpu_bytes)


def layer_split_prediction(rates: cm.PhaseRates, spec, req, budget: int, base_bytes: int, fixed) -> Figures:
    """llama.cpp-style static split: decoder layers 0..k-1 whole on the GPU (with their KV),
    the CPU computes the rest whole (solo rate) one after the other; the LM head on the GPU
    when it fits first. `base_bytes` = reserve + fixed + workspace (no staging, no KV). The CPU
    layers run in the decode format in both phases (one format per layer, as llama.cpp)."""
    room = budget - base_bytes
    untied = not spec.tie_word_embeddings
    head_gpu = not untied or spec.lm_head.weight_bytes <= room
    if untied and head_gpu:
        room -= spec.lm_head.weight_bytes
    kv_layer = spec.kv_cache_bytes(req.prompt_len + req.max_new_tokens, req.batch_size) // spec.num_layers
    per_layer = [kv_layer] * spec.num_layers
    for lin in spec.linears:
        per_layer[lin.layer_index] += lin.weight_bytes
    for x in spec.experts:  # a layer on the GPU holds all its experts
        per_layer[x.layer_index] += x.weight_bytes
    gpu_layers = 0
    while gpu_layers < spec.num_layers and per_layer[gpu_layers] <= room:
        room -= per_layer[gpu_layers]
        gpu_layers += 1
    decode = rates.decode
    seconds = {}
    for phase in PHASES:
        t = 0.0
        for lin in spec.linears:
            n = tokens_for(lin.role, req, phase)
            r = rates.of_linear("decode", lin.quant)
            if lin.layer_index < gpu_layers:
                t += cm.gpu_time(r, lin.out_features, lin.in_features, n)
            else:
                t += cm.cpu_time(r, lin.out_features, lin.in_features, n, concurrent=False)
        seconds[phase] = t + head_time(
            decode if head_gpu else cpu_head_rates(rates, "decode", spec), spec, req, head_gpu
        )
    # attention and fixed costs at the decode format's rates in both phases
    one = cm.PhaseRates(decode, decode, rates.quant)
    seconds = with_experts(one, spec, req, seconds, None, concurrent=False, gpu_layers=gpu_layers)
    parts = [Part("cuda", gpu_layers, True), Part("cpu", spec.num_layers - gpu_layers, False)]
    out = compose(one, spec, req, fixed, seconds, parts, Engine(), budget - room)
    return out.model_copy(update={"gpu_layers": gpu_layers, "lm_head_on_gpu": head_gpu})


def _calls_free(rates: cm.Rates, free: bool) -> cm.Rates:
    """`rates` without the CPU's cost per call when `free` (the fixed terms hold the calls)."""
    return replace(rates, cpu_call_s=0.0) if free else rates


def cpu_only_prediction(rates: cm.PhaseRates, spec, req, fixed, engine: Engine = Engine()) -> Figures:
    """Everything on the CPU at its solo rate: every linear, the LM head, attention. `engine`:
    the all-CPU plan run by the engine (its cost per linear); default the stock model.

    A quantized model with a profile that measured the quantized path
    (FixedCosts.quantized_decode) takes that path's fixed costs; its decode linears cost their
    bytes alone, and the engine, which calls the same modules without a GPU, adds nothing. A
    MoE model takes them in decode only (its entry measures the one-token step; prefill keeps
    the float terms)."""
    quantized = fixed is not None and fixed.quantized_decode(spec)
    seconds = {}
    for phase in PHASES:
        free_calls = quantized and phase == "decode"  # the calls are in the fixed terms
        t = sum(
            cm.cpu_time(
                _calls_free(rates.of_linear(phase, lin.quant), free_calls),
                lin.out_features,
                lin.in_features,
                tokens_for(lin.role, req, phase),
                concurrent=False,
            )
            for lin in spec.linears
        )
        head = _calls_free(cpu_head_rates(rates, phase, spec), free_calls)
        seconds[phase] = t + head_time(head, spec, req, False)
    seconds = with_experts(rates, spec, req, seconds, None, concurrent=False)
    prefill = "float" if quantized and spec.experts else None
    parts = [Part("cpu", spec.num_layers, False, QUANT_ENTRY if quantized else "float", prefill)]
    return compose(rates, spec, req, fixed, seconds, parts, Engine() if quantized else engine, 0)


def quant_bytes(spec: ModelSpec) -> str | dict[str, int] | None:
    """What `bounds` takes of a model's storage: None for floating point, its format when
    every quantized linear shares one, else each format's stored bytes (a mixed model)."""
    if spec.quant != MIXED:
        return spec.quant
    out: dict[str, int] = {}
    for lin in spec.linears:
        if lin.quant:
            out[lin.quant] = out.get(lin.quant, 0) + lin.weight_bytes
    return out


def bounds(
    rates: cm.PhaseRates,
    w_gpu: int,
    w_host: int,
    decode_s: float,
    cpu_plan: bool = False,
    quant: str | Mapping[str, int] | None = None,
) -> Bounds:
    """docs/method.md §11: per-token time >= W_gpu / B_hbm + W_host / X (solo rates, the
    decode format's CPU rate; a quantized model's: its format's, bytes as stored; a mixed
    model's (`quant` = bytes per format, quant_bytes): the formats' rates weighted by their
    bytes, so the host's bytes take the time they would take split in those shares)."""
    if isinstance(quant, Mapping):
        total = sum(quant.values())
        held = {f: rates.of_linear("decode", f) for f in quant}
        seconds = sum(n / (held[f].cpu_params_per_s * held[f].weight_bytes) for f, n in quant.items())
        b_cpu = total / seconds if seconds else 0.0
    else:
        cpu_rates = rates.of_linear("decode", quant)
        b_cpu = cpu_rates.cpu_params_per_s * cpu_rates.weight_bytes  # in held bytes
    rates = rates.decode
    result = {
        "w_gpu_bytes": w_gpu,
        "w_host_bytes": w_host,
        "b_cpu_bytes_per_s": b_cpu,
        "b_dram_bytes_per_s": rates.dram_bytes_per_s,
    }
    gpu_s = w_gpu / rates.gpu_bytes_per_s if w_gpu else 0.0
    xs = {"cpu_only": min(b_cpu, rates.dram_bytes_per_s)}
    if rates.has_gpu and not cpu_plan:
        result.update(b_hbm_bytes_per_s=rates.gpu_bytes_per_s, b_pcie_bytes_per_s=rates.pcie_bytes_per_s)
        xs = {
            "offload": rates.pcie_bytes_per_s,
            "layer_split": b_cpu,
            "hybrid": min(b_cpu + rates.pcie_bytes_per_s, rates.dram_bytes_per_s),
        }
    for key, x in xs.items():
        result[f"{key}_s_per_token"] = gpu_s + w_host / x
    best = result["cpu_only_s_per_token" if "cpu_only" in xs else "hybrid_s_per_token"]
    result["bound_s_per_token"] = best
    result["plan_fraction_of_bound"] = best / decode_s if decode_s > 0 else None
    return Bounds(**result)
