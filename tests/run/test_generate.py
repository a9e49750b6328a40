"""The generation loop on the tiny OPT and LLaMA fixtures: greedy equals transformers, EOS,
sampling filters, streaming text, the context check."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from hetegen_cli.core.errors import InputError
from hetegen_cli.models.loading.loader import load_model, load_tokenizer
from hetegen_cli.models.shapes.spec import check_context
from hetegen_cli.run.generate import (
    IncrementalDecoder,
    SamplingOptions,
    generate,
    prepare_prompt,
    select_token,
)
from tests.helpers import transformers_greedy

runner = CliRunner()
PROMPT = "The capital of France is"


# ---------------------------------------------------------------------- greedy equivalence


def test_generate_matches_transformers_greedy(tiny_dir):
    tokenizer = load_tokenizer(tiny_dir)
    model = load_model(tiny_dir).model
    ids = prepare_prompt(tokenizer, PROMPT)
    pieces: list[str] = []
    result = generate(model, tokenizer, ids, max_new_tokens=24, on_text=pieces.append)
    assert result.token_ids == transformers_greedy(tiny_dir, ids, 24)
    assert result.prompt_token_ids == ids
    assert "".join(pieces) == result.text
    t = result.timings
    assert t.prompt_tokens == len(ids) and t.generated_tokens == len(result.token_ids)
    assert t.decode_steps == t.generated_tokens - 1
    assert 0 < t.prefill_s <= t.time_to_first_token_s <= t.total_s


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    gen = torch.Generator().manual_seed(0)
    for opts in (SamplingOptions(temperature=2.0, top_k=1), SamplingOptions(temperature=2.0, top_p=1e-6)):
        assert {select_token(logits, opts, gen) for _ in range(20)} == {1}
    wide = {select_token(logits, SamplingOptions(temperature=5.0, top_k=2), gen) for _ in range(200)}
    assert wide == {1, 2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_takes_the_first_maximum_and_refuses_nan(dtype):
    """float32 on the CPU goes through numpy's argmax, other dtypes through torch's: the same
    answer (the first of tied maxima), and a NaN is refused either way."""
    greedy = SamplingOptions()
    assert select_token(torch.tensor([0.5, 2.0, -1.0, 2.0], dtype=dtype), greedy) == 1
    assert select_token(torch.arange(50_000, dtype=torch.float32).to(dtype).flip(0), greedy) == 0
    with pytest.raises(Exception, match="NaN"):
        select_token(torch.tensor([0.5, float("nan"), 3.0], dtype=dtype), greedy)


# --------------------------------------------------------------------------------- stopping


def test_generate_stops_at_given_eos_ids(tiny_opt_dir):
    tokenizer = load_tokenizer(tiny_opt_dir)
    model = load_model(tiny_opt_dir).model
    ids = prepare_prompt(tokenizer, PROMPT)
    full = generate(model, tokenizer, ids, max_new_tokens=6, eos_ids=set())
    assert len(full.token_ids) == 6 and full.stop_reason == "length"
    cut = generate(model, tokenizer, ids, max_new_tokens=6, eos_ids={full.token_ids[0]})
    assert cut.token_ids == full.token_ids[:1] and cut.stop_reason == "eos"


# -------------------------------------------------------------------------------- streaming


def test_incremental_decoder_keeps_multibyte_characters_whole(tiny_llama_dir):
    tokenizer = load_tokenizer(tiny_llama_dir)
    text = "Ünïcödé wörds: 日本語 and ✓ done"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) > len(text.split())  # byte-level pieces split characters
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


# ----------------------------------------------------------------------------- bad input


def test_check_context_numbers():
    check_context(100, 28, 128)
    with pytest.raises(InputError) as info:
        check_context(100, 29, 128)
    assert "129" in info.value.message and "--max-new-tokens 28" in info.value.hint
