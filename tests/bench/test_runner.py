"""bench library: statistics, ratios, bounds, token checks, skips, CSV and plot, with fake
measurements injected through the runner table (no weights loaded except where stated)."""

from __future__ import annotations

import csv
import io
import json
import mmap
import os
import sys
import time
from dataclasses import replace

import psutil
import pytest

from hetegen_cli.bench import arms as bench_arms
from hetegen_cli.bench import prepare, runner
from hetegen_cli.bench import present as bench_present
from hetegen_cli.bench.runner import ArmRun
from hetegen_cli.bench.timing import RssSampler
from hetegen_cli.cli.common import sizes_bytes
from hetegen_cli.core.errors import InputError
from tests.fakes import make_profile
from tests.helpers import ACTIVATIONS, bench_options


def sample(prefill_s: float, decode_s: float, steps: int = 3, prompt: int = 8) -> dict:
    """One generation's timings (generate.GenerationTimings.as_dict layout)."""
    return {
        "prompt_tokens": prompt,
        "generated_tokens": steps + 1,
        "prefill_s": prefill_s,
        "time_to_first_token_s": prefill_s,
        "decode_s": decode_s,
        "decode_steps": steps,
        "total_s": prefill_s + decode_s,
        "prefill_tokens_per_s": prompt / prefill_s,
        "decode_tokens_per_s": steps / decode_s,
    }


# --- the whole pipeline with fake measurements -------------------------------------------

SPEED = {
    "hetegen": 4.0,
    "offload": 1.0,
    "accelerate": 0.5,
    "layer-split": 2.0,
    "cpu": 1.6,
    "gpu": 20.0,
    "reference": 1.6,
}  # decode seconds per run of 3 steps -> tok/s = 3 / s


def fake_runner(ctx, prepared) -> ArmRun:
    """Decode tok/s = SPEED[arm] (two runs, sd 0); prefill 1 s; tokens equal except `cpu`."""
    d = 3 / SPEED[ctx.arm]
    tokens = [7, 8, 9, 10] if ctx.arm != "cpu" else [7, 8, 4, 4]
    dtype = {"cpu": "float32", "hetegen": "float16+float32"}.get(ctx.arm, "float16")
    logits = {
        "top2_ids": [[t, 0] for t in tokens],
        "margins": [0.5, 0.5, 0.01, 0.5],
        "top1_logits": [1.0] * 4,
    }
    if ctx.arm != "cpu":
        logits["top2_ids"][2] = [9, 4]  # the cpu arm's token is the runner-up, 0.01 behind
    return ArmRun(
        [sample(1.0, d), sample(1.0, d)],
        tokens,
        True,
        1000,
        2000,
        1500,
        {"compute_dtype": dtype, "device": "fake"},
        None,
        logits,
    )


@pytest.fixture
def gpu_world(monkeypatch, tmp_path, tiny_llama_dir):
    """Pretend CUDA and accelerate exist; a made-up GPU profile on disk."""
    monkeypatch.setattr(prepare, "cuda_available", lambda: True)
    monkeypatch.setattr(bench_arms, "accelerate_available", lambda: True)
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(make_profile(threads=1)))
    return bench_options(
        model=str(tiny_llama_dir),
        profile=path,
        prompt_len=8,
        max_new_tokens=4,
        repeat=2,
        gpu_budget_bytes=(2 * 2**30, 3 * 2**30),
        arms=("hetegen", "offload", "accelerate", "layer-split", "cpu", "gpu"),
    )


def _fake_doc(options):
    runners = {a: fake_runner for a in prepare.ARMS}
    return runner.run_bench(options, runners=runners)


