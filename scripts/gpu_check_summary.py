"""Summarise the work folder of scripts/gpu-check.sh into gpu-check.json (and print it).

Usage: python3 scripts/gpu_check_summary.py WORK_DIR
Reads the budget, the import preflight (preflight.json), each step's limit, exit code,
duration or skip reason (NAME.limit, NAME.rc, NAME.seconds, NAME.skipped), the profile
(profile.json: GPU rates, the copy-engine probe, the engine costs or their error), the CUDA
tests' output, and the bench documents smoke.json, arms.json, quant.json and sweep.json
(possibly partial: "complete": false). Writes WORK_DIR/gpu-check.json atomically. Missing
pieces are reported as missing; failed arms carry their error. Standard library only: it runs
even where the preflight fails.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

STEPS = ("preflight", "cuda-tests", "profile", "smoke", "arms", "simulate", "quant", "moe", "sweep")
BENCH_STEPS = ("smoke", "arms", "quant", "moe", "sweep")


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _text(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return None


def _int(path: Path):
    try:
        return int((_text(path) or "").strip())
    except ValueError:
        return None


def arm_rows(doc: dict | None) -> list[dict]:
    """One row per (budget, arm) with the figures a reader checks first."""
    rows = []
    for section in (doc or {}).get("budgets", []):
        budget = section.get("gpu_budget_bytes")
        for e in section.get("arms", []):
            row = {
                "gpu_budget_gib": budget / 2**30 if budget else None,
                "arm": e["arm"],
                "status": e.get("status"),
                "reason": e.get("reason"),
                "error_type": (e.get("error") or {}).get("type"),
            }
            if e.get("status") == "ok":
                m = e["metrics"]
                peak = e.get("gpu_peak_memory_bytes")
                row.update(
                    {
                        "decode_tokens_per_s": m["decode_tokens_per_s"]["mean"],
                        "decode_tokens_per_s_sd": m["decode_tokens_per_s"]["sd"],
                        "prefill_s": m["prefill_s"]["mean"],
                        "end_to_end_tokens_per_s": m["end_to_end_tokens_per_s"]["mean"],
                        "gpu_peak_memory_gib": peak / 2**30 if peak else None,
                        "gpu_peak_within_budget": (peak <= budget) if peak and budget else None,
                        "tokens_match": (e.get("token_check") or {}).get("tokens_match"),
                        "tokens_compared_with": (e.get("token_check") or {}).get("compared_with"),
                        "tokens_verified": (e.get("token_check") or {}).get("verified"),
                        "vs_offload_decode": ((e.get("ratios") or {}).get("vs_offload") or {}).get(
                            "decode_tokens_per_s"
                        ),
                        "fraction_of_hybrid_bound": (e.get("bound") or {}).get("fraction_of_hybrid_bound"),
                        "predicted_decode_tokens_per_s": (e.get("prediction") or {}).get(
                            "decode_tokens_per_s"
                        ),
                    }
                )
            rows.append(row)
    return rows


def step_row(work: Path, name: str) -> dict:
    """One step of gpu-check.sh: limit, seconds, exit code and what became of it
    (ok, failed, timed-out, skipped with its reason, running, or not-run)."""
    rc = _int(work / f"{name}.rc")
    skipped = _text(work / f"{name}.skipped")
    err = (_text(work / f"{name}.stderr") or "").splitlines()
    if skipped is not None:
        result = "skipped"
    elif rc is None:
        result = "running" if (work / f"{name}.stdout").exists() else "not-run"
    elif rc == 0:
        result = "ok"
    elif rc in (124, 137):
        result = "timed-out"
    else:
        result = "failed"
    return {
        "name": name,
        "result": result,
        "rc": rc,
        "limit_s": _int(work / f"{name}.limit"),
        "seconds": _int(work / f"{name}.seconds"),
        "skipped_reason": skipped,
        "stderr_last_line": err[-1] if err else None,
    }


def preflight_section(work: Path) -> dict:
    doc = _read(work / "preflight.json")
    if doc is None:
        return {"ok": None, "note": "no preflight record (it did not run or did not finish)"}
    versions = {
        name: (r.get("version") or "ok") if r.get("ok") else None
        for group in ("required", "optional")
        for name, r in (doc.get(group) or {}).items()
    }
    errors = {
        name: r.get("error")
        for group in ("required", "optional")
        for name, r in (doc.get(group) or {}).items()
        if not r.get("ok")
    }
    return {
        "ok": doc.get("ok"),
        "missing_required": doc.get("missing_required", []),
        "missing_optional": doc.get("missing_optional", []),
        "errors": errors,
        "versions": versions,
        "python": doc.get("python"),
        "cuda": doc.get("cuda"),
        "hetegen_version": (doc.get("hetegen_version") or {}).get("output"),
        "wheels_installed": {0: True, 1: False}.get(_int(work / "wheels.rc")),
    }


def profile_section(work: Path) -> dict:
    profile = _read(work / "profile.json") or {}
    gpu = profile.get("gpu") or {}
    section = {
        "saved": bool(profile),
        "gpu": gpu.get("name"),
        "note": profile.get("gpu_note"),
        "copy_engine_probe": gpu.get("copy_engine_probe"),
        "copy_engine_probe_error": gpu.get("copy_engine_probe_error"),
        "engine_costs": "measured"
        if profile.get("engine")
        else ("failed" if profile.get("engine_error") else ("missing" if profile else None)),
        "engine_error": profile.get("engine_error"),
    }
    transfers = [
        t for t in gpu.get("transfers", []) if t.get("direction") == "h2d" and t.get("memory") == "pinned"
    ]
    if transfers:
        largest = max(transfers, key=lambda t: t["size_bytes"])
        section["h2d_pinned_largest_gbps"] = largest["bytes_per_s"] / 1e9
    return section


def simulation_section(work: Path) -> dict:
    """The trace replay of the plan the arms step's hetegen arm ran, beside what it measured."""
    plan = _read(work / "simulate-plan.json") or {}
    decode = (plan.get("simulation") or {}).get("decode") or {}
    measured = [
        r["decode_tokens_per_s"]
        for r in arm_rows(_read(work / "arms.json"))
        if r["arm"] == "hetegen" and r.get("decode_tokens_per_s")
    ]
    section = {
        "simulated_decode_tokens_per_s": decode.get("simulated_tokens_per_s"),
        "predicted_decode_tokens_per_s": decode.get("predicted_tokens_per_s"),
        "ideal_decode_tokens_per_s": decode.get("ideal_tokens_per_s"),
        "measured_decode_tokens_per_s": measured[0] if measured else None,
        "copy_engines": (plan.get("simulation") or {}).get("copy_engines"),
    }
    if section["measured_decode_tokens_per_s"] and section["simulated_decode_tokens_per_s"]:
        section["simulated_over_measured"] = (
            section["simulated_decode_tokens_per_s"] / section["measured_decode_tokens_per_s"]
        )
    return section


