"""Where the weights of split linears live, and how they are read from safetensors.

`HostWeight` holds one split linear's weight `W [out, in]` in host memory:

- `gpu_home`: rows `[row0, out)` in the weights dtype, ONE row-contiguous buffer (pinned on
  CUDA when asked), so the GPU share of either phase, rows `[k, out)`, is a view. When the CPU
  dtype equals the weights dtype, `row0 = 0` and the CPU rows are views of the same buffer.
- `cpu_home`: rows `[0, max_cpu_rows)` in the CPU dtype, only when that dtype differs from the
  weights dtype (then `row0 = min(cpu_rows_prefill, cpu_rows_decode)`: rows no phase ever sends
  to the GPU are not kept twice).

`CheckpointReader` reads tensors, or row ranges of them, from a folder's safetensors files in
chunks (`safe_open(..., framework="pt").get_slice`), copying each chunk straight into its final
home; the model is never held twice in RAM. Never reads pickles.
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from hetegen_cli.errors import ModelError
from hetegen_cli.model_spec import folder_tensor_index

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CHUNK_BYTES = 32 * 1024 * 1024  # rows are read and converted this many source bytes at a time


def torch_dtype(name: str) -> torch.dtype:
    """'float16' | 'bfloat16' | 'float32' -> torch dtype (ModelError otherwise)."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ModelError(f"unsupported dtype {name!r}", "use float16, bfloat16 or float32") from None


@dataclass
class HostWeight:
    """Host-held weight of one split linear. Shapes: gpu_home [out - row0, in], cpu_home [kmax, in]."""

    out_features: int
    in_features: int
    row0: int                   # first row held in gpu_home
    gpu_home: torch.Tensor      # weights dtype, pinned on CUDA when runtime.pin_weights
    cpu_home: torch.Tensor      # CPU dtype; a view of gpu_home when the dtypes agree
    pinned: bool

    @classmethod
    def allocate(cls, out_features: int, in_features: int, cpu_rows: tuple[int, int],
                 weights_dtype: torch.dtype, cpu_dtype: torch.dtype, backend, pin: bool) -> HostWeight:
        """Empty buffers for a linear whose CPU share is `cpu_rows` = (prefill, decode) rows."""
        kmin, kmax = min(cpu_rows), max(cpu_rows)
        same = cpu_dtype == weights_dtype
        row0 = 0 if same else kmin
        shape = (out_features - row0, in_features)
        pinned = bool(pin and backend.is_cuda and shape[0] > 0)
        gpu_home = backend.empty_pinned(shape, weights_dtype) if pinned else torch.empty(shape, dtype=weights_dtype)
        cpu_home = gpu_home[:kmax] if same else torch.empty((kmax, in_features), dtype=cpu_dtype)
        return cls(out_features, in_features, row0, gpu_home, cpu_home, pinned)

    @classmethod
    def from_tensor(cls, weight: torch.Tensor, cpu_rows: tuple[int, int], weights_dtype: torch.dtype,
                    cpu_dtype: torch.dtype, backend, pin: bool) -> HostWeight:
        """A HostWeight filled from an in-memory weight [out, in] (tests, small models)."""
        out, inp = weight.shape
        host = cls.allocate(out, inp, cpu_rows, weights_dtype, cpu_dtype, backend, pin)
        with torch.no_grad():
            host.gpu_home.copy_(weight[host.row0:])
            if host.cpu_home.data_ptr() != host.gpu_home.data_ptr() and host.cpu_home.shape[0]:
                host.cpu_home.copy_(weight[: host.cpu_home.shape[0]])
        return host

    @property
    def separate_cpu_copy(self) -> bool:
        return self.cpu_home.shape[0] > 0 and self.cpu_home.dtype != self.gpu_home.dtype

    def cpu_rows(self, k: int) -> torch.Tensor:
        """Rows [0, k) for the CPU share: [k, in], CPU dtype, contiguous view."""
        return self.cpu_home[:k]

    def gpu_rows(self, k: int) -> torch.Tensor:
        """Rows [k, out) for the GPU share: [out - k, in], weights dtype, contiguous view."""
        if k < self.row0:
            raise ValueError(f"rows from {k} requested but only rows from {self.row0} are held")
        return self.gpu_home[k - self.row0:]

    @property
    def gpu_home_bytes(self) -> int:
        return self.gpu_home.numel() * self.gpu_home.element_size()

    @property
    def cpu_copy_bytes(self) -> int:
        """Bytes of the separate CPU-dtype copy (0 when the CPU reads gpu_home)."""
        return self.cpu_home.numel() * self.cpu_home.element_size() if self.separate_cpu_copy else 0


