"""Same inputs, same bytes: two builds in separate processes, with different working, output, temporary
and cache folders, give byte-identical packs."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import EXAMPLES, ROOT


def _build_in(folder, out_name: str) -> bytes:
    folder.mkdir(parents=True)
    env = dict(os.environ, TMPDIR=str(folder / "tmp"), TORCHINDUCTOR_CACHE_DIR=str(folder / "inductor"),
               AOTPACK_CACHE_DIR=str(folder / "cache"), PYTHONPATH=str(ROOT))
    (folder / "tmp").mkdir()
    out = folder / "deeper" / out_name
    out.parent.mkdir()
    proc = subprocess.run([sys.executable, "-m", "aotpack", "build", str(EXAMPLES / "mlp.py"), "-o", str(out),
                           "--quiet"], cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return out.read_bytes()


def test_two_builds_are_byte_identical(tmp_path):
    a = _build_in(tmp_path / "first", "a.pack")
    b = _build_in(tmp_path / "second-place", "other-name.pack")
    assert a == b
    assert str(tmp_path).encode() not in a


def test_parallel_entries_are_byte_identical(tmp_path):
    """Several entries compile in worker processes; the pack does not depend on how they were scheduled."""
    import torch

    import aotpack

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh()).eval()
    x = torch.randn(2, 8)
    specs = [(torch.randn(3, 8),), (torch.randn(5, 8),)]
    a = aotpack.build(model, (x,), tmp_path / "a.pack", specializations=specs)
    b = aotpack.build(model, (x,), tmp_path / "b.pack", specializations=specs)
    assert a.read_bytes() == b.read_bytes()
    pkg = aotpack.load(a)
    assert len(pkg.entries) == 3
    with torch.no_grad():
        for x in (torch.randn(2, 8), *[s[0] for s in specs]):
            torch.testing.assert_close(pkg(x), model(x))
