"""`hetegen run` through the CLI: plain generation, errors, and plans executed through the
heterogeneous engine (CPU stand-in here), from a file or planned on the fly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hetegen_cli.cli.app import app
from hetegen_cli.models.loading.loader import load_tokenizer
from hetegen_cli.models.loading.source import resolve_model
from hetegen_cli.plan.document import RuntimeSettings, save_plan
from hetegen_cli.plan.load import load_plan
from hetegen_cli.plan.manual import manual_plan
from hetegen_cli.run import builders
from tests.helpers import ACTIVATIONS, assert_error, cli, transformers_greedy

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
    runtime = RuntimeSettings(
        weights_dtype=spec.dtype,
        cpu_dtype_prefill="float32",
        cpu_dtype_decode="float32",
        cpu_threads=1,
        staging_buffers=2,
        prefetch_depth=1,
        requires_gpu=requires_gpu,
    )
    plan = manual_plan(
        spec, cpu_fraction_prefill=prefill, cpu_fraction_decode=decode, resident=resident, runtime=runtime
    )
    return save_plan(plan, tmp_path / "plan.json")


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_opt_dir"])
def test_split_plan_on_cpu_stand_in_matches_plain_tokens(fixture, request, tmp_path):
    folder = request.getfixturevalue(fixture)
    expected = _reference_tokens(folder)
    spec = resolve_model(str(folder), need_weights=True).spec
    resident = [spec.linears[0].name, spec.linears[5].name]
    path = _split_plan(folder, tmp_path, resident=resident)
    result = _run(
        "--model",
        str(folder),
        "--prompt",
        PROMPT,
        "-n",
        "6",
        "--json",
        "--plan",
        str(path),
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["engine"] == "hetegen"
    assert doc["token_ids"] == expected
    assert doc["plan"]["split_count"] == len(spec.linears) - 2
    assert doc["plan"]["resident_count"] == 2
    assert doc["plan"]["backend"] == "cpu"
    stats = doc["engine_stats"]
    assert stats["split_calls"] > 0 and stats["bytes_streamed"] > 0
    assert "CPU stand-in" in result.stderr


def test_all_cpu_plan_runs_through_engine_without_gpu(tiny_llama_dir, tmp_path):
    expected = _reference_tokens(tiny_llama_dir)
    path = _split_plan(tiny_llama_dir, tmp_path, requires_gpu=False, prefill=1.0, decode=1.0)
    result = _run(
        "--model", str(tiny_llama_dir), "--prompt", PROMPT, "-n", "6", "--json", "--plan", str(path)
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["engine"] == "hetegen" and doc["token_ids"] == expected
    assert doc["engine_stats"]["bytes_streamed"] == 0


def _save_profile(home: Path, gemv: dict, gemm: dict) -> Path:
    from tests.fakes import make_profile

    path = home / "profile.json"
    path.write_text(
        json.dumps(make_profile(gpu=False, threads=1, cpu_dtypes=gemv, cpu_gemm=gemm, best="float32"))
    )
    return path


# float32 GEMV 2x bfloat16's params/s, bfloat16 GEMM 10x float32's: a 6-token prefill is
# compute-bound in float32 and faster in bfloat16, decode faster in float32
PER_PHASE = ({"float32": 160e9, "bfloat16": 40e9}, {"float32": 1e11, "bfloat16": 1e12})


def test_cpu_run_uses_the_saved_profiles_format_per_phase(tiny_llama_dir, hetegen_home):
    _save_profile(hetegen_home, *PER_PHASE)
    args = ["--model", str(tiny_llama_dir), "--prompt", PROMPT, "-n", "6", "--json"]
    result = _run(*args)
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["engine"] == "hetegen" and doc["dtype"] == "bfloat16+float32"  # the model in bf16
    assert doc["plan"]["origin"] == "all-CPU, formats from the profile"
    assert (doc["plan"]["runtime"]["cpu_dtype_prefill"], doc["plan"]["runtime"]["cpu_dtype_decode"]) == (
        "bfloat16",
        "float32",
    )
    assert "running in bfloat16 with decode's linears in float32" in " ".join(result.stderr.split())
    forced = _run(*args, "--dtype", "float32")  # --dtype forces one format: the plain model
    assert forced.exit_code == 0, forced.stderr
    assert json.loads(forced.stdout)["engine"] == "plain"


def test_cpu_run_in_one_faster_format_is_plain(tiny_llama_dir, hetegen_home):
    _save_profile(hetegen_home, {"float32": 10e9, "bfloat16": 80e9}, {"float32": 1e9, "bfloat16": 1e12})
    result = _run("--model", str(tiny_llama_dir), "--prompt", PROMPT, "-n", "4", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["engine"] == "plain" and doc["dtype"] == "bfloat16"


def test_cpu_run_without_a_profile_measures_nothing_and_runs_plain(tiny_llama_dir, hetegen_home):
    result = _run("--model", str(tiny_llama_dir), "--prompt", PROMPT, "-n", "4", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["engine"] == "plain" and json.loads(result.stdout)["dtype"] == "float32"
    assert not (hetegen_home / "profile.json").exists()


def test_cpu_run_with_a_broken_profile_warns_and_runs_plain(tiny_llama_dir, hetegen_home):
    (hetegen_home / "profile.json").write_text("{broken")
    result = _run("--model", str(tiny_llama_dir), "--prompt", PROMPT, "-n", "4", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["engine"] == "plain"
    assert "CPU formats are not used" in result.stderr and "Traceback" not in result.stderr


def test_gpu_plan_refused_without_cuda(tiny_llama_dir, tmp_path):
    path = _split_plan(tiny_llama_dir, tmp_path)
    result = _run("--model", str(tiny_llama_dir), "--prompt", PROMPT, "--plan", str(path))
    assert result.exit_code == 1
    assert "needs a GPU" in result.stderr and "Hint:" in result.stderr
    assert result.stdout == ""


def test_plan_for_another_model_refused(tiny_llama_dir, tiny_opt_dir, tmp_path):
    path = _split_plan(tiny_opt_dir, tmp_path)
    result = _run("--model", str(tiny_llama_dir), "--prompt", PROMPT, "--plan", str(path), "--device", "cpu")
    assert result.exit_code == 1
    assert "plan was made for model" in result.stderr
    assert result.stdout == ""


def test_plan_from_plan_command_round_trips_into_run(tiny_opt_dir, tmp_path):
    """`plan` on a CPU-only profile writes an all-CPU plan that `run --plan` executes."""
    from tests.fakes import make_profile

    profile = tmp_path / "profile.json"
    from hetegen_cli.profile.document import save_profile

    save_profile(make_profile(gpu=False), profile)
    out = tmp_path / "made.json"
    made = runner.invoke(
        app,
        [
            "plan",
            "--model",
            str(tiny_opt_dir),
            "--profile",
            str(profile),
            "--prompt-len",
            "8",
            "--max-new-tokens",
            "6",
            "--output",
            str(out),
        ],
    )
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
    result = _run(
        "--model", str(tiny_llama_dir), "--prompt", PROMPT, "--plan", str(path), "--gpu-memory", "1GiB"
    )
    assert_error(result, "cannot be combined", exit_code=2)


def test_corrupt_plan_file(tiny_llama_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = _run("--model", str(tiny_llama_dir), "--prompt", PROMPT, "--plan", str(bad))
    assert result.exit_code == 1
    assert "Error:" in result.stderr and "hetegen plan" in result.stderr


def test_plans_on_the_fly_when_a_gpu_is_present_and_gpu_memory_is_given(
    tiny_llama_dir, tmp_path, monkeypatch
):
    """With CUDA (faked: the stand-in backend answers for "cuda"), --gpu-memory plans on the
    fly from the given profile and runs the engine; tokens still equal the plain model's."""
    from hetegen_cli.core.devices import CpuBackend
    from hetegen_cli.profile.document import save_profile
    from tests.fakes import make_profile

    expected = _reference_tokens(tiny_llama_dir)
    profile = tmp_path / "gpu-profile.json"
    save_profile(make_profile(gpu=True), profile)
    monkeypatch.setattr(builders, "cuda_available", lambda: True)
    monkeypatch.setattr(builders, "get_backend", lambda kind="auto": CpuBackend())
    result = _run(
        "--model",
        str(tiny_llama_dir),
        "--prompt",
        PROMPT,
        "-n",
        "6",
        "--json",
        "--gpu-memory",
        "3GiB",
        "--profile",
        str(profile),
    )
    assert result.exit_code == 0, result.stderr
    assert "planned on the fly" in result.stderr
    doc = json.loads(result.stdout)
    assert doc["engine"] == "hetegen"
    assert doc["plan"]["origin"] == "planned on the fly"
    assert doc["plan"]["runtime"]["requires_gpu"] is True
    assert doc["plan"]["budget"]["gpu_budget_bytes"] == 3 * 2**30  # was always null before
    assert doc["token_ids"] == expected


