"""Big models: aotpack against AOTInductor's own package, at three sizes of one Llama architecture.

Run from the repository root (it needs transformers, from the test extras)::

    .venv/bin/python benchmarks/bench_big.py [--sizes 0.1GB,0.6GB,2.5GB] [--repeats 5] [--memory-budget-gb 7.5]
    .venv/bin/python benchmarks/bench_big.py --sizes 4.4GB --no-aoti --repeats 3 --results results-big-4.4GB

For each size (Hugging Face ``LlamaForCausalLM``, float32, random weights: about 0.13, 0.62 and 2.5 GB) it
builds a pack and an AOTInductor package (``aoti_compile_and_package`` with its defaults), each in its own
fresh process, and measures, each figure in fresh processes (medians of ``--repeats``):

1. build time and the build process's peak RSS (the model itself included), and the file sizes;
2. load time: the first load on a host (an empty code cache: every blob hashed, code extracted) and
   later loads (a recorded check), next to ``aoti_load_package``;
3. hashing throughput of the first check, on one thread and on every core, per core;
4. time to first output in a fresh process, minus ``import torch``: with the page cache warm, with and
   without ``prefetch=True``, and with the pack evicted from the page cache (``posix_fadvise``), both ways;
5. PSS (proportional set size) summed over 1 and over 4 processes serving the same file.

A process whose memory (with its children) would pass ``--memory-budget-gb`` is stopped and its figure
recorded as over the budget; so are 4 AOTInductor servers whose expected PSS (4 x one server's) would.
Writes ``benchmarks/results-big.md`` and ``results-big.json`` (``--results NAME``: ``NAME.md``, ``NAME.json``)
and, for the default sizes and results name, copies the tables into the README. ``4.4GB`` (TinyLlama-1.1B's
shape) is the check of a model past 4 GiB; ``--no-aoti`` skips AOTInductor, which would not fit the budget.
Packs, caches and temporary files live in ``benchmarks/.work-big/``, removed at the end.
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
import threading
import time
from importlib import metadata
from pathlib import Path

from _markers import put_between_markers

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CHILD = HERE / "_big_child.py"
WORK = HERE / ".work-big"
SIZES = ("0.1GB", "0.6GB", "2.5GB")
MORE_SIZES = ("4.4GB",)
GB = 1e9
SETTLE_SECONDS = 2.0  # aotpack_runtime.cache.SETTLE_SECONDS: a pack must be this old for its check to be recorded


class ChildError(Exception):
    """A benchmark subprocess failed or was stopped; the message says why."""


# -- processes and their memory ----------------------------------------------------------------------

def child_env(cache: Path) -> dict:
    cache.mkdir(parents=True, exist_ok=True)
    return dict(os.environ, TMPDIR=str(WORK / "tmp"), TORCHINDUCTOR_CACHE_DIR=str(WORK / "inductor"),
                AOTPACK_BUILD_CACHE=str(WORK / "build-cache"), AOTPACK_CACHE_DIR=str(cache),
                HF_HUB_OFFLINE="1")


def tree_rss(pid: int) -> int:
    """RSS in bytes of a process and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total


def run_child(mode: str, *argv: object, cache: Path, budget: float, timeout: float = 3600) -> dict:
    """Run ``_big_child.py MODE`` in a fresh process, stopping it if its memory passes ``budget`` bytes."""
    result = WORK / "results" / f"{mode}-{time.monotonic_ns()}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, str(CHILD), mode, str(result), *map(str, argv)], cwd=ROOT,
                            env=child_env(cache), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    over = threading.Event()
    peak = [0]

    def watch() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(proc.pid))
            if peak[0] > budget:
                over.set()
                proc.kill()
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise ChildError(f"timed out after {timeout:.0f} s") from None
    watcher.join()
    if over.is_set():
        raise ChildError(f"stopped at {peak[0] / GB:.1f} GB, over the {budget / GB:.1f} GB memory budget")
    if proc.returncode != 0:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        raise ChildError(f"exit {proc.returncode}: {lines[-1][:400] if lines else 'no output'}")
    return json.loads(result.read_text())


def pss(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("Pss:"))


