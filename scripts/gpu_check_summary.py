"""Summarise the work folder of scripts/gpu-check.sh into gpu-check.json (and print it).

Usage: python3 scripts/gpu_check_summary.py WORK_DIR
Reads each step's exit code and stderr, smoke.json, arms.json and sweep.json (hetegen.bench
documents, possibly partial: "complete": false), profile.json and the CUDA tests' output;
writes WORK_DIR/gpu-check.json. Missing pieces are reported as missing; failed arms carry
their error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _rc(path: Path):
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
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


def _step(work: Path, name: str) -> dict:
    """Exit code and the last stderr line of one step of gpu-check.sh."""
    err = (
        (work / f"{name}.stderr").read_text(errors="replace").strip().splitlines()
        if (work / f"{name}.stderr").exists()
        else []
    )
    return {"rc": _rc(work / f"{name}.rc"), "stderr_last_line": err[-1] if err else None}


def main(work_dir: str) -> int:
    work = Path(work_dir)
    tests = (
        (work / "cuda-tests.stdout").read_text(errors="replace").strip().splitlines()
        if (work / "cuda-tests.stdout").exists()
        else []
    )
    profile = _read(work / "profile.json") or {}
    gpu = profile.get("gpu") or {}
    summary = {
        "schema_version": 2,
        "kind": "hetegen.gpu-check",
        "cuda_tests": {**_step(work, "cuda-tests"), "last_line": tests[-1] if tests else None},
        "smoke": {**_step(work, "smoke"), "arms": arm_rows(_read(work / "smoke.json"))},
        "profile": {**_step(work, "profile"), "gpu": gpu.get("name"), "note": profile.get("gpu_note")},
        "arms": {
            **_step(work, "arms"),
            "complete": (_read(work / "arms.json") or {}).get("complete"),
            "rows": arm_rows(_read(work / "arms.json")),
        },
        "quant": {
            **_step(work, "quant"),
            "complete": (_read(work / "quant.json") or {}).get("complete"),
            "rows": arm_rows(_read(work / "quant.json")),
        },
        "sweep": {
            **_step(work, "sweep"),
            "complete": (_read(work / "sweep.json") or {}).get("complete"),
            "rows": arm_rows(_read(work / "sweep.json")),
            "plot": (work / "sweep.png").exists(),
        },
    }
    transfers = [
        t for t in gpu.get("transfers", []) if t.get("direction") == "h2d" and t.get("memory") == "pinned"
    ]
    if transfers:
        largest = max(transfers, key=lambda t: t["size_bytes"])
        summary["profile"]["h2d_pinned_largest_gbps"] = largest["bytes_per_s"] / 1e9
    (work / "gpu-check.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "out/gpu-check"))
