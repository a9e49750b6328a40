"""The cost model: affine share times, the balanced split, fitting rates from a profile.

Pure tests with made-up hardware numbers (round figures, so results can be checked by hand).
"""

from __future__ import annotations

import math

import pytest

from hetegen_cli import costmodel as cm
from hetegen_cli.errors import ProfileError
from hetegen_cli.plan import ROW_GRANULARITY, round_rows

GB = 1e9
HUGE = 1e30  # a rate so high its term vanishes


def _stats(seconds: float) -> dict:
    return {"mean": seconds, "sd": 0.0, "samples": [seconds]}


def make_profile(*, cpu_bw: float = 50 * GB, cpu_call_s: float = 0.0, cpu_flops: float = 1e12,
                 cpu_dtypes: dict | None = None, best: str = "float16", dram: float = 70 * GB,
                 gpu: bool = True, pcie_bw: float = 25 * GB, pcie_copy_s: float = 0.0,
                 hbm: float = 1000 * GB, gpu_call_s: float = 0.0, gpu_flops: float = 100e12,
                 free: int = 7 * 2**30, total: int = 8 * 2**30, cpu_ratio: float = 1.0,
                 pcie_ratio: float = 1.0, ram_available: int = 64 * 2**30, threads: int = 8,
                 created_utc: str = "2026-01-01T00:00:00Z") -> dict:
    """A schema-valid profile document (profile_doc.SCHEMA) with exactly these rates.

    cpu_dtypes: dtype -> GEMV bytes/s (default: `best` at cpu_bw, float32 at cpu_bw, i.e.
    half the params/s). Timings are t = call + bytes / rate on a few shapes.
    """
    cpu_dtypes = cpu_dtypes or {best: cpu_bw, "float32": cpu_bw}
    size = {"float32": 4, "float16": 2, "bfloat16": 2}
    gemv, gemm = [], []
    for dtype, bw in cpu_dtypes.items():
        for out, inp in ((2048, 2048), (4096, 4096), (11008, 4096)):
            wb = out * inp * size[dtype]
            sec = cpu_call_s + wb / bw
            gemv.append({"dtype": dtype, "out_features": out, "in_features": inp,
                         "weight_bytes": wb, "threads": threads, "seconds": _stats(sec),
                         "weight_bytes_per_s": wb / sec, "params_per_s": out * inp / sec})
        for tokens in (128, 512):
            sec = 2 * tokens * 4096 * 4096 / cpu_flops
            gemm.append({"dtype": dtype, "tokens": tokens, "out_features": 4096,
                         "in_features": 4096, "threads": threads, "seconds": _stats(sec),
                         "flops_per_s": cpu_flops})
    doc = {
        "schema_version": 1, "kind": "hetegen.profile", "hetegen_version": "0.1.0",
        "created_utc": created_utc, "quick": True,
        "host": {"cpu_model": "Made-up CPU (test)", "physical_cores": threads,
                 "logical_cores": 2 * threads, "ram_total_bytes": 2 * ram_available,
                 "ram_available_bytes": ram_available, "features": {}, "os": "Linux",
                 "python": "3.12", "torch": "2.13"},
        "cpu": {"threads": threads, "memory_read_bytes_per_s": _stats(dram), "gemv": gemv,
                "gemm": gemm, "thread_sweep": [], "best_gemv_dtype": best},
        "gpu": None, "gpu_note": "no CUDA GPU: GPU measurements skipped",
    }
    if gpu:
        transfers = []
        for nbytes in (2**20, 16 * 2**20, 128 * 2**20):
            sec = pcie_copy_s + nbytes / pcie_bw
            transfers.append({"direction": "h2d", "memory": "pinned", "size_bytes": nbytes,
                              "seconds": _stats(sec), "bytes_per_s": nbytes / sec})
            transfers.append({"direction": "h2d", "memory": "pageable", "size_bytes": nbytes,
                              "seconds": _stats(2 * sec), "bytes_per_s": nbytes / sec / 2})
        ggemv, ggemm = [], []
        for dtype in ("float16", "bfloat16"):
            for out, inp in ((4096, 4096), (11008, 4096)):
                wb = out * inp * 2
                sec = gpu_call_s + wb / hbm
                ggemv.append({"dtype": dtype, "out_features": out, "in_features": inp,
                              "weight_bytes": wb, "seconds": _stats(sec),
                              "weight_bytes_per_s": wb / sec})
            for tokens in (128, 512):
                ggemm.append({"dtype": dtype, "tokens": tokens, "out_features": 4096,
                              "in_features": 4096,
                              "seconds": _stats(2 * tokens * 4096 * 4096 / gpu_flops),
                              "flops_per_s": gpu_flops})
        doc["gpu"] = {
            "name": "Made-up GPU (test)", "total_memory_bytes": total, "free_memory_bytes": free,
            "compute_capability": "8.6", "gemm": ggemm, "gemv": ggemv, "transfers": transfers,
            "concurrent": {"dtype": best, "size_bytes": 64 * 2**20,
                           "h2d_alone_bytes_per_s": pcie_bw, "h2d_bytes_per_s": pcie_bw * pcie_ratio,
                           "cpu_gemv_alone_weight_bytes_per_s": cpu_bw,
                           "cpu_gemv_weight_bytes_per_s": cpu_bw * cpu_ratio},
        }
        doc["gpu_note"] = None
    return doc


