"""config.json: read it, and check the fields every decoder-only LM has (presence, type, range,
divisibility) before anything is built from it.

Pure Python (no torch). Errors are ModelError naming the file and the field
(docs/validation.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, StrictInt, StrictStr, model_validator

from hetegen_cli.core.dtypes import WEIGHT_DTYPES
from hetegen_cli.core.errors import ModelError
from hetegen_cli.core.jsonio import read_json
from hetegen_cli.core.validation import Flag, Positive, Schema, check
from hetegen_cli.models.shapes.experts import check_config_experts

#: architectures tested end to end (greedy tokens equal to transformers' on tiny random models,
#: tests/models/architecture); any other decoder-only causal LM transformers implements with
#: nn.Linear projections is accepted too (docs/models.md, "Architectures")
TESTED_ARCHITECTURES = (
    "opt",
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "phi3",
    "olmo2",
    "granite",
    "smollm3",
    "qwen3_moe",
    "qwen2_moe",
    "mixtral",
    "olmoe",
)

#: activations transformers' ACT2FN knows
ACTIVATIONS = (
    "silu",
    "swish",
    "relu",
    "gelu",
    "gelu_new",
    "gelu_fast",
    "gelu_pytorch_tanh",
    "gelu_python",
    "quick_gelu",
    "relu2",
    "relu6",
    "tanh",
    "sigmoid",
    "mish",
    "leaky_relu",
    "linear",
)

Dim = Annotated[StrictInt, Field(ge=1, le=2**24)]  # widths, heads, vocabulary
Layers = Annotated[StrictInt, Field(ge=1, le=4096)]
Positions = Annotated[StrictInt, Field(ge=1, le=2**24)]
TokenId = Annotated[StrictInt, Field(ge=0, le=2**31)]
_FIX = "fix config.json or fetch it again"


class _Common(Schema):
    """The fields every decoder-only LM's config has, and that hetegen reads itself."""

    model_type: Annotated[StrictStr, Field(min_length=1, max_length=100)]
    hidden_size: Dim
    num_hidden_layers: Layers
    num_attention_heads: Dim
    vocab_size: Dim
    #: absent is fine (the architecture's default), an explicit null is not
    num_key_value_heads: Dim = Field(default=None)
    head_dim: Dim | None = None
    intermediate_size: Dim = Field(default=None)
    rope_theta: Positive | None = None
    rms_norm_eps: Positive | None = None
    layer_norm_eps: Positive | None = None
    hidden_act: Literal[ACTIVATIONS] | None = None  # type: ignore[valid-type]
    activation_function: Literal[ACTIVATIONS] | None = None  # type: ignore[valid-type]
    max_position_embeddings: Positions | None = None
    tie_word_embeddings: Flag | None = None
    bos_token_id: TokenId | list[TokenId] | None = None
    eos_token_id: TokenId | list[TokenId] | None = None
    pad_token_id: TokenId | None = None
    #: 0 means no window: transformers writes it so when use_sliding_window is false (qwen2_moe)
    sliding_window: Annotated[StrictInt, Field(ge=0)] | None = None

    @model_validator(mode="after")
    def _heads_fit(self) -> _Common:
        heads, kv = self.num_attention_heads, self.num_key_value_heads or self.num_attention_heads
        if self.head_dim is None and self.hidden_size % heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {heads}"
            )
        if heads % kv:
            raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
        return self


def validate_config(config: Any, source: str) -> dict[str, Any]:
    """`config` if the fields every decoder-only LM has are usable, else ModelError naming
    `source` (the file or preset) and the first bad field. Whether transformers can build it
    is checked where the shapes are derived (models.architecture)."""
    if not isinstance(config, dict):
        raise ModelError(f"{source} is not a JSON object", _FIX)
    arch = config.get("model_type")
    what = f"a usable {arch} config" if isinstance(arch, str) else "a usable config"
    check(_Common, config, source=f"{source} is not {what}", error=ModelError, hint=_FIX)
    check_config_experts(config, source)
    for key in ("torch_dtype", "dtype"):
        value = config.get(key)
        if value is not None and value not in WEIGHT_DTYPES:
            raise ModelError(
                f"{source}: field {key} is {value!r}; hetegen runs {', '.join(WEIGHT_DTYPES)} weights",
                f"{_FIX}, or pass --dtype",
            )
    return config


def read_config(folder: Path) -> dict[str, Any]:
    """The validated config.json of a model folder."""
    path = folder / "config.json"
    config = read_json(
        path, "config", ModelError, "pass a Hugging Face model folder (config.json, *.safetensors, tokenizer)"
    )
    return validate_config(config, str(path))
