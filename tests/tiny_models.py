"""Tiny random OPT / LLaMA checkpoints and a byte-level BPE tokenizer, built locally.

Nothing is downloaded: configs are built in code, weights are random with a fixed seed, saved
with safetensors; the tokenizer is trained with the `tokenizers` library on a small text.
"""

from __future__ import annotations

from pathlib import Path

import torch

_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Once upon a time there was a small model that ran on a small GPU.",
    "hetegen splits every linear layer between the CPU and the GPU.",
    "Memory bandwidth and PCIe bandwidth add up when both sides work at once.",
] * 20

VOCAB_SIZE = 320
#: the tiny OPT: hidden 64, 2 layers, 4 heads, ffn 200 (not a multiple of 16)
TINY_OPT = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    num_hidden_layers=2,
    ffn_dim=200,
    num_attention_heads=4,
    max_position_embeddings=128,
    word_embed_proj_dim=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def build_tokenizer(folder: Path) -> None:
    """Train a byte-level BPE tokenizer (VOCAB_SIZE tokens) and save it into `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.model_input_names = ["input_ids", "attention_mask"]
    fast.save_pretrained(folder)


def build_tiny_opt(
    folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32, tokenizer: bool = True
) -> Path:
    """hidden 64, 2 layers, 4 heads, ffn 200 (not a multiple of 16), vocab 320."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(**TINY_OPT)
    model = OPTForCausalLM(config).to(dtype).eval()
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer:
        build_tokenizer(folder)
    return folder


def build_tiny_llama(
    folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32, tokenizer: bool = True
) -> Path:
    """hidden 64, 2 layers, 4 heads / 2 KV heads (GQA), intermediate 136, vocab 320."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=136,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config).to(dtype).eval()
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer:
        build_tokenizer(folder)
    return folder


# --- a tiny synthetic GGUF (models.formats.gguf_write) ------------------------------------

#: hidden 64, 2 layers, 4 heads / 2 KV heads (GQA: k rows are permuted by the KV heads),
#: intermediate 128, tied head, SmolLM2's vocabulary: the tokenizer is copied from the
#: default model's GGUF, so its 49,152 tokens must be the model's
TINY_GGUF_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 49152,
    "max_position_embeddings": 512,  # llama.cpp warns below its 512-token context
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}
#: matrices ~ N(0, 0.1), not the default 0.02: attention far from uniform and clear greedy
#: choices, so a wrong q/k row order or a wrong rotary base changes the logits
TINY_GGUF_STD = 0.1
TINY_GGUF_SEED = 3


def gguf_stored_values(config: dict, qtype: str, seed: int, std: float) -> dict[str, torch.Tensor]:
    """The values a synthetic GGUF holds, in transformers' layout and float32, computed apart
    from the file: the writer's float weights through gguf's own quantize and dequantize
    (embedding and a separate head Q8_0, the other matrices `qtype`, norms as they are)."""
    from gguf import GGMLQuantizationType, quants

    from hetegen_cli.models.formats.gguf_write import synthetic_weights

    out = {}
    for name, w in synthetic_weights(config, seed, std):
        if w.dim() == 2:
            head = "embed_tokens" in name or name == "lm_head.weight"
            kind = GGMLQuantizationType["Q8_0" if head else qtype]
            w = torch.from_numpy(quants.dequantize(quants.quantize(w.numpy(), kind), kind))
        out[name] = w
    return out


def llama_from_values(config: dict, values: dict[str, torch.Tensor]):
    """transformers' LlamaForCausalLM in float32 holding `values` (a tied head follows)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    skip = ("architectures", "model_type", "torch_dtype")
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k not in skip})).eval()
    missing, unexpected = model.load_state_dict(values, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    model.tie_weights()
    return model


#: a decoder-only model small enough for a test, every width a multiple of 32 (hetegen's CPU
#: kernels take it): the decode-step tests build each architecture from it
TINY_DECODER = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def greedy_steps(model, cache, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """The generated greedy tokens and the logits [V] of a prefill and n one-token steps on
    `cache`, passed under the keyword the installed transformers names."""
    from hetegen_cli.models.loading.cache import cache_keyword

    key, tokens, seen = cache_keyword(model), list(prompt), []
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        for _ in range(n + 1):
            logits = model(input_ids=ids, use_cache=True, **{key: cache}).logits[0, -1]
            seen.append(logits)
            tokens.append(int(logits.argmax()))
            ids = torch.tensor([[tokens[-1]]])
    return tokens[len(prompt) :], seen
