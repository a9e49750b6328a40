"""Routed experts read one by one, and computed on the CPU from hetegen's quantized layout
(docs/models.md, "Quantized experts").

- `copy_float_expert` reads expert e of a floating-point checkpoint (the fused tensors, or its
  own `gate_proj`/`up_proj`/`down_proj` tensors, Mixtral's `w1`/`w3`/`w2`);
- `read_stored_expert` reads expert e of a hetegen folder: each part in its stored format
  (models.shapes.experts.quant_expert_key; a QuantWeight, or a float tensor);
- `CpuExpert` computes one expert on the CPU as transformers does (gate and up, activation,
  down), its quantized parts through torch's packed kernels (models.formats.quant.QuantLinear;
  gate and up fused into one kernel when they share a format);
- `QuantExperts` replaces transformers' experts module in a quantized model run plainly on the
  CPU (models.loading.quantized_loader): tokens grouped per expert exactly as transformers
  groups them, each expert a CpuExpert. The engine's CPU side (engine.experts) computes its
  experts with the same CpuExpert, so an all-CPU plan gives the plain model's numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hetegen_cli.core.errors import ModelError
from hetegen_cli.models.formats import fused
from hetegen_cli.models.formats.checkpoint import CheckpointReader
from hetegen_cli.models.formats.quant import QuantLinear, QuantWeight
from hetegen_cli.models.shapes.experts import PARTS, ExpertsSpec, expert_keys, quant_expert_key

_REFETCH = "re-download or convert the model"
_REQUANTIZE = "quantize the model again"


def copy_float_expert(
    reader: CheckpointReader, spec: ExpertsSpec, e: int, gate_up: torch.Tensor, down: torch.Tensor
) -> None:
    """Expert e's weights of a floating-point checkpoint into `gate_up` [2I, H] and `down`
    [H, I] (any device and dtype): from the fused tensors, or from its own tensors per part."""
    fused = reader.key_for(spec.gate_up_name), reader.key_for(spec.down_name)
    if all(fused):
        reader.copy_rows(fused[0], gate_up.unsqueeze(0), start=e)
        reader.copy_rows(fused[1], down.unsqueeze(0), start=e)
        return
    i = spec.intermediate_size
    dests = {"gate": gate_up[:i], "up": gate_up[i:], "down": down}
    for part in PARTS:
        names = expert_keys(spec.name, e, part)
        key = next((k for k in map(reader.key_for, names) if k), None)
        if key is None:
            raise ModelError(f"the checkpoint lacks {names[0]}", _REFETCH)
        reader.copy_rows(key, dests[part])


def read_stored_expert(
    reader: CheckpointReader, spec: ExpertsSpec, e: int, float_dtype: torch.dtype
) -> dict[str, QuantWeight | torch.Tensor]:
    """Expert e of a hetegen folder whose experts are stored one by one: each quantized part
    (ExpertsSpec.part_format) as its QuantWeight, each other part as a tensor in
    `float_dtype`. ModelError names the missing tensor."""
    parts: dict[str, QuantWeight | torch.Tensor] = {}
    for part in PARTS:
        key = quant_expert_key(spec.name, e, part)
        q = spec.part_format(part)
        out, inp = spec.part_shape(part)
        try:
            if q is None:
                parts[part] = reader.read(key, float_dtype, torch.device("cpu"))
            elif q[0] == "int8":
                q8, scale = reader.raw(f"{key}.q"), reader.raw(f"{key}.scale")
                parts[part] = QuantWeight("int8", out, inp, q8, scale)
            else:
                q4, scale, low = (reader.raw(f"{key}.{p}") for p in ("q", "scale", "min"))
                parts[part] = QuantWeight("int4", out, inp, q4, scale, low, q[1])
        except (KeyError, OSError) as exc:
            raise ModelError(f"the quantized checkpoint lacks a part of {key} ({exc})", _REQUANTIZE) from exc
    return parts


def split_expert(
    parts: dict[str, QuantWeight | torch.Tensor], units: int
) -> tuple[dict[str, QuantWeight | torch.Tensor], dict[str, QuantWeight | torch.Tensor]]:
    """An expert's parts (read_stored_expert) as two experts by intermediate units: the first
    `units` (gate and up rows, down columns) and the rest; their outputs add up to the whole
    expert's. int4 down columns split by whole groups (ExpertsSpec.split_step)."""

    def rows(w: QuantWeight | torch.Tensor, a: int, b: int) -> QuantWeight | torch.Tensor:
        return w.rows(a, b) if isinstance(w, QuantWeight) else w[a:b].clone()

    def columns(w: QuantWeight | torch.Tensor, a: int, b: int) -> QuantWeight | torch.Tensor:
        return w.columns(a, b) if isinstance(w, QuantWeight) else w[:, a:b].contiguous()

    i = parts["down"].in_features if isinstance(parts["down"], QuantWeight) else parts["down"].shape[1]
    first = {"gate": rows(parts["gate"], 0, units), "up": rows(parts["up"], 0, units)}
    rest = {"gate": rows(parts["gate"], units, i), "up": rows(parts["up"], units, i)}
    first["down"], rest["down"] = columns(parts["down"], 0, units), columns(parts["down"], units, i)
    return first, rest


