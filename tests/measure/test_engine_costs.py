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
    keys = {
        (e["device"], e["dtype"], e["architecture"], e.get("weights", "float")) for e in measured["entries"]
    }
    floats = {(d, "float32", a, "float") for d in ("cpu", "cuda") for a in ("llama", "opt")}
    # the quantized model as `run` loads it: on the CPU only, in its activation dtype
    assert keys == floats | {("cpu", "float32", a, "int4") for a in ("llama", "opt")}
    for e in measured["entries"]:
        assert [p["tokens"] for p in e["prefill"]] == list(SIZES.prompts)
        assert [p["context"] for p in e["decode"]] == [n + SIZES.decode_steps // 2 for n in SIZES.prompts]
        assert all(p["layer_s"] >= 0 and p["token_s"] >= 0 for p in e["prefill"] + e["decode"])
    first = {
        e["device"]: e
        for e in measured["entries"]
        if e["architecture"] == "llama" and e.get("weights", "float") == "float"
    }
    assert set(first["cpu"]["linear_s"]) == {"inline", "split", "stream"}
    assert set(first["cuda"]["linear_s"]) == {"split", "stream"}  # whole-CPU linears pipeline on a GPU
    profile = dict(make_profile(gpu=False), schema_version=2, engine=measured)
    validate_profile(profile)
    o = fixed_costs_from_profile(profile)
    assert o.has("cpu") and o.has("cuda")


def test_the_quantized_entries_run_the_quantized_model_as_run_loads_it(monkeypatch):
    """int4 weights on hetegen's kernels, the llama family's decoder layers fused; the decode
    points keep their linears (no linear is called alone at one token)."""
    loaded, alone = [], []
    real_load, real_alone = ec.load_quantized, ec._linears_alone

    def spy_load(ref):
        model = real_load(ref)
        loaded.append((ref.spec.architecture, ref.spec.num_layers, model.formats.quant, model.fused))
        return model

    def spy_alone(model, device, dtype, clock, tokens, repeat):
        alone.append((type(model).__name__, tokens))
        return real_alone(model, device, dtype, clock, tokens, repeat)

    monkeypatch.setattr(ec, "load_quantized", spy_load)
    monkeypatch.setattr(ec, "_linears_alone", spy_alone)
    doc = ec.measure_engine_costs(
        [CpuBackend()], threads=1, dtypes={"cpu": ("float32",)}, sizes=SIZES, timer=fake_timer()
    )
    assert sorted((a, n, q) for a, n, q, _ in loaded) == [
        (a, n, "int4") for a in ("llama", "opt") for n in SIZES.shape.layers
    ]
    assert all(f["layers"] == n for a, n, _, f in loaded if a == "llama")
    quantized = [e for e in doc["entries"] if e.get("weights") == "int4"]
    assert [e["architecture"] for e in quantized] == ["llama", "opt"]
    # one token alone: only the float models' decode subtraction (2 families x 2 sizes)
    assert sum(1 for _, tokens in alone if tokens == 1) == 4
