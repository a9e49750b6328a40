"""Cold start of `hetegen run`: whole fresh processes, timed from outside and split from inside.

Usage: python scripts/cold_start.py [--model M] [--prompt "The capital of France is"]
       [-n 30] [--repeat 3] [--warmup 1] [--direct auto,off] [--output FILE.json]

Runs `python -m hetegen_cli run --json --prompt P -n N [--model M]` as a new process
`warmup` times (the model's conversion and the resolve caches are made then and the files
are in the page cache; those runs are not counted), then `repeat` times, and prints one JSON
document: the machine (CPU, cores, load average and /proc/pressure/cpu before and after),
the command, each run's wall seconds measured from outside (process start to exit) and its
own split (`timings.wall`: import, resolve, load, prefill, decode, other), and for each of
those the median, min and max over the runs. Every run must give the same text; the script
says so (`same_text`). The machine is what it is: run it on an idle one to quote numbers.

`--direct auto,off` times each run twice in turn, with HETEGEN_DIRECT=auto (the direct start
where the model's record allows it, docs/run.md) and =off (the regular path): one document per
setting under `arms`, each run's `engine`, and `same_text` over both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from hetegen_cli.core.jsonio import atomic_write

PARTS = ("import_s", "resolve_s", "load_s", "prefill_s", "decode_s", "other_s", "total_s")


def machine() -> dict:
    """What the numbers were measured on, and how busy it was."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": sys.version.split()[0], **load()}


def load() -> dict:
    """The load average and the CPU pressure (avg10, percent of time some task waited)."""
    doc: dict = {"loadavg": list(os.getloadavg())}
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        doc["cpu_pressure_avg10"] = float(first.split("avg10=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        pass
    return doc


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def one_run(command: list[str], direct: str = "auto") -> dict:
    start = time.perf_counter()
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "HETEGEN_DIRECT": direct}
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"the run failed (exit {done.returncode}):\n{done.stderr}")
    doc = json.loads(done.stdout)
    return {"wall_s": wall, "split": doc["timings"]["wall"], "text": doc["text"], "tokens": doc["token_ids"],
            "engine": doc["engine"]}  # fmt: skip


def cold_start_document(
    model: str | None,
    prompt: str,
    new_tokens: int,
    repeat: int,
    warmup: int,
    direct: tuple[str, ...] = ("auto",),
) -> dict:
    """Time `warmup` + `repeat` fresh `hetegen run` processes per HETEGEN_DIRECT setting in
    `direct` (interleaved); the document main prints."""
    command = [sys.executable, "-m", "hetegen_cli", "run", "--json", "--prompt", prompt]
    command += ["-n", str(new_tokens)] + (["--model", model] if model else [])
    before = machine()
    for _ in range(warmup):
        for d in direct:
            one_run(command, d)
    runs: dict[str, list[dict]] = {d: [] for d in direct}
    for _ in range(repeat):
        for d in direct:
            runs[d].append(one_run(command, d))
    every = [r for arm in runs.values() for r in arm]
    return {
        "kind": "hetegen.cold_start",
        "machine": before,
        "load_after": load(),
        "command": command[1:],
        "repeat": repeat,
        "warmup": warmup,
        "same_text": len({json.dumps(r["tokens"]) for r in every}) == 1,
        "text": every[0]["text"],
        "arms": {d: _arm(arm) for d, arm in runs.items()},
    }


def _arm(runs: list[dict]) -> dict:
    return {
        "engine": sorted({r["engine"] for r in runs}),
        "wall_s": spread([r["wall_s"] for r in runs]),
        "split": {p: spread([r["split"][p] for r in runs]) for p in PARTS if p in runs[0]["split"]},
        "runs": [{"wall_s": r["wall_s"], "split": r["split"]} for r in runs],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: hetegen's default model")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("-n", "--max-new-tokens", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--direct", default="auto", help="HETEGEN_DIRECT settings to compare, e.g. auto,off")
    ap.add_argument("--output", type=Path, default=None, help="also write the document here")
    args = ap.parse_args()
    direct = tuple(args.direct.split(","))
    doc = cold_start_document(args.model, args.prompt, args.max_new_tokens, args.repeat, args.warmup, direct)
    text = json.dumps(doc, indent=2)
    print(text)
    if args.output is not None:
        atomic_write(args.output, text + "\n")  # never a half-written file


if __name__ == "__main__":
    main()
