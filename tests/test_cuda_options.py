"""CUDA build options: bad flags and missing needs are clear errors before any work (both lanes)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from aotpack import _cuda_offline, cudabuild
from aotpack.options import BuildOptions
from aotpack_runtime.errors import BuildError
from conftest import EXAMPLES, ROOT
from helpers import assert_facts


@pytest.mark.parametrize("text, expected", [
    ("80,90", (80, 90)), ("90,80,80", (80, 90)), ("sm_86", (86,)), ("8.0;9.0", (80, 90)),
    (["75", "120"], (75, 120)), ("compute_100", (100,)),
])
def test_parse_archs(text, expected):
    assert cudabuild.parse_archs(text) == expected


@pytest.mark.parametrize("text", ["81", "sm_9", "ampere", "8.0.1", "", "1000"])
def test_parse_archs_refuses_unknown(text):
    with pytest.raises(BuildError) as e:
        cudabuild.parse_archs(text)
    assert "--cuda-arch" in str(e.value)


def test_cuda_flags_need_the_cuda_device():
    with pytest.raises(BuildError, match=r"^--cuda-arch\b.*add --device cuda"):
        BuildOptions(cuda_archs=(80,)).resolved()
    with pytest.raises(BuildError, match=r"^--without-gpu\b.*add --device cuda"):
        BuildOptions(without_gpu=True).resolved()
    with pytest.raises(BuildError, match=r"--device must be one of cpu, cuda"):
        BuildOptions(devices=("tpu",)).resolved()


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the message of a CPU build of torch")
def test_cuda_device_on_a_cpu_build_of_torch_says_what_to_install():
    with pytest.raises(BuildError) as e:
        BuildOptions(devices=("cuda",), cuda_archs=(90,), without_gpu=True).resolved()
    assert str(e.value).startswith("--device cuda needs the CUDA build of torch; this is torch ")
    assert "pip install torch==2.14.1" in str(e.value)


def test_cli_refuses_cuda_flags_before_loading_the_model(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "aotpack", "build", str(EXAMPLES / "mlp.py"), "-o",
                           str(tmp_path / "m.pack"), "--cuda-arch", "80"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert_facts(proc.stderr, "--cuda-arch", "CUDA entries", "add --device cuda")
    assert not (tmp_path / "m.pack").exists()


def test_version_gate_names_the_tested_versions(monkeypatch):
    monkeypatch.setattr(_cuda_offline, "versions", lambda: ("2.99.0", "9.9.9"))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(BuildError) as e:
        _cuda_offline.check_versions()
    assert_facts(str(e.value), "--without-gpu", "torch 2.11.0 with triton 3.6.0", "torch 2.14.1 with triton 3.8.0",
                 "torch 2.99.0 with triton 9.9.9", "build on a machine with the GPU")


def test_without_a_toolkit_the_message_says_what_to_install(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cudabuild, "cuda_home", lambda: None)
    monkeypatch.setattr(cudabuild, "cuobjdump", lambda: "/bin/true")
    pytest.importorskip("triton")
    with pytest.raises(BuildError) as e:
        cudabuild.check_toolchain(without_gpu=True)
    assert str(e.value).startswith("--without-gpu needs the CUDA toolkit (nvcc, cuda.h)")
    assert "set CUDA_HOME" in str(e.value)
    with pytest.raises(BuildError, match=r"^--device cuda needs the CUDA toolkit \(nvcc, cuda.h\)"):
        cudabuild.check_toolchain(without_gpu=False)


def test_gpu_build_without_a_gpu_points_at_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cudabuild, "cuobjdump", lambda: "/bin/true")
    monkeypatch.setattr(cudabuild, "cuda_home", lambda: "/opt/cuda-toolkit")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    pytest.importorskip("triton")
    with pytest.raises(BuildError) as e:
        cudabuild.check_toolchain(without_gpu=False)
    assert "this host has no usable GPU" in str(e.value) and "--without-gpu --cuda-arch" in str(e.value)


def test_missing_archs_counts_arch_specific_sass():
    assert cudabuild.missing_archs(["sm_90a"], (90,)) == []
    assert cudabuild.missing_archs(["sm_80"], (80, 90)) == ["sm_90"]