def test_ratios_bounds_and_predictions_with_fake_measurements(gpu_world):
    doc = _fake_doc(gpu_world)
    assert doc["kind"] == "hetegen.bench" and doc["schema_version"] == 1
    assert len(doc["budgets"]) == 2
    arms = {e["arm"]: e for e in doc["budgets"][0]["arms"]}
    # in the order --arms names them
    assert [e["arm"] for e in doc["budgets"][0]["arms"]] == list(gpu_world.arms)
    het = arms["hetegen"]
    # hetegen 4 tok/s... via decode seconds 3/4 per 3 steps
    assert het["metrics"]["decode_tokens_per_s"]["mean"] == pytest.approx(4.0)
    assert het["ratios"]["vs_offload"]["decode_tokens_per_s"] == pytest.approx(4.0)
    assert het["ratios"]["vs_layer_split"]["decode_tokens_per_s"] == pytest.approx(2.0)
    assert arms["offload"]["ratios"]["vs_offload"]["decode_tokens_per_s"] == pytest.approx(1.0)
    # end-to-end: 4 tokens / (1 + 0.75) s over 4 / (1 + 3) s
    assert het["ratios"]["vs_offload"]["end_to_end_tokens_per_s"] == pytest.approx(4 / 1.75 / 1.0)
    plan = doc["budgets"][0]["plan"]
    pred = plan["predictions"]["hetegen"]["decode_tokens_per_s"]
    assert het["prediction_error"]["decode_tokens_per_s"] == pytest.approx(4.0 / pred - 1)
    assert het["bound"]["own"] == "hybrid"
    assert het["bound"]["fraction_of_own_bound"] == pytest.approx(plan["bounds"]["hybrid_s_per_token"] * 4.0)
    assert arms["accelerate"]["prediction"] is None and arms["accelerate"]["bound"]["own"] == "offload"
    # tokens: every float16 arm agrees; cpu differs at 2 on a near tie -> verified
    assert het["token_check"]["tokens_match"] is True
    assert arms["offload"]["token_check"]["compared_with"] == "gpu"
    cpu = arms["cpu"]["token_check"]
    assert (cpu["tokens_match"], cpu["first_divergence"], cpu["compared_with"]) == (False, 2, "gpu")
    assert cpu["near_tie"] is True and cpu["verified"] is True and cpu["same_dtype"] is False
    assert any("near tie" in n for n in doc["summary"]["notes"])


def test_budget_independent_arms_are_measured_once(gpu_world):
    calls = []

    def counting(ctx, prepared):
        calls.append(ctx.arm)
        return fake_runner(ctx, prepared)

    runner.run_bench(gpu_world, runners={a: counting for a in prepare.ARMS})
    assert calls.count("cpu") == 1 and calls.count("gpu") == 1


