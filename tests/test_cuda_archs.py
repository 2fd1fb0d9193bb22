"""The runtime's CUDA architecture rules, on a host without a GPU: which SASS / PTX runs on which compute
capability, and the messages that name a GPU no kernel serves."""
from __future__ import annotations


import pytest

import aotpack
from aotpack_runtime.platform import check_cuda_device, cuda_arch_runs
from aotpack_runtime.schema import CudaArch, CudaMeta, parse_arch

from cuda_packs import cuda_meta
from helpers import assert_facts


# ---------------------------------------------------------------------------------------------------
# Architecture rules


@pytest.mark.parametrize("archs,ptx,capability,runs", [
    (["sm_80"], [], (8, 0), True),
    (["sm_80"], [], (8, 6), True),       # same major, higher minor
    (["sm_80"], [], (8, 9), True),
    (["sm_80"], [], (9, 0), False),      # SASS never crosses a major version
    (["sm_86"], [], (8, 0), False),      # nor goes to a lower minor
    (["sm_90a"], [], (9, 0), True),      # arch-specific: exactly 9.0
    (["sm_90a"], [], (10, 0), False),
    (["sm_100a"], [], (10, 3), False),
    (["sm_100f"], [], (10, 3), True),    # family-specific: same major, equal or higher minor
    (["sm_100f"], [], (10, 0), True),
    (["sm_100f"], [], (12, 0), False),
    (["sm_100"], [], (10, 0), True),     # sm_100 is 10.0, not 1.00 or 10.00
    (["sm_100"], [], (12, 0), False),
    (["sm_120"], [], (12, 0), True),
    (["sm_120"], [], (12, 1), True),
    (["sm_120"], [], (10, 0), False),
    ([], ["compute_80"], (9, 0), True),   # PTX: the driver compiles it for any later GPU
    ([], ["compute_80"], (12, 0), True),
    ([], ["compute_80"], (8, 0), True),
    ([], ["compute_80"], (7, 5), False),
    ([], ["compute_100"], (12, 0), True),
    ([], ["compute_100"], (9, 0), False),
    ([], ["compute_90a"], (9, 0), True),
    ([], ["compute_90a"], (10, 0), False),
    (["sm_90"], ["compute_90"], (8, 6), False),
    (["sm_75", "sm_90"], [], (9, 0), True),
    ([], [], (9, 0), False),
])
def test_arch_table(archs, ptx, capability, runs):
    assert cuda_arch_runs(archs, ptx, capability) is runs


def test_arch_numbers():
    assert parse_arch("sm_86", "sm", "x") == CudaArch("sm", 8, 6, "")
    assert parse_arch("sm_100", "sm", "x") == CudaArch("sm", 10, 0, "")
    assert parse_arch("sm_120", "sm", "x") == CudaArch("sm", 12, 0, "")
    assert parse_arch("sm_90a", "sm", "x") == CudaArch("sm", 9, 0, "a")
    assert parse_arch("compute_75", "compute", "x") == CudaArch("compute", 7, 5, "")


@pytest.mark.parametrize("archs,ptx", [
    (["sm_8"], []), (["sm_9x"], []), (["SM_80"], []), (["sm_080"], []), (["sm_80b"], []), ([" sm_80"], []),
    (["sm_1000"], []), (["compute_80"], []), ([80], []), ([None], []), ([], ["sm_80"]), ([], ["compute_"]),
    ([], [["compute_80"]]), (["sm_80\n"], []),
])
def test_malformed_arch_strings_are_archive_errors(archs, ptx):
    with pytest.raises(aotpack.ArchiveError):
        cuda_arch_runs(archs, ptx, (9, 0))


def test_malformed_arch_messages():
    with pytest.raises(aotpack.ArchiveError) as info:
        cuda_arch_runs(["sm_80", "sm_9x"], [], (9, 0), where="manifest.entries[1].cuda")
    assert_facts(str(info.value), "manifest.entries[1].cuda.archs[1]", "'sm_9x'", "SASS architecture", "sm_80")
    with pytest.raises(aotpack.ArchiveError) as info:
        cuda_arch_runs([], ["sm_80"], (9, 0), where="cuda")
    assert_facts(str(info.value), "cuda.ptx[0]", "'sm_80'", "PTX architecture", "compute_80")


