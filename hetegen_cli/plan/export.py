"""A plan in llama.cpp's terms (`hetegen plan --export llama.cpp`, docs/plan.md): the
`-ngl` / `-ot` flags whose placement comes closest to the plan, each with its predicted decode
speed beside the plan's own.

llama.cpp places whole tensors: a tensor lives on the GPU or in RAM, and its matmul runs there.
It cannot split one linear's rows between the two, which is what every streamed linear of a
hetegen plan does. So there are two closest placements:

- `tensors`: the plan's GPU-resident linears on the GPU, every other linear whole in RAM
  (`-ngl <all> -ot "<those tensors>=CPU"`): hetegen's residency without the row split;
- `layers`: the static layer split of the plan's `layer_split` prediction (`-ngl k`).

A mixture-of-experts model's routed experts are one fused tensor per layer and part in GGUF
(`blk.N.ffn_gate_exps`, `ffn_up_exps`, `ffn_down_exps`): llama.cpp holds a layer's experts on
one device, so `tensors` rounds the plan's per-expert placement to whole layers (`layer_experts`)
and says so, with `--cpu-moe`, `--n-cpu-moe N` or `-ot` patterns for the CPU layers' experts.

Pure Python: tensor names come from a function given by the caller (models.formats.gguf_names).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from hetegen_cli.models.shapes.spec import ModelSpec
from hetegen_cli.plan.costmodel.predict import CostInputs, Execution, predict
from hetegen_cli.plan.document import ExpertsPlacement, LinearPlacement, Plan
from hetegen_cli.plan.request import PlanRequest

EXPORT_TOOLS = ("llama.cpp",)
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Flags:
    """One llama.cpp placement: its flags and its predicted decode speed (None: not predicted)."""

    kind: str  # "tensors" | "layers" | "cpu"
    flags: tuple[str, ...]
    decode_tokens_per_s: float | None
    what: str  # one line: the placement in words
    notes: tuple[str, ...] = ()  # what the placement changed from the plan (MoE: the rounding)

    def command(self) -> str:
        """The flags as one shell-quoted string."""
        return " ".join(f"'{f}'" if any(c in f for c in "\\|()*") else f for f in self.flags)


@dataclass(frozen=True)
class LlamaCppExport:
    options: tuple[Flags, ...]
    hetegen_decode_tokens_per_s: float | None  # the plan's own prediction

    def to_dict(self) -> dict[str, Any]:
        return {
            "tool": "llama.cpp",
            "hetegen_decode_tokens_per_s": self.hetegen_decode_tokens_per_s,
            "options": [
                {
                    "kind": o.kind,
                    "flags": list(o.flags),
                    "command": o.command(),
                    "decode_tokens_per_s": o.decode_tokens_per_s,
                    "what": o.what,
                    "notes": list(o.notes),
                }
                for o in self.options
            ],
        }


def cpu_tensor_patterns(names: list[str]) -> list[str]:
    """`-ot` patterns (regex=CPU) matching exactly the GGUF tensors `names` (`blk.N.kind`
    or a top-level name like `output`), one per set of layers that share kinds."""
    layers_of: dict[str, set[int]] = {}
    top = []
    for name in names:
        match = _BLOCK.match(name)
        if match is None:
            top.append(re.escape(name))
        else:
            layers_of.setdefault(match.group(2), set()).add(int(match.group(1)))
    by_layers: dict[tuple[int, ...], list[str]] = {}
    for kind, layers in sorted(layers_of.items()):
        by_layers.setdefault(tuple(sorted(layers)), []).append(re.escape(kind))
    patterns = []
    for layers, kinds in by_layers.items():
        layer = str(layers[0]) if len(layers) == 1 else "(" + "|".join(map(str, layers)) + ")"
        kind = kinds[0] if len(kinds) == 1 else "(" + "|".join(kinds) + ")"
        patterns.append(f"blk\\.{layer}\\.{kind}\\.weight=CPU")
    patterns += [f"^{name}\\.weight=CPU" for name in sorted(top)]
    return patterns


def llama_cpp_export(
    plan: Plan, spec: ModelSpec, req: PlanRequest, inputs: CostInputs, gguf_name: Callable[[str], str | None]
) -> LlamaCppExport:
    """The llama.cpp placements closest to `plan` (module docstring) for `spec` and `req`'s
    workload, predicted with the same cost model and profile (`inputs`)."""
    common = ("-t", str(plan.runtime.cpu_threads), "-c", str(req.prompt_len + req.max_new_tokens))
    own = plan.predictions.hetegen.decode_tokens_per_s if plan.predictions.hetegen else None
    if not plan.runtime.requires_gpu:
        cpu = plan.predictions.cpu_only
        flags = Flags(
            "cpu", ("-ngl", "0", *common), cpu.decode_tokens_per_s if cpu else None, "everything on the CPU"
        )
        return LlamaCppExport((flags,), own)
    return LlamaCppExport(
        (_tensors(plan, spec, req, inputs, gguf_name, common), _layers(plan, spec, common)), own
    )


def _tensors(plan, spec, req, inputs, gguf_name, common) -> Flags:
    """The plan's resident linears on the GPU, every streamed one whole in RAM; a MoE model's
    experts rounded to whole layers (layer_experts)."""
    streamed = [p for p in plan.placements if not p.resident]
    names = [_gguf(gguf_name, p.name) for p in streamed]
    experts, to_cpu, to_gpu = layer_experts(plan, spec)
    moe, expert_names = expert_flags(experts, gguf_name)
    overrides = [f for pattern in cpu_tensor_patterns(names + expert_names) for f in ("-ot", pattern)]
    all_cpu_rows = tuple(
        p if p.resident else LinearPlacement.of(p, False, p.out_features, p.out_features)
        for p in plan.placements
    )
    whole = replace(plan, placements=all_cpu_rows, experts=experts)
    figures = predict(spec, Execution(whole, "cuda"), req, inputs)
    what = (
        f"{len(plan.placements) - len(streamed)} resident linears on the GPU as in the plan; "
        f"{len(streamed)} linears the plan streams computed whole on the CPU"
    )
    notes = ()
    if plan.experts:
        layers = sum(bool(x.gpu) for x in experts)
        what += f"; the routed experts of {layers} of {len(experts)} MoE layers on the GPU"
    if to_cpu or to_gpu:
        rounded = predict(spec, Execution(replace(plan, experts=experts), "cuda"), req, inputs)
        notes = (
            f"llama.cpp holds each layer's routed experts on one device: the plan's per-expert "
            f"placement is rounded to whole layers ({to_cpu} experts moved to the CPU, {to_gpu} "
            f"to the GPU); with the plan's own linears that rounding alone predicts "
            f"{rounded.decode_tokens_per_s:.3g} decode tok/s",
        )
    ngl = ("-ngl", str(spec.num_layers + 1))  # every layer and the output layer on the GPU, then -ot
    return Flags("tensors", (*ngl, *moe, *overrides, *common), figures.decode_tokens_per_s, what, notes)


def _gguf(gguf_name: Callable[[str], str | None], name: str) -> str:
    """The GGUF name of module `name`; ValueError when llama.cpp has none."""
    found = gguf_name(name)
    if found is None:
        raise ValueError(f"{name} has no llama.cpp tensor name")
    return found


def layer_experts(plan: Plan, spec: ModelSpec) -> tuple[tuple[ExpertsPlacement, ...], int, int]:
    """The plan's experts rounded to whole layers, as llama.cpp places them: the layers with the
    largest share of their experts on the GPU side (ties: the lower layer) get all of theirs
    there while whole layers fit in the GPU memory the plan gave its experts or left unused;
    every other layer's experts on the CPU. Also (experts moved to the CPU, moved to the GPU)."""
    gpu = plan.memory.gpu
    room = ((gpu.resident_expert_bytes or 0) if gpu else 0) + (plan.budget.gpu_unused_bytes or 0)
    size = {x.name: x.weight_bytes for x in spec.experts}
    whole = set()
    for p in sorted(
        (p for p in plan.experts if p.gpu), key=lambda p: (-len(p.gpu) / p.num_experts, p.layer_index)
    ):
        if size[p.name] <= room:
            whole.add(p.name)
            room -= size[p.name]
    rounded = tuple(
        ExpertsPlacement.of(p, range(p.num_experts) if p.name in whole else ()) for p in plan.experts
    )
    to_cpu = sum(len(p.gpu) for p in plan.experts if p.name not in whole)
    to_gpu = sum(len(p.cpu) for p in plan.experts if p.name in whole)
    return rounded, to_cpu, to_gpu


