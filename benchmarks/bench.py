"""Benchmark aotpack against eager, torch.compile and AOTInductor's own loader on the examples.

Run from the repository root::

    .venv/bin/python benchmarks/bench.py [--quick] [--models mlp,convnet,multi_io]

For each example model it measures, and writes to ``benchmarks/results.md`` and ``benchmarks/results.json``:

1. Fresh-process time to first output: the median of N fresh subprocesses per variant, timed inside the
   subprocess from its first line (before ``import torch``) to the first output, next to ``import torch``
   alone (the floor). Variants: eager (build the model from the example file, call it), aotpack
   (``aotpack.load`` then call on ``pkg.example_inputs()``), and torch.compile and AOTInductor's
   ``aoti_load_package`` (inputs from ``torch.load``), each with an empty Inductor cache (cold) and with
   a cache filled by an earlier run (warm).
2. Per-call latency in one process under ``torch.inference_mode``: eager, torch.compile, the AOTInductor
   package, the aotpack Package call, and the pack's compiled code without the guard check
   (``entry.run``); their difference is aotpack's guard + dispatch overhead.
3. Peak RSS (``ru_maxrss``) of the fresh processes of part 1.
4. Dispatch (``dispatch.py``): a dynamic entry vs a static one on the same input, the cost of each extra
   entry tried, and a second ``aotpack.load`` of the same pack in one process.

``--peers`` runs the peer comparison instead (``peer_models.py``: ResNet-18, MobileNetV2, a UNet, ViT, BERT,
GPT-2 at small sizes): per-call latency of eager, the pack, ONNX Runtime and OpenVINO (the ``[bench]`` extra;
the ONNX model exported with ``torch.onnx.export(..., dynamo=True)``) with 1 and 2 threads, every output
checked against eager; writes ``benchmarks/peers_results.md`` and ``peers_results.json``. A contender that is
not installed is skipped with a line that says so.

Builds, packs, caches and temporary files live in ``benchmarks/.work/``, created fresh and removed at the
end; every subprocess gets ``TMPDIR``, ``TORCHINDUCTOR_CACHE_DIR`` and ``AOTPACK_CACHE_DIR`` under it.
A comparison that fails is recorded with its error in the JSON and shown as n/a in the table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from _markers import put_between_markers
from peer_models import MODELS as PEER_MODELS

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CHILD = HERE / "_child.py"
PEERS_CHILD = HERE / "_peers_child.py"
WORK = HERE / ".work"
MODELS = ("mlp", "convnet", "multi_io")
CHILD_TIMEOUT_S = 600

# Fresh-process variants, in the order they take turns within a round: (child mode, Inductor cache).
# "empty": a new empty cache folder per run; "cold"/"warm": the cold variant's first run fills the folder
# that every run of the warm variant reuses, later cold runs get a new empty one.
FRESH = {
    "import_torch": ("import_torch", "empty"),
    "eager": ("eager", "empty"),
    "aotpack": ("aotpack", "empty"),
    "aoti_cold": ("aoti", "cold"),
    "aoti_warm": ("aoti", "warm"),
    "compile_cold": ("compile", "cold"),
    "compile_warm": ("compile", "warm"),
}
WARMED_UP = ("import_torch", "eager", "aotpack")  # one untimed run first (page cache, aotpack's cache)
LATENCY = ("eager", "torch_compile", "aoti", "aotpack", "aotpack_entry_run")


class ChildError(Exception):
    """A benchmark subprocess failed; the message is its error line."""


@dataclass(frozen=True)
class Paths:
    """Where one model's example file and build outputs are."""

    name: str
    example: Path
    pack: Path
    pt2: Path
    inputs: Path

    def warm_cache(self, mode: str) -> Path:
        return WORK / "inductor" / f"{self.name}-{mode}-warm"


# -- subprocesses --------------------------------------------------------------------------------

def child_env(cache_dir: Path) -> dict:
    env = dict(os.environ, TMPDIR=str(WORK / "tmp"), TORCHINDUCTOR_CACHE_DIR=str(cache_dir),
               AOTPACK_CACHE_DIR=str(WORK / "aotpack-cache"))
    cache_dir.mkdir(parents=True, exist_ok=True)
    return env


