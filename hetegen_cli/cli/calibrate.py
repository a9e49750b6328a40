"""`hetegen calibrate RUN.json ...`: refit the fixed costs from real runs of this machine and
store the calibration next to the profile (plan.costmodel.calibration). `hetegen plan --calibrate` is
the same, kept for scripts written before the command (deprecated)."""

from __future__ import annotations

from pathlib import Path

import typer

from hetegen_cli.cli.common import JsonOption, ProfileOption, guarded, input_file_arg
from hetegen_cli.core.console import emit_json, note, stdout_console, table
from hetegen_cli.core.errors import InputError, ProfileError
from hetegen_cli.core.jsonio import read_json


def register(app: typer.Typer) -> None:
    @app.command("calibrate")
    @guarded
    def calibrate_command(
        runs: list[Path] = typer.Argument(
            ..., help="`hetegen run --json` or `hetegen bench --json` output made with the profile."
        ),
        profile: ProfileOption = None,
        json_: JsonOption = False,
    ) -> None:
        """Refit the profile's fixed costs from real runs of this machine and save the
        calibration next to the profile: plan, run and bench apply it from then on."""
        calibrate([input_file_arg(r, "RUN") for r in runs], input_file_arg(profile, "--profile"), json_)


def calibrate(runs: list[Path], profile: Path | None, json_: bool) -> None:
    """Read the run / bench documents, fit, write `<profile>.calibration.json` atomically."""
    from hetegen_cli.core import paths
    from hetegen_cli.plan.costmodel.calibration import (
        build_calibration,
        calibration_path,
        records_of,
        save_calibration,
    )
    from hetegen_cli.profile.document import identity, load_profile, utc_now

    path = profile or paths.default_profile_path()
    if profile is None and not path.is_file():
        raise ProfileError(
            f"no saved profile at {path} to calibrate",
            "measure one with `hetegen profile`, run with it, then calibrate; or pass --profile",
        )
    doc = load_profile(path)
    if not doc.get("engine"):
        raise ProfileError(
            f"profile {path} has no engine costs to calibrate (made before profile schema 2)",
            "re-run `hetegen profile`, then the runs, then calibrate",
        )
    who = identity(doc, path)
    records = []
    for run in runs:
        data = read_json(run, "run", InputError, "pass a `hetegen run --json` or `hetegen bench --json` file")
        records += records_of(data, str(run), who)
    cal = build_calibration(records, who, utc_now())
    if not cal["factors"]:
        raise InputError(
            "the runs hold no fixed costs to refit (no phase with a measured time and a fixed part)",
            "calibrate with `run --json` or `bench --json` output made with this profile",
        )
    saved = save_calibration(cal, calibration_path(path))
    if json_:
        emit_json(cal)
    else:
        _render(cal)
    note(f"calibration saved to {saved}; `plan`, `run` and `bench` apply it with profile {path}")


def _render(cal: dict) -> None:

    factors = cal["factors"]
    t = table(
        "Calibration: measured against predicted, per run and phase",
        ("run", "device", "phase", "measured ms", "before ms", "ratio", "after ms", "ratio"),
        left=("run", "device", "phase"),
    )
    for r in cal["runs"]:
        k = factors.get(r["device"], {}).get(r["phase"], 1.0)
        before = r["linear_s"] + r["fixed_uncalibrated_s"]
        after = r["linear_s"] + k * r["fixed_uncalibrated_s"]
        t.add_row(
            Path(r["source"]).name,
            r["device"],
            r["phase"],
            f"{r['measured_s'] * 1e3:.2f}",
            f"{before * 1e3:.2f}",
            f"{r['measured_s'] / before:.2f}",
            f"{after * 1e3:.2f}",
            f"{r['measured_s'] / after:.2f}",
        )
    t.caption = "factors on the fixed costs: " + ", ".join(
        f"{dev} {ph} x{k:.2f}" for dev, by in factors.items() for ph, k in by.items()
    )
    stdout_console().print(t)
