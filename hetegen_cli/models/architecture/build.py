"""A stock transformers causal LM built from a config on the meta device (no weight memory),
and transformers kept quiet while it works for hetegen."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from hetegen_cli.core.console import printable
from hetegen_cli.core.errors import ModelError

#: model types that are not decoder-only causal LMs with nn.Linear projections, with why
REFUSED = {
    "gpt2": "its projections are Conv1D modules, not nn.Linear",
    "gpt_bigcode": "its projections are Conv1D-shaped fused c_attn, not supported",
    "gpt_oss": (
        "its experts carry biases, a clamped SwiGLU over interleaved gate/up rows and MXFP4 "
        "weights, and its attention has attention sinks, none of which hetegen's experts "
        "module computes (docs/models.md, Mixture of experts)"
    ),
}


#: widths a config must state when its architecture has them (no default may stand in)
STATED_WIDTHS = ("intermediate_size", "ffn_dim")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Keep transformers' own log lines (load reports, tables, advice) off stderr while it
    works for hetegen, which reports what matters itself; HETEGEN_DEBUG=1 lets them through."""
    from transformers.utils import logging as hf_logging

    if os.environ.get("HETEGEN_DEBUG"):
        yield
        return
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def hf_config(config: dict[str, Any], source: str) -> Any:
    """transformers' config object of a config dict; ModelError when transformers has no causal
    LM of that model type, it is an encoder-decoder, or the values do not build a config."""
    from transformers import CONFIG_MAPPING, AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    arch = config.get("model_type")
    hint = "hetegen runs decoder-only causal LMs that transformers implements (no remote code)"
    if arch in REFUSED:
        raise ModelError(f"{source}: hetegen does not support model type {arch!r}: {REFUSED[arch]}", hint)
    if not isinstance(arch, str) or arch not in CONFIG_MAPPING:
        raise ModelError(f"{source} has model_type {arch!r}, which transformers does not know", hint)
    if arch not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(f"{source}: model type {arch!r} has no causal LM in transformers", hint)
    if config.get("is_encoder_decoder"):
        raise ModelError(f"{source}: {arch!r} is an encoder-decoder model", hint)
    args = {k: v for k, v in config.items() if k not in ("model_type", "auto_map")}
    try:
        with quiet_transformers():
            hf = AutoConfig.for_model(arch, **args)
    except MemoryError:
        raise
    except Exception as exc:  # transformers raises many types for values it cannot use
        raise ModelError(
            f"{source} is not a usable {arch} config ({type(exc).__name__}: {printable(str(exc))[:200]})",
            "fix config.json or fetch it again",
        ) from exc
    for key in STATED_WIDTHS:  # transformers' default would build another model silently
        if hasattr(hf, key) and key not in config:
            raise ModelError(
                f"{source} is not a usable {arch} config: field {key} is missing",
                "fix config.json or fetch it again",
            )
    return hf


def meta_causal_lm(hf: Any, source: str, dtype: Any = None) -> Any:
    """The causal LM of transformers config `hf` on the meta device (no remote code)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with quiet_transformers(), torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf, dtype=dtype, trust_remote_code=False)
    except MemoryError:
        raise
    except Exception as exc:
        raise ModelError(
            f"transformers cannot build the model of {source} ({type(exc).__name__}: "
            f"{printable(str(exc))[:200]})",
            "hetegen runs stock transformers causal LMs (no remote code); check config.json",
        ) from exc
