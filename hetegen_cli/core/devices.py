"""The one module that touches `torch.cuda`: streams, events, pinned memory, memory info.

`Backend` hides whether a GPU is present. `CudaBackend` uses real CUDA streams, events and
page-locked host memory. `CpuBackend` is the stand-in used without a GPU: the "device" is the
CPU, streams are None, events are already complete and pinning is a no-op, so the same engine
code (split, join, ordering, prefetch) runs and is tested everywhere; the tests' strict
stand-in (tests/strict.py) keeps CUDA's hazards instead. Every asynchronous copy the engine makes goes
through `to_device_async` / `to_host_async`, so a backend decides when it really happens.
"""

from __future__ import annotations

import contextlib
import ctypes
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import torch

from hetegen_cli.core.dtypes import DTYPES
from hetegen_cli.core.errors import DeviceError, InputError


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a name in core.dtypes ('float16' -> torch.float16)."""
    if name not in DTYPES:
        raise InputError(f"unsupported dtype {name!r}", "use float16, bfloat16 or float32")
    return getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float16 -> 'float16'."""
    return str(dtype).removeprefix("torch.")


def cuda_available() -> bool:
    """True when torch sees at least one CUDA device."""
    try:
        return torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception:  # broken driver installs raise here
        return False


class _DoneEvent:
    """An event that has always completed (CPU stand-in)."""

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def wait(self, stream: Any = None) -> None:
        pass


DONE_EVENT = _DoneEvent()


