"""`hetegen profile`: the CLI contract, the profile schema, and deterministic measurements."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
from typer.testing import CliRunner

from hetegen_cli import devices, hardware, profile_doc
from hetegen_cli.errors import ProfileError
from hetegen_cli.profile_doc import (PROFILE_KIND, PROFILE_SCHEMA_VERSION, load_profile,
                                     save_profile, stats, validate_profile)

#: QUICK shrunk 20x: shapes like 208x208, pools of a few hundred KiB (runs in about a second).
TINY = hardware.QUICK.scaled(0.05)
TICK = 0.25  # a power of two: differences of multiples are exact in binary floating point
TOP_FIELDS = ("schema_version", "kind", "hetegen_version", "created_utc", "quick", "host",
              "cpu", "gpu", "gpu_note")


@pytest.fixture
def app():
    from hetegen_cli.cli import app

    return app


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def scaled(monkeypatch):
    """Shrink every CLI measurement (internal knob) so a run takes about a second."""
    monkeypatch.setenv(hardware.SCALE_ENV, "0.05")


def fake_timer(tick: float = TICK):
    """A clock that advances `tick` seconds per reading."""
    counter = itertools.count()
    return lambda: next(counter) * tick


def tiny_profile(**kwargs) -> dict:
    return hardware.run_profile(quick=True, sizes=TINY, timer=fake_timer(), **kwargs)


# --- CLI ----------------------------------------------------------------------------------

def test_profile_help(app, runner):
    result = runner.invoke(app, ["profile", "--help"])
    assert result.exit_code == 0
    for option in ("--quick", "--output", "--json", "--threads", "--repeat"):
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
    result = runner.invoke(app, ["profile", "--quick", "--json", "--threads", "1",
                                 "--repeat", "2", "-o", str(target)])
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
    monkeypatch.setattr(hardware, "run_profile", lambda **_: pytest.fail("measured anyway"))
    tmp_path = tmp_path / "work"
    tmp_path.mkdir()
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = runner.invoke(app, ["profile", "--quick", "--json",
                                 "--output", str(blocker / "p.json")])
    assert result.exit_code == 1
    assert "Error:" in result.stderr and "Hint:" in result.stderr
    assert result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    assert blocker.read_text() == "x"


def test_output_that_is_a_directory_fails(app, runner, tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "run_profile", lambda **_: pytest.fail("measured anyway"))
    tmp_path = tmp_path / "work"
    folder = tmp_path / "out"
    folder.mkdir(parents=True)
    result = runner.invoke(app, ["profile", "--quick", "--output", str(folder)])
    assert result.exit_code == 1
    assert "Error:" in result.stderr and "directory" in result.stderr
    assert list(folder.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_bad_scale_knob_is_a_handled_error(app, runner, monkeypatch, hetegen_home):
    monkeypatch.setenv(hardware.SCALE_ENV, "big")
    result = runner.invoke(app, ["profile", "--quick"])
    assert result.exit_code == 1
    assert "Error:" in result.stderr
    assert not (hetegen_home / "profile.json").exists()


# --- the schema: load / save / validate ----------------------------------------------------

@pytest.fixture(scope="module")
def good_doc() -> dict:
    return tiny_profile()


def _write(path, text: str):
    path.write_text(text)
    return path


def test_load_refuses_corrupt_json(tmp_path):
    with pytest.raises(ProfileError) as info:
        load_profile(_write(tmp_path / "p.json", '{"schema_version": 1, "kind": '))
    assert "hetegen profile" in info.value.hint


def test_load_refuses_missing_file(tmp_path):
    with pytest.raises(ProfileError):
        load_profile(tmp_path / "absent.json")


def test_load_refuses_wrong_kind(tmp_path, good_doc):
    doc = dict(good_doc, kind="hetegen.plan")
    with pytest.raises(ProfileError, match="hetegen.profile"):
        load_profile(_write(tmp_path / "p.json", json.dumps(doc)))


def test_load_refuses_unknown_schema_version(tmp_path, good_doc):
    doc = dict(good_doc, schema_version=99)
    with pytest.raises(ProfileError, match="99") as info:
        load_profile(_write(tmp_path / "p.json", json.dumps(doc)))
    assert "hetegen profile" in info.value.hint


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["cpu"].pop("best_gemv_dtype"), "cpu.best_gemv_dtype"),
    (lambda d: d["cpu"]["gemv"][1].update(weight_bytes_per_s="fast"),
     "cpu.gemv[1].weight_bytes_per_s"),
    (lambda d: d["cpu"]["gemm"][0].update(flops_per_s=0), "cpu.gemm[0].flops_per_s"),
    (lambda d: d["host"].update(physical_cores=True), "host.physical_cores"),
    (lambda d: d.update(gpu=[]), "gpu"),
    (lambda d: d["cpu"]["memory_read_bytes_per_s"].pop("sd"), "cpu.memory_read_bytes_per_s.sd"),
    (lambda d: d["cpu"].update(best_gemv_dtype="int4"), "cpu.best_gemv_dtype"),
])
def test_load_names_the_bad_field(tmp_path, good_doc, mutate, field):
    doc = copy.deepcopy(good_doc)
    mutate(doc)
    with pytest.raises(ProfileError, match=field.replace("[", r"\[").replace("]", r"\]")):
        load_profile(_write(tmp_path / "p.json", json.dumps(doc)))


def test_save_then_load_round_trip(tmp_path, good_doc):
    path = save_profile(good_doc, tmp_path / "sub" / "p.json")
    assert load_profile(path) == json.loads(json.dumps(good_doc))


def test_save_refuses_an_invalid_document_and_writes_nothing(tmp_path, good_doc):
    doc = copy.deepcopy(good_doc)
    doc["cpu"]["gemv"] = []
    with pytest.raises(ProfileError, match="cpu.gemv"):
        save_profile(doc, tmp_path / "out" / "p.json")
    assert not (tmp_path / "out").exists()


# --- measurements with an injected timer ---------------------------------------------------

def test_stats_helper():
    assert stats([1.0, 2.0, 3.0]) == {"mean": 2.0, "sd": 1.0, "samples": [1.0, 2.0, 3.0]}
    assert stats([0.5]) == {"mean": 0.5, "sd": 0.0, "samples": [0.5]}
    with pytest.raises(ValueError):
        stats([])


def test_measure_warms_up_and_batches_short_calls():
    calls = []
    sec = hardware.measure(lambda: calls.append(1), hardware.HostClock(fake_timer(0.001)),
                           repeat=3, warmup=2, min_sample_s=0.004)
    # 1 untimed warm-up + 1 timed calibration call (0.001 s) -> 4 calls per sample
    assert sec["calls_per_sample"] == 4
    assert len(calls) == 1 + 1 + 3 * 4
    assert sec["samples"] == pytest.approx([0.00025] * 3)
    assert sec["sd"] == pytest.approx(0.0, abs=1e-12)


def test_injected_timer_gives_a_deterministic_document():
    first, second = tiny_profile(), tiny_profile()
    assert first["cpu"] == second["cpu"]
    cpu = first["cpu"]
    for g in cpu["gemv"]:
        assert g["seconds"] == {"mean": TICK, "sd": 0.0, "samples": [TICK] * TINY.repeat,
                                "calls_per_sample": 1}
        assert g["weight_bytes_per_s"] == g["weight_bytes"] / TICK
        assert g["params_per_s"] == g["out_features"] * g["in_features"] / TICK
        assert g["pool_copies"] >= 2
    for g in cpu["gemm"]:
        assert g["flops_per_s"] == 2 * g["tokens"] * g["out_features"] * g["in_features"] / TICK
    mem = cpu["memory_read_bytes_per_s"]
    assert mem["samples"] == [mem["buffer_bytes"] / TICK] * TINY.repeat
    assert cpu["thread_sweep"] == []  # quick sizes skip the sweep


def test_thread_sweep_covers_one_half_and_all_cores():
    assert hardware.sweep_threads(8, 16) == [1, 8, 16]
    assert hardware.sweep_threads(2, 2) == [1, 2]
    doc = hardware.run_profile(quick=False, threads=1, timer=fake_timer(),
                               sizes=hardware.replace(TINY, thread_sweep=True))
    counts = {s["threads"] for s in doc["cpu"]["thread_sweep"]}
    assert counts == set(hardware.sweep_threads(1, doc["host"]["physical_cores"]))
    validate_profile(doc)


def test_random_data_is_never_all_zero():
    import torch

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = hardware.random_tensor((1 << 22) + 5, dtype)
        assert t.dtype == dtype and t.numel() == (1 << 22) + 5
        assert t.abs().max() > 0.5 and (t == 0).float().mean() < 0.01


def test_gpu_section_on_the_cpu_stand_in(capsys):
    """The GPU code path (copies, concurrency, tables) run on devices.CpuBackend."""
    from hetegen_cli.cli_profile import render

    doc = tiny_profile(gpu_backend=devices.CpuBackend())
    validate_profile(doc)
    gpu = doc["gpu"]
    assert doc["gpu_note"] is None
    kinds = {(t["direction"], t["memory"]) for t in gpu["transfers"]}
    assert kinds == {("h2d", "pinned"), ("h2d", "pageable"), ("d2h", "pinned"),
                     ("d2h", "pageable")}
    assert len(gpu["transfers"]) == 4 * len(TINY.transfer_sizes)
    assert {g["dtype"] for g in gpu["gemm"]} == {"float16", "bfloat16"}
    assert gpu["concurrent"]["dtype"] == doc["cpu"]["best_gemv_dtype"]
    render(doc)
    out = capsys.readouterr().out
    assert "Host <-> GPU copies" in out and "Concurrency" in out


@pytest.mark.cuda
def test_real_gpu_profile_tiny():
    doc = hardware.run_profile(quick=True, sizes=TINY)
    validate_profile(doc)
    assert doc["gpu"] is not None and doc["gpu"]["total_memory_bytes"] > 0
    assert all(t["bytes_per_s"] > 0 for t in doc["gpu"]["transfers"])


def test_default_threads_leave_a_core_for_the_gpu_launcher():
    from hetegen_cli.hardware import default_threads

    assert default_threads(2, has_gpu=False) == 2
    assert default_threads(16, has_gpu=False) == 16
    assert default_threads(16, has_gpu=True) == 15
    assert default_threads(2, has_gpu=True) == 2
