"""Per-call latency on the GPU: eager vs torch.compile vs aotpack's CUDA entries, on the examples.

Run from the repository root, on a machine with a GPU and the CUDA build of torch::

    python benchmarks/bench_cuda.py [--quick] [--models mlp,convnet,multi_io] [--device cuda]

For each example it builds a pack with a CUDA entry (on this GPU: autotuned), checks the pack's output
against eager, then times each variant in one process under ``torch.inference_mode``: 20 warm-up calls, then
``--calls`` calls, each synchronised (``torch.cuda.synchronize``) and timed with ``perf_counter``; figures
are medians in µs, ratios are to eager of the same run. Writes ``benchmarks/results-cuda.md`` and
``results-cuda.json``. ``--device cpu`` runs the same measurement on the CPU (to try the script on a host
without a GPU; the CPU tables of record come from ``bench.py``). Builds and caches live in
``benchmarks/.work-cuda/``, removed at the end.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import shutil
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work-cuda"


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _time_calls(fn, device: str, calls: int) -> list[float]:
    for _ in range(20):
        fn()
    _sync(device)
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        _sync(device)
        out.append((time.perf_counter() - start) * 1e6)
    return out


def _to(device: str, tree):
    import torch

    return torch.utils._pytree.tree_map(lambda v: v.to(device) if isinstance(v, torch.Tensor) else v, tree)


def bench_model(name: str, device: str, calls: int) -> dict:
    import torch

    import aotpack
    from aotpack.modelfile import load_model_file

    spec = load_model_file(str(ROOT / "examples" / f"{name}.py"))
    pack = WORK / f"{name}.pack"
    start = time.perf_counter()
    aotpack.build(spec.model, spec.example_inputs, pack, example_kwargs=spec.example_kwargs, devices=(device,))
    build_s = time.perf_counter() - start
    args, kwargs = _to(device, (spec.example_inputs, spec.example_kwargs))
    model = spec.model.to(device)
    pkg = aotpack.load(pack)
    compiled = torch.compile(model)
    row: dict = {"model": name, "build_s": round(build_s, 2)}
    with torch.inference_mode():
        ref = model(*args, **kwargs)
        got = pkg(*args, **kwargs)
        flat_ref, _ = torch.utils._pytree.tree_flatten(ref)
        flat_got, _ = torch.utils._pytree.tree_flatten(got)
        row["max_abs_diff_vs_eager"] = max(((a - b).abs().max().item() for a, b in zip(flat_got, flat_ref)
                                            if isinstance(a, torch.Tensor) and a.numel()), default=0.0)
        variants = {"eager": lambda: model(*args, **kwargs), "torch.compile": lambda: compiled(*args, **kwargs),
                    "aotpack": lambda: pkg(*args, **kwargs)}
        for label, fn in variants.items():
            try:
                samples = _time_calls(fn, device, calls)
                row[label] = {"median_us": round(statistics.median(samples), 2), "samples": len(samples)}
            except Exception as e:  # recorded, shown as n/a
                row[label] = {"error": f"{type(e).__name__}: {e}"}
    eager = row["eager"].get("median_us")
    for label in variants:
        m = row[label].get("median_us")
        if m is not None and eager:
            row[label]["x_eager"] = round(m / eager, 2)
    return row


def _cell(v: dict) -> str:
    return f"{v['median_us']:.1f} ({v['x_eager']:.2f}×)" if "median_us" in v else "n/a"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,convnet,multi_io")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="fewer calls: a smoke run")
    ap.add_argument("--calls", type=int, default=None)
    opts = ap.parse_args()
    import torch

    if opts.device == "cuda" and not torch.cuda.is_available():
        print("bench_cuda.py: no GPU visible to torch here; run it on a GPU machine (or --device cpu to try "
              "the script)", file=sys.stderr)
        return 2
    calls = opts.calls or (50 if opts.quick else 500)
    shutil.rmtree(WORK, ignore_errors=True)
    (WORK / "tmp").mkdir(parents=True)
    os.environ.update(TMPDIR=str(WORK / "tmp"), TORCHINDUCTOR_CACHE_DIR=str(WORK / "inductor"),
                      AOTPACK_CACHE_DIR=str(WORK / "cache"))
    try:
        rows = [bench_model(m, opts.device, calls) for m in opts.models.split(",")]
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
    gpu = torch.cuda.get_device_name() if opts.device == "cuda" else "CPU"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    result = {"device": gpu, "torch": torch.__version__, "when": when, "calls": calls, "rows": rows}
    lines = [f"Device: {gpu}, torch {torch.__version__}, {when}. Medians of {calls} synchronised calls.", "",
             "| model | eager (µs) | torch.compile | aotpack | max abs diff vs eager | build (s) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {_cell(r['eager'])} | {_cell(r['torch.compile'])} | {_cell(r['aotpack'])} | "
                     f"{r['max_abs_diff_vs_eager']:.1e} | {r['build_s']} |")
    suffix = "cuda" if opts.device == "cuda" else "cuda-script-on-cpu"
    (ROOT / "benchmarks" / f"results-{suffix}.md").write_text("\n".join(lines) + "\n")
    (ROOT / "benchmarks" / f"results-{suffix}.json").write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
