#!/usr/bin/env bash
# One prepared call for a CUDA machine (docs/gpu-check.md). That machine has no network and
# an image without pydantic, gguf, fastapi, openai, ...: the missing wheels travel in .whl/
# (scripts/device-wheels.sh; the device tool's `carry: [".whl"]`) and are installed here, and
# hetegen runs as `python3 -m hetegen_cli` from this checkout.
#
#   bash scripts/gpu-check.sh [OUT_DIR]        (on the device tool: OUT_DIR defaults to $OUT)
#
# OUT_DIR only ever holds three files, replaced whole (temp file, then mv) after every step and
# every PACK_EVERY_S (15 s) while a step runs, so whatever stops the run the evidence so far
# comes back:
#   log.txt             the machine, the import preflight, each step with its limit, exit
#                       code and duration, the stderr tail of every failing step
#   gpu-check.json      the summary (scripts/gpu_check_summary.py): preflight, one row per
#                       step, the profile's GPU figures, one row per (budget, arm)
#   gpu-check.tar.gz    every step's stdout, stderr and documents (bench JSON is rewritten
#                       after every arm, so a step cut short still leaves its rows)
# Time: the whole run ends by HETEGEN_CHECK_LIMIT_S (480, the device call's timeout_s) minus
# HETEGEN_CHECK_MARGIN_S (40). Each step's limit is min(its cap, the time left); a step is
# skipped, and logged as skipped, when less than its minimum is left. Cheapest evidence first:
#   0. wheels from .whl/ (if present) into a temporary --target folder, on PYTHONPATH; then
#      the import preflight: every module the check needs (stops here when one is missing)
#   1. cuda-tests: the CUDA-marked tests (tests/serve is left out where its packages are)
#                                                                   (cap 120 s, min 30 s)
#   2. profile: `hetegen profile --quick` (GPU rates, the copy-engine probe; saved before the
#      engine's fixed costs are measured, which are then added, or their error recorded)
#                                                                   (cap 150 s, min 30 s)
#   3. smoke: a synthetic opt-125m at a budget that splits most linears; greedy tokens of the
#      engine against the all-GPU arm                               (cap 90 s, min 30 s)
#   4. arms: gpu, hetegen, layer split, offload, Accelerate at one budget on a synthetic
#      OPT-6.7B fp16 (no CPU-only arms: they would load 13-27 GB more) (cap 200 s, min 60 s)
#   5. quant: the same with the model quantized to int4: hetegen, layer split, offload
#                                                                   (cap 170 s, min 60 s)
#   6. moe: a mixture-of-experts model (synthetic OLMoE-1B-7B fp16, or HETEGEN_CHECK_MOE_MODEL):
#      the all-GPU arm where it fits, hetegen (experts placed by the planner) and experts-on-cpu
#      (llama.cpp's --cpu-moe placement) at HETEGEN_CHECK_MOE_BUDGET   (cap 200 s, min 60 s)
#   7. sweep: the budget sweep with the time left (hetegen, layer split, offload) (min 45 s)
# Every bench step plans from the profile step's file (--profile). Arms run in the order
# given: the all-GPU baseline first, Accelerate (slowest) last.
# Dry run on a CPU machine: scripts/gpu-check-dry-run.sh (the device image's stand-in).
set -uo pipefail  # not -e: a failing step is evidence, not the end of the run
cd "$(dirname "$0")/.." || exit 1
OUT_DIR="${1:-${OUT:-out/gpu-check}}"
PRESET="${HETEGEN_CHECK_PRESET:-opt-6.7b}"
BUDGET="${HETEGEN_CHECK_BUDGET:-4GiB}"
BUDGETS="${HETEGEN_CHECK_BUDGETS:-4GiB,8GiB,16GiB}"
PROMPT_LEN="${HETEGEN_CHECK_PROMPT_LEN:-64}"
NEW_TOKENS="${HETEGEN_CHECK_NEW_TOKENS:-16}"
REPEAT="${HETEGEN_CHECK_REPEAT:-2}"
MOE_PRESET="${HETEGEN_CHECK_MOE_PRESET:-olmoe-1b-7b}"  # 13.8 GB in fp16: written once, on the device
MOE_BUDGETS="${HETEGEN_CHECK_MOE_BUDGETS:-6GiB,32GiB}"  # experts split; the whole model (the gpu arm)
MOE_SOURCE=(--synthetic "$MOE_PRESET")
[ -n "${HETEGEN_CHECK_MOE_MODEL:-}" ] && MOE_SOURCE=(--model "$HETEGEN_CHECK_MOE_MODEL")
LIMIT_S="${HETEGEN_CHECK_LIMIT_S:-480}"
MARGIN_S="${HETEGEN_CHECK_MARGIN_S:-40}"
PACK_EVERY_S="${HETEGEN_CHECK_PACK_EVERY_S:-15}"
WHEELS="${HETEGEN_CHECK_WHEELS:-.whl}"
PY="${PYTHON:-python3}"
KILL_GRACE_S=10  # `timeout` sends SIGKILL this long after SIGTERM
for var in LIMIT_S MARGIN_S PACK_EVERY_S PROMPT_LEN NEW_TOKENS REPEAT; do
  if ! [[ "${!var}" =~ ^[0-9]+$ ]]; then
    echo "gpu-check: HETEGEN_CHECK_$var must be a whole number, got '${!var}'" >&2
    exit 2
  fi
