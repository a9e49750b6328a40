"""Where a quantized split linear's weight lives in host memory (`QuantHostWeight`).

The quantized counterpart of engine.host_weight.HostWeight (same interface for HeteroLinear
and the prefetch scheduler):

- rows `[row0, out)` of each stored part (core.quant.part_shapes: q, scale and, for int4, min)
  in the model's HostArena, pinned on CUDA: the GPU share of either phase, rows `[k, out)`,
  crosses PCIe as these quantized bytes and is dequantized on the device into the weights dtype
  just before its matmul (`device_weight`);
- for each distinct CPU share k of the phases, a `models.formats.quant.QuantLinear` of rows `[0, k)`
  (torch's packed CPU kernel; its int4 packing interleaves rows in blocks of 64, so a share is
  packed on its own rather than sliced). Row counts: plan.memory.held_quant_rows, which the
  planner's and the engine's RAM checks use too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from hetegen_cli.core import quant as qfmt
from hetegen_cli.engine.host_weight import HostArena
from hetegen_cli.models.formats.checkpoint import CheckpointReader
from hetegen_cli.models.formats.quant import QuantLinear, QuantWeight
from hetegen_cli.plan.memory import held_quant_rows, rows_bytes


def _part_dtype(fmt: str, part: str) -> torch.dtype:
    """q: int8 (int8) or uint8 nibbles (int4); scale and min: float16."""
    if part == "q":
        return torch.int8 if fmt == "int8" else torch.uint8
    return torch.float16


def dequantize(
    fmt: str, group: int | None, parts: tuple[torch.Tensor, ...], dtype: torch.dtype
) -> torch.Tensor:
    """Stored parts of rows of a weight (on any device) -> the weight [rows, in] in `dtype`:
    w = q scale, or q scale + min per group of int4, computed in `dtype` in place (q is exact
    there; peak transient memory 1 + 2 itemsize bytes per parameter, plan.memory counts it).
    In float32 it equals models.formats.quant.QuantWeight.dequantize bit for bit. int4 takes five
    kernels when scale and min are stored in `dtype` (unpack both nibbles with one shift
    against [0, 4], mask, convert, multiply-add in two in-place steps)."""
    if fmt == "int8":
        q, scale = parts
        return q.to(dtype).mul_(scale.to(dtype)[:, None])
    q, scale, low = parts
    rows = q.shape[0]
    shifts = _NIBBLE_SHIFTS.get(q.device)
    if shifts is None:
        shifts = _NIBBLE_SHIFTS[q.device] = torch.tensor([0, 4], dtype=torch.uint8, device=q.device)
    nibbles = torch.bitwise_right_shift(q[..., None], shifts).bitwise_and_(0x0F)  # [rows, in/2, 2]
    values = nibbles.view(rows, -1, group).to(dtype)  # [rows, in/g, g]
    return values.mul_(scale.to(dtype)[..., None]).add_(low.to(dtype)[..., None]).view(rows, -1)


#: the shifts that unpack a byte's low and high nibble, one tensor per device
_NIBBLE_SHIFTS: dict[torch.device, torch.Tensor] = {}


@dataclass
class QuantHostWeight:
    """Host-held quantized weight of one split linear (module docstring). `parts` are views
    into the arena, rows [row0, out); `kernels` maps a CPU share k to its packed QuantLinear."""

    format: str
    group_size: int | None
    out_features: int
    in_features: int
    row0: int
    parts: tuple[torch.Tensor, ...]
    kernels: dict[int, QuantLinear]
    pinned: bool

    @property
    def quant(self) -> tuple[str, int]:
        return self.format, self.group_size or qfmt.DEFAULT_GROUP_SIZE

    @staticmethod
    def arena_need(
        out_features: int, in_features: int, cpu_rows: tuple[int, int], quant: tuple[str, int]
    ) -> int:
        """Arena bytes `load` takes for this linear (plan.memory counts the same)."""
        row0, _ = held_quant_rows(cpu_rows)
        return rows_bytes(out_features - row0, in_features, "float32", quant)

    @classmethod
    def load(cls, stored: StoredLinear, cpu_rows: tuple[int, int], arena: HostArena) -> QuantHostWeight:
        """Read a stored quantized linear: its streamed rows into `arena`, one packed CPU
        kernel per CPU share."""
        fmt, group = stored.quant
        out, inp = stored.shape
        row0, ks = held_quant_rows(cpu_rows)
        parts = stored.read((row0, out), arena.take)
        kernels = {}
        for k in ks:
            rows = stored.read((0, k), lambda s, d: torch.empty(s, dtype=d))
            weight = QuantWeight(
                fmt, k, inp, rows["q"], rows["scale"], rows.get("min"), group if fmt == "int4" else None
            )
            kernels[k] = QuantLinear(weight)
        return cls(
            fmt,
            group if fmt == "int4" else None,
            out,
            inp,
            row0,
            tuple(parts.values()),
            kernels,
            arena.pinned,
        )

    def cpu_operand(self, k: int, dtype: torch.dtype) -> nn.Module:
        """The packed kernel of rows [0, k) (it computes in bfloat16 whatever `dtype` is)."""
        kernel = self.kernels.get(k)
        if kernel is None:
            raise ValueError(f"no CPU kernel for {k} rows (held: {sorted(self.kernels)})")
        return kernel

    def gpu_parts(self, k: int) -> tuple[torch.Tensor, ...]:
        """Rows [k, out) of each stored part (contiguous views) for the GPU share."""
        if k < self.row0:
            raise ValueError(f"rows from {k} requested but only rows from {self.row0} are held")
        return tuple(p[k - self.row0 :] for p in self.parts)

    def device_weight(self, parts: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
        """Staged parts -> the weight [rows, in] in `dtype`, on their device."""
        return dequantize(self.format, self.group_size, parts, dtype)

    @property
    def gpu_home_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parts)

    @property
    def cpu_copy_bytes(self) -> int:
        """Bytes the CPU kernels hold (QuantLinear.held_bytes: weights, scales, mins)."""
        return sum(k.held_bytes for k in self.kernels.values())


class DequantLinear(nn.Module):
    """A resident quantized linear on the device: the stored parts stay quantized there (so
    more weights fit) and are dequantized into the weights dtype at every forward.
    x [..., in] -> y [..., out] in x's dtype."""

    def __init__(
        self,
        fmt: str,
        group: int | None,
        parts: tuple[torch.Tensor, ...],
        out: int,
        inp: int,
        bias: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.format, self.group_size = fmt, group
        self.in_features, self.out_features = inp, out
        self.part_names = tuple(qfmt.part_shapes(fmt, out, inp, group or qfmt.DEFAULT_GROUP_SIZE))
        for name, tensor in zip(self.part_names, parts, strict=True):
            self.register_buffer(name, tensor, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def load(cls, stored: StoredLinear, device: torch.device, bias: torch.Tensor | None) -> DequantLinear:
        fmt, group = stored.quant
        out, inp = stored.shape
        parts = stored.read((0, out), lambda s, d: torch.empty(s, dtype=d, device=device))
        return cls(fmt, group if fmt == "int4" else None, tuple(parts.values()), out, inp, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = tuple(getattr(self, n) for n in self.part_names)
        w = dequantize(self.format, self.group_size, parts, x.dtype)
        return torch.nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    @property
    def stored_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


@dataclass(frozen=True)
class StoredLinear:
    """A quantized linear as a quantized folder stores it: read through `reader` under `name`
    (its parts `{name}.weight.q`, `.scale`, `.min`), weight [out, in] = `shape`, stored as
    `quant` = (format, group)."""

    reader: CheckpointReader
    name: str
    shape: tuple[int, int]
    quant: tuple[str, int]

    def read(
        self, rows: tuple[int, int], alloc: Callable[[tuple[int, ...], torch.dtype], torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Rows [start, end) of each stored part, each read into a tensor from `alloc(shape,
        dtype)`."""
        fmt, group = self.quant
        start, end = rows
        parts = {}
        for part, (shape, _) in qfmt.part_shapes(fmt, end - start, self.shape[1], group).items():
            parts[part] = alloc(shape, _part_dtype(fmt, part))
            self.reader.copy_rows(f"{self.name}.weight.{part}", parts[part], start=start)
        return parts
