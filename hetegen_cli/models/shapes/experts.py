"""Mixture-of-experts layers as plannable units (pure Python, no torch; docs/models.md,
"Mixture of experts").

In transformers 5 the routed experts of a MoE layer are one module holding two fused tensors,
`gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I] (Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE
alike); the router (`mlp.gate`, a weight [E, H]) and a shared expert stay ordinary tensors and
linears. Checkpoints usually store the experts one by one (`experts.{e}.gate_proj.weight`, or
Mixtral's `block_sparse_moe.experts.{e}.w1.weight`), which transformers fuses while loading;
`expert_keys` names both forms so a folder is checked, and the engine reads expert e's
weights, without transformers' loader.

Quantized (docs/models.md, "Quantized experts"): each part of each expert may be stored in
hetegen's int8/int4 layout under `quant_expert_key` (`{experts}.{e}.gate_proj.weight.q`, ...);
`ExpertsSpec.part_quant` says which, and its bytes are the quantized ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from hetegen_cli.core.errors import ModelError
from hetegen_cli.core.quant import DEFAULT_GROUP_SIZE, kernel_takes
from hetegen_cli.core.quant import weight_bytes as quant_weight_bytes

#: the parts of one expert: gate and up ([I, H] each, fused as gate_up_proj [2I, H]) and down
PARTS = ("gate", "up", "down")
#: per-expert weight names of each part as checkpoints store them (Qwen/OLMoE, Mixtral)
_PART_NAMES = {"gate": ("gate_proj", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2")}
#: (format, group size) of a quantized part; None for a part kept in floating point
PartQuant = tuple[str, int] | None
_REFETCH = "the checkpoint does not match its config.json; fetch or convert it again"
#: config fields naming the number of routed experts, by architecture family
COUNT_FIELDS = ("num_experts", "num_local_experts")


@dataclass(frozen=True)
class ExpertsSpec:
    """The routed experts of one MoE layer: E experts of width I on hidden size H, top_k of
    them chosen per token by the router. Sizes in bytes at `dtype_bytes`."""

    name: str  # the experts module, e.g. model.layers.0.mlp.experts
    layer_index: int
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int  # one expert's width
    dtype_bytes: int
    #: per part (PARTS order) its stored (format, group size), None for a floating-point part;
    #: () when every part is floating point (models.shapes.quantfile, "experts")
    part_quant: tuple[PartQuant, ...] = ()

    @property
    def gate_up_name(self) -> str:
        return f"{self.name}.gate_up_proj"

    @property
    def down_name(self) -> str:
        return f"{self.name}.down_proj"

    @property
    def tensors(self) -> dict[str, tuple[int, ...]]:
        """The fused tensors of the transformers module, name -> shape."""
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        return {self.gate_up_name: (e, 2 * i, h), self.down_name: (e, h, i)}

    @property
    def expert_parameters(self) -> int:
        """Parameters of one expert (gate, up and down)."""
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert as stored and held on the GPU side: quantized parts at their
        format's bytes (core.quant.weight_bytes), the others at `dtype_bytes`."""
        return sum(self.part_bytes(part, self.dtype_bytes) for part in PARTS)

    def host_expert_bytes(self, float_bytes: int) -> int:
        """Bytes of one expert held by the CPU: quantized parts as stored (their packed
        kernels hold as many), floating-point parts at `float_bytes` per parameter (the CPU
        format's)."""
        return sum(self.part_bytes(part, float_bytes) for part in PARTS)

    @property
    def split_step(self) -> int:
        """Intermediate units a decode split of one expert moves in (ExpertsPlacement.
        split_units): 32, or the largest int4 group (down's columns split by whole groups)."""
        groups = [q[1] for q in self.part_quant if q and q[0] == "int4" and q[1]]
        return max([32, *groups])

    @property
    def split_extra_bytes(self) -> int:
        """Bytes a decode split adds to one expert held by the CPU: an int8 down's float16
        per-row scales, which both pieces hold."""
        q = self.part_format("down")
        return 2 * self.hidden_size if q and q[0] == "int8" else 0

    def part_format(self, part: str) -> PartQuant:
        """(format, group size) of `part` when stored quantized, else None."""
        return self.part_quant[PARTS.index(part)] if self.part_quant else None

    def part_bytes(self, part: str, float_bytes: int) -> int:
        out, inp = self.part_shape(part)
        q = self.part_format(part)
        return quant_weight_bytes(q[0], out, inp, q[1]) if q else out * inp * float_bytes

    @property
    def quant_formats(self) -> tuple[str, ...]:
        """The distinct formats of the quantized parts, sorted (() for float experts)."""
        return tuple(sorted({q[0] for q in self.part_quant if q}))

    @property
    def quant_label(self) -> str | None:
        """'int8', 'int4-g32', 'int4-g32+int8' (gate/up and down in two formats) or None: how
        this layer's experts are stored (ModelSpec.quant_label counts them too)."""
        stored = [q for q in self.part_quant if q]
        labels = {fmt if fmt == "int8" else f"{fmt}-g{group}" for fmt, group in stored}
        return "+".join(sorted(labels)) or None

    def quantized(self, fmt: str, group: int) -> ExpertsSpec:
        """These experts with every part whose shape the `fmt` kernel takes stored as `fmt`
        (core.quant.kernel_takes; the others stay floating point, as dense linears do)."""
        stored = (fmt, group if fmt == "int4" else DEFAULT_GROUP_SIZE)  # int8 has no groups
        parts = tuple(stored if kernel_takes(fmt, *self.part_shape(p), group) else None for p in PARTS)
        return replace(self, part_quant=parts if any(parts) else ())

    @property
    def weight_bytes(self) -> int:
        return self.num_experts * self.expert_bytes

    @property
    def active_fraction(self) -> float:
        """The share of experts one token uses (top_k / E): uniform use."""
        return self.top_k / self.num_experts

    def part_shape(self, part: str) -> tuple[int, int]:
        """[out, in] of one expert's `part` (gate, up: [I, H]; down: [H, I])."""
        h, i = self.hidden_size, self.intermediate_size
        return (h, i) if part == "down" else (i, h)


