#!/usr/bin/env bash
# The GPU check (scripts/gpu-check.sh) run whole on this CPU machine, inside a stand-in for
# the GPU machine's image (scripts/device-env.sh), with the wheels that travel to it
# (scripts/device-wheels.sh, for the stand-in's Python), a small preset and the device call's
# time limit; then checks what came back: the preflight passed, every step ran and exited 0,
# and every bench step has a row for every (budget, arm) it asked for (skipped GPU arms count,
# with their reason). CI runs it (.ci/run).
#
#   bash scripts/gpu-check-dry-run.sh [OUT_DIR]     (default out/gpu-check-dry-run)
#
# HETEGEN_DEVICE_ENV: the stand-in's folder (default .venv-device, built once and reused);
# PIN_PYTHON: the Python whose installed versions the wheels are pinned to (default python3,
# the project's venv when it is active).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-out/gpu-check-dry-run}"
ENV_DIR="${HETEGEN_DEVICE_ENV:-.venv-device}"
t0=$(date +%s)

bash scripts/device-env.sh "$ENV_DIR"
t_env=$(date +%s)
pyver="$("$ENV_DIR/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
WHEELS="$ENV_DIR/wheels-$pyver"  # the stand-in's Python, apart from the device's .whl/
bash scripts/device-wheels.sh --python-version "$pyver" --dest "$WHEELS"

rm -rf "$OUT_DIR"
home="$(mktemp -d "${TMPDIR:-/tmp}/hetegen-dry-run-home.XXXXXX")"
trap 'rm -rf "$home"' EXIT
# the moe step's model: a tiny random Qwen3-MoE folder (a preset's synthetic weights would be GBs)
"$ENV_DIR/bin/python" - "$home/tiny-moe" <<'EOF'
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tests.tiny_models import VOCAB_SIZE, build_tokenizer  # no hetegen import: no pydantic yet

torch.manual_seed(0)
folder = Path(sys.argv[1])
config = AutoConfig.for_model(
    "qwen3_moe", vocab_size=VOCAB_SIZE, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=128, num_experts=8,
    num_experts_per_tok=2, moe_intermediate_size=40, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
AutoModelForCausalLM.from_config(config).save_pretrained(folder)
build_tokenizer(folder)
EOF
t_check=$(date +%s)
set +e
env -u PYTHONPATH HETEGEN_HOME="$home" PYTHON="$ENV_DIR/bin/python" HETEGEN_CHECK_WHEELS="$WHEELS" \
  HETEGEN_CHECK_LIMIT_S="${HETEGEN_CHECK_LIMIT_S:-480}" \
  HETEGEN_CHECK_PRESET=opt-125m HETEGEN_CHECK_BUDGET=1150MiB HETEGEN_CHECK_BUDGETS=1150MiB,1300MiB \
  HETEGEN_CHECK_PROMPT_LEN=16 HETEGEN_CHECK_NEW_TOKENS=4 HETEGEN_CHECK_REPEAT=1 \
  HETEGEN_CHECK_MOE_MODEL="$home/tiny-moe" HETEGEN_CHECK_MOE_BUDGETS=1GiB \
  bash scripts/gpu-check.sh "$OUT_DIR"
rc=$?
set -e
t_end=$(date +%s)
echo "gpu-check dry run: gpu-check.sh exit $rc in $(( t_end - t_check )) s (stand-in ready in" \
  "$(( t_env - t0 )) s, wheels in $(( t_check - t_env )) s)" >&2

"$ENV_DIR/bin/python" - "$OUT_DIR" "$rc" <<'EOF'
"""Check what the dry run returned; print the step table."""
import json, sys, tarfile
from pathlib import Path

out, rc = Path(sys.argv[1]), int(sys.argv[2])
problems = []
files = sorted(p.name for p in out.iterdir())
if files != ["gpu-check.json", "gpu-check.tar.gz", "log.txt"]:
    problems.append(f"OUT holds {files}, not exactly log.txt, gpu-check.json, gpu-check.tar.gz")
try:
    summary = json.loads((out / "gpu-check.json").read_text())
except (OSError, ValueError) as exc:
    print(f"gpu-check dry run: FAILED: no readable gpu-check.json ({exc})", file=sys.stderr)
    sys.exit(1)
with tarfile.open(out / "gpu-check.tar.gz") as tar:
    packed = {Path(n).name for n in tar.getnames()}
if rc != 0:
    problems.append(f"gpu-check.sh exited {rc}")
pre = summary["preflight"]
if not pre.get("ok"):
    problems.append(f"preflight failed: missing {pre.get('missing_required')}")
print(f"{'step':<11} {'limit s':>7} {'seconds':>7}  result")
for s in summary["steps"]:
    print(f"{s['name']:<11} {s['limit_s'] if s['limit_s'] is not None else '-':>7} "
          f"{s['seconds'] if s['seconds'] is not None else '-':>7}  {s['result']}"
          + (f" ({s['skipped_reason']})" if s["skipped_reason"] else ""))
    if s["result"] != "ok":
        problems.append(f"step {s['name']}: {s['result']} (rc {s['rc']}): {s['stderr_last_line']}")
    elif s["name"] != "preflight" and f"{s['name']}.stdout" not in packed:
        problems.append(f"step {s['name']}: its output is not in gpu-check.tar.gz")
profile = summary["profile"]
if not profile.get("saved") or profile.get("engine_costs") != "measured":
    problems.append(f"profile: saved {profile.get('saved')}, engine costs {profile.get('engine_costs')}")
if profile.get("gpu") and not profile.get("copy_engine_probe"):  # a GPU profile has the probe
    problems.append("profile: no copy-engine probe")
for name in ("smoke", "arms", "quant", "moe", "sweep"):
    step = summary[name]
    requested = step.get("arms_requested") or []
    if not step.get("complete") or not requested:
        problems.append(f"{name}: bench document complete={step.get('complete')}, arms {requested}")
    budgets = sorted({r["gpu_budget_gib"] for r in step["rows"]}, key=str)
    for budget in budgets:
        got = [r["arm"] for r in step["rows"] if r["gpu_budget_gib"] == budget]
        if sorted(got) != sorted(requested):
            problems.append(f"{name} at {budget} GiB: rows for {got}, asked for {requested}")
    for r in step["rows"]:
        if r["status"] not in ("ok", "skipped") or (r["status"] == "skipped" and not r["reason"]):
            problems.append(f"{name}: arm {r['arm']} {r['status']}: {r['reason']}")
    print(f"  {name}: " + ", ".join(f"{r['arm']}@{r['gpu_budget_gib']:.2f}GiB {r['status']}"
                                     for r in step["rows"]))
if problems:
    print("gpu-check dry run: FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
    sys.exit(1)
print(f"gpu-check dry run: ok, every step ran; {len(files)} files back")
EOF
echo "gpu-check dry run: $(( $(date +%s) - t0 )) s in all" >&2
