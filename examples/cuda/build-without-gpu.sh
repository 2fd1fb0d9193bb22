#!/usr/bin/env bash
# Build a pack with a CPU entry and a CUDA entry (sm_80 + sm_90) on a host with no GPU, show what is in it,
# and serve its CPU entry in a fresh process. Needs the CUDA toolkit (nvcc, cuda.h) and about 5.5 GB for
# the CUDA build of torch in .venv-cuda. On a GPU host, `aotpack run build/mlp-cuda.pack --device cuda`
# runs the CUDA entry (smoke-test a GPU-less pack like this before trusting it).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash .ci/setup-cuda
mkdir -p build
.venv-cuda/bin/aotpack build examples/mlp.py -o build/mlp-cuda.pack --device cpu --device cuda \
  --cuda-arch 80,90 --without-gpu
.venv-cuda/bin/aotpack inspect build/mlp-cuda.pack
.venv-cuda/bin/aotpack run build/mlp-cuda.pack
