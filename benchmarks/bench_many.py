"""A fully cached ``aotpack build-many`` against a cold one.

Run from the repository root::

    .venv/bin/python benchmarks/bench_many.py [--matrix examples/matrix.toml] [--repeat 1] [--jobs 2]

Each run is ``python -m aotpack build-many MATRIX -o OUT --json --cache-dir CACHE`` in a fresh process,
timed from outside (wall clock, Python's start included):

- *cold*: an empty build cache: every task captures, compiles and stores its pack. Precompiled headers
  already exist (made by an untimed warm-up run of the same matrix into another cache), as on any host
  after its first build.
- *cached*: the same matrix again on the cache the cold run filled: every task finds its pack by its source
  key (no capture), which the script checks in the results (``cache_hit``).

The load average is read before and after each run. Writes ``benchmarks/many_results.md`` and
``many_results.json``; caches and packs live in ``benchmarks/.work-many/``, removed at the end. These
machines are shared and noisy: compare the ratio within one run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / ".work-many"


def build_many(matrix: Path, out: Path, cache: Path, env: dict, jobs: int | None) -> dict:
    """One timed build-many run: seconds, the load average around it, and each task's result."""
    cmd = [sys.executable, "-m", "aotpack", "build-many", str(matrix), "-o", str(out), "--json",
           "--cache-dir", str(cache)] + (["--jobs", str(jobs)] if jobs else [])
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600, cwd=ROOT)
    seconds = time.perf_counter() - start
    run = {"seconds": seconds, "load_before": load_before, "load_after": os.getloadavg()[0],
           "exit": proc.returncode}
    try:
        tasks = json.loads(proc.stdout)["tasks"]
    except (ValueError, KeyError):
        run["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        return run
    run["tasks"] = {t["name"]: {"status": t["status"], "seconds": t["seconds"], "cache_hit": t.get("cache_hit", "")}
                    for t in tasks}
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--matrix", default=str(ROOT / "examples" / "matrix.toml"))
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args()
    matrix = Path(args.matrix).resolve()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir()
    (WORK / "tmp").mkdir()
    start = time.perf_counter()
    env = dict(os.environ, TMPDIR=str(WORK / "tmp"), AOTPACK_BUILD_CACHE=str(WORK / "toolchain"),
               AOTPACK_CACHE_DIR=str(WORK / "extract"), TORCHINDUCTOR_CACHE_DIR=str(WORK / "inductor"))
    runs: dict = {"cold": [], "cached": []}
    try:
        warmup = build_many(matrix, WORK / "warmup", WORK / "warmup-cache", env, args.jobs)
        print(f"warm-up: {warmup['seconds']:.1f} s", file=sys.stderr, flush=True)
        for r in range(args.repeat):
            cache = WORK / f"cache-{r}"
            for variant in ("cold", "cached"):
                shutil.rmtree(WORK / "inductor", ignore_errors=True)  # Inductor's own cache never helps
                run = build_many(matrix, WORK / f"out-{r}-{variant}", cache, env, args.jobs)
                runs[variant].append(run)
                print(f"round {r + 1}/{args.repeat} {variant}: {run['seconds']:.1f} s (load "
                      f"{run['load_before']:.1f} -> {run['load_after']:.1f})", file=sys.stderr, flush=True)
            shutil.rmtree(cache, ignore_errors=True)
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
    write(matrix, runs, args, time.perf_counter() - start)


def write(matrix: Path, runs: dict, args, took: float) -> None:
    import torch

    cold = statistics.median(r["seconds"] for r in runs["cold"])
    cached = statistics.median(r["seconds"] for r in runs["cached"])
    hits = [t["cache_hit"] for r in runs["cached"] for t in r.get("tasks", {}).values()]
    tasks = len(runs["cold"][0].get("tasks", {}))
    loads = [x for v in runs.values() for r in v for x in (r["load_before"], r["load_after"])]
    name = matrix.relative_to(ROOT) if matrix.is_relative_to(ROOT) else matrix
    lines = [f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
             f"{torch.__version__}, Python {platform.python_version()}, "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; load average (1 min) "
             f"{min(loads):.1f} to {max(loads):.1f} during the runs.",
             f"`aotpack build-many {name}` ({tasks} tasks, jobs {args.jobs or 'default'}), medians of "
             f"{args.repeat} run(s); whole run {took / 60:.1f} min. See benchmarks/bench_many.py.", "",
             "| run | seconds | × cold |", "|---|---|---|",
             f"| cold build cache | {cold:.1f} | 1.00× |",
             f"| fully cached | {cached:.1f} | {cached / cold:.3f}× |", "",
             f"Cached run: {hits.count('source')} of {len(hits)} tasks found by the source key (no capture)."]
    md = "\n".join(lines) + "\n"
    (HERE / "many_results.md").write_text(md)
    (HERE / "many_results.json").write_text(json.dumps({"matrix": str(name), "medians_s": {"cold": cold,
                                                        "cached": cached}, "ratio": cached / cold, "runs": runs,
                                                        "repeat": args.repeat, "minutes": took / 60}, indent=2))
    print(md)


if __name__ == "__main__":
    main()
