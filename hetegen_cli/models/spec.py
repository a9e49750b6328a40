"""Model shapes without weights: every linear in execution order, plus the GPU-fixed items.

Pure Python (no torch): built from a config dict (config.json or a preset) and, for local
folders, checked against the safetensors headers, which are read without touching weight bytes.
Linear names are the module names of the stock transformers model, so a plan maps onto it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hetegen_cli.core.dtypes import WEIGHT_DTYPES, itemsize
from hetegen_cli.core.errors import InputError, ModelError
from hetegen_cli.models.headers import folder_tensor_index

SUPPORTED_ARCHITECTURES = ("opt", "llama", "mistral", "qwen2")


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

    @property
    def weight_bytes(self) -> int:
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

    @property
    def dtype_bytes(self) -> int:
        return itemsize(self.dtype)

    @property
    def linear_weight_bytes(self) -> int:
        return sum(lin.weight_bytes for lin in self.linears)

    @property
    def total_weight_bytes(self) -> int:
        head = 0 if self.tie_word_embeddings else self.lm_head.weight_bytes
        return self.fixed_bytes + self.linear_weight_bytes + head

    def kv_cache_bytes(self, tokens: int, batch_size: int = 1) -> int:
        """K and V for every layer: 2 * layers * kv_heads * head_dim * tokens * batch * bytes."""
        return (
            2 * self.num_layers * self.num_kv_heads * self.head_dim * tokens * batch_size * self.dtype_bytes
        )

    def check_context(self, prompt_tokens: int, max_new_tokens: int, prompt_what: str = "prompt") -> None:
        """InputError if prompt + new tokens exceed this model's context (max_positions)."""
        check_context(prompt_tokens, max_new_tokens, self.max_positions, prompt_what, self.name)

    @property
    def parameter_count(self) -> int:
        return self.total_weight_bytes // self.dtype_bytes


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
)


