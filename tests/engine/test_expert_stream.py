"""Prefill streaming of CPU-side experts (engine.experts.ExpertStream): a layer placed with
`stream_prefill` computes its CPU-side experts on the GPU in prefill, their weights copied
through two shared staging slots on a side stream. Greedy tokens stay transformers' on the CPU
stand-in and on the strict stand-in (which poisons a slot read before its copy landed, or
refilled before its reader was done); decode still computes them on the CPU."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from hetegen_cli.core.devices import CpuBackend
from hetegen_cli.engine.experts import ExpertStream
from hetegen_cli.engine.hetero_model import load_hetero_model
from hetegen_cli.models.loading.source import resolve_model
from hetegen_cli.plan.document import RuntimeSettings
from tests.engine.conftest import EXPERTS, PLANS, expert_placements, placements
from tests.engine.test_strict_backend import FP32, _generate
from tests.models.architecture.test_architectures import NEW_TOKENS, PROMPT, _tiny
from tests.strict import StrictBackend

MOE = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    """arch -> (ModelRef, transformers' greedy tokens)."""
    out = {}
    for arch in MOE:
        folder = tmp_path_factory.mktemp(arch)
        want = _tiny(arch, folder)
        out[arch] = (resolve_model(str(folder), need_weights=True), want)
    return out


@pytest.mark.parametrize("arch", MOE)
@pytest.mark.parametrize("backend", ["cpu", "strict"])
@pytest.mark.parametrize("experts", ["all_cpu", "mixed"])
def test_streamed_prefill_gives_transformers_tokens(tiny_moe, arch, backend, experts):
    ref, want = tiny_moe[arch]
    plan = placements(ref.spec, PLANS["mixed"])
    streamed = [replace(x, stream_prefill=True) for x in expert_placements(ref.spec, EXPERTS[experts])]
    runtime = RuntimeSettings(**{**FP32.__dict__, "requires_gpu": True})
    chosen = CpuBackend() if backend == "cpu" else StrictBackend()
    with load_hetero_model(ref, plan, runtime, chosen, progress=False, experts=streamed) as loaded:
        got = _generate(loaded, PROMPT, NEW_TOKENS)
        engine = loaded.model.hetegen_engine
        stats = engine.stats
        x = ref.spec.experts[0]
        assert engine.expert_stream.nbytes == 2 * x.expert_parameters * 4  # two float32 experts
    assert got == want
    assert stats.experts_streamed > 0  # prefill: the CPU side's experts went to the GPU
    assert stats.experts_cpu > 0  # decode: computed by the CPU, as before


def test_a_plan_without_streaming_allocates_no_slots(tiny_moe):
    ref, want = tiny_moe["qwen3_moe"]
    runtime = RuntimeSettings(**{**FP32.__dict__, "requires_gpu": True})
    experts = expert_placements(ref.spec, EXPERTS["mixed"])
    plan = placements(ref.spec, PLANS["mixed"])
    with load_hetero_model(ref, plan, runtime, CpuBackend(), progress=False, experts=experts) as loaded:
        assert _generate(loaded, PROMPT, NEW_TOKENS) == want
        assert loaded.model.hetegen_engine.expert_stream is None
        assert loaded.model.hetegen_engine.stats.experts_streamed == 0


def test_the_slots_alternate_and_refuse_a_third_copy():
    backend = StrictBackend()
    stream = ExpertStream(backend, 2 * 128)  # two tensors of at most 128 bytes each
    a = (
        backend.empty_pinned((6, 4), torch.float32).fill_(1.0),
        None,  # a symmetric int4 part's min: kept as None
        backend.empty_pinned((4, 3), torch.float16).fill_(1.0),
    )
    b = (
        backend.empty_pinned((6, 4), torch.float32).fill_(2.0),
        None,
        backend.empty_pinned((4, 3), torch.float16).fill_(2.0),
    )
    stream.load(a)
    stream.load(b)
    with pytest.raises(RuntimeError, match="both staging slots"):
        stream.load(a)
    first = stream.take()
    assert torch.equal(first[0], a[0]) and first[1] is None and torch.equal(first[2], a[2])
    assert first[2].dtype == torch.float16 and first[2].data_ptr() % 64 == 0
    stream.release()
    second = stream.take()
    assert torch.equal(second[0], b[0]) and first[0].data_ptr() != second[0].data_ptr()


def test_a_slot_is_refilled_only_after_the_copy_stream_waited_for_its_reader():
    """On a GPU the computation reading a slot runs asynchronously: the third copy (into the
    first slot again) must be ordered after the event `release` recorded for that slot."""

    class Spy(CpuBackend):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[tuple] = []

        def wait_event(self, event, stream=None):
            self.calls.append(("wait", id(event), stream))

        def to_device_async(self, dst, src, stream=None):
            self.calls.append(("copy", dst.data_ptr(), stream))
            super().to_device_async(dst, src, stream)

        def record_event(self, stream=None, event=None):
            event = object()
            self.calls.append(("record", id(event), stream))
            return event

    backend = Spy()
    stream = ExpertStream(backend, 2 * 128)
    parts = (torch.ones(6, 4), torch.ones(4, 3))
    stream.load(parts)
    stream.load(parts)
    stream.take()
    stream.release()
    freed = backend.calls[-1]
    assert freed[0] == "record" and freed[2] is None  # on the compute stream
    stream.load(parts)
    wait, copy = backend.calls[-4], backend.calls[-3]
    assert wait == ("wait", freed[1], stream.copy_stream)
    assert copy == ("copy", stream.slots[0].data_ptr(), stream.copy_stream)


def test_tensors_in_one_host_block_move_in_one_copy():
    """An expert whose tensors all lie in one pinned block (engine.experts._pin) crosses in one
    copy of the block; each tensor comes back at its offset in the slot, None as None."""

    class Counting(StrictBackend):
        copies = 0

        def to_device_async(self, dst, src, stream=None):
            Counting.copies += 1
            super().to_device_async(dst, src, stream)

    backend = Counting()
    block = backend.pinned_arena(256)
    q = block[0:24].view(torch.float32).view(2, 3)
    scale = block[64:72].view(torch.float16)
    q.copy_(torch.arange(6.0).view(2, 3))
    scale.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    stream = ExpertStream(backend, 256)
    stream.load((q, None, scale), block)
    got = stream.take()
    assert Counting.copies == 1
    assert got[1] is None and torch.equal(got[0], q) and torch.equal(got[2], scale)
    assert got[2].data_ptr() - got[0].data_ptr() == 64  # the block's own offsets
    stream.release()
    with pytest.raises(RuntimeError, match="does not fit"):
        ExpertStream(backend, 128).load((q,), block)


@pytest.mark.parametrize("arch", MOE)
@pytest.mark.parametrize("backend", ["cpu", "strict"])
@pytest.mark.parametrize(("experts", "stream"), [("all_cpu", False), ("mixed", True)])
def test_a_decode_split_gives_transformers_tokens(tiny_moe, arch, backend, experts, stream):
    """`split_units` = one split step: in decode each chosen CPU-side expert's first units are
    streamed and computed on the GPU side while the CPU computes the rest (the strict stand-in
    poisons a slot read too early); the two add up to transformers' greedy tokens."""
    ref, want = tiny_moe[arch]
    plan = placements(ref.spec, PLANS["mixed"])
    step = ref.spec.experts[0].split_step
    chosen = expert_placements(ref.spec, EXPERTS[experts])
    split = [replace(x, split_units=step, stream_prefill=stream) for x in chosen]
    runtime = RuntimeSettings(**{**FP32.__dict__, "requires_gpu": True})
    chosen_backend = CpuBackend() if backend == "cpu" else StrictBackend()
    with load_hetero_model(ref, plan, runtime, chosen_backend, progress=False, experts=split) as loaded:
        got = _generate(loaded, PROMPT, NEW_TOKENS)
        engine = loaded.model.hetegen_engine
        x = ref.spec.experts[0]
        first = 3 * step * x.hidden_size * 4  # float32 gate, up and down of the first units
        whole = x.expert_parameters * 4
        assert engine.expert_stream.nbytes == 2 * (max(first, whole - first) if stream else first)
        stats = engine.stats
    assert got == want
    assert stats.experts_split > 0 and stats.experts_cpu > 0
    assert (stats.experts_streamed > 0) == stream
