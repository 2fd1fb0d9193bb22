"""Same inputs, same bytes, on any machine: builds in separate processes that differ in everything but the
model, the options and the toolchain versions give byte-identical packs.

Varied here: working, output, temporary and cache folders; the install path of torch and the virtual
environment; HOME, user name, host name, locale, umask; the thread count (OMP_NUM_THREADS=1, as Ray and
Dask workers set) and the cores the build may use; the number of parallel compile workers. A different CPU
model cannot be had on one host: the build never asks Inductor to probe the CPU (its probe is made to fail
in the varied build, and torch is told the CPU has no vector units), so the CPU model cannot reach the code.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import pytest

from conftest import EXAMPLES

# Runs the CLI after making Inductor's CPU probe fail: a build that probed the host CPU would stop here.
_NO_PROBE = (
    "import torch._inductor.cpu_vec_isa as v\n"
    "def probe(*a, **k):\n"
    "    raise SystemExit('the build probed the host CPU')\n"
    "v.VecISA.check_build = probe\n"
    "import sys\n"
    "from aotpack_cli.main import main\n"
    "sys.argv = ['aotpack'] + sys.argv[1:]\n"
    "main()\n"
)


def _build(folder: pathlib.Path, out_name: str, *, python: str = sys.executable, env: dict | None = None,
           prefix: list[str] | None = None, preexec=None, example: str = "mlp") -> bytes:
    folder.mkdir(parents=True)
    (folder / "tmp").mkdir()
    full_env = dict(os.environ, TMPDIR=str(folder / "tmp"), TORCHINDUCTOR_CACHE_DIR=str(folder / "inductor"),
                    AOTPACK_CACHE_DIR=str(folder / "cache"), AOTPACK_BUILD_CACHE=str(folder / "build-cache"))
    full_env.update(env or {})
    out = folder / "deeper" / out_name
    out.parent.mkdir()
    cmd = (prefix or []) + [python, "-c", _NO_PROBE, "build", str(EXAMPLES / f"{example}.py"), "-o", str(out),
                            "--quiet"]
    proc = subprocess.run(cmd, cwd=folder, env=full_env, capture_output=True, text=True, timeout=900,
                          preexec_fn=preexec)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.listdir(folder / "tmp") == [], "the build left files in TMPDIR"
    return out.read_bytes()


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> bytes:
    return _build(tmp_path_factory.mktemp("base") / "first", "a.pack")


def test_builds_are_byte_identical_across_folders_and_environment(baseline, tmp_path):
    """Everything a host or a user can vary without changing the toolchain. The varied build runs on one
    core, so it compiles the wrapper and the kernels one after the other; the baseline, given two cores or
    more, compiles them at once."""
    env = {"HOME": str(tmp_path / "home"), "USER": "someone-else", "LOGNAME": "someone-else", "LC_ALL": "C",
           "LANG": "C", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "xdg"),
           "ATEN_CPU_CAPABILITY": "default"}

    def preexec():
        os.umask(0o077)
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    prefix = []
    if shutil.which("unshare") and subprocess.run(["unshare", "--uts", "true"], capture_output=True).returncode == 0:
        prefix = ["unshare", "--uts", "sh", "-c", 'hostname other-build-host && exec "$@"', "sh"]
    other = _build(tmp_path / "second-place", "other-name.pack", env=env, prefix=prefix, preexec=preexec)
    assert other == baseline
    assert str(tmp_path).encode() not in other


def test_builds_are_byte_identical_across_torch_installs(baseline, tmp_path):
    """torch at another path, in another virtual environment: the paths CI runners never share."""
    import torch

    site = pathlib.Path(sysconfig.get_paths()["purelib"])
    torch_copy = tmp_path / "elsewhere" / "site"
    shutil.copytree(pathlib.Path(torch.__file__).parent, torch_copy / "torch", symlinks=True)
    venv = tmp_path / "other-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    venv_python = venv / "bin" / "python"
    venv_site = pathlib.Path(subprocess.run([str(venv_python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                             "['purelib'])"], capture_output=True, text=True, check=True).stdout.strip())
    # torch from the copy (first on the path); aotpack and the other dependencies from this environment.
    (venv_site / "aotpack-deps.pth").write_text(f"import site; site.addsitedir({str(site)!r})\n")
    env = {"PYTHONPATH": str(torch_copy)}
    where = subprocess.run([str(venv_python), "-c", "import torch, sys; print(torch.__file__); print(sys.prefix)"],
                           capture_output=True, text=True, env=dict(os.environ, **env), check=True).stdout.split()
    assert where[0].startswith(str(torch_copy)) and where[1] == str(venv)
    other = _build(tmp_path / "b", "b.pack", python=str(venv_python), env=env)
    assert other == baseline


def test_in_process_build_equals_cli_build(baseline, mlp_pack):
    """The session's in-process build (other folders, other process) gives the same bytes."""
    assert mlp_pack.path.read_bytes() == baseline


def test_conv_pack_does_not_depend_on_the_build_hosts_vector_units(convnet_pack, tmp_path):
    """A conv net's convolutions run through oneDNN with weights packed at load, on the serving host: a build
    whose oneDNN may use nothing above SSE4.1 (its packed layouts differ from AVX2's), and whose Inductor may
    not probe the CPU, writes the bytes of the session's build, so nothing packed for the build host's CPU is
    in the pack. (ATen's own vector units stay: the example's weight initialisation depends on them.)"""
    env = {"ONEDNN_MAX_CPU_ISA": "SSE41"}
    other = _build(tmp_path / "conv", "convnet.pack", env=env, example="convnet")
    assert other == convnet_pack.path.read_bytes()


def test_parallel_entries_are_byte_identical(tmp_path):
    """Several entries compile in worker processes, as many as the build may use cores (and, with cores to
    spare, each compiles its wrapper and kernels at once); the pack does not depend on how many ran or how
    they were scheduled. Both builds compile (no build cache)."""
    import torch

    import aotpack

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh()).eval()
    x = torch.randn(2, 8)
    specs = [(torch.randn(3, 8),), (torch.randn(5, 8),)]
    a = aotpack.build(model, (x,), tmp_path / "a.pack", specializations=specs, cache=False)
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})  # one worker at a time
    try:
        b = aotpack.build(model, (x,), tmp_path / "b.pack", specializations=specs, cache=False)
    finally:
        os.sched_setaffinity(0, cores)
    assert a.read_bytes() == b.read_bytes()
    pkg = aotpack.load(a)
    assert len(pkg.entries) == 3
    with torch.no_grad():
        for x in (torch.randn(2, 8), *[s[0] for s in specs]):
            torch.testing.assert_close(pkg(x), model(x))
