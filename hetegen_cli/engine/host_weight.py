"""Where a split linear's weight lives in host memory (`HostWeight`).

- `gpu_home`: rows `[row0, out)` in the weights dtype, ONE row-contiguous buffer (pinned on
  CUDA when asked), so the GPU share of either phase, rows `[k, out)`, is a view. A phase whose
  CPU share is computed in the weights dtype reads views of it too (then `row0 = 0`).
- `copies`: for each other CPU dtype a phase computes in, rows `[0, k)` in that dtype (k the
  largest CPU share of the phases using it), pageable. Rows no phase streams or computes in
  the weights dtype are not kept in it. Row counts come from plan.memory.held_rows, which the
  planner's and the engine's RAM checks use too.

Every `gpu_home` is a view into one `HostArena` per model: one block of exactly the bytes the
planner counted, pinned once (torch's pinned allocator would round each weight up to a power of
two, up to 2x the RAM; docs/engine.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hetegen_cli.core.devices import Backend, dtype_name, torch_dtype
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

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The next free buffer of `shape` (e.g. [rows, in]) and `dtype` in the arena."""
        nbytes = math.prod(shape) * dtype.itemsize
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


@dataclass(frozen=True)
class HostLayout:
    """What one split linear [out, in] holds in host memory: its CPU share `cpu_rows` =
    (prefill, decode) rows computed in `cpu_dtypes` = (prefill, decode), the rest streamed in
    `weights_dtype`."""

    out_features: int
    in_features: int
    cpu_rows: tuple[int, int]
    weights_dtype: torch.dtype
    cpu_dtypes: tuple[torch.dtype, torch.dtype]

    def held(self) -> tuple[int, dict[torch.dtype, int]]:
        """plan.memory.held_rows in torch dtypes: (row0, {dtype: rows})."""
        row0, copies = held_rows(
            self.out_features,
            self.cpu_rows,
            tuple(dtype_name(d) for d in self.cpu_dtypes),
            dtype_name(self.weights_dtype),
        )
        return row0, {torch_dtype(d): rows for d, rows in copies.items()}

    @property
    def arena_need(self) -> int:
        """Arena bytes `HostWeight.allocate` takes for this linear (plan.memory counts the same)."""
        row0, _ = self.held()
        return arena_bytes((self.out_features - row0) * self.in_features * self.weights_dtype.itemsize)


@dataclass
class HostWeight:
    """Host-held weight of one split linear. Shapes: gpu_home [out - row0, in], each copy
    [rows, in] in its dtype."""

    out_features: int
    in_features: int
    row0: int  # first row held in gpu_home
    gpu_home: torch.Tensor  # weights dtype, in the (pinned) HostArena
    copies: dict[torch.dtype, torch.Tensor]  # CPU-share rows [0, rows) in other dtypes
    pinned: bool

    @classmethod
    def allocate(cls, layout: HostLayout, arena: HostArena) -> HostWeight:
        """Empty buffers for `layout`: the weights-dtype rows from `arena`, a pageable copy per
        other CPU dtype."""
        row0, rows = layout.held()
        gpu_home = arena.take((layout.out_features - row0, layout.in_features), layout.weights_dtype)
        with torch.inference_mode(False):
            copies = {d: torch.empty((n, layout.in_features), dtype=d) for d, n in rows.items()}
        return cls(layout.out_features, layout.in_features, row0, gpu_home, copies, arena.pinned)

    @classmethod
    def from_tensor(
        cls,
        weight: torch.Tensor,
        cpu_rows: tuple[int, int],
        weights_dtype: torch.dtype,
        cpu_dtypes: tuple[torch.dtype, torch.dtype],
        backend: Backend,
        pin: bool,
    ) -> HostWeight:
        """A HostWeight filled from an in-memory weight [out, in] (tests, small models), in an
        arena of its own."""
        layout = HostLayout(*weight.shape, cpu_rows, weights_dtype, cpu_dtypes)
        host = cls.allocate(layout, HostArena(layout.arena_need, backend, pin))
        with torch.no_grad():
            host.gpu_home.copy_(weight[host.row0 :])
            for copy in host.copies.values():
                copy.copy_(weight[: copy.shape[0]])
        return host

    def cpu_rows(self, k: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows [0, k) for the CPU share in `dtype`: [k, in], contiguous view."""
        if dtype == self.gpu_home.dtype:
            if k > 0 and self.row0 > 0:
                raise ValueError(f"rows from 0 requested in {dtype} but only rows from {self.row0} are held")
            return self.gpu_home[:k]
        copy = self.copies.get(dtype)
        if copy is None or copy.shape[0] < k:
            held = 0 if copy is None else copy.shape[0]
            raise ValueError(f"{k} CPU rows requested in {dtype} but {held} are held")
        return copy[:k]

    quant = None  # a float weight (QuantHostWeight holds (format, group size))

    def cpu_operand(self, k: int, dtype: torch.dtype) -> torch.Tensor:
        """What the CPU share multiplies with: rows [0, k) in `dtype` (cpu_rows)."""
        return self.cpu_rows(k, dtype)

    def gpu_parts(self, k: int) -> tuple[torch.Tensor, ...]:
        """The host tensors the GPU share of rows [k, out) streams: (gpu_rows(k),)."""
        return (self.gpu_rows(k),)

    @staticmethod
    def device_weight(parts: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
        """The staged parts as the weight [rows, in] the GPU multiplies with (a view)."""
        return parts[0]

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
        """Bytes of the copies in other CPU dtypes (0 when the CPU reads gpu_home only)."""
        return sum(c.numel() * c.element_size() for c in self.copies.values())