def _fuse(a: QuantWeight, b: QuantWeight) -> QuantWeight:
    """Two weights of one format stacked by rows: [a; b]."""
    low = None if a.min is None else torch.cat((a.min, b.min))
    return QuantWeight(
        a.format,
        a.out_features + b.out_features,
        a.in_features,
        torch.cat((a.q, b.q)),
        torch.cat((a.scale, b.scale)),
        low,
        a.group_size,
    )


class _FloatPart:
    """A floating-point part: x -> x W^T computed in W's dtype, returned in x's."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


class CpuExpert:
    """One routed expert computed on the CPU (module docstring): x [T, H] -> y [T, H] in x's
    dtype. Not an nn.Module: its kernels stay in host RAM whatever `.to()` does to a model."""

    def __init__(self, parts: dict[str, QuantWeight | torch.Tensor], act_fn: nn.Module) -> None:
        self.act_fn = act_fn
        gate, up = parts["gate"], parts["up"]
        self.gate_up: QuantLinear | None = None
        if isinstance(gate, QuantWeight) and isinstance(up, QuantWeight) and gate.format == up.format:
            self.gate_up = QuantLinear(_fuse(gate, up))
        else:
            self.gate, self.up = _operand(gate), _operand(up)
        self.down = _operand(parts["down"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate(x), self.up(x)
        return self.down(self.act_fn(gate) * up)

    def stored_parts(self) -> list[StoredPart] | None:
        """Gate, up and down as this expert holds them, for a copy to the GPU (engine.experts,
        prefill streaming): a quantized part's stored q and float16 scale and min (None: a
        symmetric int4 part, min = -8 scale), a floating-point part's weight. Views, not
        copies; None when a part sits in torch's packed layout, which has no stored form."""
        if self.gate_up is not None:
            whole = _stored(self.gate_up)
            if whole is None:
                return None
            fmt, group, tensors = whole
            i = self.gate_up.out_features // 2
            halves = ((0, i), (i, 2 * i))
            ops = [(fmt, group, tuple(None if t is None else t[a:b] for t in tensors)) for a, b in halves]
        else:
            ops = [_stored(self.gate), _stored(self.up)]
        ops.append(_stored(self.down))
        return None if None in ops else ops

    def operands(self) -> list[QuantLinear | _FloatPart]:
        """Its kernels and float parts (gate and up fused into one where they are)."""
        ops = [self.gate_up] if self.gate_up is not None else [self.gate, self.up]
        return [*ops, self.down]

    @property
    def nbytes(self) -> int:
        """Host bytes of its kernels and float weights (ExpertsSpec.host_expert_bytes)."""
        return sum(o.held_bytes if isinstance(o, QuantLinear) else o.nbytes for o in self.operands())


#: (format or None for a float part, group size or None, tensors): one part of an expert as held
StoredPart = tuple[str | None, int | None, tuple[torch.Tensor | None, ...]]


def _stored(op: QuantLinear | _FloatPart) -> StoredPart | None:
    if isinstance(op, _FloatPart):
        return None, None, (op.weight,)
    if op.native is None:
        return None
    mins = op._buffers.get("mins")
    half = (op.scales.view(torch.float16), None if mins is None else mins.view(torch.float16))
    return op.format, op.group_size, (op.q, *half) if op.format == "int4" else (op.q, half[0])


def _operand(part: QuantWeight | torch.Tensor) -> QuantLinear | _FloatPart:
    return QuantLinear(part) if isinstance(part, QuantWeight) else _FloatPart(part)


