"""A CPU stand-in that keeps CUDA's hazards, so the CPU test suite catches ordering bugs.

`CpuBackend` makes every copy instant and every event complete: code that forgets to wait on
an event still works there, and fails on the first GPU. `StrictBackend` reports itself as
CUDA-like (`is_cuda`), so the engine takes its CUDA paths (pinned scratch, the copy of x to
the host, the worker's output slots), and:

- performs asynchronous copies late: a copy on a side stream, or to the host, happens only
  when an event recorded after it is waited for (or at `synchronize`); until then its
  destination holds poison (NaN, or 0xFF bytes). A consumer that reads without waiting reads
  poison, and greedy tokens change. Copies to the device on the compute stream land at once
  (the same stream orders them before their consumers, as on a GPU), but on a GPU they read
  their host source only when the stream gets there: the source must not change until an
  event recorded after the copy completes. So each such copy keeps a snapshot of its source
  and checks it when the copy is known to be done (a later compute-stream event waited for,
  or `synchronize`); a source rewritten before that raises `StrictHazard`.
- poisons a copy's destination when it is issued, so a buffer refilled before its last
  reader was done (no wait on the reader's "free" event) is corrupted where CUDA would race;
- counts pinned bytes as torch's caching host allocator does (`pinned_cost`: powers of two)
  and arenas exactly, live, so tests can check the engine's accounting and its release;
- records `record_stream` calls.

Compute runs synchronously on the calling thread, as before; torch's own rules (inference
tensors, dtypes) apply unchanged.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch

from hetegen_cli.core.devices import CpuBackend, pinned_cost


class LateStream:
    """A stream whose work runs in order, but only when something waits for it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.pending: list[Callable[[], None]] = []
        self.done = 0  # tasks run so far (positions in the stream's history)
        self.issued = 0
        self.lock = threading.RLock()

    def submit(self, task: Callable[[], None]) -> None:
        with self.lock:
            self.pending.append(task)
            self.issued += 1

    def run_until(self, position: int) -> None:
        with self.lock:
            while self.done < position:
                task = self.pending.pop(0)
                self.done += 1  # counted even if it raises: the stream stays consistent
                task()


class StrictHazard(RuntimeError):
    """A host buffer was rewritten while a GPU copy from it could still be reading it."""


class LateEvent:
    """Complete once its stream has run everything submitted before it was recorded."""

    def __init__(self, stream: LateStream | None) -> None:
        self.record(stream)

    def record(self, stream: LateStream | None) -> None:
        """(Re-)record: from now on it stands for everything `stream` has been given so far."""
        self.stream = stream
        self.position = stream.issued if stream is not None else 0

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.run_until(self.position)

    def query(self) -> bool:
        return self.stream is None or self.stream.done >= self.position


def _poison(tensor: torch.Tensor) -> None:
    with torch.inference_mode():  # raw memory, like a GPU copy: no autograd rules apply
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))
        else:
            tensor.view(torch.uint8).fill_(0xFF)


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    with torch.inference_mode():
        dst.copy_(src)


def _check_unchanged(src: torch.Tensor, snapshot: torch.Tensor) -> None:
    """The GPU copy from `src` is done now: it read what was there when it was issued?"""
    if not torch.equal(src.flatten().view(torch.uint8), snapshot.flatten().view(torch.uint8)):
        raise StrictHazard(
            "a host buffer was rewritten while a compute-stream copy from it was pending "
            "(wait for an event recorded after the copy before writing its source)"
        )


class StrictBackend(CpuBackend):
    """CUDA's ordering and pinned-memory rules on the CPU (see the module docstring)."""

    name = "strict-cpu"
    is_cuda = True

    def __init__(self) -> None:
        self.host_stream = LateStream("compute-to-host")  # copies to the host, in order
        self.streams: list[LateStream] = [self.host_stream]
        self._current = threading.local()
        self.pinned_live_bytes = 0
        self.pinned_peak_bytes = 0
        self.recorded_streams: list[tuple[torch.Tensor, Any]] = []
        self._lock = threading.Lock()

    # --- streams and events -------------------------------------------------------------

    def new_stream(self) -> LateStream:
        stream = LateStream(f"side-{len(self.streams)}")
        self.streams.append(stream)
        return stream

    def stream(self, stream: Any):
        backend = self

        class _Use:
            def __enter__(self) -> None:
                self.before = getattr(backend._current, "stream", None)
                backend._current.stream = stream

            def __exit__(self, *exc: object) -> None:
                backend._current.stream = self.before

        return _Use()

    def current_stream(self) -> Any:
        return getattr(self._current, "stream", None)

    def record_event(self, stream: Any = None, event: LateEvent | None = None) -> LateEvent:
        """On a side stream: after its copies. On the compute stream: after the copies to the
        host (and the source checks of copies to the device) issued so far (compute itself is
        synchronous). `event`: re-record that one."""
        stream = stream or self.current_stream()
        stream = stream if stream is not None else self.host_stream
        if event is None:
            return LateEvent(stream)
        event.record(stream)
        return event

    def wait_event(self, event: Any, stream: Any = None) -> None:
        """The compute stream waiting means the copies must be done now; a side stream's wait
        is ordering among late copies, which run in issue order anyway."""
        if (stream or self.current_stream()) is None:
            event.synchronize()

    def synchronize(self) -> None:
        for stream in self.streams:
            stream.run_until(stream.issued)

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None:
        self.recorded_streams.append((tensor, stream))

    # --- copies -------------------------------------------------------------------------

    def to_device_async(self, dst: torch.Tensor, src: torch.Tensor, stream: Any = None) -> None:
        stream = stream or self.current_stream()
        if stream is None:
            dst.copy_(src)  # the compute stream orders it before its consumers
            # on a GPU, the host source is read only when the stream gets there
            snapshot = src.clone()
            self.host_stream.submit(lambda: _check_unchanged(src, snapshot))
            return
        _poison(dst)
        stream.submit(lambda: _copy(dst, src))

    def to_host_async(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        _poison(dst)
        source = src.clone()  # the device value at issue time, as a GPU copy would read it
        self.host_stream.submit(lambda: _copy(dst, source))

    # --- pinned memory --------------------------------------------------------------------

    def _count(self, nbytes: int) -> None:
        with self._lock:
            self.pinned_live_bytes += nbytes
            self.pinned_peak_bytes = max(self.pinned_peak_bytes, self.pinned_live_bytes)

    def empty_pinned(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        tensor = torch.empty(shape, dtype=dtype)
        cost = pinned_cost(tensor.numel() * tensor.element_size())
        self._count(cost)
        weakref.finalize(tensor, self._count, -cost)
        return tensor

    def pinned_arena(self, nbytes: int) -> torch.Tensor:
        arena = torch.empty(nbytes, dtype=torch.uint8)
        self._count(nbytes)
        arena.hetegen_pinned = nbytes  # type: ignore[attr-defined]
        return arena

    def release_arena(self, arena: torch.Tensor) -> None:
        self._count(-getattr(arena, "hetegen_pinned", 0))
        arena.hetegen_pinned = 0  # type: ignore[attr-defined]
