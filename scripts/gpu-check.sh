#!/usr/bin/env bash
# One prepared call for a CUDA machine (docs/gpu-check.md). No network, nothing installed: it
# runs `python3 -m hetegen_cli` from this checkout with torch, transformers, safetensors,
# accelerate, typer, rich, psutil, pytest (and pydantic) as they are on the machine.
#
#   bash scripts/gpu-check.sh [OUT_DIR]        (on the device tool: OUT_DIR defaults to $OUT)
#
# OUT_DIR only ever holds three files, rewritten after every step, so whatever stops the run
# (a step's time limit, the device's own limit) the evidence so far comes back:
#   log.txt             the steps, their exit codes, and the stderr tail of every failing step
#   gpu-check.json      the summary (scripts/gpu_check_summary.py): one row per (budget, arm)
#   gpu-check.tar.gz    every step's stdout, stderr and documents (bench JSON is rewritten
#                       after every arm, so a step cut short still leaves its rows)
# Steps, each under its own limit, at most TOTAL_S (540 s) in all:
#   1. the CUDA-marked tests                                   (limit 120 s)
#   2. hetegen profile --quick (the later steps plan from it)  (limit 90 s)
#   3. smoke: a synthetic opt-125m at a budget that splits most linears; greedy tokens of the
#      engine against the plain model on the GPU                (limit 90 s)
#   4. hetegen, offload, layer split, Accelerate and all-GPU at one budget on a synthetic
#      OPT-6.7B fp16 (no CPU-only arms: they would load 13-27 GB more)  (limit 200 s)
#   5. the same budget with the model quantized to int4 (issue 11: stored parts streamed and
#      dequantized on the GPU, resident linears quantized): hetegen, offload, layer split
#      (limit 170 s: the int4 copy of the synthetic model is made first)
#   6. the budget sweep with the time left (hetegen, offload, layer split)
# Dry run on a CPU machine: HETEGEN_CHECK_PRESET=opt-125m bash scripts/gpu-check.sh out/dry
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-out/gpu-check}}"
PRESET="${HETEGEN_CHECK_PRESET:-opt-6.7b}"
BUDGET="${HETEGEN_CHECK_BUDGET:-4GiB}"
BUDGETS="${HETEGEN_CHECK_BUDGETS:-4GiB,8GiB,16GiB}"
PROMPT_LEN="${HETEGEN_CHECK_PROMPT_LEN:-64}"
NEW_TOKENS="${HETEGEN_CHECK_NEW_TOKENS:-16}"
REPEAT="${HETEGEN_CHECK_REPEAT:-2}"
TOTAL_S="${HETEGEN_CHECK_TOTAL_S:-540}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/hetegen-gpu-check.XXXXXX")"  # everything else, packed
# big synthetic weights stay outside OUT_DIR and WORK (they must not be copied back)
export HETEGEN_HOME="${HETEGEN_HOME:-/tmp/hetegen-gpu-check-home}"
export HETEGEN_NO_PROGRESS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$HETEGEN_HOME"
start=$(date +%s)
LOG="$OUT_DIR/log.txt"
: > "$LOG"
log() { echo "[gpu-check +$(( $(date +%s) - start ))s] $*" | tee -a "$LOG" >&2; }

pack() {  # the summary and the archive, replaced atomically
  "$PY" scripts/gpu_check_summary.py "$WORK" > "$WORK/summary.stdout" 2> "$WORK/summary.stderr"
  [ -f "$WORK/gpu-check.json" ] && cp "$WORK/gpu-check.json" "$OUT_DIR/.gpu-check.json.tmp" \
    && mv "$OUT_DIR/.gpu-check.json.tmp" "$OUT_DIR/gpu-check.json"
  tar -czf "$OUT_DIR/.gpu-check.tar.gz.tmp" -C "$WORK" . 2>/dev/null \
    && mv "$OUT_DIR/.gpu-check.tar.gz.tmp" "$OUT_DIR/gpu-check.tar.gz"
}
trap pack EXIT

