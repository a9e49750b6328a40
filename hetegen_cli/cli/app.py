"""The `hetegen` command line. Thin: parse, call one library function, render.

Each command lives in its own cli/<command>.py module with a `register(app)` function; the
library (and torch) is imported inside command bodies so `--help` stays fast.
"""

from __future__ import annotations

import os

import typer

from hetegen_cli import __version__
from hetegen_cli.cli import bench, calibrate, eval, models, plan, profile, quantize, run, serve

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
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """hetegen: heterogeneous CPU+GPU inference."""
    if not os.environ.get("HETEGEN_DEBUG"):
        # transformers' own log lines (load reports, advice) would precede hetegen's messages
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


for _module in (profile, plan, calibrate, run, bench, serve, quantize, eval, models):
    _module.register(app)


def main() -> None:
    app()