def config_hash(config: dict[str, Any]) -> str:
    """A short hash of the shape-defining config keys: equal for equal architectures."""
    picked = {k: config.get(k) for k in _HASH_KEYS if config.get(k) is not None}
    text = json.dumps(picked, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _dtype_of(config: dict[str, Any], override: str | None) -> str:
    dtype = override or config.get("torch_dtype") or config.get("dtype") or "float32"
    if dtype not in WEIGHT_DTYPES:
        raise ModelError(f"unsupported weight dtype {dtype!r}", "use float16, bfloat16 or float32 (--dtype)")
    return dtype


def spec_from_config(config: dict[str, Any], name: str, dtype: str | None = None) -> ModelSpec:
    """Build the spec of a decoder-only LM from its config dict.

    `dtype` overrides the config's torch_dtype (the dtype the weights are run in).
    """
    arch = config.get("model_type")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"model {name!r} has architecture {arch!r}, which hetegen does not support",
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)} (decoder-only LMs with nn.Linear projections)",
        )
    dt = _dtype_of(config, dtype)
    nbytes = itemsize(dt)
    try:
        hidden = int(config["hidden_size"])
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        vocab = int(config["vocab_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"config of {name!r} lacks {exc}", "check its config.json") from exc
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    max_pos = int(config.get("max_position_embeddings") or 2048)
    tie = bool(config.get("tie_word_embeddings", arch == "opt"))
    linears: list[LinearSpec] = []

    def lin(n: str, i: int, role: str, out: int, inp: int, bias: bool) -> None:
        linears.append(LinearSpec(n, i, role, out, inp, bias, nbytes))

    fixed = vocab * hidden * nbytes  # token embeddings
    if arch == "opt":
        ffn = int(config["ffn_dim"])
        bias = bool(config.get("enable_bias", True))
        proj = int(config.get("word_embed_proj_dim") or hidden)
        fixed = vocab * proj * nbytes + (max_pos + 2) * hidden * nbytes
        if proj != hidden:
            fixed += 2 * proj * hidden * nbytes  # project_in / project_out
        for i in range(layers):
            p = f"model.decoder.layers.{i}"
            for role, mod in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
                lin(f"{p}.self_attn.{mod}", i, role, hidden, hidden, bias)
            lin(f"{p}.fc1", i, "fc1", ffn, hidden, bias)
            lin(f"{p}.fc2", i, "fc2", hidden, ffn, bias)
            fixed += 4 * hidden * nbytes  # two layer norms, weight + bias
        fixed += 2 * hidden * nbytes  # final layer norm
        head = LinearSpec("lm_head", -1, "lm_head", vocab, proj, False, nbytes)
    else:
        inter = int(config["intermediate_size"])
        attn_bias = bool(config.get("attention_bias", arch == "qwen2"))
        mlp_bias = bool(config.get("mlp_bias", False))
        for i in range(layers):
            p = f"model.layers.{i}"
            lin(f"{p}.self_attn.q_proj", i, "q", heads * head_dim, hidden, attn_bias)
            lin(f"{p}.self_attn.k_proj", i, "k", kv_heads * head_dim, hidden, attn_bias)
            lin(f"{p}.self_attn.v_proj", i, "v", kv_heads * head_dim, hidden, attn_bias)
            lin(f"{p}.self_attn.o_proj", i, "o", hidden, heads * head_dim, arch != "qwen2" and attn_bias)
            lin(f"{p}.mlp.gate_proj", i, "gate", inter, hidden, mlp_bias)
            lin(f"{p}.mlp.up_proj", i, "up", inter, hidden, mlp_bias)
            lin(f"{p}.mlp.down_proj", i, "down", hidden, inter, mlp_bias)
            fixed += 2 * hidden * nbytes  # two RMS norms
        fixed += hidden * nbytes
        head = LinearSpec("lm_head", -1, "lm_head", vocab, hidden, False, nbytes)
    fixed += sum(lin.bias_bytes for lin in linears)
    return ModelSpec(
        name=name,
        architecture=arch,
        dtype=dt,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        max_positions=max_pos,
        tie_word_embeddings=tie,
        linears=tuple(linears),
        lm_head=head,
        fixed_bytes=fixed,
        config_hash=config_hash(config),
        config=dict(config),
    )


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelError(
            f"model folder {folder} has no config.json",
            "pass a Hugging Face model folder (config.json, *.safetensors, tokenizer)",
        ) from exc
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"{path} is not readable JSON ({exc})", "restore or re-download config.json"
        ) from exc
    if not isinstance(config, dict):
        raise ModelError(f"{path} is not a JSON object", "restore or re-download config.json")
    return config


def spec_from_folder(folder: Path, name: str | None = None, dtype: str | None = None) -> ModelSpec:
    """Spec of a local folder, with linear shapes checked against its safetensors headers.

    The dtype defaults to the dtype of the stored weights.
    """
    config = read_config(folder)
    index = folder_tensor_index(folder)
    if not index:
        raise ModelError(
            f"model folder {folder} has no *.safetensors weights",
            "hetegen loads safetensors only (never pickles); convert the checkpoint "
            "with transformers' save_pretrained(safe_serialization=True)",
        )
    stored = {dt for (_, dt, _) in index.values() if dt in WEIGHT_DTYPES}
    if dtype is None and len(stored) == 1:
        dtype = stored.pop()
    spec = spec_from_config(config, name or str(folder), dtype)
    for linear in spec.linears:
        key = f"{linear.name}.weight"
        if key not in index:
            raise ModelError(
                f"{folder} lacks tensor {key}",
                "the checkpoint does not match its config.json; re-download it",
            )
        shape = index[key][2]
        if shape != (linear.out_features, linear.in_features):
            raise ModelError(
                f"{key} has shape {list(shape)}, config says {[linear.out_features, linear.in_features]}",
                "the checkpoint does not match its config.json",
            )
    return spec


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
        raise InputError(f"--max-new-tokens {max_new_tokens} is below 1", "ask for at least 1 token")
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