def serving_pss(kind: str, path: Path, ref: Path, n: int, cache: Path) -> dict:
    """Summed PSS of ``n`` processes that each load the file and answer once, measured while all are up."""
    env = child_env(cache)
    env["OMP_NUM_THREADS"] = "1"
    procs = [subprocess.Popen([sys.executable, str(CHILD), "serve", os.devnull, kind, str(path), str(ref)],
                              cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(n)]
    try:
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise ChildError(f"a serving process failed: {p.communicate(timeout=60)[1].strip()[-400:]}")
        total = sum(pss(p.pid) for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.communicate("done\n", timeout=120)
    return {"processes": n, "pss_bytes": total}


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache (those no process maps): the next read comes from disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def settle(path: Path) -> None:
    """Wait until the file is old enough for a load to record its check."""
    time.sleep(max(0.0, os.stat(path).st_ctime + SETTLE_SECONDS + 0.1 - time.time()))


# -- one size --------------------------------------------------------------------------------------

def attempt(figures: dict, name: str, fn) -> None:
    try:
        figures[name] = fn()
    except ChildError as e:
        figures[name] = {"error": str(e)}
    print(f"    {name}: {short(figures[name])}", flush=True)


def short(value) -> str:
    text = json.dumps(value)
    return text if len(text) < 200 else text[:200] + "..."


def medians(samples: list[dict], key: str) -> dict:
    values = [s[key] for s in samples]
    return {"median": statistics.median(values), "samples": values}


def bench_size(size: str, repeats: int, budget: float, aoti: bool = True) -> dict:
    out = WORK / size
    out.mkdir(parents=True, exist_ok=True)
    pack, pt2, ref = out / "model.pack", out / "model.pt2", out / "ref.pt"
    r: dict = {}
    caches = WORK / "caches" / size
    print(f"[{size}] builds", flush=True)
    attempt(r, "build_aotpack", lambda: run_child("build-aotpack", size, pack, ref, cache=caches / "build",
                                                  budget=budget))
    if aoti:
        attempt(r, "build_aoti", lambda: run_child("build-aoti", size, pt2, cache=caches / "build", budget=budget))
    have_pack, have_pt2 = "error" not in r["build_aotpack"], aoti and "error" not in r["build_aoti"]
    if not have_pack:
        return r
    settle(pack)

    print(f"[{size}] hashing and loads", flush=True)
    cores = len(os.sched_getaffinity(0))

    def rate(threads: int) -> dict:
        samples = [run_child("hash", pack, threads, cache=caches / "hash", budget=budget) for _ in range(3)]
        seconds = statistics.median(s["seconds"] for s in samples)
        return {"threads": threads, "seconds": seconds, "mb_per_s": samples[0]["bytes"] / seconds / 1e6,
                "mb_per_s_per_core": samples[0]["bytes"] / seconds / 1e6 / min(threads, cores)}

    attempt(r, "hash_1_thread", lambda: rate(1))
    attempt(r, "hash_all_cores", lambda: rate(cores))

    def first_checks() -> dict:
        samples = [run_child("load", pack, "auto", cache=caches / f"first-{i}", budget=budget) for i in range(repeats)]
        if any(s["checked"] != "full" for s in samples):
            raise ChildError(f"a first load did not check every blob: {samples}")
        return medians(samples, "seconds")

    def later_loads() -> dict:
        run_child("load", pack, "auto", cache=caches / "serving", budget=budget)  # records the check
        samples = [run_child("load", pack, "auto", cache=caches / "serving", budget=budget) for _ in range(repeats)]
        if any(s["checked"] != "record" for s in samples):
            raise ChildError(f"a later load did not use the recorded check: {samples}")
        return medians(samples, "seconds")

    attempt(r, "load_first_check", first_checks)
    attempt(r, "load_later", later_loads)
    if have_pt2:
        def aoti_loads() -> dict:
            run_child("load-aoti", pt2, cache=caches / "aoti", budget=budget)  # fills Inductor's cache
            return medians([run_child("load-aoti", pt2, cache=caches / "aoti", budget=budget)
                            for _ in range(repeats)], "seconds")
        attempt(r, "load_aoti", aoti_loads)

    print(f"[{size}] first output in a fresh process", flush=True)
    serving = caches / "serving"

    def first_outputs(prefetch: str, cold: bool) -> dict:
        samples = []
        for _ in range(repeats if not cold else max(3, repeats // 2)):
            if cold:
                evict(pack)
            samples.append(run_child("first-output", pack, prefetch, ref, cache=serving, budget=budget))
        return {**medians(samples, "ms"), "max_abs_diff_vs_eager": max(s["max_abs_diff"] for s in samples)}

    attempt(r, "import_torch", lambda: medians([run_child("import-torch", cache=serving, budget=budget)
                                                for _ in range(repeats)], "ms"))
    attempt(r, "first_output", lambda: first_outputs("plain", False))
    attempt(r, "first_output_prefetch", lambda: first_outputs("prefetch", False))
    attempt(r, "first_output_cold", lambda: first_outputs("plain", True))
    attempt(r, "first_output_cold_prefetch", lambda: first_outputs("prefetch", True))
    if have_pt2:
        def aoti_first() -> dict:
            samples = [run_child("first-output-aoti", pt2, ref, cache=caches / "aoti", budget=budget)
                       for _ in range(repeats)]
            return {**medians(samples, "ms"), "max_abs_diff_vs_eager": max(s["max_abs_diff"] for s in samples)}
        attempt(r, "first_output_aoti", aoti_first)

    print(f"[{size}] memory of serving processes", flush=True)
    attempt(r, "pss_1", lambda: serving_pss("aotpack", pack, ref, 1, serving))
    attempt(r, "pss_4", lambda: serving_pss("aotpack", pack, ref, 4, serving))
    if have_pt2:
        attempt(r, "pss_1_aoti", lambda: serving_pss("aoti", pt2, ref, 1, caches / "aoti"))
        one = r["pss_1_aoti"].get("pss_bytes")
        if one and 4 * one > budget:
            r["pss_4_aoti"] = {"error": f"not run: 4 x {one / GB:.1f} GB would pass the {budget / GB:.1f} GB "
                                        "memory budget"}
        else:
            attempt(r, "pss_4_aoti", lambda: serving_pss("aoti", pt2, ref, 4, caches / "aoti"))
    return r


# -- report ----------------------------------------------------------------------------------------

def fig(r: dict, key: str, field: str = "median", scale: float = 1.0, fmt: str = ".0f") -> str:
    value = r.get(key, {})
    if field not in value:
        return "n/a"
    return format(value[field] * scale, fmt)


def minus(r: dict, key: str) -> str:
    if "median" not in r.get(key, {}) or "median" not in r.get("import_torch", {}):
        return "n/a"
    return f"{r[key]['median'] - r['import_torch']['median']:+.0f}"


def markdown(results: dict) -> str:
    m, sizes = results["machine"], results["sizes"]
    build_rows, load_rows, first_rows, memory_rows, failures = [], [], [], [], []
    for size, r in sizes.items():
        weights = r.get("build_aotpack", {}).get("weight_bytes")
        name = f"{size} ({weights / GB:.2f} GB)" if weights else size
        build_rows.append([name, fig(r, "build_aotpack", "seconds"), fig(r, "build_aoti", "seconds"),
                           fig(r, "build_aotpack", "peak_rss", 1 / GB, ".2f"),
                           fig(r, "build_aoti", "peak_rss", 1 / GB, ".2f"),
                           fig(r, "build_aotpack", "size", 1 / GB, ".2f"), fig(r, "build_aoti", "size", 1 / GB, ".2f")])
        load_rows.append([name, fig(r, "load_first_check", scale=1e3), fig(r, "load_later", scale=1e3, fmt=".1f"),
                          fig(r, "load_aoti", scale=1e3),
                          fig(r, "hash_1_thread", "mb_per_s_per_core"), fig(r, "hash_all_cores", "mb_per_s"),
                          fig(r, "hash_all_cores", "mb_per_s_per_core")])
        first_rows.append([name, fig(r, "import_torch"), minus(r, "first_output"), minus(r, "first_output_prefetch"),
                           minus(r, "first_output_cold"), minus(r, "first_output_cold_prefetch"),
                           minus(r, "first_output_aoti")])
        four = r.get("pss_4", {}).get("pss_bytes")
        memory_rows.append([name, fig(r, "pss_1", "pss_bytes", 1 / GB, ".2f"),
                            fig(r, "pss_4", "pss_bytes", 1 / GB, ".2f"),
                            f"{four / weights:.2f}" if weights and four else "n/a",
                            fig(r, "pss_1_aoti", "pss_bytes", 1 / GB, ".2f"),
                            fig(r, "pss_4_aoti", "pss_bytes", 1 / GB, ".2f")])
        failures += [f"- {size}, {k}: {v['error']}" for k, v in r.items() if isinstance(v, dict) and "error" in v]
    lines = [
        "# aotpack big-model benchmarks", "",
        f"Machine: {m['cpu']}, {m['cores']} cores (load average {m['load_average'][0]:.1f} at the start, "
        f"{m['load_average'][1]:.1f} at the end), torch {m['torch']}, transformers {m['transformers']}, "
        f"Python {m['python']}, {m['date']}. Hugging Face LlamaForCausalLM, float32, random weights; medians of "
        f"{results['config']['repeats']} fresh processes per figure; memory budget "
        f"{results['config']['budget_gb']} GB; whole run {results['total_seconds'] / 60:.0f} min. See "
        "benchmarks/README.md for what each column means.",
        "",
        "## Build (fresh process each)", "",
        *table(["model (weights)", "aotpack (s)", "AOTInductor (s)", "aotpack peak RSS (GB)",
                "AOTInductor peak RSS (GB)", "pack (GB)", ".pt2 (GB)"], build_rows), "",
        "## Load", "",
        *table(["model", "aotpack first load (ms)", "aotpack later load (ms)", "AOTInductor load (ms)",
                "hashing, 1 thread (MB/s)", "hashing, all cores (MB/s)", "per core (MB/s)"], load_rows), "",
        "## Fresh process to first output (ms; after import torch, each column is minus import torch)", "",
        *table(["model", "import torch", "aotpack", "aotpack prefetch", "aotpack, cold page cache",
                "aotpack prefetch, cold page cache", "AOTInductor"], first_rows), "",
        "## Memory of serving processes (PSS summed, GB)", "",
        *table(["model", "aotpack, 1 process", "aotpack, 4 processes", "4 processes / weights",
                "AOTInductor, 1 process", "AOTInductor, 4 processes"], memory_rows),
    ]
    if failures:
        lines += ["", "## Not measured", "", *failures]
    return "\n".join(lines) + "\n"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


README_START, README_END = "<!-- bench-big:start -->", "<!-- bench-big:end -->"


def update_readme(table_md: str) -> None:
    """Put the latest tables into the project README, between its big-model markers."""
    body = table_md.split("\n", 2)[2].replace("## ", "#### ")  # drop the title; nest the sections
    put_between_markers(ROOT / "README.md", README_START, README_END, body)


def machine_info() -> dict:
    cpu = platform.processor() or "unknown CPU"
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch": metadata.version("torch"),
            "transformers": metadata.version("transformers"), "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(SIZES),
                        help=f"comma-separated, from {', '.join(SIZES + MORE_SIZES)}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-budget-gb", type=float, default=7.5,
                        help="stop a process (with its children) whose memory passes this")
    parser.add_argument("--no-aoti", action="store_true", help="measure aotpack alone")
    parser.add_argument("--results", default="results-big", help="name of the results files in benchmarks/")
    args = parser.parse_args()
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if not sizes or any(s not in SIZES + MORE_SIZES for s in sizes):
        parser.error(f"--sizes takes names from {', '.join(SIZES + MORE_SIZES)}; got {sizes}")
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    shutil.rmtree(WORK, ignore_errors=True)
    (WORK / "tmp").mkdir(parents=True)
    try:
        results = {size: bench_size(size, args.repeats, args.memory_budget_gb * GB, not args.no_aoti)
                   for size in sizes}
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
    report = {"machine": dict(machine_info(), load_average=[load_before, os.getloadavg()[0]]),
              "config": {"repeats": args.repeats, "budget_gb": args.memory_budget_gb},
              "total_seconds": time.perf_counter() - start, "sizes": results}
    (HERE / f"{args.results}.json").write_text(json.dumps(report, indent=2) + "\n")
    (HERE / f"{args.results}.md").write_text(markdown(report))
    if args.results == "results-big" and sizes == list(SIZES):
        update_readme(markdown(report))
    print(f"wrote {HERE / args.results}.md and .json")


if __name__ == "__main__":
    main()
