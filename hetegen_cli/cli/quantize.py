"""`hetegen quantize`: write a model's int8 / int4 copy in hetegen's layout (docs/quant.md)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from hetegen_cli.cli.common import JsonOption, ModelOption, OutputOption, guarded, model_arg, output_arg
from hetegen_cli.core.console import emit_json, note


class Format(str, Enum):
    int8 = "int8"
    int4 = "int4"


def register(app: typer.Typer) -> None:
    @app.command("quantize")
    @guarded
    def quantize_command(
        model: ModelOption = None,
        quant: Format = typer.Option(
            ..., "--quant", help="int8 (per channel) or int4 (groups of --group-size)."
        ),
        group_size: int = typer.Option(
            32, "--group-size", help="int4 group: 32, 64 or 128 (32 = GGUF's Q4)."
        ),
        output: OutputOption = None,
        json_: JsonOption = False,
    ) -> None:
        """Quantize a model once (a folder, a .gguf file or the default model). Without --output
        the copy goes to $HETEGEN_HOME/models, where `run --quant` finds it."""
        from hetegen_cli.core.quant import check_group_size
        from hetegen_cli.models.formats.gguf_quant import write_gguf_quantized
        from hetegen_cli.models.formats.quantized import ensure_quantized
        from hetegen_cli.models.loading.source import resolve_model
        from hetegen_cli.models.shapes.quantfile import read_quantization

        fmt = quant.value
        if fmt == "int4":
            check_group_size(group_size)
        out = output_arg(output)
        arg = model_arg(model)
        if out is not None and arg is not None and arg.lower().endswith(".gguf"):
            folder = write_gguf_quantized(Path(arg).expanduser(), Path(out), fmt, group_size)
        elif out is not None:
            ref = resolve_model(arg, need_weights=True, quant="none")
            folder = ensure_quantized(ref, fmt, group_size, Path(out))
        elif group_size != 32:
            ref = resolve_model(arg, need_weights=True, quant="none")
            folder = ensure_quantized(ref, fmt, group_size)
        else:
            folder = resolve_model(arg, need_weights=True, quant=fmt).path
        doc = read_quantization(folder)
        size = sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file())
        if json_:
            emit_json({**doc, "kind": "hetegen.quantized", "folder": str(folder), "bytes": size})
            return
        print(folder)
        kept = len(doc["kept_float"])
        note(
            f"{len(doc['linears'])} linears in {doc['format']}"
            + (f", {kept} kept in bfloat16 (shapes the kernel cannot take)" if kept else "")
            + f"; {size / 2**20:.1f} MiB"
        )
