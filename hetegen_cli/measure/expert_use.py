"""Counting a mixture-of-experts model's routing choices while a text runs through it
(`hetegen eval --expert-use FILE`; the document: profile.expert_use).

transformers' MoE routers (Qwen3MoeTopKRouter, MixtralTopKRouter, OlmoeTopKRouter, ...) are
modules with `top_k` and `num_experts` whose forward returns (logits, weights, indices), the
indices [tokens, top_k]. A forward hook on each counts the indices of the tokens not counted in
an earlier window (`skip`), so each token of the text counts once.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def routers(model: nn.Module) -> dict[int, nn.Module]:
    """The router of each decoder layer ({layer index: module}); empty for a dense model."""
    found = {}
    for name, module in model.named_modules():
        match = _LAYER.search(name)
        if (
            match
            and hasattr(module, "top_k")
            and hasattr(module, "num_experts")
            and hasattr(module, "weight")
        ):
            found[int(match.group(1))] = module
    return found


class ExpertCounter:
    """Counts per layer ([num_experts] int64) of the experts each router chose, as a context
    manager around the forwards to count. Set `skip` before each forward: the number of leading
    tokens of its batch that an earlier forward counted already."""

    def __init__(self, model: nn.Module) -> None:
        self.routers = routers(model)
        if not self.routers:
            raise ValueError("the model has no mixture-of-experts router")
        first = next(iter(self.routers.values()))
        self.num_experts, self.top_k = int(first.num_experts), int(first.top_k)
        self.counts = {i: torch.zeros(self.num_experts, dtype=torch.int64) for i in self.routers}
        self.tokens = 0
        self.skip = 0
        self._handles: list[Any] = []

    def __enter__(self) -> ExpertCounter:
        for layer, router in self.routers.items():
            self._handles.append(router.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, layer: int) -> Any:
        def count(module: nn.Module, args: Any, output: Any) -> None:
            indices = output[-1]  # [tokens, top_k]
            new = indices[self.skip :].reshape(-1).to("cpu")
            self.counts[layer] += torch.bincount(new, minlength=self.num_experts)

        return count

    def counted(self, tokens: int) -> None:
        """Record that a forward counted `tokens` new tokens (after its `skip`)."""
        self.tokens += tokens

    def layers(self) -> list[dict[str, Any]]:
        """[{layer, counts}] for profile.expert_use.LayerUse, by layer index."""
        return [{"layer": i, "counts": [int(c) for c in self.counts[i]]} for i in sorted(self.counts)]
