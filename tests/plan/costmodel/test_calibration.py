"""Calibration of the fixed terms from real runs (plan.costmodel.calibration, `hetegen calibrate`)."""

from __future__ import annotations

import json

import pytest

from hetegen_cli.core.errors import InputError
from hetegen_cli.models.architecture.spec import spec_from_config
from hetegen_cli.models.shapes.presets import preset_config
from hetegen_cli.plan.costmodel import calibration as cal
from hetegen_cli.plan.request import PlanRequest
from hetegen_cli.plan.solver import make_plan
from hetegen_cli.profile.document import identity, save_profile
from tests.fakes import GB, make_profile
from tests.helpers import assert_error, cli
from tests.plan.engine_fakes import with_engine


def _run_doc(who: dict, prefill: tuple, decode: tuple, device: str = "cpu") -> dict:
    """A `run --json` document's prediction: (measured, linear, fixed) per phase."""
    phases = {
        phase: {
            "measured_s": m,
            "linear_s": lin,
            "fixed_s": f,
            "fixed_uncalibrated_s": f,
            "predicted_s": lin + f,
        }
        for phase, (m, lin, f) in (("prefill", prefill), ("decode", decode))
    }
    return {
        "schema_version": 1,
        "kind": "hetegen.run",
        "prediction": {
            "device": device,
            "profile": {k: who[k] for k in ("sha256", "cpu_model")},
            "phases": phases,
        },
    }


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "profile.json"
    save_profile(with_engine(make_profile(gpu=False, cpu_dtypes={"float32": 20 * GB}, best="float32")), path)
    doc = json.loads(path.read_text())
    return path, doc, identity(doc, path)


def test_factors_are_the_least_squares_scale_of_the_fixed_part(saved):
    _, _, who = saved
    records = cal.records_of(_run_doc(who, (1.0, 0.4, 0.3), (0.05, 0.02, 0.01)), "a.json", who)
    records += cal.records_of(_run_doc(who, (2.0, 0.8, 0.6), (0.06, 0.02, 0.02)), "b.json", who)
    factors = cal.fit_factors(records)
    assert factors["cpu"]["prefill"] == pytest.approx(2.0)  # (1 - .4)/.3 and (2 - .8)/.6
    # decode: sum f (m - l) / sum f^2 = (.01 * .03 + .02 * .04) / (.01^2 + .02^2)
    assert factors["cpu"]["decode"] == pytest.approx((0.01 * 0.03 + 0.02 * 0.04) / (0.01**2 + 0.02**2))
    assert "cuda" not in factors


def test_runs_of_another_profile_or_kind_are_refused(saved):
    _, _, who = saved
    other = dict(who, sha256="0" * 64)
    with pytest.raises(InputError, match="another version of the profile"):
        cal.records_of(_run_doc(other, (1, 0.5, 0.2), (0.1, 0.05, 0.01)), "x.json", who)
    stranger = dict(other, cpu_model="Some Other CPU")
    with pytest.raises(InputError, match="Some Other CPU"):
        cal.records_of(_run_doc(stranger, (1, 0.5, 0.2), (0.1, 0.05, 0.01)), "x.json", who)
    with pytest.raises(InputError, match="not a `hetegen run --json`"):
        cal.records_of({"kind": "hetegen.plan"}, "p.json", who)
    with pytest.raises(InputError, match="no prediction"):
        cal.records_of({"kind": "hetegen.run", "prediction": None}, "r.json", who)


def test_make_plan_applies_a_calibration_of_its_own_profile_only(saved):
    path, doc, who = saved
    spec = spec_from_config(preset_config("opt-1.3b"), "opt-1.3b", dtype="float32")
    req = PlanRequest(prompt_len=64, max_new_tokens=8)
    before = make_plan(spec, doc, req, who).predictions.cpu_only
    records = cal.records_of(_run_doc(who, (1.0, 0.4, 0.3), (0.05, 0.02, 0.01)), "a.json", who)
    cal.save_calibration(
        cal.build_calibration(records, who, "2026-12-01T00:00:00Z"), cal.calibration_path(path)
    )
    plan = make_plan(spec, doc, req, who)
    after = plan.predictions.cpu_only
    assert after.fixed.calibrated and any("calibrated from 1 run" in n for n in plan.notes)
    assert after.fixed.prefill_s == pytest.approx(2.0 * before.fixed.prefill_s)
    assert after.fixed.decode_s_per_token == pytest.approx(3.0 * before.fixed.decode_s_per_token)
    assert after.fixed.uncalibrated.prefill_s == pytest.approx(before.fixed.prefill_s)
    stale = make_plan(spec, doc, req, dict(who, sha256="f" * 64))  # the profile file changed
    assert not stale.predictions.cpu_only.fixed.calibrated
    assert any("made for another version of the profile" in n for n in stale.notes)


def test_plan_calibrate_writes_next_to_the_profile_and_refuses_strangers(saved, tmp_path):
    path, _, who = saved
    run = tmp_path / "run.json"
    run.write_text(json.dumps(_run_doc(who, (1.0, 0.4, 0.3), (0.05, 0.02, 0.01))))
    result = cli("calibrate", str(run), "--profile", str(path), "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["kind"] == "hetegen.calibration" and doc["factors"]["cpu"]["prefill"] == pytest.approx(2.0)
    assert json.loads(cal.calibration_path(path).read_text()) == doc
    foreign = tmp_path / "foreign.json"
    foreign.write_text(
        json.dumps(_run_doc(dict(who, sha256="1" * 64, cpu_model="Other"), (1, 0.4, 0.3), (1, 1, 1)))
    )
    assert_error(cli("calibrate", str(foreign), "--profile", str(path)), "Other", "calibrate with runs")
    plan_doc = tmp_path / "plan.json"
    plan_doc.write_text('{"kind": "hetegen.plan", "schema_version": 2}')
    assert_error(cli("calibrate", str(plan_doc), "--profile", str(path)), "not a `hetegen run --json`")
    assert_error(cli("calibrate", str(tmp_path / "missing.json")), "does not exist")
    # the old spelling still works, with a deprecation warning
    old = cli("plan", "--calibrate", str(run), "--profile", str(path), "--json")
    assert old.exit_code == 0 and json.loads(old.stdout)["factors"] == doc["factors"]
    assert "deprecated" in old.stderr and "hetegen calibrate" in old.stderr