done
if [ $(( LIMIT_S - MARGIN_S )) -lt 60 ]; then
  echo "gpu-check: HETEGEN_CHECK_LIMIT_S ($LIMIT_S) minus the margin ($MARGIN_S) leaves under 60 s" >&2
  exit 2
fi
start=$(date +%s)
deadline=$(( start + LIMIT_S - MARGIN_S ))
mkdir -p "$OUT_DIR" || exit 1
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/hetegen-gpu-check.XXXXXX")"  # everything else, packed
# big synthetic weights stay outside OUT_DIR and WORK (they must not be copied back)
export HETEGEN_HOME="${HETEGEN_HOME:-/tmp/hetegen-gpu-check-home}"
export HETEGEN_NO_PROGRESS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$HETEGEN_HOME"
LOG="$OUT_DIR/log.txt"
: > "$LOG"
printf '{"limit_s": %s, "margin_s": %s, "started_unix": %s}\n' "$LIMIT_S" "$MARGIN_S" "$start" \
  > "$WORK/budget.json"
log() { echo "[gpu-check +$(( $(date +%s) - start ))s] $*" | tee -a "$LOG" >&2; }
left() { echo $(( deadline - $(date +%s) )); }

pack() {  # the summary and the archive, each written to a temp file in OUT_DIR, then moved
  local tmp="$OUT_DIR/.pack.$BASHPID"
  "$PY" scripts/gpu_check_summary.py "$WORK" > /dev/null 2> "$WORK/summary.stderr"
  if [ -f "$WORK/gpu-check.json" ]; then
    cp "$WORK/gpu-check.json" "$tmp.json" && mv -f "$tmp.json" "$OUT_DIR/gpu-check.json"
  fi
  tar -czf "$tmp.tar.gz" --warning=no-file-changed --exclude=./.stop-packer -C "$WORK" . 2>/dev/null
  if [ $? -le 1 ]; then  # 1: a file changed while read (a step is writing): the archive holds
    mv -f "$tmp.tar.gz" "$OUT_DIR/gpu-check.tar.gz"
  fi
  rm -f "$tmp.json" "$tmp.tar.gz"
}

PACKER=""
start_packer() {  # pack every PACK_EVERY_S while a step runs; stopped between two packs
  rm -f "$WORK/.stop-packer"
  (
    while :; do
      for _ in $(seq "$PACK_EVERY_S"); do
        [ -e "$WORK/.stop-packer" ] && exit 0
        sleep 1
      done
      pack
    done
  ) &
  PACKER=$!
}
stop_packer() {  # never kill it mid-pack: ask, and wait for the pack in progress
  [ -n "$PACKER" ] || return 0
  touch "$WORK/.stop-packer"
  wait "$PACKER" 2>/dev/null
  PACKER=""
  rm -f "$WORK/.stop-packer"
}
STEP_PID=""
finish() {  # on any exit: end a step still running (a signal stopped us), pack a last time
  [ -n "$STEP_PID" ] && kill -TERM "$STEP_PID" 2>/dev/null
  stop_packer
  pack
  [ -n "${HETEGEN_CHECK_KEEP_WORK:-}" ] || rm -rf "$WORK" "${SITE:-}"
}
trap finish EXIT
trap 'log "stopped by a signal"; exit 143' TERM INT

