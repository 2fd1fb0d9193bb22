"""The build cache: a key of everything that decides a pack's bytes, hits that equal fresh builds byte for
byte, damaged entries never served, concurrent writers, ``aotpack cache list|prune``."""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import time
import warnings

import pytest
import torch
from click.testing import CliRunner

from aotpack.buildcache import BuildCache
from aotpack.modelfile import load_model_file
from aotpack.options import BuildOptions
from aotpack.pipeline import build_key
from aotpack_cli.main import cli
from conftest import EXAMPLES, ROOT, run_python

TINY = ROOT / "tests" / "data" / "many" / "tiny_a.py"


def _key(model, args, **options) -> str:
    return build_key(model, args, options=BuildOptions(**options))


def test_key_changes_with_each_input_and_only_then():
    spec = load_model_file(str(TINY))
    model, (x,) = spec.model, spec.example_inputs
    base = _key(model, (x,))
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    # the same build again (new capture, new object ids in the graph's metadata): the same key
    assert _key(model, (x.clone(),)) == base
    variants = {}
    with torch.no_grad():
        model[0].weight[0, 0] += 1.0
        variants["a weight value"] = _key(model, (x,))
        model[0].weight[0, 0] -= 1.0
    assert _key(model, (x,)) == base
    variants["an option (cpu_threads)"] = _key(model, (x,), cpu_threads=8)
    variants["an option (cpu_isa)"] = _key(model, (x,), cpu_isa="x86-64")
    variants["the example's values"] = _key(model, (x + 1,))
    variants["the example's shape"] = _key(model, (torch.rand(5, 16),))
    variants["the graph"] = _key(torch.nn.Sequential(model[0], torch.nn.GELU()).eval(), (x,))
    variants["dynamic shapes"] = build_key(model, (x,), dynamic_shapes=({0: torch.export.Dim("b", min=1, max=8)},))
    for what, key in variants.items():
        assert key != base, f"changing {what} kept the key"
    assert len(set(variants.values())) == len(variants)


def test_key_ignores_where_the_model_file_is(tmp_path):
    """The key holds the captured graph, not the source: the same file elsewhere (another module name in the
    graph's metadata, other paths in its stack traces) has the same key."""
    copy = tmp_path / "elsewhere" / "tiny_copy.py"
    copy.parent.mkdir()
    shutil.copy(TINY, copy)
    a, b = load_model_file(str(TINY)), load_model_file(str(copy))
    assert _key(a.model, a.example_inputs) == _key(b.model, b.example_inputs)


def _cli_build(*args):
    return CliRunner().invoke(cli, ["build", *map(str, args)])


def test_the_cli_build_hits_what_the_api_stored(mlp_pack, tmp_path):
    """mlp_pack was built through the Python API, which stores into the (session) build cache by default;
    the CLI build of the same file is a hit, copied rather than compiled, with the same bytes.
    (tests/test_build_many.py rebuilds a hit with --no-cache and compares the bytes.)"""
    hit = tmp_path / "hit.pack"
    r = _cli_build(EXAMPLES / "mlp.py", "-o", hit, "--json")
    assert r.exit_code == 0, r.output
    events = [json.loads(line) for line in r.output.splitlines() if line.startswith("{")]
    assert any(e.get("message", "").startswith("build cache: hit ") for e in events), r.output
    done = events[-1]
    assert done["cached"] is True and len(done["cache_key"]) == 64 and "compile" not in done["stages_s"]
    assert done["stages_s"]["package"] < 1.0  # the copy, not a compile
    assert hit.read_bytes() == mlp_pack.path.read_bytes()


def _store(store: BuildCache, key: str, data: bytes, tmp_path, source: str = "test") -> None:
    src = tmp_path / f"src-{key[:8]}"
    src.write_bytes(data)
    assert store.store(key, src, {"source": source}) is not None


def test_a_damaged_entry_is_dropped_and_never_served(tmp_path):
    store = BuildCache(tmp_path / "cache")
    key = "ab" * 32
    _store(store, key, b"x" * 5000, tmp_path)
    out = tmp_path / "out.pack"
    assert store.fetch(key, out) is not None and out.read_bytes() == b"x" * 5000
    pack = store.folder / key[:2] / f"{key}.pack"
    data = bytearray(pack.read_bytes())
    data[1234] ^= 1
    pack.write_bytes(bytes(data))
    out.unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert store.fetch(key, out) is None
    assert [str(w.message) for w in caught] == [
        f"ignoring the damaged build cache entry {key[:12]}: its sha256 is "
        f"{__import__('hashlib').sha256(bytes(data)).hexdigest()[:16]}…, its record says "
        f"{__import__('hashlib').sha256(b'x' * 5000).hexdigest()[:16]}…; it is rebuilt"]
    assert not out.exists() and not pack.exists() and store.entries() == []
    assert list(tmp_path.glob(".out.pack.*")) == []  # no temporary file left beside the output


