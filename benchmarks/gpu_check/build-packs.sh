#!/usr/bin/env bash
# Build the packs that benchmarks/gpu_check.sh runs on a GPU machine: the examples with a CPU entry and a
# CUDA entry for sm_80 and sm_90 (PTX for compute_80, so newer GPUs run them too), built without a GPU with
# torch 2.11 + triton 3.6 (the GPU machines' pair) in .venv-torch2.11 (bash .ci/setup-torch 2.11).
#   build-packs.sh            rebuild them into benchmarks/gpu_check/packs/ (commit the result)
#   build-packs.sh --check    rebuild them elsewhere and fail unless the committed ones are byte-identical
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv-torch2.11/bin/python}
out=benchmarks/gpu_check/packs
check=0
[ "${1:-}" = "--check" ] && check=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for name in mlp convnet multi_io; do
  "$PY" -m aotpack build "examples/$name.py" -o "$work/$name.pack" --device cpu --device cuda \
    --cuda-arch 80,90 --without-gpu --quiet
done
if [ "$check" = 1 ]; then
  stale=0
  for name in mlp convnet multi_io; do
    if ! cmp -s "$work/$name.pack" "$out/$name.pack"; then
      echo "$out/$name.pack is not what this checkout builds:" >&2
      "$PY" -m aotpack diff "$out/$name.pack" "$work/$name.pack" >&2 || true
      stale=1
    fi
  done
  if [ "$stale" = 1 ]; then
    echo "the packs that gpu_check.sh ships are stale: run bash benchmarks/gpu_check/build-packs.sh and commit" >&2
    exit 1
  fi
  echo "the shipped packs are byte-identical to what this checkout builds"
else
  mkdir -p "$out"
  cp "$work"/*.pack "$out"/
  ls -l "$out"
fi
