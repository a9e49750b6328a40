"""Built-in architecture shapes for common model families (pure data, no weights).

Each preset is a Hugging Face style config dict plus the hub id it stands for, so `plan` and
`bench --synthetic` can work from shapes alone. Values are those of the published config.json
files of these models.
"""

from __future__ import annotations

from typing import Any


def _opt(
    hidden: int,
    layers: int,
    heads: int,
    ffn: int,
    proj_dim: int | None = None,
    layer_norm_before: bool = True,
) -> dict[str, Any]:
    return {
        "model_type": "opt",
        "architectures": ["OPTForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "ffn_dim": ffn,
        "word_embed_proj_dim": proj_dim or hidden,
        "vocab_size": 50272,
        "max_position_embeddings": 2048,
        "do_layer_norm_before": layer_norm_before,
        "activation_function": "relu",
        "enable_bias": True,
        "tie_word_embeddings": True,
        "pad_token_id": 1,
        "bos_token_id": 2,
        "eos_token_id": 2,
        "torch_dtype": "float16",
    }


def _llama(*dims: float, tie: bool = False, dtype: str = "float16", **extra: Any) -> dict[str, Any]:
    """A Llama config; `dims` as _decoder's."""
    base = {"rms_norm_eps": 1e-5, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
    base |= {"bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": tie, "torch_dtype": dtype}
    return _decoder("llama", "LlamaForCausalLM", *dims, **(base | extra))


def _llama3(
    hidden: int, inter: int, layers: int, heads: int, context: int, eos: int, **extra: Any
) -> dict[str, Any]:
    """Llama 3 and 3.1: 8 KV heads, a 128256-token vocabulary, rope theta 500000, bfloat16."""
    return _llama(
        hidden, inter, layers, heads, 8, 128256, context, 500000.0,
        dtype="bfloat16", bos_token_id=128000, eos_token_id=eos, **extra,
    )  # fmt: skip


def _smollm2(
    hidden: int, inter: int, layers: int, heads: int, kv_heads: int, rope_theta: float
) -> dict[str, Any]:
    """SmolLM2: a small Llama with a tied head, vocabulary 49152 and an 8192-token context."""
    return _llama(
        hidden, inter, layers, heads, kv_heads, 49152, 8192, rope_theta,
        tie=True, dtype="bfloat16", bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip


def _decoder(model_type: str, architecture: str, *dims: float, **extra: Any) -> dict[str, Any]:
    """A Llama-shaped decoder of another family (its own model_type's modeling code in
    transformers decides the rest: q/k norms, fused projections, sliding layers, ...).
    `dims` = hidden size, intermediate size, layers, heads, KV heads, vocabulary, context,
    rope theta."""
    hidden, inter, layers, heads, kv_heads, vocab, max_pos, rope_theta = dims
    cfg = {
        "model_type": model_type,
        "architectures": [architecture],
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": max_pos,
        "rope_theta": rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    cfg.update(extra)
    return cfg


_LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _qwen25(hidden: int, inter: int, layers: int, heads: int, kv: int) -> dict[str, Any]:
    return _decoder(
        "qwen2", "Qwen2ForCausalLM", hidden, inter, layers, heads, kv, 152064, 32768, 1000000.0,
        rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645,
    )  # fmt: skip


def _qwen3(hidden: int, inter: int, layers: int, heads: int) -> dict[str, Any]:
    return _decoder(
        "qwen3", "Qwen3ForCausalLM", hidden, inter, layers, heads, 8, 151936, 40960, 1000000.0,
        head_dim=128, rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645,
    )  # fmt: skip


def _gemma3(hidden: int, inter: int, layers: int, heads: int, kv: int, head_dim: int) -> dict[str, Any]:
    """Gemma 3's text decoder (the multimodal checkpoints hold it under language_model): five
    sliding-window layers (1024 tokens) for every global one."""
    types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
    return _decoder(
        "gemma3_text", "Gemma3ForCausalLM", hidden, inter, layers, heads, kv, 262208, 131072, 1000000.0,
        head_dim=head_dim, sliding_window=1024, layer_types=types, tie_word_embeddings=True,
        rope_local_base_freq=10000.0, query_pre_attn_scalar=head_dim, rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh", bos_token_id=2, eos_token_id=1, pad_token_id=0,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
    )  # fmt: skip


def _qwen3_moe(hidden: int, inter: int, moe_inter: int, layers: int, heads: int) -> dict[str, Any]:
    """Qwen3's mixture-of-experts models: 128 experts, 8 per token, 4 KV heads of 128."""
    return _decoder(
        "qwen3_moe", "Qwen3MoeForCausalLM", hidden, inter, layers, heads, 4, 151936, 40960, 1000000.0,
        head_dim=128, moe_intermediate_size=moe_inter, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6,
        bos_token_id=151643, eos_token_id=151645,
    )  # fmt: skip


def _mixtral() -> dict[str, Any]:
    """Mixtral 8x7B: 8 experts of Mistral 7B's MLP, 2 per token."""
    return _decoder(
        "mixtral", "MixtralForCausalLM", 4096, 14336, 32, 32, 8, 32000, 32768, 1000000.0,
        num_local_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-5, sliding_window=None,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


def _olmoe() -> dict[str, Any]:
    """OLMoE-1B-7B (0924): 64 experts of width 1024, 8 per token, q/k norms."""
    return _decoder(
        "olmoe", "OlmoeForCausalLM", 2048, 1024, 16, 16, 16, 50304, 4096, 10000.0,
        num_experts=64, num_experts_per_tok=8, norm_topk_prob=False, rms_norm_eps=1e-5,
        eos_token_id=50279, pad_token_id=1,
    )  # fmt: skip


#: short name -> (hub id, config dict)
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "opt-125m": ("facebook/opt-125m", _opt(768, 12, 12, 3072)),
    "opt-350m": ("facebook/opt-350m", _opt(1024, 24, 16, 4096, proj_dim=512, layer_norm_before=False)),
    "opt-1.3b": ("facebook/opt-1.3b", _opt(2048, 24, 32, 8192)),
    "opt-2.7b": ("facebook/opt-2.7b", _opt(2560, 32, 32, 10240)),
    "opt-6.7b": ("facebook/opt-6.7b", _opt(4096, 32, 32, 16384)),
    "opt-13b": ("facebook/opt-13b", _opt(5120, 40, 40, 20480)),
    "opt-30b": ("facebook/opt-30b", _opt(7168, 48, 56, 28672)),
    "opt-66b": ("facebook/opt-66b", _opt(9216, 64, 72, 36864)),
    "llama-2-7b": ("meta-llama/Llama-2-7b-hf", _llama(4096, 11008, 32, 32, 32, 32000, 4096, 10000.0)),
    "llama-2-13b": ("meta-llama/Llama-2-13b-hf", _llama(5120, 13824, 40, 40, 40, 32000, 4096, 10000.0)),
    "llama-2-70b": ("meta-llama/Llama-2-70b-hf", _llama(8192, 28672, 80, 64, 8, 32000, 4096, 10000.0)),
    "llama-3-8b": ("meta-llama/Meta-Llama-3-8B", _llama3(4096, 14336, 32, 32, 8192, eos=128001)),
    "llama-3-70b": ("meta-llama/Meta-Llama-3-70B", _llama3(8192, 28672, 80, 64, 8192, eos=128001)),
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", _smollm2(576, 1536, 30, 9, 3, 100000.0)),
    "smollm2-360m": ("HuggingFaceTB/SmolLM2-360M-Instruct", _smollm2(960, 2560, 32, 15, 5, 100000.0)),
    "smollm2-1.7b": ("HuggingFaceTB/SmolLM2-1.7B-Instruct", _smollm2(2048, 8192, 24, 32, 32, 130000.0)),
    # --- the models people run in 2026 (shapes from their published config.json files) ---
    "llama-3.1-8b": (
        "meta-llama/Llama-3.1-8B-Instruct",
        _llama3(4096, 14336, 32, 32, 131072, eos=128009, rope_scaling=_LLAMA31_ROPE),
    ),
    "llama-3.1-70b": (
        "meta-llama/Llama-3.1-70B-Instruct",
        _llama3(8192, 28672, 80, 64, 131072, eos=128009, rope_scaling=_LLAMA31_ROPE),
    ),
    "qwen2.5-7b": ("Qwen/Qwen2.5-7B-Instruct", _qwen25(3584, 18944, 28, 28, 4)),
    "qwen2.5-14b": ("Qwen/Qwen2.5-14B-Instruct", _qwen25(5120, 13824, 48, 40, 8)),
    "qwen2.5-32b": ("Qwen/Qwen2.5-32B-Instruct", _qwen25(5120, 27648, 64, 40, 8)),
    "qwen2.5-72b": ("Qwen/Qwen2.5-72B-Instruct", _qwen25(8192, 29568, 80, 64, 8)),
    "qwen3-8b": ("Qwen/Qwen3-8B", _qwen3(4096, 12288, 36, 32)),
    "qwen3-14b": ("Qwen/Qwen3-14B", _qwen3(5120, 17408, 40, 40)),
    "qwen3-32b": ("Qwen/Qwen3-32B", _qwen3(5120, 25600, 64, 64)),
    "gemma-3-12b": ("google/gemma-3-12b-it", _gemma3(3840, 15360, 48, 16, 8, 256)),
    "gemma-3-27b": ("google/gemma-3-27b-it", _gemma3(5376, 21504, 62, 32, 16, 128)),
    "phi-4": (
        "microsoft/phi-4",
        _decoder(
            "phi3",
            "Phi3ForCausalLM",
            5120,
            17920,
            40,
            40,
            10,
            100352,
            16384,
            250000.0,
            rms_norm_eps=1e-5,
            bos_token_id=100257,
            eos_token_id=100265,
            pad_token_id=100349,
        ),
    ),
    "mistral-small-24b": (
        "mistralai/Mistral-Small-24B-Instruct-2501",
        _decoder(
            "mistral",
            "MistralForCausalLM",
            5120,
            32768,
            40,
            32,
            8,
            131072,
            32768,
            100000000.0,
            head_dim=128,
            rms_norm_eps=1e-5,
            sliding_window=None,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    # --- mixture of experts (routed experts computed where they live: docs/models.md) ---
    "qwen3-30b-a3b": ("Qwen/Qwen3-30B-A3B", _qwen3_moe(2048, 6144, 768, 48, 32)),
    "qwen3-235b-a22b": ("Qwen/Qwen3-235B-A22B", _qwen3_moe(4096, 12288, 1536, 94, 64)),
    "mixtral-8x7b": ("mistralai/Mixtral-8x7B-Instruct-v0.1", _mixtral()),
    "olmoe-1b-7b": ("allenai/OLMoE-1B-7B-0924", _olmoe()),
}

#: The model `run` uses when no --model is given (installed from PyPI, see docs/models.md).
DEFAULT_MODEL = "smollm2-135m"


def preset_names() -> list[str]:
    return list(PRESETS)


def preset_config(name: str) -> dict[str, Any]:
    """A copy of the preset's config dict (KeyError if unknown)."""
    return dict(PRESETS[name][1])


def preset_hub_id(name: str) -> str:
    return PRESETS[name][0]
