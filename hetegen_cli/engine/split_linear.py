"""The split linear: rows [0, k) on the CPU, rows [k, out) streamed to and multiplied on the GPU.

One `HeteroLinear` replaces one nn.Linear (weight [out, in], y = x W^T + b). All split linears
of a model share one `EngineContext`: the backend, the current phase ("prefill" or "decode",
set once per model forward by `begin_pass`), pinned scratch buffers and the
`PrefetchScheduler` (engine.prefetch), which streams GPU shares into staging buffers.

Forward of a split linear, x [..., in] -> y [..., out], k = cpu rows of the current phase:

1. (k > 0, CUDA) copy x to a pinned host buffer on the compute stream and record an event;
   q, k and v, fed the same tensor, share that copy.
2. acquire the staged GPU share W[k:] from the scheduler (its copy was issued after an earlier
   linear's join), make the compute stream wait for it, launch y[:, k:] = x @ W[k:]^T.
3. (k > 0) wait for x on the host, compute x_h @ W[:k]^T on the calling thread while the GPU
   runs its share, copy it into y[:, :k] (async, from a pinned slot); add the bias in place.
4. issue the copies of the next linears' GPU shares (prefetch): after the join's copy with
   one host-to-device copy engine (it must not queue behind them), else right after step 2.

On the CPU stand-in backend the very same code runs: the "device" is the CPU, the "copy" into
the staging buffer is a real tensor copy, events are already complete. An attached
`engine.trace.Tracer` records every step for trace replay.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hetegen_cli.core.devices import Backend, pinned_cost, torch_dtype
from hetegen_cli.core.phase import PHASES
from hetegen_cli.engine.cpu_linear import CpuLinear
from hetegen_cli.engine.host_weight import HostArena, HostWeight
from hetegen_cli.engine.prefetch import PrefetchScheduler
from hetegen_cli.engine.trace import Tracer
from hetegen_cli.plan.document import LinearPlacement, RuntimeSettings
from hetegen_cli.plan.memory import rows_bytes


@dataclass
class EngineStats:
    """Counters of one engine since load (or the last reset)."""

    passes: int = 0  # model forwards seen (begin_pass calls)
    prefill_passes: int = 0
    split_calls: int = 0  # split linear forwards (a direct one, CpuLinear: one per pass)
    copies_issued: int = 0  # host -> staging-buffer copies of GPU shares
    bytes_streamed: int = 0  # bytes of those copies
    prefetch_hits: int = 0  # GPU share already issued ahead when its linear ran
    prefetch_misses: int = 0  # GPU share issued on demand (first pass, order/phase change)
    copies_discarded: int = 0  # issued ahead but not used (order or phase changed)
    order_resyncs: int = 0  # a linear ran that was not the expected next one
    inputs_shared: int = 0  # CPU shares that reused the host copy of the same input (q/k/v)
    cpu_compute_s: float = 0.0  # time inside CPU-share matmuls (not of direct linears)
    cpu_wait_s: float = 0.0  # time blocked until a layer input reached the host (CUDA)
    pinned_scratch_bytes: int = 0  # pinned x / output slots held now (a level, kept by reset)
    experts_gpu: int = 0  # routed experts computed on the GPU side (engine.experts), per call
    experts_cpu: int = 0  # ... and by the CPU
    experts_cpu_s: float = 0.0  # time in the CPU's experts (waiting for their input included)
    experts_streamed: int = 0  # CPU-side experts copied to the GPU and computed there (prefill)
    experts_split: int = 0  # CPU-side experts whose first units the GPU computed (decode split)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def reset(self) -> None:
        """Zero every counter."""
        for name, value in asdict(EngineStats()).items():
            if name != "pinned_scratch_bytes":
                setattr(self, name, value)


class _HostScratch:
    """Reusable pinned host buffers (CUDA only): x for the D2H copy, two CPU-output slots.

    Output slots alternate; before the CPU share overwrites one it waits for the event recorded
    after the H2D copy that last read it (a copy that reads pinned memory when the stream gets
    there). Buffers grow (powers of two) and are never shrunk. Events are made once per slot
    and recorded again (pooled).
    """

    def __init__(self, backend: Backend, stats: EngineStats) -> None:
        self.backend = backend
        self.stats = stats
        self._x: torch.Tensor | None = None
        self._y: list[torch.Tensor | None] = [None, None]
        self._y_read: list[Any] = [None, None]  # the event after the copy that last read a slot
        self.x_ready: Any = None  # the event after the last D2H copy of x
        self._next = 0

    def _fit(self, buf: torch.Tensor | None, numel: int, dtype: torch.dtype) -> torch.Tensor:
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            # grown inside forwards that may run under inference mode: allocate a normal
            # tensor, which may be written in place in and out of inference mode
            with torch.inference_mode(False):
                buf = self.backend.empty_pinned((1 << max(12, (numel - 1).bit_length()),), dtype)
            self.stats.pinned_scratch_bytes = self.pinned_bytes(buf)
        return buf

    def pinned_bytes(self, new: torch.Tensor | None = None) -> int:
        """What the scratch holds in torch's caching host allocator (powers of two)."""
        bufs = [self._x, *self._y, new]
        return sum(pinned_cost(b.numel() * b.element_size()) for b in bufs if b is not None)

    def x_view(self, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        self._x = self._fit(self._x, shape[0] * shape[1], dtype)
        self.stats.pinned_scratch_bytes = self.pinned_bytes()
        return self._x[: shape[0] * shape[1]].view(shape)

    def y_slot(self, shape: tuple[int, int], dtype: torch.dtype) -> tuple[int, torch.Tensor, Any]:
        """(slot, pinned view [n, k], event to wait for before writing it, or None)."""
        i = self._next
        self._next ^= 1
        self._y[i] = self._fit(self._y[i], shape[0] * shape[1], dtype)
        return i, self._y[i][: shape[0] * shape[1]].view(shape), self._y_read[i]

    def mark_read(self, slot: int) -> Any:
        self._y_read[slot] = self.backend.record_event(event=self._y_read[slot])
        return self._y_read[slot]


class EngineContext:
    """State shared by the split linears of one model. Close it to release its memory.

    The CPU share of every split linear runs on the calling (main) thread, with the intra-op
    threads of `runtime.cpu_threads`: on CUDA after the GPU share has been launched (GPU
    launches are asynchronous, so both run at once), so no second thread, no hand-off and no
    second OpenMP team compete for the cores (docs/engine.md).
    """

    def __init__(self, backend: Backend, runtime: RuntimeSettings) -> None:
        self.backend = backend
        self.runtime = runtime
        self.weights_dtype = torch_dtype(runtime.weights_dtype)
        self.cpu_dtypes = tuple(torch_dtype(d) for d in runtime.cpu_dtypes)  # (prefill, decode)
        self.phase = "decode"
        # False once finalize() sees that no linear streams in any phase on the CPU backend:
        # then every linear computes whole, inline, from weight views cached per phase
        self.streaming = True
        self.stats = EngineStats()
        self.linears: list[HeteroLinear] = []
        self.experts: list[Any] = []  # engine.experts.HeteroExperts of a MoE model
        self.expert_stream: Any = None  # engine.experts.ExpertStream when some layer streams prefill
        # all-CPU linears the model calls directly (HeteroLinear.direct_module), not through
        # their HeteroLinear: each counts one split call per pass
        self.direct_linears = 0
        self.scheduler: PrefetchScheduler | None = None  # built by finalize()
        self.tracer: Tracer | None = None  # set to record a trace (engine.trace)
        # copies of different streams run side by side with two or more host-to-device copy
        # engines: then the next weight copies are issued as early as possible (HeteroLinear)
        self.prefetch_early = runtime.copy_engines >= 2
        # intra-op threads are a process setting, restored on close
        self._threads_before = torch.get_num_threads()
        torch.set_num_threads(max(1, int(runtime.cpu_threads)))
        self._scratch = _HostScratch(backend, self.stats) if backend.is_cuda else None
        self._staged: tuple[torch.Tensor, int, torch.Tensor] | None = None  # (x, version, x_h)
        self.arena: HostArena | None = None  # the host-held weights, set by the loader
        self.closed = False

    @property
    def cpu_dtype(self) -> torch.dtype:
        """The CPU share's dtype in the current phase."""
        return self.cpu_dtypes[self.phase == "decode"]

    def register(self, linear: HeteroLinear) -> None:
        self.linears.append(linear)
        self.scheduler = None  # the staging buffers must fit the new linear too

    def finalize(self) -> None:
        """Allocate the staging buffers for all registered linears (done at load, or lazily)."""
        if self.scheduler is None:
            self.scheduler = PrefetchScheduler(self.backend, self.linears, self.runtime, self.stats)
            self.streaming = self.backend.is_cuda or any(
                lin.placement.max_gpu_stream_rows for lin in self.linears
            )
            for lin in self.linears:
                lin.whole = None if self.streaming else lin.whole_weights()

    def attach_tracer(self, tracer: Tracer | None) -> None:
        """Record the engine's operations into `tracer` from now on (None: stop)."""
        self.finalize()
        self.tracer = tracer
        self.scheduler.tracer = tracer

    def begin_pass(self, phase: str) -> None:
        """Called once per model forward (a pre-hook): sets the phase, lets prefetch track order."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        self.phase = phase
        self.stats.passes += 1
        self.stats.split_calls += self.direct_linears
        self.stats.prefill_passes += phase == "prefill"
        self._staged = None
        self.finalize()
        if self.tracer is not None:
            self.tracer.op("pass", phase=phase)
        self.scheduler.begin_pass(phase)

    def stage_input(self, x: torch.Tensor, x2: torch.Tensor, name: str) -> torch.Tensor:
        """x2 [n, in] (device) in a pinned host buffer: a D2H copy on the compute stream and
        an event after it (CUDA). Linears fed the same input tensor (q, k and v) share one
        copy: `x` unchanged since (same object, same version; inference tensors keep no
        version, and no model changes a linear's input in place between two linears) reuses it."""
        version = -1 if x.is_inference() else x._version
        staged = self._staged
        if staged is not None and staged[0] is x and staged[1] == version:
            self.stats.inputs_shared += 1
            return staged[2]
        x_h = self._scratch.x_view(tuple(x2.shape), x2.dtype)
        self.backend.to_host_async(x_h, x2)
        scratch = self._scratch
        scratch.x_ready = self.backend.record_event(event=scratch.x_ready)
        tr = self.tracer
        if tr is not None:
            tr.op("copy", dir="d2h", stream="compute", what="x", linear=name, rows=0, tokens=x2.shape[0])
            tr.recorded(scratch.x_ready, "compute")
        self._staged = (x, version, x_h)  # holds x: its memory is not reused meanwhile
        return x_h

    def cpu_share(
        self, x2: torch.Tensor, x_h: torch.Tensor | None, w: Any, y: torch.Tensor, name: str
    ) -> Any:
        """y [n, k] (device, weights dtype) = x @ w[k, in]^T on the CPU, in w's dtype (`w` a
        weight, or a packed quantized kernel module that converts x itself). On CUDA from the
        staged host copy x_h into a pinned output slot, then an async H2D copy into y; returns
        the event recorded after that copy (None on the CPU stand-in)."""
        tr = self.tracer
        n, k = y.shape
        if self._scratch is None:  # CPU stand-in: x and y already live on the host
            start = time.perf_counter()
            _matmul_into(x2, w, y)
            self.stats.cpu_compute_s += time.perf_counter() - start
            if tr is not None:
                tr.blocking("cpu", start, linear=name, rows=k, tokens=n)
            return None
        scratch = self._scratch
        start = time.perf_counter()
        scratch.x_ready.synchronize()  # the D2H copy of x has landed
        if tr is not None:
            tr.blocking("sync", start, event=tr.event_id(scratch.x_ready))
        slot, y_h, y_free = scratch.y_slot((n, k), y.dtype)
        if y_free is not None:
            waited = time.perf_counter()
            y_free.synchronize()  # the H2D copy that last read this slot is done
            if tr is not None:
                tr.blocking("sync", waited, event=tr.event_id(y_free))
        start_cpu = time.perf_counter()
        self.stats.cpu_wait_s += start_cpu - start
        _matmul_into(x_h, w, y_h)
        self.stats.cpu_compute_s += time.perf_counter() - start_cpu
        if tr is not None:
            tr.blocking("cpu", start_cpu, linear=name, rows=k, tokens=n)
        self.backend.to_device_async(y, y_h)
        read = scratch.mark_read(slot)
        if tr is not None:
            tr.op("copy", dir="h2d", stream="compute", what="y", linear=name, rows=k, tokens=n)
            tr.recorded(read, "compute")
        return read

    def close(self) -> None:
        """Wait for in-flight copies, release the pinned memory (arena, scratch) and the
        staging buffers, restore the intra-op thread count."""
        if self.closed:
            return
        self.closed = True
        self.streaming = True  # a closed engine takes the checked path, which refuses to run
        self.backend.synchronize()
        if self.arena is not None:
            self.arena.release()
        for linear in self.linears:
            linear.host = None  # its views into the arena must not outlive it
        for experts in self.experts:
            experts.release()
        self._scratch = None
        self._staged = None
        self.scheduler = None
        torch.set_num_threads(self._threads_before)


def _same_operand(a: Any, b: Any) -> bool:
    """The same kernel module, or views of the same memory alike (HostWeight.cpu_operand makes
    a new view per call)."""
    if a is b:
        return True
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    return (a.dtype, a.shape, a.stride(), a.data_ptr()) == (b.dtype, b.shape, b.stride(), b.data_ptr())


def _matmul_into(x: torch.Tensor, w: Any, y: torch.Tensor) -> None:
    """y [n, k] = x [n, in] @ w[k, in]^T, computed in w's dtype (a weight) or by a packed
    quantized kernel module (bfloat16 inside), written in y's dtype."""
    if isinstance(w, torch.Tensor):
        xc = x if x.dtype == w.dtype else x.to(w.dtype)
        if w.dtype == y.dtype:
            torch.mm(xc, w.t(), out=y)
        else:
            y.copy_(F.linear(xc, w))
    else:  # models.formats.quant.QuantLinear
        y.copy_(w(x))


class HeteroLinear(nn.Module):
    """A linear whose rows [0, k) run on the CPU and rows [k, out) on the GPU (k per phase).

    Holds no nn.Parameter weight: the weight lives in `host` (HostWeight). The bias, if any,
    is a device parameter in the weights dtype.
    """

    def __init__(
        self, placement: LinearPlacement, host: HostWeight, bias: torch.Tensor | None, ctx: EngineContext
    ) -> None:
        super().__init__()
        if placement.resident:
            raise ValueError(f"{placement.name} is resident; keep it as a device nn.Linear")
        if (host.out_features, host.in_features) != (placement.out_features, placement.in_features):
            raise ValueError(f"{placement.name}: weight shape does not match its placement")
        self.placement = placement
        self.quant = host.quant  # (format, group size) of a quantized weight, else None
        self.in_features = placement.in_features
        self.out_features = placement.out_features
        self.host = host
        self.ctx = ctx
        self.whole: tuple[torch.Tensor, torch.Tensor] | None = None  # set by ctx.finalize()
        self._cpu_ops: dict[str, tuple[int, Any]] = {}  # phase -> (k, CPU operand), on first use
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(
                bias.detach().to(ctx.backend.device, ctx.weights_dtype), requires_grad=False
            )
        ctx.register(self)

    @classmethod
    def from_linear(cls, linear: nn.Linear, placement: LinearPlacement, ctx: EngineContext) -> HeteroLinear:
        """Split an in-memory nn.Linear (tests and small models; the engine loads from disk)."""
        host = HostWeight.from_tensor(
            linear.weight.detach(),
            (placement.cpu_rows_prefill, placement.cpu_rows_decode),
            ctx.weights_dtype,
            ctx.cpu_dtypes,
            ctx.backend,
            ctx.runtime.pin_weights,
        )
        return cls(placement, host, linear.bias, ctx)

    def stream_bytes(self, rows: int) -> int:
        """Staging bytes of `rows` rows of this weight as held (plan.memory.rows_bytes)."""
        return rows_bytes(rows, self.in_features, self.ctx.runtime.weights_dtype, self.quant)

    def extra_repr(self) -> str:
        p = self.placement
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, cpu_rows_prefill={p.cpu_rows_prefill}, "
            f"cpu_rows_decode={p.cpu_rows_decode}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] (device) -> y [..., out] (device, x's dtype).

        y is allocated once: the GPU share's matmul writes y[:, k:], the CPU share's result
        is copied into y[:, :k], then the bias is added in place. With one host-to-device copy
        engine (runtime.copy_engines) the next layers' weight copies are issued only after the
        join's copy, so that small copy never queues behind them; with more, right away."""
        ctx = self.ctx
        if not ctx.streaming:  # all-CPU on the CPU backend: no pipeline, no thread hand-off
            return self._whole_forward(x)
        if ctx.closed:
            raise RuntimeError("this model's engine is closed; load the model again")
        if ctx.scheduler is None:
            ctx.finalize()
        ctx.stats.split_calls += 1
        cached = self._cpu_ops.get(ctx.phase)
        if cached is None:  # (k, the CPU share's operand) of this phase, fixed after load
            k = self.placement.cpu_rows(ctx.phase)
            cached = self._cpu_ops[ctx.phase] = (k, self.host.cpu_operand(k, ctx.cpu_dtype) if k else None)
        k, w_cpu = cached
        out = self.out_features
        x2 = x.reshape(-1, self.in_features)  # [n, in]
        if x2.dtype != ctx.weights_dtype:
            x2 = x2.to(ctx.weights_dtype)
        n = x2.shape[0]
        name = self.placement.name
        tr = ctx.tracer
        x_h = ctx.stage_input(x, x2, name) if k > 0 and ctx._scratch is not None else None
        y = torch.empty((n, out), dtype=ctx.weights_dtype, device=ctx.backend.device)  # [n, out]
        # every split linear passes through the scheduler (nothing is staged when k == out),
        # so the learned execution order is the same in both phases
        parts, slot = ctx.scheduler.acquire(self, k)  # rows [k, out) as held, on the device
        if ctx.prefetch_early:
            ctx.scheduler.prefetch_ahead()
        if k < out:
            w_gpu = self.host.device_weight(parts, ctx.weights_dtype)  # [out - k, in]
            if tr is not None and self.quant is not None:
                tr.op("kernel", stream="compute", what="dequant", linear=name, rows=out - k, tokens=n)
            torch.mm(x2, w_gpu.t(), out=y[:, k:])  # [n, out - k]
            if tr is not None:
                tr.op("kernel", stream="compute", what="matmul", linear=name, rows=out - k, tokens=n)
        ctx.scheduler.release(slot)
        joined = ctx.cpu_share(x2, x_h, w_cpu, y[:, :k], name) if k > 0 else None
        if self.bias is not None:
            y.add_(self.bias)
            if tr is not None:
                tr.op("kernel", stream="compute", what="bias", linear=name, rows=out, tokens=n)
        if not ctx.prefetch_early:  # one copy engine: after the join's copy, not before it
            ctx.scheduler.prefetch_ahead(after=joined)
        y = y.view(*x.shape[:-1], out)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def direct_module(self) -> nn.Module | None:
        """A module computing exactly what `_whole_forward` does, without its bookkeeping (a
        second module call, clocks, counters, dtype checks, paid by every linear every token),
        for the model to call instead of this linear; None unless the pipeline is off
        (`ctx.streaming`) and both phases multiply with the same operand. The packed kernel
        itself when there is no bias. Exact for inputs in the weights dtype, the dtype the
        engine's model computes its activations in."""
        if self.whole is None or not _same_operand(*self.whole):
            return None
        w = self.whole[0]
        return w if self.bias is None and not isinstance(w, torch.Tensor) else CpuLinear(w, self.bias)

    def whole_weights(self) -> tuple:
        """(prefill, decode) operands of the whole layer: views of the weight [out, in] in each
        phase's CPU dtype, or a quantized weight's packed kernel."""
        return tuple(self.host.cpu_operand(self.out_features, dtype) for dtype in self.ctx.cpu_dtypes)

    def _whole_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The whole layer on the calling thread in the phase's CPU dtype, from views cached at
        finalize: activations are converted at the boundary, weights never. The same numbers
        as the pipelined path with k = out (x -> weights dtype -> CPU dtype -> weights dtype)."""
        ctx = self.ctx
        ctx.stats.split_calls += 1
        start = time.perf_counter()
        w = self.whole[ctx.phase == "decode"]
        wdt = ctx.weights_dtype
        xw = x if x.dtype == wdt else x.to(wdt)
        if isinstance(w, torch.Tensor):
            y = F.linear(xw if xw.dtype == w.dtype else xw.to(w.dtype), w)  # [..., out]
        else:  # a packed quantized kernel (bfloat16 inside, xw's dtype out)
            y = w(xw)
        if y.dtype != wdt:
            y = y.to(wdt)
        if self.bias is not None:
            y = y + self.bias
        ctx.stats.cpu_compute_s += time.perf_counter() - start
        return y if y.dtype == x.dtype else y.to(x.dtype)
