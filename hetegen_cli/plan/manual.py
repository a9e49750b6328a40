"""Plans from given fractions instead of the solver: tests, and bench's offload arm (every
cpu_fraction 0). No predictions. Pure Python."""

from __future__ import annotations

from hetegen_cli.models.shapes.spec import ModelSpec
from hetegen_cli.plan.document import (
    ExpertsPlacement,
    LinearPlacement,
    Plan,
    RuntimeSettings,
    model_identity,
    round_rows,
)
from hetegen_cli.plan.sections import Workload


def manual_plan(
    spec: ModelSpec,
    *,
    cpu_fraction_prefill: float | dict,
    cpu_fraction_decode: float | dict,
    resident: tuple | list | set = (),
    runtime: RuntimeSettings | None = None,
    workload: Workload | None = None,
    experts_gpu: dict | None = None,
) -> Plan:
    """A plan from given fractions (tests, engine, bench arms); no predictions.

    Fractions are one float for every linear or a dict name -> float (missing names: 0).
    `resident` names linears kept whole on the GPU. The untied LM head is planned as a
    linear when runtime.lm_head_on_gpu is False. `experts_gpu` maps a MoE layer's experts
    module to the experts on the GPU side (missing layers: every expert on the CPU).
    """
    runtime = runtime or RuntimeSettings(weights_dtype=spec.dtype)
    linears = list(spec.linears)
    if not runtime.lm_head_on_gpu:
        linears.append(spec.lm_head)
    known = {lin.name for lin in linears}
    resident = set(resident)

    def frac(value: float | dict, name: str) -> float:
        return float(value.get(name, 0.0)) if isinstance(value, dict) else float(value)

    for table in (cpu_fraction_prefill, cpu_fraction_decode, resident):
        unknown = set(table) - known if isinstance(table, (dict, set)) else set()
        if unknown:
            raise ValueError(f"unknown linear names: {sorted(unknown)[:3]}")
    placements = []
    for lin in linears:
        is_res = lin.name in resident
        rows = {
            ph: 0 if is_res else round_rows(frac(f, lin.name), lin.out_features)
            for ph, f in (("prefill", cpu_fraction_prefill), ("decode", cpu_fraction_decode))
        }
        placements.append(LinearPlacement.of(lin, is_res, rows["prefill"], rows["decode"]))
    experts_gpu = experts_gpu or {}
    unknown = set(experts_gpu) - {x.name for x in spec.experts}
    if unknown:
        raise ValueError(f"unknown experts modules: {sorted(unknown)[:3]}")
    return Plan(
        experts=tuple(ExpertsPlacement.of(x, experts_gpu.get(x.name, ())) for x in spec.experts),
        placements=tuple(placements),
        runtime=runtime,
        model=model_identity(spec),
        workload=workload or Workload(prompt_len=0, max_new_tokens=0, batch_size=1),
        notes=("manual plan: fractions given, not solved",),
    )
