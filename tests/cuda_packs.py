"""Synthetic packs with CUDA entries, made from a real CPU pack without a GPU: its entry 0 copied with device
"cuda" and made-up kernel blobs (tests/test_cuda_*.py)."""
from __future__ import annotations

import copy
import hashlib

import torch

from aotpack_runtime import format as fmt
from aotpack_runtime.schema import CudaMeta
from archive_tools import join, split

KERNELS = [("triton_per_fused_0", "czr733aa11", 1000, ["sm_80", "sm_90"], ["compute_80"], 0, 2),
           ("triton_poi_fused_1", "cq5b0c9e2f", 2048, ["sm_80", "sm_90", "sm_100"], ["compute_80"], 1024, 4)]


def kernel_blobs(entry_index: int) -> dict[str, bytes]:
    return {f"kernels/{entry_index}/{stem}.fatbin": bytes([i + 1]) * size + b"\x50\xed\x55\xba"
            for i, (_, stem, size, *_rest) in enumerate(KERNELS)}


def cuda_section(entry_index: int, blobs: dict[str, bytes], built_without_gpu: bool = True) -> dict:
    kernels = []
    for (name, stem, _, archs, ptx, smem, warps) in KERNELS:
        blob = f"kernels/{entry_index}/{stem}.fatbin"
        kernels.append({"name": name, "blob": blob, "file": f"{stem}.fatbin", "archs": archs, "ptx": ptx,
                        "size": len(blobs[blob]), "shared_mem": smem, "num_warps": warps})
    return {"archs": ["sm_80", "sm_90"], "ptx": ["compute_80"], "built_without_gpu": built_without_gpu,
            "autotuned": not built_without_gpu, "build_gpu": None if built_without_gpu else "NVIDIA H100 (sm_90)",
            "cuda_version": "13.0", "kernels": kernels}


def add_blobs(manifest: dict, region: bytes, blobs: dict[str, bytes]) -> bytes:
    """Append uncompressed blobs to the blob region and the blob table; return the new region."""
    for name, data in blobs.items():
        offset = fmt.align(len(region))
        region = region + b"\x00" * (offset - len(region)) + data
        manifest["blobs"].append({"name": name, "offset": offset, "stored_size": len(data), "size": len(data),
                                  "sha256": hashlib.sha256(data).hexdigest(), "compression": "none"})
    return region


def make_cuda_pack(data: bytes, *, cpu: bool = True, cuda_entries: int = 1, cuda_first: bool = False,
                   edit=None, version: int = 2) -> bytes:
    """The CPU pack with CUDA copies of its entry 0 added (or, with ``cpu=False``, instead of it)."""
    _, manifest, region = split(data)
    cpu_entry = manifest["entries"][0]
    cudas = []
    for _ in range(cuda_entries):
        e = copy.deepcopy(cpu_entry)
        e["device"] = "cuda"
        for leaf in e["leaves"]:
            if leaf["kind"] == "tensor":
                leaf["device"] = "cuda"
        cudas.append(e)
    entries = ([] if not cpu else [cpu_entry]) + cudas if not cuda_first else cudas + ([cpu_entry] if cpu else [])
    for i, e in enumerate(entries):
        e["name"] = str(i)
        if e["device"] == "cuda":
            blobs = kernel_blobs(i)
            region = add_blobs(manifest, region, blobs)
            e["cuda"] = cuda_section(i, blobs)
            e["kernels"] = [k[0] for k in KERNELS]
    manifest["entries"] = entries
    manifest["format_version"] = version
    if edit:
        edit(manifest)
    return join(version, fmt.canonical_json(manifest), region)


def cuda_meta(kernels: list[tuple[str, list, list]], archs=("sm_90",), ptx=("compute_90",)) -> CudaMeta:
    return CudaMeta.from_json({
        "archs": list(archs), "ptx": list(ptx), "built_without_gpu": False, "autotuned": True,
        "build_gpu": "NVIDIA H100 80GB HBM3 (sm_90)", "cuda_version": "13.0",
        "kernels": [{"name": n, "blob": f"kernels/1/{n}.cubin", "file": f"{n}.cubin", "archs": a, "ptx": p,
                     "size": 10, "shared_mem": 0, "num_warps": 4} for n, a, p in kernels]}, "cuda")


class FakeCudaTensor:
    """Stands in for a CUDA tensor where only its device is read (no CUDA tensor can exist on this host)."""

    def __init__(self, index: int):
        self.device = torch.device("cuda", index)

    def get_device(self) -> int:
        return self.device.index


def kernel0(m):
    return m["entries"][1]["cuda"]["kernels"][0]
