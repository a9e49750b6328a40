"""`spec_from_config`: a model's shapes from its config, for any decoder-only causal LM that
transformers implements (the config checked, the layout derived and cached, the spec built)."""

from __future__ import annotations

from typing import Any

from hetegen_cli.models.architecture.derive import derive_layout
from hetegen_cli.models.shapes.config import validate_config
from hetegen_cli.models.shapes.spec import ModelSpec, spec_from_layout


def spec_from_config(
    config: dict[str, Any], name: str, dtype: str | None = None, source: str | None = None
) -> ModelSpec:
    """The spec of a decoder-only LM from its config dict (validated first: ModelError names the
    bad field, or why transformers cannot build it). `dtype` overrides the config's; `source`
    names the config in errors (a config.json's path; default "the config of NAME")."""
    source = source or f"the config of {name}"
    validate_config(config, source)
    return spec_from_layout(derive_layout(config, source), config, name, dtype)