class CheckpointReader:
    """Reads named tensors or their row ranges from a folder's *.safetensors files.

    Use as a context manager (closes the memory-mapped handles). `key_for` maps a transformers
    parameter name to the stored key (with or without the base-model prefix).
    """

    def __init__(self, folder: Path, base_model_prefix: str = "model") -> None:
        self.folder = Path(folder)
        self.index = folder_tensor_index(self.folder)  # key -> (file, dtype name, shape)
        if not self.index:
            raise ModelError(f"model folder {folder} has no *.safetensors weights",
                             "hetegen loads safetensors only; re-download or convert the model")
        self.prefix = base_model_prefix
        self._stack = contextlib.ExitStack()
        self._handles: dict[Path, object] = {}
        self.bytes_read = 0

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._handles.clear()
        self._stack.close()

    def key_for(self, name: str) -> str | None:
        """The stored key for parameter `name`, trying with and without the base-model prefix."""
        candidates = [name]
        if self.prefix and name.startswith(self.prefix + "."):
            candidates.append(name[len(self.prefix) + 1:])
        elif self.prefix:
            candidates.append(f"{self.prefix}.{name}")
        return next((c for c in candidates if c in self.index), None)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.index[key][2]

    def _handle(self, key: str):
        file = self.index[key][0]
        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = self._stack.enter_context(safe_open(str(file), framework="pt"))
            except Exception as exc:  # corrupt header, unreadable file
                raise ModelError(f"cannot read {file} ({exc})",
                                 "the file may be corrupt; re-download or convert the model") from exc
            self._handles[file] = handle
        return handle

    def copy_rows(self, key: str, dest: torch.Tensor, start: int = 0) -> None:
        """Copy rows [start, start + len(dest)) of tensor `key` into `dest` (any device/dtype).

        Reads at most CHUNK_BYTES of source rows at a time, so the transient host memory is one
        chunk, not one tensor. 0-d and 1-d tensors are read whole.
        """
        shape = self.shape(key)
        rows = dest.shape[0] if dest.dim() else 1
        if tuple(dest.shape[1:]) != tuple(shape[1:]) or (dest.dim() and start + rows > shape[0]):
            raise ModelError(f"tensor {key} has shape {list(shape)}, which does not fit "
                             f"rows [{start}, {start + rows}) of a {list(dest.shape)} destination",
                             "the checkpoint does not match its config.json")
        if dest.dim() <= 1:  # norms, biases: small, read whole
            whole = self._handle(key).get_tensor(key)
            self._copy(dest, whole[start:start + rows] if dest.dim() else whole)
            return
        sl = self._handle(key).get_slice(key)
        row_bytes = max(1, _numel(shape[1:]) * _itemsize(self.index[key][1]))
        step = max(1, CHUNK_BYTES // row_bytes)
        for lo in range(0, rows, step):
            hi = min(rows, lo + step)
            self._copy(dest[lo:hi], sl[start + lo:start + hi])

    def read(self, key: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The whole tensor `key` as a new tensor of `dtype` on `device`, filled chunk by chunk."""
        dest = torch.empty(self.shape(key), dtype=dtype, device=device)
        self.copy_rows(key, dest)
        return dest

    def _copy(self, dest: torch.Tensor, src: torch.Tensor) -> None:
        with torch.no_grad():
            dest.copy_(src)
        self.bytes_read += src.numel() * src.element_size()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _itemsize(dtype_name: str) -> int:
    return {"float64": 8, "float32": 4, "int64": 8, "int32": 4, "float16": 2, "bfloat16": 2,
            "int8": 1, "uint8": 1, "bool": 1}.get(dtype_name, 4)


@dataclass
class _Slot:
    """One issued copy: rows [k, out) of `linear`'s weight into staging buffer `buf`."""

    seq: int                      # position in the cyclic execution order (-1 while learning)
    linear: object                # the HeteroLinear
    k: int                        # first staged row; rows [k, out) are staged
    buf: int | None               # staging buffer index; None when nothing is copied (k == out)
    view: torch.Tensor | None     # [out - k, in] on the device
    ready: object                 # event recorded on the copy stream after the copy


class PrefetchScheduler:
    """Streams GPU shares into a rotating pool of device staging buffers, ahead of use.

    Execution order is learned during the first model forward (copies are then issued on
    demand, one at a time) and treated as cyclic afterwards: while linear i computes, the
    copies of the next `prefetch_depth` linears are in flight, wrapping from the last linear of
    a pass to the first ones of the next pass (predicted as a decode pass). Copy j goes to
    buffer j % N on a dedicated copy stream, after that buffer's "free" event (recorded on the
    compute stream after the matmul that last read it); compute waits on the copy's "ready"
    event. A staged copy of rows [k', out) serves any k >= k' (a view). An unexpected linear or
    a phase whose k needs rows that were not staged discards the in-flight copies and re-issues:
    correctness first. Buffers and pinned sources are persistent, so record_stream is not needed.
    """

    def __init__(self, backend, linears: list, runtime, dtype: torch.dtype, stats) -> None:
        self.backend = backend
        self.stats = stats
        # elements of the largest GPU share any phase streams: max (out - k_min) * in
        elems = max((l.placement.max_gpu_stream_rows * l.in_features for l in linears), default=0)
        count = max(1, int(runtime.staging_buffers))
        self.buffers = [torch.empty(elems, dtype=dtype, device=backend.device) for _ in range(count)]
        self.free_events: list = [None] * count
        self.depth = max(0, min(int(runtime.prefetch_depth), count - 1))
        self.copy_stream = backend.new_stream()
        self.order: list | None = None       # learned execution order (HeteroLinear objects)
        self.recording: list | None = None   # order being recorded during the first pass
        self.inflight: deque[_Slot] = deque()
        self.cur = 0                         # sequence number of the next expected linear
        self.issued = 0                      # sequence number of the next copy to issue ahead
        self.pass_start = 0
        self.phase = "decode"
        self._next_buf = 0

    @property
    def staging_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)

    def begin_pass(self, phase: str) -> None:
        """A model forward starts: finish learning the order, or re-align to a pass start."""
        self.phase = phase
        if self.order is None:
            if self.recording:
                self.order, self.recording = self.recording, None
                self.cur = self.issued = self.pass_start = 0
            else:
                self.recording = []
            return
        length = len(self.order)
        if self.cur % length:  # the last pass ended early (error, or a partial forward)
            self._discard()
            self.stats.order_resyncs += 1
            self.cur += length - self.cur % length
            self.issued = self.cur
        self.pass_start = self.cur

    def acquire(self, linear, k: int) -> tuple[torch.Tensor | None, _Slot]:
        """The staged rows [k, out) of `linear` ([out - k, in], device) or None if k == out.

        The compute stream is made to wait for the copy. Call release(slot) after the matmul.
        """
        if self.order is None:
            if self.recording is not None:
                self.recording.append(linear)
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
        self._prefetch_ahead()
        return self._use(slot, k)

    def release(self, slot: _Slot) -> None:
        """The matmul reading `slot` has been launched: its buffer may be refilled after it."""
        if slot.buf is not None:
            self.free_events[slot.buf] = self.backend.record_event()
        if slot.seq >= 0:
            self.cur = slot.seq + 1

    def _use(self, slot: _Slot, k: int) -> tuple[torch.Tensor | None, _Slot]:
        if k >= slot.linear.out_features:
            return None, slot
        self.backend.wait_event(slot.ready)
        return slot.view[k - slot.k:], slot

    def _issue(self, seq: int, linear, k: int) -> _Slot:
        rows = linear.out_features - k
        if rows == 0:
            return _Slot(seq, linear, k, None, None, None)
        buf = self._next_buf
        self._next_buf = (buf + 1) % len(self.buffers)
        view = self.buffers[buf][: rows * linear.in_features].view(rows, linear.in_features)
        src = linear.host.gpu_rows(k)
        with self.backend.stream(self.copy_stream):
            if self.free_events[buf] is not None:
                self.backend.wait_event(self.free_events[buf], self.copy_stream)
            view.copy_(src, non_blocking=True)
            ready = self.backend.record_event(self.copy_stream)
        self.stats.copies_issued += 1
        self.stats.bytes_streamed += src.numel() * src.element_size()
        return _Slot(seq, linear, k, buf, view, ready)

    def _prefetch_ahead(self) -> None:
        """Issue copies ahead (cyclic order) until `depth` real copies are in flight."""
        if self.depth == 0:
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