def simple_rates(**over) -> cm.Rates:
    """B_cpu 50 GB/s, B_pcie 25 GB/s, no overheads, an infinitely fast GPU, fp16 on both."""
    base = dict(weights_dtype="float16", cpu_dtype="float16", cpu_bytes_per_s=50 * GB,
                cpu_bytes_per_s_concurrent=50 * GB, cpu_flops_per_s=1e12, dram_bytes_per_s=HUGE,
                pcie_bytes_per_s=25 * GB, pcie_bytes_per_s_concurrent=25 * GB,
                gpu_bytes_per_s=HUGE, gpu_flops_per_s=HUGE)
    base.update(over)
    return cm.Rates(**base)


def test_profile_builder_is_schema_valid():
    from hetegen_cli.profile_doc import validate_profile

    validate_profile(make_profile())
    validate_profile(make_profile(gpu=False))


def test_decode_fraction_is_two_thirds_for_50_and_25_gbps():
    rates = simple_rates()
    f = cm.balanced_fraction(rates, 4096, 4096, tokens=1)
    assert f == pytest.approx(2 / 3, rel=1e-12)
    # 2/3 * 4096 = 2730.67 rows -> 170.67 granules -> 171 * 16 = 2736 rows
    assert round_rows(f, 4096) == 2736
    assert round_rows(f, 4096) % ROW_GRANULARITY == 0
    # T_layer* = S / (B_cpu + B_pcie)
    s = 4096 * 4096 * 2
    t = cm.split_times(rates, 4096, 4096, round(f * 4096), 1)
    assert t.layer_s == pytest.approx(s / (75 * GB), rel=1e-3)


def test_fraction_formula_matches_t_g_over_t_c_plus_t_g():
    rates = simple_rates(gpu_bytes_per_s=500 * GB, cpu_dtype="float32",
                         cpu_bytes_per_s=40 * GB, cpu_bytes_per_s_concurrent=40 * GB)
    t_c = 4 / (40 * GB)                     # per param: fp32 on the CPU
    t_g = 2 / (25 * GB) + 2 / (500 * GB)    # per param: fp16 over PCIe, then HBM
    assert cm.balanced_fraction(rates, 1000, 512, 1) == pytest.approx(t_g / (t_c + t_g), rel=1e-12)


@pytest.mark.parametrize("shape", [(768, 768), (4096, 4096), (11008, 4096), (4096, 11008), (50272, 7168)])
@pytest.mark.parametrize("tokens", [1, 4, 512])
def test_balance_condition_holds(shape, tokens):
    rates = simple_rates(cpu_call_s=30e-6, pcie_copy_s=10e-6, gpu_call_s=8e-6,
                         gpu_bytes_per_s=900 * GB, gpu_flops_per_s=80e12,
                         cpu_bytes_per_s_concurrent=40 * GB, pcie_bytes_per_s_concurrent=22 * GB)
    out, inp = shape
    f = cm.balanced_fraction(rates, out, inp, tokens)
    assert 0.0 <= f <= 1.0
    if 0.0 < f < 1.0:  # before rounding: exact balance
        cpu = cm.cpu_time(rates, f * out, inp, tokens)
        path = cm.transfer_time(rates, (1 - f) * out, inp) + cm.gpu_time(rates, (1 - f) * out, inp, tokens)
        assert cpu == pytest.approx(path, rel=0.01)
    rows = round_rows(f, out)
    t = cm.split_times(rates, out, inp, rows, tokens)
    if 0 < rows < out:  # after rounding: off by at most half a granule on each side
        slack = ROW_GRANULARITY / 2 * (cm.cpu_row_s(rates, inp, tokens)
                                       + cm.transfer_row_s(rates, inp) + cm.gpu_row_s(rates, inp, tokens))
        assert abs(t.cpu_s - (t.transfer_s + t.gpu_s)) <= slack * 1.0001


def test_prefill_fraction_near_zero_when_gpu_much_faster():
    rates = simple_rates(gpu_flops_per_s=100e12, gpu_bytes_per_s=1000 * GB)
    f = cm.balanced_fraction(rates, 4096, 4096, tokens=512)
    # method.md section 6: F_cpu 1 TFLOP/s, n 512, fp16: about 0.07
    t_c = 2 * 512 / 1e12
    t_g = 2 / (25 * GB) + max(2 / (1000 * GB), 2 * 512 / 100e12)
    assert f == pytest.approx(t_g / (t_c + t_g), rel=1e-12)
    assert f < 0.1
    assert cm.balanced_fraction(rates, 4096, 4096, tokens=1) > 0.6