skip() {  # skip NAME REASON
  echo "$2" > "$WORK/$1.skipped"
  log "step $1: SKIPPED ($2)"
  pack
}

# step NAME CAP MIN COMMAND...: run COMMAND with the limit min(CAP, time left), stdout and
# stderr to WORK/NAME.*; record limit, exit code and seconds; on failure copy the last lines
# of its stderr into the log. Skipped when less than MIN seconds would be left for it.
step() {
  local name="$1" cap="$2" min="$3" avail limit t0 pid rc
  shift 3
  avail=$(( $(left) - KILL_GRACE_S ))
  limit=$(( cap < avail ? cap : avail ))
  echo "$limit" > "$WORK/$name.limit"
  if [ "$limit" -lt "$min" ]; then
    skip "$name" "${avail}s of the budget left, the step needs at least ${min}s"
    return 0
  fi
  log "step $name (limit ${limit}s): $*"
  t0=$(date +%s)
  timeout --kill-after="$KILL_GRACE_S" "$limit" "$@" > "$WORK/$name.stdout" 2> "$WORK/$name.stderr" &
  pid=$!
  STEP_PID=$pid
  start_packer
  wait "$pid"
  rc=$?
  STEP_PID=""
  stop_packer
  echo $(( $(date +%s) - t0 )) > "$WORK/$name.seconds"
  echo "$rc" > "$WORK/$name.rc"
  if [ "$rc" -eq 0 ]; then
    log "step $name: ok in $(cat "$WORK/$name.seconds")s"
  else
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
      log "step $name: TIMED OUT after ${limit}s"
    else
      log "step $name: FAILED (exit $rc) after $(cat "$WORK/$name.seconds")s"
    fi
    { echo "----- $name: last lines of stderr -----"; tail -n 40 "$WORK/$name.stderr"
      echo "----- $name: last lines of stdout -----"; tail -n 15 "$WORK/$name.stdout"
      echo "-----"; } >> "$LOG"
  fi
  pack
  return 0
}

log "machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
log "cpu: $(lscpu 2>/dev/null | grep -m1 'Model name' | sed 's/.*: *//') x $(nproc) | ram: $(free -g 2>/dev/null | awk '/Mem:/{print $2}') GiB"
log "budget: ${LIMIT_S}s limit - ${MARGIN_S}s margin = $(( LIMIT_S - MARGIN_S ))s for the steps"

# --- 0. the wheels the image lacks, then the import preflight ---------------------------------
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  SITE="$(mktemp -d "${TMPDIR:-/tmp}/hetegen-site.XXXXXX")"
  log "installing $(find "$WHEELS" -maxdepth 1 -type f -name '*.whl' | wc -l) wheels from $WHEELS into $SITE"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHEELS"/*.whl > "$WORK/wheels.stdout" 2> "$WORK/wheels.stderr"; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo 0 > "$WORK/wheels.rc"
  else
    echo 1 > "$WORK/wheels.rc"
    log "installing the wheels FAILED:"
    tail -n 20 "$WORK/wheels.stderr" >> "$LOG"
  fi
else
  log "no wheels in $WHEELS: using the image's packages only"
fi

log "preflight: importing the modules the check needs"
t0=$(date +%s)
echo 120 > "$WORK/preflight.limit"
timeout 120 "$PY" - "$WORK/preflight.json" > "$WORK/preflight.stdout" 2> "$WORK/preflight.stderr" <<'EOF'
"""Import every module the check needs; write what is there and what is missing."""
import importlib, importlib.metadata, json, os, subprocess, sys, time, traceback

REQUIRED = ["torch", "transformers", "safetensors", "typer", "rich", "psutil", "pydantic", "numpy",
            "hetegen_cli.cli.app", "hetegen_cli.profile.document", "hetegen_cli.measure.engine_costs",
            "hetegen_cli.bench.runner"]
OPTIONAL = {"accelerate": "the accelerate arm", "gguf": "GGUF models (not used by the check)",
            "matplotlib": "the sweep's plot", "hypothesis": "the property tests",
            "pytest": "the cuda-tests step"}
DISTS = {"psutil": "psutil", "rich": "rich", "typer": "typer", "pytest": "pytest"}

