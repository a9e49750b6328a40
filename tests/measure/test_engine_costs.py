"""The engine's fixed costs measured through the real model and engine (measure.engine_costs), on
the CPU backend and on the strict CUDA-like stand-in, with a made-up clock."""

from __future__ import annotations

import pytest
import torch

from hetegen_cli.core.devices import CpuBackend
from hetegen_cli.measure import engine_costs as ec
from hetegen_cli.measure.tiny_models import write_tiny_model
from hetegen_cli.models.formats.fused import GatedFFN
from hetegen_cli.models.formats.quant_experts import QuantExperts
from hetegen_cli.models.loading.quantized_loader import load_quantized
from hetegen_cli.plan.costmodel.fixed import fixed_costs_from_profile
from hetegen_cli.profile.document import validate_profile
from tests.fakes import TICK, fake_timer, make_profile
from tests.strict import StrictBackend

SIZES = ec.SCALED_COSTS  # tiny models, short prompts, one sample


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
    assert keys == floats | {("cpu", "float32", a, "int4") for a in ("llama", "opt", "moe")}
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
        (a, n, "int4") for a in ("llama", "opt", "qwen3_moe") for n in SIZES.shape.layers
    ]
    assert all(f["layers"] == n for a, n, _, f in loaded if a == "llama")
    assert all(f["experts"] == n for a, n, _, f in loaded if a == "qwen3_moe")  # one call per layer
    quantized = [e for e in doc["entries"] if e.get("weights") == "int4"]
    assert [e["architecture"] for e in quantized] == ["llama", "opt", "moe"]
    assert doc["model"]["experts_per_token"] == SIZES.shape.experts_per_token
    # one token alone: only the float models' decode subtraction (2 families x 2 sizes)
    assert sum(1 for _, tokens in alone if tokens == 1) == 4


def test_experts_alone_times_each_moe_layers_fused_call_with_its_top_k(monkeypatch, tmp_path):
    calls = []
    real_add = GatedFFN.add

    def counting(self, x, sel, coef, out):
        calls.append(list(sel))
        return real_add(self, x, sel, coef, out)

    monkeypatch.setattr(GatedFFN, "add", counting)
    clock = ec._Clock(CpuBackend(), fake_timer())
    for arch, expected in (("moe", [[0, 1]] * 2 * 3), ("llama", [])):  # 2 layers x (warm-up + 2)
        ref = ec._quantized(write_tiny_model(tmp_path / arch, arch, SIZES.shape, 2), tmp_path / f"{arch}-q")
        with load_quantized(ref) as loaded, torch.inference_mode():
            calls.clear()  # the load's checks of the fused steps call the experts too
            seconds = ec._experts_alone(loaded.model, clock, repeat=2)
        assert calls == expected
        assert (seconds > 0) == bool(expected)


def test_the_moe_entry_leaves_out_the_experts_fused_call(monkeypatch):
    """A decode layer of the moe entry costs what was measured less its experts' call."""
    per_layer = 0.25 * TICK

    def fake_fastest(model, device, clock, prompt, sizes):  # (prefill, decode step) seconds
        return 1.0, TICK * model.config.num_hidden_layers + 0.5

    def measured(alone: float) -> dict:
        def fake_alone(model, clock, repeat):
            return alone * sum(1 for m in model.modules() if isinstance(m, QuantExperts))

        monkeypatch.setattr(ec, "_experts_alone", fake_alone)
        monkeypatch.setattr(ec, "_fastest", fake_fastest)
        doc = ec.measure_engine_costs(
            [CpuBackend()], threads=1, dtypes={"cpu": ("float32",)}, sizes=SIZES, timer=fake_timer()
        )
        return next(e for e in doc["entries"] if e["architecture"] == "moe")

    whole, less = measured(0.0), measured(per_layer)
    for a, b in zip(whole["decode"], less["decode"], strict=True):
        assert a["layer_s"] == pytest.approx(TICK) and b["layer_s"] == pytest.approx(TICK - per_layer)
        assert a["token_s"] == pytest.approx(b["token_s"])
    assert whole["prefill"] == less["prefill"]