def summarise(work: Path) -> dict:
    steps = {name: step_row(work, name) for name in STEPS}
    pre = steps["preflight"]
    if pre["rc"] is None and (work / "preflight.json").exists():
        pre["result"] = "ok" if (_read(work / "preflight.json") or {}).get("ok") else "failed"
    tests = (_text(work / "cuda-tests.stdout") or "").splitlines()
    summary = {
        "schema_version": 3,
        "kind": "hetegen.gpu-check",
        "budget": _read(work / "budget.json"),
        "preflight": preflight_section(work),
        "steps": list(steps.values()),
        "cuda_tests": {**steps["cuda-tests"], "last_line": tests[-1] if tests else None},
        "profile": {**steps["profile"], **profile_section(work)},
    }
    for name in BENCH_STEPS:
        doc = _read(work / f"{name}.json")
        summary[name] = {
            **steps[name],
            "complete": (doc or {}).get("complete"),
            "arms_requested": (doc or {}).get("arms_requested"),
            "rows": arm_rows(doc),
        }
    summary["sweep"]["plot"] = (work / "sweep.png").exists()
    summary["simulate"] = {**steps["simulate"], **simulation_section(work)}
    return summary


def main(work_dir: str) -> int:
    work = Path(work_dir)
    if not work.is_dir():
        print(f"gpu_check_summary: {work} is not a folder", file=sys.stderr)
        return 2
    summary = summarise(work)
    text = json.dumps(summary, indent=2) + "\n"
    tmp = work / f".gpu-check.json.{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, work / "gpu-check.json")
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "out/gpu-check"))
