"""Where a split linear's weight lives in host memory (`HostWeight`).

- `gpu_home`: rows `[row0, out)` in the weights dtype, ONE row-contiguous buffer (pinned on
  CUDA when asked), so the GPU share of either phase, rows `[k, out)`, is a view. When the CPU
  dtype equals the weights dtype, `row0 = 0` and the CPU rows are views of the same buffer.
- `cpu_home`: rows `[0, max_cpu_rows)` in the CPU dtype, only when that dtype differs from the
  weights dtype (then `row0 = min(cpu_rows_prefill, cpu_rows_decode)`: rows no phase ever sends
  to the GPU are not kept twice). Row counts come from plan.memory.held_rows, which the
  planner's and the engine's RAM checks use too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetegen_cli.core.devices import Backend
from hetegen_cli.plan.memory import held_rows


@dataclass
class HostWeight:
    """Host-held weight of one split linear. Shapes: gpu_home [out - row0, in], cpu_home [kmax, in]."""

    out_features: int
    in_features: int
    row0: int  # first row held in gpu_home
    gpu_home: torch.Tensor  # weights dtype, pinned on CUDA when runtime.pin_weights
    cpu_home: torch.Tensor  # CPU dtype; a view of gpu_home when the dtypes agree
    pinned: bool

    @classmethod
    def allocate(
        cls,
        out_features: int,
        in_features: int,
        cpu_rows: tuple[int, int],
        weights_dtype: torch.dtype,
        cpu_dtype: torch.dtype,
        backend: Backend,
        pin: bool,
    ) -> HostWeight:
        """Empty buffers for a linear whose CPU share is `cpu_rows` = (prefill, decode) rows."""
        same = cpu_dtype == weights_dtype
        row0, copy_rows = held_rows(out_features, cpu_rows, not same)
        kmax = max(cpu_rows)
        shape = (out_features - row0, in_features)
        pinned = bool(pin and backend.is_cuda and shape[0] > 0)
        gpu_home = (
            backend.empty_pinned(shape, weights_dtype) if pinned else torch.empty(shape, dtype=weights_dtype)
        )
        cpu_home = gpu_home[:kmax] if same else torch.empty((copy_rows, in_features), dtype=cpu_dtype)
        return cls(out_features, in_features, row0, gpu_home, cpu_home, pinned)

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
        """A HostWeight filled from an in-memory weight [out, in] (tests, small models)."""
        out, inp = weight.shape
        host = cls.allocate(out, inp, cpu_rows, weights_dtype, cpu_dtype, backend, pin)
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
