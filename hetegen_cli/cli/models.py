"""`hetegen models`: the built-in presets (shapes known without weights) and the architectures
hetegen runs."""

from __future__ import annotations

import typer

from hetegen_cli.cli.common import JsonOption, guarded
from hetegen_cli.core.console import activity, emit_json, stdout_console
from hetegen_cli.core.units import format_bytes
from hetegen_cli.models.architecture.spec import spec_from_config
from hetegen_cli.models.shapes import presets
from hetegen_cli.models.shapes.config import TESTED_ARCHITECTURES

OTHER_ARCHITECTURES = (
    "Other decoder-only causal LMs that transformers implements with nn.Linear projections run "
    "too (their shapes come from transformers' own model), untested; refused with the reason: "
    "encoder-decoders, Conv1D projections (GPT-2), mixture-of-experts layouts other than the "
    "tested ones (docs/models.md), remote code."
)


def register(app: typer.Typer) -> None:
    @app.command("models")
    @guarded
    def models_command(json_: JsonOption = False) -> None:
        """List preset model names, their hub ids and sizes (usable with --model), and the
        architecture support table."""
        rows = []
        with activity("deriving the presets' shapes from transformers (cached after the first time)"):
            specs = {
                name: spec_from_config(presets.preset_config(name), name) for name in presets.preset_names()
            }
        for name, spec in specs.items():
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
        support = [
            {
                "model_type": arch,
                "status": "tested",
                "presets": [r["name"] for r in rows if r["architecture"] == arch],
            }
            for arch in TESTED_ARCHITECTURES
        ]
        if json_:
            emit_json(
                {
                    "schema_version": 1,
                    "kind": "hetegen.models",
                    "models": rows,
                    "architectures": support,
                    "other_architectures": OTHER_ARCHITECTURES,
                }
            )
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
        console = stdout_console()
        console.print(table)
        arch_table = Table(title="Architectures (greedy tokens tested equal to transformers')")
        for col in ("model_type", "presets"):
            arch_table.add_column(col)
        for a in support:
            arch_table.add_row(a["model_type"], ", ".join(a["presets"]) or "-")
        console.print(arch_table)
        console.print(OTHER_ARCHITECTURES, highlight=False)
