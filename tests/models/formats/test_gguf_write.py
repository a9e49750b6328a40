"""Synthetic GGUF files (models.formats.gguf_write): what is written, that hetegen reads it back into
int4 exactly, and that hetegen on it computes the model the writer meant (a plain
transformers model built from the same dequantized weights). llama.cpp on the same file:
tests/bench/test_synthetic_gguf.py. The file is the session fixture `tiny_gguf`."""

from __future__ import annotations

import pytest
import torch

from hetegen_cli.core.errors import ModelError
from hetegen_cli.models.formats.gguf_write import (
    llama_gguf_rows,
    synthetic_weights,
    tensor_plan,
    write_llama_gguf,
)
from hetegen_cli.models.shapes import presets
from tests.tiny_models import TINY_GGUF_CONFIG as TINY
from tests.tiny_models import TINY_GGUF_SEED, TINY_GGUF_STD, llama_from_values


def test_the_file_holds_llama_cpp_layout_and_metadata(tiny_gguf):
    from gguf import GGMLQuantizationType, GGUFReader, quants

    path, _, _ = tiny_gguf
    reader = GGUFReader(str(path))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == 2 and field("llama.embedding_length") == 64
    assert field("llama.feed_forward_length") == 128 and field("llama.context_length") == 512
    assert field("llama.attention.head_count") == 4 and field("llama.attention.head_count_kv") == 2
    assert field("llama.rope.freq_base") == 100000.0 and field("llama.rope.dimension_count") == 16
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert field("general.file_type") == 2  # MOSTLY_Q4_0
    assert len(field("tokenizer.ggml.tokens")) == 49152 and field("tokenizer.ggml.model") == "gpt2"
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "output.weight" not in types  # tied head: llama.cpp multiplies by token_embd
    assert types["token_embd.weight"] == "Q8_0" and types["output_norm.weight"] == "F32"
    assert {types[f"blk.1.{n}.weight"] for n in ("attn_q", "attn_k", "ffn_down")} == {"Q4_0"}
    # k rows in llama.cpp's order: convert_hf_to_gguf's permute by the KV heads, written out
    w = dict(synthetic_weights(TINY, TINY_GGUF_SEED, TINY_GGUF_STD))["model.layers.0.self_attn.k_proj.weight"]
    permuted = w.reshape(2, 2, 8, 64).swapaxes(1, 2).reshape(32, 64)  # [kv heads, half, dim/2, in]
    assert torch.equal(w[llama_gguf_rows(32, 2)], permuted)
    stored = next(t for t in reader.tensors if t.name == "blk.0.attn_k.weight").data
    assert (stored == quants.quantize(permuted.numpy(), GGMLQuantizationType.Q4_0)).all()


def test_hetegen_reads_the_file_into_int4_exactly(tiny_gguf):
    from hetegen_cli.models.formats.checkpoint import CheckpointReader
    from hetegen_cli.models.formats.quantized import read_quant_weight
    from hetegen_cli.models.shapes.quantfile import read_quantization

    _, ref, values = tiny_gguf
    doc = read_quantization(ref.path)
    assert ref.spec.quant == "int4" and doc["source"]["linears_exact"] == 14
    assert len(doc["linears"]) == 14 and not doc.get("kept_float")
    cpu = torch.device("cpu")
    with CheckpointReader(ref.path) as reader:
        for name in doc["linears"]:
            got = read_quant_weight(reader, name, doc).dequantize()
            assert torch.equal(got, values[f"{name}.weight"]), name
        for name in (
            "model.embed_tokens.weight",
            "model.norm.weight",
            "model.layers.1.input_layernorm.weight",
        ):
            got = reader.read(reader.key_for(name), torch.float32, cpu)
            assert torch.equal(got, values[name].to(torch.bfloat16).float()), name


def test_hetegen_on_the_file_computes_the_model_the_writer_meant(tiny_gguf):
    """Against transformers in float32 on the writer's dequantized weights: logits within 5 %
    of the largest (measured 1.4 %: bfloat16 activations against float32; the same file
    with q/k rows left unpermuted gave 51 %), and along the reference's 8 greedy tokens
    hetegen picks the same token at every clear choice (top-1 more than 0.1 ahead of top-2:
    1.4 x the largest error measured at a position over six prompts, 0.071; 6 of the 8
    here). Random weights over 49,152 tokens leave many near ties, where bfloat16 rounding
    may pick the runner-up."""
    import random

    from hetegen_cli.models.loading.quantized_loader import load_quantized

    _, ref, values = tiny_gguf
    reference = llama_from_values(TINY, values)
    rng = random.Random(3)
    ids = torch.tensor([[rng.randrange(10, 49152) for _ in range(12)]])
    with load_quantized(ref) as lm, torch.inference_mode():
        got = lm.model(ids).logits.float()
        want = reference(ids).logits
        assert (got - want).abs().max() <= 0.05 * want.abs().max()
        sequence = reference.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=2)
        steps = slice(ids.shape[1] - 1, -1)  # the positions that chose the 8 new tokens
        want = reference(sequence).logits[0, steps]
        got = lm.model(sequence).logits[0, steps].float()
    top2 = want.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.1
    assert torch.equal(want.argmax(-1), sequence[0, ids.shape[1] :])
    assert int(clear.sum()) >= 6
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


def test_untied_heads_and_what_cannot_be_written():
    untied = {**TINY, "tie_word_embeddings": False}
    plan = {t.gguf_name: t for t in tensor_plan(untied, "Q4_1")}
    assert plan["output.weight"].qtype == "Q8_0" and plan["blk.0.ffn_up.weight"].qtype == "Q4_1"
    assert plan["blk.0.attn_q.weight"].permute_heads == 4 and plan["blk.0.attn_k.weight"].permute_heads == 2
    assert plan["blk.0.attn_v.weight"].permute_heads is None
    assert plan["blk.0.ffn_norm.weight"].qtype == "F32"
    assert "output.weight" not in {t.gguf_name for t in tensor_plan(TINY, "Q8_0")}
    with pytest.raises(ModelError, match="LLaMA-family"):
        tensor_plan(presets.preset_config("opt-125m"), "Q4_0")
    with pytest.raises(ModelError, match="cannot write GGUF type 'Q6_K'"):
        tensor_plan(TINY, "Q6_K")
    with pytest.raises(ModelError, match="multiple of 32"):
        tensor_plan({**TINY, "intermediate_size": 100}, "Q4_0")


def _tokenizer():
    from hetegen_cli.models.formats.gguf import default_gguf_path

    try:
        return default_gguf_path()
    except ModelError as exc:
        pytest.skip(f"the tokenizer comes from the default model's GGUF: {exc.message}")


def test_a_vocabulary_the_tokenizer_does_not_match_is_refused(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ModelError, match="49152 tokens, the model's vocabulary 320"):
        write_llama_gguf({**TINY, "vocab_size": 320}, out / "x.gguf", tokenizer_gguf=_tokenizer())
    assert not out.exists() or list(out.iterdir()) == []


def test_an_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    import hetegen_cli.models.formats.gguf_write as gw

    def interrupted(*args, **kwargs):
        yield "model.embed_tokens.weight", torch.zeros(49152, 64)
        raise KeyboardInterrupt

    monkeypatch.setattr(gw, "synthetic_weights", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        write_llama_gguf(TINY, out / "x.gguf", tokenizer_gguf=_tokenizer())
    assert list(out.iterdir()) == []  # the partial file is gone
