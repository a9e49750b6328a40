"""The cost model: affine share times, the balanced split, the pipeline, attention.

Pure tests with made-up hardware numbers (round figures, so results can be checked by hand).
"""

from __future__ import annotations

import math

import pytest

from hetegen_cli.plan import costmodel as cm
from hetegen_cli.plan.document import ROW_GRANULARITY, round_rows
from tests.fakes import DESKTOP_RATES, GB, simple_rates


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
    rates = simple_rates(
        gpu_bytes_per_s=500 * GB,
        cpu_dtype="float32",
        cpu_bytes_per_s=40 * GB,
        cpu_bytes_per_s_concurrent=40 * GB,
    )
    t_c = 4 / (40 * GB)  # per param: fp32 on the CPU
    t_g = 2 / (25 * GB) + 2 / (500 * GB)  # per param: fp16 over PCIe, then HBM
    assert cm.balanced_fraction(rates, 1000, 512, 1) == pytest.approx(t_g / (t_c + t_g), rel=1e-12)


@pytest.mark.parametrize("shape", [(768, 768), (4096, 4096), (11008, 4096), (4096, 11008), (50272, 7168)])
@pytest.mark.parametrize("tokens", [1, 4, 512])
def test_balance_condition_holds(shape, tokens):
    rates = DESKTOP_RATES
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
        slack = (
            ROW_GRANULARITY
            / 2
            * (
                cm.cpu_row_s(rates, inp, tokens)
                + cm.transfer_row_s(rates, inp)
                + cm.gpu_row_s(rates, inp, tokens)
            )
        )
        assert abs(t.cpu_s - (t.transfer_s + t.gpu_s)) <= slack * 1.0001


def test_prefill_fraction_near_zero_when_gpu_much_faster():
    rates = simple_rates(gpu_flops_per_s=100e12, gpu_bytes_per_s=1000 * GB)
    f = cm.balanced_fraction(rates, 4096, 4096, tokens=512)
    # docs/method.md §6: F_cpu 1 TFLOP/s, n 512, fp16: about 0.07
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


@pytest.mark.parametrize("bytes_per_param", [0.5625, 1.0625, 2.0])
def test_a_one_token_product_costs_what_the_gemv_fit_says_even_below_the_gemm_rate(bytes_per_param):
    """A quantized format's rates carry the float GEMM's FLOP rate (its prefill stand-in); where
    that is below the rate its own GEMV reached (2 FLOPs a weight read at B_cpu), one token still
    costs the GEMV's bytes / B_cpu, and more tokens cost more: the compute bound then takes over
    at the larger of the two rates."""
    rates = simple_rates(
        cpu_bytes_per_s=20 * GB,
        cpu_bytes_per_s_concurrent=20 * GB,
        cpu_flops_per_s=10e9,  # a slow GEMM: 2 / 10e9 s a weight, above 0.56 / 20e9
        weight_bytes_per_param=bytes_per_param,
        cpu_call_s=30e-6,
    )
    gemv_flops = 2 * 20 * GB / bytes_per_param
    rows, cols = 4096, 4096
    assert cm.cpu_time(rates, rows, cols, 1, False) == pytest.approx(
        30e-6 + rows * cols * bytes_per_param / (20 * GB)
    )
    at_64 = rows * cols * 2 * 64 / max(10e9, gemv_flops)
    assert cm.cpu_time(rates, rows, cols, 64, False) == pytest.approx(30e-6 + at_64)


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


def test_attention_time_is_max_of_flops_and_kv_reads():
    rates = simple_rates(gpu_flops_per_s=1e12, gpu_bytes_per_s=1e9)
    t = cm.attention_time(
        rates,
        num_layers=2,
        num_heads=4,
        head_dim=8,
        kv_bytes=10**6,
        query_tokens=1,
        context_tokens=100,
        batch=1,
        on_gpu=True,
    )
    assert t == pytest.approx(max(4 * 2 * 100 * 4 * 8 / 1e12, 1e6 / 1e9))
    assert math.isfinite(t)
