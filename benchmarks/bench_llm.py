"""Token-by-token generation from a stateful pack, against eager, torch.compile and AOTInductor's package.

Run from the repository root::

    .venv/bin/python benchmarks/bench_llm.py [--sizes tiny,600m] [--quick]

Two sizes of a Llama-shaped decoder with random weights, each wrapped in Hugging Face's static-cache export
wrapper (``examples/llm/decoders.py``): ``tiny`` (the example: hidden 64, 2 layers, vocab 1000), where the
per-call overhead dominates, and ``600m`` (hidden 1024, 8 layers, vocab 32000, fp32, about 0.6 GB), where
reading the weights does. For each it measures, in one process and one run (so the ratios compare like
with like):

- prefill: the latency of one call on a long prompt (median over repetitions);
- decode: tokens per second, one token per call after a short prompt (median per-token time);
- for aotpack: the time to open a session (lazy, and with its state allocated), the memory a second
  session adds after a prefill (RSS, in a fresh process that imports only the runtime) beside its KV
  cache's full size, and the build time;
- the physical limit: decode reads every weight once per token, so tokens per second cannot exceed the
  host's memory bandwidth (measured here by summing a 1 GiB tensor) divided by the weights' bytes.

Writes ``benchmarks/results-llm.md`` and ``results-llm.json``, and the table into the README between its
``<!-- bench-llm:start -->`` / ``<!-- bench-llm:end -->`` markers. Builds and caches live in
``benchmarks/.work-llm/`` (removed at the end).
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

from _markers import put_between_markers

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / ".work-llm"
sys.path.insert(0, str(ROOT / "examples" / "llm"))

SIZES = {
    # name: (config overrides, max cache length, prefill prompt length, decode steps)
    "tiny": ({}, 64, 48, 48),
    "600m": ({"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 16,
              "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 32000}, 512, 256, 64),
}
README_START, README_END = "<!-- bench-llm:start -->", "<!-- bench-llm:end -->"


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(step, vocab: int, prompt_len: int, steps: int, repeats: int) -> dict:
    """Prefill latency (s) of a ``prompt_len`` prompt, and decode tokens/s after a 4-token prompt, for
    ``step(input_ids, cache_position) -> logits``."""
    import torch

    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=gen)
    with torch.inference_mode():
        step(prompt, torch.tensor([0]))  # warm-up (first-call allocations, compilation)
        prefill = _median_time(lambda: step(prompt, torch.tensor([0])), repeats)
        short = prompt[:, :4]
        step(short, torch.tensor([0]))
        token = torch.tensor([[1]])
        times = []
        for i in range(steps):
            start = time.perf_counter()
            step(token, torch.tensor([4 + i]))
            times.append(time.perf_counter() - start)
    return {"prefill_s": prefill, "decode_tok_s": 1 / statistics.median(times), "decode_samples": len(times)}


def memory_bandwidth() -> float:
    """Bytes per second that summing a 1 GiB float32 tensor reads (median of 5), all threads."""
    import torch

    x = torch.ones(256 * 1024 * 1024)
    x.sum()
    seconds = _median_time(lambda: x.sum(), 5)
    return x.numel() * 4 / seconds


_SESSION_CHILD = r"""
import json, resource, sys, time, statistics
import torch, aotpack
path, prompt_len = sys.argv[1], int(sys.argv[2])
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
pkg = aotpack.load(path)
lazy = []
for _ in range(2000):
    t = time.perf_counter(); pkg.session(); lazy.append(time.perf_counter() - t)
allocated = []
for _ in range(200):
    t = time.perf_counter(); pkg.session(device="cpu"); allocated.append(time.perf_counter() - t)
prompt = torch.ones(1, prompt_len, dtype=torch.long)
with torch.inference_mode():
    first = pkg.session(); first(input_ids=prompt, cache_position=torch.tensor([0]))
    before = rss()
    second = pkg.session(); second(input_ids=prompt, cache_position=torch.tensor([0]))
    after = rss()
state_bytes = sum(t.numel() * t.element_size() for t in second.state_dict().values())
print(json.dumps({"open_lazy_us": 1e6 * statistics.median(lazy), "open_allocated_us": 1e6 * statistics.median(allocated),
                  "second_session_rss_bytes": after - before, "state_bytes": state_bytes,
                  "runtime_only": "torch._inductor" not in sys.modules}))
