"""`hetegen run` executing plans through the heterogeneous engine (CPU stand-in here)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from hetegen_cli.cli import app
from hetegen_cli.model_source import resolve_model
from hetegen_cli.plan import RuntimeSettings, load_plan, manual_plan, save_plan

runner = CliRunner()
PROMPT = "The capital of France is"


def _run(*args: str):
    return runner.invoke(app, ["run", *args])


def _reference_tokens(folder) -> list[int]:
    result = _run("--model", str(folder), "--prompt", PROMPT, "-n", "6", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["engine"] == "plain"
    return doc["token_ids"]


def _split_plan(folder, tmp_path, requires_gpu=True, prefill=0.5, decode=0.25, resident=()):
    spec = resolve_model(str(folder), need_weights=True).spec
    runtime = RuntimeSettings(weights_dtype=spec.dtype, cpu_dtype="float32", cpu_threads=1,
                              staging_buffers=2, prefetch_depth=1, requires_gpu=requires_gpu)
    plan = manual_plan(spec, cpu_fraction_prefill=prefill, cpu_fraction_decode=decode,
                       resident=resident, runtime=runtime)
    return save_plan(plan, tmp_path / "plan.json")


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_opt_dir"])
def test_split_plan_on_cpu_stand_in_matches_plain_tokens(fixture, request, tmp_path):
    folder = request.getfixturevalue(fixture)
    expected = _reference_tokens(folder)
    spec = resolve_model(str(folder), need_weights=True).spec
    resident = [spec.linears[0].name, spec.linears[5].name]
    path = _split_plan(folder, tmp_path, resident=resident)
    result = _run("--model", str(folder), "--prompt", PROMPT, "-n", "6", "--json",
                  "--plan", str(path), "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["engine"] == "hetegen"
    assert doc["token_ids"] == expected
    assert doc["plan"]["split_linears"] == len(spec.linears) - 2
    assert doc["plan"]["resident_linears"] == 2
    assert doc["plan"]["backend"] == "cpu"
    stats = doc["engine_stats"]
    assert stats["split_calls"] > 0 and stats["bytes_streamed"] > 0
    assert "CPU stand-in" in result.stderr


def test_all_cpu_plan_runs_through_engine_without_gpu(tiny_llama_dir, tmp_path):
    expected = _reference_tokens(tiny_llama_dir)
    path = _split_plan(tiny_llama_dir, tmp_path, requires_gpu=False, prefill=1.0, decode=1.0)
    result = _run("--model", str(tiny_llama_dir), "--prompt", PROMPT, "-n", "6", "--json",
                  "--plan", str(path))
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["engine"] == "hetegen" and doc["token_ids"] == expected
    assert doc["engine_stats"]["bytes_streamed"] == 0


def test_gpu_plan_refused_without_cuda(tiny_llama_dir, tmp_path):
    path = _split_plan(tiny_llama_dir, tmp_path)
    result = _run("--model", str(tiny_llama_dir), "--prompt", PROMPT, "--plan", str(path))
    assert result.exit_code == 1
    assert "needs a GPU" in result.stderr and "Hint:" in result.stderr
    assert result.stdout == ""


def test_plan_for_another_model_refused(tiny_llama_dir, tiny_opt_dir, tmp_path):
    path = _split_plan(tiny_opt_dir, tmp_path)
    result = _run("--model", str(tiny_llama_dir), "--prompt", PROMPT, "--plan", str(path),
                  "--device", "cpu")
    assert result.exit_code == 1
    assert "plan was made for model" in result.stderr
    assert result.stdout == ""


def test_plan_from_plan_command_round_trips_into_run(tiny_opt_dir, tmp_path):
    """`plan` on a CPU-only profile writes an all-CPU plan that `run --plan` executes."""
    from tests.test_costmodel import make_profile

    profile = tmp_path / "profile.json"
    from hetegen_cli.profile_doc import save_profile

    save_profile(make_profile(gpu=False), profile)
    out = tmp_path / "made.json"
    made = runner.invoke(app, ["plan", "--model", str(tiny_opt_dir), "--profile", str(profile),
                               "--prompt-len", "8", "--max-new-tokens", "6", "--output", str(out)])
    assert made.exit_code == 0, made.stderr
    assert not load_plan(out).runtime.requires_gpu
    expected = _reference_tokens(tiny_opt_dir)
    result = _run("--model", str(tiny_opt_dir), "--prompt", PROMPT, "-n", "6", "--json", "--plan", str(out))
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["token_ids"] == expected


def test_gpu_memory_without_cuda_is_refused(tiny_llama_dir):
    result = _run("--model", str(tiny_llama_dir), "--prompt", PROMPT, "--gpu-memory", "1GiB")
    assert result.exit_code == 1
    assert "needs a CUDA GPU" in result.stderr


def test_plan_and_gpu_memory_conflict(tiny_llama_dir, tmp_path):
    path = _split_plan(tiny_llama_dir, tmp_path)
    result = _run("--model", str(tiny_llama_dir), "--prompt", PROMPT, "--plan", str(path),
                  "--gpu-memory", "1GiB")
    assert result.exit_code == 1
    assert "cannot be combined" in result.stderr


def test_corrupt_plan_file(tiny_llama_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = _run("--model", str(tiny_llama_dir), "--prompt", PROMPT, "--plan", str(bad))
    assert result.exit_code == 1
    assert "Error:" in result.stderr and "hetegen plan" in result.stderr


def test_plans_on_the_fly_when_a_gpu_is_present_and_gpu_memory_is_given(tiny_llama_dir, tmp_path,
                                                                          monkeypatch):
    """With CUDA (faked: the stand-in backend answers for "cuda"), --gpu-memory plans on the
    fly from the given profile and runs the engine; tokens still equal the plain model's."""
    from hetegen_cli import devices
    from hetegen_cli.profile_doc import save_profile
    from tests.test_costmodel import make_profile

    expected = _reference_tokens(tiny_llama_dir)
    profile = tmp_path / "gpu-profile.json"
    save_profile(make_profile(gpu=True), profile)
    monkeypatch.setattr(devices, "cuda_available", lambda: True)
    monkeypatch.setattr(devices, "get_backend", lambda kind="auto": devices.CpuBackend())
    result = _run("--model", str(tiny_llama_dir), "--prompt", PROMPT, "-n", "6", "--json",
                  "--gpu-memory", "3GiB", "--profile", str(profile))
    assert result.exit_code == 0, result.stderr
    assert "planned on the fly" in result.stderr
    doc = json.loads(result.stdout)
    assert doc["engine"] == "hetegen"
    assert doc["plan"]["origin"] == "planned on the fly"
    assert doc["plan"]["requires_gpu"] is True
    assert doc["token_ids"] == expected
