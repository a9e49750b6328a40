"""bench on a mixture-of-experts model: the `experts-on-cpu` arm (every routed expert on the
CPU, the rest placed by the planner: llama.cpp's --cpu-moe) runs real plans through the engine
on the CPU stand-in beside the hetegen arm, and a dense model skips it with the reason."""

from __future__ import annotations

import json

import pytest

from hetegen_cli.bench import present as bench_present
from hetegen_cli.bench import runner
from tests.fakes import make_profile
from tests.helpers import fake_cuda_for_bench, quick_bench_options, tiny_moe_folder


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory):
    return tiny_moe_folder(tmp_path_factory.mktemp("bench-moe"), num_experts=4)


def _bench(monkeypatch, tmp_path, model, arms: tuple[str, ...]) -> dict:
    """One bench of `arms` at 3 GiB, CUDA faked (the CPU stand-in backend), planned from a
    made-up GPU profile."""
    fake_cuda_for_bench(monkeypatch)
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(make_profile(threads=1, best="float32", cpu_dtypes={"float32": 50e9})))
    return runner.run_bench(quick_bench_options(model, path, (3 * 2**30,), arms))


def test_experts_on_cpu_arm_runs_beside_hetegen_with_the_same_tokens(monkeypatch, tmp_path, tiny_moe_dir):
    doc = _bench(monkeypatch, tmp_path, tiny_moe_dir, ("hetegen", "experts-on-cpu"))
    (section,) = doc["budgets"]
    arms = {e["arm"]: e for e in section["arms"]}
    assert all(e["status"] == "ok" for e in arms.values()), arms
    # the budget's own plan keeps experts on the GPU side; the arm's plan keeps none there
    assert section["plan"]["experts_on_gpu"] > 0
    moe = section["experts_on_cpu_plan"]
    assert moe["experts_on_gpu"] == 0 and moe["experts_count"] == section["plan"]["experts_count"]
    assert arms["experts-on-cpu"]["engine_stats"]["experts_gpu"] == 0
    assert arms["experts-on-cpu"]["engine_stats"]["experts_cpu"] > 0
    assert arms["hetegen"]["engine_stats"]["experts_gpu"] > 0
    assert arms["experts-on-cpu"]["tokens"] == arms["hetegen"]["tokens"]
    assert arms["experts-on-cpu"]["predicted"]["figures"]["decode_tokens_per_s"] > 0
    assert arms["hetegen"]["ratios"]["vs_experts_on_cpu"]["decode_tokens_per_s"] > 0
    rows = {r["arm"]: r for r in bench_present.csv_rows(doc)}
    assert rows["hetegen"]["decode_vs_experts_on_cpu"] > 0


def test_a_dense_model_skips_the_experts_on_cpu_arm_with_the_reason(monkeypatch, tmp_path, tiny_llama_dir):
    doc = _bench(monkeypatch, tmp_path, tiny_llama_dir, ("experts-on-cpu",))
    (entry,) = doc["budgets"][0]["arms"]
    assert entry["status"] == "skipped" and "dense model" in entry["reason"]
    assert "experts_on_cpu_plan" not in doc["budgets"][0]
