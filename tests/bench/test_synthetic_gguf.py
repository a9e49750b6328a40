"""`bench --synthetic PRESET` written as one GGUF for hetegen and llama.cpp: the option rules,
llama.cpp computing the model the writer meant (where llama-cpp-python is installed), and the
whole bench on a tiny preset."""

from __future__ import annotations

import json

import pytest
import torch

from hetegen_cli.bench import runner
from hetegen_cli.core.errors import UsageError
from hetegen_cli.models.shapes import presets
from tests.fakes import make_profile
from tests.helpers import ACTIVATIONS, bench_options
from tests.tiny_models import TINY_GGUF_CONFIG, llama_from_values

PROMPT = [504, 3575, 282, 4649, 314, 100, 2000, 30000, 7, 9, 11, 13]


def test_when_the_synthetic_model_is_a_gguf():
    gguf = lambda **kw: bench_options(synthetic="smollm2-1.7b", **kw).synthetic_gguf_type()  # noqa: E731
    assert gguf() is None and gguf(arms=("reference", "cpu")) is None  # safetensors, as before
    assert gguf(arms=("reference", "llama.cpp"), quant="int4") == "Q4_0"
    assert gguf(arms=("llama.cpp",)) == "Q4_0"  # --quant auto: the GGUF's own int4
    assert gguf(arms=("llama.cpp",), quant="int8") == "Q8_0"
    assert gguf(synthetic_format="gguf-q4_1") == "Q4_1"  # every arm, llama.cpp included
    assert gguf(synthetic_format="gguf-q4_k_m") == "Q4_K_M"  # llama-quantize's K-quant mix
    assert gguf(arms=("llama.cpp",), synthetic_format="safetensors") is None
    assert bench_options(model="x.gguf", arms=("llama.cpp",)).synthetic_gguf_type() is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"synthetic": "opt-1.3b", "synthetic_format": "gguf-q4_0"}, "LLaMA-family presets only"),
        ({"synthetic": "opt-1.3b", "arms": ("llama.cpp",), "quant": "int4"}, "llama.cpp arm runs GGUF"),
        ({"synthetic": "llama-2-7b", "synthetic_format": "gguf-q8_0"}, "has a vocabulary of 32000"),
        ({"synthetic_format": "gguf-q4_0"}, "needs --synthetic"),
        ({"synthetic": "smollm2-1.7b", "synthetic_format": "gguf-q6_k"}, "unknown --synthetic-format"),
    ],
)
def test_combinations_that_cannot_work_are_refused(kwargs, message):
    with pytest.raises(UsageError, match=message) as info:
        bench_options(**kwargs)
    assert info.value.hint  # one line and a hint, never a traceback


def test_an_opt_preset_without_llama_cpp_stays_safetensors():
    assert bench_options(synthetic="opt-1.3b", quant="int4").synthetic_gguf_type() is None


def _llama_cpp_logits(path, ids):
    """llama.cpp's logits [len(ids), V], one token evaluated at a time (as decode does)."""
    from hetegen_cli.bench.llama_cpp import last_logits, load_llama_cpp

    with load_llama_cpp(path, None, threads=2, n_ctx=512) as lm:
        llm = lm.model.llm
        llm.reset()
        rows = []
        for token in ids:
            llm.eval([token])
            rows.append(last_logits(llm))
    return torch.stack(rows)


