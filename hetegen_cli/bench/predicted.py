"""What the cost model predicts for one bench arm as it really runs (plan.estimate): the plan
on the GPU, or on the CPU stand-in when there is no CUDA; the all-CPU plan for `cpu`; the
stock model in the weights dtype for `reference`; the plan's own figures for `offload` and
`layer-split`. bench.report puts it beside the measurement (`prediction_check`)."""

from __future__ import annotations

from typing import Any

from hetegen_cli.core.errors import HetegenError
from hetegen_cli.plan.calibration import profile_overheads
from hetegen_cli.plan.estimate import predict_execution, standin_rates
from hetegen_cli.plan.rates import phase_rates_from_profile
from hetegen_cli.plan.request import PlanRequest
from hetegen_cli.run.predicted import profile_brief


def predicted_for_arm(arm: str, plan: Any, cpu_plan: Any, spec: Any, prepared: Any) -> dict | None:
    """{"figures", "device", "strategy", "profile"} for `arm`, or None when the
    cost model has no prediction for it (accelerate, gpu, llama.cpp) or cannot make one."""
    o, profile = prepared.options, prepared.profile
    req = PlanRequest(prompt_len=o.prompt_len, max_new_tokens=o.max_new_tokens)
    quant = next(iter(spec.quant_map().values()), None)
    try:
        overheads, _ = profile_overheads(profile, prepared.profile_identity)
        if arm in ("offload", "layer-split") and plan is not None:
            key = "offload" if arm == "offload" else "layer_split"
            fig = (plan.predictions or {}).get(key)
            if not fig:
                return None
            device = "cuda" if arm == "offload" else "mixed"
            return _result(fig, device, key, prepared)
        if arm == "hetegen" and plan is not None:
            gpu = "cuda" if prepared.has_cuda else "standin"
            backend = gpu if plan.runtime.requires_gpu else "cpu"
            use, runtime = plan, plan.runtime
        elif arm == "cpu" and cpu_plan is not None:
            backend, use, runtime = "cpu", cpu_plan, cpu_plan.runtime
            spec = prepared.cpu_ref.spec if prepared.cpu_ref is not None else spec
        elif arm == "reference":
            backend, use, runtime = "cpu", None, None
        else:
            return None
        formats = runtime.cpu_dtypes if runtime is not None else (spec.dtype, spec.dtype)
        if backend == "standin":
            rates, _ = standin_rates(profile, spec.dtype, formats, o.prompt_len, quant)
        else:
            rates, _ = phase_rates_from_profile(profile, spec.dtype, formats, o.prompt_len, quant)
        placements = use.placements if use is not None else None
        fig = predict_execution(spec, placements, runtime, rates, overheads, req, backend)
    except HetegenError:
        return None
    strategy = {"cpu": "cpu_only", "cuda": "hetegen", "standin": "hetegen on the CPU stand-in"}[backend]
    return _result(fig, "cuda" if backend == "cuda" else "cpu", strategy, prepared)


def _result(fig: dict, device: str, strategy: str, prepared: Any) -> dict:
    return {
        "figures": fig,
        "device": device,
        "strategy": strategy,
        "profile": profile_brief(prepared.profile_identity),
    }