class Backend:
    """Where the "GPU side" lives. Subclasses: CudaBackend, CpuBackend."""

    name = "abstract"
    is_cuda = False
    #: True when "device" work runs on the host's cores (the CPU stand-ins): the engine then
    #: needs the host's intra-op threads for it too
    device_is_host = True
    device = torch.device("cpu")

    def synchronize(self) -> None:
        raise NotImplementedError

    def new_stream(self) -> Any:
        """A new side stream (None on the CPU stand-in)."""
        raise NotImplementedError

    def stream(self, stream: Any) -> contextlib.AbstractContextManager:
        """Context manager making `stream` current (no-op for None)."""
        raise NotImplementedError

    def current_stream(self) -> Any:
        raise NotImplementedError

    def record_event(self, stream: Any = None, event: Any = None) -> Any:
        """An event recorded on `stream` (default: the current stream). Pass an event this
        backend made earlier to record it again instead of making a new one (pooled events):
        waits issued before keep the earlier record, a host `synchronize` after it waits for
        the new one."""
        raise NotImplementedError

    def wait_event(self, event: Any, stream: Any = None) -> None:
        """Make `stream` (default current) wait for `event` without blocking the host."""
        raise NotImplementedError

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None:
        """Tell the caching allocator `tensor` is used on `stream`."""

    def to_device_async(self, dst: torch.Tensor, src: torch.Tensor, stream: Any = None) -> None:
        """Copy host `src` into device `dst` on `stream` (default: the current stream), without
        waiting; a consumer on another stream must wait for an event recorded after it."""
        raise NotImplementedError

    def to_host_async(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy device `src` into (pinned) host `dst` on the current stream, without waiting; a
        host thread must synchronize an event recorded after it before reading `dst`."""
        raise NotImplementedError

    def empty_pinned(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A small page-locked host tensor from torch's caching host allocator, which rounds the
        bytes up to a power of two (`pinned_cost`). Plain host memory on the stand-in."""
        raise NotImplementedError

    def pinned_arena(self, nbytes: int) -> torch.Tensor:
        """One page-locked host block of exactly `nbytes` (uint8, [nbytes]), for the host-held
        weights: no power-of-two rounding. Release it with `release_arena`."""
        raise NotImplementedError

    def release_arena(self, arena: torch.Tensor) -> None:
        """Unpin an arena from `pinned_arena` (the caller then drops its references)."""

    def memory_info(self) -> tuple[int, int]:
        """(free bytes, total bytes) of device memory."""
        raise NotImplementedError

    def reset_peak_memory(self) -> None:
        pass

    def peak_memory_bytes(self) -> int:
        """Peak bytes allocated by torch on the device since the last reset (0 on the stand-in)."""
        return 0

    def allocated_bytes(self) -> int:
        return 0

    def properties(self) -> dict[str, Any]:
        return {}

    def now(self) -> float:
        """Wall-clock seconds after synchronising the device (use for timing)."""
        self.synchronize()
        return time.perf_counter()

    def time_call(self, fn: Callable[[], Any]) -> float:
        """Seconds `fn` takes, synchronised before and after."""
        start = self.now()
        fn()
        return self.now() - start

    def timing_event(self, stream: Any = None) -> Any:
        """A timestamp taken when the work queued on `stream` (default: current) before it is
        done; two of them give `elapsed_s`. Here (the stand-ins, whose copies finish before
        they return): the host clock now."""
        return time.perf_counter()

    def elapsed_s(self, start: Any, end: Any) -> float:
        """Seconds from `timing_event` `start` to `end` (waits for `end`); negative when `end`
        came first."""
        return float(end - start)


class CpuBackend(Backend):
    """No GPU: the GPU side runs on the CPU. Streams/events are trivially complete."""

    name = "cpu"
    is_cuda = False
    device = torch.device("cpu")

    def synchronize(self) -> None:
        pass

    def new_stream(self) -> Any:
        return None

    def stream(self, stream: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def current_stream(self) -> Any:
        return None

    def record_event(self, stream: Any = None, event: Any = None) -> Any:
        return DONE_EVENT

    def wait_event(self, event: Any, stream: Any = None) -> None:
        pass

    def to_device_async(self, dst: torch.Tensor, src: torch.Tensor, stream: Any = None) -> None:
        dst.copy_(src)

    def to_host_async(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)

    def empty_pinned(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)

    def pinned_arena(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def release_arena(self, arena: torch.Tensor) -> None:
        pass

    def memory_info(self) -> tuple[int, int]:
        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)


class CudaPathBackend(CpuBackend):
    """The engine's CUDA code path on the CPU (`is_cuda`: pinned scratch, the copy of x to the
    host, output slots, events), with copies done at once and events complete: a GPU's host
    work without a GPU and without the strict stand-in's bookkeeping. Records traces
    (engine.trace, `hetegen plan --simulate`) and times host work (scripts/host_time.py)."""

    name = "cuda-path-cpu"
    is_cuda = True

    def record_event(self, stream: Any = None, event: Any = None) -> Any:
        """A complete event, but a distinct object per event, as on a GPU (a trace tells
        events apart by identity)."""
        return event if event is not None else _DoneEvent()


class CudaBackend(Backend):
    """A real CUDA device: streams, events, pinned memory."""

    name = "cuda"
    is_cuda = True
    device_is_host = False

    def __init__(self, index: int = 0) -> None:
        if not cuda_available():
            raise DeviceError(
                "no CUDA GPU is available",
                "run on a machine with an NVIDIA GPU and a CUDA build of torch, or use the CPU backend",
            )
        self.index = index
        self.device = torch.device("cuda", index)
        torch.cuda.set_device(self.device)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def new_stream(self) -> Any:
        return torch.cuda.Stream(device=self.device)

    def stream(self, stream: Any) -> contextlib.AbstractContextManager:
        if stream is None:
            return contextlib.nullcontext()
        return torch.cuda.stream(stream)

    def current_stream(self) -> Any:
        return torch.cuda.current_stream(self.device)

    def record_event(self, stream: Any = None, event: Any = None) -> Any:
        event = event if event is not None else torch.cuda.Event()
        event.record(stream or torch.cuda.current_stream(self.device))
        return event

    def wait_event(self, event: Any, stream: Any = None) -> None:
        (stream or torch.cuda.current_stream(self.device)).wait_event(event)

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None:
        if stream is not None and tensor.is_cuda:
            tensor.record_stream(stream)

    def to_device_async(self, dst: torch.Tensor, src: torch.Tensor, stream: Any = None) -> None:
        with self.stream(stream):
            dst.copy_(src, non_blocking=True)

    def to_host_async(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src, non_blocking=True)

    def empty_pinned(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def pinned_arena(self, nbytes: int) -> torch.Tensor:
        """Pageable memory of exactly `nbytes`, then page-locked in place with
        cudaHostRegister (torch's own pinned allocator would round it up to a power of two)."""
        arena = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(arena.data_ptr(), arena.numel(), 0)
        if int(err) != 0:
            # the failure stays as this thread's last CUDA error, and torch's check after the
            # next kernel launch would report it there, as an unrelated error: clear it
            clear_last_cuda_error()
            raise DeviceError(
                f"cannot page-lock {nbytes / 2**30:.2f} GiB of host memory for the weights "
                f"(cudaHostRegister error {int(err)})",
                "free RAM, raise the locked-memory limit (ulimit -l), or keep more of the model on the GPU",
            )
        return arena[:nbytes]

    def release_arena(self, arena: torch.Tensor) -> None:
        torch.cuda.cudart().cudaHostUnregister(arena.data_ptr())

    def memory_info(self) -> tuple[int, int]:
        free, total = torch.cuda.mem_get_info(self.device)
        return int(free), int(total)

    def reset_peak_memory(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory_bytes(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.device))

    def allocated_bytes(self) -> int:
        return int(torch.cuda.memory_allocated(self.device))

    def properties(self) -> dict[str, Any]:
        props = torch.cuda.get_device_properties(self.device)
        return {
            "name": props.name,
            "total_memory_bytes": int(props.total_memory),
            "compute_capability": f"{props.major}.{props.minor}",
            "multiprocessor_count": int(props.multi_processor_count),
        }

    def timing_event(self, stream: Any = None) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream or torch.cuda.current_stream(self.device))
        return event

    def elapsed_s(self, start: Any, end: Any) -> float:
        start.synchronize()  # both must have completed (they may be on different streams)
        end.synchronize()
        return start.elapsed_time(end) / 1e3  # elapsed_time is in ms


def _loaded_cudart() -> ctypes.CDLL | None:
    """The CUDA runtime library this process has loaded (torch's), or None."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if "libcudart" in path.rsplit("/", 1)[-1]:
                    return ctypes.CDLL(path)
    except OSError:
        pass
    return None


def clear_last_cuda_error() -> int:
    """Read and so reset the calling thread's last CUDA runtime error (cudaGetLastError);
    returns it (0: none). torch binds no cudaGetLastError, so this goes through the runtime
    library torch loaded; without one, a tiny kernel launch lets torch's own launch check
    consume the error instead."""
    cudart = _loaded_cudart()
    if cudart is not None:
        return int(cudart.cudaGetLastError())
    try:
        torch.zeros(1, device="cuda").add_(1)
    except RuntimeError:
        return -1
    return 0


def pinned_cost(nbytes: int) -> int:
    """Bytes torch's caching host allocator holds for a pinned request of `nbytes`: the next
    power of two (what `empty_pinned` really costs)."""
    return 0 if nbytes <= 0 else 1 << (nbytes - 1).bit_length()


def get_backend(kind: str = "auto") -> Backend:
    """'auto' (CUDA if present, else the CPU stand-in), 'cuda' (error if absent) or 'cpu'."""
    if kind == "cpu":
        return CpuBackend()
    if kind == "cuda":
        return CudaBackend()
    if kind == "auto":
        return CudaBackend() if cuda_available() else CpuBackend()
    raise ValueError(f"unknown backend {kind!r}")


@contextlib.contextmanager
def out_of_memory_as_error(what: str) -> Iterator[None]:
    """Turn a CUDA out-of-memory error into a DeviceError with a hint."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        raise DeviceError(
            f"the GPU ran out of memory while {what}",
            "lower --gpu-memory or close other GPU programs, then re-plan",
        ) from exc


class CudaEventClock:
    """Times work queued on a CUDA stream with timing events, in seconds.

    `start()` records an event; `stop()` records another, waits for it and returns the GPU
    time between them, so host-side launch jitter does not count (used by `profile`).
    """

    def __init__(self, backend: Backend, stream: Any = None) -> None:
        self.device = backend.device
        self.stream = stream
        self._start: Any = None

    def _record(self) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record(self.stream or torch.cuda.current_stream(self.device))
        return event

    def start(self) -> None:
        self._start = self._record()

    def stop(self) -> float:
        end = self._record()
        end.synchronize()
        return self._start.elapsed_time(end) / 1e3  # elapsed_time is in ms


def event_clock(backend: Backend, stream: Any = None) -> CudaEventClock:
    """A CUDA-event clock for `backend` (a CudaBackend)."""
    if not backend.is_cuda:
        raise ValueError("event_clock needs a CUDA backend")
    return CudaEventClock(backend, stream)
