"""Where a split linear's weight lives in host memory (`HostWeight`).

- `gpu_home`: rows `[row0, out)` in the weights dtype, ONE row-contiguous buffer (pinned on
  CUDA when asked), so the GPU share of either phase, rows `[k, out)`, is a view. When the CPU
  dtype equals the weights dtype, `row0 = 0` and the CPU rows are views of the same buffer.
- `cpu_home`: rows `[0, max_cpu_rows)` in the CPU dtype, only when that dtype differs from the
  weights dtype (then `row0 = min(cpu_rows_prefill, cpu_rows_decode)`: rows no phase ever sends
  to the GPU are not kept twice). Row counts come from plan.memory.held_rows, which the
  planner's and the engine's RAM checks use too.

Every `gpu_home` is a view into one `HostArena` per model: one block of exactly the bytes the
planner counted, pinned once (torch's pinned allocator would round each weight up to a power of
two, up to 2x the RAM; docs/engine.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetegen_cli.core.devices import Backend
from hetegen_cli.plan.memory import arena_bytes, held_rows


class HostArena:
    """One host block for the weights-dtype rows of every split linear, allocated once at load
    and pinned by the backend when asked (exact bytes: no power-of-two rounding). Each buffer
    starts at a multiple of plan.memory.ARENA_ALIGN bytes. `release()` unpins it at close."""

    def __init__(self, nbytes: int, backend: Backend, pin: bool) -> None:
        self.backend = backend
        self.pinned = bool(pin and backend.is_cuda and nbytes > 0)
        with torch.inference_mode(False):  # a normal tensor, writable in and out of inference mode
            self.block: torch.Tensor | None = (
                backend.pinned_arena(nbytes) if self.pinned else torch.empty(nbytes, dtype=torch.uint8)
            )
        self.offset = 0

    @property
    def nbytes(self) -> int:
        return 0 if self.block is None else self.block.numel()

    def take(self, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """The next free [rows, in] buffer of `dtype` in the arena."""
        nbytes = shape[0] * shape[1] * dtype.itemsize
        end = self.offset + arena_bytes(nbytes)
        if end > self.nbytes:
            raise ValueError(f"host arena of {self.nbytes} bytes is full (needs {end})")
        view = self.block[self.offset : self.offset + nbytes].view(dtype).view(shape)
        self.offset = end
        return view

    def release(self) -> None:
        """Unpin the block and drop this arena's reference to it."""
        if self.block is not None and self.pinned:
            self.backend.release_arena(self.block)
        self.block = None


@dataclass
class HostWeight:
    """Host-held weight of one split linear. Shapes: gpu_home [out - row0, in], cpu_home [kmax, in]."""

    out_features: int
    in_features: int
    row0: int  # first row held in gpu_home
    gpu_home: torch.Tensor  # weights dtype, in the (pinned) HostArena
    cpu_home: torch.Tensor  # CPU dtype; a view of gpu_home when the dtypes agree
    pinned: bool

    @staticmethod
    def arena_need(
        out_features: int,
        in_features: int,
        cpu_rows: tuple[int, int],
        weights_dtype: torch.dtype,
        cpu_dtype: torch.dtype,
    ) -> int:
        """Arena bytes `allocate` will take for this linear (plan.memory counts the same)."""
        row0, _ = held_rows(out_features, cpu_rows, cpu_dtype != weights_dtype)
        return arena_bytes((out_features - row0) * in_features * weights_dtype.itemsize)

    @classmethod
    def allocate(
        cls,
        out_features: int,
        in_features: int,
        cpu_rows: tuple[int, int],
        weights_dtype: torch.dtype,
        cpu_dtype: torch.dtype,
        arena: HostArena,
    ) -> HostWeight:
        """Empty buffers for a linear whose CPU share is `cpu_rows` = (prefill, decode) rows:
        the weights-dtype rows from `arena`, a CPU-dtype copy (pageable) when dtypes differ."""
        same = cpu_dtype == weights_dtype
        row0, copy_rows = held_rows(out_features, cpu_rows, not same)
        kmax = max(cpu_rows)
        gpu_home = arena.take((out_features - row0, in_features), weights_dtype)
        with torch.inference_mode(False):
            cpu_home = gpu_home[:kmax] if same else torch.empty((copy_rows, in_features), dtype=cpu_dtype)
        return cls(out_features, in_features, row0, gpu_home, cpu_home, arena.pinned)

    @classmethod
    def from_tensor(
        cls,
        weight: torch.Tensor,
        cpu_rows: tuple[int, int],
        weights_dtype: torch.dtype,
        cpu_dtype: torch.dtype,
        backend: Backend,
        pin: bool,
    ) -> HostWeight:
        """A HostWeight filled from an in-memory weight [out, in] (tests, small models), in an
        arena of its own."""
        out, inp = weight.shape
        arena = HostArena(cls.arena_need(out, inp, cpu_rows, weights_dtype, cpu_dtype), backend, pin)
        host = cls.allocate(out, inp, cpu_rows, weights_dtype, cpu_dtype, arena)
        with torch.no_grad():
            host.gpu_home.copy_(weight[host.row0 :])
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
        return self.gpu_home[k - self.row0 :]

    @property
    def gpu_home_bytes(self) -> int:
        return self.gpu_home.numel() * self.gpu_home.element_size()

    @property
    def cpu_copy_bytes(self) -> int:
        """Bytes of the separate CPU-dtype copy (0 when the CPU reads gpu_home)."""
        return self.cpu_home.numel() * self.cpu_home.element_size() if self.separate_cpu_copy else 0
