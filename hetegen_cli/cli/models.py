"""`hetegen models`: list the built-in presets (shapes known without weights)."""

from __future__ import annotations

import typer

from hetegen_cli.cli.common import JsonOption, guarded
from hetegen_cli.core.console import emit_json, stdout_console
from hetegen_cli.core.units import format_bytes
from hetegen_cli.models.architecture.spec import spec_from_config
from hetegen_cli.models.shapes import presets


def register(app: typer.Typer) -> None:
    @app.command("models")
    @guarded
    def models_command(json_: JsonOption = False) -> None:
        """List preset model names, their hub ids and sizes (usable with --model)."""
        rows = []
        for name in presets.preset_names():
            spec = spec_from_config(presets.preset_config(name), name)
            rows.append(
                {
                    "name": name,
                    "hub_id": presets.preset_hub_id(name),
                    "architecture": spec.architecture,
                    "layers": spec.num_layers,
                    "hidden_size": spec.hidden_size,
                    "parameters": spec.parameter_count,
                    "dtype": spec.dtype,
                    "weight_bytes": spec.total_weight_bytes,
                    "default": name == presets.DEFAULT_MODEL,
                }
            )
        if json_:
            emit_json({"schema_version": 1, "kind": "hetegen.models", "models": rows})
            return
        from rich.table import Table

        table = Table(title="Preset models")
        for col in ("name", "hub id", "arch", "layers", "params", "weights"):
            table.add_column(col)
        for r in rows:
            table.add_row(
                r["name"] + (" (default)" if r["default"] else ""),
                r["hub_id"],
                r["architecture"],
                str(r["layers"]),
                f"{r['parameters'] / 1e9:.2f} B",
                f"{format_bytes(r['weight_bytes'])} {r['dtype']}",
            )
        stdout_console().print(table)
