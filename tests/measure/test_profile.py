"""Measuring: the timing loop, deterministic documents with an injected timer, threads, the
GPU path on the CPU stand-in."""

from __future__ import annotations

from dataclasses import replace

import pytest

from hetegen_cli.core import devices, quant
from hetegen_cli.measure import cpu as profile_cpu
from hetegen_cli.measure import engine_costs, timing
from hetegen_cli.measure import profile as measure_profile
from hetegen_cli.measure.profile import run_profile
from hetegen_cli.models.formats import cpu_gemm
from hetegen_cli.profile.document import load_profile, validate_profile
from tests.fakes import TICK, TINY, fake_timer, tiny_profile


def test_measure_warms_up_and_batches_short_calls():
    calls = []
    sec = timing.measure(
        lambda: calls.append(1), timing.HostClock(fake_timer(0.001)), repeat=3, warmup=2, min_sample_s=0.004
    )
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
        assert g["seconds"] == {
            "mean": TICK,
            "sd": 0.0,
            "median": TICK,
            "min": TICK,
            "max": TICK,
            "n": TINY.repeat,
            "samples": [TICK] * TINY.repeat,
            "calls_per_sample": 1,
        }
        assert g["weight_bytes_per_s"] == g["weight_bytes"] / TICK
        assert g["params_per_s"] == g["out_features"] * g["in_features"] / TICK
        assert g["pool_copies"] >= 2
    for g in cpu["gemm"]:
        assert g["flops_per_s"] == 2 * g["tokens"] * g["out_features"] * g["in_features"] / TICK
    mem = cpu["memory_read_bytes_per_s"]
    assert mem["samples"] == [mem["buffer_bytes"] / TICK] * TINY.repeat
    assert cpu["thread_sweep"] == []  # quick sizes skip the sweep
    # quantized GEMV with the packed kernels, at every shape the kernels take
    measured = {(g["format"], g["out_features"], g["in_features"]) for g in cpu["quant_gemv"]}
    for fmt in ("int8", "int4"):
        want = {(fmt, o, i) for o, i in TINY.gemv_shapes if quant.kernel_takes(fmt, o, i)}
        assert want and {m for m in measured if m[0] == fmt} == want
    for g in cpu["quant_gemv"]:
        assert g["weight_bytes"] == quant.weight_bytes(g["format"], g["out_features"], g["in_features"])
        assert g["params_per_s"] == g["out_features"] * g["in_features"] / TICK
    # the GEMM of each class of prompt product, as prompt products at the profile's threads choose it
    with timing.torch_threads(cpu["threads"]):
        assert cpu["prompt_gemm"] == {cls: cpu_gemm.choice(cls).backend for cls in cpu_gemm.CLASSES}


def test_thread_sweep_covers_one_half_and_all_cores():
    assert profile_cpu.sweep_threads(8, 16) == [1, 8, 16]
    assert profile_cpu.sweep_threads(2, 2) == [1, 2]
    doc = run_profile(quick=False, threads=1, timer=fake_timer(), sizes=replace(TINY, thread_sweep=True))
    counts = {s["threads"] for s in doc["cpu"]["thread_sweep"]}
    assert counts == set(profile_cpu.sweep_threads(1, doc["host"]["physical_cores"]))
    validate_profile(doc)


def test_random_data_is_never_all_zero():
    import torch

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = timing.random_tensor((1 << 22) + 5, dtype)
        assert t.dtype == dtype and t.numel() == (1 << 22) + 5
        assert t.abs().max() > 0.5 and (t == 0).float().mean() < 0.01


def test_gpu_section_on_the_cpu_stand_in(capsys):
    """The GPU code path (copies, concurrency, tables) run on devices.CpuBackend."""
    from hetegen_cli.cli.profile import render

    doc = tiny_profile(gpu_backend=devices.CpuBackend())
    validate_profile(doc)
    gpu = doc["gpu"]
    assert doc["gpu_note"] is None
    kinds = {(t["direction"], t["memory"]) for t in gpu["transfers"]}
    assert kinds == {("h2d", "pinned"), ("h2d", "pageable"), ("d2h", "pinned"), ("d2h", "pageable")}
    assert len(gpu["transfers"]) == 4 * len(TINY.transfer_sizes)
    assert {g["dtype"] for g in gpu["gemm"]} == {"float16", "bfloat16"}
    assert gpu["concurrent"]["dtype"] == doc["cpu"]["best_gemv_dtype"]
    render(doc)
    out = capsys.readouterr().out
    assert "Host <-> GPU copies" in out and "Concurrency" in out


@pytest.mark.cuda
def test_real_gpu_profile_tiny():
    doc = run_profile(quick=True, sizes=TINY)
    validate_profile(doc)
    assert doc["gpu"] is not None and doc["gpu"]["total_memory_bytes"] > 0
    assert all(t["bytes_per_s"] > 0 for t in doc["gpu"]["transfers"])


def test_default_threads_leave_a_core_for_the_gpu_launcher():
    from hetegen_cli.measure.cpu import default_threads

    assert default_threads(2, has_gpu=False) == 2
    assert default_threads(16, has_gpu=False) == 16
    assert default_threads(16, has_gpu=True) == 15
    assert default_threads(2, has_gpu=True) == 2


def test_a_failing_engine_cost_measurement_keeps_the_profile(monkeypatch, hetegen_home):
    """plan, run and bench measure a missing profile themselves (load_or_measure, engine
    costs included): an engine-cost failure there (the first real engine run on a new GPU) is
    recorded, not fatal."""
    said = []
    monkeypatch.setattr("hetegen_cli.measure.profile.warn", said.append)
    monkeypatch.setattr(measure_profile, "run_profile", lambda **_: tiny_profile())

    def failing(**kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(engine_costs, "measure_for_profile", failing)
    doc, identity = measure_profile.load_or_measure(None)
    assert doc["engine"] is None and doc["cpu"]["gemv"]
    assert doc["engine_error"]["type"] == "RuntimeError"
    assert doc["engine_error"]["traceback"][-1].endswith("an illegal memory access was encountered")
    engine_warnings = [w for w in said if "fixed costs" in w]  # not the busy machine's
    assert len(engine_warnings) == 1 and "engine_error" in engine_warnings[0]
    assert load_profile(hetegen_home / "profile.json") == doc
    assert identity["path"] == str(hetegen_home / "profile.json")


def test_a_profile_measured_on_the_fly_has_the_engine_costs(monkeypatch, hetegen_home):
    """load_or_measure measures the engine's fixed costs with the profile it measures, with
    the profile's CPU threads; a saved profile is read as it is, never measured again."""
    from tests.plan.engine_fakes import engine_section

    seen = []
    monkeypatch.setattr(measure_profile, "run_profile", lambda **_: tiny_profile(threads=1))

    def measured(**kwargs):
        seen.append(kwargs)
        return engine_section(devices=("cpu",))

    monkeypatch.setattr(engine_costs, "measure_for_profile", measured)
    doc, _ = measure_profile.load_or_measure(None)
    assert doc["engine"] == engine_section(devices=("cpu",)) and "engine_error" not in doc
    assert seen == [{"threads": 1, "quick": True, "gpu_backend": None}]
    assert load_profile(hetegen_home / "profile.json") == doc
    assert measure_profile.load_or_measure(None)[0] == doc and len(seen) == 1