"""


def benchmark_size(name: str, quick: bool, bandwidth: float) -> dict:
    import torch
    from torch.export import Dim

    import aotpack
    from decoders import wrapped

    overrides, max_len, prompt_len, steps = SIZES[name]
    repeats = 3 if quick else 7
    steps = min(steps, 16) if quick else steps
    model, wrapper = wrapped("llama", max_cache_len=max_len, **overrides)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    vocab = model.config.vocab_size
    kwargs = {"input_ids": torch.tensor([[5, 17, 42]]), "cache_position": torch.tensor([0])}
    dynamic = {"input_ids": {1: Dim("seq", min=1, max=max_len - 1)}, "cache_position": None}
    folder = WORK / name
    folder.mkdir(parents=True, exist_ok=True)
    out: dict = {"size": name, "weight_bytes": weight_bytes, "max_cache_len": max_len, "prompt_len": prompt_len}

    start = time.perf_counter()
    aotpack.build(wrapper, (), folder / "model.pack", example_kwargs=kwargs, dynamic_shapes=dynamic)
    out["aotpack_build_s"] = time.perf_counter() - start
    start = time.perf_counter()
    ep = torch.export.export(wrapper, (), kwargs, dynamic_shapes=dynamic, strict=True)
    pt2 = torch._inductor.aoti_compile_and_package(ep, package_path=str(folder / "model.pt2"))
    out["aoti_build_s"] = time.perf_counter() - start

    pkg = aotpack.load(folder / "model.pack")
    session = pkg.session()
    aoti = torch._inductor.aoti_load_package(pt2)
    compiled = torch.compile(wrapper)
    variants = {
        "eager": lambda ids, pos: wrapper(input_ids=ids, cache_position=pos),
        "torch.compile": lambda ids, pos: compiled(input_ids=ids, cache_position=pos),
        "AOTInductor": lambda ids, pos: aoti(input_ids=ids, cache_position=pos),
        "aotpack": lambda ids, pos: session(input_ids=ids, cache_position=pos),
    }
    out["variants"] = {}
    for variant, step in variants.items():
        try:
            out["variants"][variant] = measure(step, vocab, prompt_len, steps, repeats)
        except Exception as e:  # recorded, shown as n/a
            out["variants"][variant] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        print(f"  {name} {variant}: {out['variants'][variant]}", flush=True)
    proc = subprocess.run([sys.executable, "-c", _SESSION_CHILD, str(folder / "model.pack"), str(prompt_len)],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ))
    out["sessions"] = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else \
        {"error": proc.stderr[-500:]}
    out["bandwidth_limit_tok_s"] = bandwidth / weight_bytes
    return out


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, Python {m['python']}, {m['date']}. "
             f"Memory bandwidth (sum of a 1 GiB tensor): {results['bandwidth_bytes_s'] / 1e9:.1f} GB/s. Medians; "
             f"whole run {results['total_seconds'] / 60:.1f} min.", "",
             "| model | weights | | eager | torch.compile | AOTInductor | aotpack | aotpack vs eager | aotpack vs AOTI |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["sizes"]:
        v = r["variants"]

        def get(variant, key):
            return v.get(variant, {}).get(key)

        for key, label, spec, scale in (("prefill_s", f"prefill {r['prompt_len']} tokens (ms)", ".2f", 1e3),
                                        ("decode_tok_s", "decode (tokens/s)", ".0f", 1)):
            cells = [_fmt(None if get(x, key) is None else get(x, key) * scale, spec)
                     for x in ("eager", "torch.compile", "AOTInductor", "aotpack")]
            a, e, t = get("aotpack", key), get("eager", key), get("AOTInductor", key)
            faster = (lambda x, y: y / x) if key == "prefill_s" else (lambda x, y: x / y)
            vs_e = _fmt(faster(a, e) if a and e else None, ".2f") + "x"
            vs_t = _fmt(faster(a, t) if a and t else None, ".2f") + "x"
            lines.append(f"| {r['size']} | {r['weight_bytes'] / 1e6:.1f} MB | {label} | " + " | ".join(cells)
                         + f" | {vs_e} | {vs_t} |")
    lines += ["", "| model | decode limit (bandwidth / weights) | aotpack decode / limit | open a session (us, lazy / "
              "allocated) | second session's memory after a prefill | its KV cache (full) | build aotpack / AOTI (s) |",
              "|---|---|---|---|---|---|---|"]
    for r in results["sizes"]:
        s = r["sessions"]
        a = r["variants"].get("aotpack", {}).get("decode_tok_s")
        lines.append(f"| {r['size']} | {r['bandwidth_limit_tok_s']:.0f} tokens/s | "
                     f"{_fmt(a / r['bandwidth_limit_tok_s'] if a else None, '.2f')} | "
                     f"{_fmt(s.get('open_lazy_us'), '.1f')} / {_fmt(s.get('open_allocated_us'), '.1f')} | "
                     f"{_fmt(s.get('second_session_rss_bytes', 0) / 1e6 if 'error' not in s else None, '.2f')} MB | "
                     f"{_fmt(s.get('state_bytes', 0) / 1e6 if 'error' not in s else None, '.2f')} MB | "
                     f"{r['aotpack_build_s']:.0f} / {r['aoti_build_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,600m", help="comma-separated: " + ", ".join(SIZES))
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and decode steps (a smoke run)")
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown sizes {unknown}; choose from {', '.join(SIZES)}")
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    for var, sub in (("TMPDIR", "tmp"), ("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("AOTPACK_CACHE_DIR", "cache"),
                     ("AOTPACK_BUILD_CACHE", "build-cache")):
        os.environ[var] = str(WORK / sub)
        (WORK / sub).mkdir()
    import tempfile

    tempfile.tempdir = None
    import torch

    start = time.perf_counter()
    try:
        bandwidth = memory_bandwidth()
        results = {"sizes": [benchmark_size(s, args.quick, bandwidth) for s in sizes],
                   "bandwidth_bytes_s": bandwidth}
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
    results["total_seconds"] = time.perf_counter() - start
    results["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch": torch.__version__, "python": platform.python_version(),
                          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    table = markdown(results)
    (HERE / "results-llm.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    (HERE / "results-llm.md").write_text("# Generation from a stateful pack\n\n" + table)
    put_between_markers(ROOT / "README.md", README_START, README_END, table)
    print(table)


if __name__ == "__main__":
    main()
