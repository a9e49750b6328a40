"""`hetegen run`: generate text from a prompt, streaming tokens to stdout, timings to stderr."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from hetegen_cli.cli.common import (
    AllowFloatCopyOption,
    DeviceChoice,
    DeviceOption,
    DtypeChoice,
    JsonOption,
    ModelOption,
    ProfileOption,
    QuantChoice,
    QuantOption,
    RunDtypeOption,
    guarded,
    input_file_arg,
    model_arg,
    size_bytes,
)
from hetegen_cli.core.console import emit_json, note, warn
from hetegen_cli.core.errors import UsageError


def timing_line(result: Any) -> str:
    """The stderr summary of a run.execute.RunResult."""
    t = result.generation.timings
    return (
        f"{wall_line(result)} | prefill {t.prompt_tokens} tok in {t.prefill_s:.3f} s "
        f"| first token {t.time_to_first_token_s:.3f} s | decode {t.generated_tokens} tok, "
        f"{t.decode_tokens_per_s:.1f} tok/s | {result.built.engine} on {result.built.device}, "
        f"{result.built.dtype} | stop: {result.generation.stop_reason}" + _plan_comparison(result)
    )


def wall_line(result: Any) -> str:
    """'wall 5.94 s: startup 0.41, resolve 2.70, load 1.30, prefill 0.03, decode 0.51, other
    0.99': the whole process so far and where it went (startup: Python and the CLI; resolve:
    the model, its tokenizer, the plan and the checks; other: the rest, e.g. the prediction)."""
    from hetegen_cli.run.execute import process_age_s

    t = result.generation.timings
    parts = {
        "startup": result.wall.get("startup_s"),
        "resolve": result.wall.get("resolve_s"),
        "load": result.built.load_s,
        "prefill": t.prefill_s,
        "decode": t.decode_s,
    }
    known = {name: s for name, s in parts.items() if s is not None}
    total = process_age_s()
    other = max(0.0, total - sum(known.values()))
    shown = ", ".join(f"{name} {s:.2f}" for name, s in known.items())
    return f"wall {total:.2f} s: {shown}, other {other:.2f}"


def _plan_comparison(result: Any) -> str:
    """' | plan predicted X tok/s (achieved Y% of it)' when the engine ran a plan."""
    plan = result.built.info.get("plan") or {}
    predicted = ((plan.get("predictions") or {}).get("hetegen") or {}).get("decode_tokens_per_s")
    achieved = result.generation.timings.decode_tokens_per_s
    if not predicted or not achieved:
        return ""
    return f" | plan predicted {predicted:.2f} tok/s (achieved {100 * achieved / predicted:.0f}%)"


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
    @app.command("run")
    @guarded
    def run_command(
        prompt: str = typer.Option(
            ..., "--prompt", "-p", help="Text to continue (or the user message with --chat)."
        ),
        model: ModelOption = None,
        chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
        max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Most tokens to generate."),
        temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy; > 0 samples."),
        top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (1 = off)."),
        top_k: int = typer.Option(0, "--top-k", help="Sample among the k likeliest tokens (0 = off)."),
        seed: int | None = typer.Option(
            None, "--seed", help="Random seed for sampling (reproducible output)."
        ),
        dtype: RunDtypeOption = DtypeChoice.auto,
        device: DeviceOption = DeviceChoice.auto,
        plan: Path | None = typer.Option(
            None,
            "--plan",
            help="Execute this plan (from `hetegen plan --output`). Default: plan on the fly "
            "when the model does not fit the GPU.",
        ),
        gpu_memory: str | None = typer.Option(
            None, "--gpu-memory", help="GPU budget for planning on the fly, e.g. 6GiB (needs a CUDA GPU)."
        ),
        profile: ProfileOption = None,
        quant: QuantOption = QuantChoice.auto,
        allow_float_copy: AllowFloatCopyOption = False,
        json_: JsonOption = False,
    ) -> None:
        """Generate text: tokens stream to stdout, a timing line goes to stderr."""
        from hetegen_cli.run.context import EngineOptions, RunOptions
        from hetegen_cli.run.execute import execute_run
        from hetegen_cli.run.generate import SamplingOptions

        sampling = SamplingOptions(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        if sampling.greedy and (top_p != 1.0 or top_k != 0 or seed is not None):
            warn("--top-p, --top-k and --seed have no effect with --temperature 0 (greedy)")
        options = RunOptions(
            prompt=prompt,
            model=model_arg(model),
            chat=chat,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            dtype=dtype.value,
            device=device.value,
            quant=quant.value,
            allow_float_copy=allow_float_copy,
        )
        budget = size_bytes(gpu_memory, "--gpu-memory")
        if plan is not None and budget is not None:
            raise UsageError(
                "--plan and --gpu-memory cannot be combined",
                "the plan already fixes the GPU budget; re-plan to change it",
            )
        if device == DeviceChoice.cpu and budget is not None:
            raise UsageError(
                "--gpu-memory has no effect with --device cpu",
                "drop one of them: --device cpu runs without a GPU budget",
            )
        engine = EngineOptions(
            plan_path=input_file_arg(plan, "--plan"),
            profile_path=input_file_arg(profile, "--profile"),
            gpu_budget_bytes=budget,
        )
        result = execute_run(options, on_text=None if json_ else _write, engine=engine)
        if json_:
            emit_json(result.to_document())
            return
        _write("\n")
        note(timing_line(result))
