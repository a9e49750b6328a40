"""The KV cache of a stock transformers causal LM across transformers 4.x and 5.x: the
forward's keyword for it and an empty one. `run.generate` and the engine-cost measurement
(`measure.engine_costs`) both drive a model step by step with it.

transformers' DynamicCache appends with `torch.cat`, which copies the whole cache of every
layer at every step: at 2,048 tokens of context a 24-layer, 2048-wide model copies about
0.8 GB per token. `new_cache` gives a DynamicCache whose full-attention layers write into
buffers with room to spare (`GrowingLayer`) and hand the attention views of the filled part:
the same keys and values, no copy of the past. Sliding-window layers stay transformers' own.
"""

from __future__ import annotations

from typing import Any

import torch

from hetegen_cli.models.formats.decode_steps import cache_key

#: the smallest room a GrowingLayer makes when it does not know the context (tokens)
MIN_ROOM = 256


def cache_keyword(model: Any) -> str:
    """The keyword `model`'s forward takes the KV cache by: `cache` (transformers >= 5.2x) or
    `past_key_values` (models.formats.decode_steps.cache_key)."""
    return cache_key(model.forward)


def new_cache(model: Any, capacity: int | None = None) -> Any:
    """An empty transformers DynamicCache for `model` whose full-attention layers are
    GrowingLayers with room for `capacity` tokens (the prompt plus the tokens to generate;
    None: they double their room when full)."""
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()
    layer_class = _growing_layer_class()
    if layer_class is None:
        return cache
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        return cache
    for i, layer in enumerate(layers):
        if type(layer) is layer_class.__base__:  # plain DynamicLayer, not sliding-window ones
            layers[i] = layer_class(capacity)
    return cache


_CLASS: list[Any] = []


def _growing_layer_class() -> Any:
    """GrowingLayer, defined on first use (transformers imported lazily); None where this
    transformers has no DynamicLayer to extend."""
    if not _CLASS:
        try:
            from transformers.cache_utils import DynamicLayer
        except ImportError:
            _CLASS.append(None)
        else:
            _CLASS.append(_define(DynamicLayer))
    return _CLASS[0]


def _define(base: type) -> type:
    class GrowingLayer(base):  # type: ignore[misc, valid-type]
        """A DynamicLayer that writes new keys and values [B, H, n, D] into buffers [B, H,
        room, D] and keeps `keys` / `values` as views of the positions filled so far: an
        append copies n positions, not the whole cache. Anything that replaces `keys`
        (crop, batch selection, reset) is adopted at the next update."""

        def __init__(self, capacity: int | None = None) -> None:
            super().__init__()
            self.capacity = capacity
            self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            old = 0 if self.keys is None or self.keys.numel() == 0 else self.keys.shape[-2]
            end = old + key_states.shape[-2]
            bufs = self._buffers
            if (
                bufs is None
                or end > bufs[0].shape[-2]
                or bufs[0].shape[:-2] != key_states.shape[:-2]
                or bufs[1].shape[:-2] != value_states.shape[:-2]
                or self.keys is None
                or self.keys.data_ptr() != bufs[0].data_ptr()  # replaced from outside
            ):
                bufs = self._grow(key_states, value_states, old, end)
            kb, vb = bufs
            kb[..., old:end, :].copy_(key_states)
            vb[..., old:end, :].copy_(value_states)
            self.filled(end)
            return self.keys, self.values

        def reserve(self, n: int) -> tuple[torch.Tensor, torch.Tensor, int] | None:
            """Room for n more positions, for a caller that writes them into the buffers
            itself (models.formats.fused's attention step): (key buffer, value buffer [B, H,
            room, D], the first position to write), then `filled(old + n)`; None when this
            layer holds nothing yet or its keys were replaced from outside."""
            bufs = self._buffers
            if not self.is_initialized or bufs is None or self.keys is None or self.keys.numel() == 0:
                return None
            if self.keys.data_ptr() != bufs[0].data_ptr() or self.values.data_ptr() != bufs[1].data_ptr():
                return None
            old = self.keys.shape[-2]
            if old + n > bufs[0].shape[-2]:
                bufs = self._grow(self.keys, self.values, old, old + n)
            return bufs[0], bufs[1], old

        def filled(self, end: int) -> None:
            """The buffers' first `end` positions are the cache (after `reserve`)."""
            kb, vb = self._buffers
            self.keys, self.values = kb[..., :end, :], vb[..., :end, :]

        def _grow(
            self, key_states: torch.Tensor, value_states: torch.Tensor, old: int, end: int
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if self.capacity is not None and end <= self.capacity:
                room = self.capacity
            else:
                room = max(end, MIN_ROOM, 2 * old)
            shape_k = (*key_states.shape[:-2], room, key_states.shape[-1])
            shape_v = (*value_states.shape[:-2], room, value_states.shape[-1])
            kb = key_states.new_empty(shape_k)
            vb = value_states.new_empty(shape_v)
            if old:
                kb[..., :old, :].copy_(self.keys)
                vb[..., :old, :].copy_(self.values)
            self._buffers = (kb, vb)
            return self._buffers

        def reset(self) -> None:
            super().reset()
            self._buffers = None

    return GrowingLayer
