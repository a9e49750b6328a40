"""The whole-pipeline split (plan.pipeline) against the per-linear one (the fallback)."""

from __future__ import annotations

import dataclasses

import pytest

from hetegen_cli.models.architecture.spec import spec_from_config
from hetegen_cli.models.shapes.presets import preset_config
from hetegen_cli.plan import costmodel as cm
from hetegen_cli.plan import solver
from hetegen_cli.plan.pipeline import min_cpu_rows
from hetegen_cli.plan.request import PlanRequest
from tests.fakes import DESKTOP_RATES, GB, simple_rates

GiB, MiB = 1024**3, 1024**2

RATES = {
    "desktop": DESKTOP_RATES,
    "slow-gpu": simple_rates(  # a GPU whose own math is a large share of the GPU path
        cpu_call_s=20e-6,
        pcie_copy_s=5e-6,
        gpu_call_s=40e-6,
        gpu_bytes_per_s=60 * GB,
        gpu_flops_per_s=5e12,
        cpu_bytes_per_s_concurrent=30 * GB,
        pcie_bytes_per_s_concurrent=24 * GB,
    ),
}
CASES = [
    (model, budget, rates)
    for model, budget in (("opt-6.7b", 4 * GiB), ("llama-2-7b", 6 * GiB), ("opt-30b", 8 * GiB))
    for rates in RATES
]


def _both(model: str, budget: int, rates: cm.Rates):
    spec = spec_from_config(preset_config(model), model)
    plans = {}
    for objective in ("per-linear", "pipeline"):
        req = PlanRequest(
            prompt_len=256,
            max_new_tokens=32,
            gpu_budget_bytes=budget,
            cpu_budget_bytes=512 * GiB,
            reserve_bytes=64 * MiB,
            objective=objective,
        )
        plans[objective] = solver.solve(spec, rates, req)
    return plans


@pytest.mark.parametrize(("model", "budget", "rates"), CASES)
def test_the_whole_pipeline_is_never_predicted_slower_than_per_linear(model, budget, rates):
    plans = _both(model, budget, RATES[rates])
    per, whole = (plans[k].predictions.hetegen for k in ("per-linear", "pipeline"))
    assert whole.total_s <= per.total_s * (1 + 1e-9)
    assert plans["pipeline"].memory.gpu.total_bytes <= budget


def test_the_whole_pipeline_values_prefetch():
    """With the GPU's own math a large share of its path, overlapping copies with earlier
    compute pays where copies run beside the join's (two copy engines): the pipeline
    objective keeps 2 buffers and predicts a faster step."""
    plans = _both("llama-2-7b", 6 * GiB, dataclasses.replace(RATES["slow-gpu"], h2d_copy_engines=2))
    per, whole = plans["per-linear"], plans["pipeline"]
    assert whole.runtime.staging_buffers == 2
    assert whole.predictions.hetegen.decode_s_per_token < 0.99 * per.predictions.hetegen.decode_s_per_token
    # the fractions moved: the CPU takes less when the GPU path is partly hidden
    moved = [
        (a.cpu_rows_decode, b.cpu_rows_decode)
        for a, b in zip(per.placements, whole.placements, strict=True)
        if not a.resident and a.cpu_rows_decode != b.cpu_rows_decode
    ]
    assert moved
    assert whole.runtime.copy_engines == 2


def test_with_one_copy_engine_prefetch_after_the_join_is_the_per_linear_balance():
    """One copy engine: the next copy is issued after a linear's join, so at depth 1 nothing
    overlaps across linears and each linear takes max(cpu, transfer + gpu)."""
    steps = [(1.0, 0.7, 0.2), (0.5, 0.9, 0.3), (0.8, 0.4, 0.1)]
    per_linear = sum(max(c, t + g) for c, t, g in steps)
    assert cm.pipeline_time(steps, 2, copy_engines=1) == pytest.approx(per_linear)
    assert cm.pipeline_time(steps, 2, copy_engines=2) < per_linear  # copies overlap earlier linears
    assert cm.pipeline_time(steps, 1, copy_engines=2) == pytest.approx(per_linear)
    plans = _both("llama-2-7b", 6 * GiB, RATES["slow-gpu"])
    assert plans["pipeline"].runtime.copy_engines == 1


def test_streamed_shares_stay_within_the_planned_staging_buffer():
    plans = _both("opt-30b", 8 * GiB, RATES["slow-gpu"])
    plan = plans["pipeline"]
    per_buffer = plan.memory.gpu.staging_bytes // plan.runtime.staging_buffers
    streamed = max(
        (p.out_features - min(p.cpu_rows_prefill, p.cpu_rows_decode)) * p.in_features * 2
        for p in plan.placements
        if not p.resident
    )
    assert streamed <= per_buffer


def test_min_cpu_rows_keeps_the_share_in_the_buffer():
    from hetegen_cli.plan.document import LinearPlacement

    p = LinearPlacement("x", 0, "q", 1000, 64, False, 0, 0)
    assert min_cpu_rows(p, 1000 * 64) == 0
    rows = min_cpu_rows(p, 600 * 64)
    assert rows % 16 == 0 and (1000 - rows) * 64 <= 600 * 64 and rows - 16 < 400


def test_an_unknown_objective_is_refused():
    from hetegen_cli.core.errors import UsageError

    with pytest.raises(UsageError, match="objective"):
        PlanRequest(objective="fastest")
