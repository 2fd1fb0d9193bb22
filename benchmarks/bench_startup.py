"""Start-up of a serving process: what ``import aotpack`` and a load add to ``import torch``.

Run from the repository root::

    .venv/bin/python benchmarks/bench_startup.py [--rounds 10] [--models mlp,convnet,multi_io]

For each example it builds a pack (``aotpack build``, into ``benchmarks/.work-startup/``), then times fresh
processes in interleaved pairs, the order alternating each round (A B, B A, ...), so that a drift in the
machine's speed falls on both sides: ``_child.py import_torch`` (``import torch`` alone, the floor) and
``_child.py aotpack`` (``import aotpack``, ``aotpack.load``, the first call on the stored example inputs,
with the extraction cache filled by an untimed first run, as on a serving host after its first load). Each
is timed inside the process from its first line (before ``import torch``) to the first output, and from
outside (the whole process, Python's own start included). The per-pair differences give
"aotpack − import torch". Beside them, ``python -X importtime -c "import torch; import aotpack"`` gives the
time of ``import aotpack`` after torch, and of the load's imports (``aotpack.load`` of the pack).

The bytecode of aotpack and its runtime is written first, as ``pip install`` does (see bench.py). Writes
[startup_results.md](startup_results.md) and ``startup_results.json`` (every sample, the load average before
and after) and puts the table into the project README between its start-up markers.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _markers import put_between_markers
from bench import compile_bytecode, machine_info

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CHILD = HERE / "_child.py"
WORK = HERE / ".work-startup"
MODELS = ("mlp", "convnet", "multi_io")
README_START, README_END = "<!-- startup:start -->", "<!-- startup:end -->"


def env() -> dict:
    return dict(os.environ, TMPDIR=str(WORK / "tmp"), TORCHINDUCTOR_CACHE_DIR=str(WORK / "inductor"),
                AOTPACK_CACHE_DIR=str(WORK / "aotpack-cache"), AOTPACK_BUILD_CACHE=str(WORK / "build-cache"))


def load_average() -> float:
    return os.getloadavg()[0]


def child(mode: str, *argv: object) -> dict:
    """One fresh ``_child.py MODE``: its own figure (ms from its first line) and the whole process's wall ms."""
    out = WORK / f"{mode}.json"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(CHILD), mode, str(out), *map(str, argv)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=300)
    wall = 1e3 * (time.perf_counter() - start)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed: {proc.stderr[-2000:]}")
    return {"inside_ms": json.loads(out.read_text())["ms"], "process_ms": wall}


def import_times(code: str, prefixes: tuple[str, ...]) -> float:
    """ms of the modules named ``prefixes*`` that ``code`` imports (their self times under -X importtime)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"-X importtime failed: {proc.stderr[-2000:]}")
    total = 0
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
        if m and m.group(2).startswith(prefixes):
            total += int(m.group(1))
    return total / 1e3


def measure(name: str, pack: Path, rounds: int) -> dict:
    child("aotpack", pack)  # untimed: fills the extraction cache and records the pack's check
    child("import_torch")
    pairs = []
    for r in range(rounds):
        order = ("import_torch", "aotpack") if r % 2 == 0 else ("aotpack", "import_torch")
        got = {mode: child(mode, *((pack,) if mode == "aotpack" else ())) for mode in order}
        pairs.append(got)
    imports = [import_times("import torch; import aotpack", ("aotpack",)) for _ in range(rounds)]
    load_imports = [import_times(f"import torch, aotpack; aotpack.load({str(pack)!r})", ("aotpack", "zstandard"))
                    for _ in range(rounds)]

    def med(mode: str, what: str) -> float:
        return statistics.median(p[mode][what] for p in pairs)

    result = {"pairs": pairs, "import_aotpack_ms_samples": imports, "load_imports_ms_samples": load_imports}
    for what in ("inside_ms", "process_ms"):
        result[f"import_torch_{what}"] = med("import_torch", what)
        result[f"aotpack_{what}"] = med("aotpack", what)
        result[f"aotpack_minus_import_torch_{what}"] = statistics.median(
            p["aotpack"][what] - p["import_torch"][what] for p in pairs)
    result["import_aotpack_ms"] = statistics.median(imports)
    result["load_imports_ms"] = statistics.median(load_imports)
    print(f"[{name}] import torch {result['import_torch_inside_ms']:.0f} ms, aotpack − import torch "
          f"{result['aotpack_minus_import_torch_inside_ms']:+.0f} ms, import aotpack "
          f"{result['import_aotpack_ms']:.1f} ms", flush=True)
    return result


def markdown(results: dict) -> str:
    m = results["machine"]
    rows = []
    for name, r in results["models"].items():
        share = 100 * r["import_aotpack_ms"] / r["import_torch_inside_ms"]
        rows.append(f"| {name} | {r['import_torch_inside_ms']:.0f} | {r['aotpack_inside_ms']:.0f} | "
                    f"{r['aotpack_minus_import_torch_inside_ms']:+.0f} | "
                    f"{r['aotpack_minus_import_torch_process_ms']:+.0f} | {r['import_aotpack_ms']:.1f} ({share:.1f}%) | "
                    f"{r['load_imports_ms']:.1f} |")
    return "\n".join([
        "# Start-up: what aotpack adds to `import torch`", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, Python {m['python']}, {m['date']}; "
        f"load average {results['load_before']:.1f} at the start, {results['load_after']:.1f} at the end.",
        f"Medians of {results['rounds']} interleaved pairs of fresh processes (and of {results['rounds']} "
        "`-X importtime` runs); bytecode written first, as `pip install` does. See benchmarks/bench_startup.py.", "",
        "| model | import torch (ms) | aotpack: first output (ms) | aotpack − import torch (ms, in the process) | "
        "aotpack − import torch (ms, whole process) | import aotpack after torch (ms, % of import torch) | "
        "a load's imports (ms) |",
        "|---|---|---|---|---|---|---|", *rows]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="interleaved pairs per model (default 10)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated examples")
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or any(m not in MODELS for m in models):
        parser.error(f"--models takes names from {', '.join(MODELS)}; got {models}")
    compile_bytecode()
    shutil.rmtree(WORK, ignore_errors=True)
    (WORK / "tmp").mkdir(parents=True)
    load_before = load_average()
    try:
        out = {}
        for name in models:
            pack = WORK / f"{name}.pack"
            subprocess.run([sys.executable, "-m", "aotpack", "build", str(ROOT / "examples" / f"{name}.py"), "-o",
                            str(pack)], cwd=ROOT, env=env(), check=True, capture_output=True, timeout=1800)
            out[name] = measure(name, pack, args.rounds)
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
    results = {"machine": machine_info(), "rounds": args.rounds, "load_before": load_before,
               "load_after": load_average(), "models": out}
    (HERE / "startup_results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (HERE / "startup_results.md").write_text(table)
    put_between_markers(ROOT / "README.md", README_START, README_END, table.split("\n", 2)[2])
    print(f"wrote {HERE / 'startup_results.md'}")


if __name__ == "__main__":
    main()