def _writer(root: str, key: str, data: bytes, src: str, rounds: int) -> None:
    store = BuildCache(root)
    for _ in range(rounds):
        store.store(key, src, {"source": "writer"})


def test_concurrent_writers_and_readers_never_see_a_partial_pack(tmp_path):
    data = os.urandom(3 << 20)
    src = tmp_path / "src.pack"
    src.write_bytes(data)
    root = str(tmp_path / "cache")
    key = "cd" * 32
    ctx = multiprocessing.get_context("spawn")
    writers = [ctx.Process(target=_writer, args=(root, key, data, str(src), 15)) for _ in range(3)]
    for w in writers:
        w.start()
    store = BuildCache(root)
    seen = 0
    deadline = time.monotonic() + 60
    while any(w.is_alive() for w in writers) and time.monotonic() < deadline:
        out = tmp_path / "read.pack"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a damaged-entry warning would fail the test
            if store.fetch(key, out) is not None:
                assert out.read_bytes() == data
                seen += 1
    for w in writers:
        w.join(30)
        assert w.exitcode == 0
    assert store.fetch(key, tmp_path / "last.pack") is not None and (tmp_path / "last.pack").read_bytes() == data
    assert [p.name for p in store.folder.rglob("*") if p.is_file()] and not list(store.folder.rglob(".*.tmp"))


def test_cache_list_and_prune_say_what_they_do(tmp_path):
    root = tmp_path / "cache"
    store = BuildCache(root)
    now = time.time()
    for i, (age_days, size) in enumerate([(40, 1000), (2, 2000), (0, 3000)]):
        key = f"{i:02d}" * 32
        _store(store, key, b"p" * size, tmp_path, source=f"model{i}.py")
        os.utime(store.folder / key[:2] / f"{key}.json", (now - age_days * 86400, now - age_days * 86400))
        store.remember(f"{i + 5:02d}" * 32, key)  # a source key that leads to this pack
        store.remember(f"{i + 8:02d}" * 32, key, "manifests")  # and its manifest's sha256 (for reweight)
    store.file_index().write_text("{}")
    r = CliRunner().invoke(cli, ["cache", "list", "--cache-dir", str(root)])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].startswith(f"{store.folder}: 3 packs, 0.0 MB")
    assert [ln.split()[0] for ln in lines[1:]] == ["02" * 6, "01" * 6, "00" * 6]  # most recently used first
    assert re.search(r"^  0{12}     0\.00 MB  used +40 d ago  model0\.py$", r.output, re.M), r.output
    r = CliRunner().invoke(cli, ["cache", "prune", "--cache-dir", str(root), "--older-than", "30d"])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == [f"removed {'00' * 6}  0.00 MB  used 40 d ago  model0.py",
                                     f"removed 1 pack (0.00 MB); 2 left (0.01 MB) in {store.folder}"]
    assert store.recall("05" * 32) is None and store.recall("06" * 32) == "01" * 32  # its source key went with it
    assert store.recall("08" * 32, "manifests") is None and store.recall("09" * 32, "manifests") == "01" * 32
    assert store.record_of("08" * 32) is None and store.record_of("09" * 32)[0] == "01" * 32
    r = CliRunner().invoke(cli, ["cache", "prune", "--cache-dir", str(root), "--max-size", "4kb"])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0] == f"removed {'01' * 6}  0.00 MB  used 2 d ago  model1.py"
    assert [e.key for e in store.entries()] == ["02" * 32]
    r = CliRunner().invoke(cli, ["cache", "prune", "--cache-dir", str(root)])
    assert r.exit_code == 2 and "say what to remove" in r.output
    r = CliRunner().invoke(cli, ["cache", "prune", "--cache-dir", str(root), "--older-than", "soon"])
    assert r.exit_code == 2 and "'soon': give a number and one of s, min, m, h, d, w" in r.output
    r = CliRunner().invoke(cli, ["cache", "prune", "--cache-dir", str(root), "--all"])
    assert r.exit_code == 0 and store.entries() == []
    assert not [p for p in (root / "sources").rglob("*") if p.is_file()]  # source keys and the file index
    assert not [p for p in (root / "manifests").rglob("*") if p.is_file()]


