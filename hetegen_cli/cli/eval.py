"""`hetegen eval`: perplexity on a text, to check what quantization (or a dtype) costs."""

from __future__ import annotations

from pathlib import Path

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
)
from hetegen_cli.core.console import emit_json, note, progress


def register(app: typer.Typer) -> None:
    @app.command("eval")
    @guarded
    def eval_command(
        model: ModelOption = None,
        quant: QuantOption = QuantChoice.auto,
        allow_float_copy: AllowFloatCopyOption = False,
        dtype: RunDtypeOption = DtypeChoice.auto,
        device: DeviceOption = DeviceChoice.auto,
        text: Path | None = typer.Option(
            None, "--text", help="UTF-8 text to score. Default: hetegen's own text (1,277 words)."
        ),
        context: int = typer.Option(512, "--context", help="Tokens per window."),
        stride: int | None = typer.Option(
            None, "--stride", help="Tokens between window starts (default: half the context)."
        ),
        profile: ProfileOption = None,
        json_: JsonOption = False,
    ) -> None:
        """Perplexity of the model (as `run` runs it) on a text: lower is better."""
        from hetegen_cli.run.context import EngineOptions, RunOptions
        from hetegen_cli.run.evaluate import evaluate

        options = RunOptions(
            prompt="(eval)",
            model=model_arg(model),
            max_new_tokens=1,
            dtype=dtype.value,
            device=device.value,
            quant=quant.value,
            allow_float_copy=allow_float_copy,
        )
        engine = EngineOptions(profile_path=input_file_arg(profile, "--profile"))
        with progress(not json_) as bar:
            result, built = evaluate(options, engine, input_file_arg(text, "--text"), context, stride, bar)
        built.close()
        if json_:
            emit_json(
                {
                    "schema_version": 1,
                    "kind": "hetegen.eval",
                    "model": built.info.get("folder"),
                    "engine": built.engine,
                    "dtype": built.dtype,
                    **result.as_dict(),
                }
            )
            return
        print(f"perplexity {result.perplexity:.4f}")
        note(
            f"{result.tokens_scored} tokens of {result.text} scored in {result.windows} windows of "
            f"{result.context} (stride {result.stride}) in {result.seconds:.1f} s | {built.engine} on "
            f"{built.device}, {built.dtype}"
        )
