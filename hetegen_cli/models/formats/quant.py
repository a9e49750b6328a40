"""Quantized weights (core.quant's formats) as tensors: quantizing, GGUF blocks, kernels.

`QuantWeight` holds one weight [out, in] in hetegen's storage layout (core.quant):

- int8: `q` int8 [out, in], `scale` float16 [out];
- int4: `q` uint8 [out, in / 2] (even column in the low nibble), `scale` and `min` float16
  [out, in / group].

`QuantLinear` is an nn.Module that multiplies with hetegen's own CPU kernels
(models.formats.cpu_kernels: float32 activations, the storage layout as it is) where they
are available, else with torch's packed kernels (`torch._weight_int8pack_mm`,
`aten._weight_int4pack_mm_for_cpu`; they want bfloat16 activations: float16 or float32 ran
7-45x slower on torch 2.13). x is converted to the kernel's dtype at the boundary and the
result converted back. Every QuantLinear checks its kernel against the dequantized weight
once per shape: a kernel that gives wrong numbers for a shape (torch's int8 kernel did, for
24 or 40 inputs) raises instead of answering.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hetegen_cli.core import quant as fmt
from hetegen_cli.core.errors import ModelError
from hetegen_cli.models.formats import cpu_kernels

KERNEL_DTYPE = torch.bfloat16  # activations torch's packed kernels take
INNER_K_TILES = 2  # the CPU int4 packing's only parameter; the kernel reads any value it wrote


@dataclass
class QuantWeight:
    """One quantized weight [out_features, in_features] (layout in the module docstring)."""

    format: str
    out_features: int
    in_features: int
    q: torch.Tensor
    scale: torch.Tensor
    min: torch.Tensor | None = None  # int4 only
    group_size: int | None = None  # int4 only

    @property
    def nbytes(self) -> int:
        parts = [self.q, self.scale] + ([self.min] if self.min is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)

    def permute_rows(self, order: torch.Tensor) -> QuantWeight:
        """The weight with its rows in `order` (GGUF stores LLaMA's q/k rows permuted)."""
        return QuantWeight(
            self.format,
            self.out_features,
            self.in_features,
            self.q[order].contiguous(),
            self.scale[order].contiguous(),
            None if self.min is None else self.min[order].contiguous(),
            self.group_size,
        )

    def rows(self, start: int, stop: int) -> QuantWeight:
        """Rows [start, stop) as a weight of its own (copies)."""
        low = None if self.min is None else self.min[start:stop].clone()
        return QuantWeight(
            self.format,
            stop - start,
            self.in_features,
            self.q[start:stop].clone(),
            self.scale[start:stop].clone(),
            low,
            self.group_size,
        )

    def columns(self, start: int, stop: int) -> QuantWeight:
        """Inputs [start, stop) as a weight of its own (copies); int4: whole groups only."""
        if self.format == "int8":
            q = self.q[:, start:stop].clone()
            return QuantWeight("int8", self.out_features, stop - start, q, self.scale)
        g = self.group_size
        if start % g or stop % g:
            raise ValueError(f"int4 columns [{start}, {stop}) do not fall on groups of {g}")
        low = None if self.min is None else self.min[:, start // g : stop // g].contiguous()
        return QuantWeight(
            "int4",
            self.out_features,
            stop - start,
            self.q[:, start // 2 : stop // 2].contiguous(),
            self.scale[:, start // g : stop // g].contiguous(),
            low,
            g,
        )

    def int4_values(self) -> torch.Tensor:
        """int4: the q values as int32 [out, in] in [0, 15] (interleaved as bytes, then widened
        once: a third of the time of widening both halves first, for every int4 kernel packed
        at load)."""
        nibbles = torch.stack((self.q & 0x0F, self.q >> 4), dim=-1)  # uint8 [out, in / 2, 2]
        return nibbles.reshape(self.out_features, self.in_features).to(torch.int32)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [out, in] in `dtype` (computed in float32)."""
        if self.format == "int8":
            w = self.q.to(torch.float32) * self.scale.to(torch.float32)[:, None]
        else:
            g = self.group_size
            q = self.int4_values().to(torch.float32).view(self.out_features, -1, g)
            w = q * self.scale.to(torch.float32)[..., None] + self.min.to(torch.float32)[..., None]
            w = w.reshape(self.out_features, self.in_features)
        return w.to(dtype)


# --- quantizing floating-point weights ---------------------------------------------------


def quantize(weight: torch.Tensor, format: str, group_size: int = fmt.DEFAULT_GROUP_SIZE) -> QuantWeight:
    """Quantize `weight` [out, in] (any float dtype; computed in float32)."""
    w = weight.detach().to(torch.float32)
    out, inp = w.shape
    if format == "int8":
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        scale16 = scale.to(torch.float16).clamp(min=torch.finfo(torch.float16).tiny)
        q = torch.round(w / scale16.to(torch.float32)[:, None]).clamp(-127, 127).to(torch.int8)
        return QuantWeight("int8", out, inp, q, scale16)
    if format == "int4":
        if inp % group_size:
            raise ValueError(f"in_features {inp} is not a multiple of the group size {group_size}")
        g = w.view(out, inp // group_size, group_size)
        low, high = g.amin(dim=-1), g.amax(dim=-1)
        scale16 = ((high - low) / 15.0).to(torch.float16)
        min16 = low.to(torch.float16)
        s = scale16.to(torch.float32).clamp(min=1e-12)
        q = torch.round((g - min16.to(torch.float32)[..., None]) / s[..., None]).clamp(0, 15).to(torch.uint8)
        return QuantWeight("int4", out, inp, pack_nibbles(q.view(out, inp)), scale16, min16, group_size)
    raise ValueError(f"not a quantized format: {format!r}")


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in] in [0, 15] -> [out, in / 2], the even column in the low nibble."""
    v = values.to(torch.uint8)
    return (v[:, 0::2] | (v[:, 1::2] << 4)).contiguous()


# --- GGUF blocks (Q4_0, Q4_1, Q8_0) -----------------------------------------------------

GGUF_BLOCK = 32  # values per block of Q4_0, Q4_1 and Q8_0


def from_gguf_blocks(kind: str, raw: torch.Tensor, out: int, inp: int) -> QuantWeight:
    """A GGUF tensor of `kind` (Q4_0, Q4_1, Q8_0) as raw block bytes uint8 [out, bytes per row]
    -> QuantWeight, exactly (Q4_*) or re-quantized per channel from its exact values (Q8_0)."""
    blocks = inp // GGUF_BLOCK
    b = raw.reshape(out, blocks, -1)
    d = b[..., 0:2].contiguous().view(torch.float16).reshape(out, blocks)
    if kind in ("Q4_0", "Q4_1"):
        if kind == "Q4_1":
            m = b[..., 2:4].contiguous().view(torch.float16).reshape(out, blocks)
            qs = b[..., 4:20]
        else:
            m = (-8.0 * d.to(torch.float32)).to(torch.float16)
            qs = b[..., 2:18]
        # GGUF: element j of a block in the low nibble of byte j, element j + 16 in the high one
        values = torch.cat((qs & 0x0F, qs >> 4), dim=-1).reshape(out, inp)
        if kind == "Q4_0" and not torch.equal(m.to(torch.float32), -8.0 * d.to(torch.float32)):
            raise ModelError("a Q4_0 scale does not fit float16", "convert this file without --quant")
        return QuantWeight("int4", out, inp, pack_nibbles(values), d, m, GGUF_BLOCK)
    if kind == "Q8_0":
        qs = b[..., 2:34].contiguous().view(torch.int8).to(torch.float32)
        exact = (qs * d.to(torch.float32)[..., None]).reshape(out, inp)
        return quantize(exact, "int8")
    raise ValueError(f"GGUF type {kind} has no direct mapping")


# --- kernels ---------------------------------------------------------------------------


class QuantLinear(nn.Module):
    """y = x W^T + b with W quantized (int8 or int4), on the CPU, via torch's packed kernels.

    x [..., in] in any float dtype -> y [..., out] in x's dtype. Holds no float weight.
    """

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if not fmt.kernel_takes(
            weight.format, weight.out_features, weight.in_features, weight.group_size or 32
        ):
            raise ValueError(
                f"the {weight.format} kernel cannot take a "
                f"[{weight.out_features}, {weight.in_features}] weight"
            )
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.format, self.group_size = weight.format, weight.group_size
        self.stored_bytes = weight.nbytes
        self.native = cpu_kernels.kernels() if weight.in_features % 32 == 0 else None
        self.kernel_dtype = torch.float32 if self.native is not None else KERNEL_DTYPE
        if self.native is not None:
            # the storage layout as it is; float16 scales held as their int16 bits, which the
            # kernels read as they are and which a model's .to(dtype) leaves alone
            self.register_buffer("q", weight.q.contiguous(), persistent=False)
            self.register_buffer("scales", weight.scale.contiguous().view(torch.int16), persistent=False)
            if weight.format == "int4" and not self.symmetric(weight):
                self.register_buffer("mins", weight.min.contiguous().view(torch.int16), persistent=False)
        elif weight.format == "int8":
            self.register_buffer("q", weight.q.contiguous(), persistent=False)
            self.register_buffer("scales", weight.scale.to(KERNEL_DTYPE), persistent=False)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight.int4_values(), INNER_K_TILES)
            # the kernel computes (q - 8) * scale + zero: zero = min + 8 scale
            zero = weight.min.to(torch.float32) + 8.0 * weight.scale.to(torch.float32)
            sz = torch.stack((weight.scale.to(torch.float32), zero), dim=-1).transpose(0, 1)  # [in/g, out, 2]
            self.register_buffer("q", packed, persistent=False)
            self.register_buffer("scales", sz.contiguous().to(KERNEL_DTYPE), persistent=False)
        bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.register_parameter("bias", bias)  # registered even when None: forward reads it there
        self._check(weight)

    @staticmethod
    def symmetric(weight: QuantWeight) -> bool:
        """Whether every int4 group's min is -8 times its scale (GGUF Q4_0): hetegen's kernel
        then reads no mins, 18 bytes per 32 weights instead of 20."""
        return weight.format == "int4" and torch.equal(
            weight.min.to(torch.float32), -8.0 * weight.scale.to(torch.float32)
        )

    @property
    def held_bytes(self) -> int:
        """Bytes of the kernel's weight, scales (and mins), as it holds them."""
        return sum(int(b.numel() * b.element_size()) for b in self._buffers.values() if b is not None)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}{group}"
        )

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [n, in] contiguous in `kernel_dtype` -> [n, out] in `kernel_dtype` (no bias).

        Called for every linear every token: the buffers are read from `_buffers` (not
        through nn.Module.__getattr__) and torch's int4 kernel through its torch function
        (not the torch.ops packet, whose Python __call__ costs more): the same kernel."""
        buffers = self._buffers
        if self.native is not None:
            return self.native.matmul(
                self.format, buffers["q"], buffers["scales"], buffers.get("mins"), self.group_size, x2
            )
        if self.format == "int8":
            return torch._weight_int8pack_mm(x2, buffers["q"], buffers["scales"])
        return torch._weight_int4pack_mm_for_cpu(x2, buffers["q"], self.group_size, buffers["scales"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if x2.dtype != self.kernel_dtype:
            x2 = x2.to(self.kernel_dtype)
        y = self.matmul(x2 if x2.is_contiguous() else x2.contiguous())
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        bias = self._parameters["bias"]
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def _check(self, weight: QuantWeight) -> None:
        """One product against the dequantized weight; ModelError if the kernel is wrong.

        Whether torch's packed kernel is right depends on its packing of a shape, not on the
        values: one check per (format, shape, group) and process. Checking all 211 linears of
        the default model cost 1.4 s of every load."""
        key = (self.format, self.out_features, self.in_features, self.group_size, self.native is None)
        if key in _CHECKED:
            return
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, self.in_features, generator=gen).to(self.kernel_dtype)
        want = F.linear(x.to(torch.float32), weight.dequantize(torch.float32))
        got = self.matmul(x).to(torch.float32)
        err = (got - want).abs().max().item()
        if not err <= 0.05 * max(1e-6, want.abs().max().item()):
            who = "hetegen's" if self.native is not None else "torch's"
            raise ModelError(
                f"{who} {self.format} CPU kernel gives wrong results for a "
                f"[{self.out_features}, {self.in_features}] weight (max error {err:.3g})",
                "use --quant none for this model, or another torch version"
                + (f" (or {cpu_kernels.ENV}=torch)" if self.native is not None else ""),
            )
        _CHECKED.add(key)


#: (format, out, in, group, torch's?) whose kernel QuantLinear._check has found right in this process
_CHECKED: set[tuple] = set()
