"""An all-CPU split linear without the engine's per-call work: what the model calls in place
of a HeteroLinear once its engine runs no pipeline (engine.split_linear, HeteroLinear.direct_module)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CpuLinear(nn.Module):
    """An all-CPU split linear as the model calls it once its engine needs no pipeline
    (HeteroLinear.direct_module): y = x W^T (+ bias), `op` a weight [out, in] in its CPU dtype
    (x converted to it and the product back) or a packed quantized kernel module: the numbers
    of HeteroLinear._whole_forward for x in the weights dtype. Holds views of the engine's host
    weights, as the HeteroLinear does."""

    def __init__(self, op: torch.Tensor | nn.Module, bias: torch.Tensor | None) -> None:
        super().__init__()
        if isinstance(op, torch.Tensor):
            self.register_buffer("weight", op, persistent=False)
            self.kernel = None
        else:
            self.weight = None
            self.kernel = op
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w is None:
            y = self.kernel(x)
        else:
            y = F.linear(x if x.dtype == w.dtype else x.to(w.dtype), w)
            y = y if y.dtype == x.dtype else y.to(x.dtype)
        return y if self.bias is None else y + self.bias