def _run_json(*args: str) -> dict:
    result = runner.invoke(app, ["run", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_cli_json_matches_transformers_greedy(tiny_dir):
    doc = _run_json("--model", str(tiny_dir), "--prompt", PROMPT, "--max-new-tokens", "16")
    assert list(doc)[:2] == ["schema_version", "kind"] and doc["kind"] == "hetegen.run"
    assert doc["token_ids"] == transformers_greedy(tiny_dir, doc["prompt_token_ids"], 16)
    assert doc["device"] == "cpu" and doc["dtype"] == "float32" and doc["engine"] == "plain"
    assert doc["sampling"]["mode"] == "greedy"
    assert doc["model"]["source"] == "folder" and doc["model"]["path"] == str(tiny_dir)
    for key in (
        "load_s",
        "prefill_s",
        "time_to_first_token_s",
        "decode_s",
        "decode_tokens_per_s",
        "prompt_tokens",
        "generated_tokens",
    ):
        assert key in doc["timings"]
    assert doc["timings"]["generated_tokens"] == len(doc["token_ids"])
    wall = doc["timings"]["wall"]  # where the wall time went
    parts = ("import_s", "resolve_s", "load_s", "prefill_s", "decode_s", "other_s")
    assert set(wall) == {*parts, "generate_s", "total_s"}
    assert all(v >= 0 for v in wall.values())
    assert wall["generate_s"] >= doc["timings"]["prefill_s"] + doc["timings"]["decode_s"] - 1e-3
    assert sum(wall[p] for p in parts) == pytest.approx(wall["total_s"])
    assert wall["prefill_s"] == doc["timings"]["prefill_s"] and wall["decode_s"] == doc["timings"]["decode_s"]


# ------------------------------------------------------------------------------- sampling


def test_streams_text_to_stdout_and_timings_to_stderr(tiny_llama_dir):
    args = ["run", "--model", str(tiny_llama_dir), "--prompt", PROMPT, "-n", "10"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = _run_json(*args[1:])
    assert result.stdout == doc["text"] + "\n"
    assert "prefill" in result.stderr and "tok/s" in result.stderr and "first token" in result.stderr
    assert doc["text"] not in result.stderr or doc["text"] == ""


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt(tiny_llama_dir, prompt):
    result = runner.invoke(app, ["run", "--model", str(tiny_llama_dir), "--prompt", prompt])
    assert_error(result, "prompt is empty", exit_code=2)


def test_max_new_tokens_beyond_context(tiny_llama_dir):
    result = runner.invoke(
        app, ["run", "--model", str(tiny_llama_dir), "--prompt", PROMPT, "--max-new-tokens", "500"]
    )
    assert_error(result, "exceeds the context of", "--max-new-tokens")


def test_max_new_tokens_below_one_is_usage_error(tiny_llama_dir):
    result = runner.invoke(
        app, ["run", "--model", str(tiny_llama_dir), "--prompt", PROMPT, "--max-new-tokens", "0"]
    )
    assert result.exit_code == 2


def test_chat_without_template(tiny_llama_dir):
    result = runner.invoke(app, ["run", "--model", str(tiny_llama_dir), "--prompt", PROMPT, "--chat"])
    assert_error(result, "no chat template")


def test_chat_uses_template(tiny_llama_dir, tmp_path):
    folder = Path(shutil.copytree(tiny_llama_dir, tmp_path / "chat"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}USER: {{ m['content'] }}\n{% endfor %}BOT:"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(folder)
    doc = _run_json("--model", str(folder), "--prompt", PROMPT, "--chat", "-n", "4")
    assert doc["chat"] is True
    assert doc["prompt_token_ids"] == tokenizer(f"USER: {PROMPT}\nBOT:")["input_ids"]


def test_invalid_top_p(tiny_llama_dir):
    result = runner.invoke(
        app, ["run", "--model", str(tiny_llama_dir), "--prompt", PROMPT, "--temperature", "1", "--top-p", "0"]
    )
    assert_error(result, "top-p", exit_code=2)


def test_cuda_requested_without_gpu(tiny_llama_dir):
    from hetegen_cli.core.devices import cuda_available

    if cuda_available():
        pytest.skip("a GPU is present")
    result = runner.invoke(
        app, ["run", "--model", str(tiny_llama_dir), "--prompt", PROMPT, "--device", "cuda"]
    )
    assert_error(result, "no CUDA GPU")


def test_seeded_sampling_is_reproducible(tiny_llama_dir):
    args = ("--model", str(tiny_llama_dir), "--prompt", PROMPT, "-n", "20", "--temperature", "1.5")
    first = _run_json(*args, "--seed", "7")
    again = _run_json(*args, "--seed", "7")
    other = _run_json(*args, "--seed", "8")
    assert first["token_ids"] == again["token_ids"]
    assert first["token_ids"] != other["token_ids"]
    assert first["sampling"] == {"mode": "sample", "temperature": 1.5, "top_p": 1.0, "top_k": 0, "seed": 7}


def test_eos_from_config_stops_generation(tiny_llama_dir, tmp_path):
    """Declare the 4th greedy token an EOS id: generation stops right after it."""
    greedy = _run_json("--model", str(tiny_llama_dir), "--prompt", PROMPT, "-n", "12")
    stop_token = greedy["token_ids"][3]
    assert stop_token not in greedy["token_ids"][:3]
    folder = Path(shutil.copytree(tiny_llama_dir, tmp_path / "eos"))
    for name in ("config.json", "generation_config.json"):
        config = json.loads((folder / name).read_text())
        config["eos_token_id"] = [2, stop_token]
        (folder / name).write_text(json.dumps(config))
    doc = _run_json("--model", str(folder), "--prompt", PROMPT, "-n", "12")
    assert doc["token_ids"] == greedy["token_ids"][:4]
    assert doc["stop_reason"] == "eos" and greedy["stop_reason"] == "length"


@pytest.mark.cuda
def test_runs_on_gpu_and_matches_cpu(tiny_llama_dir):
    args = ("--model", str(tiny_llama_dir), "--prompt", PROMPT, "-n", "8")
    gpu = _run_json(*args, "--device", "cuda", "--dtype", "float32")
    cpu = _run_json(*args, "--device", "cpu")
    assert gpu["device"].startswith("cuda") and gpu["token_ids"] == cpu["token_ids"]


def _pretend_cuda(monkeypatch, free_bytes: int):
    """CUDA present (the strict stand-in answers for it) with `free_bytes` of GPU memory."""
    from tests.strict import StrictBackend

    class SmallGpu(StrictBackend):
        def memory_info(self):
            return free_bytes, free_bytes

    backend = SmallGpu()
    monkeypatch.setattr(builders, "cuda_available", lambda: True)
    monkeypatch.setattr(builders, "get_backend", lambda kind="auto": backend)
    return backend


@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_a_model_too_big_for_the_gpu_goes_through_the_engine(device, tiny_llama_dir, tmp_path, monkeypatch):
    """Without a plan, a model that does not fit free GPU memory is planned on the fly and run
    by the engine, with --device cuda as with auto (it used to load whole onto the GPU), and
    generation is timed with the engine's device clock, not the CPU's."""
    from hetegen_cli.profile.document import save_profile
    from tests.fakes import make_profile

    expected = _reference_tokens(tiny_llama_dir)
    backend = _pretend_cuda(monkeypatch, free_bytes=2**20)  # 1 MiB: nothing fits
    syncs = []
    real_sync = backend.synchronize
    monkeypatch.setattr(backend, "synchronize", lambda: (syncs.append(1), real_sync())[1])
    profile = tmp_path / "gpu-profile.json"
    save_profile(make_profile(gpu=True), profile)
    result = _run(
        "--model",
        str(tiny_llama_dir),
        "--prompt",
        PROMPT,
        "-n",
        "6",
        "--json",
        "--device",
        device,
        "--profile",
        str(profile),
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["engine"] == "hetegen" and doc["plan"]["origin"] == "planned on the fly"
    assert doc["token_ids"] == expected
    assert len(syncs) >= 2 * 6  # a synchronised clock read around prefill and every decode step


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_a_quantized_plan_runs_through_the_engine(fmt, tiny_llama_dir, hetegen_home, tmp_path, monkeypatch):
    """`plan --quant` on a GPU profile, then `run --plan` on the CPU stand-in: the quantized
    linears split (packed kernel rows on the CPU, stored parts streamed and dequantized), and
    with CUDA (faked) `--gpu-memory` plans the quantized model on the fly. Greedy tokens equal
    the plain quantized model's on this prompt."""
    from hetegen_cli.core.devices import CpuBackend
    from hetegen_cli.profile.document import save_profile
    from tests.fakes import GB, make_profile

    profile = tmp_path / "gpu-profile.json"
    save_profile(make_profile(gpu=True, quant_bw={"int8": 20 * GB, "int4": 20 * GB}), profile)
    base = ("--model", str(tiny_llama_dir), "--prompt", PROMPT, "-n", "6", "--json", "--quant", fmt)
    plain = _run(*base)
    assert plain.exit_code == 0, plain.stderr
    expected = json.loads(plain.stdout)["token_ids"]
    plan_path = tmp_path / "q.json"
    made = cli(
        "plan",
        "--model",
        str(tiny_llama_dir),
        "--quant",
        fmt,
        "--profile",
        str(profile),
        "--gpu-memory",
        "120KiB",
        "--reserve",
        "0",
        "--prompt-len",
        "16",
        "--max-new-tokens",
        "8",
        "-o",
        str(plan_path),
    )
    assert made.exit_code == 0, made.stderr
    doc = json.loads(plan_path.read_text())
    assert doc["model"]["quant"] == ("int8" if fmt == "int8" else "int4-g32")
    assert any(0 < lin["cpu_fraction_decode"] < 1 for lin in doc["linears"])  # really split
    result = _run(*base, "--plan", str(plan_path), "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["engine"] == "hetegen" and out["token_ids"] == expected
    monkeypatch.setattr(builders, "cuda_available", lambda: True)
    monkeypatch.setattr(builders, "get_backend", lambda kind="auto": CpuBackend())
    fly = _run(*base, "--gpu-memory", "3GiB", "--profile", str(profile))  # all resident, quantized
    assert fly.exit_code == 0, fly.stderr
    assert json.loads(fly.stdout)["token_ids"] == expected


def test_quant_int4_runs_a_quantized_copy_on_the_cpu(tiny_llama_dir, hetegen_home, tmp_path):
    result = _run("--model", str(tiny_llama_dir), "--prompt", PROMPT, "-n", "6", "--json", "--quant", "int4")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["quant"] == "int4" and doc["dtype"] == f"int4+{ACTIVATIONS}" and doc["engine"] == "plain"
    if ACTIVATIONS == "float32":  # hetegen's kernels: one call per norm and attention (2
        # layers); down_proj takes 136 inputs, not a multiple of 32, so it stays on torch's
        # kernel: no fused MLP
        want = {"mlps": 0, "norms": 5, "attentions": 2, "layers": 0, "model": 0, "experts": 0, "rejected": 0}
        assert doc["fused"] == want  # no fused MLP: no fused layer
    else:
        assert doc["fused"] is None
    again = _run("--model", str(tiny_llama_dir), "--prompt", PROMPT, "-n", "6", "--json", "--quant", "int4")
    assert again.exit_code == 0 and "Quantizing" not in again.stderr  # made once, then reused
    assert json.loads(again.stdout)["token_ids"] == doc["token_ids"]
    plan = _split_plan(tiny_llama_dir, tmp_path, requires_gpu=False)  # made for the float model
    refused = _run("--model", str(tiny_llama_dir), "--prompt", PROMPT, "--quant", "int4", "--plan", str(plan))
    assert (
        refused.exit_code == 1 and "in floating point" in refused.stderr and "--quant int4" in refused.stderr
    )
    assert "Traceback" not in refused.stderr
    bad = _run("--model", str(tiny_llama_dir), "--prompt", PROMPT, "--quant", "int3")
    assert bad.exit_code == 2 and "Traceback" not in bad.stderr
