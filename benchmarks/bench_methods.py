"""Packs of several methods against one-method packs, on the tiny Llama of examples/llm (hidden 64, 2 layers,
cache 64): decode tokens per second through the one-token ``decode`` method of a prefill+decode pack, through
today's single dynamic entry (examples/llm/llama.py) and through eager (the same static-cache wrapper); and
the size of the prefill+decode pack against the sum of a prefill-only and a decode-only pack.

And the tiny Whisper of tests/programs.py (d_model 32, 2+2 layers, cache 16) as two programs of ``encode`` and
``decode``: through transformers' static-cache decoder wrapper (the encoder output goes to every decode step,
which projects it into cross-attention keys and values again), and ``WhisperCrossCached``, whose ``encode``
writes those keys and values into the state once: decode tokens per second of each, pack against eager.

    .venv/bin/python benchmarks/bench_methods.py [--steps 200] [--models llama,whisper] [--json out.json]

Builds four Llama packs and two Whisper packs (about a minute each on a 2-core host) into a temporary folder,
without the build cache.
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


def _whisper(work: pathlib.Path, steps: int) -> dict:
    """Decode tokens per second of the two Whisper programs, pack and eager, and their packs' sizes."""
    import aotpack

    sys.path.insert(0, str(ROOT / "tests"))
    import programs

    wrapper = programs.whisper_program()
    cross = programs.WhisperCrossCached(programs.whisper_model()).eval()
    paths = {"wrapper": work / "whisper.pack", "cross": work / "whisper-cross.pack"}
    build_s = {}
    for name, program in (("wrapper", wrapper), ("cross", cross)):
        t0 = time.perf_counter()
        aotpack.build(program, None, paths[name], methods=programs.whisper_methods(program, name == "cross"),
                      cache=False)
        build_s[name] = time.perf_counter() - t0
    s_wrapper, s_cross = aotpack.load(paths["wrapper"]).session(), aotpack.load(paths["cross"]).session()
    features = programs.WHISPER_FEATURES
    with torch.inference_mode():
        hidden = s_wrapper.encode(features)
        s_cross.encode(features)
        eager_hidden = wrapper.encode(features)
        cross.encode(features)
    limit = programs.WHISPER_CACHE
    contenders = {
        "pack, wrapper (encoder output to every step)": lambda i, c: s_wrapper.decode(i, hidden, c),
        "pack, cross-attention cache written by encode": lambda i, c: s_cross.decode(i, c),
        "eager, wrapper": lambda i, c: wrapper.decode(i, eager_hidden, c),
        "eager, cross-attention cache written by encode": lambda i, c: cross.decode(i, c)}
    rates: dict = {name: [] for name in contenders}
    with torch.inference_mode():
        for _ in range(7):
            for name, step in contenders.items():
                calls = steps if name.startswith("pack") else max(20, steps // 5)
                t0 = time.perf_counter()
                for i in range(calls):
                    step(torch.tensor([[7]]), torch.tensor([i % limit]))
                rates[name].append(calls / (time.perf_counter() - t0))
    sizes = {name: os.path.getsize(path) for name, path in paths.items()}
    for path in paths.values():
        path.unlink()
    return {"decode_tokens_per_s": {k: round(statistics.median(v), 1) for k, v in rates.items()},
            "pack_bytes": sizes, "build_s": {k: round(v, 1) for k, v in build_s.items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--json", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--models", default="llama,whisper", help="which to measure, comma-separated: llama, whisper")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = set(args.models.split(","))
    if not models or models - {"llama", "whisper"}:
        p.error(f"--models takes llama and/or whisper, got {args.models!r}")
    work = pathlib.Path(tempfile.mkdtemp(prefix="aotpack-bench-methods-"))
    result = {"host": {"cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "load_average_before": os.getloadavg()}}
    if "llama" in models:
        result["llama"] = _llama(work, args.steps)
    if "whisper" in models:
        result["whisper"] = _whisper(work, args.steps)
    result["host"]["load_average_after"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    os.rmdir(work)
    return 0


def _llama(work: pathlib.Path, steps: int) -> dict:
    """Decode tokens per second through the prefill+decode pack's one-token method, through one dynamic entry
    and eager; the pack's size against a prefill-only and a decode-only pack."""
    import aotpack
    import llama_methods
    from decoders import model_file, wrapped

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
                          {"pack, decode method": steps, "pack, one dynamic entry": steps,
                           "eager": max(20, steps // 10)}, 4)
    sizes = {name: os.path.getsize(path) for name, path in packs.items()}
    for path in packs.values():
        path.unlink(missing_ok=True)
    apart = sizes["prefill"] + sizes["decode"]
    print(f"prefill+decode pack {sizes['methods']:,} bytes; prefill-only + decode-only {apart:,} bytes "
          f"({sizes['methods'] / apart:.2f}x)")
    return {"decode_tokens_per_s": {k: round(v, 1) for k, v in rates.items()},
            "pack_bytes": sizes, "build_s": {k: round(v, 1) for k, v in build_s.items()}}


if __name__ == "__main__":
    sys.exit(main())