def test_csv_and_plot_from_fake_measurements(gpu_world, tmp_path):
    doc = _fake_doc(gpu_world)
    rows = list(csv.DictReader(io.StringIO(bench_present.csv_text(doc))))
    assert len(rows) == 12 and {r["gpu_budget_bytes"] for r in rows} == {str(2 * 2**30), str(3 * 2**30)}
    het = next(r for r in rows if r["arm"] == "hetegen")
    assert float(het["decode_vs_offload"]) == pytest.approx(4.0)
    assert {"prefill_tokens_per_s_mean", "prefill_vs_reference", "end_to_end_vs_reference"} <= set(het)
    assert het["tokens_match"] == "True" and het["status"] == "ok"
    path = bench_present.write_plot(doc, tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.loads(json.dumps(doc))  # the document is plain JSON


def test_a_failing_arm_is_reported_and_the_rest_goes_on(gpu_world):
    from hetegen_cli.core.errors import DeviceError

    def oom(ctx, prepared):
        raise DeviceError("the GPU ran out of memory while benchmarking", "lower it")

    runners = {a: fake_runner for a in prepare.ARMS} | {"gpu": oom}
    doc = runner.run_bench(gpu_world, runners=runners)
    arms = {e["arm"]: e for e in doc["budgets"][0]["arms"]}
    assert arms["gpu"]["status"] == "failed" and "out of memory" in arms["gpu"]["reason"]
    assert arms["hetegen"]["ratios"]["vs_offload"]["decode_tokens_per_s"] == pytest.approx(4.0)


# --- skip reasons --------------------------------------------------------------------------


def _ctx(arm, ref, plan, has_cuda=False, budget=None, error=None):
    return bench_arms.ArmContext(
        arm, ref, plan, error, budget, has_cuda, 1, {"prompt_len": 8, "max_new_tokens": 4}
    )


@pytest.fixture
def tiny_plan(tiny_llama_dir):
    from hetegen_cli.models.loading.source import resolve_model
    from hetegen_cli.plan.request import PlanRequest
    from hetegen_cli.plan.solver import make_plan

    ref = resolve_model(str(tiny_llama_dir), need_weights=True)
    req = PlanRequest(prompt_len=8, max_new_tokens=4, gpu_budget_bytes=2**30 + 2**20)
    return ref, make_plan(ref.spec, make_profile(threads=1), req)


def test_skip_reasons(tiny_plan, monkeypatch):
    ref, plan = tiny_plan
    for arm in ("offload", "accelerate", "layer-split", "gpu"):
        assert bench_arms.skip_reason(_ctx(arm, ref, plan)).startswith("no CUDA GPU")
    for arm in ("hetegen", "cpu", "reference"):
        assert bench_arms.skip_reason(_ctx(arm, ref, plan)) is None
    monkeypatch.setattr(bench_arms, "accelerate_available", lambda: False)
    reason = bench_arms.skip_reason(_ctx("accelerate", ref, plan, has_cuda=True))
    assert reason == bench_arms.ACCELERATE_MISSING
    reason = bench_arms.skip_reason(_ctx("gpu", ref, plan, has_cuda=True, budget=2**20))
    assert "whole model needs" in reason
    assert bench_arms.skip_reason(_ctx("gpu", ref, plan, has_cuda=True, budget=2**31)) is None
    reason = bench_arms.skip_reason(_ctx("hetegen", ref, None, error="budget too small"))
    assert reason == "no plan for this budget: budget too small"
    monkeypatch.setattr(bench_arms, "_available_ram", lambda: 0)
    assert "of RAM" in bench_arms.skip_reason(_ctx("cpu", ref, plan))


def test_offload_plan_keeps_the_resident_set_and_zeroes_every_fraction(tiny_plan):
    ref, plan = tiny_plan
    off = bench_arms.offload_plan(plan, ref.spec)
    assert {p.name for p in off.placements if p.resident} == {p.name for p in plan.placements if p.resident}
    assert all(p.cpu_rows_prefill == p.cpu_rows_decode == 0 for p in off.placements)
    assert off.runtime == plan.runtime


def test_accelerate_device_map_covers_every_tensor(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    names = bench_arms._tensor_modules(model)
    q = "model.layers.0.self_attn.q_proj"
    dm = bench_arms.accelerate_device_map(names, {q}, {q, "model.layers.1.mlp.up_proj"})
    assert dm[q] == 0 and dm["model.layers.1.mlp.up_proj"] == "cpu"
    assert dm["model.embed_tokens"] == 0 and list(dm.values()).count("cpu") == 1
    for key in model.state_dict():
        assert any(key.startswith(n + ".") for n in dm), key


# --- option validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "over, text",
    [
        ({"repeat": 0}, "--repeat is 0"),
        ({"warmup": -1}, "--warmup"),
        ({"max_new_tokens": 1}, "--max-new-tokens is 1"),
        ({"prompt_len": 0}, "--prompt-len"),
        ({"dtype": "int8"}, "--dtype"),
        ({"threads": 0}, "--threads"),
        ({"model": "x", "synthetic": "opt-125m"}, "mutually exclusive"),
        ({"synthetic": "opt-7b"}, "unknown preset"),
        ({"gpu_budget_bytes": (-1,)}, "negative"),
        ({"profile": "/nonexistent/profile.json"}, "does not exist"),
    ],
)
def test_bench_options_are_validated_on_construction(over, text):
    with pytest.raises(InputError, match=text):
        bench_options(**over)


@pytest.mark.parametrize(
    "setup", [{"device": "cpu"}, {"plan_path": "plan.json"}, {"gpu_budget_bytes": 2**30}]
)
def test_bench_plans_and_places_itself(setup):
    """A model setup naming a device, a plan or one budget is refused: bench decides them."""
    from hetegen_cli.run.setup import ModelSetup

    with pytest.raises(InputError, match="bench chooses each arm's device"):
        prepare.BenchOptions(setup=ModelSetup(**setup))


def test_parse_arms_and_budgets():
    assert prepare.parse_arms("cpu, hetegen,cpu") == ("cpu", "hetegen")
    with pytest.raises(InputError, match="unknown arm 'fast'"):
        prepare.parse_arms("hetegen,fast")
    assert sizes_bytes("4GiB, 8GB", "--gpu-memory") == (4 * 2**30, 8 * 10**9)
    with pytest.raises(InputError, match="empty entry"):
        sizes_bytes("4GiB,,8GiB", "--gpu-memory")
    assert prepare.prompt_ids(320, 5, 0) == prepare.prompt_ids(320, 5, 0)
    assert all(10 <= i < 320 for i in prepare.prompt_ids(320, 100, 1))


def test_gpu_plan_arms_run_end_to_end_on_the_cpu_stand_in(monkeypatch, tmp_path, tiny_llama_dir):
    """Pretend CUDA, hand every arm the CPU stand-in backend: the hetegen, offload and
    layer-split builders load and run real GPU plans (splits, streaming, hooks)."""
    from hetegen_cli.core.devices import CpuBackend

    monkeypatch.setattr(prepare, "cuda_available", lambda: True)
    for module in (runner, bench_arms):
        monkeypatch.setattr(module, "get_backend", lambda kind="auto": CpuBackend())
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(make_profile(threads=1, best="float32", cpu_dtypes={"float32": 50e9})))
    budgets = (2**30 + 200_000, 2**30 + 400_000)  # a tight and a looser budget
    doc = runner.run_bench(
        bench_options(
            model=str(tiny_llama_dir),
            profile=path,
            prompt_len=8,
            max_new_tokens=4,
            repeat=1,
            warmup=0,
            gpu_budget_bytes=budgets,
            arms=("hetegen", "offload", "layer-split", "cpu"),
        )
    )
    splits = [s["plan"]["split_count"] for s in doc["budgets"]]
    assert splits[0] > splits[1] > 0
    for section in doc["budgets"]:
        arms = arms_of(section)
        assert all(e["status"] == "ok" for e in arms.values()), arms
        assert arms["offload"]["engine_stats"]["bytes_streamed"] > 0
        assert arms["offload"]["info"]["config"]["mean_cpu_fraction_decode"] == 0.0
        assert arms["hetegen"]["token_check"] == {
            **arms["hetegen"]["token_check"],
            "compared_with": "offload",
            "tokens_match": True,
        }
        assert arms["hetegen"]["ratios"]["vs_offload"]["decode_tokens_per_s"] > 0
        assert arms["cpu"]["ratios"]["vs_layer_split"]["end_to_end_tokens_per_s"] > 0
        assert (
            arms["layer-split"]["info"]["config"]["gpu_layers"] == section["plan"]["layer_split_gpu_layers"]
        )
        assert arms["layer-split"]["token_check"]["tokens_match"] is True
    assert "reused_from_budget_index" in arms_of(doc["budgets"][1])["cpu"]


