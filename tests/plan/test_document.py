"""The plan document: save, load, validation of hand-edited files, matching a model, manual
plans, row rounding (pure)."""

from __future__ import annotations

import json

import pytest

from hetegen_cli.core.errors import PlanError
from hetegen_cli.models.architecture.spec import spec_from_config
from hetegen_cli.models.shapes.presets import preset_config
from hetegen_cli.plan import solver
from hetegen_cli.plan.document import Plan, RuntimeSettings, check_plan_matches, round_rows, save_plan
from hetegen_cli.plan.load import load_plan, plan_from_dict
from hetegen_cli.plan.manual import manual_plan
from hetegen_cli.plan.memory import workspace_bytes
from hetegen_cli.plan.request import PlanRequest
from tests.fakes import make_profile

MiB, GiB = 2**20, 2**30


def spec(name: str = "opt-125m"):
    return spec_from_config(preset_config(name), name)


def request(**over) -> PlanRequest:
    base = dict(
        prompt_len=512, max_new_tokens=64, batch_size=1, reserve_bytes=64 * MiB, cpu_budget_bytes=64 * GiB
    )
    base.update(over)
    return PlanRequest(**base)


def gpu_sum(plan: Plan) -> int:
    return sum(v or 0 for k, v in plan.memory.gpu.to_dict().items() if k != "total_bytes")


def minimum(sp, req) -> int:
    lins = list(sp.linears) + ([] if sp.tie_word_embeddings else [sp.lm_head])
    return (
        req.reserve_bytes
        + sp.fixed_bytes
        + sp.kv_cache_bytes(req.prompt_len + req.max_new_tokens, req.batch_size)
        + workspace_bytes(sp, req)
        + max(lin.weight_bytes for lin in lins)
    )


# --- plan files ----------------------------------------------------------------------------


@pytest.fixture()
def saved(tmp_path):
    sp = spec()
    plan = solver.make_plan(sp, make_profile(), request(gpu_budget_bytes=minimum(sp, request()) + 20 * MiB))
    path = tmp_path / "plan.json"
    save_plan(plan, path)
    return sp, plan, path


def test_plan_file_round_trips(saved):
    sp, plan, path = saved
    loaded = load_plan(path)
    assert loaded == plan
    assert loaded.to_dict() == plan.to_dict()
    doc = json.loads(path.read_text())
    assert list(doc)[:2] == ["schema_version", "kind"] and doc["kind"] == "hetegen.plan"
    entry = doc["linears"][0]
    for key in (
        "name",
        "layer_index",
        "role",
        "shape",
        "resident",
        "cpu_fraction_prefill",
        "cpu_fraction_decode",
        "cpu_rows_prefill",
        "cpu_rows_decode",
        "prefill",
        "decode",
    ):
        assert key in entry
    assert set(entry["decode"]) == {"cpu_s", "transfer_s", "gpu_s", "layer_s"}
    check_plan_matches(loaded, sp)


def _edit(path, fn):
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d["linears"][3].update(cpu_fraction_decode=1.5), "cpu_fraction_decode"),
        (lambda d: d["linears"][3].update(cpu_rows_decode=-16), "cpu_rows_decode"),
        (
            lambda d: d["linears"][3].update(cpu_rows_decode=d["linears"][3]["cpu_rows_decode"] + 64),
            "disagree",
        ),
        (lambda d: d["memory"]["gpu"].update(kv_cache_bytes=-1), "kv_cache_bytes"),
        (lambda d: d["linears"][0].pop("shape"), "shape"),
        (lambda d: d["runtime"].update(cpu_dtype_decode="int4"), "cpu_dtype_decode"),
        # the typed sections (plan.sections) validate what the planner wrote with them
        (lambda d: d["predictions"]["hetegen"].update(decode_tokens_per_s="fast"), "decode_tokens_per_s"),
        (lambda d: d["predictions"]["offload"].update(gpu_memory_bytes=1.5), "gpu_memory_bytes"),
        (lambda d: d["budget"].update(gpu_budget_bytes=-5), "gpu_budget_bytes"),
        (lambda d: d["bounds"].pop("bound_s_per_token"), "bound_s_per_token"),
        (lambda d: d["cpu_formats"].update(decode="int3"), "decode"),
    ],
)
def test_load_plan_rejects_hand_broken_values(saved, edit, match):
    _, _, path = saved
    _edit(path, edit)
    with pytest.raises(PlanError, match=match) as info:
        load_plan(path)
    assert "hetegen plan" in info.value.hint


