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
    config = OPTConfig(
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
