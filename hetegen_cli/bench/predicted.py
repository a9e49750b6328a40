"""What the cost model predicts for one bench arm as it really runs (plan.costmodel.predict):
the plan on the GPU, or on the CPU stand-in when there is no CUDA; the all-CPU plan for `cpu`;
the stock model in the weights dtype for `reference`; the plan's own figures for `offload` and
`layer-split`. bench.report puts it beside the measurement (`prediction_check`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hetegen_cli.core.errors import HetegenError
from hetegen_cli.plan.costmodel.predict import CostInputs, Execution, predict
from hetegen_cli.plan.request import PlanRequest
from hetegen_cli.plan.sections import Figures, ProfileIdentity


@dataclass(frozen=True)
class ArmPrediction:
    """An arm's predicted figures, where its fixed costs were measured ("cuda", "cpu", or
    "mixed" for a layer split), the strategy they stand for, and the profile used."""

    figures: Figures
    device: str
    strategy: str
    profile: ProfileIdentity

    def to_dict(self) -> dict[str, Any]:
        return {
            "figures": self.figures.to_dict(),
            "device": self.device,
            "strategy": self.strategy,
            "profile": self.profile.to_dict(),
        }


def predicted_for_arm(arm: str, plan: Any, cpu_plan: Any, spec: Any, prepared: Any) -> ArmPrediction | None:
    """The prediction for `arm`, or None when the cost model has none for it (accelerate, gpu,
    llama.cpp) or cannot make one."""
    o = prepared.options
    req = PlanRequest(prompt_len=o.prompt_len, max_new_tokens=o.max_new_tokens)
    try:
        inputs = CostInputs.of(prepared.profile, prepared.profile_identity)
        if arm in ("offload", "layer-split") and plan is not None:
            key = "offload" if arm == "offload" else "layer_split"
            fig = getattr(plan.predictions, key)
            if fig is None:
                return None
            return ArmPrediction(fig, "cuda" if arm == "offload" else "mixed", key, inputs.brief())
        if arm in ("hetegen", "experts-on-cpu") and plan is not None:
            execution = Execution.of(plan, "cuda" if prepared.has_cuda else "standin")
        elif arm == "cpu" and cpu_plan is not None:
            execution = Execution(cpu_plan, "cpu")
            spec = prepared.cpu_ref.spec if prepared.cpu_ref is not None else spec
        elif arm == "reference":
            execution = Execution(None, "cpu")
        else:
            return None
        fig = predict(spec, execution, req, inputs)
    except HetegenError:
        return None
    return ArmPrediction(fig, execution.device, execution.strategy, inputs.brief())
