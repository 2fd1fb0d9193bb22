"""Build → pack → load → call, against eager, in this process and in fresh ones."""
from __future__ import annotations

import json

import torch

import aotpack
from conftest import run_python
from helpers import assert_close_to_eager


def test_matches_eager(example_pack):
    pkg = aotpack.load(example_pack.path)
    with torch.inference_mode():
        out = pkg(*example_pack.args, **example_pack.kwargs)
        ref = example_pack.model(*example_pack.args, **example_pack.kwargs)
    assert_close_to_eager(out, ref)


def test_matches_eager_on_fresh_values(example_pack):
    """Other values of the same shape: the pack computes, it does not replay the example."""
    gen = torch.Generator().manual_seed(1)
    args = tuple(torch.randn(a.shape, generator=gen).to(a.dtype) if a.is_floating_point() else a
                 for a in example_pack.args)
    pkg = aotpack.load(example_pack.path)
    with torch.no_grad():
        assert_close_to_eager(pkg(*args, **example_pack.kwargs), example_pack.model(*args, **example_pack.kwargs))


def test_output_structure_is_the_models(multi_io_pack):
    pkg = aotpack.load(multi_io_pack.path)
    out = pkg(*multi_io_pack.args, **multi_io_pack.kwargs)
    assert isinstance(out, dict) and list(out) == ["logits", "extras"]
    assert isinstance(out["extras"], tuple) and len(out["extras"]) == 2


def test_keyword_order_does_not_matter(multi_io_pack):
    pkg = aotpack.load(multi_io_pack.path)
    kw = multi_io_pack.kwargs
    a = pkg(*multi_io_pack.args, mask=kw["mask"], temperature=kw["temperature"])
    b = pkg(*multi_io_pack.args, temperature=kw["temperature"], mask=kw["mask"])
    assert torch.equal(a["logits"], b["logits"])


def test_example_inputs_are_stored(convnet_pack):
    args, kwargs = aotpack.load(convnet_pack.path).example_inputs()
    assert torch.equal(args[0], convnet_pack.args[0]) and kwargs == {}


def test_fresh_process_loads_without_build_side_and_matches(example_pack, session_dir):
    """A serving process: imports the runtime, loads, calls; no Dynamo, Inductor, triton, click, signing
    packages or the serving example's frameworks, and an empty code cache. The output is compared with
    eager here."""
    out_file = session_dir / f"{example_pack.name}-fresh.pt"
    code = f"""
import sys, json, torch
import aotpack
pkg = aotpack.load({str(example_pack.path)!r})
args, kwargs = pkg.example_inputs()
out = pkg(*args, **kwargs)
torch.save(out, {str(out_file)!r})
heavy = [m for m in ("torch._dynamo", "torch._inductor", "triton", "click", "model_signing", "cryptography",
                     "aotpack.pipeline", "aotpack.capture", "aotpack.compile", "fastapi", "starlette", "uvicorn",
                     "ray") if m in sys.modules]
print(json.dumps(heavy))
"""
    proc = run_python(code, env={"AOTPACK_CACHE_DIR": str(session_dir / f"fresh-cache-{example_pack.name}")})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
    out = torch.load(out_file)
    with torch.no_grad():
        ref = example_pack.model(*example_pack.args, **example_pack.kwargs)
    assert_close_to_eager(out, ref)


def test_loads_after_every_build_cache_is_deleted(convnet_pack, session_dir):
    """Nothing outside the pack is needed: a load with new Inductor and code caches (both empty) works
    in a fresh process. (tests/test_reproducible.py checks that a build leaves nothing in TMPDIR.)"""
    empty = session_dir / "no-caches"
    code = f"""
import aotpack, torch
pkg = aotpack.load({str(convnet_pack.path)!r})
args, kwargs = pkg.example_inputs()
print(pkg(*args).shape)
"""
    proc = run_python(code, env={"AOTPACK_CACHE_DIR": str(empty / "a"), "TORCHINDUCTOR_CACHE_DIR": str(empty / "i"),
                                 "TMPDIR": str(session_dir)})
    assert proc.returncode == 0, proc.stderr
    assert "torch.Size([4, 10])" in proc.stdout
    assert not (empty / "i").exists()


def test_second_load_reuses_extracted_code(convnet_pack):
    a = aotpack.load(convnet_pack.path)
    b = aotpack.load(convnet_pack.path)
    assert torch.equal(a(*convnet_pack.args), b(*convnet_pack.args))


def test_expected_sha256_pins_the_pack(convnet_pack):
    import hashlib

    digest = hashlib.sha256(convnet_pack.path.read_bytes()).hexdigest()
    aotpack.load(convnet_pack.path, expected_sha256=digest)
    try:
        aotpack.load(convnet_pack.path, expected_sha256="0" * 64)
    except aotpack.ArchiveError as e:
        assert f"sha256 mismatch: expected {'0' * 64}, actual {digest}" in str(e)
    else:
        raise AssertionError("a wrong pin loaded")


def test_function_model(session_dir):
    def fn(a, b):
        return torch.sin(a) * b + 1.0

    a, b = torch.randn(5, 7), torch.randn(5, 7)
    path = aotpack.build(fn, (a, b), session_dir / "fn.pack")
    pkg = aotpack.load(path)
    assert_close_to_eager(pkg(a, b), fn(a, b))
    assert [leaf.name for leaf in pkg.entries[0].guards.leaves] == ["a", "b"]
