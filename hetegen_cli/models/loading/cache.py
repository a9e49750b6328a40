"""The KV cache of a stock transformers causal LM across transformers 4.x and 5.x: the
forward's keyword for it and an empty one. `run.generate` and the engine-cost measurement
(`measure.engine_costs`) both drive a model step by step with it."""

from __future__ import annotations

import inspect
from typing import Any


def cache_keyword(model: Any) -> str:
    """transformers >= 5.x names the KV-cache argument `cache`; 4.x `past_key_values`."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def new_cache(model: Any) -> Any:
    """An empty transformers DynamicCache for `model`."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()
