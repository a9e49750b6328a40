"""The prefetch scheduler: streams the GPU shares of split linears into rotating device
staging buffers, ahead of use, on a copy stream (docs/engine.md)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from hetegen_cli.core.devices import Backend
from hetegen_cli.plan.document import RuntimeSettings
from hetegen_cli.plan.memory import arena_bytes


@dataclass
class _Slot:
    """One issued copy: rows [k, out) of `linear`'s weight (each of its stored parts: one
    tensor for a float weight, q/scale/min for a quantized one) into staging buffer `buf`."""

    seq: int  # position in the cyclic execution order (-1 while learning)
    linear: object  # the HeteroLinear
    k: int  # first staged row; rows [k, out) are staged
    buf: int | None  # staging buffer index; None when nothing is copied (k == out)
    view: tuple[torch.Tensor, ...] | None  # the staged parts, rows [k, out), on the device
    ready: object  # event recorded on the copy stream after the copy


class PrefetchScheduler:
    """Streams GPU shares into a rotating pool of device staging buffers, ahead of use.

    The execution order starts as the order the linears were registered in (the plan's order,
    which is the model's), so the first forward prefetches too; the order that forward really
    took replaces it at the next one. The order is cyclic: after linear i's join
    (`prefetch_ahead`), the copies of the next `prefetch_depth` linears are issued, wrapping
    from the last linear of a pass to the first ones of the next pass (predicted as a decode
    pass). Issued after the join, a weight copy never delays the join's own small
    host-to-device copy on a GPU whose copy engine serves one copy at a time. Copy j goes to
    buffer j % N on a dedicated copy stream, after that buffer's "free" event (recorded on the
    compute stream after the matmul that last read it); compute waits on the copy's "ready"
    event. Both events are made once per buffer and recorded again. A staged copy of rows
    [k', out) serves any k >= k' (a view). An unexpected linear or a phase whose k needs rows
    that were not staged discards the in-flight copies and re-issues: correctness first.
    Buffers are bytes: a GPU share is staged as the host holds it (the weights dtype, or a
    quantized weight's parts, each at a multiple of ARENA_ALIGN bytes). Staging buffers are
    recorded on the copy stream (record_stream), so the caching allocator never hands their
    memory out while a copy into them is pending.
    """

    def __init__(self, backend: Backend, linears: list, runtime: RuntimeSettings, stats: Any) -> None:
        self.backend = backend
        self.stats = stats
        # bytes of the largest GPU share any phase streams (plan.memory.rows_bytes)
        nbytes = max((lin.stream_bytes(lin.placement.max_gpu_stream_rows) for lin in linears), default=0)
        count = max(1, int(runtime.staging_buffers))
        with torch.inference_mode(False):  # normal tensors, written in and out of inference mode
            self.buffers = [
                torch.empty(nbytes, dtype=torch.uint8, device=backend.device) for _ in range(count)
            ]
        self.free_events: list = [None] * count  # per buffer, recorded again each use
        self.ready_events: list = [None] * count
        self.depth = max(0, min(int(runtime.prefetch_depth), count - 1))
        self.copy_stream = backend.new_stream()
        for buffer in self.buffers:  # written on the copy stream: the allocator must know
            backend.record_stream(buffer, self.copy_stream)
        # execution order (HeteroLinear objects): seeded with the registration order, replaced
        # by the order the first forward really took (recorded while it runs)
        self.order: list | None = list(linears) or None
        self.recording: list | None = [] if self.order else None
        self.tracer = None  # the EngineContext's Tracer while one records
        self._copies: dict[tuple, tuple] = {}  # (buffer, linear, k) -> _copy_plan
        self.inflight: deque[_Slot] = deque()
        self.cur = 0  # sequence number of the next expected linear
        self.issued = 0  # sequence number of the next copy to issue ahead
        self.pass_start = 0
        self.phase = "decode"
        self._next_buf = 0

    @property
    def staging_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)

    def begin_pass(self, phase: str) -> None:
        """A model forward starts: finish learning the order, or re-align to a pass start."""
        self.phase = phase
        if self.recording:  # the first forward's order replaces the seeded (or no) order
            seen = self.recording
            self.recording = None
            if self.order is None or seen != self.order:
                self._discard()
                self.order = seen
                self.cur = self.issued = self.pass_start = 0
                return
        if self.order is None:
            self.recording = []
            return
        length = len(self.order)
        if self.cur % length:  # the last pass ended early (error, or a partial forward)
            self._discard()
            self.stats.order_resyncs += 1
            self.cur += length - self.cur % length
            self.issued = self.cur
        self.pass_start = self.cur

    def acquire(self, linear, k: int) -> tuple[tuple[torch.Tensor, ...] | None, _Slot]:
        """The staged parts of rows [k, out) of `linear` (device; for a float weight one
        tensor [out - k, in]) or None if k == out.

        The compute stream is made to wait for the copy. Call release(slot) after the matmul.
        """
        if self.recording is not None:
            self.recording.append(linear)
        if self.order is None:
            slot = self._issue(-1, linear, k)
            self.stats.prefetch_misses += slot.buf is not None
            return self._use(slot, k)
        if self.order[self.cur % len(self.order)] is not linear:
            self._resync(linear)
            if self.order is None:
                return self.acquire(linear, k)
        head = self.inflight[0] if self.inflight else None
        if head is not None and head.seq == self.cur and head.linear is linear and head.k <= k:
            slot = self.inflight.popleft()
            self.stats.prefetch_hits += slot.buf is not None
        else:
            self._discard()
            slot = self._issue(self.cur, linear, k)
            self.issued = self.cur + 1
            self.stats.prefetch_misses += slot.buf is not None
        return self._use(slot, k)

    def release(self, slot: _Slot) -> None:
        """The matmul reading `slot` has been launched: its buffer may be refilled after it."""
        if slot.buf is not None:
            event = self.backend.record_event(event=self.free_events[slot.buf])
            self.free_events[slot.buf] = event
            if self.tracer is not None:
                self.tracer.recorded(event, "compute")
        if slot.seq >= 0:
            self.cur = slot.seq + 1

    def _use(self, slot: _Slot, k: int) -> tuple[tuple[torch.Tensor, ...] | None, _Slot]:
        if k >= slot.linear.out_features:
            return None, slot
        self.backend.wait_event(slot.ready)
        if self.tracer is not None:
            self.tracer.op("wait", stream="compute", event=self.tracer.event_id(slot.ready))
        if k == slot.k:
            return slot.view, slot
        return tuple(part[k - slot.k :] for part in slot.view), slot

    def _issue(self, seq: int, linear, k: int) -> _Slot:
        rows = linear.out_features - k
        if rows == 0:
            return _Slot(seq, linear, k, None, None, None)
        buf = self._next_buf
        self._next_buf = (buf + 1) % len(self.buffers)
        tr = self.tracer
        if self.free_events[buf] is not None:  # the kernel that last read this buffer
            self.backend.wait_event(self.free_events[buf], self.copy_stream)
            if tr is not None:
                tr.op("wait", stream="copy", event=tr.event_id(self.free_events[buf]))
        key = (buf, linear, k)
        plan = self._copies.get(key)
        if plan is None:  # the same (buffer, linear, rows) recurs every pass: views made once
            plan = self._copies[key] = self._copy_plan(buf, linear, k)
        srcs, views, nbytes = plan
        for src, view in zip(srcs, views, strict=True):
            self.backend.to_device_async(view, src, self.copy_stream)
        self.stats.bytes_streamed += nbytes
        if tr is not None:
            name = linear.placement.name
            tr.op("copy", dir="h2d", stream="copy", what="weight", linear=name, rows=rows, tokens=0)
        ready = self.backend.record_event(self.copy_stream, self.ready_events[buf])
        self.ready_events[buf] = ready
        if tr is not None:
            tr.recorded(ready, "copy")
        self.stats.copies_issued += 1
        return _Slot(seq, linear, k, buf, views, ready)

    def _copy_plan(self, buf: int, linear, k: int) -> tuple[tuple, tuple, int]:
        """(host parts of rows [k, out), their device views in buffer `buf`, bytes)."""
        srcs = tuple(linear.host.gpu_parts(k))
        views, offset, total = [], 0, 0
        with torch.inference_mode(False):  # kept for later forwards, in inference mode or not
            for src in srcs:
                nbytes = src.numel() * src.element_size()
                views.append(self.buffers[buf][offset : offset + nbytes].view(src.dtype).view(src.shape))
                offset += arena_bytes(nbytes)
                total += nbytes
        return srcs, tuple(views), total

    def prefetch_ahead(self, after: Any = None) -> None:
        """Issue copies ahead (cyclic order) until `depth` real copies are in flight. The
        split linear calls it after its join (class docstring); `after`: an event the copy
        stream waits for before any later copy (the join's own copy, which on one copy engine
        must go first even if its stream reaches it later)."""
        if after is not None:
            self.backend.wait_event(after, self.copy_stream)
            if self.tracer is not None:
                self.tracer.op("wait", stream="copy", event=self.tracer.event_id(after))
        if self.depth == 0 or self.order is None:
            return
        length = len(self.order)
        real = sum(s.buf is not None for s in self.inflight)
        while real < self.depth and self.issued - self.cur <= length:
            seq = self.issued
            linear = self.order[seq % length]
            phase = self.phase if seq < self.pass_start + length else "decode"
            slot = self._issue(seq, linear, linear.placement.cpu_rows(phase))
            self.inflight.append(slot)
            self.issued += 1
            real += slot.buf is not None

    def _discard(self) -> None:
        """Forget copies issued ahead. Later copies into their buffers queue behind them on the
        copy stream, and compute never reads them, so nothing needs to wait here."""
        self.stats.copies_discarded += sum(s.buf is not None for s in self.inflight)
        self.inflight.clear()

    def _resync(self, linear) -> None:
        """`linear` is not the expected one: jump to its next position, or re-learn the order."""
        self._discard()
        self.stats.order_resyncs += 1
        length = len(self.order)
        pos = self.cur % length
        for step in range(1, length + 1):
            if self.order[(pos + step) % length] is linear:
                self.cur += step
                self.issued = self.cur
                return
        self.order, self.recording = None, None  # a linear outside the order: learn it again
