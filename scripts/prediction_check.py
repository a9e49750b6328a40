"""Issue 12's table: predicted against measured decode tok/s and prefill seconds, per case.

Usage: python scripts/prediction_check.py [--repeat 3] [--rounds 2] [--out DIR] [--cases a,b,c]

Cases (each a `hetegen bench --json` run; every arm reports `prediction_check`):
  default   the default model in float32 (--quant none), prompt 512, 32 new tokens: the plain
            model (`reference`), the all-CPU formats (`cpu`) and the all-CPU plan through the
            engine (`hetegen`)
  opt13b    a synthetic OPT-1.3B in bfloat16, prompt 128, 16 new tokens: `reference` and `cpu`
  mixed     the default model in float32 with a plan that has a GPU share (a copy of this
            machine's profile with a made-up GPU section, --gpu-memory 1.45GiB), run on the CPU
            stand-in (`hetegen`), prompt 256, 16 new tokens

Round 1 is measured with the profile as it is; then `hetegen calibrate` refits the fixed
terms from round 1's documents; the next rounds are measured with the calibration (new runs,
not the ones calibrated on). Medians of `--repeat` timed runs per arm (bench's own). The machine
is shared: compare within a round. Needs a saved profile (`hetegen profile --quick`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.fakes: the made-up GPU

from hetegen_cli.core import paths

GPU = {  # a made-up GPU: PCIe-4-like copies, fast math; only the plan's split depends on it
    "name": "MADE-UP GPU for the stand-in check",
    "total_memory_bytes": 24 * 2**30,
    "free_memory_bytes": 23 * 2**30,
    "compute_capability": "8.6",
}


def mixed_profile(saved: Path, out: Path) -> Path:
    """This machine's profile with a made-up GPU section (the CPU part is real)."""
    from tests.fakes import make_profile

    doc = json.loads(saved.read_text())
    fake = make_profile(
        gpu=True, pcie_bw=8e9, hbm=900e9, gpu_flops=100e12, gpu_call_s=10e-6, pcie_copy_s=10e-6
    )
    doc["gpu"] = dict(fake["gpu"], **GPU)
    doc["gpu_note"] = None
    out.write_text(json.dumps(doc))
    return out


def bench(args: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "hetegen_cli", "bench", *args, "--json", "--output", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, HETEGEN_NO_PROGRESS="1"))
    return json.loads(out.read_text())


def rows(doc: dict, case: str) -> list[dict]:
    found = []
    for budget in doc["budgets"]:
        for arm in budget["arms"]:
            c = arm.get("prediction_check")
            if arm.get("status") != "ok" or not c:
                continue
            d, p = c["decode_tokens_per_s"], c["phases"]["prefill"]
            found.append(
                {
                    "case": f"{case}/{arm['arm']}",
                    "dtype": arm["info"].get("compute_dtype"),
                    "decode_pred": d["predicted"],
                    "decode_meas": d["measured"],
                    "decode_err": d["error"],
                    "prefill_pred": p["predicted_s"],
                    "prefill_meas": p["measured_s"],
                    "prefill_err": p["measured_s"] / p["predicted_s"] - 1,
                    "calibrated": c["calibrated"],
                }
            )
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="prediction-check")
    ap.add_argument("--cases", default="default,opt13b,mixed")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = paths.default_profile_path()
    cases = {
        "default": [
            "--quant",
            "none",
            "--prompt-len",
            "512",
            "--max-new-tokens",
            "32",
            "--arms",
            "reference,cpu,hetegen",
        ],
        "opt13b": [
            "--synthetic",
            "opt-1.3b",
            "--dtype",
            "bfloat16",
            "--prompt-len",
            "128",
            "--max-new-tokens",
            "16",
            "--arms",
            "reference,cpu",
        ],
        "mixed": [
            "--quant",
            "none",
            "--profile",
            str(mixed_profile(saved, out / "mixed-profile.json")),
            "--gpu-memory",
            "1.45GiB",
            "--prompt-len",
            "256",
            "--max-new-tokens",
            "16",
            "--arms",
            "hetegen",
        ],
    }
    common = ["--warmup", "1", "--repeat", str(a.repeat)]
    for r in range(a.rounds):
        docs = []
        for case in a.cases.split(","):
            path = out / f"round{r + 1}-{case}.json"
            docs.append(path)
            for row in rows(bench(cases[case] + common, path), case):
                print(
                    f"round {r + 1} | {row['case']:<18} | {row['dtype']:<17} | decode pred "
                    f"{row['decode_pred']:6.2f} meas {row['decode_meas']:6.2f} tok/s err "
                    f"{row['decode_err']:+6.1%} | prefill pred {row['prefill_pred']:.3f} meas "
                    f"{row['prefill_meas']:.3f} s err {row['prefill_err']:+6.1%} | "
                    f"{'calibrated' if row['calibrated'] else 'profile only'}",
                    flush=True,
                )
        if r == 0 and a.rounds > 1:  # refit the fixed terms from round 1 (this profile's runs)
            cal = [str(p) for p in docs if "mixed" not in p.name]
            subprocess.run([sys.executable, "-m", "hetegen_cli", "calibrate", *cal], check=True)
            mixed = [p for p in docs if "mixed" in p.name]
            if mixed:  # the stand-in case was predicted with the mixed profile: its own calibration
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "hetegen_cli",
                        "calibrate",
                        str(mixed[0]),
                        "--profile",
                        str(out / "mixed-profile.json"),
                    ],
                    check=True,
                )


if __name__ == "__main__":
    main()