def expected_distinct(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected number of distinct experts `tokens` tokens choose when each picks `top_k` of
    `num_experts` uniformly at random: E (1 - (1 - k/E)^n)."""
    if tokens <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def expert_keys(experts_name: str, expert: int, part: str) -> tuple[str, ...]:
    """The names a checkpoint may store expert `expert`'s `part` under, most usual first:
    `{experts}.{e}.gate_proj.weight`, Mixtral's `w1`/`w3`/`w2`, and both under
    `block_sparse_moe` instead of `mlp` (Mixtral's checkpoints)."""
    bases = [experts_name, *legacy_names(experts_name)]
    return tuple(f"{base}.{expert}.{p}.weight" for p in _PART_NAMES[part] for base in bases)


def legacy_names(name: str) -> tuple[str, ...]:
    """Older names of a MoE tensor's module path: Mixtral's checkpoints keep the router and
    experts under `block_sparse_moe` where transformers 5 has `mlp` (its conversion mapping)."""
    for part in (".mlp.gate", ".mlp.experts"):
        if part in name:
            return (name.replace(".mlp.", ".block_sparse_moe.", 1),)
    return ()


def quant_expert_key(experts_name: str, expert: int, part: str) -> str:
    """The stored name of expert `expert`'s `part` in hetegen's own folders (quantized ones:
    its parts are `{key}.q`, `.scale` and, for int4, `.min`; a float part is `{key}` itself):
    `{experts}.{e}.gate_proj.weight`, whatever names the source checkpoint used."""
    return f"{experts_name}.{expert}.{_PART_NAMES[part][0]}.weight"


def check_config_experts(config: dict[str, Any], source: str) -> None:
    """ModelError when a MoE config's expert fields disagree: two different expert counts,
    top-k below 1 or above the number of experts (a config without them passes)."""
    counts = {k: config[k] for k in COUNT_FIELDS if isinstance(config.get(k), int) and config[k] > 0}
    top_k = config.get("num_experts_per_tok")
    fix = "fix config.json or fetch it again"
    if len(set(counts.values())) > 1:
        said = " and ".join(f"{k} {v}" for k, v in counts.items())
        raise ModelError(f"{source}: inconsistent expert counts: {said}", fix)
    if top_k is None or not counts:
        return
    count = next(iter(counts.values()))
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= count:
        raise ModelError(
            f"{source}: num_experts_per_tok {top_k!r} is not between 1 and the {count} experts", fix
        )


def check_expert_tensors(
    experts: ExpertsSpec,
    lookup: Callable[[str], str | None],
    shape_of: Callable[[str], tuple[int, ...]],
    where: str,
) -> set[str]:
    """The stored keys holding `experts`' weights: the fused tensors, or every expert's parts
    one by one (`lookup(name)` -> stored key or None, `shape_of(key)` -> its shape). ModelError
    names `where` (the folder) when a fused tensor holds another number of experts, an expert
    is missing, the checkpoint stores more experts than the config says, or a part's shape
    differs."""
    e = experts.num_experts
    layer = f"layer {experts.layer_index}"
    fused = {name: lookup(name) for name in experts.tensors}
    if all(fused.values()):
        for name, key in fused.items():
            stored, want = tuple(shape_of(key)), experts.tensors[name]
            if stored[:1] != want[:1] and stored[1:] == want[1:]:
                raise ModelError(
                    f"{where}: {key} holds {stored[0]} experts, but config.json says {e} ({layer})", _REFETCH
                )
            if stored != want:
                raise ModelError(
                    f"{where}: tensor {key} has shape {list(stored)}, but config.json says {list(want)}",
                    _REFETCH,
                )
        return set(fused.values())  # type: ignore[arg-type]
    used: set[str] = set()
    for expert in range(e):
        for part in PARTS:
            key = next((k for k in map(lookup, expert_keys(experts.name, expert, part)) if k), None)
            if key is None:
                raise ModelError(
                    f"{where} lacks the {part} weight of expert {expert} of {e} in {layer} "
                    f"({expert_keys(experts.name, expert, part)[0]})",
                    _REFETCH,
                )
            if tuple(shape_of(key)) != experts.part_shape(part):
                raise ModelError(
                    f"{where}: tensor {key} has shape {list(shape_of(key))}, but config.json says "
                    f"{list(experts.part_shape(part))}",
                    _REFETCH,
                )
            used.add(key)
    if any(lookup(k) for k in expert_keys(experts.name, e, "gate")):
        raise ModelError(
            f"{where} stores more than the {e} experts config.json says in {layer} "
            f"(it holds expert index {e})",
            "the config's expert count does not match the checkpoint; fix config.json or fetch it again",
        )
    return used