#: an experts module's parts as the gguf package's name table knows them (blk.N.ffn_*_exps)
_EXPERT_PARTS = ("gate_proj", "up_proj", "down_proj")


def expert_flags(
    experts: tuple[ExpertsPlacement, ...], gguf_name: Callable[[str], str | None]
) -> tuple[tuple[str, ...], list[str]]:
    """llama.cpp's flags for experts placed whole per layer, and the GGUF names of the experts
    tensors `-ot` must send to the CPU: `--cpu-moe` when every layer's are on the CPU,
    `--n-cpu-moe N` when exactly those of layers 0..N-1 are, else the CPU layers' tensors;
    nothing when every expert is on the GPU."""
    cpu = sorted(p.layer_index for p in experts if not p.gpu)
    if not cpu:
        return (), []
    if len(cpu) == len(experts):
        return ("--cpu-moe",), []
    n = cpu[-1] + 1
    if all(not p.gpu for p in experts if p.layer_index < n):
        return ("--n-cpu-moe", str(n)), []
    return (), [_gguf(gguf_name, f"{p.name}.{part}") for p in experts if not p.gpu for part in _EXPERT_PARTS]


def _layers(plan, spec, common) -> Flags:
    """The plan's layer_split prediction: whole decoder layers on the GPU."""
    split = plan.predictions.layer_split
    k = split.gpu_layers if split is not None and split.gpu_layers is not None else 0
    what = f"{k} of {spec.num_layers} decoder layers whole on the GPU (llama.cpp offloads the last k)"
    return Flags("layers", ("-ngl", str(k), *common), split.decode_tokens_per_s if split else None, what)