def probe(name):
    t0 = time.perf_counter()
    try:
        module = importlib.import_module(name)
    except BaseException as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500],
                "traceback": traceback.format_exc().strip().splitlines()[-6:]}
    version = getattr(module, "__version__", None)
    if version is None and "." not in name:
        try:
            version = importlib.metadata.version(DISTS.get(name, name))
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"ok": True, "version": None if version is None else str(version),
            "from": os.path.dirname(getattr(module, "__file__", "") or ""),
            "import_s": round(time.perf_counter() - t0, 3)}

doc = {"python": sys.version.split()[0], "executable": sys.executable,
       "pythonpath": os.environ.get("PYTHONPATH", ""),
       "required": {n: probe(n) for n in REQUIRED},
       "optional": {n: {**probe(n), "for": why} for n, why in OPTIONAL.items()}}
cli = subprocess.run([sys.executable, "-m", "hetegen_cli", "--version"], capture_output=True, text=True,
                     timeout=60)
doc["hetegen_version"] = {"ok": cli.returncode == 0, "rc": cli.returncode,
                          "output": (cli.stdout + cli.stderr).strip()[-500:]}
try:
    import torch
    cuda = torch.cuda.is_available()
    doc["cuda"] = {"available": cuda, "torch_cuda": torch.version.cuda,
                   "device": torch.cuda.get_device_name(0) if cuda else None}
