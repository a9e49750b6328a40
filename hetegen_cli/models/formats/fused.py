"""One kernel call per token for a gated MLP, a MoE layer's chosen experts and an RMS norm
(kernels/quant_gemm.c: hetegen_gated_ffn, hetegen_rms_norm; docs/quant.md).

At one token a LLaMA-style MLP is three QuantLinear calls, an activation and a product, and an
RMS norm six tensor ops: each costs more in Python and dispatch than in arithmetic on a small
model. `fuse_model` gives the modules whose structure matches a forward that makes one call
for float32 input on the CPU, after checking it against the module's own forward on a random
input. Other inputs (bfloat16, more than one token for an MLP) and modules that do not match
or fail the check keep transformers' forward. `GatedFFN` is the same for a MoE layer's chosen
experts (models.formats.quant_experts). Attentions, decoder layers and the whole model's
decode step build on these (models.formats.decode_steps). Needs hetegen's kernels
(cpu_kernels.kernels()).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hetegen_cli.models.formats import cpu_kernels
from hetegen_cli.models.formats.quant import QuantLinear

#: activations hetegen_gated_ffn computes (SiLU: x * sigmoid(x)), by class name
SILU_NAMES = frozenset({"SiLU", "SiLUActivation"})
#: a fused forward is kept when it is this close to the module's own (largest error over the
#: largest output); measured at most 2.5e-7 over the default model's 91 MLPs and norms
CHECK_RTOL = 1e-4
_OFF: list[bool] = []  # inside unfused()


@contextlib.contextmanager
def unfused() -> Iterator[None]:
    """Models loaded inside keep transformers' forwards (for scripts that compare the two)."""
    _OFF.append(True)
    try:
        yield
    finally:
        _OFF.pop()


def enabled() -> bool:
    return not _OFF and cpu_kernels.kernels() is not None


