#!/usr/bin/env bash
# A CPU stand-in for the GPU machine's Python image (docs/gpu-check.md), to dry-run the GPU
# check here: a virtual environment in DIR with that image's packages as far as they matter to
# hetegen, and without the ones the image lacks.
#
#   bash scripts/device-env.sh DIR        (PYTHON picks the interpreter, default python3)
#
# The image (the device tool's KINDS.md, read 2026-11): Python 3.12, torch 2.11.0 (CUDA),
# transformers 5.17.0, accelerate 1.15.0, safetensors 0.8.0, tokenizers 0.23.2,
# huggingface_hub 1.33.0, numpy 2.5.2, and typer, rich, psutil, pytest, hypothesis,
# prometheus-client, matplotlib, httpx, jinja2, pyyaml, tqdm (versions not listed); NOT
# pydantic, pydantic-core, fastapi, uvicorn, starlette, openai, gguf, llama-cpp-python.
# Stand-ins, where this machine cannot have the image's own:
#   torch 2.13.0+cpu stands in for 2.11.0 CUDA (the CPU build on this machine's disk);
#   numpy 2.4.6 for 2.5.2 (2.5 has no wheels for Python 3.11);
#   typer 0.28.0 (the image's version is not listed; 0.29 and later require pydantic, which
#   the image lacks, so the image's is older);
#   the other unlisted versions are the project venv's.
# hetegen itself is not installed here: the check runs `python -m hetegen_cli` from the
# checkout, as on the device. The environment is built once per spec: DIR/.hetegen-device-env
# holds the spec's hash, and a second call with the same spec only re-verifies it.
# It ends with a check that none of the missing packages can be imported.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -ne 1 ] || [ -z "$1" ] || [[ "$1" == -* ]]; then
  echo "usage: scripts/device-env.sh DIR" >&2
  exit 2
fi
DIR="$1"
PY="${PYTHON:-python3}"

# name==stand-in version | the image's version (or ? when not listed)
SPEC=(
  "torch==2.13.0|2.11.0 (CUDA)"
  "transformers==5.17.0|5.17.0"
  "accelerate==1.15.0|1.15.0"
  "safetensors==0.8.0|0.8.0"
  "tokenizers==0.23.2|0.23.2"
  "huggingface_hub==1.33.0|1.33.0"
  "numpy==2.4.6|2.5.2"
  "typer==0.28.0|?"
  "rich==15.0.0|?"
  "psutil==7.2.2|?"
  "pytest==9.2.0|?"
  "hypothesis==6.170.27|?"
  "prometheus-client==0.26.0|?"
  "matplotlib==3.11.2|?"
  "httpx==0.29.0|?"
  "jinja2==3.1.6|?"
  "pyyaml==6.0.4|?"
  "tqdm==4.70.1|?"
)
# import names of what the image lacks
ABSENT=(pydantic pydantic_core fastapi uvicorn starlette openai gguf llama_cpp)

if ! command -v "$PY" >/dev/null 2>&1; then
  echo "device-env: no Python interpreter '$PY' (set PYTHON)" >&2
  exit 1
fi
pins=()
for entry in "${SPEC[@]}"; do pins+=("${entry%%|*}"); done
pyver="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
stamp_text="$(printf '%s\n' "python $pyver" "${pins[@]}" "absent ${ABSENT[*]}")"
hash="$(printf '%s' "$stamp_text" | sha256sum | cut -c1-16)"
stamp="$DIR/.hetegen-device-env"

verify() {  # the listed packages are there, the absent ones cannot be imported
  "$DIR/bin/python" - "${ABSENT[@]}" <<'EOF'
import importlib.util, sys
present = [name for name in sys.argv[1:] if importlib.util.find_spec(name) is not None]
if present:
    print("device-env: importable although the GPU machine's image lacks them: " + ", ".join(present),
          file=sys.stderr)
    sys.exit(1)
import torch, transformers, accelerate, safetensors, typer  # noqa: F401  (the image has these)
EOF
}

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$hash" ] && [ -x "$DIR/bin/python" ]; then
  verify
  echo "device-env: $DIR is up to date (spec $hash, Python $pyver)" >&2
  exit 0
fi

start=$(date +%s)
if [ -e "$DIR" ] && [ ! -f "$stamp" ] && [ -n "$(ls -A "$DIR" 2>/dev/null)" ]; then
  echo "device-env: $DIR exists and is not a device environment; choose an empty or new folder" >&2
  exit 1
fi
rm -rf "$DIR"
"$PY" -m venv "$DIR"
echo "device-env: installing into $DIR (Python $pyver): ${pins[*]}" >&2
# (pip's warnings about this machine's local index folders are noise: filtered out)
"$DIR/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[@]}" 2> >(
  grep -v "^WARNING: Location 'file://" >&2)
if ! verify; then
  "$DIR/bin/python" -m pip list 2>/dev/null | grep -i -E '^(pydantic|fastapi|uvicorn|starlette|openai|gguf|llama)' >&2 || true
  echo "device-env: a pinned package pulled in one the image lacks (above); fix the pins" >&2
  exit 1
fi
printf '%s\n' "$hash" > "$stamp.tmp" && mv "$stamp.tmp" "$stamp"

echo "device-env: built in $(( $(date +%s) - start )) s; package: stand-in (image)" >&2
frozen="$("$DIR/bin/python" -m pip list --format=freeze 2>/dev/null | tr '[:upper:]_' '[:lower:]-')"
for entry in "${SPEC[@]}"; do
  pin="${entry%%|*}"
  name="${pin%%==*}"
  key="$(echo "$name" | tr '[:upper:]_' '[:lower:]-')"
  have="$(echo "$frozen" | sed -n "s/^$key==//p")"
  echo "  $name: ${have:-MISSING} (image: ${entry#*|})" >&2
done
