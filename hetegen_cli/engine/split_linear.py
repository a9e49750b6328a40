"""The split linear: rows [0, k) on the CPU, rows [k, out) streamed to and multiplied on the GPU.

One `HeteroLinear` replaces one nn.Linear (weight [out, in], y = x W^T + b). All split linears
of a model share one `EngineContext`: the backend, the current phase ("prefill" or "decode",
set once per model forward by `begin_pass`), one CPU worker thread, pinned scratch buffers and
the `PrefetchScheduler` (engine.prefetch), which streams GPU shares into staging buffers.

Forward of a split linear, x [..., in] -> y [..., out], k = cpu rows of the current phase:

1. (k > 0) copy x to a pinned host buffer (non_blocking on CUDA), record an event, and submit
   x_h @ W[:k]^T to the CPU worker, which waits for that event first.
2. acquire the staged GPU share W[k:] from the scheduler (the copy was usually issued while an
   earlier linear computed), make the compute stream wait for it, y_g = x @ W[k:]^T.
3. join: y[..., :k] = CPU result (non_blocking from pinned memory), y[..., k:] = y_g, add bias.

On the CPU stand-in backend the very same code runs: the "device" is the CPU, the "copy" into
the staging buffer is a real tensor copy, events are already complete.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hetegen_cli.core.devices import Backend, pinned_cost, torch_dtype
from hetegen_cli.engine.host_weight import HostArena, HostWeight
from hetegen_cli.engine.prefetch import PrefetchScheduler
from hetegen_cli.plan.document import LinearPlacement, RuntimeSettings
from hetegen_cli.plan.memory import rows_bytes

PHASES = ("prefill", "decode")


@dataclass
class EngineStats:
    """Counters of one engine since load (or the last reset)."""

    passes: int = 0  # model forwards seen (begin_pass calls)
    prefill_passes: int = 0
    split_calls: int = 0  # HeteroLinear forwards
    copies_issued: int = 0  # host -> staging-buffer copies of GPU shares
    bytes_streamed: int = 0  # bytes of those copies
    prefetch_hits: int = 0  # GPU share already issued ahead when its linear ran
    prefetch_misses: int = 0  # GPU share issued on demand (first pass, order/phase change)
    copies_discarded: int = 0  # issued ahead but not used (order or phase changed)
    order_resyncs: int = 0  # a linear ran that was not the expected next one
    cpu_compute_s: float = 0.0  # worker time inside CPU matmuls
    cpu_wait_s: float = 0.0  # main-thread time blocked joining the CPU share
    pinned_scratch_bytes: int = 0  # pinned x / output slots held now (a level, kept by reset)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def reset(self) -> None:
        """Zero every counter."""
        for name, value in asdict(EngineStats()).items():
            if name != "pinned_scratch_bytes":
                setattr(self, name, value)


class _HostScratch:
    """Reusable pinned host buffers (CUDA only): x for the D2H copy, two CPU-output slots.

    Output slots alternate; before the worker overwrites one it waits for the event recorded
    after the H2D copy that last read it. Buffers grow (powers of two) and are never shrunk.
    """

    def __init__(self, backend: Backend, stats: EngineStats) -> None:
        self.backend = backend
        self.stats = stats
        self._x: torch.Tensor | None = None
        self._y: list[torch.Tensor | None] = [None, None]
        self._y_read: list[Any] = [None, None]
        self._next = 0

    def _fit(self, buf: torch.Tensor | None, numel: int, dtype: torch.dtype) -> torch.Tensor:
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            # grown inside forwards that may run under inference mode: allocate a normal
            # tensor, which the worker thread (never in inference mode) may write in place
            with torch.inference_mode(False):
                buf = self.backend.empty_pinned((1 << max(12, (numel - 1).bit_length()),), dtype)
        return buf

    def pinned_bytes(self) -> int:
        """What the scratch holds in torch's caching host allocator (powers of two)."""
        bufs = [self._x, *self._y]
        return sum(pinned_cost(b.numel() * b.element_size()) for b in bufs if b is not None)

    def x_view(self, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        self._x = self._fit(self._x, shape[0] * shape[1], dtype)
        self.stats.pinned_scratch_bytes = self.pinned_bytes()
        return self._x[: shape[0] * shape[1]].view(shape)

    def y_slot(self, shape: tuple[int, int], dtype: torch.dtype) -> tuple[int, torch.Tensor, Any]:
        """(slot, pinned view [n, k], event to wait before writing it or None)."""
        i = self._next
        self._next ^= 1
        self._y[i] = self._fit(self._y[i], shape[0] * shape[1], dtype)
        self.stats.pinned_scratch_bytes = self.pinned_bytes()
        return i, self._y[i][: shape[0] * shape[1]].view(shape), self._y_read[i]

    def mark_read(self, slot: int) -> None:
        self._y_read[slot] = self.backend.record_event()


class EngineContext:
    """State shared by the split linears of one model. Close it to stop the worker thread."""

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
        self.scheduler: PrefetchScheduler | None = None  # built by finalize()
        threads = max(1, int(runtime.cpu_threads))
        # intra-op threads are a process setting (restored on close); set in the worker too,
        # since OpenMP keeps the thread count per calling thread
        self._threads_before = torch.get_num_threads()
        torch.set_num_threads(threads)
        self._worker = ThreadPoolExecutor(
            1, thread_name_prefix="hetegen-cpu", initializer=torch.set_num_threads, initargs=(threads,)
        )
        self._scratch = _HostScratch(backend, self.stats) if backend.is_cuda else None
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

    def begin_pass(self, phase: str) -> None:
        """Called once per model forward (a pre-hook): sets the phase, lets prefetch track order."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        self.phase = phase
        self.stats.passes += 1
        self.stats.prefill_passes += phase == "prefill"
        self.finalize()
        self.scheduler.begin_pass(phase)

    def start_cpu_share(
        self, x2: torch.Tensor, w_cpu: torch.Tensor | nn.Module, inline: bool = False
    ) -> tuple[Future, int | None]:
        """Submit x2 [n, in] @ w_cpu[k, in]^T to the worker (`w_cpu` a weight, or a packed
        quantized kernel module with `out_features` k). Returns (future, output slot).

        `inline` computes on the calling thread instead (used when the CPU does the whole
        layer: there is no GPU work to overlap, and the thread hand-off costs ~0.1 ms).
        """
        n = x2.shape[0]
        k = w_cpu.shape[0] if isinstance(w_cpu, torch.Tensor) else w_cpu.out_features
        submit = self._run_inline if inline else self._worker.submit
        if self._scratch is None:  # CPU stand-in: x already lives on the host
            return submit(self._cpu_matmul, x2, None, w_cpu, None, None), None
        x_h = self._scratch.x_view((n, x2.shape[1]), x2.dtype)
        self.backend.to_host_async(x_h, x2)
        x_ready = self.backend.record_event()
        slot, y_h, y_free = self._scratch.y_slot((n, k), x2.dtype)
        return submit(self._cpu_matmul, x_h, x_ready, w_cpu, y_h, y_free), slot

    @staticmethod
    def _run_inline(fn: Any, *args: Any) -> Future:
        future: Future = Future()
        future.set_result(fn(*args))
        return future

    def _cpu_matmul(
        self,
        x_h: torch.Tensor,
        x_ready: Any,
        w: torch.Tensor | nn.Module,
        y_h: torch.Tensor | None,
        y_free: Any,
    ) -> torch.Tensor:
        """Worker thread: x_h [n, in] @ w[k, in]^T -> [n, k] in x_h's dtype (into y_h if given);
        a quantized kernel module converts x itself."""
        if x_ready is not None:
            x_ready.synchronize()  # the D2H copy of x has landed
        start = time.perf_counter()
        # the worker thread does not inherit the caller's inference mode: set it here
        with torch.inference_mode():
            if not isinstance(w, torch.Tensor):  # models.quant.QuantLinear: bfloat16 inside
                result = w(x_h)
                if y_h is not None:
                    if y_free is not None:
                        y_free.synchronize()
                    y_h.copy_(result)
                    result = y_h
                self.stats.cpu_compute_s += time.perf_counter() - start
                return result
            xc = x_h if x_h.dtype == w.dtype else x_h.to(w.dtype)
            if y_h is None:
                result = F.linear(xc, w).to(x_h.dtype)
            else:
                if y_free is not None:
                    y_free.synchronize()  # the H2D copy that last read this slot is done
                if w.dtype == y_h.dtype:
                    torch.mm(xc, w.t(), out=y_h)
                else:
                    y_h.copy_(F.linear(xc, w))
                result = y_h
        self.stats.cpu_compute_s += time.perf_counter() - start
        return result

    def finish_cpu_share(self, pending: tuple[Future, int | None]) -> torch.Tensor:
        """Join: the CPU share [n, k] on the device (async H2D copy from pinned memory)."""
        future, slot = pending
        start = time.perf_counter()
        result = future.result()
        self.stats.cpu_wait_s += time.perf_counter() - start
        if self._scratch is None:
            return result
        on_device = torch.empty(result.shape, dtype=result.dtype, device=self.backend.device)
        self.backend.to_device_async(on_device, result)
        self._scratch.mark_read(slot)
        return on_device

    def close(self) -> None:
        """Stop the worker, wait for in-flight copies, release the pinned memory (arena,
        scratch) and the staging buffers, restore the intra-op thread count."""
        if self.closed:
            return
        self.closed = True
        self.streaming = True  # a closed engine takes the checked path, which refuses to run
        self._worker.shutdown(wait=True)
        self.backend.synchronize()
        if self.arena is not None:
            self.arena.release()
        for linear in self.linears:
            linear.host = None  # its views into the arena must not outlive it
        self._scratch = None
        self.scheduler = None
        torch.set_num_threads(self._threads_before)


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
        """x [..., in] (device) -> y [..., out] (device, x's dtype)."""
        ctx = self.ctx
        if not ctx.streaming:  # all-CPU on the CPU backend: no pipeline, no thread hand-off
            return self._whole_forward(x)
        if ctx.closed:
            raise RuntimeError("this model's engine is closed; load the model again")
        if ctx.scheduler is None:
            ctx.finalize()
        ctx.stats.split_calls += 1
        k = self.placement.cpu_rows(ctx.phase)
        x2 = x.reshape(-1, self.in_features)  # [n, in]
        if x2.dtype != ctx.weights_dtype:
            x2 = x2.to(ctx.weights_dtype)
        if k == self.out_features:
            # the CPU does the whole layer: no GPU work to overlap, so compute it inline (no
            # thread hand-off), after the scheduler has issued the next layers' copies
            # every split linear passes through the scheduler, so the learned execution order
            # is the same in both phases
            _, slot = ctx.scheduler.acquire(self, k)  # nothing staged for k == out
            ctx.scheduler.release(slot)
            y_cpu = ctx.finish_cpu_share(
                ctx.start_cpu_share(x2, self.host.cpu_operand(k, ctx.cpu_dtype), inline=True)
            )
            y_gpu = None
        else:
            pending = ctx.start_cpu_share(x2, self.host.cpu_operand(k, ctx.cpu_dtype)) if k > 0 else None
            try:
                parts, slot = ctx.scheduler.acquire(self, k)  # rows [k, out) as held, on the device
                w_gpu = self.host.device_weight(parts, ctx.weights_dtype)  # [out - k, in]
                y_gpu = F.linear(x2, w_gpu)  # [n, out - k]
                ctx.scheduler.release(slot)
            finally:
                y_cpu = ctx.finish_cpu_share(pending) if pending is not None else None  # [n, k]
        if y_cpu is None:
            y = y_gpu
        elif y_gpu is None:
            y = y_cpu
        else:
            y = torch.cat((y_cpu, y_gpu), dim=-1)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

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