def test_load_plan_rejects_future_versions_and_corrupt_files(saved, tmp_path):
    _, _, path = saved
    _edit(path, lambda d: d.update(schema_version=3))
    with pytest.raises(PlanError, match="schema_version") as info:
        load_plan(path)
    assert "hetegen plan" in info.value.hint
    broken = tmp_path / "broken.json"
    broken.write_text('{"schema_version": 1, "kind": "hetegen.plan", "linears": [')
    with pytest.raises(PlanError, match=r"not valid JSON: .* at line 1 column 59"):
        load_plan(broken)


def test_schema_1_plans_load_with_one_cpu_dtype_for_both_phases(saved):
    _, plan, path = saved

    def downgrade(d):
        d["schema_version"] = 1
        rt = d["runtime"]
        rt["cpu_dtype"] = rt.pop("cpu_dtype_prefill")
        del rt["cpu_dtype_decode"]
        d.pop("cpu_formats")

    _edit(path, downgrade)
    old = load_plan(path)
    assert old.runtime.cpu_dtypes == (plan.runtime.cpu_dtype_prefill,) * 2
    assert old.placements == plan.placements


def test_check_plan_matches_refuses_another_model(saved):
    _, plan, _ = saved
    with pytest.raises(PlanError, match="plan was made for model opt-125m"):
        check_plan_matches(plan, spec("opt-350m"))


def test_manual_plan_from_floats_and_dicts():
    sp = spec("llama-2-7b")
    q0 = sp.linears[0].name
    plan = manual_plan(
        sp,
        cpu_fraction_prefill=0.0,
        cpu_fraction_decode={q0: 0.5},
        resident=[sp.linears[1].name],
        runtime=RuntimeSettings(weights_dtype="float16", lm_head_on_gpu=False),
    )
    assert plan.placement(q0).cpu_rows_decode == 2048
    assert plan.placement(sp.linears[1].name).resident
    assert plan.placements[-1].name == "lm_head"
    assert plan_from_dict(plan.to_dict()) == plan
    check_plan_matches(plan, sp)
    with pytest.raises(ValueError):
        manual_plan(sp, cpu_fraction_prefill={"nope": 1.0}, cpu_fraction_decode=0.0)


def test_round_rows_keeps_whole_layer_exact_for_odd_widths():
    assert round_rows(1.0, 136) == 136  # would round to 128 on the 16-row grid
    assert round_rows(0.0, 136) == 0
    assert round_rows(0.5, 136) % 16 == 0


@pytest.mark.parametrize("fraction", [1.2, -0.2])
def test_a_fraction_outside_zero_one_is_refused_even_where_rows_round_to_a_valid_count(saved, fraction):
    """On a 2-row linear, 1.2 x 2 rounds to 2 rows and -0.2 x 2 to 0: only the bound on the
    fraction itself catches them."""
    _, _, path = saved

    def edit(doc):
        entry = doc["linears"][0]
        entry.update(shape=[2, entry["shape"][1]], resident=False, cpu_fraction_decode=fraction)
        entry.update(cpu_rows_decode=round(fraction * 2), cpu_fraction_prefill=0.0, cpu_rows_prefill=0)

    _edit(path, edit)
    with pytest.raises(PlanError, match="cpu_fraction_decode"):
        load_plan(path)


def test_a_runtime_setting_is_defined_once_and_round_trips(saved, tmp_path):
    """The runtime section is written from RuntimeSettings' fields and read back through their
    types: a non-default value of every field survives a save and a load, and a field the
    document lacks is refused unless the field is marked as added later."""
    from dataclasses import fields, replace

    from hetegen_cli.plan.document import runtime_to_dict
    from hetegen_cli.plan.load import RuntimeDoc

    _, plan, _ = saved
    names = [f.name for f in fields(RuntimeSettings)]
    assert list(RuntimeDoc.model_fields) == names == list(runtime_to_dict(plan.runtime))
    changed = replace(
        plan.runtime,
        cpu_threads=3,
        staging_buffers=3,
        prefetch_depth=2,
        pin_weights=False,
        copy_engines=2,
        extra={"note": "x"},
    )
    path = save_plan(replace(plan, runtime=changed), tmp_path / "changed.json")
    assert load_plan(path).runtime == changed and load_plan(path).runtime.extra == {"note": "x"}
    for name in ("cpu_threads", "copy_engines"):
        doc = json.loads(path.read_text())
        del doc["runtime"][name]
        path.write_text(json.dumps(doc))
        if name == "copy_engines":  # added later: older plans load with its default
            assert load_plan(path).runtime.copy_engines == 1
        else:
            with pytest.raises(PlanError, match=r"runtime\.cpu_threads"):
                load_plan(path)
            path = save_plan(replace(plan, runtime=changed), tmp_path / "changed.json")
