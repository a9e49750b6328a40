"""Model shapes without weights: every linear in execution order, plus the GPU-fixed items.

Pure Python (no torch): built from a validated config dict (config.json or a preset); for a
local folder, models.architecture.folder checks its safetensors headers against `ModelSpec.tensors`.
Linear names are the module names of the stock transformers model, so a plan maps onto it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

from hetegen_cli.core.dtypes import WEIGHT_DTYPES, itemsize
from hetegen_cli.core.errors import InputError, ModelError, UsageError
from hetegen_cli.core.quant import kernel_takes
from hetegen_cli.core.quant import weight_bytes as quant_weight_bytes
from hetegen_cli.models.shapes.experts import ExpertsSpec

#: ModelSpec.quant of a model whose linears are stored in more than one quantized format
MIXED = "mixed"


@dataclass(frozen=True)
class LinearSpec:
    """One nn.Linear: weight shape [out_features, in_features], y = x W^T + b."""

    name: str  # module name in the transformers model, e.g. model.layers.0.mlp.up_proj
    layer_index: int  # decoder layer, or -1 for the LM head
    role: str  # q, k, v, o, fc1, fc2, gate, up, down, lm_head
    out_features: int
    in_features: int
    has_bias: bool
    dtype_bytes: int
    quant: str | None = None  # int8 / int4 when the weight is stored quantized (core.quant)
    group_size: int | None = None  # int4's group

    @property
    def weight_bytes(self) -> int:
        if self.quant is not None:
            return quant_weight_bytes(self.quant, self.out_features, self.in_features, self.group_size or 32)
        return self.out_features * self.in_features * self.dtype_bytes

    @property
    def bias_bytes(self) -> int:
        return self.out_features * self.dtype_bytes if self.has_bias else 0


@dataclass(frozen=True)
class ModelSpec:
    """Shapes of a decoder-only causal LM. Sizes in bytes are at `dtype`."""

    name: str
    architecture: str  # config model_type
    dtype: str  # float16, bfloat16 or float32
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    tie_word_embeddings: bool
    linears: tuple[LinearSpec, ...]  # block linears in execution order
    lm_head: LinearSpec
    fixed_bytes: int  # embeddings, norms, position tables, biases: always on GPU
    config_hash: str
    config: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)
    #: every tensor a checkpoint of this model holds, name -> shape (a tied head omitted)
    tensors: dict[str, tuple[int, ...]] = field(repr=False, compare=False, default_factory=dict)
    #: per decoder layer "sliding_attention" or "full_attention" (None: all full), and the
    #: window of the sliding ones: their KV cache holds at most this many tokens
    layer_types: tuple[str, ...] | None = None
    sliding_window: int | None = None
    #: the routed experts of each mixture-of-experts layer, in layer order (() for a dense
    #: model); their fused tensors are in `tensors` but not in `fixed_bytes`
    experts: tuple[ExpertsSpec, ...] = ()

    @property
    def dtype_bytes(self) -> int:
        return itemsize(self.dtype)

    @property
    def linear_weight_bytes(self) -> int:
        return sum(lin.weight_bytes for lin in self.linears)

    @property
    def expert_weight_bytes(self) -> int:
        """Bytes of every routed expert of every MoE layer (0 for a dense model)."""
        return sum(x.weight_bytes for x in self.experts)

    @property
    def total_weight_bytes(self) -> int:
        head = 0 if self.tie_word_embeddings else self.lm_head.weight_bytes
        return self.fixed_bytes + self.linear_weight_bytes + head + self.expert_weight_bytes

    def kv_cache_bytes(self, tokens: int, batch_size: int = 1) -> int:
        """K and V of every layer for `tokens` tokens: 2 * kv_heads * head_dim * batch * bytes per
        token and layer; a sliding-window layer holds at most `sliding_window` tokens."""
        per_token = 2 * self.num_kv_heads * self.head_dim * batch_size * self.dtype_bytes
        if self.layer_types is None or self.sliding_window is None:
            return per_token * self.num_layers * tokens
        window = self.sliding_window
        held = [min(tokens, window) if t == "sliding_attention" else tokens for t in self.layer_types]
        return per_token * sum(held)

    def in_dtype(self, dtype: str) -> ModelSpec:
        """This spec with its floating-point weights in `dtype` (a quantized linear keeps its
        format); every other tensor changes dtype too."""
        if dtype == self.dtype:
            return self
        nbytes = itemsize(dtype)
        return replace(
            self,
            dtype=dtype,
            linears=tuple(replace(lin, dtype_bytes=nbytes) for lin in self.linears),
            lm_head=replace(self.lm_head, dtype_bytes=nbytes),
            fixed_bytes=self.fixed_bytes // self.dtype_bytes * nbytes,
            experts=tuple(replace(x, dtype_bytes=nbytes) for x in self.experts),
        )

    def check_context(self, prompt_tokens: int, max_new_tokens: int, prompt_what: str = "prompt") -> None:
        """InputError if prompt + new tokens exceed this model's context (max_positions)."""
        check_context(prompt_tokens, max_new_tokens, self.max_positions, prompt_what, self.name)

    @property
    def parameter_count(self) -> int:
        """Parameters stored (a tied LM head counted once)."""
        return sum(math.prod(shape) for shape in self.tensors.values())

    @property
    def active_parameter_count(self) -> int:
        """Parameters one token uses: all of them less the routed experts it does not choose
        (E - top_k per MoE layer); equal to parameter_count for a dense model."""
        unused = sum((x.num_experts - x.top_k) * x.expert_parameters for x in self.experts)
        return self.parameter_count - unused

    @property
    def quant(self) -> str | None:
        """The quantized format of the block linears and routed experts: int8 or int4, MIXED
        when they are in several (a GGUF Q4_K_M: int4 and int8 linears), None for floating
        point."""
        formats = self.quant_formats
        if not formats:
            return None
        return formats[0] if len(formats) == 1 else MIXED

    @property
    def quant_formats(self) -> tuple[str, ...]:
        """The distinct formats of the quantized linears and expert parts, sorted (() for a
        float model)."""
        experts = {fmt for x in self.experts for fmt in x.quant_formats}
        return tuple(sorted({lin.quant for lin in self.linears if lin.quant} | experts))

    @property
    def quant_label(self) -> str | None:
        """'int8', 'int4-g32' (format and group), 'int4-g32+int8' for a mixed model (each
        (format, group) present among the linears and the routed experts, sorted), or None
        for a float model. `experts_quant_label` says how the experts alone are stored."""
        pairs = set(self.quant_map().values())
        pairs |= {q for x in self.experts for q in x.part_quant if q}
        labels = sorted({fmt if fmt == "int8" else f"{fmt}-g{group}" for fmt, group in pairs})
        return "+".join(labels) or None

    @property
    def experts_quant_label(self) -> str | None:
        """How the routed experts are stored: 'int4-g32', 'int8', 'int4-g32+int8', or None
        when they are floating point (or the model has none)."""
        labels = {x.quant_label for x in self.experts} - {None}
        return "+".join(sorted({part for label in labels for part in label.split("+")})) or None

    def quant_map(self) -> dict[str, tuple[str, int]]:
        """{linear name: (format, group size)} of the quantized linears ({} for a float model)."""
        return {lin.name: (lin.quant, lin.group_size or 32) for lin in self.linears if lin.quant}

    def expert_quant_map(self) -> dict[str, tuple]:
        """{experts module: each part's (format, group) or None} of the MoE layers whose
        experts are stored quantized ({} otherwise)."""
        return {x.name: x.part_quant for x in self.experts if x.part_quant}

    def with_expert_quant(self, formats: dict[str, tuple]) -> ModelSpec:
        """This spec with the experts of each module named in `formats` stored as its parts'
        (format, group) or None, and every other MoE layer's experts floating point."""
        return replace(
            self, experts=tuple(replace(x, part_quant=tuple(formats.get(x.name, ()))) for x in self.experts)
        )

    def with_quant_map(self, formats: dict[str, tuple[str, int]]) -> ModelSpec:
        """This spec with each block linear named in `formats` stored as its (format, group
        size) and every other one floating point: the linears of a mixed model each in their
        own format (models.shapes.quantfile)."""

        def pick(lin: LinearSpec) -> LinearSpec:
            if lin.name not in formats:
                return replace(lin, quant=None, group_size=None)
            fmt, group = formats[lin.name]
            return replace(lin, quant=fmt, group_size=group if fmt == "int4" else None)

        return replace(self, linears=tuple(pick(lin) for lin in self.linears))

    def quantized(self, fmt: str, group_size: int, names: set[str] | None = None) -> ModelSpec:
        """This spec with the block linears in `names` (default: every one the CPU kernel
        takes, core.quant.kernel_takes) stored as `fmt`, and every routed expert's parts the
        kernel takes (ExpertsSpec.quantized); the LM head stays floating point."""

        def pick(lin: LinearSpec) -> LinearSpec:
            takes = kernel_takes(fmt, lin.out_features, lin.in_features, group_size)
            chosen = lin.name in names if names is not None else takes
            return (
                replace(lin, quant=fmt, group_size=group_size if fmt == "int4" else None) if chosen else lin
            )

        return replace(
            self,
            linears=tuple(pick(lin) for lin in self.linears),
            experts=tuple(x.quantized(fmt, group_size) for x in self.experts),
        )


