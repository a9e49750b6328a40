"""Property: a damaged profile is either accepted or refused with ProfileError, and an accepted
one gives rates, a plan, a plan document and the profile tables without any other error."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hetegen_cli.cli.profile import render
from hetegen_cli.core.errors import HetegenError, PlanError, ProfileError
from hetegen_cli.models.architecture.spec import spec_from_config
from hetegen_cli.models.shapes.presets import preset_config
from hetegen_cli.plan.costmodel.fit import rates_from_profile
from hetegen_cli.plan.request import PlanRequest
from hetegen_cli.plan.solver import make_plan
from hetegen_cli.profile.document import validate_profile
from tests.fakes import make_profile
from tests.mutations import mutated, property_settings

SPEC = spec_from_config({**preset_config("smollm2-135m"), "num_hidden_layers": 2}, "small")
REQUEST = PlanRequest(prompt_len=16, max_new_tokens=8, reserve_bytes=2**20)
GPU = make_profile()
CPU = make_profile(gpu=False)
EXAMPLES = 300  # per source profile


def _use(doc: object) -> None:
    try:
        validate_profile(doc)  # type: ignore[arg-type]
    except ProfileError:
        return
    try:
        rates_from_profile(doc, "bfloat16")  # type: ignore[arg-type]
        plan = make_plan(SPEC, doc, REQUEST)  # type: ignore[arg-type]
    except (ProfileError, PlanError):
        return
    json.dumps(plan.to_dict(), allow_nan=False)
    assert all(v is None or v >= 0 for v in plan.bounds.to_dict().values())
    with contextlib.redirect_stdout(io.StringIO()):
        render(doc)  # type: ignore[arg-type]


@pytest.mark.parametrize("source", [GPU, CPU], ids=["gpu-profile", "cpu-profile"])
@property_settings(EXAMPLES)
@given(data=st.data())
def test_damaged_profiles_are_accepted_or_refused_with_profile_error(source, data):
    try:
        _use(data.draw(mutated(source)))
    except HetegenError as exc:  # only the two documented kinds may escape _use
        raise AssertionError(f"unexpected {type(exc).__name__}: {exc.message}") from exc


def test_the_undamaged_profiles_give_plans():
    for doc in (GPU, CPU):
        validate_profile(doc)
        assert make_plan(SPEC, doc, REQUEST).placements
