"""Big models: a load reads no page of the weights until the code uses one (or prefetches them when asked),
many processes serving one pack share one copy of its weights, packs and blobs past 4 GiB are written,
read, checked and served, and the build holds no copy of the weights beyond the model's own."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from unittest import mock

import pytest
import torch
from torch import nn

import aotpack
from aotpack import _torch as build_torch
from aotpack.memory import peak_rss, reset_peak_rss
from aotpack.package import Blob, tensor_bytes, write_archive
from aotpack_runtime import cache
from aotpack_runtime.archive import Archive
from archive_tools import smallest_manifest
from conftest import ROOT

MB = 1 << 20
pytestmark = pytest.mark.slow


class Wide(nn.Module):
    """About 50 MB of float32 weights, every byte of which a call reads."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(1024, 4096)
        self.down = nn.Linear(4096, 1024)
        self.out = nn.Linear(1024, 4096)

    def forward(self, x):
        return self.out(torch.relu(self.down(torch.relu(self.up(x)))))


@pytest.fixture(scope="module")
def wide(session_dir):
    torch.manual_seed(0)
    model = Wide().eval()
    x = torch.rand(4, 1024)
    path = session_dir / "wide.pack"
    lines: list[str] = []
    # This 50 MB model stands for a multi-GB one: with the budget of linear weights packed at load lowered below
    # its linears', they stay plain weights mapped from the pack, as a large model's do (a packed copy per
    # process would be read at load and not shared).
    with mock.patch.object(build_torch, "ONEDNN_LINEAR_MAX_BYTES", 2**20):
        aotpack.build(model, (x,), path, progress=lines.append)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return path, model, x, lines, weights


# -- measuring a process's memory -----------------------------------------------------------------------

def pack_mapping(pid: int, pack) -> dict[str, int]:
    """Rss, Pss and Anonymous (bytes) of process ``pid``'s mappings of the pack file. In a private file
    mapping, Anonymous counts the pages copied on write: a page that is not is the page cache's, shared."""
    target = os.path.realpath(pack)
    out = {"Rss": 0, "Pss": 0, "Anonymous": 0}
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                parts = line.split(maxsplit=5)
                inside = len(parts) == 6 and parts[5].rstrip("\n") == target
            elif inside:
                key, _, value = line.partition(":")
                if key in out:
                    out[key] += int(value.split()[0]) * 1024
    return out


def total_pss(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Pss in smaps_rollup")


# A serving process: load, report, wait for a line on stdin before each next step (the test measures it
# in between), call, report, wait, exit.
WORKER = r"""
import sys, torch, aotpack
pkg = aotpack.load(sys.argv[1], prefetch=sys.argv[2] == "prefetch")
print("loaded", pkg.checked, flush=True); sys.stdin.readline()
if sys.argv[2] == "prefetch":
    print("prefetched", pkg.wait_prefetch(120), flush=True); sys.stdin.readline()
args, kwargs = pkg.example_inputs()
with torch.inference_mode():
    out = pkg(*args, **kwargs)
print("called", float(out.double().sum()), flush=True); sys.stdin.readline()
"""


class Worker:
    def __init__(self, pack, cache_dir, mode="plain"):
        env = dict(os.environ, AOTPACK_CACHE_DIR=str(cache_dir), OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, str(pack), mode], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     cwd=str(ROOT))

    def step(self) -> list[str]:
        """The next line the worker prints, split (it then waits for ``go``)."""
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"worker exited: {self.proc.communicate(timeout=60)[1][-2000:]}")
        return line.split()

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def finish(self) -> None:
        self.proc.communicate("go\n", timeout=60)
        assert self.proc.returncode == 0


# -- pages on demand --------------------------------------------------------------------------------------

def test_a_load_reads_no_page_of_the_weights_until_a_call_uses_them(wide, tmp_path):
    pack, _, _, _, weights = wide
    settled = os.stat(pack).st_ctime_ns / 1e9 + cache.SETTLE_SECONDS
    time.sleep(max(0.0, settled - time.time()))  # so that the first load may record its check
    for expected in ("full", "record"):  # an empty cache (every blob hashed), then the recorded check
        w = Worker(pack, tmp_path / "cache")
        assert w.step() == ["loaded", expected]
        loaded = pack_mapping(w.proc.pid, pack)
        w.go()
        assert w.step()[0] == "called"
        called = pack_mapping(w.proc.pid, pack)
        w.finish()
        assert loaded["Rss"] < 0.05 * weights, loaded  # hashing read the file, not the mapping
        assert called["Rss"] > 0.95 * weights, called
        assert called["Anonymous"] == 0  # file pages (shared with the page cache), none copied on write


def test_prefetch_reads_the_weights_in_the_background(wide, tmp_path):
    pack, _, _, _, weights = wide
    w = Worker(pack, tmp_path / "cache", "prefetch")
    assert w.step()[0] == "loaded"
    w.go()
    assert w.step() == ["prefetched", "True"]
    prefetched = pack_mapping(w.proc.pid, pack)
    w.go()
    assert w.step()[0] == "called"
    w.finish()
    assert prefetched["Rss"] > 0.95 * weights, prefetched
    assert prefetched["Anonymous"] == 0


