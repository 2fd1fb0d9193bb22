#!/usr/bin/env bash
# The GPU check: one command for a GPU machine with torch 2.11 + triton 3.6 preinstalled and no network
# (budget: 8 minutes). From the repository root:
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine (PYTHON=... picks the interpreter)
#   bash benchmarks/gpu_check.sh --dry-run  # on a host without a GPU: runs what it can, says what it could not
#
# 1. deps:      aotpack's own small dependencies (zstandard, cffi, pycparser), if this Python lacks them, from
#               the wheels in benchmarks/gpu_check/wheels (CPython 3.12, manylinux x86_64), unpacked into a
#               temporary folder; aotpack itself from this checkout. Nothing is installed on the machine.
#               click, pytest, numpy and hypothesis must be there already.
# 2. gpu tests: tests/test_cuda_gpu.py (builds packs on the GPU, so it needs the CUDA toolkit there too).
# 3. packs:     runs the packs in benchmarks/gpu_check/packs, built without a GPU on a CPU host by torch
#               2.11 (benchmarks/gpu_check/build-packs.sh; CI checks they are what this checkout builds),
#               against eager on the GPU.
# 4. benchmark: benchmarks/bench_cuda.py --quick (per-call latency vs eager and torch.compile).
# Prints one summary; exit status 0 only if every step passed (with --dry-run: every step that can run
# without a GPU). Without a GPU and without --dry-run it fails: that is not a GPU check.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
dry=0
[ "${1:-}" = "--dry-run" ] && dry=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
check_start=$(date +%s)
summary=()
failed=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $work/NAME.log, record the outcome
  local name=$1 limit=$2 start rc
  shift 2
  echo "== $name (at most $limit s) =="
  start=$(date +%s)
  timeout "$limit" "$@" 2>&1 | tee "$work/$name.log" | tail -n 25
  rc=${PIPESTATUS[0]}
  local took=$(( $(date +%s) - start )) outcome=passed
  if [ "$rc" -eq 124 ]; then outcome="TIMEOUT"; failed=1
  elif [ "$rc" -eq 5 ] && [ "$have_gpu" -eq 0 ]; then outcome="skipped (no GPU)"
  elif [ "$rc" -ne 0 ]; then outcome="FAILED (exit $rc)"; failed=1; fi
  summary+=("$(printf '%-10s %-18s %4s s' "$name" "$outcome" "$took")")
}

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "gpu_check: $PY cannot import torch; set PYTHON to the interpreter that has torch 2.11 and triton 3.6" >&2
  exit 1
fi
# 1. deps
site=$work/site
mkdir -p "$site"
for pkg in aotpack:aotpack aotpack_runtime:runtime aotpack_cli:cli; do
  ln -s "$PWD/${pkg#*:}" "$site/${pkg%%:*}"
done
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
deps_start=$(date +%s)
deps_out=$("$PY" - "$dry" "$site" benchmarks/gpu_check/wheels <<'PY'
import importlib, pathlib, sys, zipfile
dry, site, wheels = sys.argv[1] == "1", pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
missing_tools = [m for m in ("click", "pytest", "numpy", "hypothesis") if importlib.util.find_spec(m) is None]
unpacked = []
for module, dist in (("zstandard", "zstandard"), ("cffi", "cffi"), ("pycparser", "pycparser")):
    if importlib.util.find_spec(module) is not None and not dry:
        continue  # a dry run always unpacks, to prove the carried wheels work on this Python
    found = sorted(wheels.glob(f"{dist}-*.whl"))
    if not found:
        sys.exit(f"{module} is missing and {wheels} has no wheel for it (download-wheels.sh fetches them)")
    with zipfile.ZipFile(found[-1]) as z:
        z.extractall(site)
    unpacked.append(found[-1].name)
importlib.invalidate_caches()
import zstandard, cffi, aotpack  # noqa: E401 (fails here if a wheel does not fit this Python)
if dry and not zstandard.__file__.startswith(str(site)):
    sys.exit(f"zstandard came from {zstandard.__file__}, not from the carried wheel")
print(f"unpacked {', '.join(unpacked) or 'nothing (all present)'}; aotpack from {pathlib.Path(aotpack.__file__).parent}")
if missing_tools:
    sys.exit(f"missing (expected on the GPU machine): {', '.join(missing_tools)}")
PY
)
deps_rc=$?
echo "== deps ==" && echo "$deps_out"
if [ "$deps_rc" -ne 0 ]; then
  summary+=("$(printf '%-10s %-18s %4s s  %s' deps FAILED "$(( $(date +%s) - deps_start ))" "$deps_out")")
  failed=1
else
  summary+=("$(printf '%-10s %-18s %4s s  %s' deps passed "$(( $(date +%s) - deps_start ))" "$deps_out")")
fi

gpu=$("$PY" -c "
import torch, triton
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ''
print(f'torch {torch.__version__}, triton {triton.__version__}, Python {__import__(\"platform\").python_version()}; ', end='')
print(f'GPU {name} (sm_{\"\".join(map(str, torch.cuda.get_device_capability(0)))})' if name else 'NO GPU')" 2>&1)
have_gpu=1
case "$gpu" in *"NO GPU"*|*Error*) have_gpu=0 ;; esac
toolkit=$(command -v nvcc || true)
echo "== host: $gpu; CUDA toolkit: ${toolkit:-none (nvcc not on PATH: the GPU tests cannot build CUDA packs)} =="

if [ "$failed" -eq 0 ]; then
  # 2. GPU tests (they skip without a GPU)
  step "gpu tests" 330 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda_gpu.py
  # 3. packs built without a GPU on a CPU host
  step packs 90 "$PY" benchmarks/gpu_check/run_packs.py
  # 4. benchmark
  if [ "$have_gpu" -eq 1 ]; then
    step benchmark 150 "$PY" benchmarks/bench_cuda.py --quick
  else
    step benchmark 300 "$PY" benchmarks/bench_cuda.py --device cpu --models mlp --calls 20
  fi
fi

echo
echo "== GPU check summary ($(( $(date +%s) - check_start )) s) =="
echo "host: $gpu"
printf '  %s\n' "${summary[@]}"
[ -f "$work/packs.log" ] && grep -E "^(ok|FAIL) " "$work/packs.log" | sed 's/^/    /'
if [ "$have_gpu" -eq 0 ]; then
  echo "NO GPU here: nothing ran on a GPU. The GPU tests skipped, the packs' CUDA entries were not run, and the"
  echo "benchmark ran on the CPU only to try the script. Run this on a GPU machine for the real check."
  if [ "$dry" -eq 0 ]; then
    echo "gpu_check: no GPU and no --dry-run: failing (this is not the GPU check)" >&2
    exit 1
  fi
fi
exit "$failed"
