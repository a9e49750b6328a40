"""`hetegen serve`: an OpenAI-compatible HTTP server over one loaded model (docs/serve.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from hetegen_cli.cli.common import (
    AllowFloatCopyOption,
    DeviceChoice,
    DeviceOption,
    DtypeChoice,
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


def register(app: typer.Typer) -> None:
    @app.command("serve")
    @guarded
    def serve_command(
        model: ModelOption = None,
        plan: Path | None = typer.Option(
            None, "--plan", help="Execute this plan (from `hetegen plan --output`) for every request."
        ),
        gpu_memory: str | None = typer.Option(
            None, "--gpu-memory", help="GPU budget to plan on the fly, e.g. 6GiB (needs a CUDA GPU)."
        ),
        profile: ProfileOption = None,
        dtype: RunDtypeOption = DtypeChoice.auto,
        device: DeviceOption = DeviceChoice.auto,
        quant: QuantOption = QuantChoice.auto,
        allow_float_copy: AllowFloatCopyOption = False,
        host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
        port: int = typer.Option(8000, "--port", help="Port to listen on (0: any free port)."),
        api_key: str | None = typer.Option(
            None,
            "--api-key",
            envvar="HETEGEN_API_KEY",
            help="Require 'Authorization: Bearer KEY' on every route but /health (or set HETEGEN_API_KEY).",
        ),
        max_queue: int = typer.Option(
            16, "--max-queue", help="Requests that may wait while one generates; more get 429."
        ),
        context: int | None = typer.Option(
            None,
            "--context",
            help="Prompt + completion tokens per request (default: the model's, at most 4096). "
            "A plan made on the fly reserves KV cache for it.",
        ),
        max_tokens: int = typer.Option(
            256, "--max-tokens", help="Completion tokens when a request does not say (max_tokens)."
        ),
        grace: float = typer.Option(
            10.0, "--grace", help="Seconds in-flight requests get to finish on Ctrl-C / SIGTERM."
        ),
    ) -> None:
        """Serve the model over the OpenAI API (/v1/chat/completions, /v1/completions, ...)."""
        from hetegen_cli.serve.model import ServeOptions
        from hetegen_cli.serve.server import serve

        options = ServeOptions(
            model=model_arg(model),
            plan_path=input_file_arg(plan, "--plan"),
            gpu_budget_bytes=size_bytes(gpu_memory, "--gpu-memory"),
            profile_path=input_file_arg(profile, "--profile"),
            dtype=dtype.value,
            device=device.value,
            quant=quant.value,
            allow_float_copy=allow_float_copy,
            host=host,
            port=port,
            api_key=api_key,
            max_queue=max_queue,
            context=context,
            default_max_tokens=max_tokens,
            grace_s=grace,
        )
        serve(options)
