"""`run --json` puts the prediction beside the measurement, per phase (run.predicted)."""

from __future__ import annotations

import json

import pytest

from hetegen_cli.profile.document import save_profile
from tests.fakes import GB, make_profile
from tests.helpers import cli
from tests.plan.engine_fakes import with_engine


def _profile(path, engine=True):
    doc = make_profile(gpu=False, threads=1, cpu_dtypes={"float32": 10 * GB}, best="float32")
    save_profile(with_engine(doc) if engine else doc, path)
    return path


def _run(tiny_llama_dir, *extra):
    result = cli("run", "--model", str(tiny_llama_dir), "-p", "Hello there", "-n", "4", "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_a_plain_cpu_run_reports_predicted_and_measured_per_phase(tiny_llama_dir, hetegen_home):
    _profile(hetegen_home / "profile.json")
    doc = _run(tiny_llama_dir, "--dtype", "float32")
    pred = doc["prediction"]
    assert pred["strategy"] == "cpu_only" and pred["device"] == "cpu" and pred["engine"] == "plain"
    assert pred["profile"]["sha256"] and not pred["calibrated"]
    t = doc["timings"]
    measured = {"prefill": t["prefill_s"], "decode": t["decode_s"] / t["decode_steps"]}
    for phase in ("prefill", "decode"):
        p = pred["phases"][phase]
        assert p["measured_s"] == pytest.approx(measured[phase])
        assert p["ratio"] == pytest.approx(p["measured_s"] / p["predicted_s"])
        assert p["predicted_s"] == pytest.approx(p["linear_s"] + p["fixed_s"])
        assert p["fixed_s"] > 0 and p["fixed_uncalibrated_s"] == p["fixed_s"]
    rate = pred["decode_tokens_per_s"]
    assert rate["measured"] == pytest.approx(t["decode_tokens_per_s"])
    assert rate["error"] == pytest.approx(rate["measured"] / rate["predicted"] - 1)


def test_a_run_calibrates_its_profile(tiny_llama_dir, hetegen_home, tmp_path):
    """run --json, then hetegen calibrate with it: the next run predicts the measured time of the
    first for its fixed part (the factor fits that run exactly)."""
    _profile(hetegen_home / "profile.json")
    first = tmp_path / "run.json"
    first.write_text(json.dumps(_run(tiny_llama_dir, "--dtype", "float32")))
    result = cli("calibrate", str(first), "--json")
    assert result.exit_code == 0, result.output
    cal = json.loads(result.stdout)
    assert (hetegen_home / "profile.calibration.json").is_file()
    again = _run(tiny_llama_dir, "--dtype", "float32")["prediction"]
    assert again["calibrated"]
    for phase in ("prefill", "decode"):
        p = again["phases"][phase]
        k = cal["factors"]["cpu"][phase]
        assert p["fixed_s"] == pytest.approx(k * p["fixed_uncalibrated_s"])


def test_without_a_profile_the_run_says_why_there_is_no_prediction(tiny_llama_dir, hetegen_home):
    doc = _run(tiny_llama_dir, "--dtype", "float32")
    assert "no profile" in doc["prediction"]["reason"]
    assert not (hetegen_home / "profile.json").exists()  # none is measured for it


def test_a_gpu_plan_on_the_stand_in_is_predicted_as_the_stand_in_runs_it(
    tiny_llama_dir, hetegen_home, tmp_path
):
    from hetegen_cli.models.loading.source import resolve_model
    from hetegen_cli.plan.document import RuntimeSettings, save_plan
    from hetegen_cli.plan.manual import manual_plan

    _profile(hetegen_home / "profile.json")
    spec = resolve_model(str(tiny_llama_dir), need_weights=False).spec
    runtime = RuntimeSettings(
        weights_dtype=spec.dtype, cpu_dtype_prefill="float32", cpu_dtype_decode="float32"
    )
    plan = manual_plan(spec, cpu_fraction_prefill=0.0, cpu_fraction_decode=0.5, runtime=runtime)
    path = tmp_path / "plan.json"
    save_plan(plan, path)
    doc = _run(tiny_llama_dir, "--plan", str(path), "--device", "cpu")
    pred = doc["prediction"]
    assert pred["strategy"] == "hetegen on the CPU stand-in" and pred["device"] == "cpu"
    assert pred["phases"]["decode"]["fixed_s"] > 0
