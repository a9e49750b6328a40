"""One prediction of one execution, and its check against the measurement (pure Python;
docs/run.md "Predicted and measured", docs/bench.md).

`predict(spec, execution, req, inputs)` predicts a model's step for a workload on the backend
it runs on: the stock model or an all-CPU plan (`cpu`), a plan on a GPU (`cuda`), or a GPU
plan on the CPU stand-in (`standin`: the "GPU" share is computed on the CPU too,
fit.standin_rates). run, bench and the solver's strategies share the same terms
(costmodel.strategies). `prediction_check` puts a prediction beside the measured times, per
phase, with the parts `hetegen calibrate` refits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from hetegen_cli.models.shapes.spec import ModelSpec
from hetegen_cli.plan.costmodel import hardware as cm
from hetegen_cli.plan.costmodel.calibration import profile_fixed_costs
from hetegen_cli.plan.costmodel.fit import phase_rates_from_profile, rates_from_profile, standin_rates
from hetegen_cli.plan.costmodel.fixed import FixedCosts
from hetegen_cli.plan.costmodel.strategies import Engine, cpu_only_prediction, hetegen_prediction
from hetegen_cli.plan.document import Plan
from hetegen_cli.plan.request import PlanRequest
from hetegen_cli.plan.sections import Figures, ProfileIdentity
from hetegen_cli.profile.document import Profile, profile_sections

Backend = Literal["cpu", "cuda", "standin"]
BACKENDS = ("cpu", "cuda", "standin")
#: the strategy a prediction on each backend stands for (run and bench documents)
STRATEGY_OF = {"cpu": "cpu_only", "cuda": "hetegen", "standin": "hetegen on the CPU stand-in"}


@dataclass(frozen=True)
class CostInputs:
    """What the cost model takes from a profile: the validated document, its identity, its
    fitted fixed costs (calibrated when a calibration of this very profile lies beside it;
    None when the profile measured none) and notes on what was used."""

    profile: dict | Profile
    identity: dict | None = None
    fixed: FixedCosts | None = None
    notes: tuple[str, ...] = ()

    @classmethod
    def of(cls, profile: dict | Profile, identity: dict | None = None) -> CostInputs:
        profile = profile_sections(profile)
        fixed, notes = profile_fixed_costs(profile, identity)
        return cls(profile, identity, fixed, tuple(notes))

    def rates(
        self, spec: ModelSpec, cpu_dtypes: tuple[str, str], prefill_tokens: int, backend: Backend
    ) -> tuple[cm.PhaseRates, list[str]]:
        """The rates `spec` runs at on `backend` with its CPU share in `cpu_dtypes`, and those
        of each quantized format its linears and routed experts are in (a mixed model has several)."""
        formats = sorted(
            set(spec.quant_map().values()) | {q for x in spec.experts for q in x.part_quant if q}
        )
        rates, notes = phase_rates_from_profile(self.profile, spec.dtype, cpu_dtypes, prefill_tokens, formats)
        if backend != "standin":
            return rates, notes
        gpu_side, more = rates_from_profile(self.profile, spec.dtype, spec.dtype, prefill_tokens)
        return standin_rates(rates, gpu_side), notes + more

    def brief(self) -> ProfileIdentity:
        """What a prediction records of its profile (`hetegen calibrate` checks it)."""
        who = self.identity or {}
        return ProfileIdentity(**{k: who.get(k) for k in ("path", "sha256", "cpu_model", "gpu_name")})


@dataclass(frozen=True)
class Execution:
    """How a model runs: a plan (None: the stock model) on a backend."""

    plan: Plan | None
    backend: Backend

    @classmethod
    def of(cls, plan: Plan | None, gpu: Backend) -> Execution:
        """`plan` where it runs: a plan that needs a GPU on `gpu` ("cuda", or "standin" on a
        machine without CUDA), anything else on the CPU."""
        needs_gpu = plan is not None and plan.runtime.requires_gpu
        return cls(plan, gpu if needs_gpu else "cpu")

    @property
    def device(self) -> str:
        """Where the fixed costs were measured for it: "cuda" or "cpu"."""
        return "cuda" if self.backend == "cuda" else "cpu"

    @property
    def strategy(self) -> str:
        return STRATEGY_OF[self.backend]


def spec_in(spec: ModelSpec, dtype: str) -> ModelSpec:
    """`spec` with its floating-point weights in `dtype` (a quantized spec stays as it is)."""
    return spec if spec.quant is not None else spec.in_dtype(dtype)


def predict(spec: ModelSpec, execution: Execution, req: PlanRequest, inputs: CostInputs) -> Figures:
    """Figures of `spec` run as `execution` for `req`'s workload, with `linear` and `fixed`
    parts when the profile has fixed costs. ProfileError when the profile lacks a rate."""
    if execution.backend not in BACKENDS:
        raise ValueError(f"unknown backend {execution.backend!r}")
    plan = execution.plan
    formats = plan.runtime.cpu_dtypes if plan is not None else (spec.dtype, spec.dtype)
    rates, _ = inputs.rates(spec, formats, req.prompt_len, execution.backend)
    if execution.backend == "cpu":
        engine = Engine("cpu", plan.placements if plan is not None else ())
        return cpu_only_prediction(rates, spec, req, inputs.fixed, engine)
    assert plan is not None  # Execution.of gives a GPU backend to GPU plans only
    buffers = 1 if execution.backend == "standin" else max(1, plan.runtime.staging_buffers)
    return hetegen_prediction(
        rates,
        spec,
        req,
        plan.placements,
        buffers,
        plan.runtime.lm_head_on_gpu,
        0,
        inputs.fixed,
        gpu_device=execution.device,
        experts=plan.experts,
    )


def prediction_check(
    predicted: Figures,
    measured_prefill_s: float | None,
    measured_decode_s: float | None,
    *,
    device: str,
    strategy: str,
    profile: ProfileIdentity | None,
) -> dict[str, Any]:
    """Predicted beside measured, per phase (decode: seconds per step), with ratio =
    measured / predicted and the parts `hetegen calibrate` refits."""
    phases = {}
    for phase, measured in (("prefill", measured_prefill_s), ("decode", measured_decode_s)):
        pred = predicted.seconds(phase)
        entry = {
            "predicted_s": pred,
            "measured_s": measured,
            "ratio": measured / pred if measured and pred else None,
        }
        if predicted.linear is not None and predicted.fixed is not None:
            raw = predicted.fixed.uncalibrated or predicted.fixed
            entry.update(
                linear_s=predicted.linear.seconds(phase),
                fixed_s=predicted.fixed.seconds(phase),
                fixed_uncalibrated_s=raw.seconds(phase),
            )
        phases[phase] = entry
    pred_rate = predicted.decode_tokens_per_s
    meas_rate = 1.0 / measured_decode_s if measured_decode_s else None
    return {
        "strategy": strategy,
        "device": device,
        "calibrated": bool(predicted.fixed and predicted.fixed.calibrated),
        "profile": profile.to_dict() if profile is not None else None,
        "phases": phases,
        "decode_tokens_per_s": {
            "predicted": pred_rate,
            "measured": meas_rate,
            "error": meas_rate / pred_rate - 1 if meas_rate and pred_rate else None,
        },
    }
