"""`hetegen run`: generate text from a prompt, streaming tokens to stdout, timings to stderr."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import typer

from hetegen_cli.cli.common import JsonOption, guarded, model_setup_options
from hetegen_cli.core.console import emit_json, note, warn

if TYPE_CHECKING:
    from hetegen_cli.run.setup import ModelSetup


def timing_line(result: Any) -> str:
    """The stderr summary of a run (run.execute.RunResult or run.direct.DirectRun)."""
    t = result.generation.timings
    return (
        f"{wall_line(result)} | prefill {t.prompt_tokens} tok in {t.prefill_s:.3f} s "
        f"| first token {t.time_to_first_token_s:.3f} s | decode {t.generated_tokens} tok, "
        f"{t.decode_tokens_per_s:.1f} tok/s | {result.build_label} | stop: {result.generation.stop_reason}"
        + _plan_comparison(result)
    )


def wall_line(result: Any) -> str:
    """'wall 5.94 s: import 2.41, resolve 0.30, load 0.70, prefill 0.03, decode 0.51, other
    0.99': the whole process so far and where it went (run.document.wall_split:
    import is Python, the CLI, torch and transformers' model code; resolve the model's files,
    its tokenizer, the plan and the checks; other the rest, e.g. streaming, the prediction)."""
    wall = result.wall_split()
    parts = ("import", "resolve", "load", "prefill", "decode", "other")
    shown = ", ".join(f"{name} {wall[name + '_s']:.2f}" for name in parts if name + "_s" in wall)
    return f"wall {wall['total_s']:.2f} s: {shown}"


def _plan_comparison(result: Any) -> str:
    """' | plan predicted X tok/s (achieved Y% of it)' when the engine ran a plan."""
    predicted = result.predicted_decode_tokens_per_s
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
    @model_setup_options()
    def run_command(
        *,
        prompt: str = typer.Option(
            ..., "--prompt", "-p", help="Text to continue (or the user message with --chat)."
        ),
        setup: ModelSetup,  # --model, --quant, --dtype, --device, --plan, --gpu-memory, --profile
        chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
        max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Most tokens to generate."),
        temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy; > 0 samples."),
        top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (1 = off)."),
        top_k: int = typer.Option(0, "--top-k", help="Sample among the k likeliest tokens (0 = off)."),
        seed: int | None = typer.Option(
            None, "--seed", help="Random seed for sampling (reproducible output)."
        ),
        json_: JsonOption = False,
    ) -> None:
        """Generate text: tokens stream to stdout, a timing line goes to stderr."""
        from hetegen_cli.run.direct import try_direct
        from hetegen_cli.run.setup import GenerationRequest
        from hetegen_cli.run.text import SamplingOptions

        sampling = SamplingOptions(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        if sampling.greedy and (top_p != 1.0 or top_k != 0 or seed is not None):
            warn("--top-p, --top-k and --seed have no effect with --temperature 0 (greedy)")
        request = GenerationRequest(prompt, chat, max_new_tokens, sampling)
        on_text = None if json_ else _write
        result = try_direct(setup, request, on_text)  # without torch, where a record allows
        if result is None:
            from hetegen_cli.run.execute import execute_run

            result = execute_run(setup, request, on_text=on_text, remember_direct=True)
        if json_:
            emit_json(result.to_document())
            if result.direct_note:
                note(result.direct_note)
            return
        _write("\n")
        note(timing_line(result))
        if result.direct_note:
            note(result.direct_note)
