"""What synthetic mixture-of-experts GGUF files hold beyond a LLaMA file's (models.formats.
gguf_write): the GGUF architecture of each MoE model type, its `expert_*` metadata, and the
routed experts as llama.cpp's converter writes them, one 3-D tensor per part and layer
(`blk.N.ffn_gate_exps`, `ffn_up_exps` [E, I, H] and `ffn_down_exps` [E, H, I], transformers'
fused `gate_up_proj` split in two). Tests build tiny MoE GGUF files with it; hetegen's converter
reads them back expert by expert (models.formats.gguf_quant).
"""

from __future__ import annotations

from typing import Any

import torch

#: transformers model_type -> the GGUF architecture llama.cpp writes it as (Mixtral: a llama
#: file with experts)
MOE_GGUF_ARCHS = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe"}
#: GGUF types the experts may be written in (K-quants need inputs in multiples of 256)
EXPERT_TYPES = ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K")


def gguf_arch(model_type: str) -> str:
    """The GGUF architecture a config of `model_type` is written as."""
    return MOE_GGUF_ARCHS.get(model_type, model_type)


def expert_tensors(name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...], str | None]] | None:
    """(GGUF name, shape, part) of the GGUF tensors holding transformers' fused expert tensor
    `name` (part: which half of `gate_up_proj`, None for the whole); None for another tensor."""
    base, _, attr = name.rpartition(".")
    if not base.endswith(".experts") or attr not in ("gate_up_proj", "down_proj"):
        return None
    layer = base.split(".")[2]  # model.layers.N.mlp.experts
    if attr == "down_proj":
        return [(f"blk.{layer}.ffn_down_exps.weight", shape, None)]
    e, two_i, h = shape
    half = (e, two_i // 2, h)
    return [
        (f"blk.{layer}.ffn_gate_exps.weight", half, "gate"),
        (f"blk.{layer}.ffn_up_exps.weight", half, "up"),
    ]


def is_router(name: str) -> bool:
    """A MoE router's weight or Qwen2-MoE's shared-expert gate: written in F32, as llama.cpp
    keeps them."""
    return name.endswith((".mlp.gate.weight", ".shared_expert_gate.weight"))


def part_values(values: torch.Tensor, part: str | None) -> torch.Tensor:
    """The values one GGUF tensor holds of transformers' tensor `values`."""
    if part is None:
        return values
    half = values.shape[1] // 2
    return values[:, :half] if part == "gate" else values[:, half:]


def add_moe_metadata(writer: Any, config: dict[str, Any]) -> None:
    """The `{arch}.expert_*` keys of a MoE config (nothing for a dense one), and the head
    dimension Qwen3-MoE reads from `attention.key_length`."""
    model_type = config.get("model_type")
    if model_type not in MOE_GGUF_ARCHS:
        return
    count = config.get("num_experts") or config.get("num_local_experts")
    writer.add_expert_count(int(count))
    writer.add_expert_used_count(int(config["num_experts_per_tok"]))
    if config.get("moe_intermediate_size"):
        writer.add_expert_feed_forward_length(int(config["moe_intermediate_size"]))
    if config.get("shared_expert_intermediate_size"):
        writer.add_expert_shared_feed_forward_length(int(config["shared_expert_intermediate_size"]))
    if model_type != "mixtral" and "norm_topk_prob" in config:
        writer.add_expert_weights_norm(bool(config["norm_topk_prob"]))
    if model_type == "qwen3_moe" and config.get("head_dim"):
        writer.add_key_length(int(config["head_dim"]))
        writer.add_value_length(int(config["head_dim"]))
