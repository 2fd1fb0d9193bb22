#!/usr/bin/env bash
# Download again the wheels that benchmarks/gpu_check.sh installs on a GPU machine without network: aotpack's
# own small dependencies (zstandard, cffi and its pycparser) for CPython 3.12 on manylinux x86_64, the
# Python those machines run. Run it on a host with access to the package index, then commit the folder.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
rm -rf wheels.new
"$PY" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --no-cache-dir \
  --platform manylinux2014_x86_64 --python-version 3.12 --implementation cp --abi cp312 \
  -d wheels.new -r requirements.txt
rm -rf wheels
mv wheels.new wheels
ls -l wheels
