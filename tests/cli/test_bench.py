"""`hetegen bench` through typer's CliRunner: real tiny models on the CPU, every option, every
skip reason this machine can produce, and the one-line errors."""

from __future__ import annotations

import csv
import io
import json
import sys

import pytest
from typer.testing import CliRunner

from hetegen_cli.bench import arms as bench_arms
from hetegen_cli.bench import prepare, runner
from hetegen_cli.cli.app import app
from tests.fakes import make_profile

TINY = ["--prompt-len", "8", "--max-new-tokens", "4", "--repeat", "2"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def cpu_profile(tmp_path):
    """A CPU-only profile: float32 CPU share, one thread (fast and exact on tiny models)."""
    path = tmp_path / "cpu-profile.json"
    path.write_text(json.dumps(make_profile(gpu=False, best="float32", threads=1)))
    return str(path)


@pytest.fixture(autouse=True)
def no_cuda(monkeypatch):
    """These tests describe a machine without CUDA, whatever runs them."""
    monkeypatch.setattr(prepare, "cuda_available", lambda: False)


def invoke(*args: str):
    return CliRunner().invoke(app, ["bench", *args])


def arms_of(doc: dict, budget: int = 0) -> dict:
    return {e["arm"]: e for e in doc["budgets"][budget]["arms"]}


def test_help_lists_every_option():
    result = invoke("--help")
    assert result.exit_code == 0
    for option in (
        "--model",
        "--synthetic",
        "--dtype",
        "--profile",
        "--prompt-len",
        "--max-new-tokens",
        "--repeat",
        "--warmup",
        "--arms",
        "--gpu-memory",
        "--json",
        "--csv",
        "--plot",
        "--output",
        "--cpu-dtype",
        "--threads",
        "--seed",
    ):
        assert option in result.stdout


def test_tiny_llama_json_hetegen_matches_reference_and_gpu_arms_are_skipped(tiny_llama_dir, cpu_profile):
    result = invoke("--model", str(tiny_llama_dir), "--profile", cpu_profile, *TINY, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert (doc["kind"], doc["schema_version"]) == ("hetegen.bench", 1)
    arms = arms_of(doc)
    assert list(arms) == [
        "reference",
        "cpu",
        "hetegen",
        "llama.cpp",
        "offload",
        "accelerate",
        "layer-split",
        "gpu",
    ]
    # a safetensors folder has no GGUF for llama.cpp (when it is installed at all)
    llama = arms["llama.cpp"]
    assert llama["status"] == "skipped" and ("GGUF" in llama["reason"] or "not installed" in llama["reason"])
    het = arms["hetegen"]
    assert het["status"] == "ok" and het["token_check"]["compared_with"] == "reference"
    assert het["token_check"]["tokens_match"] is True and het["token_check"]["verified"] is True
    assert len(het["tokens"]) == 4 and het["tokens_stable"]
    assert het["metrics"]["decode_tokens_per_s"]["n"] == 2 and len(het["samples"]) == 2
    assert het["engine_stats"]["passes"] == 2 * 4  # stats reset after the warm-up run
    assert het["prediction"] is not None and het["bound"]["own"] == "cpu_only"
    assert het["host_peak_rss_bytes"] >= het["host_rss_before_bytes"] > 0
    if sys.platform.startswith("linux"):  # the anonymous part of the peak (bench.timing.RssSampler)
        assert 0 < het["host_peak_anon_bytes"] < het["host_peak_rss_bytes"]
    assert het["gpu_peak_memory_bytes"] is None
    for arm in ("offload", "accelerate", "layer-split", "gpu"):
        assert arms[arm]["status"] == "skipped" and arms[arm]["reason"].startswith("no CUDA GPU")
        assert het["ratios"]["vs_offload"]["decode_tokens_per_s"] is None
    assert any("GPU arms not measured" in n for n in doc["summary"]["notes"])
    assert doc["workload"]["prompt_token_ids"] == prepare.prompt_ids(320, 8, 0)
    assert doc["provenance"]["versions"]["torch"] and doc["method"]["repeat"] == 2


def test_tiny_opt_table_says_gpu_arms_were_skipped(tiny_opt_dir, cpu_profile):
    result = invoke(
        "--model",
        str(tiny_opt_dir),
        "--profile",
        cpu_profile,
        *TINY,
        "--arms",
        "hetegen,reference,gpu",
        "--warmup",
        "0",
    )
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "Measured" in out and "Compared" in out and "= reference" in out
    assert "Skipped: gpu" in out and "no CUDA GPU" in out and "GPU arms not measured" in out


def test_accelerate_missing_is_a_skip_reason(tiny_opt_dir, cpu_profile, monkeypatch):
    monkeypatch.setattr(bench_arms, "accelerate_available", lambda: False)
    result = invoke(
        "--model", str(tiny_opt_dir), "--profile", cpu_profile, *TINY, "--arms", "accelerate", "--json"
    )
    assert result.exit_code == 0, result.stderr
    reason = arms_of(json.loads(result.stdout))["accelerate"]["reason"]
    assert "no CUDA GPU" in reason and "accelerate is not installed" in reason


def test_sweep_writes_json_csv_and_plot_with_rows_for_both_budgets(tiny_llama_dir, cpu_profile, tmp_path):
    out, table, png = tmp_path / "b.json", tmp_path / "b.csv", tmp_path / "b.png"
    result = invoke(
        "--model",
        str(tiny_llama_dir),
        "--profile",
        cpu_profile,
        *TINY,
        "--arms",
        "cpu,hetegen,offload",  # the order they run in
        "--gpu-memory",
        "1GiB, 2GiB",
        "--output",
        str(out),
        "--csv",
        str(table),
        "--plot",
        str(png),
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(out.read_text())
    assert [s["gpu_budget_bytes"] for s in doc["budgets"]] == [2**30, 2 * 2**30]
    assert arms_of(doc, 1)["hetegen"]["reused_from_budget_index"] == 0  # same all-CPU plan
    rows = list(csv.DictReader(io.StringIO(table.read_text())))
    assert [(r["gpu_budget_bytes"], r["arm"]) for r in rows] == [
        (str(b), a) for b in (2**30, 2 * 2**30) for a in ("cpu", "hetegen", "offload")
    ]
    assert rows[0]["status"] == "ok" and float(rows[0]["decode_tokens_per_s_mean"]) > 0
    assert rows[2]["status"] == "skipped" and rows[2]["reason"] == "no CUDA GPU"
    assert png.read_bytes()[:8] == PNG
    assert "saved to" in result.stderr


def test_synthetic_preset_end_to_end(tmp_path):
    profile = tmp_path / "bf16-profile.json"
    profile.write_text(
        json.dumps(
            make_profile(
                gpu=False, best="bfloat16", threads=1, cpu_dtypes={"bfloat16": 40e9, "float32": 40e9}
            )
        )
    )
    result = invoke(
        "--synthetic",
        "opt-125m",
        "--dtype",
        "bfloat16",
        "--profile",
        str(profile),
        "--cpu-dtype",
        "float16",
        "--json",
    )
    assert result.exit_code == 1 and "no CPU GEMV and GEMM measurements for float16" in result.stderr
    result = invoke(
        "--synthetic",
        "opt-125m",
        "--dtype",
        "bfloat16",
        "--cpu-dtype",
        "bfloat16",
        "--profile",
        str(profile),
        "--prompt-len",
        "4",
        "--max-new-tokens",
        "2",
        "--repeat",
        "1",
        "--warmup",
        "0",
        "--arms",
        "hetegen,reference",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["model"]["kind"] == "synthetic" and doc["model"]["preset"] == "opt-125m"
    assert doc["model"]["dtype"] == "bfloat16"
    het = arms_of(doc)["hetegen"]
    assert het["status"] == "ok" and het["token_check"]["tokens_match"] is True


def test_uses_the_saved_profile_by_default(tiny_opt_dir, hetegen_home):
    (hetegen_home / "profile.json").write_text(json.dumps(make_profile(gpu=False, best="float32", threads=1)))
    result = invoke("--model", str(tiny_opt_dir), *TINY, "--arms", "cpu", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["provenance"]["profile"]["path"] == str(hetegen_home / "profile.json")


@pytest.mark.parametrize(
    "args, text, code",
    [
        (["--gpu-memory", "4GiB,lots"], "cannot read --gpu-memory", 2),
        (["--arms", "hetegen,turbo"], "unknown arm 'turbo'", 2),
        (["--repeat", "0"], "--repeat is 0", 2),
        (["--max-new-tokens", "1"], "--max-new-tokens is 1", 2),
        (["--synthetic", "opt-125m"], "mutually exclusive", 2),
        (["--prompt-len", "200"], "exceeds the context", 1),  # depends on the model: exit 1
    ],
)
def test_bad_options_are_one_line_errors(tiny_opt_dir, cpu_profile, args, text, code):
    """Usage errors (an option's own range, format, conflicts) exit 2; the rest exit 1."""
    result = invoke("--model", str(tiny_opt_dir), "--profile", cpu_profile, *args, "--json")
    assert result.exit_code == code
    assert result.stdout == ""
    assert text in result.stderr and "Hint:" in result.stderr and "Traceback" not in result.stderr


def test_a_dtype_outside_the_choices_is_refused_like_run_does(tiny_opt_dir, cpu_profile):
    """--dtype is the model setup's option (the same choices as run's): click refuses it."""
    result = invoke("--model", str(tiny_opt_dir), "--profile", cpu_profile, "--dtype", "int4", "--json")
    assert result.exit_code == 2 and result.stdout == ""
    assert "Invalid value for '--dtype'" in result.stderr and "Traceback" not in result.stderr


def test_missing_model_and_unwritable_outputs_fail_before_any_work(
    cpu_profile, tiny_opt_dir, tmp_path, monkeypatch
):
    work = tmp_path / "work"
    work.mkdir()
    result = invoke("--model", str(work / "nope"), "--profile", cpu_profile)
    assert result.exit_code == 1 and "does not exist" in result.stderr and result.stdout == ""
    blocker = work / "file"
    blocker.write_text("x")

    def must_not_run(*a, **k):
        raise AssertionError("bench started despite a bad option")

    monkeypatch.setattr(runner, "run_bench", must_not_run)
    for flag in ("--output", "--csv", "--plot"):
        result = invoke("--model", str(tiny_opt_dir), "--profile", cpu_profile, flag, str(blocker / "out"))
        assert result.exit_code == 1 and flag in result.stderr and "Hint:" in result.stderr
    result = invoke(
        "--model",
        str(tiny_opt_dir),
        "--profile",
        cpu_profile,
        "--csv",
        str(work / "same"),
        "--output",
        str(work / "same"),
    )
    assert result.exit_code == 1 and "same file" in result.stderr
    result = invoke("--model", str(tiny_opt_dir), "--profile", str(work / "nope.json"))
    assert result.exit_code == 1 and "profile file" in result.stderr
    assert [p.name for p in work.iterdir()] == ["file"]


def test_plot_without_matplotlib_is_a_clear_error(tiny_opt_dir, cpu_profile, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a)
    )
    result = invoke("--model", str(tiny_opt_dir), "--profile", cpu_profile, "--plot", str(tmp_path / "p.png"))
    assert result.exit_code == 1 and "matplotlib" in result.stderr
    assert not (tmp_path / "p.png").exists()


def test_only_skipped_arms_still_report_cleanly(tiny_opt_dir, cpu_profile, tmp_path):
    result = invoke(
        "--model",
        str(tiny_opt_dir),
        "--profile",
        cpu_profile,
        *TINY,
        "--arms",
        "offload,gpu",
        "--plot",
        str(tmp_path / "p.png"),
    )
    assert result.exit_code == 0, result.stderr
    assert "No arm could run here" in result.stdout and "Skipped: offload" in result.stdout
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG
