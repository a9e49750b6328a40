"""The all-CPU plan: every linear (and an untied LM head) computed whole on the CPU, no GPU
needed (pure Python)."""

from __future__ import annotations

from hetegen_cli.plan import costmodel as cm
from hetegen_cli.plan.assemble import assemble, check_host
from hetegen_cli.plan.costmodel.experts import active_bytes
from hetegen_cli.plan.costmodel.strategies import Engine, bounds, cpu_only_prediction, quant_bytes, tokens_for
from hetegen_cli.plan.document import ExpertsPlacement, LinearEstimate, LinearPlacement, Plan, RuntimeSettings
from hetegen_cli.plan.memory import experts_bytes, host_memory, workspace_bytes
from hetegen_cli.plan.sections import Budget, GpuMemory, LinearTimes, MemoryUse, Predictions


def activation_dtype(spec, rates) -> str:
    """The dtype an all-CPU plan computes in: float32 for a quantized model whose every
    quantized format the profile measured with hetegen's kernels (they take float32, so no
    linear converts x: the plain quantized model's choice, models.loading.quantized_loader);
    else the model's own dtype."""
    kernels = {r.cpu_kernel for r in rates.quant.values()}
    if spec.quant and kernels == {"hetegen-avx2"}:
        return "float32"
    return spec.dtype


def all_cpu_plan(spec, rates, req, profile_identity, cpu_budget, notes, warnings, fixed) -> Plan:
    """Every linear (and an untied LM head) computed whole on the CPU; no GPU needed.
    `cpu_budget`: (bytes or None, where the number came from)."""
    cpu_budget, cpu_source = cpu_budget
    lins = list(spec.linears) + ([] if spec.tie_word_embeddings else [spec.lm_head])
    placements = tuple(LinearPlacement.of(lin, False, lin.out_features, lin.out_features) for lin in lins)
    ctx = req.prompt_len + req.max_new_tokens
    dtype = activation_dtype(spec, rates)
    if dtype != spec.dtype:
        notes.append(
            f"all-CPU plan of a quantized model: the rest of the model and its activations in {dtype} "
            "(the profile's quantized CPU kernels take float32; no linear converts x)"
        )
    if fixed is not None and (note := fixed.quantized_note(spec)):
        notes.append(note)
    held = spec.in_dtype(dtype)  # the float tensors and the KV cache as the engine will hold them
    other = held.fixed_bytes + held.kv_cache_bytes(ctx, req.batch_size) + workspace_bytes(held, req)
    experts = tuple(ExpertsPlacement.of(x) for x in spec.experts)  # every routed expert on the CPU
    expert_host = experts_bytes(spec, experts, rates.decode.cpu_dtype)[1] if experts else None
    host = host_memory(
        placements, dtype, rates.cpu_dtypes, other, quant=spec.quant_map(), expert_bytes=expert_host
    )
    check_host(host, cpu_budget, cpu_source, rates)
    estimates = []
    for lin in lins:
        prefill, decode = (
            LinearTimes(
                **cm.split_times(
                    rates.of_linear(ph, lin.quant),
                    lin.out_features,
                    lin.in_features,
                    lin.out_features,
                    tokens_for(lin.role, req, ph),
                    concurrent=False,
                ).to_dict()
            )
            for ph in ("prefill", "decode")
        )
        estimates.append(LinearEstimate(lin.weight_bytes, decode.cpu_s / lin.weight_bytes, prefill, decode))
    runtime = RuntimeSettings(
        weights_dtype=dtype,
        cpu_dtype_prefill=rates.prefill.cpu_dtype,
        cpu_dtype_decode=rates.decode.cpu_dtype,
        cpu_threads=rates.decode.cpu_threads,
        staging_buffers=0,
        prefetch_depth=0,
        pin_weights=False,
        lm_head_on_gpu=spec.tie_word_embeddings,
        requires_gpu=False,
    )
    w_host = sum(lin.weight_bytes for lin in lins) + (
        spec.lm_head.weight_bytes if spec.tie_word_embeddings else 0
    )
    w_host += round(active_bytes(spec.experts, experts, req.batch_size, req.expert_use)[1])
    predictions = Predictions(
        hetegen=cpu_only_prediction(rates, spec, req, fixed, Engine("cpu", placements)),
        offload=None,
        layer_split=None,
        cpu_only=cpu_only_prediction(rates, spec, req, fixed),
    )
    return assemble(
        spec,
        req,
        placements,
        runtime,
        tuple(estimates),
        predictions,
        bounds(rates, 0, w_host, predictions.cpu_only.decode_s_per_token, True, quant_bytes(spec)),
        budget=Budget(
            gpu_budget_bytes=0,
            gpu_budget_source="none",
            gpu_minimum_bytes=0,
            gpu_unused_bytes=0,
            cpu_budget_bytes=cpu_budget,
            cpu_budget_source=cpu_source,
        ),
        memory=MemoryUse(gpu=GpuMemory.nothing(), host=host),
        rates=rates,
        profile_identity=profile_identity,
        warnings=warnings,
        notes=notes,
        experts=experts,
    )
