"""The `hetegen` command line. Thin: parse, call one library function, render.

Each command lives in its own cli_<command>.py module with a `register(app)` function; torch is
imported lazily inside commands so `--help` stays fast.
"""

from __future__ import annotations

import typer

from hetegen_cli import __version__

app = typer.Typer(
    name="hetegen",
    help="Run LLMs larger than your GPU: each offloaded linear layer is split between CPU and "
         "GPU so CPU memory bandwidth and PCIe bandwidth add up (HeteGen, MLSys 2024).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"hetegen {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """hetegen: heterogeneous CPU+GPU inference."""


def _register_all() -> None:
    from hetegen_cli import cli_bench, cli_models, cli_plan, cli_profile, cli_run

    for module in (cli_profile, cli_plan, cli_run, cli_bench, cli_models):
        module.register(app)


_register_all()


def main() -> None:
    app()
