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


def _decode_rate(step, steps: int, start: int) -> float:
    """Tokens per second of ``step(ids, pos)`` for one token at a time, median of 5 runs of ``steps``."""
    rates = []
    with torch.inference_mode():
        for _ in range(5):
            t0 = time.perf_counter()
            for i in range(steps):
                step(torch.tensor([[7]]), torch.tensor([start + i % (60 - start)]))
            rates.append(steps / (time.perf_counter() - t0))
    return statistics.median(rates)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--json", default=None)
    args = p.parse_args()
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
    rates = {}
    pkg = aotpack.load(packs["methods"])
    s = pkg.session()
    s.prefill(input_ids=prompt, cache_position=torch.tensor([0]))
    rates["pack, decode method"] = _decode_rate(lambda i, c: s.decode(input_ids=i, cache_position=c), args.steps, 4)
    single = aotpack.load(packs["single"]).session()
    single(input_ids=prompt, cache_position=torch.tensor([0]))
    rates["pack, one dynamic entry"] = _decode_rate(lambda i, c: single(input_ids=i, cache_position=c), args.steps, 4)
    _, eager = wrapped("llama")
    with torch.inference_mode():
        eager(input_ids=prompt, cache_position=torch.tensor([0]))
    rates["eager"] = _decode_rate(lambda i, c: eager(input_ids=i, cache_position=c), max(20, args.steps // 10), 4)
    sizes = {name: os.path.getsize(path) for name, path in packs.items()}
    result = {"host": {"cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "load_average": os.getloadavg()},
              "decode_tokens_per_s": {k: round(v, 1) for k, v in rates.items()},
              "pack_bytes": sizes, "build_s": {k: round(v, 1) for k, v in build_s.items()}}
    print(json.dumps(result, indent=2))
    print(f"prefill+decode pack {sizes['methods']:,} bytes; prefill-only + decode-only {sizes['prefill'] + sizes['decode']:,} "
          f"bytes ({sizes['methods'] / (sizes['prefill'] + sizes['decode']):.2f}x)")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    for path in packs.values():
        path.unlink(missing_ok=True)
    os.rmdir(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
