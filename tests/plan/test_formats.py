"""The CPU share's format per phase (plan.formats, solver.make_plan): chosen from the profile's
GEMM ranking for prefill and GEMV ranking for decode, weighed against host memory."""

from __future__ import annotations

import pytest

from hetegen_cli.core.errors import PlanError, ProfileError
from hetegen_cli.models.architecture.spec import spec_from_config
from hetegen_cli.models.shapes.presets import preset_config
from hetegen_cli.plan.formats import FORMAT_TOLERANCE, Tried, candidate_pairs, pick
from hetegen_cli.plan.request import PlanRequest
from hetegen_cli.plan.solver import make_plan
from tests.fakes import GB, make_profile

GiB = 2**30
F32, F16, BF16 = "float32", "float16", "bfloat16"


def spec(name: str = "opt-1.3b", dtype: str = F32):
    return spec_from_config(preset_config(name), name, dtype)


def request(**over) -> PlanRequest:
    base = dict(prompt_len=512, max_new_tokens=32, cpu_budget_bytes=64 * GiB)
    return PlanRequest(**{**base, **over})


def cpu(gemv: dict, gemm: dict, gpu: bool = False, **kw) -> dict:
    """A profile whose CPU GEMV (bytes/s per dtype) and GEMM (FLOP/s) rankings are given."""
    return make_profile(gpu=gpu, cpu_dtypes=gemv, cpu_gemm=gemm, best=max(gemv, key=gemv.get), **kw)


# The issue's machine (AMD EPYC without AMX): float16 GEMV 1.25x float32's params/s, float16
# GEMM ~24 GFLOP/s against ~105 for float32.
NO_AMX = cpu({F32: 40 * GB, F16: 25 * GB}, {F32: 105e9, F16: 24e9})
# An Intel CPU with AMX where small float32 GEMVs win: bfloat16 GEMM 6x faster, GEMV slower.
AMX = cpu({F32: 32 * GB, BF16: 12 * GB}, {F32: 300e9, BF16: 1.9e12})
# Both rankings agree: bfloat16 wins GEMM and GEMV.
AGREE = cpu({F32: 32 * GB, BF16: 24 * GB}, {F32: 300e9, BF16: 1.9e12})


@pytest.mark.parametrize(
    "profile, want",
    [(NO_AMX, (F32, F16)), (AMX, (BF16, F32)), (AGREE, (BF16, BF16))],
    ids=["gemm-f32-gemv-f16", "gemm-bf16-gemv-f32", "rankings-agree"],
)
def test_each_phase_takes_its_own_fastest_format(profile, want):
    plan = make_plan(spec(), profile, request())
    assert plan.runtime.cpu_dtypes == want
    assert (plan.cpu_formats.prefill, plan.cpu_formats.decode) == want
    assert not plan.cpu_formats.forced and len(plan.cpu_formats.considered) == 4
    chosen = min(plan.cpu_formats.considered, key=lambda t: t["total_s"])
    assert (chosen["prefill"], chosen["decode"]) == want  # the fastest pair here
    assert any("CPU share format" in n for n in plan.notes)


def test_the_flip_follows_the_rankings_not_the_dtype_names():
    """Swap which dtype wins GEMM and which wins GEMV: the per-phase choice swaps too."""
    a = make_plan(spec(), cpu({F32: 20 * GB, F16: 20 * GB}, {F32: 50e9, F16: 400e9}), request())
    b = make_plan(spec(), cpu({F32: 80 * GB, F16: 10 * GB}, {F32: 400e9, F16: 50e9}), request())
    assert a.runtime.cpu_dtypes == (F16, F16)  # GEMV: float16 2x params/s; GEMM: float16
    assert b.runtime.cpu_dtypes == (F32, F32)  # both rankings favour float32
    c = make_plan(spec(), cpu({F32: 80 * GB, F16: 10 * GB}, {F32: 50e9, F16: 400e9}), request())
    assert c.runtime.cpu_dtypes == (F16, F32)  # GEMM favours float16, GEMV float32


