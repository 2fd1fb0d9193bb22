#!/usr/bin/env bash
# Quick start: set up, build the conv net example into a pack, then load and run it in a fresh process
# (which imports only the runtime) and compare with eager.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup
mkdir -p build
.venv/bin/aotpack build examples/convnet.py -o build/convnet.pack
.venv/bin/aotpack inspect build/convnet.pack
.venv/bin/aotpack run build/convnet.pack
.venv/bin/python examples/check_against_eager.py examples/convnet.py build/convnet.pack
