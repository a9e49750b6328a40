"""`hetegen serve`: an OpenAI-compatible HTTP server over one loaded model (docs/serve.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from hetegen_cli.cli.common import guarded, model_setup_options

if TYPE_CHECKING:
    from hetegen_cli.run.setup import ModelSetup


def register(app: typer.Typer) -> None:
    @app.command("serve")
    @guarded
    @model_setup_options()
    def serve_command(
        *,
        setup: ModelSetup,  # --model, --quant, --dtype, --device, --plan, --gpu-memory, --profile
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

        serve(ServeOptions(setup, host, port, api_key, max_queue, context, max_tokens, grace))
