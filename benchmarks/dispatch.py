"""Dispatch figures, run by bench.py in a child process (or alone: ``python benchmarks/dispatch.py WORKDIR``).

Builds two packs of one small MLP and prints one JSON object:

- a dynamic entry (batch 1..64) against a static entry built for the same batch: per-call latency of each
  on the same input;
- a pack of four static entries (batch 8, 9, 10, 11): per-call latency of an input served by the first
  entry and of one served by the last, and the cost of one failed guard check (each extra entry tried);
- ``aotpack.load`` time of a pack the process has loaded before (second load).
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

import aotpack


def median_us(fn, calls: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main(work: Path, calls: int = 2000, warmup: int = 200) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    x8 = torch.randn(8, 32)
    dyn = aotpack.build(model, (x8,), work / "dynamic.pack", dynamic_shapes={"input": {0: Dim("batch", min=1, max=64)}})
    multi = aotpack.build(model, (x8,), work / "multi.pack",
                          specializations=[(torch.randn(b, 32),) for b in (9, 10, 11)])
    p_dyn, p_multi = aotpack.load(dyn), aotpack.load(multi)
    x11 = torch.randn(11, 32)
    assert p_multi.select(x11) is p_multi.entries[3]
    out = {}
    with torch.inference_mode():
        out["dynamic_entry_us"] = median_us(lambda: p_dyn(x8), calls, warmup)
        out["static_entry_us"] = median_us(lambda: p_multi(x8), calls, warmup)
        out["last_of_4_entries_us"] = median_us(lambda: p_multi(x11), calls, warmup)
        # What each extra entry costs: one guard check that fails (the input's batch is 11, not 8).
        out["per_extra_entry_us"] = median_us(lambda: p_multi.entries[0].guards.match((x11,), {}), calls, warmup)
    loads = []
    for _ in range(20):
        start = time.perf_counter()
        aotpack.load(multi)
        loads.append(time.perf_counter() - start)
    out["second_load_ms"] = statistics.median(loads) * 1e3
    out["entries_in_multi_pack"] = len(p_multi.entries)
    return out


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