def error_line(stderr: str) -> str:
    """The exception line of a traceback (else the last line), shortened."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    found = next((ln for ln in reversed(lines) if re.match(r"^[\w.]+(Error|Exception|Exit)\b", ln)), None)
    return (found or (lines[-1] if lines else "no error output"))[:500]


def run_child(mode: str, *argv: object, cache_dir: Path) -> dict:
    """Run ``_child.py MODE`` in a fresh interpreter; return the JSON it writes."""
    result = WORK / "results" / f"{mode}-{time.monotonic_ns()}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(CHILD), mode, str(result), *map(str, argv)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=child_env(cache_dir), capture_output=True, text=True,
                              timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ChildError(f"timed out after {CHILD_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        raise ChildError(f"exit {proc.returncode}: {error_line(proc.stderr)}")
    return json.loads(result.read_text())


# -- the three measurements ----------------------------------------------------------------------

def build(p: Paths) -> dict:
    """Build the pack and the AOTInductor package; ``{"aotpack": {...}, "aoti": {...}}``."""
    try:
        return run_child("build", p.example, p.pack, p.pt2, p.inputs, cache_dir=WORK / "inductor-build")
    except ChildError as e:
        return {"aotpack": {"error": str(e)}, "aoti": {"error": str(e)}}


def fresh_run(variant: str, p: Paths, round_index: int) -> dict:
    """One fresh process of ``variant`` in round ``round_index`` (-1: the untimed warm-up)."""
    mode, cache = FRESH[variant]
    argv = {"import_torch": (), "eager": (p.example,), "aotpack": (p.pack,), "aoti": (p.pt2, p.inputs),
            "compile": (p.example,)}[mode]
    if cache == "warm" or (cache == "cold" and round_index == 0):
        folder = p.warm_cache(mode)
    else:
        folder = WORK / "inductor" / f"{p.name}-{variant}-{round_index}"
    return run_child(mode, *argv, cache_dir=folder)


def fresh_processes(p: Paths, built: dict, repeats: int) -> dict:
    """Per variant: the samples (ms, MB) of ``repeats`` fresh processes, or the error that stopped it."""
    errors = {v: f"build failed: {built[mode]['error']}" for v, (mode, _) in FRESH.items()
              if mode in built and "error" in built[mode]}
    samples: dict[str, list[dict]] = {v: [] for v in FRESH}
    for variant in WARMED_UP:
        if variant not in errors:
            try:
                fresh_run(variant, p, -1)
            except ChildError as e:
                errors[variant] = str(e)
    variants = list(FRESH)
    for r in range(repeats):
        line = []
        # Rotate the order each round so that no variant always follows the same one; round 0 keeps the
        # declared order, in which each cold variant fills the warm cache before its warm variant runs.
        for variant in variants[r % len(variants):] + variants[:r % len(variants)]:
            if variant in errors:
                continue
            try:
                samples[variant].append(fresh_run(variant, p, r))
                line.append(f"{variant} {samples[variant][-1]['ms']:.0f} ms")
            except ChildError as e:
                errors[variant] = str(e)
                line.append(f"{variant} FAILED")
        print(f"[{p.name}] fresh processes {r + 1}/{repeats}: {', '.join(line)}", flush=True)
    return {v: {"error": errors[v]} if v in errors else summarize_fresh(samples[v]) for v in FRESH}


def summarize_fresh(samples: list[dict]) -> dict:
    ms = [s["ms"] for s in samples]
    mb = [s["maxrss_mb"] for s in samples]
    return {"median_ms": statistics.median(ms), "samples_ms": ms,
            "median_maxrss_mb": statistics.median(mb), "samples_maxrss_mb": mb}


def latency(p: Paths, calls: int, warmup: int) -> dict:
    """Per-call medians (µs) of every variant in one process, or one error for all."""
    try:
        return run_child("latency", p.example, p.pack, p.pt2, calls, warmup, cache_dir=p.warm_cache("compile"))
    except ChildError as e:
        return {v: {"error": str(e)} for v in LATENCY}


# -- derived figures -----------------------------------------------------------------------------

def add_ratios(fresh: dict, per_call: dict) -> dict:
    """Ratios to the floor / to eager, aotpack minus import torch, and the guard + dispatch overhead."""
    derived: dict = {}
    floor = fresh["import_torch"].get("median_ms")
    for v in FRESH:
        if floor and "median_ms" in fresh[v]:
            fresh[v]["ratio_to_import_torch"] = fresh[v]["median_ms"] / floor
    if floor and "median_ms" in fresh["aotpack"]:
        extra = fresh["aotpack"]["median_ms"] - floor
        derived["aotpack_minus_import_torch_ms"] = extra
        derived["aotpack_within_50ms_of_import_torch"] = extra <= 50
    eager = per_call.get("eager", {}).get("median_us")
    for v, figures in per_call.items():
        if eager and "median_us" in figures:
            figures["ratio_to_eager"] = figures["median_us"] / eager
    if "median_us" in per_call.get("aotpack", {}) and "median_us" in per_call.get("aotpack_entry_run", {}):
        derived["guard_dispatch_overhead_us"] = per_call["aotpack"]["median_us"] - \
            per_call["aotpack_entry_run"]["median_us"]
    return derived


def benchmark_model(p: Paths, repeats: int, calls: int, warmup: int) -> dict:
    print(f"[{p.name}] building the pack and the AOTInductor package ...", flush=True)
    built = build(p)
    for kind, outcome in built.items():
        print(f"[{p.name}] build {kind}: " + (f"{outcome['seconds']:.1f} s" if "seconds" in outcome
                                             else f"FAILED: {outcome['error']}"), flush=True)
    fresh = fresh_processes(p, built, repeats)
    print(f"[{p.name}] per-call latency ({calls} calls per variant) ...", flush=True)
    per_call = latency(p, calls, warmup)
    derived = add_ratios(fresh, per_call)
    return {"build": built, "fresh_process": fresh, "per_call": per_call, **derived}


# -- reporting -----------------------------------------------------------------------------------

def dispatch_figures() -> dict:
    """benchmarks/dispatch.py in a fresh process: dynamic vs static entry, cost per extra entry, second load."""
    folder = WORK / "dispatch"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run([sys.executable, str(HERE / "dispatch.py"), str(folder)], cwd=ROOT,
                              env=child_env(WORK / "inductor" / "dispatch"), capture_output=True, text=True,
                              timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {CHILD_TIMEOUT_S} s"}
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {error_line(proc.stderr)}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_info() -> dict:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": metadata.version("torch"),
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def cell(figures: dict, value: str, fmt: str, ratio: str | None = None) -> str:
    """``value`` formatted, with ``ratio`` after it when given; n/a when the figure is missing."""
    if value not in figures:
        return "n/a"
    text = format(figures[value], fmt)
    return f"{text} ({figures[ratio]:.2f}×)" if ratio in figures else text


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def markdown(results: dict) -> str:
    m, cfg, models = results["machine"], results["config"], results["models"]
    fresh_rows, call_rows, rss_rows, failures = [], [], [], []
    for name, r in models.items():
        f, c = r["fresh_process"], r["per_call"]
        extra = r.get("aotpack_minus_import_torch_ms")
        fresh_rows.append([name, cell(f["import_torch"], "median_ms", ".0f"),
                           *(cell(f[v], "median_ms", ".0f", "ratio_to_import_torch")
                             for v in ("eager", "aotpack")),
                           "n/a" if extra is None else f"{extra:+.0f}",
                           *(cell(f[v], "median_ms", ".0f", "ratio_to_import_torch")
                             for v in ("compile_cold", "compile_warm", "aoti_cold", "aoti_warm"))])
        overhead = r.get("guard_dispatch_overhead_us")
        call_rows.append([name, *(cell(c.get(v, {}), "median_us", ".1f", "ratio_to_eager") for v in LATENCY),
                          "n/a" if overhead is None else f"{overhead:.1f}"])
        rss_rows.append([name, *(cell(f[v], "median_maxrss_mb", ".0f")
                                 for v in ("import_torch", "eager", "aotpack", "aoti_warm", "compile_warm"))])
        for part, figures in (("build", r["build"]), ("fresh process", f), ("per call", c)):
            failures += [f"- {name}, {part}, {v}: {x['error']}" for v, x in figures.items() if "error" in x]
    lines = [
        "# aotpack benchmarks", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, Python {m['python']}, {m['date']}.",
        f"Medians of {cfg['repeats']} fresh processes and of {cfg['calls']} calls per figure; "
        f"whole run {results['total_seconds'] / 60:.1f} min. See benchmarks/README.md for what each column means.", "",
        "## Fresh process: time to first output (ms, × import torch)", "",
        *table(["model", "import torch", "eager", "aotpack", "aotpack − import torch", "torch.compile cold",
                "torch.compile warm", "AOTInductor cold", "AOTInductor warm"], fresh_rows), "",
        "## Per-call latency (µs, × eager)", "",
        *table(["model", "eager", "torch.compile", "AOTInductor", "aotpack", "aotpack entry.run",
                "guard + dispatch (µs)"], call_rows), "",
        "## Peak RSS of the fresh process (MB)", "",
        *table(["model", "import torch", "eager", "aotpack", "AOTInductor warm", "torch.compile warm"], rss_rows),
    ]
    d = results.get("dispatch", {})
    if "error" in d:
        failures.append(f"- dispatch: {d['error']}")
    elif d:
        lines += ["", "## Dispatch (small MLP, batch 8; µs per call, medians)", "",
                  *table(["dynamic entry (batch 1..64)", "static entry (batch 8)", "4th of 4 static entries",
                          "each extra entry tried", "second load (ms)"],
                         [[f"{d['dynamic_entry_us']:.1f}", f"{d['static_entry_us']:.1f}",
                           f"{d['last_of_4_entries_us']:.1f}", f"{d['per_extra_entry_us']:.2f}",
                           f"{d['second_load_ms']:.1f}"]])]
    if failures:
        lines += ["", "## Failures", "", *failures]
    return "\n".join(lines) + "\n"


# -- peers: ONNX Runtime and OpenVINO on common architectures ------------------------------------

PEER_CONTENDERS = ("eager", "aotpack", "onnxruntime", "openvino")
PEER_THREADS = (1, 2)
PEERS_START, PEERS_END = "<!-- peers:start -->", "<!-- peers:end -->"


def run_peers_child(mode: str, *argv: object, threads: int = 0) -> dict:
    """``_peers_child.py MODE`` in a fresh interpreter (``OMP_NUM_THREADS=threads`` when given)."""
    result = WORK / "results" / f"peers-{mode}-{time.monotonic_ns()}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    env = child_env(WORK / "inductor-peers")
    env["AOTPACK_BUILD_CACHE"] = str(WORK / "build-cache")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run([sys.executable, str(PEERS_CHILD), mode, str(result), *map(str, argv)], cwd=HERE,
                          env=env, capture_output=True, text=True, timeout=3 * CHILD_TIMEOUT_S)
    if proc.returncode != 0:
        raise ChildError(f"exit {proc.returncode}: {error_line(proc.stderr)}")
    return json.loads(result.read_text())


def peers(models: list[str], calls: int, warmup: int) -> dict:
    """Per model: the build/export outcome and, per thread count, each contender's figures."""
    out: dict = {}
    for name in models:
        folder = WORK / "peers" / name
        folder.mkdir(parents=True, exist_ok=True)
        print(f"[{name}] building the pack and exporting ONNX ...", flush=True)
        try:
            prepared = run_peers_child("prepare", name, folder)
        except ChildError as e:
            prepared = {"aotpack": {"error": str(e)}, "onnx": {"error": str(e)}}
        out[name] = {"prepare": prepared, "threads": {}}
        for threads in PEER_THREADS:
            try:
                figures = run_peers_child("latency", name, folder, threads, calls, warmup, 5, threads=threads)
            except ChildError as e:
                figures = {c: {"error": str(e)} for c in PEER_CONTENDERS}
            out[name]["threads"][str(threads)] = figures
            print(f"[{name}] {threads} thread(s): " + ", ".join(
                f"{c} {f['median_us']:.0f} us" if "median_us" in f else f"{c} {f.get('skipped') or f.get('error')}"
                for c, f in figures.items()), flush=True)
    return out


