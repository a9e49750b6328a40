"""Fitting the cost model's rates from a profile document (pure, made-up profiles)."""

from __future__ import annotations

import pytest

from hetegen_cli.core.errors import ProfileError
from hetegen_cli.plan.costmodel.fit import rates_from_profile
from hetegen_cli.profile.document import validate_profile
from tests.fakes import GB, make_profile


def test_profile_builder_is_schema_valid():
    validate_profile(make_profile())
    validate_profile(make_profile(gpu=False))


def test_rates_from_profile_reads_the_measured_numbers():
    doc = make_profile(
        cpu_bw=48 * GB,
        cpu_call_s=25e-6,
        pcie_bw=24 * GB,
        pcie_copy_s=12e-6,
        hbm=800 * GB,
        gpu_call_s=7e-6,
        cpu_ratio=0.8,
        pcie_ratio=0.9,
        cpu_dtypes={"bfloat16": 48 * GB, "float32": 60 * GB},
        best="bfloat16",
    )
    rates, notes = rates_from_profile(doc, "float16")
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
    assert rates.h2d_copy_engines == 1  # no copy-engine probe: the safe assumption
    doc["gpu"]["copy_engine_probe"] = {
        "small_copy_alone_s": 1e-5,
        "small_copy_during_big_s": 1.1e-5,
        "big_copy_s": 0.01,
        "h2d_copy_engines": 2,
    }
    assert rates_from_profile(doc, "float16")[0].h2d_copy_engines == 2
    del doc["gpu"]["copy_engine_probe"]
    # an explicit CPU dtype: float32 reads 4 bytes a parameter
    rates32, _ = rates_from_profile(doc, "float16", cpu_dtype="float32")
    assert rates32.cpu_params_per_s == pytest.approx(60 * GB / 4, rel=1e-9)


def test_rates_from_profile_without_gpu_and_unmeasured_dtype():
    rates, _ = rates_from_profile(make_profile(gpu=False), "float16")
    assert not rates.has_gpu
    with pytest.raises(ProfileError, match="no CPU GEMV measurements for bfloat16"):
        rates_from_profile(make_profile(gpu=False), "float16", cpu_dtype="bfloat16")
    # GPU rates of float32 weights are not measured: fall back with a note
    _, notes = rates_from_profile(make_profile(), "float32")
    assert any("float32" in n for n in notes)


def test_concurrent_rates_never_exceed_dram_together():
    rates, notes = rates_from_profile(make_profile(cpu_bw=50 * GB, pcie_bw=25 * GB, dram=60 * GB), "float16")
    both = rates.cpu_bytes_per_s_concurrent + rates.pcie_bytes_per_s_concurrent
    assert both == pytest.approx(60 * GB, rel=1e-9)
    assert any("exceed the measured memory bandwidth" in n for n in notes)
