"""bench figures: statistics over runs and the bound of each arm (pure)."""

from __future__ import annotations

import math

import pytest

from hetegen_cli.bench import report as bench_report
from tests.bench.test_runner import sample


def test_metrics_mean_sd_and_end_to_end_on_known_inputs():
    m = bench_report.metrics([sample(1.0, 1.0), sample(1.0, 3.0)])
    # decode 3/1 = 3 and 3/3 = 1 tok/s: mean 2, sample sd sqrt(2)
    assert m["decode_tokens_per_s"]["mean"] == pytest.approx(2.0)
    assert m["decode_tokens_per_s"]["sd"] == pytest.approx(math.sqrt(2))
    assert m["decode_tokens_per_s"]["samples"] == [3.0, 1.0]
    # end-to-end = 4 generated / total (2 s, 4 s) = 2, 1
    assert m["end_to_end_tokens_per_s"]["mean"] == pytest.approx(1.5)
    assert m["prefill_s"]["sd"] == 0.0 and m["prefill_s"]["n"] == 2


def test_own_bounds_per_arm():
    bounds = {
        "w_gpu_bytes": 100,
        "w_host_bytes": 900,
        "b_cpu_bytes_per_s": 50.0,
        "b_dram_bytes_per_s": 40.0,
        "b_hbm_bytes_per_s": 1000.0,
        "offload_s_per_token": 3.0,
        "layer_split_s_per_token": 2.0,
        "hybrid_s_per_token": 1.0,
        "bound_s_per_token": 1.0,
    }
    assert bench_report.own_bound_s("hetegen", bounds, 1000) == ("hybrid", 1.0)
    assert bench_report.own_bound_s("accelerate", bounds, 1000) == ("offload", 3.0)
    assert bench_report.own_bound_s("layer-split", bounds, 1000) == ("layer_split", 2.0)
    assert bench_report.own_bound_s("cpu", bounds, 1000) == ("cpu_only", 1000 / 40.0)
    assert bench_report.own_bound_s("gpu", bounds, 1000) == ("gpu", 1.0)
    cpu_plan = {"cpu_only_s_per_token": 5.0, "bound_s_per_token": 5.0}
    assert bench_report.own_bound_s("hetegen", cpu_plan, 1000) == ("cpu_only", 5.0)