def peers_markdown(results: dict) -> str:
    m = results["machine"]
    lines = ["# aotpack against ONNX Runtime and OpenVINO", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {results['versions']}, Python "
             f"{m['python']}, {m['date']}; load average {results['load_before']:.1f} at the start, "
             f"{results['load_after']:.1f} at the end.",
             f"Per-call latency in µs, median of {results['calls']} calls per figure in one process (contenders "
             "in turns, 5 rounds), batch 1, float32; in brackets the time over the pack's (above 1: the pack is "
             f"faster). Every output within {results['tolerance']:g} of eager (relative to its largest value) "
             "unless listed below. See benchmarks/README.md.", ""]
    notes = []
    for threads in PEER_THREADS:
        lines += [f"## {threads} thread{'s' if threads > 1 else ''}", "",
                  "| model | eager | aotpack | ONNX Runtime | OpenVINO | aotpack, 2 threads over 1 (speed-up) |",
                  "|---|---|---|---|---|---|"]
        for name, r in results["models"].items():
            figures = r["threads"].get(str(threads), {})
            own = figures.get("aotpack", {}).get("median_us")
            row = [name]
            for c in PEER_CONTENDERS:
                f = figures.get(c, {})
                if "median_us" not in f:
                    row.append("skipped" if "skipped" in f else "n/a")
                    continue
                row.append(f"{f['median_us']:.0f}" + (f" ({f['median_us'] / own:.2f}×)" if own and c != "aotpack"
                                                       else ""))
                if not f.get("within_tolerance", True):
                    notes.append(f"- {name}, {threads} thread(s), {c}: differs from eager by "
                                 f"{f['rel_diff_vs_eager']:.2e}")
            one = r["threads"].get("1", {}).get("aotpack", {}).get("median_us")
            row.append(f"{one / own:.2f}×" if one and own and threads > 1 else "")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    for name, r in results["models"].items():
        for step, f in r["prepare"].items():
            if "error" in f:
                notes.append(f"- {name}, {step}: {f['error']}")
        for threads, figures in r["threads"].items():
            for c, f in figures.items():
                if "skipped" in f:
                    notes.append(f"- {name}, {threads} thread(s), {c} skipped: {f['skipped']}")
                elif "error" in f:
                    notes.append(f"- {name}, {threads} thread(s), {c}: {f['error']}")
    if notes:
        lines += ["## Notes", "", *sorted(set(notes)), ""]
    return "\n".join(lines)