def test_prune_removes_precompiled_headers_by_last_use_and_all(tmp_path):
    """The toolchain's precompiled headers (two of 120-150 MB per CPU ISA) were left by every prune, --all
    included; now they are pruned by the same rules, by the last compile that used each."""
    root = tmp_path / "cache"
    pch = root / "toolchain" / "pch"
    (pch / "locks").mkdir(parents=True)
    (root / "toolchain" / "bin" / "0123").mkdir(parents=True)
    (root / "toolchain" / "bin" / "0123" / "g++").write_text("#!/bin/sh\n")
    now = time.time()
    for name, age_days, size in (("cold", 40, 3000), ("warm", 2, 2000), ("hot", 0, 1000)):
        (pch / f"{name}.h").write_text("#include <x.h>\n")
        (pch / f"{name}.h.gch").write_bytes(b"g" * size)
        (pch / "locks" / f"{name}.lock").write_bytes(b"")
        for p in (pch / f"{name}.h", pch / f"{name}.h.gch"):
            os.utime(p, (now - age_days * 86400, now - age_days * 86400))
    store = BuildCache(root)
    assert [h.path.name for h in store.headers()] == ["hot.h.gch", "warm.h.gch", "cold.h.gch"]
    r = CliRunner().invoke(cli, ["cache", "prune", "--cache-dir", str(root), "--older-than", "30d"])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[-1] == f"removed 1 precompiled header (0.00 MB) from {pch}"
    assert sorted(p.name for p in pch.rglob("*") if p.is_file()) == \
        ["hot.h", "hot.h.gch", "hot.lock", "warm.h", "warm.h.gch", "warm.lock"]
    assert [h.path.name for h in store.prune_headers(max_bytes=1100)] == ["warm.h.gch"]
    r = CliRunner().invoke(cli, ["cache", "prune", "--cache-dir", str(root), "--all"])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[-1] == f"removed 1 precompiled header (0.00 MB) from {pch}"
    assert store.headers() == [] and not [p for p in pch.rglob("*") if p.is_file()]
    assert (root / "toolchain" / "bin" / "0123" / "g++").exists()  # the compiler wrapper stays (bytes, not MB)


# --- the source key: a hit without capture ---------------------------------------------------------------------

# A build through the CLI in a fresh process; NO_CAPTURE makes capture raise (a source-key hit never captures),
# VERSIONS overrides the installed versions the source key reads.
_BUILD = """
import json, sys
from aotpack import buildcache, capture
if {no_capture}:
    def refuse(*args, **kwargs):
        raise RuntimeError("capture ran")
    capture.capture = refuse
versions, installed = {versions!r}, buildcache.installed_version
buildcache.installed_version = lambda dist: versions.get(dist) or installed(dist)
from aotpack_cli.main import main
sys.argv = ["aotpack", "build", *{args!r}, "--json"]
main()
"""


def _fresh_build(target, out, cache, *options, no_capture=False, versions=None) -> dict:
    code = _BUILD.format(no_capture=no_capture, versions=versions or {},
                         args=[str(target), "-o", str(out), "--cache-dir", str(cache), *options])
    proc = run_python(code, timeout=600)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _model_files(folder):
    """A model file that imports a helper module from a package beside it, and numpy (a library)."""
    (folder / "parts").mkdir()
    (folder / "parts" / "__init__.py").write_text("")
    (folder / "parts" / "act.py").write_text("import torch\n\n\ndef act(x):\n    return torch.relu(x)\n")
    model = folder / "model.py"
    model.write_text("import numpy\nimport torch\n\nfrom parts.act import act\n\n\n"
                     "class Model(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                     "        self.linear = torch.nn.Linear(16, 8)\n\n    def forward(self, x):\n"
                     "        return act(self.linear(x))\n\n\n"
                     "torch.manual_seed(0)\nmodel = Model().eval()\nexample_inputs = (torch.rand(4, 16),)\n")
    return model


def test_an_unchanged_model_file_is_found_by_its_source_key_without_capture(tmp_path):
    """The second build of an unchanged model file is served with capture disabled; a change to the model
    file, to a helper module it imports, to a library's version or to an option is a source-key miss (the
    build captures), and a miss whose graph is unchanged is found by the graph key, after which the new
    source key hits."""
    model, cache = _model_files(tmp_path), tmp_path / "cache"
    first = _fresh_build(model, tmp_path / "first.pack", cache)
    assert first.get("cached") is False and len(first["source_key"]) == 64, first
    again = _fresh_build(model, tmp_path / "again.pack", cache, no_capture=True)
    assert again["cache_hit"] == "source" and again["cache_key"] == first["cache_key"], again
    assert "capture" not in again["stages_s"]
    assert (tmp_path / "again.pack").read_bytes() == (tmp_path / "first.pack").read_bytes()

    # each change below is a source-key miss: with capture disabled the build fails there
    misses = {}
    misses["an option"] = _fresh_build(model, tmp_path / "o.pack", cache, "--cpu-threads", "8", no_capture=True)
    misses["a library version"] = _fresh_build(model, tmp_path / "v.pack", cache, no_capture=True,
                                               versions={"numpy": "0.0.1"})
    helper = tmp_path / "parts" / "act.py"
    helper.write_text(helper.read_text() + "# the graph is the same\n")
    misses["a helper module"] = _fresh_build(model, tmp_path / "h.pack", cache, no_capture=True)
    for what, result in misses.items():
        assert result == {"error": "RuntimeError: capture ran"}, (what, result)

    # the graph is unchanged: the graph key finds the pack, and the new source key is remembered
    graph = _fresh_build(model, tmp_path / "h.pack", cache)
    assert graph["cache_hit"] == "graph" and graph["cache_key"] == first["cache_key"], graph
    assert graph["source_key"] not in (first["source_key"], "")
    assert _fresh_build(model, tmp_path / "h2.pack", cache, no_capture=True)["cache_hit"] == "source"

    model.write_text(model.read_text().replace("import numpy\n", "import numpy  # edited\n"))
    assert _fresh_build(model, tmp_path / "m.pack", cache, no_capture=True) == {"error": "RuntimeError: capture ran"}
    assert _fresh_build(model, tmp_path / "m.pack", cache)["cache_hit"] == "graph"