def test_llama_cpp_computes_the_model_the_writer_meant(tiny_gguf, tmp_path, monkeypatch):
    """llama.cpp, transformers on the writer's dequantized weights and hetegen agree within
    6 % of the largest logit (measured: 2.2 % llama.cpp against transformers, 2.9 % against
    hetegen, 1.9 % hetegen against transformers; llama.cpp multiplies with 8-bit activations,
    hetegen with bfloat16), with the same argmax at every position. The same file with q/k
    rows not permuted: 66 % off."""
    pytest.importorskip("llama_cpp")
    from hetegen_cli.models.formats import gguf_write
    from hetegen_cli.models.loading.quantized_loader import load_quantized

    path, ref, values = tiny_gguf
    llama = _llama_cpp_logits(path, PROMPT)
    ids = torch.tensor([PROMPT])
    with load_quantized(ref) as lm, torch.inference_mode():
        hetegen = lm.model(ids).logits[0].float()
        want = llama_from_values(TINY_GGUF_CONFIG, values)(ids).logits[0]
    tolerance = 0.06 * want.abs().max()
    assert (llama - want).abs().max() <= tolerance
    assert (llama - hetegen).abs().max() <= tolerance
    assert torch.equal(llama.argmax(-1), want.argmax(-1))

    # the check can fail: rows left in transformers' order are a different model to llama.cpp
    monkeypatch.setattr(gguf_write, "llama_gguf_rows", lambda out, heads: torch.arange(out))
    from hetegen_cli.models.formats.gguf import default_gguf_path
    from tests.tiny_models import TINY_GGUF_SEED, TINY_GGUF_STD

    wrong = gguf_write.write_llama_gguf(
        TINY_GGUF_CONFIG,
        tmp_path / "unpermuted.gguf",
        seed=TINY_GGUF_SEED,
        std=TINY_GGUF_STD,
        tokenizer_gguf=default_gguf_path(),
    )
    assert (_llama_cpp_logits(wrong, PROMPT) - want).abs().max() > 4 * tolerance


def test_bench_runs_hetegen_and_llama_cpp_on_one_gguf(tiny_gguf, tmp_path, monkeypatch):
    """The whole bench on a tiny LLaMA preset: hetegen's int4 copy of the synthetic GGUF in
    `reference`, llama.cpp on the file itself (skipped where it is not installed). The file
    and its conversion are the session's (`tiny_gguf`), found where bench looks for them:
    reused, not written again."""
    from hetegen_cli.bench import prepare
    from hetegen_cli.bench.llama_cpp import LLAMA_MISSING, llama_cpp_available
    from tests.tiny_models import TINY_GGUF_SEED

    path, _, _ = tiny_gguf
    written = path.stat().st_mtime_ns
    monkeypatch.setitem(presets.PRESETS, "tiny-gguf", ("none/tiny-gguf", dict(TINY_GGUF_CONFIG)))
    monkeypatch.setattr(prepare, "_synthetic_root", lambda: path.parent)
    monkeypatch.setenv("HETEGEN_HOME", str(path.parent / "home"))
    profile = tmp_path / "profile.json"
    profile.write_text(
        json.dumps(make_profile(gpu=False, threads=2, best="float32", cpu_dtypes={"float32": 50e9}))
    )
    options = bench_options(
        synthetic="tiny-gguf",
        quant="int4",
        profile=profile,
        prompt_len=8,
        max_new_tokens=4,
        repeat=1,
        warmup=1,
        seed=TINY_GGUF_SEED,
        arms=("reference", "llama.cpp"),
    )
    assert options.synthetic_gguf_type() == "Q4_0"
    doc = runner.run_bench(options)
    assert path.stat().st_mtime_ns == written  # written once
    model = doc["model"]
    assert model["kind"] == "synthetic" and model["format"] == "gguf-q4_0" and model["gguf"] == str(path)
    arms = {a["arm"]: a for a in doc["budgets"][0]["arms"]}
    ref, llama = arms["reference"], arms["llama.cpp"]
    assert ref["status"] == "ok" and ref["info"]["compute_dtype"] == f"int4+{ACTIVATIONS}"
    if not llama_cpp_available():
        assert llama["status"] == "skipped" and llama["reason"] == LLAMA_MISSING
        return
    assert llama["status"] == "ok", llama.get("reason")
    assert llama["info"]["config"]["gguf"] == str(path)
    assert max(abs(v) for v in llama["logits"]["top1_logits"]) > 0  # real logits, not zeros
    assert llama["token_check"]["compared_with"] == "reference" and llama["token_check"]["verified"]
    assert ref["ratios"]["vs_llama_cpp"]["decode_tokens_per_s"] > 0


