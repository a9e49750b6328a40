"""`hetegen plan` through typer's CliRunner, with profile files the tests write."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from hetegen_cli.cli.app import app
from hetegen_cli.plan.load import load_plan
from tests.fakes import make_profile

runner = CliRunner()


@pytest.fixture()
def profile_path(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(
        json.dumps(
            make_profile(
                cpu_bw=40e9,
                pcie_bw=24e9,
                cpu_call_s=30e-6,
                pcie_copy_s=10e-6,
                cpu_ratio=0.85,
                pcie_ratio=0.9,
                ram_available=200 * 2**30,
            )
        )
    )
    return path


def plan(*args):
    return runner.invoke(app, ["plan", *args])


def test_plan_json_parses(profile_path):
    result = plan("--model", "opt-30b", "--profile", str(profile_path), "--gpu-memory", "6GiB", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["kind"] == "hetegen.plan" and doc["schema_version"] == 2
    formats = doc["cpu_formats"]
    assert (formats["prefill"], formats["decode"]) == (
        doc["runtime"]["cpu_dtype_prefill"],
        doc["runtime"]["cpu_dtype_decode"],
    )
    assert formats["reason"] and len(formats["considered"]) == 4  # 2 measured formats, per phase
    assert doc["model"]["name"] == "opt-30b" and doc["budget"]["gpu_budget_bytes"] == 6 * 2**30
    assert len(doc["linears"]) == 48 * 6
    assert doc["profile"]["path"] == str(profile_path) and len(doc["profile"]["sha256"]) == 64
    pred = doc["predictions"]
    assert pred["hetegen"]["decode_tokens_per_s"] > pred["offload"]["decode_tokens_per_s"]
    assert doc["memory"]["gpu"]["total_bytes"] <= 6 * 2**30


def test_plan_human_output_and_explain(profile_path):
    base = ["--model", "opt-30b", "--profile", str(profile_path), "--gpu-memory", "6GiB"]
    result = plan(*base)
    assert result.exit_code == 0, result.stderr
    assert "Predictions" in result.stdout and "layer split" in result.stdout
    assert "model.decoder.layers.47.fc2" not in result.stdout
    explained = plan(*base, "--explain")
    assert explained.exit_code == 0
    assert "model.decoder.layers.47.fc2" in explained.stdout


def test_plan_output_is_written_atomically(profile_path, tmp_path):
    out = tmp_path / "plans" / "opt.json"
    result = plan(
        "--model", "opt-1.3b", "--profile", str(profile_path), "--gpu-memory", "2GiB", "--output", str(out)
    )
    assert result.exit_code == 0, result.stderr
    assert "plan saved to" in result.stderr
    loaded = load_plan(out)
    assert loaded.model["name"] == "opt-1.3b"
    assert [p.name for p in out.parent.iterdir()] == ["opt.json"]  # no temporary left behind


def test_plan_uses_the_saved_profile_and_its_free_memory(profile_path, hetegen_home):
    (hetegen_home / "profile.json").write_text(profile_path.read_text())
    result = plan("--model", "opt-1.3b", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["budget"]["gpu_budget_source"] == "profile free memory"
    assert doc["budget"]["gpu_budget_bytes"] == 7 * 2**30 - int(0.05 * 8 * 2**30)


def test_plan_from_a_local_folder_reads_headers_only(profile_path, tiny_llama_dir):
    result = plan(
        "--model",
        str(tiny_llama_dir),
        "--profile",
        str(profile_path),
        "--gpu-memory",
        "2GiB",
        "--prompt-len",
        "16",
        "--max-new-tokens",
        "8",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["linears"] and doc["warnings"]  # everything fits: plain GPU inference


def test_cpu_only_profile_gives_all_cpu_plan(tmp_path):
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(make_profile(gpu=False)))
    result = plan("--model", "llama-2-7b", "--profile", str(path), "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["runtime"]["requires_gpu"] is False
    assert all(lin["cpu_fraction_decode"] == 1.0 for lin in doc["linears"])
    assert "all-CPU plan" in result.stderr


@pytest.mark.parametrize(
    "args, text, code",
    [
        (["--gpu-memory", "1GiB"], "below the", 1),
        (["--gpu-memory", "six"], "cannot read", 2),
        (["--prompt-len", "0"], "--prompt-len", 2),
        (["--max-new-tokens", "0"], "--max-new-tokens", 2),
        (["--batch-size", "0"], "--batch-size", 2),
        (["--prompt-len", "2040", "--max-new-tokens", "64"], "context", 1),
        (["--cpu-memory", "1GiB"], "host memory", 1),
        (["--cpu-dtype", "int8"], "--cpu-dtype", 2),
        (["--cpu-dtype", "float32,int4"], "--cpu-dtype", 2),
        (["--cpu-dtype", "float32,float16,bfloat16"], "PREFILL,DECODE", 2),
        (["--cpu-dtype", "bfloat16,float32"], "no CPU GEMV and GEMM measurements for bfloat16", 1),
    ],
)
def test_bad_input_is_a_one_line_error(profile_path, args, text, code):
    """Usage errors (an option's own format or range) exit 2; what depends on the model, the
    profile or the budget exits 1."""
    result = plan("--model", "opt-30b", "--profile", str(profile_path), "--json", *args)
    assert result.exit_code == code
    assert result.stdout == ""
    assert "Error:" in result.stderr and text in result.stderr and "Hint:" in result.stderr


def test_cpu_dtype_per_phase_from_the_command_line(profile_path):
    result = plan(
        "--model", "opt-30b", "--profile", str(profile_path), "--json", "--cpu-dtype", "float32,float16"
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert (doc["runtime"]["cpu_dtype_prefill"], doc["runtime"]["cpu_dtype_decode"]) == ("float32", "float16")
    assert doc["cpu_formats"]["forced"] and "forced by --cpu-dtype" in doc["cpu_formats"]["reason"]
    human = plan("--model", "opt-30b", "--profile", str(profile_path), "--cpu-dtype", "float32, float16")
    assert human.exit_code == 0, human.stderr
    assert "float32 (prefill) and float16 (decode)" in " ".join(human.stdout.split())


def test_bad_model_and_bad_profiles(profile_path, tmp_path):
    result = plan("--model", "opt-31b", "--profile", str(profile_path))
    assert result.exit_code == 1 and "unknown model" in result.stderr and result.stdout == ""
    future = tmp_path / "future.json"
    future.write_text(json.dumps(dict(make_profile(), schema_version=99)))
    result = plan("--model", "opt-30b", "--profile", str(future), "--gpu-memory", "6GiB")
    assert result.exit_code == 1 and "schema_version" in result.stderr
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{not json")
    result = plan("--model", "opt-30b", "--profile", str(corrupt), "--gpu-memory", "6GiB")
    assert result.exit_code == 1 and "Error:" in result.stderr and result.stdout == ""


def test_plan_help():
    result = runner.invoke(app, ["plan", "--help"])
    assert result.exit_code == 0 and "--gpu-memory" in result.stdout
