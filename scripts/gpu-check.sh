#!/usr/bin/env bash
# One-call GPU check for a CUDA machine (issues 4 and 5). No network needed: it uses only torch,
# transformers, safetensors, accelerate, typer, rich, psutil, pytest and this repository.
#
#   bash scripts/gpu-check.sh [OUT_DIR]        (on the device tool: OUT_DIR defaults to $OUT)
#
# Steps, each under its own time limit so the whole call stays under ~8 minutes:
#   1. the CUDA-marked tests (pinned buffers, copy stream, greedy tokens on the GPU);
#   2. `hetegen profile --quick` (GPU matmul, transfers, concurrent CPU GEMV + H2D);
#   3. engine check: a synthetic PRESET (default opt-6.7b, fp16, random weights) at a small
#      budget (default 4GiB): decode tok/s of the plan vs pure offloading (same engine, every
#      cpu_fraction 0), GPU peak memory vs budget, token equality;
#   4. bench sweep: all arms over BUDGETS (default 4GiB,12GiB), JSON + CSV + PNG plot;
#   5. a summary JSON (gpu-check.json) written by scripts/gpu_check_summary.py.
# Dry run on a CPU machine: HETEGEN_CHECK_PRESET=opt-125m bash scripts/gpu-check.sh out/dry
# (GPU arms are then reported as skipped).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-out/gpu-check}}"
PRESET="${HETEGEN_CHECK_PRESET:-opt-6.7b}"
BUDGET="${HETEGEN_CHECK_BUDGET:-4GiB}"
BUDGETS="${HETEGEN_CHECK_BUDGETS:-4GiB,12GiB}"
PROMPT_LEN="${HETEGEN_CHECK_PROMPT_LEN:-128}"
NEW_TOKENS="${HETEGEN_CHECK_NEW_TOKENS:-32}"
REPEAT="${HETEGEN_CHECK_REPEAT:-3}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT_DIR"
# big synthetic weights stay outside OUT_DIR (they must not be copied back)
export HETEGEN_HOME="${HETEGEN_HOME:-/tmp/hetegen-gpu-check-home}"
export HETEGEN_NO_PROGRESS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$HETEGEN_HOME"
start=$(date +%s)
log() { echo "[gpu-check +$(( $(date +%s) - start ))s] $*" | tee -a "$OUT_DIR/log.txt" >&2; }
hetegen() { "$PY" -m hetegen_cli "$@"; }

log "machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)" 2>&1 | tee -a "$OUT_DIR/log.txt"

log "1/4 CUDA tests"
timeout 150 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests > "$OUT_DIR/cuda-tests.txt" 2>&1
echo "$?" > "$OUT_DIR/cuda-tests.rc"
tail -3 "$OUT_DIR/cuda-tests.txt" | tee -a "$OUT_DIR/log.txt"

log "2/4 profile --quick"
timeout 90 "$PY" -m hetegen_cli profile --quick --json --output "$HETEGEN_HOME/profile.json" > "$OUT_DIR/profile.json" 2> "$OUT_DIR/profile.stderr"
echo "$?" > "$OUT_DIR/profile.rc"

log "3/4 engine check: $PRESET at $BUDGET, hetegen vs offload"
timeout 210 "$PY" -m hetegen_cli bench --synthetic "$PRESET" --dtype float16 --gpu-memory "$BUDGET" \
  --arms hetegen,offload --prompt-len "$PROMPT_LEN" --max-new-tokens "$NEW_TOKENS" \
  --repeat "$REPEAT" --warmup 1 --output "$OUT_DIR/engine-check.json" > "$OUT_DIR/engine-check.txt" 2> "$OUT_DIR/engine-check.stderr"
echo "$?" > "$OUT_DIR/engine-check.rc"
tail -30 "$OUT_DIR/engine-check.txt" | tee -a "$OUT_DIR/log.txt"

remaining=$(( 450 - ($(date +%s) - start) ))
if [ "$remaining" -gt 60 ]; then
  log "4/4 bench sweep over $BUDGETS (time left ${remaining}s)"
  timeout "$remaining" "$PY" -m hetegen_cli bench --synthetic "$PRESET" --dtype float16 \
    --gpu-memory "$BUDGETS" --prompt-len "$(( PROMPT_LEN / 2 ))" --max-new-tokens "$(( NEW_TOKENS / 2 ))" \
    --repeat 2 --warmup 1 --output "$OUT_DIR/bench-sweep.json" --csv "$OUT_DIR/bench-sweep.csv" \
    --plot "$OUT_DIR/bench-sweep.png" > "$OUT_DIR/bench-sweep.txt" 2> "$OUT_DIR/bench-sweep.stderr"
  echo "$?" > "$OUT_DIR/bench-sweep.rc"
  tail -30 "$OUT_DIR/bench-sweep.txt" | tee -a "$OUT_DIR/log.txt"
else
  log "4/4 bench sweep skipped: only ${remaining}s left"
fi

"$PY" scripts/gpu_check_summary.py "$OUT_DIR" | tee -a "$OUT_DIR/log.txt"
log "done"
