"""Generation and `hetegen run` on the tiny OPT and LLaMA fixtures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from hetegen_cli.cli import app
from hetegen_cli.errors import InputError
from hetegen_cli.generate import (IncrementalDecoder, SamplingOptions, check_context, generate,
                                  prepare_prompt, select_token)
from hetegen_cli.loader import load_model, load_tokenizer

runner = CliRunner()
PROMPT = "The capital of France is"


def _reference(folder: Path, prompt_ids: list[int], n: int) -> list[int]:
    """transformers' own greedy generation: the tokens hetegen must reproduce."""
    model = load_model(folder).model
    out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=n)
    return out[0, len(prompt_ids):].tolist()


def _run_json(*args: str) -> dict:
    result = runner.invoke(app, ["run", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(params=["opt", "llama"])
def tiny_dir(request, tiny_opt_dir, tiny_llama_dir) -> Path:
    return tiny_opt_dir if request.param == "opt" else tiny_llama_dir


# ---------------------------------------------------------------------- greedy equivalence

def test_generate_matches_transformers_greedy(tiny_dir):
    tokenizer = load_tokenizer(tiny_dir)
    model = load_model(tiny_dir).model
    ids = prepare_prompt(tokenizer, PROMPT)
    pieces: list[str] = []
    result = generate(model, tokenizer, ids, max_new_tokens=24, on_text=pieces.append)
    assert result.token_ids == _reference(tiny_dir, ids, 24)
    assert result.prompt_token_ids == ids
    assert "".join(pieces) == result.text
    t = result.timings
    assert t.prompt_tokens == len(ids) and t.generated_tokens == len(result.token_ids)
    assert t.decode_steps == t.generated_tokens - 1
    assert 0 < t.prefill_s <= t.time_to_first_token_s <= t.total_s


def test_cli_json_matches_transformers_greedy(tiny_dir):
    doc = _run_json("--model", str(tiny_dir), "--prompt", PROMPT, "--max-new-tokens", "16")
    assert list(doc)[:2] == ["schema_version", "kind"] and doc["kind"] == "hetegen.run"
    assert doc["token_ids"] == _reference(tiny_dir, doc["prompt_token_ids"], 16)
    assert doc["device"] == "cpu" and doc["dtype"] == "float32" and doc["engine"] == "plain"
    assert doc["sampling"]["mode"] == "greedy"
    assert doc["model"]["source"] == "folder" and doc["model"]["path"] == str(tiny_dir)
    for key in ("load_s", "prefill_s", "time_to_first_token_s", "decode_s", "decode_tokens_per_s",
                "prompt_tokens", "generated_tokens"):
        assert key in doc["timings"]
    assert doc["timings"]["generated_tokens"] == len(doc["token_ids"])


# ------------------------------------------------------------------------------- sampling

def test_seeded_sampling_is_reproducible(tiny_llama_dir):
    args = ("--model", str(tiny_llama_dir), "--prompt", PROMPT, "-n", "20", "--temperature", "1.5")
    first = _run_json(*args, "--seed", "7")
    again = _run_json(*args, "--seed", "7")
    other = _run_json(*args, "--seed", "8")
    assert first["token_ids"] == again["token_ids"]
    assert first["token_ids"] != other["token_ids"]
    assert first["sampling"] == {"mode": "sample", "temperature": 1.5, "top_p": 1.0, "top_k": 0,
                                 "seed": 7}


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    gen = torch.Generator().manual_seed(0)
    for opts in (SamplingOptions(temperature=2.0, top_k=1), SamplingOptions(temperature=2.0, top_p=1e-6)):
        assert {select_token(logits, opts, gen) for _ in range(20)} == {1}
    wide = {select_token(logits, SamplingOptions(temperature=5.0, top_k=2), gen) for _ in range(200)}
    assert wide == {1, 2}


# --------------------------------------------------------------------------------- stopping

def test_eos_from_config_stops_generation(tiny_llama_dir, tmp_path):
    """Declare the 4th greedy token an EOS id: generation stops right after it."""
    greedy = _run_json("--model", str(tiny_llama_dir), "--prompt", PROMPT, "-n", "12")
    stop_token = greedy["token_ids"][3]
    assert stop_token not in greedy["token_ids"][:3]
    folder = Path(shutil.copytree(tiny_llama_dir, tmp_path / "eos"))
    for name in ("config.json", "generation_config.json"):
        config = json.loads((folder / name).read_text())
        config["eos_token_id"] = [2, stop_token]
        (folder / name).write_text(json.dumps(config))
    doc = _run_json("--model", str(folder), "--prompt", PROMPT, "-n", "12")
    assert doc["token_ids"] == greedy["token_ids"][:4]
    assert doc["stop_reason"] == "eos" and greedy["stop_reason"] == "length"


def test_generate_stops_at_given_eos_ids(tiny_opt_dir):
    tokenizer = load_tokenizer(tiny_opt_dir)
    model = load_model(tiny_opt_dir).model
    ids = prepare_prompt(tokenizer, PROMPT)
    full = generate(model, tokenizer, ids, max_new_tokens=6, eos_ids=set())
    assert len(full.token_ids) == 6 and full.stop_reason == "length"
    cut = generate(model, tokenizer, ids, max_new_tokens=6, eos_ids={full.token_ids[0]})
    assert cut.token_ids == full.token_ids[:1] and cut.stop_reason == "eos"


# -------------------------------------------------------------------------------- streaming

def test_streams_text_to_stdout_and_timings_to_stderr(tiny_llama_dir):
    args = ["run", "--model", str(tiny_llama_dir), "--prompt", PROMPT, "-n", "10"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = _run_json(*args[1:])
    assert result.stdout == doc["text"] + "\n"
    assert "prefill" in result.stderr and "tok/s" in result.stderr and "first token" in result.stderr
    assert doc["text"] not in result.stderr or doc["text"] == ""


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

def _assert_input_error(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.stdout == "" and "Traceback" not in result.output
    assert result.stderr.startswith("Error:") and "Hint:" in result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt(tiny_llama_dir, prompt):
    result = runner.invoke(app, ["run", "--model", str(tiny_llama_dir), "--prompt", prompt])
    _assert_input_error(result, "prompt is empty")


def test_max_new_tokens_beyond_context(tiny_llama_dir):
    result = runner.invoke(app, ["run", "--model", str(tiny_llama_dir), "--prompt", PROMPT,
                                 "--max-new-tokens", "500"])
    _assert_input_error(result, "exceeds the model's context of 128 tokens", "--max-new-tokens")


def test_check_context_numbers():
    check_context(100, 28, 128)
    with pytest.raises(InputError) as info:
        check_context(100, 29, 128)
    assert "129" in info.value.message and "--max-new-tokens 28" in info.value.hint


def test_max_new_tokens_below_one_is_usage_error(tiny_llama_dir):
    result = runner.invoke(app, ["run", "--model", str(tiny_llama_dir), "--prompt", PROMPT,
                                 "--max-new-tokens", "0"])
    assert result.exit_code == 2


def test_chat_without_template(tiny_llama_dir):
    result = runner.invoke(app, ["run", "--model", str(tiny_llama_dir), "--prompt", PROMPT, "--chat"])
    _assert_input_error(result, "no chat template")


def test_chat_uses_template(tiny_llama_dir, tmp_path):
    folder = Path(shutil.copytree(tiny_llama_dir, tmp_path / "chat"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}USER: {{ m['content'] }}\n{% endfor %}BOT:"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(folder)
    doc = _run_json("--model", str(folder), "--prompt", PROMPT, "--chat", "-n", "4")
    assert doc["chat"] is True
    assert doc["prompt_token_ids"] == tokenizer(f"USER: {PROMPT}\nBOT:")["input_ids"]


def test_invalid_top_p(tiny_llama_dir):
    result = runner.invoke(app, ["run", "--model", str(tiny_llama_dir), "--prompt", PROMPT,
                                 "--temperature", "1", "--top-p", "0"])
    _assert_input_error(result, "top-p")


def test_cuda_requested_without_gpu(tiny_llama_dir):
    from hetegen_cli.devices import cuda_available

    if cuda_available():
        pytest.skip("a GPU is present")
    result = runner.invoke(app, ["run", "--model", str(tiny_llama_dir), "--prompt", PROMPT,
                                 "--device", "cuda"])
    _assert_input_error(result, "no CUDA GPU")


@pytest.mark.cuda
def test_runs_on_gpu_and_matches_cpu(tiny_llama_dir):
    args = ("--model", str(tiny_llama_dir), "--prompt", PROMPT, "-n", "8")
    gpu = _run_json(*args, "--device", "cuda", "--dtype", "float32")
    cpu = _run_json(*args, "--device", "cpu")
    assert gpu["device"].startswith("cuda") and gpu["token_ids"] == cpu["token_ids"]
