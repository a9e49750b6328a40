"""The engine on the strict stand-in (tests.strict.StrictBackend): CUDA's code paths and hazards
on the CPU. Copies happen late and their destinations hold NaN until then, so a missing wait
or an early buffer reuse changes the greedy tokens; forwards run through run.generate under
inference mode exactly as `hetegen run` does."""

from __future__ import annotations

import gc

import pytest
import torch

from hetegen_cli.core.errors import ModelError
from hetegen_cli.engine.hetero_model import engine_context, load_hetero_model
from hetegen_cli.plan.document import LinearPlacement, RuntimeSettings
from hetegen_cli.plan.memory import host_memory
from hetegen_cli.run.generate import generate
from tests.engine.conftest import NEW_TOKENS, PLANS, PROMPT, placements
from tests.strict import StrictBackend

FP32 = RuntimeSettings(
    weights_dtype="float32",
    cpu_dtype_prefill="float32",
    cpu_dtype_decode="float32",
    cpu_threads=1,
    staging_buffers=2,
    prefetch_depth=1,
    pin_weights=True,
    requires_gpu=True,
)


class _Ids:
    def decode(self, ids, skip_special_tokens=True) -> str:
        return ""


def _differs(loaded, want: list[int]) -> bool:
    """True when generation goes wrong: other tokens, or poison (NaN) reaching the logits."""
    try:
        return _generate(loaded) != want
    except ModelError:
        return True


def _generate(loaded, prompt: list[int] = PROMPT[0], new_tokens: int = NEW_TOKENS) -> list[int]:
    result = generate(
        loaded.model,
        _Ids(),
        prompt,
        max_new_tokens=new_tokens,
        eos_ids=set(),
        sync=loaded.sync,
        device=loaded.device,
    )
    return result.token_ids


@pytest.fixture(scope="module")
def reference(models):
    """The greedy tokens transformers' generate gives (prompt excluded)."""
    return {name: want[0, len(PROMPT[0]) :].tolist() for name, (_, want, _) in models.items()}


@pytest.mark.parametrize("plan_name", sorted(PLANS))
@pytest.mark.parametrize("model_name", ["opt", "llama"])
@pytest.mark.parametrize("buffers", [1, 2, 3])
@pytest.mark.parametrize("engines", [1, 2])  # prefetch after the join, or right after acquire
def test_greedy_tokens_hold_under_cuda_hazards(models, reference, model_name, plan_name, buffers, engines):
    ref = models[model_name][0]
    runtime = RuntimeSettings(
        **{
            **FP32.__dict__,
            "staging_buffers": buffers,
            "prefetch_depth": buffers - 1,
            "copy_engines": engines,
        }
    )
    plan = placements(ref.spec, PLANS[plan_name])
    with load_hetero_model(ref, plan, runtime, StrictBackend(), progress=False) as loaded:
        assert _generate(loaded) == reference[model_name]
        assert _generate(loaded) == reference[model_name]  # the learned order, wrapping around
        stats = loaded.stats()
    if plan_name != "all_cpu":
        assert stats["bytes_streamed"] > 0


def test_pinned_memory_is_counted_exactly_and_released_on_close(models):
    ref = models["llama"][0]
    backend = StrictBackend()
    plan = placements(ref.spec, PLANS["random"])
    loaded = load_hetero_model(ref, plan, FP32, backend, progress=False)
    want = host_memory(plan, "float32", ("float32", "float32")).weights_bytes
    assert loaded.stats()["pinned_bytes"] == want  # one arena: no power-of-two rounding
    _generate(loaded)
    scratch = loaded.stats()["pinned_scratch_bytes"]
    assert scratch > 0 and backend.pinned_live_bytes == want + scratch
    loaded.close()
    del loaded
    gc.collect()
    assert backend.pinned_live_bytes == 0


def test_staging_buffers_are_recorded_on_the_copy_stream(models):
    ref = models["opt"][0]
    backend = StrictBackend()
    with load_hetero_model(
        ref, placements(ref.spec, PLANS["all_streamed"]), FP32, backend, progress=False
    ) as loaded:
        scheduler = engine_context(loaded.model).scheduler
        recorded = {(id(t), id(s)) for t, s in backend.recorded_streams}
        assert all((id(b), id(scheduler.copy_stream)) in recorded for b in scheduler.buffers)


