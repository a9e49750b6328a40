"""The hand-written shape table hetegen used before the shapes were derived from transformers'
model (kept here only as the reference the derived specs are checked against)."""

from __future__ import annotations

import math
from typing import Any

from hetegen_cli.core.dtypes import itemsize
from hetegen_cli.models.shapes.spec import LinearSpec, ModelSpec, config_hash, dtype_of


def legacy_spec(config: dict[str, Any], name: str, dtype: str | None = None) -> ModelSpec:
    """Build the spec of a decoder-only LM from its config dict (validated first: ModelError
    names the bad field). `dtype` overrides the config's dtype (the dtype weights run in)."""
    arch = config["model_type"]
    dt = dtype_of(config, dtype)
    nbytes = itemsize(dt)
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads, vocab = config["num_attention_heads"], config["vocab_size"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    max_pos = config.get("max_position_embeddings") or 2048
    tie = bool(config.get("tie_word_embeddings", arch == "opt"))
    linears: list[LinearSpec] = []
    tensors: dict[str, tuple[int, ...]] = {}  # every tensor a checkpoint must hold

    def add(name: str, layer: int, role: str, out: int, inp: int, bias: bool) -> None:
        linears.append(LinearSpec(name, layer, role, out, inp, bias, nbytes))
        tensors[f"{name}.weight"] = (out, inp)
        if bias:
            tensors[f"{name}.bias"] = (out,)

    def norm(prefix: str, bias: bool) -> None:
        tensors[f"{prefix}.weight"] = (hidden,)
        if bias:
            tensors[f"{prefix}.bias"] = (hidden,)

    if arch == "opt":
        ffn = config["ffn_dim"]
        bias = bool(config.get("enable_bias", True))
        affine = bool(config.get("layer_norm_elementwise_affine", True))
        proj = config.get("word_embed_proj_dim") or hidden
        tensors["model.decoder.embed_tokens.weight"] = (vocab, proj)
        tensors["model.decoder.embed_positions.weight"] = (max_pos + 2, hidden)
        if proj != hidden:
            tensors["model.decoder.project_out.weight"] = (proj, hidden)
            tensors["model.decoder.project_in.weight"] = (hidden, proj)
        for i in range(layers):
            p = f"model.decoder.layers.{i}"
            for role, mod in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
                add(f"{p}.self_attn.{mod}", i, role, hidden, hidden, bias)
            if affine:
                norm(f"{p}.self_attn_layer_norm", True)
            add(f"{p}.fc1", i, "fc1", ffn, hidden, bias)
            add(f"{p}.fc2", i, "fc2", hidden, ffn, bias)
            if affine:
                norm(f"{p}.final_layer_norm", True)
        final = config.get("do_layer_norm_before", True) and not config.get("_remove_final_layer_norm")
        if final and affine:
            norm("model.decoder.final_layer_norm", True)
        head = LinearSpec("lm_head", -1, "lm_head", vocab, proj, False, nbytes)
    else:
        inter = config["intermediate_size"]
        # Qwen2 always has q/k/v biases and no o bias, whatever attention_bias says
        attn_bias = arch == "qwen2" or bool(config.get("attention_bias", False))
        mlp_bias = bool(config.get("mlp_bias", False))
        tensors["model.embed_tokens.weight"] = (vocab, hidden)
        for i in range(layers):
            p = f"model.layers.{i}"
            add(f"{p}.self_attn.q_proj", i, "q", heads * head_dim, hidden, attn_bias)
            add(f"{p}.self_attn.k_proj", i, "k", kv_heads * head_dim, hidden, attn_bias)
            add(f"{p}.self_attn.v_proj", i, "v", kv_heads * head_dim, hidden, attn_bias)
            add(f"{p}.self_attn.o_proj", i, "o", hidden, heads * head_dim, arch != "qwen2" and attn_bias)
            add(f"{p}.mlp.gate_proj", i, "gate", inter, hidden, mlp_bias)
            add(f"{p}.mlp.up_proj", i, "up", inter, hidden, mlp_bias)
            add(f"{p}.mlp.down_proj", i, "down", hidden, inter, mlp_bias)
            norm(f"{p}.input_layernorm", False)
            norm(f"{p}.post_attention_layernorm", False)
        norm("model.norm", False)
        head = LinearSpec("lm_head", -1, "lm_head", vocab, hidden, False, nbytes)
    if not tie:
        tensors["lm_head.weight"] = (vocab, head.in_features)
    linear_weights = {f"{lin.name}.weight" for lin in linears} | {"lm_head.weight"}
    fixed = sum(math.prod(shape) for key, shape in tensors.items() if key not in linear_weights)
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
        fixed_bytes=fixed * nbytes,
        config_hash=config_hash(config),
        config=dict(config),
        tensors=tensors,
    )
