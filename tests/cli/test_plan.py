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
    assert loaded.model.name == "opt-1.3b"
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


# --- plan --simulate (trace replay) -------------------------------------------------------------

SMALL = ["--model", "opt-125m", "--gpu-memory", "200MB", "--reserve", "0", "--prompt-len", "32",
         "--max-new-tokens", "8"]  # fmt: skip


def test_plan_simulate_adds_the_replay_the_host_term_and_the_timeline(profile_path, tmp_path, capsys):
    base = [*SMALL, "--profile", str(profile_path), "--copy-engines", "2"]
    plain = plan(*base, "--json")
    assert plain.exit_code == 0, plain.stderr
    assert "simulation" not in json.loads(plain.stdout)
    png = tmp_path / "pictures" / "decode.png"
    out = tmp_path / "plan.json"
    result = plan(*base, "--timeline", str(png), "--json", "--output", str(out))  # implies --simulate
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    sim = doc["simulation"]
    assert sim["copy_engines"] == 2 == doc["runtime"]["copy_engines"] and sim["host_term_added"]
    rec = sim["recorded"]
    assert rec["backend"] == "cuda-path-cpu" and rec["proxy"]["hidden_size"] == 64
    assert rec["proxy"]["num_layers"] == 12 and rec["prompt_len"] == 32 and not rec["prompt_len_capped"]
    dec = sim["decode"]
    assert dec["simulated_s"] > dec["ideal_s"] > 0  # the recorded host time costs something
    assert set(dec["busy_fraction"]) == {"host", "gpu", "d2h", "h2d:copy", "h2d:compute"}
    assert all(0 <= f <= 1 + 1e-9 for f in dec["busy_fraction"].values())
    assert dec["critical_path"] and dec["critical_path"][0]["seconds"] > 0
    assert dec["host"]["per_linear"]["split"]["count"] == sum(
        1 for lin in doc["linears"] if 0 < lin["cpu_rows_decode"] < lin["shape"][0]
    )
    # the prediction gained exactly the trace's host time
    hetegen, before = doc["predictions"]["hetegen"], json.loads(plain.stdout)["predictions"]["hetegen"]
    host = hetegen["host"]["decode_s_per_token"]
    assert host == pytest.approx(dec["host"]["total_s"]) and host > 0
    assert hetegen["decode_s_per_token"] == pytest.approx(before["decode_s_per_token"] + host)
    assert dec["predicted_s"] == pytest.approx(hetegen["decode_s_per_token"])
    assert any("host time from the trace replay" in n for n in doc["notes"])
    assert any("--copy-engines 2" in n for n in doc["notes"])
    # the timeline: a PNG, written atomically
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert int.from_bytes(data[16:20], "big") > 500 and int.from_bytes(data[20:24], "big") > 200
    assert [p.name for p in png.parent.iterdir()] == ["decode.png"]
    assert "timeline saved to" in result.stderr
    # the section survives the plan file, and the text summary reads it
    loaded = load_plan(out)
    assert loaded.simulation["decode"]["simulated_s"] == dec["simulated_s"]
    from hetegen_cli.cli.plan import render_simulation

    render_simulation(loaded)
    text = capsys.readouterr().out
    assert "Simulation (trace replay, 2 host-to-device copy engine(s))" in text
    assert "decode: simulated" in text and "host time per split linear" in text


@pytest.mark.parametrize(
    "args, text, code",
    [
        (["--timeline", "decode.svg"], "not a .png", 2),
        (["--timeline", "-"], "not a file name", 2),
        (["--copy-engines", "3"], "--copy-engines", 2),
        (["--timeline", "{file}/decode.png"], "is a file, not a folder", 1),
    ],
)
def test_simulate_input_errors_come_before_any_work(profile_path, tmp_path, hetegen_home, args, text, code):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = [a.replace("{file}", str(blocker)) for a in args]
    result = plan(*SMALL, "--profile", str(profile_path), "--simulate", *args)
    assert result.exit_code == code, result.stderr
    assert "Error:" in result.stderr and text in result.stderr and result.stdout == ""
    assert not (hetegen_home / "proxies").exists()  # nothing was recorded


def test_simulate_an_all_cpu_plan_says_there_is_nothing_to_replay(profile_path, tmp_path):
    png = tmp_path / "t.png"
    result = plan(
        *SMALL, "--profile", str(profile_path), "--gpu-memory", "0", "--timeline", str(png), "--json"
    )
    assert result.exit_code == 0, result.stderr
    assert "simulation" not in json.loads(result.stdout)
    assert "nothing to replay" not in result.stdout and "no CPU/GPU pipeline to replay" in result.stderr
    assert not png.exists()