def arms_of(section: dict) -> dict:
    return {e["arm"]: e for e in section["arms"]}


def test_a_crashing_arm_is_recorded_and_the_others_still_run(gpu_world):
    """A RuntimeError (a CUDA error, a failed pinned allocation) in one arm marks it failed
    with its type, message and traceback tail; every other arm still runs, and the document
    is handed out after every arm."""

    def crash(ctx, prepared):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    runners = {a: fake_runner for a in prepare.ARMS} | {"offload": crash}
    updates = []
    doc = runner.run_bench(gpu_world, runners=runners, on_update=updates.append)
    arms = {e["arm"]: e for e in doc["budgets"][0]["arms"]}
    failed = arms["offload"]
    assert failed["status"] == "failed" and failed["error"]["type"] == "RuntimeError"
    assert "illegal memory access" in failed["reason"]
    assert any("raise RuntimeError" in line for line in failed["error"]["traceback_tail"])
    assert all(e["status"] == "ok" for a, e in arms.items() if a != "offload")
    assert arms["hetegen"]["ratios"]["vs_offload"]["decode_tokens_per_s"] is None
    arms_per_budget = len(doc["budgets"][0]["arms"])
    assert len(updates) == 2 * arms_per_budget  # two budgets
    assert [u["complete"] for u in updates] == [False] * len(updates) and doc["complete"] is True
    assert len(updates[0]["budgets"][0]["arms"]) == 1 and "summary" in updates[0]


