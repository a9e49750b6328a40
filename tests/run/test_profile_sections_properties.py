"""Every optional profile section may be missing (an older profile, a machine without a GPU, a
failed engine-cost measurement): each place that reads one handles its absence. Planning,
`run`'s prediction and `bench`'s prediction either work or refuse with hetegen's own error,
never a KeyError or a TypeError (issue 19)."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from hetegen_cli.core.errors import HetegenError
from hetegen_cli.models.architecture.spec import spec_from_config
from hetegen_cli.models.shapes.presets import preset_config
from hetegen_cli.plan.request import PlanRequest
from hetegen_cli.plan.solver import make_plan
from hetegen_cli.run.predicted import predict_run
from tests.fakes import GB, make_profile
from tests.mutations import property_settings
from tests.plan.engine_fakes import with_engine

GiB = 2**30
#: (path of the section, as keys) that a valid profile may lack
OPTIONAL = (("cpu", "quant_gemv"), ("gpu", "copy_engine_probe"), ("gpu",), ("engine",))


def _full_profile() -> dict:
    profile = make_profile(
        best="bfloat16",
        cpu_dtypes={"bfloat16": 20 * GB, "float16": 15 * GB, "float32": 30 * GB},
        quant_bw={"int8": 16 * GB, "int4": 16 * GB},
        free=8 * GiB,
        total=8 * GiB,
    )
    profile["gpu"]["copy_engine_probe"] = {
        "small_copy_alone_s": 1e-5,
        "small_copy_during_big_s": 1e-2,
        "big_copy_s": 1e-2,
        "h2d_copy_engines": 1,
    }
    return with_engine(profile)


def _drop(profile: dict, paths: list[tuple[str, ...]]) -> dict:
    out = copy.deepcopy(profile)
    for path in paths:
        node = out
        for key in path[:-1]:
            node = node.get(key) or {}
        if isinstance(node, dict) and path == ("gpu",):
            node["gpu"] = None  # a machine without a GPU
        elif isinstance(node, dict):
            node.pop(path[-1], None)
    return out


@property_settings(60)
@given(dropped=st.lists(st.sampled_from(OPTIONAL), unique=True), quant=st.sampled_from([None, "int4"]))
def test_plan_and_predictions_work_or_refuse_cleanly_without_optional_sections(
    tmp_path_factory, dropped, quant
):
    profile = _drop(_full_profile(), dropped)
    spec = spec_from_config(preset_config("opt-125m"), "opt-125m", "float16")
    if quant is not None:
        spec = replace(spec, dtype="bfloat16").quantized(quant, 32)
    req = PlanRequest(prompt_len=64, max_new_tokens=8, gpu_budget_bytes=2 * GiB, cpu_budget_bytes=16 * GiB)
    try:
        plan = make_plan(spec, profile, req)
    except HetegenError:
        plan = None
    if not dropped:
        assert plan is not None
    path = tmp_path_factory.mktemp("profile") / "profile.json"
    path.write_text(json.dumps(profile))
    for backend in ("cuda", "strict-cpu", "cpu"):
        for use in (plan, None):
            result = predict_run(
                spec,
                engine="hetegen" if use is not None else "plain",
                device="cuda" if backend == "cuda" else "cpu",
                dtype=spec.dtype,
                plan=use,
                backend_name=backend,
                prompt_tokens=64,
                generated_tokens=8,
                prefill_s=0.1,
                decode_s=0.8,
                decode_steps=8,
                profile_path=path,
            )
            assert isinstance(result, dict)
            assert "reason" in result or "decode_tokens_per_s" in json.dumps(result)
            if not dropped and use is not None and backend != "cpu":
                assert "reason" not in result, result  # the full profile predicts


def test_the_full_profile_plans_and_predicts(tmp_path):
    """The property above is not vacuous: with every section, there is a plan and a prediction."""
    test_plan_and_predictions_work_or_refuse_cleanly_without_optional_sections.hypothesis.inner_test(
        tmp_path_factory=type("F", (), {"mktemp": lambda self, name: tmp_path})(), dropped=[], quant="int4"
    )
