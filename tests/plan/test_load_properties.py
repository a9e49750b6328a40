"""Property: a damaged plan document is either accepted or refused with PlanError, and an
accepted one works everywhere a plan is read (summary, model check, JSON, the run report)."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hetegen_cli.core.errors import PlanError
from hetegen_cli.models.architecture.spec import spec_from_config
from hetegen_cli.models.shapes.presets import preset_config
from hetegen_cli.plan.document import check_plan_matches
from hetegen_cli.plan.load import plan_from_dict
from hetegen_cli.plan.memory import host_memory
from hetegen_cli.plan.request import PlanRequest
from hetegen_cli.plan.solver import make_plan
from tests.fakes import make_profile
from tests.mutations import mutated, property_settings

SPEC = spec_from_config({**preset_config("smollm2-135m"), "num_hidden_layers": 2}, "small")
GPU_PLAN = make_plan(
    SPEC,
    make_profile(),
    PlanRequest(prompt_len=16, max_new_tokens=8, gpu_budget_bytes=2**30 + 60 * 2**20, reserve_bytes=2**30),
).to_dict()
CPU_PLAN = make_plan(SPEC, make_profile(gpu=False), PlanRequest(prompt_len=16, max_new_tokens=8)).to_dict()
EXAMPLES = 300  # per source plan


def _use(doc: object) -> None:
    try:
        plan = plan_from_dict(doc)  # type: ignore[arg-type]
    except PlanError:
        return
    summary = plan.summary()
    json.dumps(summary, allow_nan=False)
    predicted = ((summary["predictions"] or {}).get("hetegen") or {}).get("decode_tokens_per_s")
    if predicted:
        f"{predicted:.2f}"  # the run report formats it
    host_memory(plan.placements, plan.runtime.weights_dtype, plan.runtime.cpu_dtypes)
    with contextlib.suppress(PlanError):
        check_plan_matches(plan, SPEC)


@pytest.mark.parametrize("source", [GPU_PLAN, CPU_PLAN], ids=["gpu-plan", "cpu-plan"])
@property_settings(EXAMPLES)
@given(data=st.data())
def test_damaged_plans_are_accepted_or_refused_with_plan_error(source, data):
    _use(data.draw(mutated(source)))


def test_the_undamaged_plans_load():
    for doc in (GPU_PLAN, CPU_PLAN):
        assert plan_from_dict(doc).to_dict()["linears"] == doc["linears"]
