"""Same source, same bytes under every hash seed: builds in fresh processes with different ``PYTHONHASHSEED``
give the pack this session built in process (under its own seed). In every torch lane (.ci/compat-tests).

torch 2.11's C++ wrapper reused size and stride declarations by the address of a bound method
(``aotpack/_torch.py``, ``stable_int_arrays``), and the hash seed moves addresses: ``multi_io`` under seed 4
gave another wrapper and .so than under seeds 1, 2 and 3."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import EXAMPLES


def test_builds_are_byte_identical_under_every_hash_seed(multi_io_pack, tmp_path):
    procs = {}
    for seed in ("1", "4"):
        folder = tmp_path / f"seed-{seed}"
        (folder / "tmp").mkdir(parents=True)
        env = dict(os.environ, PYTHONHASHSEED=seed, TMPDIR=str(folder / "tmp"),
                   TORCHINDUCTOR_CACHE_DIR=str(folder / "inductor"), AOTPACK_BUILD_CACHE=str(folder / "build-cache"))
        cmd = [sys.executable, "-m", "aotpack", "build", str(EXAMPLES / "multi_io.py"), "-o",
               str(folder / "multi_io.pack"), "--quiet", "--no-cache"]
        procs[seed] = (folder, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                text=True))
    expected = multi_io_pack.path.read_bytes()
    for seed, (folder, proc) in procs.items():
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
        assert (folder / "multi_io.pack").read_bytes() == expected, \
            f"PYTHONHASHSEED={seed} built another pack than this session's build"
