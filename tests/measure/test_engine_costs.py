"""The engine's fixed costs measured through the real model and engine (measure.engine_costs), on
the CPU backend and on the strict CUDA-like stand-in, with a made-up clock."""

from __future__ import annotations

import pytest

from hetegen_cli.core.devices import CpuBackend
from hetegen_cli.measure import engine_costs as ec
from hetegen_cli.measure.tiny_models import TinyShape
from hetegen_cli.plan.costmodel.fixed import fixed_costs_from_profile
from hetegen_cli.profile.document import validate_profile
from tests.fakes import fake_timer, make_profile
from tests.strict import StrictBackend

SIZES = ec.CostSizes(
    prompts=(4, 8, 16),
    decode_steps=2,
    repeat=1,
    shape=TinyShape(hidden=32, heads=2, intermediate=64, vocab=64, layers=(1, 2), max_positions=64),
)


@pytest.fixture(scope="module")
def measured():
    return ec.measure_engine_costs(
        [CpuBackend(), StrictBackend()],
        threads=1,
        dtypes={"cpu": ("float32",), "strict-cpu": ("float32",)},
        sizes=SIZES,
        timer=fake_timer(),
    )


def test_every_backend_dtype_and_family_is_measured_and_the_document_validates(measured):
    keys = {(e["device"], e["dtype"], e["architecture"]) for e in measured["entries"]}
    assert keys == {(d, "float32", a) for d in ("cpu", "cuda") for a in ("llama", "opt")}
    for e in measured["entries"]:
        assert [p["tokens"] for p in e["prefill"]] == list(SIZES.prompts)
        assert [p["context"] for p in e["decode"]] == [n + SIZES.decode_steps // 2 for n in SIZES.prompts]
        assert all(p["layer_s"] >= 0 and p["token_s"] >= 0 for p in e["prefill"] + e["decode"])
    first = {e["device"]: e for e in measured["entries"] if e["architecture"] == "llama"}
    assert set(first["cpu"]["linear_s"]) == {"inline", "split", "stream"}
    assert set(first["cuda"]["linear_s"]) == {"split", "stream"}  # whole-CPU linears pipeline on a GPU
    profile = dict(make_profile(gpu=False), schema_version=2, engine=measured)
    validate_profile(profile)
    o = fixed_costs_from_profile(profile)
    assert o.has("cpu") and o.has("cuda")
