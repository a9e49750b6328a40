"""A run's predicted time beside its measured time, per phase (the `prediction` of `run --json`).

The prediction is made for the run's own workload (its prompt length, the tokens it generated)
and the way it ran: the stock model or an all-CPU plan on the CPU, a plan on the GPU, or a GPU
plan on the CPU stand-in (plan.costmodel.predict). It needs this machine's saved profile (or
`--profile`); none is measured for it. `hetegen calibrate RUN.json` refits the fixed costs from
it (plan.costmodel.calibration).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hetegen_cli.core import paths
from hetegen_cli.core.dtypes import WEIGHT_DTYPES
from hetegen_cli.core.errors import HetegenError
from hetegen_cli.models.shapes.spec import ModelSpec
from hetegen_cli.plan.costmodel.predict import CostInputs, Execution, predict, prediction_check, spec_in
from hetegen_cli.plan.document import Plan
from hetegen_cli.plan.request import PlanRequest
from hetegen_cli.profile.document import identity, load_profile


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
    """The `prediction` section of a run document (costmodel.predict.prediction_check), or
    {"reason": why there is none}. `dtype`: the weights dtype the model ran in."""
    path = profile_path or paths.default_profile_path()
    if profile_path is None and paths.probe(path, "the saved profile") is None:
        return {"reason": f"no profile at {path}: run `hetegen profile` to get predictions"}
    execution = Execution.of(plan, "cuda" if backend_name == "cuda" else "standin")
    if execution.backend == "cpu" and device != "cpu":
        return {"reason": "plain GPU runs are not predicted"}
    try:
        profile = load_profile(path)
        inputs = CostInputs.of(profile, identity(profile, path))
        run_dtype = plan.runtime.weights_dtype if plan is not None else dtype
        if spec.quant is not None or run_dtype not in WEIGHT_DTYPES:
            run_dtype = spec.dtype
        req = PlanRequest(prompt_len=prompt_tokens, max_new_tokens=max(1, generated_tokens))
        predicted = predict(spec_in(spec, run_dtype), execution, req, inputs)
    except HetegenError as exc:
        return {"reason": f"no prediction: {exc.message}"}
    check = prediction_check(
        predicted,
        prefill_s,
        decode_s / decode_steps if decode_steps > 0 else None,
        device=execution.device,
        strategy=execution.strategy,
        profile=inputs.brief(),
    )
    check["engine"] = engine
    if inputs.fixed is None:
        check["note"] = "the profile has no engine costs: re-run `hetegen profile`"
    return check
