"""The GPU check's scripts (docs/gpu-check.md) without running a check: the summary of a work
folder in every state a step can be left in, and the scripts' one-line errors on bad input.
The whole check runs in CI as scripts/gpu-check-dry-run.sh."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def summary_module():
    spec = importlib.util.spec_from_file_location("gpu_check_summary", REPO / "scripts/gpu_check_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench(arms_by_budget: dict[int, list[tuple[str, str]]], complete: bool) -> dict:
    return {
        "complete": complete,
        "arms_requested": sorted({a for arms in arms_by_budget.values() for a, _ in arms}),
        "budgets": [
            {
                "gpu_budget_bytes": budget,
                "arms": [
                    {"arm": a, "status": status, "reason": None if status == "ok" else "no CUDA GPU"}
                    | (
                        {
                            "metrics": {
                                "decode_tokens_per_s": {"mean": 5.0, "sd": 0.1},
                                "prefill_s": {"mean": 0.2},
                                "end_to_end_tokens_per_s": {"mean": 4.0},
                            }
                        }
                        if status == "ok"
                        else {}
                    )
                    for a, status in arms
                ],
            }
            for budget, arms in arms_by_budget.items()
        ],
    }


def test_summary_of_a_run_cut_short(tmp_path, summary_module):
    work = tmp_path
    (work / "budget.json").write_text('{"limit_s": 480, "margin_s": 40, "started_unix": 1}')
    (work / "preflight.json").write_text(
        json.dumps(
            {
                "ok": True,
                "missing_required": [],
                "missing_optional": ["gguf"],
                "required": {"torch": {"ok": True, "version": "2.11.0"}},
                "optional": {"gguf": {"ok": False, "error": "ModuleNotFoundError: gguf"}},
                "cuda": {"available": True, "device": "NVIDIA H100"},
                "hetegen_version": {"output": "hetegen 0.1.0"},
            }
        )
    )
    for name, rc, seconds in (
        ("preflight", 0, 3),
        ("cuda-tests", 1, 40),
        ("profile", 0, 70),
        ("smoke", 124, 90),
    ):
        (work / f"{name}.rc").write_text(f"{rc}\n")
        (work / f"{name}.seconds").write_text(f"{seconds}\n")
        (work / f"{name}.limit").write_text("90\n")
        (work / f"{name}.stdout").write_text("")
        (work / f"{name}.stderr").write_text("first\nlast line\n")
    (work / "cuda-tests.stdout").write_text("F.\n1 failed, 9 passed in 30s\n")
    (work / "arms.stdout").write_text("")  # running when packed
    (work / "quant.skipped").write_text("20s of the budget left, the step needs at least 60s\n")
    (work / "profile.json").write_text(
        json.dumps(
            {
                "gpu": {
                    "name": "NVIDIA H100",
                    "copy_engine_probe": {"h2d_copy_engines": 1, "small_copy_during_big_s": 0.01},
                    "transfers": [
                        {"direction": "h2d", "memory": "pinned", "size_bytes": 1 << 20, "bytes_per_s": 2e10},
                        {"direction": "h2d", "memory": "pinned", "size_bytes": 1 << 28, "bytes_per_s": 5e10},
                    ],
                },
                "gpu_note": None,
                "engine": None,
                "engine_error": {"type": "RuntimeError", "message": "CUDA error", "traceback": ["x"]},
            }
        )
    )
    (work / "smoke.json").write_text(
        json.dumps(_bench({2**30: [("gpu", "ok"), ("hetegen", "ok"), ("offload", "skipped")]}, False))
    )
    assert summary_module.main(str(work)) == 0
    doc = json.loads((work / "gpu-check.json").read_text())
    assert not list(work.glob(".gpu-check.json.*"))  # written through a temp file
    results = {s["name"]: s["result"] for s in doc["steps"]}
    assert results == {
        "preflight": "ok",
        "cuda-tests": "failed",
        "profile": "ok",
        "smoke": "timed-out",
        "arms": "running",
        "simulate": "not-run",
        "quant": "skipped",
        "moe": "not-run",
        "sweep": "not-run",
    }
    assert doc["quant"]["skipped_reason"].startswith("20s of the budget left")
    assert doc["cuda_tests"]["last_line"] == "1 failed, 9 passed in 30s"
    assert doc["cuda_tests"]["stderr_last_line"] == "last line"
    assert doc["preflight"]["ok"] is True and doc["preflight"]["missing_optional"] == ["gguf"]
    assert doc["preflight"]["versions"] == {"torch": "2.11.0", "gguf": None}
    profile = doc["profile"]
    assert profile["engine_costs"] == "failed" and profile["engine_error"]["type"] == "RuntimeError"
    assert profile["copy_engine_probe"]["h2d_copy_engines"] == 1
    assert profile["h2d_pinned_largest_gbps"] == pytest.approx(50.0)
    smoke = doc["smoke"]
    assert smoke["complete"] is False
    assert [(r["arm"], r["status"]) for r in smoke["rows"]] == [
        ("gpu", "ok"),
        ("hetegen", "ok"),
        ("offload", "skipped"),
    ]
    assert smoke["rows"][0]["decode_tokens_per_s"] == 5.0 and smoke["rows"][2]["reason"] == "no CUDA GPU"
    assert doc["sweep"]["rows"] == [] and doc["sweep"]["plot"] is False


def test_summary_of_a_folder_that_is_not_there(tmp_path, summary_module, capsys):
    assert summary_module.main(str(tmp_path / "missing")) == 2
    assert "is not a folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("script", "args", "env", "message"),
    [
        (
            "gpu-check.sh",
            [],
            {"HETEGEN_CHECK_LIMIT_S": "soon"},
            "HETEGEN_CHECK_LIMIT_S must be a whole number",
        ),
        ("gpu-check.sh", [], {"HETEGEN_CHECK_LIMIT_S": "90"}, "leaves under 60 s"),
        ("device-wheels.sh", ["--python-version", "three"], {}, "--python-version must look like 3.12"),
        ("device-wheels.sh", ["--bogus"], {}, "usage: scripts/device-wheels.sh"),
        ("device-env.sh", [], {}, "usage: scripts/device-env.sh DIR"),
    ],
)
def test_scripts_reject_bad_input_in_one_line(tmp_path, script, args, env, message):
    out = tmp_path / "out"
    cmd = ["bash", str(REPO / "scripts" / script), *args]
    if script == "gpu-check.sh":
        cmd.append(str(out))
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr
    assert not out.exists()  # nothing written before the input was checked