def matrix(linear: Any, row0: int = 0, rows: int | None = None, bias_ok: bool = False) -> list[int] | None:
    """The kernel's description of rows [row0, row0 + rows) of a QuantLinear on hetegen's
    kernels ({format, q, scale, min, rows, in, group} as int64), or None when it has none or
    a bias (unless `bias_ok`: the caller adds it)."""
    if not isinstance(linear, QuantLinear) or linear.native is None:
        return None
    if linear.bias is not None and not bias_ok:
        return None
    b, k = linear._buffers, linear.in_features
    rows = linear.out_features - row0 if rows is None else rows
    if linear.format == "int8":
        return [1, b["q"].data_ptr() + row0 * k, b["scales"].data_ptr() + 2 * row0, 0, rows, k, 0]
    ng = k // linear.group_size
    return [
        0,
        b["q"].data_ptr() + row0 * (k // 2),
        b["scales"].data_ptr() + 2 * row0 * ng,
        b["mins"].data_ptr() + 2 * row0 * ng if "mins" in b else 0,  # 0: symmetric (Q4_0)
        rows,
        k,
        linear.group_size,
    ]


def is_silu(act: Any) -> bool:
    return type(act).__name__ in SILU_NAMES


def close_enough(got: torch.Tensor, want: torch.Tensor) -> bool:
    """A fused result against the module's own: same shape, within CHECK_RTOL."""
    if got.shape != want.shape:
        return False
    return (got - want).abs().max().item() <= CHECK_RTOL * max(1e-6, want.abs().max().item())


class GatedFFN:
    """Units u = (gate, up, down), each a `matrix` description: `add(x, sel, coef, out)` adds
    sum_j coef[j] * down_u(silu(gate_u(x)) * up_u(x)) over u = sel[j], in that order, to
    out [H]; x [H] float32 contiguous (one token). Keeps `owners` (the QuantLinears) so that
    the weights described stay alive."""

    def __init__(self, units: list[list[int]], owners: list[Any]) -> None:
        self.desc = torch.tensor(units, dtype=torch.int64)  # [units, 3 * 7]
        self.hidden = units[0][5]
        self.owners = owners
        self.kernels = cpu_kernels.kernels()
        self._first = ((ctypes.c_int32 * 1)(0), (ctypes.c_float * 1)(1.0))  # `first`'s arguments

    def add(self, x: torch.Tensor, sel: list[int], coef: list[float], out: torch.Tensor) -> None:
        n = len(sel)
        self._call(x, n, (ctypes.c_int32 * n)(*sel), (ctypes.c_float * n)(*coef), out)

    def first(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """out += unit 0's output (a dense MLP: its only unit), without building arguments."""
        self._call(x, 1, *self._first, out)

    def _call(
        self, x: torch.Tensor, n: int, ids: ctypes.Array, coef: ctypes.Array, out: torch.Tensor
    ) -> None:
        rc = self.kernels.gated_ffn(
            self.desc.data_ptr(), n, ctypes.addressof(ids), ctypes.addressof(coef), x.data_ptr(), self.hidden,
            out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        if rc:
            raise ValueError(f"hetegen's fused MLP refused its input ({rc})")


def gated_unit(gate: Any, up: Any, down: Any) -> list[int] | None:
    """One unit's description from its three QuantLinears, or None."""
    parts = [matrix(gate), matrix(up), matrix(down)]
    return None if any(p is None for p in parts) else [v for p in parts for v in p]  # type: ignore[union-attr]


def fused_gate_up_unit(gate_up: Any, down: Any) -> list[int] | None:
    """One unit from a fused gate_up QuantLinear (gate rows first, then up) and down."""
    if not isinstance(gate_up, QuantLinear) or gate_up.out_features % 2:
        return None
    inter = gate_up.out_features // 2
    parts = [matrix(gate_up, 0, inter), matrix(gate_up, inter, inter), matrix(down)]
    return None if any(p is None for p in parts) else [v for p in parts for v in p]  # type: ignore[union-attr]


@dataclass(frozen=True)
class Fusions:
    """What fuse_model (and decode_steps.fuse_steps) found: modules given a fused forward,
    modules checked but kept on their own (`rejected`), and MoE layers whose experts were
    fused when they were built. Two add up field by field."""

    mlps: int = 0  # gated MLPs made one call, and MoE blocks made one step (decode_steps)
    norms: int = 0
    rejected: int = 0
    experts: int = 0  # MoE layers whose chosen CPU experts are one call (GatedFFN, built at load)
    attentions: int = 0
    layers: int = 0  # decoder layers whose fused parts are called straight (decode_steps)
    model: int = 0  # 1 when a decode step of the whole model calls its layers straight

    def __add__(self, other: Fusions) -> Fusions:
        return Fusions(
            *(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True))
        )

    def as_dict(self) -> dict[str, int]:
        return {
            "mlps": self.mlps,
            "norms": self.norms,
            "attentions": self.attentions,
            "layers": self.layers,
            "model": self.model,
            "experts": self.experts,
            "rejected": self.rejected,
        }


def fuse_model(model: nn.Module) -> Fusions:
    """Give each gated MLP on QuantLinears and each RMS norm of `model` its one-call forward
    where it matches its own (module docstring), once: a module fused already is left as it
    is. Does nothing without hetegen's kernels. (Attentions, decoder layers and the model
    step: models.formats.decode_steps, over these.)"""
    if not enabled():
        return Fusions()
    mlps = norms = rejected = experts = 0
    gen = torch.Generator().manual_seed(0)
    for module in list(model.modules()):
        if any(isinstance(getattr(module, a, None), GatedFFN) for a in ("fused", "cpu_fused")):
            experts += 1
        if "forward" in vars(module) or not takes_one_argument(module):
            continue
        fast = _mlp_forward(module) or _norm_forward(module)
        if fast is None:
            continue
        if _agrees(module, fast, gen):
            module.forward = fast  # instance attribute: nn.Module.__call__ finds it first
            if _is_mlp(module):
                mlps += 1
            else:
                norms += 1
        else:
            rejected += 1
    return Fusions(mlps=mlps, norms=norms, rejected=rejected, experts=experts)


def takes_one_argument(module: nn.Module) -> bool:
    """Whether forward takes exactly one positional parameter (x), as the fused forwards do."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return len(params) == 1 and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD)


def _is_mlp(module: nn.Module) -> bool:
    return all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))


def _mlp_forward(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """down_proj(act_fn(gate_proj(x)) * up_proj(x)) in one call at one float32 token."""
    if not _is_mlp(module) or not is_silu(getattr(module, "act_fn", None)):
        return None
    unit = gated_unit(module.gate_proj, module.up_proj, module.down_proj)
    if unit is None:
        return None
    ffn, own, hidden, gate = GatedFFN([unit], [module]), module.forward, unit[5], module.gate_proj

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype is not torch.float32 or x.numel() != hidden or x.device.type != "cpu":
            return own(x)
        if gate._buffers["q"].data_ptr() != unit[1]:  # its weights were moved since: not where described
            return own(x)
        out = torch.zeros(x.shape)
        ffn.first(x.contiguous(), out)
        return out

    forward.ffn = ffn  # type: ignore[attr-defined]  # for a fused decoder layer (decode_steps)
    forward.current = lambda: gate._buffers["q"].data_ptr() == unit[1]  # type: ignore[attr-defined]
    return forward


def _norm_forward(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """x * rsqrt(mean(x^2) + eps) * (weight + shift), shift 0 or 1, whichever matches."""
    params = norm_params(module)
    if params is None:
        return None
    weight, eps, shift = params
    own, kernels, k = module.forward, cpu_kernels.kernels(), weight.numel()

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype is not torch.float32 or x.shape[-1] != k or x.device.type != "cpu":
            return own(x)
        if weight.dtype is not torch.float32 or weight.device.type != "cpu":  # moved since
            return own(x)
        x = x.contiguous()
        y = torch.empty_like(x)
        kernels.rms_norm(x.data_ptr(), weight.data_ptr(), x.numel() // k, k, eps, shift, y.data_ptr())
        return y

    forward.params = params  # type: ignore[attr-defined]  # for a fused decoder layer (decode_steps)
    return forward


def norm_params(module: Any) -> tuple[torch.Tensor, float, float] | None:
    """(weight [k] float32 on the CPU, eps, shift) of a transformers RMS norm that computes
    x_hat * (weight + shift), or None for anything else."""
    if not isinstance(module, nn.Module) or "rmsnorm" not in type(module).__name__.lower():
        return None
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not isinstance(eps, float):
        return None
    if weight.dtype is not torch.float32 or weight.device.type != "cpu":
        return None
    shift = _norm_shift(module, module.forward, weight, eps)
    return None if shift is None else (weight, eps, shift)


def _norm_shift(module: nn.Module, own: Callable, weight: torch.Tensor, eps: float) -> float | None:
    """0.0 (w * x_hat) or 1.0 (Gemma's (1 + w) * x_hat), whichever the module computes."""
    x = torch.randn(3, weight.numel(), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = own(x).float()
        x_hat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        for shift in (0.0, 1.0):
            if torch.allclose(x_hat * (weight + shift), want, rtol=1e-4, atol=1e-5):
                return shift
    return None


def _agrees(module: nn.Module, fast: Callable, gen: torch.Generator) -> bool:
    """The fused forward against the module's own on a random one-token input."""
    width = module.gate_proj.in_features if _is_mlp(module) else module.weight.numel()
    x = torch.randn(1, 1, width, generator=gen)
    with torch.no_grad():
        return close_enough(fast(x), module.forward(x).float())
