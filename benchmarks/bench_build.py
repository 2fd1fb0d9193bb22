"""Build time: ``aotpack build`` beside AOTInductor's own compile of the same exported program.

Run from the repository root::

    .venv/bin/python benchmarks/bench_build.py [--repeat 3] [--models mlp,convnet]

Every build runs in a fresh process (``_build_child.py``) and is timed inside it, from the model file's
import to the written file (``import torch`` is not counted). Variants, per model:

- *aotpack, cold cache*: ``aotpack.build`` with an empty build cache: capture, guards, the cache key,
  Inductor, the compiler, packaging. Precompiled headers already exist (they are made once per toolchain
  and ISA, by a warm-up build that is not timed), as on any host after its first build.
- *aotpack, 1 thread*: the same with one compiler process at a time (the wrapper and the kernels compiled
  one after the other, as before they were compiled at once).
- *aotpack, warm cache*: the same build again, found in the build cache: capture, guards, key, copy.
- *AOTInductor cold*: ``torch.export.export`` then ``torch._inductor.aoti_compile_and_package`` with
  Inductor's defaults and an empty Inductor cache.
- *AOTInductor warm*: the same with the Inductor cache an earlier run filled.

The child also times each compiler call (the wrapper at -O1, the kernels at -O3, the weights object, the
link) and the precompiled-header step; the 1-thread runs, whose compiler calls do not overlap, give the
table of where an aotpack build's time goes ("Inductor codegen" is the rest of the compile stage: lowering,
code generation, reading the compiled code's constants; "key" is the cache key, from the cold-cache run). Figures are
medians of ``--repeat`` runs; the variants take turns within each round. It writes
``benchmarks/build_results.md`` and ``build_results.json``; caches and temporary files live in
``benchmarks/.work-build/``, removed at the end. These machines are shared and noisy: compare ratios
within one run.
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
CHILD = HERE / "_build_child.py"
WORK = HERE / ".work-build"
MODELS = ("mlp", "convnet")
VARIANTS = ("aotpack_cold", "aotpack_1thread", "aotpack_warm", "aoti_cold", "aoti_warm")
LABELS = {"aotpack_cold": "aotpack, cold cache", "aotpack_1thread": "aotpack, cold, 1 thread",
          "aotpack_warm": "aotpack, warm cache", "aoti_cold": "AOTInductor cold", "aoti_warm": "AOTInductor warm"}


def child(mode: str, model: str, out: Path, env: dict) -> dict:
    result = out.with_suffix(".json")
    cmd = [sys.executable, str(CHILD), mode, str(ROOT / "examples" / f"{model}.py"), str(out), str(result)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]}
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    models = args.models.split(",")
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir()
    start = time.perf_counter()
    toolchain = WORK / "toolchain-cache"  # precompiled headers, shared by every aotpack run
    base = dict(os.environ, TMPDIR=str(WORK / "tmp"), AOTPACK_CACHE_DIR=str(WORK / "extract"))
    (WORK / "tmp").mkdir()
    samples: dict = {m: {v: [] for v in VARIANTS} for m in models}
    phases: dict = {m: [] for m in models}
    try:
        for m in models:  # warm-up: precompiled headers, not timed
            child("aotpack", m, WORK / f"warmup-{m}.pack",
                  dict(base, AOTPACK_BUILD_CACHE=str(toolchain), TORCHINDUCTOR_CACHE_DIR=str(WORK / "ind-warmup"),
                       AOTPACK_BENCH_NO_CACHE="1"))
        for r in range(args.repeat):
            for m in models:
                cold_cache = WORK / f"cache-{m}-{r}"
                aoti_cache = WORK / f"inductor-{m}-{r}"
                runs = {
                    "aotpack_1thread": ("aotpack", dict(base, AOTPACK_BUILD_CACHE=str(toolchain),
                                                        AOTPACK_BENCH_NO_CACHE="1", AOTPACK_BENCH_THREADS="1")),
                    "aotpack_cold": ("aotpack", dict(base, AOTPACK_BUILD_CACHE=str(toolchain),
                                                     AOTPACK_BENCH_CACHE=str(cold_cache))),
                    "aotpack_warm": ("aotpack", dict(base, AOTPACK_BUILD_CACHE=str(toolchain),
                                                     AOTPACK_BENCH_CACHE=str(cold_cache))),
                    "aoti_cold": ("aoti", dict(base, TORCHINDUCTOR_CACHE_DIR=str(aoti_cache))),
                    "aoti_warm": ("aoti", dict(base, TORCHINDUCTOR_CACHE_DIR=str(aoti_cache))),
                }
                for variant, (mode, env) in runs.items():
                    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(WORK / f"ind-{m}-{r}-{variant}"))
                    res = child(mode, m, WORK / f"{m}-{r}-{variant}.out", env)
                    samples[m][variant].append(res)
                    if variant == "aotpack_1thread" and "error" not in res:
                        phases[m].append(res["phases"])
                    if variant == "aotpack_cold" and "error" not in res and phases[m]:
                        phases[m][-1]["key"] = res["phases"].get("key")
                    print(f"round {r + 1}/{args.repeat} {m} {variant}: "
                          f"{res.get('seconds', res.get('error'))}", file=sys.stderr, flush=True)
                shutil.rmtree(cold_cache, ignore_errors=True)
                shutil.rmtree(aoti_cache, ignore_errors=True)
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
    write(models, samples, phases, args.repeat, time.perf_counter() - start)


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def write(models, samples, phases, repeat, took) -> None:
    import torch

    table = {m: {v: median([s.get("seconds") for s in samples[m][v]]) for v in VARIANTS} for m in models}
    lines = [f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
             f"{torch.__version__}, Python {platform.python_version()}, "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.",
             f"Medians of {repeat} fresh processes per cell; whole run {took / 60:.1f} min. See "
             "benchmarks/bench_build.py for what each column means.", "",
             "### Build time (s, × AOTInductor cold)", "",
             "| model | " + " | ".join(LABELS[v] for v in VARIANTS) + " |",
             "|---|" + "---|" * len(VARIANTS)]
    for m in models:
        ref = table[m]["aoti_cold"]
        cells = []
        for v in VARIANTS:
            x = table[m][v]
            cells.append("n/a" if x is None else f"{x:.1f}" + (f" ({x / ref:.2f}×)" if ref else ""))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    keys = ["capture", "guards", "key", "Inductor codegen", "precompiled headers", "g++ wrapper -O1", "g++ kernels -O3",
            "g++ weights", "g++ link", "package"]
    lines += ["", "### Where an aotpack build goes (s, cold cache, one compiler at a time, medians)", "",
              "| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for m in models:
        row = [median([p.get(k) for p in phases[m]]) for k in keys]
        lines.append(f"| {m} | " + " | ".join("n/a" if x is None else f"{x:.2f}" for x in row) + " |")
    md = "\n".join(lines) + "\n"
    (HERE / "build_results.md").write_text(md)
    (HERE / "build_results.json").write_text(json.dumps({"medians_s": table, "samples": samples, "phases": phases,
                                                         "repeat": repeat, "minutes": took / 60}, indent=2))
    print(md)


if __name__ == "__main__":
    main()
