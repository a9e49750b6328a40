"""The engine-cost measurement's models (measure.engine_costs): tiny random checkpoints of
each architecture family it measures (llama, opt; and moe, a Qwen3-MoE, for the quantized
entries only), written to a folder and resolved as `--model FOLDER` would be, with an untied
LM head so the engine can place it as a linear."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hetegen_cli.models.formats.synthetic import RandomPool, tensor_shapes, write_safetensors_streaming
from hetegen_cli.models.loading.source import ModelRef, resolve_model

ARCHITECTURES = ("llama", "opt")  # measured as stock float models and quantized
MOE = "moe"  # a Qwen3-MoE: measured quantized only (a quantized MoE model's CPU decode)


@dataclass(frozen=True)
class TinyShape:
    """The measuring models' shapes (small enough that linears cost little)."""

    hidden: int = 256
    heads: int = 4
    intermediate: int = 512
    vocab: int = 2048
    layers: tuple[int, int] = (1, 6)
    max_positions: int = 2048
    #: the moe family: routed experts per layer, chosen per token (the top-k of Qwen3-30B-A3B
    #: and OLMoE-1B-7B), and each expert's intermediate size
    experts: int = 16
    experts_per_token: int = 8
    expert_intermediate: int = 128

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def tiny_config(arch: str, shape: TinyShape, layers: int) -> dict[str, Any]:
    """A transformers config dict of the measuring model (untied LM head)."""
    common = {
        "hidden_size": shape.hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": shape.heads,
        "vocab_size": shape.vocab,
        "max_position_embeddings": shape.max_positions,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    if arch == MOE:
        return {
            "model_type": "qwen3_moe",
            "architectures": ["Qwen3MoeForCausalLM"],
            "intermediate_size": shape.intermediate,
            "moe_intermediate_size": shape.expert_intermediate,
            "num_experts": shape.experts,
            "num_experts_per_tok": shape.experts_per_token,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "num_key_value_heads": shape.heads,
            "head_dim": shape.head_dim,
            "rope_theta": 10000.0,
            "rms_norm_eps": 1e-6,
            "hidden_act": "silu",
            "attention_bias": False,
            **common,
        }
    if arch == "opt":
        return {
            "model_type": "opt",
            "architectures": ["OPTForCausalLM"],
            "ffn_dim": shape.intermediate,
            "word_embed_proj_dim": shape.hidden,
            "do_layer_norm_before": True,
            "activation_function": "relu",
            "enable_bias": True,
            "pad_token_id": 1,
            **common,
        }
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "intermediate_size": shape.intermediate,
        "num_key_value_heads": shape.heads,
        "head_dim": shape.head_dim,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        **common,
    }


def write_tiny_model(folder: Path, arch: str, shape: TinyShape, layers: int) -> ModelRef:
    """Write a tiny random checkpoint of `arch` into `folder`; its ModelRef (float32)."""
    config = tiny_config(arch, shape, layers)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    pool = RandomPool(torch.Generator().manual_seed(layers), torch.float32)
    write_safetensors_streaming(
        folder / "model.safetensors",
        tensor_shapes(config),
        torch.float32,
        lambda name, s: pool.sample(
            "norm" if "norm" in name else "bias" if name.endswith("bias") else "weight", s
        ),
    )
    return resolve_model(str(folder), need_weights=True)
