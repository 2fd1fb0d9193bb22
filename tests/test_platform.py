"""Host compatibility: a pack for an instruction set or torch series the host lacks is refused clearly."""
from __future__ import annotations

import pytest

import aotpack
from aotpack_runtime import platform
from helpers import assert_facts


def test_missing_isa_is_refused():
    with pytest.raises(aotpack.ArchiveError) as info:
        platform.check_target({"machine": "x86_64", "cpu_isa": "avx512"}, flags=frozenset({"avx2"}),
                              machine="x86_64")
    msg = str(info.value)
    assert msg.startswith("the pack's CPU code needs the avx512 instruction set, and this host's CPU lacks ")
    assert "avx512f" in msg and "--cpu-isa x86-64" in msg


def test_baseline_runs_anywhere():
    platform.check_target({"machine": "x86_64", "cpu_isa": "x86-64"}, flags=frozenset(), machine="x86_64")


def test_other_machine_is_refused():
    with pytest.raises(aotpack.ArchiveError) as info:
        platform.check_target({"machine": "x86_64", "cpu_isa": "avx2"}, machine="aarch64")
    assert_facts(str(info.value), "native code", "x86_64", "this host is aarch64")


def test_load_refuses_pack_for_missing_isa(convnet_pack, monkeypatch):
    """Simulate a host without AVX2: load refuses before any native code is loaded."""
    monkeypatch.setattr(platform, "host_cpu_flags", lambda: frozenset({"sse2"}))
    with pytest.raises(aotpack.ArchiveError, match="needs the avx2 instruction set"):
        aotpack.load(convnet_pack.path)


def test_torch_series():
    platform.check_torch("2.13.0+cpu", "2.13.1+cu126")
    with pytest.raises(aotpack.ArchiveError) as info:
        platform.check_torch("2.13.0+cpu", "2.14.1")
    assert_facts(str(info.value), "built with torch 2.13.0+cpu", "runs torch 2.14.1", "torch 2.13 series",
                 "torch==2.13.*", "rebuild the pack")
