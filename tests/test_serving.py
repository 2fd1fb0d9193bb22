"""Serving behaviour: threads, concurrent loads into one cache, shared weights, a cheap second load."""
from __future__ import annotations

import os
import threading

import torch

import aotpack
from aotpack_runtime import cache
from helpers import assert_close_to_eager


def test_eight_threads_get_their_own_correct_results(convnet_pack):
    pkg = aotpack.load(convnet_pack.path)
    inputs = [torch.randn(convnet_pack.args[0].shape, generator=torch.Generator().manual_seed(i))
              for i in range(8)]
    with torch.no_grad():
        expected = [convnet_pack.model(x) for x in inputs]
    results: dict[int, list] = {i: [] for i in range(8)}
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def work(i: int) -> None:
        try:
            barrier.wait()
            for _ in range(10):
                results[i].append(pkg(inputs[i]))
        except BaseException as e:  # collected and re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    for i in range(8):
        assert len(results[i]) == 10
        for out in results[i]:
            assert_close_to_eager(out, expected[i])


def test_second_load_shares_weights(convnet_pack):
    a = aotpack.load(convnet_pack.path)
    b = aotpack.load(convnet_pack.path)
    assert a.weights and all(a.weights[k].data_ptr() == b.weights[k].data_ptr() for k in a.weights)


def test_weights_are_views_of_the_mapped_file(convnet_pack):
    """Weights are stored uncompressed and used in place: each tensor's memory is its blob in the mapping
    of the pack file (shared with the page cache and other processes), not a copy."""
    import ctypes

    from aotpack_runtime import weights

    weights._loaded_weights.clear()  # forget earlier loads of this file in this test process
    pkg = aotpack.load(convnet_pack.path)
    archive = pkg._archive
    m = archive.manifest
    assert all(m.blob(w.blob).compression == "none" for w in m.weights)
    base = ctypes.addressof(ctypes.c_char.from_buffer(archive._map))
    for w in m.weights:
        assert pkg.weights[w.name].data_ptr() - base == archive.region_start + m.blob(w.blob).offset


def test_two_processes_load_into_one_empty_cache_at_once(convnet_pack, session_dir):
    shared = session_dir / "race-cache"
    code = f"""
import aotpack, torch
pkg = aotpack.load({str(convnet_pack.path)!r})
args, kwargs = pkg.example_inputs()
print(float(pkg(*args).sum()))
"""
    import subprocess
    import sys

    env = dict(os.environ, AOTPACK_CACHE_DIR=str(shared))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    assert len({o[0] for o in outs}) == 1
    lib = shared / "lib"
    names = os.listdir(lib)
    assert all(n.endswith(".so") for n in names), names  # no temporary files left behind
    for n in names:
        assert cache.file_sha256(str(lib / n)) == n[:-3]


def test_cache_store_is_atomic_and_verified(tmp_path):
    import hashlib

    data = b"x" * 100_000
    sha = hashlib.sha256(data).hexdigest()
    stored = cache.store(str(tmp_path), sha, ".so", data)
    path = stored.path
    assert os.pread(stored.fd, 10, 0) == data[:10]
    stored.close()
    found = cache.lookup(str(tmp_path), sha, ".so")
    assert found.path == path and found.loadable == f"/proc/self/fd/{found.fd}"
    found.close()
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:  # a cache file changed behind our back is not trusted
        f.write(b"y")
    assert cache.lookup(str(tmp_path), sha, ".so") is None
    assert [n for n in os.listdir(tmp_path / "lib") if n.endswith(".tmp")] == []
