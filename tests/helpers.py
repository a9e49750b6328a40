"""Helpers shared by tests: the command line, handled errors, transformers' own tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from hetegen_cli.cli.app import app


def cli(*args: str) -> Any:
    """Invoke `hetegen ARGS...` in-process (typer's CliRunner; stdout and stderr apart)."""
    return CliRunner().invoke(app, list(args))


def run_quick(*args: str) -> Any:
    """`hetegen run --prompt Hello --max-new-tokens 2 ARGS...`."""
    return cli("run", "--prompt", "Hello", "--max-new-tokens", "2", *args)


def assert_error(result: Any, *needles: str, exit_code: int = 1) -> None:
    """One handled error: the exit code, nothing on stdout, no traceback, `Error:` first and
    a `Hint:` line on stderr, every needle in stderr."""
    assert result.exit_code == exit_code, result.output
    assert result.stdout == ""
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert lines and lines[0].startswith("Error:"), result.stderr
    assert any(line.startswith("Hint:") for line in lines), result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def transformers_greedy(folder: Path, prompt_ids: list[int], n: int) -> list[int]:
    """transformers' own greedy generation: the tokens hetegen must reproduce."""
    import torch

    from hetegen_cli.models.loading.loader import load_model

    model = load_model(folder).model
    out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=n)
    return out[0, len(prompt_ids) :].tolist()


def bench_options(**kw: Any) -> Any:
    """bench.prepare.BenchOptions with the model setup's fields (model, quant, dtype, profile,
    allow_float_copy) given flat, as the command line gives them."""
    from hetegen_cli.bench.prepare import BenchOptions
    from hetegen_cli.run.setup import ModelSetup

    names = ("model", "quant", "dtype", "allow_float_copy")
    setup = {k: kw.pop(k) for k in names if k in kw}
    if "profile" in kw:
        setup["profile_path"] = kw.pop("profile")
    return BenchOptions(setup=ModelSetup(**setup), **kw)


def tiny_moe_folder(folder: Path, arch: str = "qwen3_moe", **over: Any) -> Path:
    """A tiny random mixture-of-experts checkpoint of `arch` (tests.models.architecture's TINY
    config, `over` on top) with the test tokenizer, saved into `folder` (seed 0)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.models.architecture.test_architectures import TINY
    from tests.tiny_models import build_tokenizer

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **{**TINY[arch], **over})).save_pretrained(
        folder
    )
    build_tokenizer(folder)
    return folder


def count_expert_use(model: Path, tmp_path: Path) -> Path:
    """`hetegen eval --expert-use` on a short text for `model`: the counts file it wrote."""
    text, use = tmp_path / "text.txt", tmp_path / "use.json"
    text.write_text("the quick brown fox jumps over the lazy dog and runs far away " * 12)
    counted = cli(
        "eval", "--model", str(model), "--text", str(text), "--context", "32", "--expert-use", str(use)
    )
    assert counted.exit_code == 0, counted.stderr
    return use


def quick_bench_options(
    model: Any, profile: Path, budgets: tuple[int, ...], arms: tuple[str, ...], **kw: Any
) -> Any:
    """bench_options for a tiny model measured once: prompt 8, 4 new tokens, 1 run, no warm-up."""
    return bench_options(
        model=str(model),
        profile=profile,
        prompt_len=8,
        max_new_tokens=4,
        repeat=1,
        warmup=0,
        gpu_budget_bytes=tuple(budgets),
        arms=tuple(arms),
        **kw,
    )


def fake_cuda_for_bench(monkeypatch: Any) -> None:
    """bench believes CUDA is there, and every arm gets the CPU stand-in backend."""
    from hetegen_cli.bench import arms, prepare, runner
    from hetegen_cli.core.devices import CpuBackend

    monkeypatch.setattr(prepare, "cuda_available", lambda: True)
    for module in (runner, arms):
        monkeypatch.setattr(module, "get_backend", lambda kind="auto": CpuBackend())


def _activations() -> str:
    from hetegen_cli.core.devices import dtype_name
    from hetegen_cli.models.loading.quantized_loader import activation_dtype

    return dtype_name(activation_dtype())


#: the activation dtype of a plain quantized model here (float32 with hetegen's CPU kernels)
ACTIVATIONS = _activations()