def test_bench_output_is_rewritten_after_every_arm(tiny_opt_dir, tmp_path, monkeypatch):
    """Killed after the first arm, --output still holds a valid document with that arm."""
    from typer.testing import CliRunner

    from hetegen_cli.cli.app import app

    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(make_profile(gpu=False, best="float32", threads=1)))
    out = tmp_path / "bench.json"
    seen = []
    real = runner.run_arm

    def second_arm_is_killed(ctx, prepared, on_run=None):
        if seen:
            seen.append(json.loads(out.read_text()))  # what a kill here would leave
            raise KeyboardInterrupt
        seen.append(ctx.arm)
        return real(ctx, prepared, on_run)

    monkeypatch.setattr(runner, "run_arm", second_arm_is_killed)
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--model",
            str(tiny_opt_dir),
            "--profile",
            str(profile),
            "--prompt-len",
            "8",
            "--max-new-tokens",
            "4",
            "--repeat",
            "1",
            "--arms",
            "reference,cpu",
            "--output",
            str(out),
        ],
    )
    assert result.exit_code == 130
    partial = seen[1]
    assert partial["complete"] is False and partial["kind"] == "hetegen.bench"
    assert [e["arm"] for e in partial["budgets"][0]["arms"]] == ["reference"]
    assert partial["budgets"][0]["arms"][0]["status"] == "ok"
    assert json.loads(out.read_text()) == partial  # nothing half-written after the interrupt


def test_arms_run_in_the_order_given_else_the_default_order(gpu_world):
    order = ("gpu", "layer-split", "hetegen", "offload", "cpu", "accelerate")
    doc = _fake_doc(replace(gpu_world, arms=order))
    assert [e["arm"] for e in doc["budgets"][0]["arms"]] == list(order)
    doc = _fake_doc(replace(gpu_world, arms=None))
    assert [e["arm"] for e in doc["budgets"][0]["arms"]] == [
        a for a in prepare.RUN_ORDER if a in prepare.default_arms(True)
    ]


def test_the_gpu_arm_of_another_budget_is_the_token_baseline(gpu_world):
    """In a sweep whose small budget cannot hold the whole model, the all-GPU arm measured at
    the larger budget still checks the tokens of every arm at the small one."""
    from dataclasses import replace

    options = replace(gpu_world, gpu_budget_bytes=(2**30 + 400_000, 3 * 2**30), arms=("hetegen", "gpu"))
    doc = runner.run_bench(options, runners={a: fake_runner for a in prepare.ARMS})
    small, large = ({e["arm"]: e for e in s["arms"]} for s in doc["budgets"])
    assert small["gpu"]["status"] == "skipped" and large["gpu"]["status"] == "ok"
    assert small["hetegen"]["token_check"]["compared_with"] == "gpu"
    assert small["hetegen"]["token_check"]["tokens_match"] is True


