"""The expert-use statistics the planner works with (pure Python, no documents read here;
docs/plan.md, "Experts"): each routed expert's probability of being chosen per token, per MoE
layer, and the record of where they came from. plan.expert_use makes them from the counts of
`hetegen eval --expert-use FILE`.

`PlanRequest.expert_use` carries them: the experts are then placed by time saved per byte
weighted by their own probability (plan.experts) and every strategy's prediction prices the
experts with the same probabilities (costmodel.experts). Without them use is uniform.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from hetegen_cli.plan.sections import ExpertUseRecord

#: what a MoE plan made without statistics records
UNIFORM_RECORD = ExpertUseRecord(source="uniform")


@dataclass(frozen=True)
class ExpertStats:
    """Per MoE layer, the probability that a token chooses each expert (sums to top_k)."""

    layers: tuple[tuple[int, tuple[float, ...]], ...]  # (layer index, one probability per expert)
    record: ExpertUseRecord

    @cached_property
    def _by_layer(self) -> dict[int, tuple[float, ...]]:
        return dict(self.layers)

    def per_token(self, layer: int) -> tuple[float, ...] | None:
        """P(expert e chosen for a token) in `layer`, per expert; None for a layer not counted."""
        return self._by_layer.get(layer)

    def describe(self) -> str:
        """The statistics in a few words, for notes."""
        r = self.record
        return f"measured use ({Path(r.path or '?').name}: {r.tokens} tokens of {r.text})"
