"""A run's predicted time beside its measured time, per phase (the `prediction` of `run --json`).

The prediction is made for the run's own workload (its prompt length, the tokens it generated)
and the way it ran: the stock model or an all-CPU plan on the CPU, a plan on the GPU, or a GPU
plan on the CPU stand-in (plan.estimate). It needs this machine's saved profile (or
`--profile`); none is measured for it. `hetegen plan --calibrate RUN.json` refits the fixed
terms from it (plan.calibration).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hetegen_cli.core import paths
from hetegen_cli.core.errors import HetegenError
from hetegen_cli.models.spec import ModelSpec, spec_from_config
from hetegen_cli.plan.calibration import profile_overheads
from hetegen_cli.plan.document import Plan
from hetegen_cli.plan.estimate import predict_execution, prediction_check, standin_rates
from hetegen_cli.plan.rates import phase_rates_from_profile
from hetegen_cli.plan.request import PlanRequest
from hetegen_cli.profile.document import identity, load_profile


def profile_brief(who: dict) -> dict:
    """What a prediction records of its profile (plan --calibrate checks it)."""
    return {k: who.get(k) for k in ("path", "sha256", "cpu_model", "gpu_name")}


def _spec_in(spec: ModelSpec, dtype: str) -> ModelSpec:
    if spec.dtype == dtype or spec.quant is not None or not spec.config:
        return spec
    return spec_from_config(spec.config, spec.name, dtype=dtype)


def predict_run(
    spec: ModelSpec,
    *,
    engine: str,
    device: str,
    dtype: str,
    plan: Plan | None,
    backend_name: str | None,
    prompt_tokens: int,
    generated_tokens: int,
    prefill_s: float,
    decode_s: float,
    decode_steps: int,
    profile_path: Path | None,
) -> dict[str, Any]:
    """The `prediction` section of a run document: plan.estimate.prediction_check, or
    {"reason": why there is none}."""
    path = profile_path or paths.default_profile_path()
    if profile_path is None and paths.probe(path, "the saved profile") is None:
        return {"reason": f"no profile at {path}: run `hetegen profile` to get predictions"}
    try:
        profile = load_profile(path)
        who = identity(profile, path)
        overheads, _ = profile_overheads(profile, who)
        if plan is None or not plan.runtime.requires_gpu:
            if device != "cpu":
                return {"reason": "plain GPU runs are not predicted"}
            backend = "cpu"
            run_dtype = plan.runtime.weights_dtype if plan is not None else dtype.split("+")[0]
            if spec.quant is not None or run_dtype not in ("float32", "bfloat16", "float16"):
                run_dtype = spec.dtype
            formats = plan.runtime.cpu_dtypes if plan is not None else (run_dtype, run_dtype)
        else:
            backend = "cuda" if backend_name == "cuda" else "standin"
            run_dtype = plan.runtime.weights_dtype
            formats = plan.runtime.cpu_dtypes
        spec = _spec_in(spec, run_dtype)
        quant = next(iter(spec.quant_map().values()), None)
        if backend == "standin":
            rates, _ = standin_rates(profile, spec.dtype, formats, prompt_tokens, quant)
        else:
            rates, _ = phase_rates_from_profile(profile, spec.dtype, formats, prompt_tokens, quant)
        req = PlanRequest(prompt_len=prompt_tokens, max_new_tokens=max(1, generated_tokens))
        placements = plan.placements if plan is not None else None
        runtime = plan.runtime if plan is not None else None
        predicted = predict_execution(spec, placements, runtime, rates, overheads, req, backend)
    except HetegenError as exc:
        return {"reason": f"no prediction: {exc.message}"}
    strategy = {"cpu": "cpu_only", "cuda": "hetegen", "standin": "hetegen on the CPU stand-in"}[backend]
    check = prediction_check(
        predicted,
        prefill_s,
        decode_s / decode_steps if decode_steps > 0 else None,
        device="cuda" if backend == "cuda" else "cpu",
        strategy=strategy,
        profile=profile_brief(who),
    )
    check["engine"] = engine
    if overheads is None:
        check["note"] = "the profile has no engine costs: re-run `hetegen profile`"
    return check
