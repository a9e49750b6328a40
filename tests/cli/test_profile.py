"""`hetegen profile` through the CLI: --json, tables, options, output paths, errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from hetegen_cli.core import devices
from hetegen_cli.measure import profile as measure_profile
from hetegen_cli.measure import timing
from hetegen_cli.profile.document import PROFILE_KIND, PROFILE_SCHEMA_VERSION, load_profile, validate_profile
from tests.fakes import TOP_FIELDS


@pytest.fixture
def app():
    from hetegen_cli.cli.app import app

    return app


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def scaled(monkeypatch):
    """Shrink every CLI measurement (internal knob) so a run takes about a second."""
    monkeypatch.setenv(timing.SCALE_ENV, "0.05")


def test_profile_help(app, runner):
    result = runner.invoke(app, ["profile", "--help"])
    assert result.exit_code == 0
    for option in ("--quick", "--output", "--json", "--threads", "--repeat", "--no-engine-costs"):
        assert option in result.stdout


def test_quick_json_real_sizes_saved_and_printed(app, runner, hetegen_home):
    """The real --quick path (no shrinking): one JSON document, saved where documented."""
    result = runner.invoke(app, ["profile", "--quick", "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert list(doc)[:2] == ["schema_version", "kind"]
    assert all(field in doc for field in TOP_FIELDS)
    assert doc["kind"] == PROFILE_KIND and doc["schema_version"] == PROFILE_SCHEMA_VERSION
    assert doc["quick"] is True
    validate_profile(doc)
    cpu = doc["cpu"]
    assert {g["dtype"] for g in cpu["gemv"]} == {"float32", "bfloat16", "float16"}
    assert {g["tokens"] for g in cpu["gemm"]} == {128, 512}
    assert cpu["best_gemv_dtype"] in {"float32", "bfloat16", "float16"}
    assert cpu["memory_read_bytes_per_s"]["mean"] > 0
    assert all(len(g["seconds"]["samples"]) == 3 for g in cpu["gemv"])
    if not devices.cuda_available():
        assert doc["gpu"] is None
        assert doc["gpu_note"] == "no CUDA GPU: GPU measurements skipped"
        assert "no CUDA GPU" in result.stderr
    saved = hetegen_home / "profile.json"
    assert json.loads(saved.read_text()) == doc
    assert load_profile(saved) == doc


def test_table_output_to_chosen_path(app, runner, scaled, tmp_path, hetegen_home):
    target = tmp_path / "new" / "folder" / "mine.json"
    result = runner.invoke(app, ["profile", "--quick", "--output", str(target)])
    assert result.exit_code == 0, result.stderr
    assert "CPU GEMV" in result.stdout and "CPU GEMM" in result.stdout
    assert "Host" in result.stdout
    assert str(target) in result.stderr.replace("\n", "")
    assert load_profile(target)["quick"] is True
    assert not (hetegen_home / "profile.json").exists()


def test_threads_and_repeat_are_recorded(app, runner, scaled, tmp_path):
    target = tmp_path / "p.json"
    result = runner.invoke(
        app, ["profile", "--quick", "--json", "--threads", "1", "--repeat", "2", "-o", str(target)]
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["cpu"]["threads"] == 1
    assert all(g["threads"] == 1 for g in doc["cpu"]["gemv"] + doc["cpu"]["gemm"])
    assert all(len(g["seconds"]["samples"]) == 2 for g in doc["cpu"]["gemv"])


@pytest.mark.parametrize("option", ["--threads", "--repeat"])
def test_counts_below_one_are_usage_errors(app, runner, option):
    result = runner.invoke(app, ["profile", "--quick", option, "0"])
    assert result.exit_code == 2
    assert result.stdout == ""


def test_output_under_a_regular_file_fails_before_measuring(app, runner, tmp_path, monkeypatch):
    monkeypatch.setattr(measure_profile, "run_profile", lambda **_: pytest.fail("measured anyway"))
    tmp_path = tmp_path / "work"
    tmp_path.mkdir()
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = runner.invoke(app, ["profile", "--quick", "--json", "--output", str(blocker / "p.json")])
    assert result.exit_code == 1
    assert "Error:" in result.stderr and "Hint:" in result.stderr
    assert result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    assert blocker.read_text() == "x"


def test_output_that_is_a_directory_fails(app, runner, tmp_path, monkeypatch):
    monkeypatch.setattr(measure_profile, "run_profile", lambda **_: pytest.fail("measured anyway"))
    tmp_path = tmp_path / "work"
    folder = tmp_path / "out"
    folder.mkdir(parents=True)
    result = runner.invoke(app, ["profile", "--quick", "--output", str(folder)])
    assert result.exit_code == 1
    assert "Error:" in result.stderr and "directory" in result.stderr
    assert list(folder.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_bad_scale_knob_is_a_handled_error(app, runner, monkeypatch, hetegen_home):
    monkeypatch.setenv(timing.SCALE_ENV, "big")
    result = runner.invoke(app, ["profile", "--quick"])
    assert result.exit_code == 1
    assert "Error:" in result.stderr
    assert not (hetegen_home / "profile.json").exists()


# --- the engine's fixed costs: measured after the profile is saved ------------------------


def test_engine_cost_failure_keeps_the_saved_profile_and_records_the_error(
    app, runner, scaled, tmp_path, monkeypatch
):
    """The profile is on disk before the engine's costs are measured; their failure is
    recorded in it (type, message, traceback tail), with a one-line warning and exit 0."""
    from hetegen_cli.measure import engine_costs

    target = tmp_path / "p.json"
    seen = {}

    def failing(*, threads, quick, gpu_backend=None):
        seen["on_disk"] = load_profile(target)  # saved (and valid) before this starts
        seen["threads"], seen["quick"] = threads, quick
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")

    monkeypatch.setattr(engine_costs, "measure_for_profile", failing)
    result = runner.invoke(app, ["profile", "--quick", "--json", "--threads", "1", "-o", str(target)])
    assert result.exit_code == 0, result.stderr
    assert seen["on_disk"]["engine"] is None and "engine_error" not in seen["on_disk"]
    assert seen["threads"] == 1 and seen["quick"] is True
    doc = json.loads(result.stdout)
    assert doc["engine"] is None
    error = doc["engine_error"]
    assert error["type"] == "RuntimeError"
    assert error["message"].startswith("CUDA error: an illegal memory access")
    assert 1 < len(error["traceback"]) <= 15
    assert "in failing" in "\n".join(error["traceback"])
    assert error["traceback"][-2:] == [
        "RuntimeError: CUDA error: an illegal memory access was encountered",
        "more detail",
    ]
    saved = load_profile(target)
    assert saved == doc
    warnings = [line for line in result.stderr.splitlines() if "Warning:" in line and "busy" not in line]
    assert len(warnings) == 1 and "RuntimeError" in warnings[0] and "more detail" not in result.stderr
    assert "Traceback" not in result.stderr


def test_engine_costs_rewrite_the_saved_profile(app, runner, scaled, tmp_path, monkeypatch):
    from hetegen_cli.measure import engine_costs
    from tests.plan.engine_fakes import engine_section

    target = tmp_path / "p.json"
    monkeypatch.setattr(engine_costs, "measure_for_profile", lambda **_: engine_section(devices=("cpu",)))
    result = runner.invoke(app, ["profile", "--quick", "-o", str(target)])
    assert result.exit_code == 0, result.stderr
    saved = load_profile(target)
    assert saved["engine"] == engine_section(devices=("cpu",))
    assert "engine_error" not in saved
    assert "Engine fixed costs" in result.stdout


def test_an_invalid_engine_section_is_an_engine_error_not_a_lost_profile(
    app, runner, scaled, tmp_path, monkeypatch
):
    from hetegen_cli.measure import engine_costs
    from tests.plan.engine_fakes import engine_section

    bad = engine_section(devices=("cpu",))
    bad["entries"][0]["decode"][0]["layer_s"] = float("nan")
    monkeypatch.setattr(engine_costs, "measure_for_profile", lambda **_: bad)
    target = tmp_path / "p.json"
    result = runner.invoke(app, ["profile", "--quick", "-o", str(target)])
    assert result.exit_code == 0, result.stderr
    saved = load_profile(target)
    assert saved["engine"] is None and saved["engine_error"]["type"] == "ProfileError"
    assert "layer_s" in saved["engine_error"]["message"]
    assert "not measured (ProfileError" in result.stdout


def test_no_engine_costs_skips_them(app, runner, scaled, tmp_path, monkeypatch):
    from hetegen_cli.measure import engine_costs

    monkeypatch.setattr(engine_costs, "measure_for_profile", lambda **_: pytest.fail("measured anyway"))
    target = tmp_path / "p.json"
    result = runner.invoke(app, ["profile", "--quick", "--json", "--no-engine-costs", "-o", str(target)])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["engine"] is None and "engine_error" not in doc
    assert load_profile(target) == doc


# --- the schema: load / save / validate ----------------------------------------------------


def test_a_profile_measured_on_a_busy_machine_says_so_and_so_do_its_users(tmp_path, monkeypatch):
    """The busy signs are recorded in the document; loading it for plan, run or bench warns."""
    from hetegen_cli.measure.profile import gemv_relative_sd, load_or_measure
    from hetegen_cli.profile.document import assess_busy, busy_warning, save_profile
    from tests.fakes import make_profile

    idle = assess_busy(0.3, 1.0, 0.02, 8)
    assert idle == {**idle, "busy": False, "reasons": []}
    busy = assess_busy(7.5, 40.0, 0.3, 8)
    assert busy["busy"] and len(busy["reasons"]) == 3
    assert assess_busy(None, None, 0.2, 2)["reasons"] == ["CPU GEMV repeats spread 20% (median sd / mean)"]
    cpu = {"gemv": [{"seconds": {"mean": 1.0, "sd": sd}} for sd in (0.01, 0.3, 0.02)]}
    assert gemv_relative_sd(cpu) == 0.02
    doc = {**make_profile(), "busy": busy}
    path = save_profile(doc, tmp_path / "busy.json")
    said = []
    monkeypatch.setattr("hetegen_cli.measure.profile.warn", said.append)
    load_or_measure(path)
    assert said == [busy_warning(doc, path)] and "load average 7.5" in said[0]
    save_profile({**doc, "busy": idle}, path)
    said.clear()
    load_or_measure(path)
    assert said == []