def test_with_a_gpu_each_phase_is_balanced_with_its_own_cpu_rate():
    profile = cpu({F32: 40 * GB, F16: 25 * GB}, {F32: 105e9, F16: 24e9}, gpu=True)
    plan = make_plan(spec(), profile, request(gpu_budget_bytes=int(2.5 * GiB)))
    assert plan.runtime.requires_gpu and plan.runtime.cpu_dtypes == (F32, F16)
    split = [p for p in plan.placements if not p.resident]
    assert split and all(p.cpu_rows_decode > 0 for p in split)


def test_short_ram_keeps_one_format():
    """A second copy of the CPU rows does not fit: the best single format is kept."""
    sp = spec()
    roomy = make_plan(sp, AMX, request())
    assert roomy.runtime.cpu_dtypes == (BF16, F32)
    single_f32 = roomy.memory.host.total_bytes - roomy.memory.host.cpu_copy_bytes
    tight = make_plan(sp, AMX, request(cpu_budget_bytes=single_f32 + 2**20))
    assert tight.runtime.cpu_dtypes[0] == tight.runtime.cpu_dtypes[1]
    assert tight.memory.host.total_bytes <= single_f32 + 2**20
    refused = [t for t in tight.cpu_formats.considered if t["error"]]
    assert {(t["prefill"], t["decode"]) for t in refused} >= {(BF16, F32)}
    assert "did not fit" in tight.cpu_formats.reason


def test_a_second_copy_must_save_more_than_the_tolerance():
    """GEMM rates a hair apart: the faster prefill format saves < FORMAT_TOLERANCE of the
    time, so the pair with less host memory (one format) wins."""
    profile = cpu({F32: 40 * GB, BF16: 10 * GB}, {F32: 300e9, BF16: 306e9})
    plan = make_plan(spec(), profile, request())
    assert plan.runtime.cpu_dtypes == (F32, F32)
    fastest = min(plan.cpu_formats.considered, key=lambda t: t["total_s"])
    assert (fastest["prefill"], fastest["decode"]) == (BF16, F32)
    assert "under 2%" in plan.cpu_formats.reason


def test_forced_formats_are_used_as_given():
    plan = make_plan(spec(), AMX, request(cpu_dtype="float32,bfloat16"))
    assert plan.runtime.cpu_dtypes == (F32, BF16) and plan.cpu_formats.forced
    assert len(plan.cpu_formats.considered) == 1
    one = make_plan(spec(), AMX, request(cpu_dtype="float32"))
    assert one.runtime.cpu_dtypes == (F32, F32)
    with pytest.raises(ProfileError, match="no CPU GEMV and GEMM measurements for float16"):
        make_plan(spec(), AMX, request(cpu_dtype="float16"))


def test_no_pair_fits_reports_the_single_format_error():
    with pytest.raises(PlanError, match="host memory") as info:
        make_plan(spec(), AMX, request(cpu_budget_bytes=2**20))
    assert "--cpu-dtype" not in info.value.hint  # float32 in both phases has no copy to drop


def test_pick_prefers_less_memory_within_the_tolerance_and_speed_beyond_it():
    near = 1 + FORMAT_TOLERANCE / 2
    tried = [Tried((F32, F32), 1.0 * near, 0.1, 0.01, 100), Tried((BF16, F32), 1.0, 0.05, 0.01, 150)]
    assert pick(tried, forced=False)[0].pair == (F32, F32)
    far = 1 + FORMAT_TOLERANCE * 2
    tried = [Tried((F32, F32), far, 0.1, 0.01, 100), Tried((BF16, F32), 1.0, 0.05, 0.01, 150)]
    chosen, record = pick(tried, forced=False)
    assert chosen.pair == (BF16, F32) and "more host memory" in record.reason
    assert candidate_pairs([F32, BF16], None) == [(F32, F32), (F32, BF16), (BF16, F32), (BF16, BF16)]
    assert candidate_pairs([F32, BF16], (BF16, F32)) == [(BF16, F32)]