# step NAME LIMIT_S COMMAND...: run it with a time limit, stdout and stderr to WORK/NAME.*,
# record the exit code; on failure copy the last 40 lines of its stderr into the log
step() {
  local name="$1" limit="$2"
  shift 2
  log "step $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.stdout" 2> "$WORK/$name.stderr"
  local rc=$?
  echo "$rc" > "$WORK/$name.rc"
  if [ "$rc" -eq 0 ]; then
    log "step $name: ok"
  else
    [ "$rc" -eq 124 ] && log "step $name: TIMED OUT after ${limit}s" || log "step $name: FAILED (exit $rc)"
    { echo "----- $name: last lines of stderr -----"; tail -n 40 "$WORK/$name.stderr"
      echo "----- $name: last lines of stdout -----"; tail -n 15 "$WORK/$name.stdout"
      echo "-----"; } >> "$LOG"
  fi
  pack
  return 0
}
left() { echo $(( TOTAL_S - ($(date +%s) - start) )); }
hetegen() { "$PY" -m hetegen_cli "$@"; }

log "machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
log "cpu: $(lscpu 2>/dev/null | grep -m1 'Model name' | sed 's/.*: *//') x $(nproc) | ram: $(free -g 2>/dev/null | awk '/Mem:/{print $2}') GiB"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)" >> "$LOG" 2>&1

step cuda-tests 120 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests
tail -n 3 "$WORK/cuda-tests.stdout" >> "$LOG"

step profile 90 "$PY" -m hetegen_cli profile --quick --json --output "$HETEGEN_HOME/profile.json"
cp "$WORK/profile.stdout" "$WORK/profile.json" 2>/dev/null
pack

# 1150MiB holds opt-125m's fixed items but few of its linears: most are split or streamed
# and the prefetch runs; 2GiB holds the whole model, so the all-GPU arm runs there and its
# greedy tokens are the baseline for the engine at 1150MiB
step smoke 90 "$PY" -m hetegen_cli bench --synthetic opt-125m --dtype float16 --gpu-memory 1150MiB,2GiB \
  --arms hetegen,offload,gpu --prompt-len 32 --max-new-tokens 8 --repeat 1 --warmup 1 \
  --output "$WORK/smoke.json"

step arms "$(( $(left) < 200 ? $(left) : 200 ))" "$PY" -m hetegen_cli bench --synthetic "$PRESET" \
  --dtype float16 --gpu-memory "$BUDGET" --arms hetegen,offload,layer-split,accelerate,gpu \
  --prompt-len "$PROMPT_LEN" --max-new-tokens "$NEW_TOKENS" --repeat "$REPEAT" --warmup 1 \
  --output "$WORK/arms.json"
tail -n 25 "$WORK/arms.stdout" >> "$LOG"

if [ "$(left)" -gt 60 ]; then
  step quant "$(( $(left) < 170 ? $(left) : 170 ))" "$PY" -m hetegen_cli bench --synthetic "$PRESET" \
    --quant int4 --gpu-memory "$BUDGET" --arms hetegen,offload,layer-split --prompt-len "$PROMPT_LEN" \
    --max-new-tokens "$NEW_TOKENS" --repeat "$REPEAT" --warmup 1 --output "$WORK/quant.json"
  tail -n 25 "$WORK/quant.stdout" >> "$LOG"
else
  log "step quant: skipped, $(left)s left"
fi

if [ "$(left)" -gt 45 ]; then
  step sweep "$(left)" "$PY" -m hetegen_cli bench --synthetic "$PRESET" --dtype float16 \
    --gpu-memory "$BUDGETS" --arms hetegen,offload,layer-split --prompt-len "$PROMPT_LEN" \
    --max-new-tokens "$NEW_TOKENS" --repeat 1 --warmup 1 --output "$WORK/sweep.json" \
    --csv "$WORK/sweep.csv" --plot "$WORK/sweep.png"
else
  log "step sweep: skipped, $(left)s left"
fi

pack
log "done in $(( $(date +%s) - start ))s; files: $(ls "$OUT_DIR" | tr '\n' ' ')"
