"""Start-up: ``import aotpack`` imports the error types only, and a load imports what that pack needs and
nothing more (runtime/__init__.py). Checked in fresh processes through ``sys.modules``, not by timing."""
from __future__ import annotations

import json
import os
import time

import torch
from aotpack_runtime import cache

from conftest import run_python
from helpers import assert_close_to_eager

# What neither ``import aotpack`` nor the load of a plain CPU pack may import: the build side, the compilers,
# and the runtime modules a plain load does not use.
NEVER = ("torch._dynamo", "torch._inductor", "triton", "click", "cryptography", "model_signing",
         "aotpack.pipeline", "aotpack.capture", "aotpack.compile", "aotpack.buildcache", "aotpack.options")
NOT_FOR_A_PLAIN_LOAD = ("aotpack_runtime.sessions", "aotpack_runtime.signature", "aotpack_runtime.describe")


_WATCHED = ("aotpack", "zstandard", "torch._dynamo", "torch._inductor", "triton", "click", "cryptography",
            "model_signing")


def _modules_after(code: str, env: dict | None = None) -> list[set[str]]:
    """Run ``code`` in a fresh process; the watched modules imported at each ``snap()`` it calls and at its end."""
    probe = f"""
import json, sys
snaps = []
def snap():
    snaps.append(sorted(m for m in sys.modules if m.startswith({_WATCHED!r})))
{code}
snap()
print(json.dumps(snaps))
"""
    proc = run_python(probe, env=env)
    assert proc.returncode == 0, proc.stderr
    return [set(s) for s in json.loads(proc.stdout.strip().splitlines()[-1])]


def test_import_aotpack_imports_only_the_error_types():
    [loaded] = _modules_after("import torch\nimport aotpack")
    assert loaded == {"aotpack", "aotpack_runtime", "aotpack_runtime.errors"}


def test_public_names_still_resolve():
    """The lazily imported names are the runtime's own objects, by attribute and by ``from ... import``."""
    code = """
import aotpack, aotpack_runtime
from aotpack import load, Package, Session, Entry
from aotpack_runtime import CudaEntry, FORMAT_VERSION, MIN_READ_VERSION
from aotpack_runtime import loader, sessions, entries, format
assert load is aotpack.load is aotpack_runtime.load is loader.load
assert Package is loader.Package and Session is sessions.Session and Entry is entries.Entry
assert CudaEntry is entries.CudaEntry and FORMAT_VERSION == format.FORMAT_VERSION
assert {"load", "Package", "Session", "Entry"} <= set(dir(aotpack))
for module, name in ((aotpack, "nope"), (aotpack_runtime, "nope")):
    try:
        getattr(module, name)
    except AttributeError as e:
        assert name in str(e) and module.__name__ in str(e), e
    else:
        raise AssertionError(name)
"""
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr


def test_a_load_imports_only_what_the_pack_needs(mlp_pack, session_dir):
    """A plain CPU pack: no sessions, no signature check, no describe, no build side; and once the extraction
    cache holds its code and the record of its check (every later load on a host), no zstd either until a
    compressed blob is read (here the example inputs). The output still matches eager."""
    out_file = session_dir / "startup-mlp.pt"
    env = {"AOTPACK_CACHE_DIR": str(session_dir / "startup-cache")}
    code = f"""
import torch, aotpack
pkg = aotpack.load({str(mlp_pack.path)!r})
snap()
args, kwargs = pkg.example_inputs()
torch.save(pkg(*args, **kwargs), {str(out_file)!r})
"""
    # The check of a file changed less than SETTLE_SECONDS ago is not recorded (runtime/cache.py): a pack this
    # session has just built would be hashed, and decompressed, at every load.
    time.sleep(max(0.0, cache.SETTLE_SECONDS + 0.1 - (time.time() - os.stat(mlp_pack.path).st_ctime)))
    first = _modules_after(code, env)  # an empty extraction cache: the code is decompressed at load
    assert "zstandard" in first[0]
    again = _modules_after(code, env)
    for loaded in first + again:
        assert not loaded & set(NEVER + NOT_FOR_A_PLAIN_LOAD), loaded & set(NEVER + NOT_FOR_A_PLAIN_LOAD)
    assert "aotpack_runtime.loader" in again[0] and "zstandard" not in again[0], again[0]
    assert "zstandard" in again[1]  # the example inputs are stored compressed
    with torch.no_grad():
        ref = mlp_pack.model(*mlp_pack.args, **mlp_pack.kwargs)
    assert_close_to_eager(torch.load(out_file), ref)