class QuantExperts(nn.Module):
    """A MoE layer's routed experts from a quantized folder, all on the CPU (module docstring);
    called as transformers calls its experts module, with the hidden states [T, H] and the
    router's `top_k_index` and `top_k_weights` [T, k]."""

    def __init__(self, spec: ExpertsSpec, experts: list[CpuExpert]) -> None:
        super().__init__()
        self.num_experts = spec.num_experts
        self.spec = spec
        self.experts = experts
        self.fused = fused_experts(experts)  # one kernel call per decode step, or None

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, stored={self.spec.quant_label or 'float'}"

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if hidden_states.shape[0] == 1:
            return self._one_token(hidden_states, top_k_index, top_k_weights)
        out = torch.zeros_like(hidden_states)
        for e, pos, tok in expert_jobs(top_k_index, self.num_experts):
            y = self.experts[e](hidden_states[tok]) * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out

    def _one_token(
        self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Decode at batch 1 (x [1, H]): the chosen experts in ascending order, as transformers
        adds them (0 + y_a + y_b ...: the same sum bit for bit), without its one-hot grouping,
        whose index and scatter ops were a tenth of a decode step."""
        if self.fused is not None and x.dtype is torch.float32 and x.device.type == "cpu":
            out = torch.zeros(x.shape)
            self.add_one_token(x, top_k_index, top_k_weights, out)
            return out
        chosen = top_k_index[0].tolist()
        out = torch.zeros_like(x)
        for pos in _ascending(chosen, self.num_experts):
            out += (self.experts[chosen[pos]](x) * top_k_weights[0, pos]).to(out.dtype)
        return out

    def add_one_token(
        self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, out: torch.Tensor
    ) -> None:
        """out [1, H] += the chosen experts' weighted sum at one token x [1, H] float32 on the
        CPU, in one kernel call (`fused` must be set), in ascending expert order."""
        chosen, weights = top_k_index[0].tolist(), top_k_weights[0].tolist()
        order = _ascending(chosen, self.num_experts)
        self.fused.add(x.contiguous(), [chosen[p] for p in order], [weights[p] for p in order], out)


def _ascending(chosen: list[int], num_experts: int) -> list[int]:
    """The top-k positions of `chosen` in ascending expert order, without padding choices (E)."""
    return [p for p in sorted(range(len(chosen)), key=chosen.__getitem__) if chosen[p] < num_experts]


def fused_experts(experts: list[CpuExpert]) -> fused.GatedFFN | None:
    """Every expert as one unit of a fused.GatedFFN (hetegen's kernels, SiLU, QuantLinear
    parts), checked on expert 0 against CpuExpert's own product; else None."""
    if not experts or not fused.enabled() or not fused.is_silu(experts[0].act_fn):
        return None
    units = []
    for e in experts:
        if e.gate_up is not None:
            unit = fused.fused_gate_up_unit(e.gate_up, e.down)
        else:
            unit = fused.gated_unit(e.gate, e.up, e.down)
        if unit is None:
            return None
        units.append(unit)
    ffn = fused.GatedFFN(units, experts)
    x = torch.randn(1, ffn.hidden, generator=torch.Generator().manual_seed(0))
    out = torch.zeros(1, ffn.hidden)
    ffn.first(x, out)
    return ffn if fused.close_enough(out, experts[0](x).float()) else None


def expert_jobs(top_k_index: torch.Tensor, num_experts: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(expert, top-k positions, tokens) of every chosen expert, ascending, on the host, as
    transformers groups them (one_hot over E + 1, [E + 1, k, T]); at one token read straight
    from the choice (the same jobs, without the grouping's index ops)."""
    if top_k_index.shape[0] == 1:
        chosen, token = top_k_index[0].tolist(), torch.zeros(1, dtype=torch.long)
        order = sorted(range(len(chosen)), key=chosen.__getitem__)
        return [(chosen[p], torch.tensor([p]), token) for p in order if chosen[p] < num_experts]
    with torch.no_grad():
        mask = F.one_hot(top_k_index.cpu(), num_classes=num_experts + 1).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist()
    return [(e, *torch.where(mask[e])) for e in hit if e < num_experts]


def load_quant_experts(
    reader: CheckpointReader, spec: ExpertsSpec, act_fn: nn.Module, float_dtype: torch.dtype
) -> QuantExperts:
    """Every expert of `spec` from a hetegen folder, as a QuantExperts."""
    experts = [read_stored_expert(reader, spec, e, float_dtype) for e in range(spec.num_experts)]
    return QuantExperts(spec, [CpuExpert(parts, act_fn) for parts in experts])
