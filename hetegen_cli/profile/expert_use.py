"""How often a mixture-of-experts model's router chooses each expert, per layer, on a text: the
document `hetegen eval --expert-use FILE` writes and the planner reads (docs/models.md,
"Expert use"). Pure Python: counts, not tensors.

Each counted token adds top_k choices to its layer, so a layer's counts sum to tokens x top_k.
Without such a document a planner assumes uniform use: each expert chosen with probability
top_k / num_experts per token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, model_validator

from hetegen_cli.core.errors import InputError
from hetegen_cli.core.jsonio import read_document, write_document
from hetegen_cli.core.validation import Count, Index, Schema, Text, check

EXPERT_USE_KIND = "hetegen.expert_use"
EXPERT_USE_SCHEMA_VERSION = 1
PRODUCED_BY = "hetegen eval --expert-use FILE"


class LayerUse(Schema):
    """One MoE layer: how many times each expert was chosen (length num_experts)."""

    layer: Index
    counts: Annotated[list[Index], Field(min_length=1)]


class ExpertUse(Schema):
    schema_version: int = EXPERT_USE_SCHEMA_VERSION
    kind: str = EXPERT_USE_KIND
    model: Text  # the model's name
    architecture: Text
    config_hash: Text
    num_experts: Count
    top_k: Count
    tokens: Count  # tokens counted (each once)
    text: Text  # where the text came from
    text_sha256: Text
    layers: Annotated[list[LayerUse], Field(min_length=1)]

    @model_validator(mode="after")
    def _consistent(self) -> ExpertUse:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k {self.top_k} exceeds num_experts {self.num_experts}")
        seen = set()
        for use in self.layers:
            if use.layer in seen:
                raise ValueError(f"layer {use.layer} appears twice")
            seen.add(use.layer)
            if len(use.counts) != self.num_experts:
                raise ValueError(
                    f"layer {use.layer} has {len(use.counts)} counts for {self.num_experts} experts"
                )
            if max(use.counts) > self.tokens:  # a token chooses an expert at most once
                raise ValueError(
                    f"layer {use.layer}: an expert counted {max(use.counts)} times in {self.tokens} tokens"
                )
            if sum(use.counts) != self.tokens * self.top_k:
                raise ValueError(
                    f"layer {use.layer}: counts sum to {sum(use.counts)}, not tokens x top_k = "
                    f"{self.tokens * self.top_k}"
                )
        return self

    def probabilities(self, layer: int) -> list[float]:
        """P(expert e chosen for a token) in `layer`, per expert (sums to top_k); uniform
        (top_k / num_experts) for a layer the text did not reach."""
        for use in self.layers:
            if use.layer == layer:
                return [c / self.tokens for c in use.counts]
        return [self.top_k / self.num_experts] * self.num_experts

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


def save_expert_use(use: ExpertUse, path: str | Path) -> Path:
    """Write atomically (no half-written file on failure)."""
    return write_document(path, use.to_dict())


def load_expert_use(path: str | Path) -> ExpertUse:
    """Read and validate a saved document; InputError (hint: measure it again) on any problem."""
    doc = read_document(path, EXPERT_USE_KIND, (EXPERT_USE_SCHEMA_VERSION,), InputError, PRODUCED_BY)
    return check(
        ExpertUse,
        doc,
        source=f"{path} is not a valid expert-use document",
        error=InputError,
        hint=f"measure it again with `{PRODUCED_BY}`",
    )