def test_bench_on_a_synthetic_q4_k_m_file(tmp_path, monkeypatch):
    """`--synthetic-format gguf-q4_k_m`: one Q4_K_M-layout file (Q4_K, Q6_K for layer 1's
    attn_v and ffn_down), written once; hetegen's arm runs its mixed int4/int8 conversion,
    llama.cpp the file (skipped where it is not installed; then the file's blocks are checked
    against gguf's decoder in tests/models/formats/test_gguf_kquants.py)."""
    from hetegen_cli.bench import prepare
    from hetegen_cli.bench.llama_cpp import llama_cpp_available
    from hetegen_cli.models.formats.gguf import default_gguf_path
    from tests.models.formats.test_gguf_kquants import KQ_CONFIG

    try:
        default_gguf_path()
    except Exception as exc:
        pytest.skip(f"the tokenizer comes from the default model's GGUF: {exc}")
    monkeypatch.setitem(presets.PRESETS, "tiny-kq", ("none/tiny-kq", dict(KQ_CONFIG)))
    monkeypatch.setattr(prepare, "_synthetic_root", lambda: tmp_path / "synthetic")
    monkeypatch.setenv("HETEGEN_HOME", str(tmp_path / "home"))  # not the shared cache of conversions
    profile = tmp_path / "profile.json"
    profile.write_text(
        json.dumps(make_profile(gpu=False, threads=2, best="float32", cpu_dtypes={"float32": 50e9}))
    )
    options = bench_options(
        synthetic="tiny-kq",
        synthetic_format="gguf-q4_k_m",
        profile=profile,
        prompt_len=8,
        max_new_tokens=4,
        repeat=1,
        warmup=0,
        arms=("reference", "llama.cpp"),
    )
    doc = runner.run_bench(options)
    model = doc["model"]
    assert model["format"] == "gguf-q4_k_m" and model["gguf"].endswith("synthetic-tiny-kq-q4_k_m-seed0.gguf")
    arms = {a["arm"]: a for a in doc["budgets"][0]["arms"]}
    ref = arms["reference"]
    assert ref["status"] == "ok" and ref["info"]["compute_dtype"] == f"int4+int8+{ACTIVATIONS}"
    llama = arms["llama.cpp"]
    assert llama["status"] == ("ok" if llama_cpp_available() else "skipped"), llama.get("reason")


def test_extra_buffer_types_are_off_only_for_an_amx_build():
    from hetegen_cli.bench.llama_cpp import build_has_amx

    amx = "CPU : AVX512 = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 |"
    assert build_has_amx(amx)
    assert not build_has_amx(amx.replace("AMX_INT8 = 1 | ", ""))


def test_a_larger_vocabulary_pads_the_tokenizer_and_converts(tmp_path, monkeypatch):
    """A preset whose vocabulary is larger than SmolLM2's 49,152 tokens (OLMoE's 50,304) gets
    the tokenizer padded with unused tokens: every id has a token, the real ids and merges are
    unchanged, and hetegen converts and runs the file (llama.cpp loads it where installed)."""
    from gguf import GGUFReader

    from hetegen_cli.core.errors import ModelError
    from hetegen_cli.models.formats.gguf import default_gguf_path
    from hetegen_cli.models.formats.gguf_write import TOKENIZER_VOCAB, gguf_preset_error, write_llama_gguf
    from hetegen_cli.models.loading.source import resolve_model

    try:
        default_gguf_path()
    except ModelError as exc:
        pytest.skip(f"the tokenizer comes from the default model's GGUF: {exc.message}")
    assert gguf_preset_error("olmoe-1b-7b") is None
    assert "vocabulary of 32000" in gguf_preset_error("mixtral-8x7b")  # smaller: refused
    monkeypatch.setenv("HETEGEN_HOME", str(tmp_path / "home"))
    vocab = TOKENIZER_VOCAB + 40
    path = write_llama_gguf(
        {**TINY_GGUF_CONFIG, "vocab_size": vocab, "tie_word_embeddings": False}, tmp_path / "v.gguf"
    )
    reader = GGUFReader(str(path))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    original = GGUFReader(str(default_gguf_path())).fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == len(types) == vocab and tokens[:TOKENIZER_VOCAB] == original
    assert tokens[-1] == "<|hetegen_pad_39|>" and set(types[TOKENIZER_VOCAB:]) == {5}
    from tests.helpers import cli

    ran = cli("run", "--model", str(path), "--prompt", "The capital of France is", "-n", "4", "--json")
    assert ran.exit_code == 0, ran.stderr
    doc = json.loads(ran.stdout)
    assert len(doc["token_ids"]) == 4 and all(0 <= t < vocab for t in doc["token_ids"])
    assert resolve_model(str(path), need_weights=False).spec.vocab_size == vocab
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return  # llama-cpp-python is optional
    logits = _llama_cpp_logits(path, PROMPT[:3])
    assert logits.shape == (3, vocab) and torch.isfinite(logits).all()
