"""config.json: read it, and check every field hetegen or transformers reads for the supported
architectures (presence, type, range, divisibility) before anything is built from it.

Pure Python (no torch). Errors are ModelError naming the file and the field
(docs/validation.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, StrictInt, model_validator

from hetegen_cli.core.dtypes import WEIGHT_DTYPES
from hetegen_cli.core.errors import ModelError
from hetegen_cli.core.jsonio import read_json
from hetegen_cli.core.validation import Flag, Positive, Schema, check

SUPPORTED_ARCHITECTURES = ("opt", "llama", "mistral", "qwen2")
#: activations transformers' ACT2FN knows that the supported architectures use
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
    model_type: Literal["opt", "llama", "mistral", "qwen2"]
    hidden_size: Dim
    num_hidden_layers: Layers
    num_attention_heads: Dim
    vocab_size: Dim
    max_position_embeddings: Positions | None = None
    tie_word_embeddings: Flag | None = None
    bos_token_id: TokenId | list[TokenId] | None = None
    eos_token_id: TokenId | list[TokenId] | None = None
    pad_token_id: TokenId | None = None


class OptConfig(_Common):
    ffn_dim: Dim
    word_embed_proj_dim: Dim | None = None
    enable_bias: Flag | None = None
    do_layer_norm_before: Flag | None = None
    layer_norm_elementwise_affine: Flag | None = None
    activation_function: Literal[ACTIVATIONS] | None = None  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> OptConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        return self


class LlamaConfig(_Common):
    intermediate_size: Dim
    num_key_value_heads: Dim | None = None
    head_dim: Dim | None = None
    rms_norm_eps: Positive | None = None
    rope_theta: Positive | None = None
    hidden_act: Literal[ACTIVATIONS] | None = None  # type: ignore[valid-type]
    attention_bias: Flag | None = None
    mlp_bias: Flag | None = None
    rope_scaling: dict[str, Any] | None = None
    sliding_window: Annotated[StrictInt, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _heads_fit(self) -> LlamaConfig:
        heads, kv = self.num_attention_heads, self.num_key_value_heads or self.num_attention_heads
        if self.head_dim is None and self.hidden_size % heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {heads}"
            )
        if heads % kv:
            raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
        return self


def validate_config(config: Any, source: str) -> dict[str, Any]:
    """`config` if it is a usable config of a supported architecture, else ModelError naming
    `source` (the file or preset) and the first bad field."""
    if not isinstance(config, dict):
        raise ModelError(f"{source} is not a JSON object", _FIX)
    arch = config.get("model_type")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"{source} has architecture (model_type) {arch!r}, which hetegen does not support",
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)} (decoder-only LMs with nn.Linear projections)",
        )
    schema = OptConfig if arch == "opt" else LlamaConfig
    check(schema, config, source=f"{source} is not a usable {arch} config", error=ModelError, hint=_FIX)
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