# -- many workers, one copy ----------------------------------------------------------------------------

def test_four_workers_share_one_copy_of_the_weights(wide, tmp_path):
    """N processes serve one pack: their summed PSS stays below one copy of the weights plus N times the
    per-process overhead (a lone worker's PSS without its weights), and the pack's pages are one copy."""
    pack, _, _, _, weights = wide
    n = 4
    alone = Worker(pack, tmp_path / "cache")
    alone.step()
    alone.go()
    expected_sum = alone.step()[1]
    overhead = total_pss(alone.proc.pid) - pack_mapping(alone.proc.pid, pack)["Pss"]
    alone.finish()

    workers = [Worker(pack, tmp_path / "cache") for _ in range(n)]
    for w in workers:
        w.step()
        w.go()
    for w in workers:
        assert w.step() == ["called", expected_sum]
    mappings = [pack_mapping(w.proc.pid, pack) for w in workers]
    summed = sum(total_pss(w.proc.pid) for w in workers)
    for w in workers:
        w.finish()
    for m in mappings:
        assert m["Rss"] > 0.95 * weights and m["Anonymous"] == 0, m
    assert sum(m["Pss"] for m in mappings) < 1.05 * weights + 4 * MB, mappings
    assert summed < weights + n * overhead, (summed, weights, overhead)


# -- past 4 GiB ------------------------------------------------------------------------------------------

ROWS, WIDTH = 1_050_000, 1024  # a float32 table of 4.3 GB: past 4 GiB


class Table(nn.Module):
    """A lookup table past 4 GiB, then a projection whose weights lie past 4 GiB in the pack. The table's
    memory is never written except for the rows the test sets: the rest reads as zeros and costs nothing."""

    def __init__(self, rows: list[int]):
        super().__init__()
        table = torch.empty(ROWS, WIDTH)  # a fresh mapping: zeros that take no memory until written
        gen = torch.Generator().manual_seed(0)
        for r in rows:
            table[r] = torch.rand(WIDTH, generator=gen)
        self.register_buffer("lookup", table)
        self.proj = nn.Linear(WIDTH, 8)

    def forward(self, idx):
        return self.proj(self.lookup[idx])


def test_packs_and_blobs_past_4_gib_are_written_read_checked_and_served(tmp_path, monkeypatch):
    rows = [0, 1, 700_000, ROWS - 2, ROWS - 1]
    torch.manual_seed(0)
    model = Table(rows).eval()
    idx = torch.tensor(rows + [5, 900_000])
    pack = tmp_path / "table.pack"
    aotpack.build(model, (idx,), pack)
    assert os.stat(pack).st_size > 4 << 30
    assert os.stat(pack).st_blocks * 512 < 256 * MB  # the zero rows are holes: sparse on disk

    a = Archive.open(pack)
    table_blob = a.manifest.blob(next(w.blob for w in a.manifest.weights if w.name == "lookup"))
    after = [a.manifest.blob(w.blob) for w in a.manifest.weights if w.name.startswith("proj.")]
    assert table_blob.size == ROWS * WIDTH * 4 > 4 << 30
    assert all(b.offset > 4 << 30 for b in after)

    monkeypatch.setattr(cache, "SETTLE_SECONDS", 0.0)
    first = aotpack.load(pack, cache_dir=tmp_path / "cache")
    later = aotpack.load(pack, cache_dir=tmp_path / "cache")
    assert (first.checked, later.checked) == ("full", "record")
    probe = torch.tensor([ROWS - 1, 3, ROWS - 2, 700_000, 1_000_000, 0, 2])  # the same shape, other rows
    with torch.inference_mode():
        for pkg in (first, later):
            for x in (idx, probe):
                assert torch.equal(pkg(x), model(x))
        assert torch.equal(later.weights["lookup"][ROWS - 1], model.lookup[ROWS - 1])


# -- build memory ----------------------------------------------------------------------------------------

def test_the_writer_holds_no_copy_of_a_weight(tmp_path):
    t = torch.rand(128 * MB // 4)
    manifest = smallest_manifest("w")
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    reset_peak_rss()
    write_archive(tmp_path / "w.pack", manifest, [Blob("w", t, compressible=False)], level=3)
    assert peak_rss() - rss < 16 * MB
    assert Archive.open(tmp_path / "w.pack").read_blob("w") == tensor_bytes(t)


def test_the_build_summary_says_its_peak_memory(wide):
    _, _, _, lines, weights = wide
    found = re.search(r", peak memory (\d+\.\d\d) GB$", lines[-1])
    assert found and lines[-1].startswith("wrote "), lines[-1]
    assert float(found.group(1)) * 1e9 > weights  # the model's own weights are in this process
