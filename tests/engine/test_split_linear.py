"""HeteroLinear against nn.Linear on the CPU stand-in backend, plus the prefetch scheduler."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hetegen_cli.core.devices import CpuBackend
from hetegen_cli.engine.host_weight import HostWeight
from hetegen_cli.engine.split_linear import EngineContext, HeteroLinear
from hetegen_cli.plan.document import LinearPlacement, RuntimeSettings, round_rows
from hetegen_cli.plan.memory import arena_bytes

# per-dtype tolerances (rtol, atol) against nn.Linear in the same dtype
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 2e-2), torch.float16: (2e-3, 2e-3)}
NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _placement(name: str, out: int, inp: int, pre: float, dec: float) -> LinearPlacement:
    return LinearPlacement(name, 0, "fc1", out, inp, False, round_rows(pre, out), round_rows(dec, out))


def _linear(out: int, inp: int, bias: bool, dtype: torch.dtype, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(inp, out, bias=bias).to(dtype).eval()


@pytest.fixture
def make_ctx():
    made: list[EngineContext] = []

    def make(weights=torch.float32, cpu=torch.float32, **kw) -> EngineContext:
        """`cpu`: one dtype for both phases, or (prefill, decode)."""
        prefill, decode = cpu if isinstance(cpu, tuple) else (cpu, cpu)
        runtime = RuntimeSettings(
            weights_dtype=NAMES[weights],
            cpu_dtype_prefill=NAMES[prefill],
            cpu_dtype_decode=NAMES[decode],
            cpu_threads=1,
            requires_gpu=False,
            **kw,
        )
        ctx = EngineContext(CpuBackend(), runtime)
        made.append(ctx)
        return ctx

    yield make
    for ctx in made:
        ctx.close()


@pytest.mark.parametrize("out", [200, 136, 50])
@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_nn_linear_fp32(make_ctx, out, fraction, bias):
    ctx = make_ctx()
    ref = _linear(out, 64, bias, torch.float32)
    split = HeteroLinear.from_linear(ref, _placement("l", out, 64, fraction, fraction), ctx)
    x = torch.randn(2, 3, 64)
    for phase in ("prefill", "decode"):
        ctx.phase = phase
        with torch.no_grad():
            torch.testing.assert_close(split(x), ref(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(split(x[:, :1]), ref(x[:, :1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cpu", ["same", torch.float32])
@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 1.0])
def test_matches_nn_linear_half(make_ctx, dtype, cpu, fraction):
    cpu_dtype = dtype if cpu == "same" else cpu
    ctx = make_ctx(weights=dtype, cpu=cpu_dtype)
    ref = _linear(136, 64, True, dtype)
    split = HeteroLinear.from_linear(ref, _placement("l", 136, 64, fraction, fraction), ctx)
    x = torch.randn(4, 64, dtype=dtype)
    rtol, atol = TOL[dtype]
    with torch.no_grad():
        y = split(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y, ref(x), rtol=rtol, atol=atol)
    assert bool(split.host.copies) == (cpu_dtype != dtype and split.placement.max_cpu_rows > 0)


def test_prefill_and_decode_use_their_own_split(make_ctx):
    ctx = make_ctx(weights=torch.bfloat16, cpu=torch.float32)  # a separate CPU copy of rows [0, 144)
    ref = _linear(200, 64, True, torch.bfloat16)
    p = _placement("l", 200, 64, 0.25, 0.75)
    assert (p.cpu_rows_prefill, p.cpu_rows_decode) == (48, 144)
    split = HeteroLinear.from_linear(ref, p, ctx)
    # poison the CPU copy: the output then shows exactly which rows ran on the CPU
    split.host.copies[torch.float32].zero_()
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    rtol, atol = TOL[torch.bfloat16]
    for phase, k in (("prefill", 48), ("decode", 144)):
        ctx.phase = phase
        with torch.no_grad():
            y, want = split(x), ref(x)
        torch.testing.assert_close(y[:, :k], ref.bias[:k].detach().expand(5, k))
        torch.testing.assert_close(y[:, k:], want[:, k:], rtol=rtol, atol=atol)


def test_cpu_copy_holds_only_cpu_rows(make_ctx):
    ctx = make_ctx(weights=torch.bfloat16, cpu=torch.float32)
    ref = _linear(200, 64, False, torch.bfloat16)
    split = HeteroLinear.from_linear(ref, _placement("l", 200, 64, 0.25, 0.75), ctx)
    host = split.host
    assert list(host.copies) == [torch.float32] and host.copies[torch.float32].shape == (144, 64)
    assert host.row0 == 48 and host.gpu_home.shape == (152, 64)  # rows [48, 200)
    torch.testing.assert_close(host.gpu_rows(48), ref.weight[48:].detach())
    with pytest.raises(ValueError):
        host.gpu_rows(16)


def test_resident_placement_is_refused(make_ctx):
    ctx = make_ctx()
    host = HostWeight.from_tensor(
        torch.zeros(16, 8), (0, 0), torch.float32, (torch.float32, torch.float32), ctx.backend, True
    )
    with pytest.raises(ValueError, match="resident"):
        HeteroLinear(LinearPlacement("r", 0, "q", 16, 8, True, 0, 0), host, None, ctx)


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_each_phase_computes_in_its_own_cpu_dtype(make_ctx, fraction):
    """float32 weights; prefill's CPU share in bfloat16, decode's in float32: each phase's CPU
    rows equal nn.Linear in that dtype (activations converted at the boundary)."""
    ctx = make_ctx(cpu=(torch.bfloat16, torch.float32))
    ref = _linear(96, 64, True, torch.float32)
    split = HeteroLinear.from_linear(ref, _placement("l", 96, 64, fraction, fraction), ctx)
    k = split.placement.cpu_rows_prefill
    assert sorted(map(str, split.host.copies)) == ["torch.bfloat16"]  # decode reads the fp32 rows
    x = torch.randn(6, 64)
    w, b = ref.weight.detach(), ref.bias.detach()
    with torch.no_grad():
        ctx.begin_pass("prefill")
        y = split(x)
        want = F.linear(x.bfloat16(), w[:k].bfloat16()).float() + b[:k]
        torch.testing.assert_close(y[:, :k], want, rtol=0, atol=0)
        torch.testing.assert_close(y[:, k:], F.linear(x, w[k:], b[k:]), rtol=1e-6, atol=1e-6)
        ctx.begin_pass("decode")
        torch.testing.assert_close(split(x), ref(x), rtol=1e-6, atol=1e-6)


def test_all_cpu_fast_path_gives_the_pipelined_result(make_ctx):
    """When no linear streams, linears skip the scheduler; the numbers are the same as
    through the pipeline (k = out) and nothing is copied."""
    ref = _linear(80, 48, True, torch.float32)
    x = torch.randn(5, 48)
    outputs = []
    for streaming in (False, True):
        ctx = make_ctx(cpu=torch.bfloat16)
        split = HeteroLinear.from_linear(ref, _placement("a", 80, 48, 1.0, 1.0), ctx)
        if streaming:  # a second linear that streams turns the pipeline on
            HeteroLinear.from_linear(
                _linear(32, 48, False, torch.float32), _placement("b", 32, 48, 0.5, 0.5), ctx
            )
        ctx.begin_pass("decode")
        assert ctx.streaming == streaming
        with torch.no_grad():
            outputs.append(split(x))
        if not streaming:
            assert ctx.stats.copies_issued == 0 and ctx.stats.split_calls == 1
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def _chain(ctx, sizes, fractions):
    """Three linears applied in sequence, reference and split."""
    refs, splits = [], []
    for i, ((out, inp), (pre, dec)) in enumerate(zip(sizes, fractions, strict=False)):
        ref = _linear(out, inp, True, torch.float32, seed=i)
        refs.append(ref)
        splits.append(HeteroLinear.from_linear(ref, _placement(f"l{i}", out, inp, pre, dec), ctx))
    ctx.finalize()
    return refs, splits


SIZES = [(96, 64), (200, 96), (64, 200)]


def _run(mods, x):
    with torch.no_grad():
        for m in mods:
            x = m(x)
    return x


def test_prefetch_seeded_from_the_plan_order_and_wraps(make_ctx):
    ctx = make_ctx(staging_buffers=2, prefetch_depth=1)
    refs, splits = _chain(ctx, SIZES, [(0.0, 0.5), (0.25, 0.5), (0.0, 0.25)])
    x = torch.randn(3, 64)
    ctx.begin_pass("prefill")
    torch.testing.assert_close(_run(splits, x), _run(refs, x))  # seeded: prefetched already
    assert ctx.stats.prefetch_misses == 1 and ctx.stats.prefetch_hits == 2  # only the very first
    for _ in range(4):
        ctx.begin_pass("decode")
        torch.testing.assert_close(_run(splits, x[:1]), _run(refs, x[:1]))
    # every later linear, including each pass's first (issued at the end of the pass before),
    # was prefetched; the first forward confirmed the seeded order
    assert ctx.stats.prefetch_misses == 1
    assert ctx.stats.prefetch_hits == 14
    assert ctx.stats.order_resyncs == 0 and ctx.stats.copies_discarded == 0
    # steady state: one decode pass issues exactly one pass worth of rows [k_decode, out)
    before = ctx.stats.bytes_streamed
    ctx.begin_pass("decode")
    _run(splits, x[:1])
    per_pass = sum((o - round_rows(f, o)) * i * 4 for (o, i), f in zip(SIZES, (0.5, 0.5, 0.25), strict=False))
    assert ctx.stats.bytes_streamed - before == per_pass
    # buffers (bytes) fit the largest share of any phase: max (out - k_min) * in * 4, aligned
    assert ctx.scheduler.buffers[0].numel() == max(
        arena_bytes((o - round_rows(f, o)) * i * 4)
        for (o, i), f in zip(SIZES, (0.0, 0.25, 0.0), strict=False)
    )


def test_phase_change_and_order_change_stay_correct(make_ctx):
    ctx = make_ctx(staging_buffers=3, prefetch_depth=2)
    refs, splits = _chain(ctx, SIZES, [(0.0, 1.0), (0.25, 0.75), (0.5, 0.0)])
    x = torch.randn(4, 64)
    for phase, n in (("prefill", 4), ("decode", 1), ("decode", 1), ("prefill", 4), ("decode", 1)):
        ctx.begin_pass(phase)
        torch.testing.assert_close(_run(splits, x[:n]), _run(refs, x[:n]))
    assert ctx.stats.copies_discarded > 0  # decode-predicted copies did not fit the prefill split
    # a different order (skip the first linear): resync, still correct
    ctx.begin_pass("decode")
    y = torch.randn(1, 96)
    torch.testing.assert_close(_run(splits[1:], y), _run(refs[1:], y))
    assert ctx.stats.order_resyncs >= 1
    ctx.begin_pass("decode")
    torch.testing.assert_close(_run(splits, x[:1]), _run(refs, x[:1]))


def test_single_buffer_means_no_prefetch(make_ctx):
    ctx = make_ctx(staging_buffers=1, prefetch_depth=2)
    refs, splits = _chain(ctx, SIZES, [(0.5, 0.5)] * 3)
    x = torch.randn(2, 64)
    for _ in range(3):
        ctx.begin_pass("decode")
        torch.testing.assert_close(_run(splits, x), _run(refs, x))
    assert ctx.scheduler.depth == 0 and ctx.stats.prefetch_hits == 0
    assert ctx.stats.prefetch_misses == 9


def test_close_restores_threads_and_stops_worker(make_ctx):
    before = torch.get_num_threads()
    ctx = make_ctx()
    ref = _linear(50, 16, False, torch.float32)
    split = HeteroLinear.from_linear(ref, _placement("l", 50, 16, 0.5, 0.5), ctx)
    with torch.no_grad():
        split(torch.randn(1, 16))
    ctx.close()
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        split(torch.randn(1, 16))  # the worker is gone
