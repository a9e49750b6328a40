"""Summarise a scripts/gpu-check.sh output folder into gpu-check.json (and print it).

Usage: python3 scripts/gpu_check_summary.py OUT_DIR
Reads engine-check.json and bench-sweep.json (hetegen.bench documents), cuda-tests.txt and
profile.json; writes OUT_DIR/gpu-check.json. Missing pieces are reported as missing.
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


def main(out_dir: str) -> int:
    out = Path(out_dir)
    cuda_log = (
        (out / "cuda-tests.txt").read_text().strip().splitlines() if (out / "cuda-tests.txt").exists() else []
    )
    profile = _read(out / "profile.json") or {}
    gpu = profile.get("gpu") or {}
    summary = {
        "schema_version": 1,
        "kind": "hetegen.gpu-check",
        "cuda_tests": {"rc": _rc(out / "cuda-tests.rc"), "last_line": cuda_log[-1] if cuda_log else None},
        "profile": {"rc": _rc(out / "profile.rc"), "gpu": gpu.get("name"), "note": profile.get("gpu_note")},
        "engine_check": {
            "rc": _rc(out / "engine-check.rc"),
            "arms": arm_rows(_read(out / "engine-check.json")),
        },
        "bench_sweep": {
            "rc": _rc(out / "bench-sweep.rc"),
            "arms": arm_rows(_read(out / "bench-sweep.json")),
            "plot": (out / "bench-sweep.png").exists(),
        },
    }
    transfers = [
        t for t in gpu.get("transfers", []) if t.get("direction") == "h2d" and t.get("memory") == "pinned"
    ]
    if transfers:
        summary["profile"]["h2d_pinned_largest_gbps"] = (
            max(transfers, key=lambda t: t["size_bytes"])["bytes_per_s"] / 1e9
        )
    (out / "gpu-check.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "out/gpu-check"))