def _source_key(target: str, cache: BuildCache, **options):
    from aotpack import sourcekey, toolchain
    from aotpack.pipeline import source_key

    spec, model_file = sourcekey.load(target)
    calls = {"example_inputs": spec.example_inputs, "example_kwargs": spec.example_kwargs}
    return source_key(model_file, spec.model, calls, BuildOptions(**options).resolved(),
                      toolchain.compiler_version(), cache), model_file


@pytest.mark.parametrize("holder", [
    "model = torch.nn.Linear(16, 8, bias=False).eval()\nmodel.weight.data = torch.load(WEIGHTS)\n",
    "W = torch.load(WEIGHTS)\n\n\ndef model(x):\n    return x @ W.T\n",
    "class Scorer:\n    def __init__(self):\n        self.w = torch.load(WEIGHTS)\n\n"
    "    def __call__(self, x):\n        return x @ self.w.T\n\n\nmodel = Scorer()\n",
], ids=["module parameter", "function global", "callable object"])
def test_the_source_key_sees_weights_the_model_file_reads(tmp_path, holder):
    """Weights loaded from a file at import are not Python sources: the source key hashes the tensors the
    model holds or its code reaches, so new weights in the file are a new key."""
    weights = tmp_path / "w.pt"
    torch.save(torch.ones(8, 16), weights)
    model = tmp_path / "loads.py"
    model.write_text(f"import torch\n\nWEIGHTS = {str(weights)!r}\n{holder}example_inputs = (torch.ones(4, 16),)\n")
    cache = BuildCache(tmp_path / "cache")
    first, _ = _source_key(str(model), cache)
    assert first is not None and _source_key(str(model), cache)[0] == first
    torch.save(torch.full((8, 16), 2.0), weights)
    assert _source_key(str(model), cache)[0] not in (first, None)
    assert _source_key(str(model), cache, cpu_threads=4)[0] not in (first, None)


def test_no_source_key_when_a_local_module_was_imported_before(tmp_path):
    """A second import of a model file in one process finds its helper module already loaded: what the
    helper imports is unseen, so the build has no source key and the graph key decides."""
    (tmp_path / "scale_helper.py").write_text("def scale(x):\n    return x * 2\n")
    model = tmp_path / "scaled.py"
    model.write_text("import torch\nfrom scale_helper import scale\n\n\ndef model(x):\n    return scale(x)\n\n\n"
                     "example_inputs = (torch.ones(3),)\n")
    cache = BuildCache(tmp_path / "cache")
    try:
        first, model_file = _source_key(str(model), cache)
        assert first is not None and "scale_helper" in model_file.modules
        again, model_file = _source_key(str(model), cache)
        assert again is None and model_file.loaded_before == ("scale_helper",)
    finally:
        import sys

        sys.modules.pop("scale_helper", None)


def test_file_digests_are_remembered_and_a_change_is_read_again(tmp_path, monkeypatch):
    import hashlib

    from aotpack import sourcekey

    index = tmp_path / "index.json"
    source = tmp_path / "a.py"
    source.write_text("x = 1\n")
    # a file written within the last seconds may change again within its timestamps' resolution: not remembered
    digests = sourcekey.FileDigests(index)
    assert digests.digest(str(source)) == hashlib.sha256(b"x = 1\n").hexdigest()
    digests.save()
    assert not index.exists()
    monkeypatch.setattr(sourcekey, "RACY_SECONDS", 0.0)
    digests.digest(str(source))
    digests.save()
    assert json.loads(index.read_text())[str(source)][4] == hashlib.sha256(b"x = 1\n").hexdigest()
    # the same size and mtime, other bytes: the ctime differs, so the file is read again
    stat = source.stat()
    source.write_text("x = 2\n")
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert sourcekey.FileDigests(index).digest(str(source)) == hashlib.sha256(b"x = 2\n").hexdigest()
