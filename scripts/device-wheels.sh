#!/usr/bin/env bash
# The wheels hetegen needs that the GPU machine's image lacks (docs/gpu-check.md), downloaded
# here for the device's Python, to travel with the working tree (the device tool's
# `carry: [".whl"]`) and be installed there, with no network, by scripts/gpu-check.sh:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#
#   bash scripts/device-wheels.sh [--python-version X.Y] [--dest DIR]
#
# --python-version: the device's Python (default 3.12); --dest: default .whl (git-ignored).
# The versions are the project venv's (`pip show` through PIN_PYTHON, default python3: run it
# with the project's venv active). Wheels: pydantic, pydantic-core, annotated-types,
# typing-inspection (pydantic's), typing-extensions (pydantic needs >= 4.16, the image's
# version is not listed) and gguf (its own needs, numpy, pyyaml, requests and tqdm, are in
# the image: checked below against the image's package list). One version of each; a second
# run with the same versions downloads nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER="3.12"
DEST=".whl"
usage() { echo "usage: scripts/device-wheels.sh [--python-version X.Y] [--dest DIR]" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) [ $# -ge 2 ] || usage; PYVER="$2"; shift 2 ;;
    --dest) [ $# -ge 2 ] || usage; DEST="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) usage ;;
  esac
done
if ! [[ "$PYVER" =~ ^3\.[0-9]+$ ]]; then
  echo "device-wheels: --python-version must look like 3.12, got '$PYVER'" >&2
  exit 2
fi
PIN_PY="${PIN_PYTHON:-python3}"
PACKAGES=(pydantic pydantic-core annotated-types typing-inspection typing-extensions gguf)
# the GPU machine's image (the device tool's KINDS.md, read 2026-11-17), for the needs check
IMAGE="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
certifi charset-normalizer click cloudpickle colorama contourpy cycler filelock fonttools
frozenlist fsspec h11 hf-xet httpcore httpx huggingface-hub hypothesis idna iniconfig jinja2
kiwisolver markdown-it-py markupsafe matplotlib mdurl mpmath networkx numpy packaging pillow pip
pluggy prometheus-client propcache protobuf psutil pygments pyparsing pytest python-dateutil
pyyaml regex requests rich safetensors sentencepiece setuptools shellingham six sympy tokenizers
torch tqdm transformers triton typer typing-extensions urllib3 wheel"

pins=()
for name in "${PACKAGES[@]}"; do
  version="$("$PIN_PY" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')"
  if [ -z "$version" ]; then
    echo "device-wheels: $name is not installed in $PIN_PY's environment (activate the project venv)" >&2
    exit 1
  fi
  pins+=("$name==$version")
done
stamp="$DEST/.hetegen-wheels"
want="$(printf '%s\n' "python $PYVER" "${pins[@]}")"
mkdir -p "$DEST"

count_ours() {  # how many of our packages' wheels are in DEST
  local n=0 name norm
  for name in "${PACKAGES[@]}"; do
    norm="${name//-/_}"
    compgen -G "$DEST/${norm}-*.whl" >/dev/null && n=$((n + 1))
  done
  echo "$n"
}

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ "$(count_ours)" -eq "${#PACKAGES[@]}" ]; then
  echo "device-wheels: $DEST is up to date (Python $PYVER)" >&2
else
  for name in "${PACKAGES[@]}"; do  # one version of each: drop what an earlier run left
    rm -f "$DEST/${name//-/_}"-*.whl
  done
  rm -f "$stamp"
  echo "device-wheels: downloading for Python $PYVER into $DEST: ${pins[*]}" >&2
  "$PIN_PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$DEST" "${pins[@]}" 2> >(grep -v "^WARNING: Location 'file://" >&2)
  printf '%s\n' "$want" > "$stamp.tmp" && mv "$stamp.tmp" "$stamp"
fi

# every wheel's needs (Requires-Dist without extras) must be another wheel here or in the image
"$PIN_PY" - "$DEST" "$IMAGE" <<'EOF'
import re, sys, zipfile
from pathlib import Path

dest, image = Path(sys.argv[1]), set(sys.argv[2].split())
def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()
wheels = sorted(dest.glob("*.whl"))
ours = {norm(w.name.split("-")[0]) for w in wheels}
missing = []
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if not line.startswith("Requires-Dist:") or "extra ==" in line:
                continue
            req = line.split(":", 1)[1].strip()
            if "platform_system == \"Windows\"" in req or "platform_system == 'Windows'" in req:
                continue
            need = norm(re.match(r"[A-Za-z0-9_.-]+", req).group(0))
            if need not in ours and need not in image:
                missing.append(f"{w.name} needs {req}")
if missing:
    print("device-wheels: needed but neither a wheel here nor in the image:\n  " + "\n  ".join(missing),
          file=sys.stderr)
    sys.exit(1)
EOF
total=$(du -cb "$DEST"/*.whl | tail -n 1 | cut -f1)
ls -1 "$DEST"/*.whl >&2
echo "device-wheels: $(find "$DEST" -maxdepth 1 -type f -name '*.whl' | wc -l) wheels, $(( total / 1024 )) KiB in all, in $DEST" >&2
