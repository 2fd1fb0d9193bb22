"""Packs of several methods against one-method packs, on the tiny Llama of examples/llm (hidden 64, 2 layers,
cache 64): decode tokens per second through the one-token ``decode`` method of a prefill+decode pack, through
today's single dynamic entry (examples/llm/llama.py) and through eager (the same static-cache wrapper); and
the size of the prefill+decode pack against the sum of a prefill-only and a decode-only pack.

    .venv/bin/python benchmarks/bench_methods.py [--steps 200] [--json out.json]

Builds four packs (about a minute each on a 2-core host) into a temporary folder, without the build cache.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "llm"))


def _decode_rates(steps: dict, calls: dict, start: int, rounds: int = 7) -> dict:
    """Tokens per second of each ``step(ids, pos)`` (name -> function) for one token at a time: the median of
    ``rounds`` runs of ``calls[name]`` tokens, the contenders taking turns in each round (so that a busy
    moment of the host does not fall on one of them only)."""
    rates: dict = {name: [] for name in steps}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, step in steps.items():
                t0 = time.perf_counter()
                for i in range(calls[name]):
                    step(torch.tensor([[7]]), torch.tensor([start + i % (60 - start)]))
                rates[name].append(calls[name] / (time.perf_counter() - t0))
    return {name: statistics.median(r) for name, r in rates.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--json", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import aotpack
    import llama_methods
    from decoders import model_file, wrapped

    work = pathlib.Path(tempfile.mkdtemp(prefix="aotpack-bench-methods-"))
    packs = {name: work / f"{name}.pack" for name in ("methods", "single", "prefill", "decode")}
    build_s = {}
    t0 = time.perf_counter()
    aotpack.build(llama_methods.model, None, packs["methods"], methods=llama_methods.methods, cache=False)
    build_s["methods"] = time.perf_counter() - t0
    wrapper, inputs, kwargs, dynamic = model_file("llama")
    t0 = time.perf_counter()
    aotpack.build(wrapper, inputs, packs["single"], example_kwargs=kwargs, dynamic_shapes=dynamic, cache=False)
    build_s["single"] = time.perf_counter() - t0
    for name in ("prefill", "decode"):
        aotpack.build(llama_methods.model, None, packs[name], methods={name: llama_methods.methods[name]},
                      cache=False)
    prompt = torch.tensor([[5, 17, 42, 8]])
    pkg = aotpack.load(packs["methods"])
    s = pkg.session()
    single = aotpack.load(packs["single"]).session()
    _, eager = wrapped("llama")
    with torch.inference_mode():
        s.prefill(input_ids=prompt, cache_position=torch.tensor([0]))
        single(input_ids=prompt, cache_position=torch.tensor([0]))
        eager(input_ids=prompt, cache_position=torch.tensor([0]))
    rates = _decode_rates({"pack, decode method": lambda i, c: s.decode(input_ids=i, cache_position=c),
                           "pack, one dynamic entry": lambda i, c: single(input_ids=i, cache_position=c),
                           "eager": lambda i, c: eager(input_ids=i, cache_position=c)},
                          {"pack, decode method": args.steps, "pack, one dynamic entry": args.steps,
                           "eager": max(20, args.steps // 10)}, 4)
    sizes = {name: os.path.getsize(path) for name, path in packs.items()}
    result = {"host": {"cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "load_average": os.getloadavg()},
              "decode_tokens_per_s": {k: round(v, 1) for k, v in rates.items()},
              "pack_bytes": sizes, "build_s": {k: round(v, 1) for k, v in build_s.items()}}
    print(json.dumps(result, indent=2))
    apart = sizes["prefill"] + sizes["decode"]
    print(f"prefill+decode pack {sizes['methods']:,} bytes; prefill-only + decode-only {apart:,} bytes "
          f"({sizes['methods'] / apart:.2f}x)")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    for path in packs.values():
        path.unlink(missing_ok=True)
    os.rmdir(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
