#!/usr/bin/env bash
# Build the packs of tests/data/formats/: one pack of each format version, as the code of this checkout writes
# them, for tests/test_format_versions.py (packs made by older code must keep loading). Do not rebuild them when
# the format changes: they stand for the packs already out there; add the new version's pack instead.
#   v1.pack  a CPU pack                                   (models.py:plain, .venv: torch 2.13)
#   v2.pack  CPU + CUDA entries built without a GPU       (models.py:plain, .venv-cuda: torch 2.14.1, sm_80)
#   v3.pack  a pack with state                            (models.py:stateful, .venv)
#   v4.pack  a dynamic dimension without an upper bound   (models.py:unbounded, .venv)
# All for --cpu-isa x86-64, so that every x86-64 host runs their CPU code. BUILT records the commit and torch.
set -euo pipefail
cd "$(dirname "$0")/../../.."
PY=${PYTHON:-.venv/bin/python}
PY_CUDA=${PYTHON_CUDA:-.venv-cuda/bin/python}
out=tests/data/formats
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export TORCHINDUCTOR_CACHE_DIR="$work/inductor"
build() {  # PYTHON NAME TARGET ARGS...
  local py=$1 name=$2 target=$3
  shift 3
  "$py" -m aotpack build "$out/models.py:$target" -o "$work/$name.pack" --cpu-isa x86-64 --no-cache --quiet "$@"
}
build "$PY" v1 plain
build "$PY_CUDA" v2 plain --device cpu --device cuda --cuda-arch 80 --without-gpu
build "$PY" v3 stateful
build "$PY" v4 unbounded
cp "$work"/v*.pack "$out"/
{
  echo "commit $(git rev-parse HEAD)"
  for py in "$PY" "$PY_CUDA"; do echo "$py: torch $("$py" -c 'import torch; print(torch.__version__)')"; done
} > "$out/BUILT"
ls -l "$out"/*.pack