def test_cpu_arm_runs_the_all_cpu_plans_formats_per_phase(tmp_path, tiny_llama_dir):
    """A profile whose GEMM favours bfloat16 and GEMV float32: the `cpu` arm runs the engine
    with bfloat16 prefill and float32 decode, the planner's all-CPU plan predicts it, and the
    reference arm stays plain float32 (the correctness baseline), with ratios against it."""
    path = tmp_path / "profile.json"
    path.write_text(
        json.dumps(
            make_profile(
                gpu=False,
                threads=1,
                best="float32",
                cpu_dtypes={"float32": 160e9, "bfloat16": 40e9},
                cpu_gemm={"float32": 1e11, "bfloat16": 1e12},
            )
        )
    )
    doc = runner.run_bench(
        bench_options(
            model=str(tiny_llama_dir),
            profile=path,
            prompt_len=8,
            max_new_tokens=4,
            repeat=1,
            warmup=0,
            arms=("cpu", "reference"),
        )
    )
    assert (doc["cpu_plan"]["cpu_formats"]["prefill"], doc["cpu_plan"]["cpu_formats"]["decode"]) == (
        "bfloat16",
        "float32",
    )
    arms = arms_of(doc["budgets"][0])
    cpu, ref = arms["cpu"], arms["reference"]
    assert cpu["status"] == ref["status"] == "ok"
    # the model in bfloat16 (the prefill format), decode's linears in float32
    assert cpu["info"]["compute_dtype"] == "bfloat16+float32" and ref["info"]["compute_dtype"] == "float32"
    assert cpu["engine_stats"]["split_calls"] > 0  # through the engine
    planned = doc["cpu_plan"]["predictions"]["cpu_only"]
    for key in ("prefill_s", "decode_tokens_per_s"):  # the arm as it ran = the all-CPU plan
        assert cpu["prediction"][key] == pytest.approx(planned[key])
    # the stock model in float32 everywhere is predicted on its own (its own rates)
    assert ref["prediction"]["decode_tokens_per_s"] != pytest.approx(planned["decode_tokens_per_s"])
    for arm in (cpu, ref):
        check = arm["prediction_check"]
        assert check["device"] == "cpu" and check["strategy"] == "cpu_only"
        for phase in ("prefill", "decode"):
            p = check["phases"][phase]
            assert p["ratio"] == pytest.approx(p["measured_s"] / p["predicted_s"])
    assert cpu["token_check"]["compared_with"] == "reference"
    assert cpu["ratios"]["vs_reference"]["prefill_tokens_per_s"] > 0


@pytest.mark.slow
def test_llama_cpp_arm_runs_the_same_gguf(tmp_path):
    """llama.cpp (where llama-cpp-python is installed) on the default model's GGUF, beside
    hetegen's int4 copy of it: same prompt, same loop, ratios side by side."""
    from hetegen_cli.bench.llama_cpp import llama_cpp_available

    if not llama_cpp_available():
        pytest.skip("llama-cpp-python is not installed (optional: pip install 'hetegen[llama]')")
    path = tmp_path / "profile.json"
    path.write_text(
        json.dumps(make_profile(gpu=False, threads=2, best="float32", cpu_dtypes={"float32": 50e9}))
    )
    doc = runner.run_bench(
        bench_options(
            profile=path, prompt_len=16, max_new_tokens=6, repeat=2, warmup=1, arms=("reference", "llama.cpp")
        )
    )
    arms = arms_of(doc["budgets"][0])
    llama, ref = arms["llama.cpp"], arms["reference"]
    assert llama["status"] == "ok" and ref["status"] == "ok", (llama.get("reason"), ref.get("reason"))
    assert ref["info"]["compute_dtype"] == f"int4+{ACTIVATIONS}"  # --quant auto: the GGUF's own format
    assert llama["info"]["config"]["gguf"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert llama["tokens_stable"] and len(llama["tokens"]) == 6  # the state resets between runs
    assert ref["ratios"]["vs_llama_cpp"]["decode_tokens_per_s"] > 0
    assert max(abs(v) for v in llama["logits"]["top1_logits"]) > 0  # its logits, not zeros
    # the same greedy tokens as hetegen's int4, or a divergence at a near tie
    assert llama["token_check"]["compared_with"] == "reference" and llama["token_check"]["verified"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="file-backed RSS is reported on Linux")
def test_the_rss_peak_tells_a_memory_map_from_anonymous_memory(tmp_path):
    """A file's pages read through a memory map count in RSS but not in its anonymous part;
    memory the process writes counts in both."""
    proc = psutil.Process()

    def anon() -> int:
        info = proc.memory_info()
        return info.rss - info.shared

    size = 96 * 2**20
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(2**20) * (size // 2**20))
    start = anon()
    with RssSampler() as mapped, open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        sum(m[i] for i in range(0, size, 4096))  # read every page
        time.sleep(0.05)
    assert mapped.peak - mapped.before >= size * 0.9
    assert mapped.peak_anon is not None and mapped.peak_anon - start < size * 0.5
    start = anon()
    with RssSampler() as written:
        block = bytearray(size)
        block[::4096] = b"\x01" * len(range(0, size, 4096))  # write every page
        time.sleep(0.05)
    assert written.peak_anon - start >= size * 0.9
    del block