_HASH_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "ffn_dim",
    "vocab_size",
    "word_embed_proj_dim",
    "tie_word_embeddings",
    "head_dim",
    "num_experts",
    "num_local_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
)


def config_hash(config: dict[str, Any]) -> str:
    """A short hash of the shape-defining config keys: equal for equal architectures."""
    picked = {k: config.get(k) for k in _HASH_KEYS if config.get(k) is not None}
    text = json.dumps(picked, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def dtype_of(config: dict[str, Any], override: str | None) -> str:
    """The dtype weights run in: `override`, else the config's, else float32."""
    dtype = override or config.get("torch_dtype") or config.get("dtype") or "float32"
    if dtype not in WEIGHT_DTYPES:
        raise ModelError(f"unsupported weight dtype {dtype!r}", "use float16, bfloat16 or float32 (--dtype)")
    return dtype


def spec_from_layout(
    layout: dict[str, Any], config: dict[str, Any], name: str, dtype: str | None = None
) -> ModelSpec:
    """The spec of a model from its layout (models.architecture.derive) and config; `dtype`
    overrides the config's (the dtype weights run in)."""
    dt = dtype_of(config, dtype)
    nbytes = itemsize(dt)
    linears = tuple(
        LinearSpec(lin_name, layer, role, out, inp, bool(bias), nbytes)
        for lin_name, layer, role, out, inp, bias in layout["linears"]
    )
    head_name, head_out, head_in, head_bias = layout["head"]
    head = LinearSpec(head_name, -1, "lm_head", head_out, head_in, bool(head_bias), nbytes)
    tensors = {k: tuple(v) for k, v in layout["tensors"].items()}
    experts = tuple(
        ExpertsSpec(x_name, layer, count, top_k, hidden, width, nbytes)
        for x_name, layer, count, top_k, hidden, width in layout.get("experts", ())
    )
    planned = {f"{lin.name}.weight" for lin in linears} | {f"{head_name}.weight"}
    planned |= {key for x in experts for key in x.tensors}
    fixed = sum(math.prod(shape) for key, shape in tensors.items() if key not in planned)
    types = layout.get("layer_types")
    return ModelSpec(
        name=name,
        architecture=layout["architecture"],
        dtype=dt,
        hidden_size=layout["hidden_size"],
        num_layers=layout["num_layers"],
        num_heads=layout["num_heads"],
        num_kv_heads=layout["num_kv_heads"],
        head_dim=layout["head_dim"],
        vocab_size=layout["vocab_size"],
        max_positions=layout["max_positions"],
        tie_word_embeddings=layout["tie_word_embeddings"],
        linears=linears,
        lm_head=head,
        fixed_bytes=fixed * nbytes,
        config_hash=config_hash(config),
        config=dict(config),
        tensors=tensors,
        layer_types=tuple(types) if types is not None else None,
        sliding_window=layout.get("sliding_window"),
        experts=experts,
    )


def check_context(
    prompt_tokens: int,
    max_new_tokens: int,
    limit: int | None,
    prompt_what: str = "prompt",
    model: str = "the model",
) -> None:
    """InputError if prompt + new tokens exceed `model`'s context `limit` (None: unknown).

    `prompt_what` names what set the prompt length ("prompt", or "--prompt-len").
    """
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {max_new_tokens} is below 1", "ask for at least 1 token")
    if limit is None or prompt_tokens + max_new_tokens <= limit:
        return
    room = limit - prompt_tokens
    if prompt_what == "prompt":
        hint = f"use --max-new-tokens {room} or less" if room >= 1 else "shorten the prompt"
    else:
        hint = f"lower {prompt_what} or --max-new-tokens"
    plural = "s" if prompt_tokens != 1 else ""
    raise InputError(
        f"{prompt_what} ({prompt_tokens} token{plural}) + --max-new-tokens "
        f"({max_new_tokens}) = {prompt_tokens + max_new_tokens} exceeds the context "
        f"of {model} ({limit} tokens)",
        hint,
    )
