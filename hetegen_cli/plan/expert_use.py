"""Reading measured expert use for the planner (pure Python; docs/plan.md, "Experts"): the
counts of `hetegen eval --expert-use FILE` (profile.expert_use's checked loader) as
plan.expert_stats.ExpertStats, checked against the model the plan is for: a file counted on a
model with other experts (architecture, experts per layer, top-k, MoE layers) is refused with
one clear error.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from hetegen_cli.core.errors import InputError
from hetegen_cli.models.shapes.spec import ModelSpec
from hetegen_cli.plan.expert_stats import ExpertStats
from hetegen_cli.plan.sections import ExpertUseRecord
from hetegen_cli.profile.expert_use import ExpertUse, load_expert_use


def load_expert_stats(path: str | Path, spec: ModelSpec) -> tuple[ExpertStats, list[str]]:
    """The expert use saved at `path` (profile.expert_use's checked loader) as statistics for
    `spec`, and warnings; InputError (with a hint) for a damaged file or one counted on a model
    with other experts (architecture, experts per layer, top-k, MoE layers)."""
    use = load_expert_use(path)
    sha = hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()
    return expert_stats(use, spec, str(path), sha)


def expert_stats(
    use: ExpertUse, spec: ModelSpec, path: str | None = None, sha256: str | None = None
) -> tuple[ExpertStats, list[str]]:
    """`use` checked against `spec` (see load_expert_stats), and warnings."""
    where = f"--expert-use {path}" if path else "the expert use"
    hint = f"count this model's expert use: `hetegen eval --model {spec.name} --quant none --expert-use FILE`"
    if not spec.experts:
        raise InputError(
            f"{where}: {spec.name} is a dense model; it has no routed experts to place",
            "drop --expert-use, or plan a mixture-of-experts model",
        )
    counted = f"{where} was counted on {use.model} ({use.architecture}"
    if use.architecture != spec.architecture:
        raise InputError(f"{counted}), not a {spec.architecture} model like {spec.name}", hint)
    for x in spec.experts:
        if (x.num_experts, x.top_k) != (use.num_experts, use.top_k):
            raise InputError(
                f"{counted}: {use.num_experts} experts per layer, top-{use.top_k}), but {spec.name} "
                f"has {x.num_experts} experts, top-{x.top_k} in layer {x.layer_index}",
                hint,
            )
    want = sorted(x.layer_index for x in spec.experts)
    have = sorted(u.layer for u in use.layers)
    if have != want:
        raise InputError(
            f"{counted}: {len(have)} mixture-of-experts layers, {_span(have)}), but {spec.name} "
            f"has {len(want)}, {_span(want)}",
            hint,
        )
    warnings = []
    if use.config_hash != spec.config_hash:
        warnings.append(
            f"{where} was counted on {use.model} (config hash {use.config_hash}), not on {spec.name} "
            f"({spec.config_hash}); its experts match, so the counts are used: count again if the "
            "models differ"
        )
    counted = use.model_dump(include={"model", "config_hash", "tokens", "text", "text_sha256"})
    record = ExpertUseRecord(source="measured", path=path, sha256=sha256, **counted)
    layers = tuple((u.layer, tuple(c / use.tokens for c in u.counts)) for u in use.layers)
    return ExpertStats(tuple(sorted(layers)), record), warnings


def _span(layers: list[int]) -> str:
    """Layer numbers in a few characters: '0-47', or the list when not contiguous."""
    if layers and layers == list(range(layers[0], layers[-1] + 1)):
        return f"layers {layers[0]}-{layers[-1]}"
    return f"layers {layers}"