except BaseException as exc:
    doc["cuda"] = {"available": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
doc["missing_required"] = [n for n, r in doc["required"].items() if not r["ok"]]
if not doc["hetegen_version"]["ok"]:
    doc["missing_required"].append("python -m hetegen_cli --version")
doc["missing_optional"] = [n for n, r in doc["optional"].items() if not r["ok"]]
doc["ok"] = not doc["missing_required"]
with open(sys.argv[1] + ".tmp", "w") as f:
    json.dump(doc, f, indent=2)
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
for group in ("required", "optional"):
    for n, r in doc[group].items():
        print(f"  {group:8} {n}: " + (f"{r['version'] or 'ok'} ({r['from']})" if r["ok"] else f"MISSING: {r['error']}"))
last = (doc["hetegen_version"]["output"].splitlines() or ["no output"])[-1]
print(f"  python -m hetegen_cli --version: {last}; cuda: {doc['cuda']}")
if not doc["ok"]:
    print("  MISSING (required): " + ", ".join(doc["missing_required"]))
sys.exit(0 if doc["ok"] else 3)
EOF
echo $? > "$WORK/preflight.rc"
echo $(( $(date +%s) - t0 )) > "$WORK/preflight.seconds"
cat "$WORK/preflight.stdout" >> "$LOG"
if [ "$(cat "$WORK/preflight.rc")" != 0 ]; then
  log "preflight FAILED: $(grep -m1 '^  MISSING (required)' "$WORK/preflight.stdout" | sed 's/^ *//' || echo 'it did not finish'); stopping here"
  tail -n 20 "$WORK/preflight.stderr" >> "$LOG"
  exit 1
fi
log "preflight: ok"
has() {  # has MODULE: the preflight imported it
  "$PY" -c "import json, sys; d = json.load(open(sys.argv[1])); sys.exit(0 if d['optional'].get(sys.argv[2], d['required'].get(sys.argv[2], {})).get('ok') else 1)" "$WORK/preflight.json" "$1"
}
hetegen() { "$PY" -m hetegen_cli "$@"; }

# --- 1. the CUDA-marked tests -------------------------------------------------------------------
if has pytest; then
  step cuda-tests 120 30 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests
  tail -n 3 "$WORK/cuda-tests.stdout" >> "$LOG"
else
  skip cuda-tests "pytest is not importable"
fi

# --- 2. the profile (saved before the engine's fixed costs, which may fail on their own) ------
step profile 150 30 "$PY" -m hetegen_cli profile --quick --output "$WORK/profile.json"
PROFILE_ARGS=()
if "$PY" -c "import sys; from hetegen_cli.profile.document import load_profile; load_profile(sys.argv[1])" \
    "$WORK/profile.json" 2>> "$WORK/profile.stderr"; then
  PROFILE_ARGS=(--profile "$WORK/profile.json")
  "$PY" -c "import json, sys; d = json.load(open(sys.argv[1])); e = d.get('engine_error'); print('profile: engine costs', 'measured' if d.get('engine') else 'MISSING: %s: %s' % (e['type'], e['message'][:300]) if e else 'not measured (cut short)', '| copy-engine probe:', (d.get('gpu') or {}).get('copy_engine_probe'))" \
    "$WORK/profile.json" >> "$LOG" 2>&1
else
  log "the profile step left no valid profile: the first bench step measures a quick one inside its own limit"
fi

# --- 3-6. bench: the all-GPU arm first (the token baseline), Accelerate last -------------------
# 1150MiB holds opt-125m's fixed items but few of its linears: most are split or streamed and
# the prefetch runs; 2GiB holds the whole model, so the all-GPU arm runs there and its greedy
# tokens are the baseline for the engine at 1150MiB
step smoke 90 30 "$PY" -m hetegen_cli bench --synthetic opt-125m --dtype float16 \
  --gpu-memory 1150MiB,2GiB --arms gpu,hetegen,offload --prompt-len 32 --max-new-tokens 8 \
  --repeat 1 --warmup 1 "${PROFILE_ARGS[@]}" --output "$WORK/smoke.json"

step arms 200 60 "$PY" -m hetegen_cli bench --synthetic "$PRESET" --dtype float16 \
  --gpu-memory "$BUDGET" --arms gpu,hetegen,layer-split,offload,accelerate \
  --prompt-len "$PROMPT_LEN" --max-new-tokens "$NEW_TOKENS" --repeat "$REPEAT" --warmup 1 \
  "${PROFILE_ARGS[@]}" --output "$WORK/arms.json"
tail -n 25 "$WORK/arms.stdout" >> "$LOG" 2>/dev/null

# the plan the hetegen arm ran, replayed from its trace (docs/plan.md, "Trace replay"): its
# simulated decode against the arm's measured one validates the replay on a real GPU
step simulate 60 20 "$PY" -m hetegen_cli plan --model "$PRESET" --dtype float16 --gpu-memory "$BUDGET" \
  --prompt-len "$PROMPT_LEN" --max-new-tokens "$NEW_TOKENS" --simulate --json "${PROFILE_ARGS[@]}" \
  --output "$WORK/simulate-plan.json"
"$PY" scripts/gpu_check_summary.py "$WORK" 2>/dev/null \
  | "$PY" -c "import json, sys; print('simulate:', json.dumps(json.load(sys.stdin)['simulate']))" >> "$LOG" 2>&1 || true

step quant 170 60 "$PY" -m hetegen_cli bench --synthetic "$PRESET" --quant int4 \
  --gpu-memory "$BUDGET" --arms hetegen,layer-split,offload --prompt-len "$PROMPT_LEN" \
  --max-new-tokens "$NEW_TOKENS" --repeat "$REPEAT" --warmup 1 "${PROFILE_ARGS[@]}" \
  --output "$WORK/quant.json"
tail -n 25 "$WORK/quant.stdout" >> "$LOG" 2>/dev/null

step moe 200 60 "$PY" -m hetegen_cli bench "${MOE_SOURCE[@]}" --dtype float16 \
  --gpu-memory "$MOE_BUDGETS" --arms gpu,hetegen,experts-on-cpu --prompt-len "$PROMPT_LEN" \
  --max-new-tokens "$NEW_TOKENS" --repeat 1 --warmup 1 "${PROFILE_ARGS[@]}" --output "$WORK/moe.json"
tail -n 25 "$WORK/moe.stdout" >> "$LOG" 2>/dev/null

PLOT_ARGS=()
has matplotlib && PLOT_ARGS=(--plot "$WORK/sweep.png")
step sweep 100000 45 "$PY" -m hetegen_cli bench --synthetic "$PRESET" --dtype float16 \
  --gpu-memory "$BUDGETS" --arms hetegen,layer-split,offload --prompt-len "$PROMPT_LEN" \
  --max-new-tokens "$NEW_TOKENS" --repeat 1 --warmup 1 "${PROFILE_ARGS[@]}" \
  --output "$WORK/sweep.json" --csv "$WORK/sweep.csv" "${PLOT_ARGS[@]}"

log "done in $(( $(date +%s) - start ))s of ${LIMIT_S}s; files: $(cd "$OUT_DIR" && echo *)"