def peer_versions() -> str:
    found = []
    for dist in ("onnxruntime", "openvino", "onnx", "onnxscript"):
        try:
            found.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            found.append(f"{dist} not installed")
    return ", ".join(found)


def main_peers(models: list[str], quick: bool) -> None:
    calls, warmup = (50, 5) if quick else (200, 20)
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    shutil.rmtree(WORK, ignore_errors=True)
    (WORK / "tmp").mkdir(parents=True)
    try:
        figures = peers(models, calls, warmup)
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
    results = {"machine": machine_info(), "versions": peer_versions(), "calls": calls, "warmup_calls": warmup,
               "tolerance": 1e-4, "load_before": load_before, "load_after": os.getloadavg()[0],
               "total_seconds": time.perf_counter() - start, "models": figures}
    (HERE / "peers_results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = peers_markdown(results)
    (HERE / "peers_results.md").write_text(table)
    put_between_markers(ROOT / "README.md", PEERS_START, PEERS_END, table.split("\n", 2)[2].replace("## ", "#### "))
    print(f"wrote {HERE / 'peers_results.md'} in {results['total_seconds']:.0f} s")


# -- main ----------------------------------------------------------------------------------------

README_START, README_END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"


def update_readme(table_md: str) -> None:
    """Put the latest tables into the project README, between its benchmark markers."""
    body = table_md.split("\n", 2)[2].replace("## ", "### ")  # drop the title; nest the sections
    put_between_markers(ROOT / "README.md", README_START, README_END, body)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and calls (a smoke run)")
    parser.add_argument("--peers", action="store_true",
                        help="the peer comparison (ONNX Runtime, OpenVINO) on peer_models.py's models instead")
    parser.add_argument("--models", default=None,
                        help=f"comma-separated models to run (default: {','.join(MODELS)}; with --peers: "
                             f"{','.join(PEER_MODELS)})")
    args = parser.parse_args()
    known = PEER_MODELS if args.peers else MODELS
    args.models = [m.strip() for m in (args.models or ",".join(known)).split(",") if m.strip()]
    unknown = [m for m in args.models if m not in known]
    if unknown or not args.models:
        parser.error(f"--models takes names from {', '.join(known)}; got {args.models}")
    return args


def paths_for(name: str) -> Paths:
    out = WORK / "build" / name
    out.mkdir(parents=True, exist_ok=True)
    return Paths(name=name, example=ROOT / "examples" / f"{name}.py", pack=out / f"{name}.pack",
                 pt2=out / f"{name}.pt2", inputs=out / "inputs.pt")


def compile_bytecode() -> None:
    """Write the bytecode of aotpack and its runtime, as ``pip install`` does for an installed package: an
    editable checkout run with ``PYTHONDONTWRITEBYTECODE`` set would compile every module in every fresh
    process, and the fresh-process figures would time Python's compiler rather than the loader."""
    import compileall

    for folder in ("aotpack", "runtime"):
        compileall.compile_dir(ROOT / folder, quiet=1)


def main() -> None:
    args = parse_args()
    compile_bytecode()
    if args.peers:
        main_peers(args.models, args.quick)
        return
    repeats, calls, warmup = (2, 50, 10) if args.quick else (5, 200, 20)
    start = time.perf_counter()
    shutil.rmtree(WORK, ignore_errors=True)
    (WORK / "tmp").mkdir(parents=True)
    try:
        models = {name: benchmark_model(paths_for(name), repeats, calls, warmup) for name in args.models}
        print("dispatch figures ...", flush=True)
        dispatch = dispatch_figures()
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
    results = {"machine": machine_info(),
               "config": {"repeats": repeats, "calls": calls, "warmup_calls": warmup, "quick": args.quick},
               "total_seconds": time.perf_counter() - start, "models": models, "dispatch": dispatch}
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (HERE / "results.md").write_text(markdown(results))
    update_readme(markdown(results))
    print(f"wrote {HERE / 'results.md'} and {HERE / 'results.json'} in {results['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
