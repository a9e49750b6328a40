"""Predicted step times: the plan's pipeline, pure offload, a static layer split, CPU-only,
and the physical bounds of docs/method.md §11 (pure Python, no torch).

`req` is a plan.request.PlanRequest (prompt_len, max_new_tokens, batch_size); `placements` are
plan.LinearPlacement in execution order; times are seconds per step.
"""

from __future__ import annotations

from hetegen_cli.core.quant import HEAD_FORMAT, kernel_takes
from hetegen_cli.models.spec import ModelSpec
from hetegen_cli.plan import costmodel as cm
from hetegen_cli.plan.document import LinearPlacement
from hetegen_cli.plan.request import PlanRequest


def tokens_for(role: str, req: PlanRequest, phase: str) -> int:
    """Tokens a linear sees in a step: the LM head only needs the last position."""
    if phase == "decode" or role == "lm_head":
        return req.batch_size
    return req.batch_size * req.prompt_len


# --- step times ----------------------------------------------------------------------------


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
    (core.quant.HEAD_FORMAT, models.quantized.quantize_head) when the kernel takes it."""
    h = spec.lm_head
    if spec.quant is not None and kernel_takes(HEAD_FORMAT, h.out_features, h.in_features):
        return phase_rates.quant.get(HEAD_FORMAT, phase_rates[phase])
    return phase_rates[phase]


def figures(req: PlanRequest, prefill_s: float, decode_s: float, gpu_memory_bytes: int) -> dict:
    """Prediction figures. decode_s is one decode step (one token per sequence).

    end-to-end = generated tokens / (prefill + (max_new_tokens - 1) decode steps): the
    prefill step yields the first token.
    """
    total = prefill_s + (req.max_new_tokens - 1) * decode_s
    return {
        "prefill_s": prefill_s,
        "decode_s_per_token": decode_s,
        "decode_tokens_per_s": req.batch_size / decode_s if decode_s > 0 else None,
        "end_to_end_tokens_per_s": req.batch_size * req.max_new_tokens / total if total > 0 else None,
        "total_s": total,
        "gpu_memory_bytes": gpu_memory_bytes,
    }


def step_times(rates: cm.PhaseRates, spec, req, placements, phase, buffers, head_on_gpu, concurrent=True):
    """(per-linear ShareTimes, step seconds): the linears through the copy/compute pipeline,
    then the LM head (when not a placement) and attention on the GPU. Quantized linears
    (spec.quant_map) at their format's rates."""
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
    rates = rates[phase]
    head = head_time(rates, spec, req, True) if head_on_gpu else 0.0
    return times, t + head + attention_for(rates, spec, req, phase, spec.num_layers, True)


def offload_prediction(rates: cm.PhaseRates, spec, req, placements, head_on_gpu, buffers, gpu_bytes) -> dict:
    """Pure offloading (optimised streaming): the same resident set and staging buffers, every
    other weight streamed whole (cpu_fraction 0) at the solo PCIe rate, same pipeline."""
    zero = [
        LinearPlacement(p.name, p.layer_index, p.role, p.out_features, p.in_features, p.resident, 0, 0)
        for p in placements
    ]
    out = {
        ph: step_times(rates, spec, req, zero, ph, buffers, head_on_gpu, concurrent=False)[1]
        for ph in ("prefill", "decode")
    }
    return figures(req, out["prefill"], out["decode"], gpu_bytes)


def layer_split_prediction(rates: cm.PhaseRates, spec, req, budget: int, base_bytes: int) -> dict:
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
    gpu_layers = 0
    while gpu_layers < spec.num_layers and per_layer[gpu_layers] <= room:
        room -= per_layer[gpu_layers]
        gpu_layers += 1
    out = {}
    phase_rates, rates = rates, rates.decode
    for phase in ("prefill", "decode"):
        t = 0.0
        for lin in spec.linears:
            n = tokens_for(lin.role, req, phase)
            r = phase_rates.of_linear("decode", lin.quant)
            if lin.layer_index < gpu_layers:
                t += cm.gpu_time(r, lin.out_features, lin.in_features, n)
            else:
                t += cm.cpu_time(r, lin.out_features, lin.in_features, n, concurrent=False)
        t += head_time(
            rates if head_gpu else cpu_head_rates(phase_rates, "decode", spec), spec, req, head_gpu
        )
        t += attention_for(rates, spec, req, phase, gpu_layers, True)
        t += attention_for(rates, spec, req, phase, spec.num_layers - gpu_layers, False)
        out[phase] = t
    used = budget - room
    result = figures(req, out["prefill"], out["decode"], used)
    result.update(gpu_layers=gpu_layers, lm_head_on_gpu=head_gpu)
    return result


def cpu_only_prediction(phase_rates: cm.PhaseRates, spec, req) -> dict:
    """Everything on the CPU at its solo rate: every linear, the LM head, attention."""
    out = {}
    for phase in ("prefill", "decode"):
        rates = phase_rates[phase]
        t = sum(
            cm.cpu_time(
                phase_rates.of_linear(phase, lin.quant),
                lin.out_features,
                lin.in_features,
                tokens_for(lin.role, req, phase),
                concurrent=False,
            )
            for lin in spec.linears
        )
        out[phase] = (
            t
            + head_time(cpu_head_rates(phase_rates, phase, spec), spec, req, False)
            + attention_for(rates, spec, req, phase, spec.num_layers, False)
        )
    return figures(req, out["prefill"], out["decode"], 0)


def bounds(
    rates: cm.PhaseRates,
    w_gpu: int,
    w_host: int,
    decode_s: float,
    cpu_plan: bool = False,
    quant: str | None = None,
) -> dict:
    """docs/method.md §11: per-token time >= W_gpu / B_hbm + W_host / X (solo rates, the
    decode format's CPU rate; a quantized model's: its format's, bytes as stored)."""
    cpu_rates = rates.of_linear("decode", quant)
    rates = rates.decode
    b_cpu = cpu_rates.cpu_params_per_s * cpu_rates.weight_bytes  # in held bytes
    b_dram = rates.dram_bytes_per_s
    result = {
        "w_gpu_bytes": w_gpu,
        "w_host_bytes": w_host,
        "b_cpu_bytes_per_s": b_cpu,
        "b_dram_bytes_per_s": b_dram,
    }
    gpu_s = w_gpu / rates.gpu_bytes_per_s if w_gpu else 0.0
    xs = {"cpu_only": min(b_cpu, b_dram)}
    if rates.has_gpu and not cpu_plan:
        result.update(b_hbm_bytes_per_s=rates.gpu_bytes_per_s, b_pcie_bytes_per_s=rates.pcie_bytes_per_s)
        xs = {
            "offload": rates.pcie_bytes_per_s,
            "layer_split": b_cpu,
            "hybrid": min(b_cpu + rates.pcie_bytes_per_s, b_dram),
        }
    for key, x in xs.items():
        result[f"{key}_s_per_token"] = gpu_s + w_host / x
    best = result["cpu_only_s_per_token" if "cpu_only" in xs else "hybrid_s_per_token"]
    result["bound_s_per_token"] = best
    result["plan_fraction_of_bound"] = best / decode_s if decode_s > 0 else None
    return result
