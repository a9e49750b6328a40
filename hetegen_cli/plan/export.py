"""A plan in llama.cpp's terms (`hetegen plan --export llama.cpp`, docs/plan.md): the
`-ngl` / `-ot` flags whose placement comes closest to the plan, each with its predicted decode
speed beside the plan's own.

llama.cpp places whole tensors: a tensor lives on the GPU or in RAM, and its matmul runs there.
It cannot split one linear's rows between the two, which is what every streamed linear of a
hetegen plan does. So there are two closest placements:

- `tensors`: the plan's GPU-resident linears on the GPU, every other linear whole in RAM
  (`-ngl <all> -ot "<those tensors>=CPU"`): hetegen's residency without the row split;
- `layers`: the static layer split of the plan's `layer_split` prediction (`-ngl k`).

Pure Python: tensor names come from a function given by the caller (models.formats.gguf_names).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from hetegen_cli.models.shapes.spec import ModelSpec
from hetegen_cli.plan.costmodel.predict import CostInputs, Execution, predict
from hetegen_cli.plan.document import LinearPlacement, Plan
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
    """The plan's resident linears on the GPU, every streamed one whole in RAM."""
    streamed = [p for p in plan.placements if not p.resident]
    names = []
    for p in streamed:
        name = gguf_name(p.name)
        if name is None:
            raise ValueError(f"{p.name} has no llama.cpp tensor name")
        names.append(name)
    overrides = [f for pattern in cpu_tensor_patterns(names) for f in ("-ot", pattern)]
    all_cpu_rows = tuple(
        p if p.resident else LinearPlacement.of(p, False, p.out_features, p.out_features)
        for p in plan.placements
    )
    whole = replace(plan, placements=all_cpu_rows)
    figures = predict(spec, Execution(whole, "cuda"), req, inputs)
    what = (
        f"{len(plan.placements) - len(streamed)} resident linears on the GPU as in the plan; "
        f"{len(streamed)} linears the plan streams computed whole on the CPU"
    )
    ngl = ("-ngl", str(spec.num_layers + 1))  # every layer and the output layer on the GPU, then -ot
    return Flags("tensors", (*ngl, *overrides, *common), figures.decode_tokens_per_s, what)


def _layers(plan, spec, common) -> Flags:
    """The plan's layer_split prediction: whole decoder layers on the GPU."""
    split = plan.predictions.layer_split
    k = split.gpu_layers if split is not None and split.gpu_layers is not None else 0
    what = f"{k} of {spec.num_layers} decoder layers whole on the GPU (llama.cpp offloads the last k)"
    return Flags("layers", ("-ngl", str(k), *common), split.decode_tokens_per_s if split else None, what)
