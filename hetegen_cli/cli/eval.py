"""`hetegen eval`: perplexity on a text, to check what quantization (or a dtype) costs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from hetegen_cli.cli.common import JsonOption, guarded, input_file_arg, model_setup_options, output_arg
from hetegen_cli.core.console import emit_json, note, progress

if TYPE_CHECKING:
    from hetegen_cli.run.setup import ModelSetup


def register(app: typer.Typer) -> None:
    @app.command("eval")
    @guarded
    @model_setup_options(plans=False)
    def eval_command(
        *,
        setup: ModelSetup,  # --model, --quant, --dtype, --device, --profile
        text: Path | None = typer.Option(
            None, "--text", help="UTF-8 text to score. Default: hetegen's own text (1,277 words)."
        ),
        context: int = typer.Option(512, "--context", help="Tokens per window."),
        stride: int | None = typer.Option(
            None, "--stride", help="Tokens between window starts (default: half the context)."
        ),
        expert_use: Path | None = typer.Option(
            None,
            "--expert-use",
            help="Also count how often a mixture-of-experts model's router chooses each expert, "
            "per layer, into this JSON file (docs/models.md, 'Expert use').",
        ),
        json_: JsonOption = False,
    ) -> None:
        """Perplexity of the model (as `run` runs it) on a text: lower is better."""
        from hetegen_cli.run.evaluate import evaluate

        expert_use = output_arg(expert_use, "--expert-use")
        with progress(not json_) as bar:
            result, built = evaluate(setup, input_file_arg(text, "--text"), context, stride, bar, expert_use)
        built.close()
        if json_:
            emit_json(
                {
                    "schema_version": 1,
                    "kind": "hetegen.eval",
                    "model": built.folder,
                    "engine": built.engine,
                    "dtype": built.dtype,
                    **result.as_dict(),
                    "expert_use": str(expert_use) if expert_use is not None else None,
                }
            )
            return
        print(f"perplexity {result.perplexity:.4f}")
        note(
            f"{result.tokens_scored} tokens of {result.text} scored in {result.windows} windows of "
            f"{result.context} (stride {result.stride}) in {result.seconds:.1f} s | {built.engine} on "
            f"{built.device}, {built.dtype}"
        )
        if expert_use is not None:
            note(f"expert use saved to {expert_use}")