def test_overheads_clamp_small_matrices_to_the_gpu_path():
    rates = simple_rates(cpu_call_s=1e-3)  # a CPU call costs more than moving the whole matrix
    assert cm.balanced_fraction(rates, 64, 64, 1) == 0.0


def test_no_gpu_means_all_cpu():
    assert cm.balanced_fraction(simple_rates(has_gpu=False), 4096, 4096, 1) == 1.0


def test_fit_affine_recovers_line_and_falls_back():
    pts = [(1e6, 20e-6 + 1e6 / 40e9), (1e8, 20e-6 + 1e8 / 40e9), (4e8, 20e-6 + 4e8 / 40e9)]
    a, rate = cm.fit_affine(pts)
    assert a == pytest.approx(20e-6, rel=1e-6) and rate == pytest.approx(40e9, rel=1e-9)
    assert cm.fit_affine([(1e8, 1e-2)]) == (0.0, pytest.approx(1e10))
    # a negative intercept falls back to the largest point through the origin
    a, rate = cm.fit_affine([(1e6, 1e-3), (2e6, 3e-3)])
    assert a == 0.0 and rate == pytest.approx(2e6 / 3e-3)
    with pytest.raises(ValueError):
        cm.fit_affine([])


def test_rates_from_profile_reads_the_measured_numbers():
    doc = make_profile(cpu_bw=48 * GB, cpu_call_s=25e-6, pcie_bw=24 * GB, pcie_copy_s=12e-6,
                       hbm=800 * GB, gpu_call_s=7e-6, cpu_ratio=0.8, pcie_ratio=0.9,
                       cpu_dtypes={"bfloat16": 48 * GB, "float32": 60 * GB}, best="bfloat16")
    rates, notes = cm.rates_from_profile(doc, "float16")
    assert rates.cpu_dtype == "bfloat16" and rates.cpu_threads == 8
    assert rates.cpu_bytes_per_s == pytest.approx(48 * GB, rel=1e-9)
    assert rates.cpu_call_s == pytest.approx(25e-6, rel=1e-6)
    assert rates.cpu_bytes_per_s_concurrent == pytest.approx(0.8 * 48 * GB, rel=1e-9)
    # B_pcie from the largest copy (which still includes its overhead), overhead from the smallest
    big = 128 * 2**20
    assert rates.pcie_bytes_per_s == pytest.approx(big / (12e-6 + big / (24 * GB)), rel=1e-12)
    assert rates.pcie_copy_s == pytest.approx(12e-6, rel=0.01)
    assert rates.pcie_bytes_per_s_concurrent == pytest.approx(0.9 * rates.pcie_bytes_per_s)
    assert rates.gpu_bytes_per_s == pytest.approx(800 * GB, rel=1e-9)
    assert rates.gpu_call_s == pytest.approx(7e-6, rel=1e-6)
    assert rates.cpu_flops_per_s == 1e12 and rates.gpu_flops_per_s == 100e12
    assert rates.dram_bytes_per_s == 70 * GB and rates.has_gpu
    assert notes == []
    # an explicit CPU dtype: float32 reads 4 bytes a parameter
    rates32, _ = cm.rates_from_profile(doc, "float16", cpu_dtype="float32")
    assert rates32.cpu_params_per_s == pytest.approx(60 * GB / 4, rel=1e-9)


def test_rates_from_profile_without_gpu_and_unmeasured_dtype():
    rates, _ = cm.rates_from_profile(make_profile(gpu=False), "float16")
    assert not rates.has_gpu
    with pytest.raises(ProfileError, match="no CPU GEMV measurements for bfloat16"):
        cm.rates_from_profile(make_profile(gpu=False), "float16", cpu_dtype="bfloat16")
    # GPU rates of float32 weights are not measured: fall back with a note
    _, notes = cm.rates_from_profile(make_profile(), "float32")
    assert any("float32" in n for n in notes)


def test_attention_time_is_max_of_flops_and_kv_reads():
    rates = simple_rates(gpu_flops_per_s=1e12, gpu_bytes_per_s=1e9)
    t = cm.attention_time(rates, num_layers=2, num_heads=4, head_dim=8, kv_bytes=10**6,
                          query_tokens=1, context_tokens=100, batch=1, on_gpu=True)
    assert t == pytest.approx(max(4 * 2 * 100 * 4 * 8 / 1e12, 1e6 / 1e9))
    assert math.isfinite(t)


def test_concurrent_rates_never_exceed_dram_together():
    rates, notes = cm.rates_from_profile(make_profile(cpu_bw=50 * GB, pcie_bw=25 * GB, dram=60 * GB), "float16")
    both = rates.cpu_bytes_per_s_concurrent + rates.pcie_bytes_per_s_concurrent
    assert both == pytest.approx(60 * GB, rel=1e-9)
    assert any("exceed the measured memory bandwidth" in n for n in notes)
