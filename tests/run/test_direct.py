"""The direct start (run.direct, run.direct_check, models.formats.direct): a regular run of a
quantized model whose decode step is fused whole checks and records it; later greedy runs
start without torch or transformers and give the regular path's tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hetegen_cli.cli.app import app
from hetegen_cli.models.formats import cpu_kernels, direct
from hetegen_cli.run import direct as direct_run
from hetegen_cli.run import direct_check
from tests.helpers import assert_error
from tests.tiny_models import VOCAB_SIZE, build_tokenizer

pytestmark = pytest.mark.skipif(
    cpu_kernels.kernels() is None, reason=f"no hetegen kernels: {cpu_kernels.why_not()}"
)
PROMPT = "The capital of France is"
#: every width a multiple of 32, so each MLP, attention, layer and the model step fuse
_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
#: LLaMA; Qwen2 (q, k, v biases); Qwen3 (q and k RMS norms per head, a tied head)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": False}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": False}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"tie_word_embeddings": True, "head_dim": 16}),
}


def _build(folder: Path, arch: str, seed: int = 0) -> Path:
    import transformers

    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**_COMMON, **extra)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # larger weights than the default init: clear greedy choices
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
            elif "bias" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(folder, safe_serialization=True)
    build_tokenizer(folder)
    return folder


def _fresh(tmp_path: Path, arch: str = "llama") -> Path:
    """A model of its own for one test: its name (and so its quantized copy under the
    shared $HETEGEN_HOME/models) is the test's, so no other test touches its files."""
    return _build(tmp_path / f"{arch}-{tmp_path.name}", arch)


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch_dir(request, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp(request.param)
    return _build(folder / f"direct-{request.param}-{folder.name}", request.param)


def _run(folder: Path, *args: str, env: dict[str, str] | None = None, prompt: str = PROMPT):
    runner = CliRunner(env=env or {})
    result = runner.invoke(
        app, ["run", "--model", str(folder), "--prompt", prompt, "-n", "8", "--json", *args]
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), result.stderr


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_a_second_greedy_run_starts_direct_with_the_regular_tokens(arch_dir, fmt):
    first, said = _run(arch_dir, "--quant", fmt)
    assert first["engine"] == "plain" and first["fused"]["model"] == 1
    assert "checked a direct start for this model" in said
    second, said = _run(arch_dir, "--quant", fmt)
    assert second["engine"] == "direct" and "checked" not in said
    assert second["token_ids"] == first["token_ids"] and second["text"] == first["text"]
    assert second["prompt_token_ids"] == first["prompt_token_ids"]
    assert second["dtype"] == first["dtype"] and second["quant"] == first["quant"]
    wall = second["timings"]["wall"]
    parts = sum(wall[k] for k in ("import_s", "resolve_s", "load_s", "prefill_s", "decode_s", "other_s"))
    assert abs(parts - wall["total_s"]) < 1e-6
    for prompt in ("Once upon a time", " bandwidth add up when both sides"):  # prompts the check never saw
        regular, _ = _run(arch_dir, "--quant", fmt, env={"HETEGEN_DIRECT": "off"}, prompt=prompt)
        fast, _ = _run(arch_dir, "--quant", fmt, prompt=prompt)
        assert (regular["engine"], fast["engine"]) == ("plain", "direct")
        assert fast["token_ids"] == regular["token_ids"], prompt


def test_the_direct_start_imports_neither_torch_nor_transformers(tmp_path):
    folder = _fresh(tmp_path)
    _run(folder, "--quant", "int4")  # checks and records
    args = ["run", "--model", str(folder), "--quant", "int4", "--prompt", "Hello", "-n", "4", "--json"]
    code = (
        "import sys\nfrom hetegen_cli.cli.app import app\n"
        f"try:\n    app({args!r})\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules, file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "HETEGEN_DEBUG": "1"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["engine"] == "direct", done.stderr
    assert done.stderr.strip().splitlines()[-1] == "False False"


def test_changed_files_send_the_run_back_to_the_regular_path_which_checks_again(tmp_path, hetegen_home):
    folder = _fresh(tmp_path)
    first, _ = _run(folder, "--quant", "int4")
    copy = Path(first["model"]["path"])
    assert direct_run.current_record(copy) is not None
    weights = copy / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a file written again
    assert direct_run.current_record(copy) is None
    again, said = _run(folder, "--quant", "int4")
    assert again["engine"] == "plain" and "checked a direct start" in said
    assert _run(folder, "--quant", "int4")[0]["engine"] == "direct"


def test_a_check_that_fails_is_recorded_and_not_repeated(tmp_path, monkeypatch):
    folder = _fresh(tmp_path)
    monkeypatch.setattr(direct_check, "LOGIT_RTOL", -1.0)  # no logits can agree
    first, said = _run(folder, "--quant", "int4")
    assert "no direct start for this model (its logits differ" in said
    record = direct_run.current_record(Path(first["model"]["path"]))
    assert record is not None and record["layout"] is None and "logits differ" in record["checked"]["refused"]
    assert not direct_run.extra_path(Path(first["model"]["path"])).exists()
    again, said = _run(folder, "--quant", "int4")
    assert again["engine"] == "plain" and "direct start" not in said


def test_runs_a_record_does_not_cover_take_the_regular_path(tmp_path):
    folder = _fresh(tmp_path)
    _run(folder, "--quant", "int4")
    sampled, _ = _run(folder, "--quant", "int4", "--temperature", "0.7", "--seed", "1")
    assert sampled["engine"] == "plain"
    long_prompt = " ".join(["Paris"] * (direct_run.MAX_PROMPT_TOKENS + 4))
    long, _ = _run(folder, "--quant", "int4", prompt=long_prompt)
    assert long["engine"] == "plain" and len(long["prompt_token_ids"]) > direct_run.MAX_PROMPT_TOKENS
    off, _ = _run(folder, "--quant", "int4", env={"HETEGEN_DIRECT": "off"})
    assert off["engine"] == "plain"
    floats, _ = _run(folder, "--quant", "none")  # a float model: never direct
    assert floats["engine"] == "plain"


def test_a_model_whose_step_is_not_fused_gets_no_record(tiny_llama_dir):
    """The tiny LLaMA's MLP takes 136 inputs (not a multiple of 32): no fused model step."""
    first, said = _run(tiny_llama_dir, "--quant", "int4")
    assert first["fused"]["model"] == 0 and "direct start" not in said
    assert not direct_run.record_path(Path(first["model"]["path"])).exists()


def test_an_unknown_setting_is_refused_in_one_line(tmp_path):
    result = CliRunner(env={"HETEGEN_DIRECT": "fast"}).invoke(
        app, ["run", "--model", str(tmp_path), "--prompt", PROMPT]
    )
    assert_error(result, "HETEGEN_DIRECT='fast' is not one of auto, off")


def test_a_layout_that_does_not_fit_the_files_is_refused(tmp_path):
    folder = _fresh(tmp_path)
    first, _ = _run(folder, "--quant", "int4")
    copy = Path(first["model"]["path"])
    record = direct_run.current_record(copy)
    layout = json.loads(json.dumps(record["layout"]))
    layout["layers"][0]["mlp"][0]["name"] = "model.layers.0.mlp.nothing"
    with pytest.raises(direct.LayoutError, match="not in the model's files"):
        direct.DirectModel(copy, layout)
    layout = json.loads(json.dumps(record["layout"]))
    layout["layers"][1]["attn"]["heads"] = 8
    with pytest.raises(direct.LayoutError, match="attention projections"):
        direct.DirectModel(copy, layout)


def test_bfloat16_tensors_are_read_as_torch_widens_them(tmp_path):
    from safetensors.torch import save_file

    values = {
        "a": torch.randn(5, 7).to(torch.bfloat16),
        "b": torch.randn(3).half(),
        "c": torch.arange(6).to(torch.uint8),
    }
    save_file(values, str(tmp_path / "x.safetensors"))
    tensors = direct.Tensors.open(tmp_path)
    np.testing.assert_array_equal(tensors.get("a"), values["a"].float().numpy())
    np.testing.assert_array_equal(tensors.row("a", 3), values["a"][3].float().numpy())
    np.testing.assert_array_equal(tensors.get("b", (3,)), values["b"].numpy())
    np.testing.assert_array_equal(tensors.get("c"), values["c"].numpy())
    with pytest.raises(direct.LayoutError, match=r"is \[5, 7\], not \[7, 5\]"):
        tensors.get("a", (7, 5))


def test_a_record_that_cannot_be_written_leaves_the_run_as_it_was(tmp_path, hetegen_home):
    folder = _fresh(tmp_path)
    (hetegen_home / "direct").write_text("a file where the records' folder would be")
    first, said = _run(folder, "--quant", "int4")
    assert first["engine"] == "plain" and len(first["token_ids"]) == 8
    assert "no direct start recorded for this model" in said and "Traceback" not in said
    assert _run(folder, "--quant", "int4")[0]["engine"] == "plain"
