"""Calibration: the fixed costs refitted from real runs of this machine (pure Python).

`hetegen plan --calibrate RUN.json` reads `run --json` or `bench --json` documents. Each
carries, per phase, the measured time, the bandwidth model's part (`linear_s`) and the fixed
terms before any calibration (`fixed_uncalibrated_s`), all predicted for that run's own
workload with this profile. Per device ("cpu", "cuda") and phase the factor k minimising
sum (measured - linear - k * fixed)^2 is k = sum f (m - l) / sum f^2, clamped to
[MIN_FACTOR, MAX_FACTOR]. The calibration is written atomically next to the profile
(`profile.json` -> `profile.calibration.json`), remembers the profile's sha256, and
`make_plan` applies it to every strategy while the profile stays the same file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from hetegen_cli.core.errors import InputError, ProfileError
from hetegen_cli.core.jsonio import read_document, write_document
from hetegen_cli.core.phase import PHASES
from hetegen_cli.core.validation import NonNegative, Positive, Schema, Text, check
from hetegen_cli.plan.costmodel.fixed import NO_ENGINE_NOTE, FixedCosts, fixed_costs_from_profile
from hetegen_cli.profile.document import Profile, profile_sections

CALIBRATION_KIND = "hetegen.calibration"
CALIBRATION_SCHEMA_VERSION = 1
MIN_FACTOR, MAX_FACTOR = 0.05, 20.0
DEVICES = ("cpu", "cuda")


def calibration_path(profile_path: str | Path) -> Path:
    """Where the calibration of a profile lives: beside it, `<stem>.calibration.json`."""
    path = Path(profile_path).expanduser()
    return path.with_name(f"{path.stem}.calibration.json")


class _Record(Schema):
    device: Literal["cpu", "cuda"]
    phase: Literal["prefill", "decode"]
    measured_s: Positive
    linear_s: NonNegative
    fixed_uncalibrated_s: NonNegative
    source: Text


class _Calibration(Schema):
    schema_version: int
    kind: Literal["hetegen.calibration"]
    profile_sha256: Text
    cpu_model: Text | None = None
    created_utc: Text
    factors: dict[Literal["cpu", "cuda"], dict[Literal["prefill", "decode"], Positive]]
    runs: list[_Record] = Field(default_factory=list)


def load_calibration(path: str | Path) -> dict[str, Any]:
    """Read and validate a calibration document (ProfileError with a hint on any problem)."""
    doc = read_document(
        path, CALIBRATION_KIND, (CALIBRATION_SCHEMA_VERSION,), ProfileError, "hetegen plan --calibrate"
    )
    check(
        _Calibration,
        doc,
        source=f"{path} is not a valid calibration",
        error=ProfileError,
        hint=f"delete {path} and re-run `hetegen plan --calibrate RUN.json`",
    )
    return doc


def profile_fixed_costs(
    profile: dict | Profile, identity: dict | None
) -> tuple[FixedCosts | None, list[str]]:
    """The profile's fixed costs, calibrated when a calibration of this very profile lies next
    to it; notes say what was used (or why not)."""
    notes: list[str] = []
    path = identity.get("path") if identity else None
    calibration = None
    if path and profile_sections(profile).engine is not None:
        cal_path = calibration_path(path)
        if cal_path.is_file():
            try:
                calibration = load_calibration(cal_path)
            except ProfileError as exc:
                notes.append(f"calibration ignored: {exc.message}")
            else:
                if calibration["profile_sha256"] != identity.get("sha256"):
                    notes.append(
                        f"calibration {cal_path} ignored: it was made for another version of the profile; "
                        "re-run `hetegen plan --calibrate RUN.json`"
                    )
                    calibration = None
                else:
                    calibration = dict(calibration, path=str(cal_path))
                    factors = ", ".join(
                        f"{dev} {ph} x{k:.2f}"
                        for dev, by in calibration["factors"].items()
                        for ph, k in by.items()
                    )
                    runs = len({r["source"] for r in calibration["runs"]})
                    notes.append(f"fixed costs calibrated from {runs} run(s): {factors}")
    fixed = fixed_costs_from_profile(
        profile,
        calibration["factors"] if calibration else None,
        {
            "path": calibration["path"],
            "created_utc": calibration["created_utc"],
            "runs": len({r["source"] for r in calibration["runs"]}),
        }
        if calibration
        else None,
    )
    if fixed is None:
        notes.append(NO_ENGINE_NOTE)
    return fixed, notes


# --- fitting from run and bench documents -----------------------------------------------------


def records_of(doc: dict, source: str, identity: dict) -> list[dict]:
    """The calibration records of a `run --json` or `bench --json` document; InputError when it
    is neither, holds no prediction, or was predicted with another profile or machine."""
    kind = doc.get("kind") if isinstance(doc, dict) else None
    if kind == "hetegen.run":
        checks = [doc.get("prediction")]
    elif kind == "hetegen.bench":
        checks = [
            arm.get("prediction_check")
            for budget in doc.get("budgets") or []
            for arm in budget.get("arms") or []
            if arm.get("status") == "ok"
        ]
    else:
        raise InputError(
            f"{source} is not a `hetegen run --json` or `hetegen bench --json` document (kind {kind!r})",
            "pass the JSON that `hetegen run --json` or `hetegen bench --json --output FILE` wrote",
        )
    checks = [c for c in checks if c]
    if not checks:
        raise InputError(
            f"{source} holds no prediction to calibrate against",
            "re-run it with this version of hetegen and a profile (`hetegen profile`)",
        )
    records = []
    for c in checks:
        prof = c.get("profile") or {}
        if prof.get("sha256") != identity.get("sha256"):
            other = prof.get("cpu_model") or "another machine"
            same_machine = prof.get("cpu_model") == identity.get("cpu_model")
            raise InputError(
                f"{source} was predicted with {'another version of the profile' if same_machine else other}, "
                f"not {identity.get('path')}",
                "calibrate with runs of this machine and profile: re-run it here, or pass its --profile",
            )
        if c.get("device") not in DEVICES:
            continue  # a layer split mixes devices: nothing to refit alone
        for phase in PHASES:
            p = (c.get("phases") or {}).get(phase) or {}
            if p.get("measured_s") and p.get("fixed_uncalibrated_s") is not None:
                records.append(
                    {
                        "device": c["device"],
                        "phase": phase,
                        "measured_s": float(p["measured_s"]),
                        "linear_s": float(p["linear_s"]),
                        "fixed_uncalibrated_s": float(p["fixed_uncalibrated_s"]),
                        "source": source,
                    }
                )
    return records


def fit_factors(records: list[dict]) -> dict[str, dict[str, float]]:
    """Per device and phase: k = sum f (m - l) / sum f^2, clamped to [MIN_FACTOR, MAX_FACTOR]."""
    factors: dict[str, dict[str, float]] = {}
    for dev in DEVICES:
        for phase in PHASES:
            rs = [
                r
                for r in records
                if r["device"] == dev and r["phase"] == phase and r["fixed_uncalibrated_s"] > 0
            ]
            if not rs:
                continue
            num = sum(r["fixed_uncalibrated_s"] * (r["measured_s"] - r["linear_s"]) for r in rs)
            den = sum(r["fixed_uncalibrated_s"] ** 2 for r in rs)
            factors.setdefault(dev, {})[phase] = min(MAX_FACTOR, max(MIN_FACTOR, num / den))
    return factors


def build_calibration(records: list[dict], identity: dict, created_utc: str) -> dict[str, Any]:
    """The calibration document of `records` for the profile `identity`."""
    return {
        "schema_version": CALIBRATION_SCHEMA_VERSION,
        "kind": CALIBRATION_KIND,
        "profile_sha256": identity.get("sha256"),
        "cpu_model": identity.get("cpu_model"),
        "created_utc": created_utc,
        "factors": fit_factors(records),
        "runs": records,
    }


def save_calibration(doc: dict[str, Any], path: str | Path) -> Path:
    """Write atomically (core.jsonio)."""
    return write_document(path, doc)