def test_a_missing_wait_is_caught(models, reference, monkeypatch):
    """The stand-in has teeth: skip the compute stream's wait on a copy, and tokens change."""
    ref = models["llama"][0]
    monkeypatch.setattr(StrictBackend, "wait_event", lambda self, event, stream=None: None)
    with load_hetero_model(
        ref, placements(ref.spec, PLANS["all_streamed"]), FP32, StrictBackend(), progress=False
    ) as loaded:
        assert _differs(loaded, reference["llama"])


def test_a_buffer_refilled_before_its_reader_is_caught(models, reference):
    """Prefetch deeper than the buffers: a copy into a buffer whose staged share no linear has
    read yet (prefetch runs after the join, so depth == buffers would still be safe)."""
    ref = models["llama"][0]
    runtime = RuntimeSettings(**{**FP32.__dict__, "staging_buffers": 2, "prefetch_depth": 2})
    with load_hetero_model(
        ref, placements(ref.spec, PLANS["all_streamed"]), runtime, StrictBackend(), progress=False
    ) as loaded:
        engine_context(loaded.model).scheduler.depth = 3  # bypass the min(depth, buffers - 1) guard
        assert _differs(loaded, reference["llama"])


def test_an_output_slot_rewritten_before_its_copy_is_caught(models, monkeypatch):
    """Drop the wait for the copy that last read a pinned output slot (q, k and v share their
    input, so nothing else orders it): the stand-in refuses the rewrite."""
    from hetegen_cli.engine.split_linear import _HostScratch
    from tests.strict import StrictHazard

    ref = models["llama"][0]
    real = _HostScratch.y_slot
    monkeypatch.setattr(_HostScratch, "y_slot", lambda self, *a: (*real(self, *a)[:2], None))
    with (
        load_hetero_model(
            ref, placements(ref.spec, PLANS["all_cpu"]), FP32, StrictBackend(), progress=False
        ) as loaded,
        pytest.raises(StrictHazard, match="rewritten"),
    ):
        _generate(loaded)


def test_placement_for_a_missing_linear_fails_cleanly():
    assert LinearPlacement("x", 0, "q", 4, 4, False, 0, 0).max_gpu_stream_rows == 4


@pytest.mark.parametrize("plan_name", ["random", "mixed"])
@pytest.mark.parametrize("model_name", ["opt", "llama"])
def test_per_phase_cpu_formats_hold_under_cuda_hazards(models, model_name, plan_name):
    """bfloat16 prefill + float16 decode CPU shares through the pinned-scratch path: the same
    greedy tokens as the CPU backend (whose formats test_hetero_model checks against a
    reference)."""
    from hetegen_cli.core.devices import CpuBackend

    ref = models[model_name][0]
    runtime = RuntimeSettings(
        **{**FP32.__dict__, "cpu_dtype_prefill": "bfloat16", "cpu_dtype_decode": "float16"}
    )
    plan = placements(ref.spec, PLANS[plan_name])
    ids = torch.tensor(PROMPT)
    with load_hetero_model(ref, plan, runtime, CpuBackend(), progress=False) as plain:
        want = _generate(plain)
        with torch.no_grad():
            want_logits = plain.model(ids).logits
    with load_hetero_model(ref, plan, runtime, StrictBackend(), progress=False) as loaded:
        assert _generate(loaded) == want
        with torch.no_grad():
            logits = loaded.model(ids).logits
            loaded.sync()
        assert loaded.stats()["cpu_copy_bytes"] > 0
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-6)
    if any(p.cpu_rows_prefill for p in plan):  # the prefill CPU share really ran in bfloat16
        assert not torch.allclose(logits, models[model_name][2], rtol=1e-4, atol=1e-5)


def test_q_k_and_v_share_one_host_copy_of_their_input(models, reference):
    ref = models["llama"][0]
    with load_hetero_model(
        ref, placements(ref.spec, PLANS["all_cpu"]), FP32, StrictBackend(), progress=False
    ) as loaded:
        assert _generate(loaded) == reference["llama"]
        stats = loaded.stats()
    # per layer and forward: k and v reuse q's copy, up reuses gate's
    assert stats["inputs_shared"] == 3 * ref.spec.num_layers * stats["passes"]


def test_unpinned_host_weights_are_refused_on_a_gpu(models):
    from hetegen_cli.core.errors import PlanError

    class GpuLike(StrictBackend):
        device_is_host = False

    ref = models["llama"][0]
    runtime = RuntimeSettings(**{**FP32.__dict__, "pin_weights": False})
    with pytest.raises(PlanError, match="pageable"):
        load_hetero_model(ref, placements(ref.spec, PLANS["random"]), runtime, GpuLike(), progress=False)