def test_gpu_that_no_kernel_serves_is_named():
    meta = cuda_meta([("triton_a", ["sm_90"], ["compute_90"]), ("triton_b", ["sm_90"], ["compute_90"])])
    with pytest.raises(aotpack.ArchiveError) as info:
        check_cuda_device(meta, 1, "NVIDIA A10", (8, 6), "CUDA entry 1")
    assert_facts(str(info.value), "GPU 1 (NVIDIA A10, compute capability 8.6)", "cannot run CUDA entry 1",
                 "SASS for sm_90", "PTX for compute_90", "sm_86", "--cuda-arch 86")
    check_cuda_device(meta, 0, "NVIDIA H100", (9, 0), "CUDA entry 1")
    check_cuda_device(meta, 0, "NVIDIA B200", (10, 0), "CUDA entry 1")  # PTX compute_90 is JIT-compiled


def test_one_kernel_without_code_for_the_gpu_is_named():
    meta = cuda_meta([("triton_a", ["sm_80", "sm_90"], ["compute_80"]), ("triton_b", ["sm_90a"], [])],
                 archs=("sm_90",), ptx=())
    with pytest.raises(aotpack.ArchiveError) as info:
        check_cuda_device(meta, 0, "NVIDIA B200", (10, 0), "CUDA entry 0")
    assert_facts(str(info.value), "GPU 0 (NVIDIA B200, compute capability 10.0)", "cannot run CUDA entry 0",
                 "kernel triton_b (1 of 2)", "SASS for sm_90a and no PTX", "sm_100", "--cuda-arch 100")
    check_cuda_device(meta, 0, "NVIDIA H100", (9, 0), "CUDA entry 0")


def test_a_kernel_needing_more_shared_memory_than_the_gpu_allows_is_named():
    meta = CudaMeta.from_json({
        "archs": ["sm_86"], "ptx": ["compute_86"], "built_without_gpu": False, "autotuned": True,
        "build_gpu": "NVIDIA A40 (sm_86)", "cuda_version": "13.0",
        "kernels": [{"name": "triton_red_0", "blob": "kernels/0/a.cubin", "file": "a.cubin", "archs": ["sm_86"],
                     "ptx": ["compute_86"], "size": 10, "shared_mem": 99_000, "num_warps": 8}]}, "cuda")
    check_cuda_device(meta, 0, "NVIDIA A40", (8, 6), "CUDA entry 0", max_shared_mem=101_376)
    with pytest.raises(aotpack.ArchiveError) as info:
        check_cuda_device(meta, 0, "NVIDIA RTX A2000", (8, 6), "CUDA entry 0", max_shared_mem=65_536)
    assert_facts(str(info.value), "GPU 0 (NVIDIA RTX A2000, compute capability 8.6)", "cannot run CUDA entry 0",
                 "kernel triton_red_0", "99,000 bytes of shared memory", "allows 65,536",
                 "rebuild the pack on this GPU")


def test_kernel_without_lists_uses_the_entry_lists_and_raw_json_is_accepted():
    raw = {"archs": ["sm_80"], "ptx": [], "built_without_gpu": True, "autotuned": False, "build_gpu": None,
           "cuda_version": "13.0", "kernels": [{"name": "k", "blob": "kernels/0/k.cubin", "file": "k.cubin",
                                                "size": 3, "shared_mem": 0, "num_warps": 1}]}
    assert CudaMeta.from_json(raw, "cuda").kernels[0].archs == ("sm_80",)
    check_cuda_device(raw, 0, "NVIDIA A10", (8, 6), "CUDA entry 0")
    with pytest.raises(aotpack.ArchiveError) as info:
        check_cuda_device(raw, 0, "Tesla T4", (7, 5), "CUDA entry 0")
    assert_facts(str(info.value), "GPU 0 (Tesla T4, compute capability 7.5)", "cannot run CUDA entry 0", "kernel k",
                 "SASS for sm_80 and no PTX", "sm_75", "--cuda-arch 75")
    raw["kernels"] = []  # library calls only (cuBLAS, ATen): they run on any GPU this torch supports
    check_cuda_device(raw, 0, "Tesla T4", (7, 5), "CUDA entry 0")


