"""The runtime's CUDA side, tested on a host without a GPU (the plain CPU venv).

What runs here: the architecture rules (which SASS / PTX runs on which compute capability), device guards,
the checks of an entry's ``cuda`` object, the kernel folder in the extraction cache, and a real pack with a
CUDA entry added (a copy of its CPU entry with device "cuda" and made-up kernel blobs): on this host it loads
with warnings, its CPU entry serves, its CUDA entries never load native code, and a CUDA-only pack refuses
CPU inputs saying the host has no CUDA device. The GPU path itself (arch check, kernel extraction, runner per
device index, weights per device, current device and stream) runs with torch.cuda and the runner replaced by
stand-ins, which is as far as a host without a GPU can go.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import stat
import types
import warnings

import pytest
import torch

import aotpack
from aotpack_runtime import _torch as rt_torch
from aotpack_runtime import cache, devices, platform
from aotpack_runtime import format as fmt
from aotpack_runtime.archive import Archive
from aotpack_runtime.describe import describe, render
from aotpack_runtime.errors import AotpackWarning
from aotpack_runtime.guards import EntryGuards, device_matches
from aotpack_runtime.loader import CudaEntry
from aotpack_runtime.platform import CudaMeta, check_cuda_device, cuda_arch_runs, parse_arch
from archive_tools import join, split

NO_CUDA = platform.cuda_unavailable_reason()
needs_no_cuda = pytest.mark.skipif(NO_CUDA is None, reason="this host has a usable CUDA device; these tests "
                                                           "are about a host without one")

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
    assert parse_arch("sm_86", "sm", "x") == platform.CudaArch("sm", 8, 6, "")
    assert parse_arch("sm_100", "sm", "x") == platform.CudaArch("sm", 10, 0, "")
    assert parse_arch("sm_120", "sm", "x") == platform.CudaArch("sm", 12, 0, "")
    assert parse_arch("sm_90a", "sm", "x") == platform.CudaArch("sm", 9, 0, "a")
    assert parse_arch("compute_75", "compute", "x") == platform.CudaArch("compute", 7, 5, "")


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
    assert str(info.value) == ("manifest.entries[1].cuda.archs[1] is 'sm_9x', not a CUDA SASS architecture (sm_ "
                               "followed by the compute capability's digits, e.g. sm_80, sm_90a, sm_100f)")
    with pytest.raises(aotpack.ArchiveError) as info:
        cuda_arch_runs([], ["sm_80"], (9, 0), where="cuda")
    assert str(info.value) == ("cuda.ptx[0] is 'sm_80', not a CUDA PTX architecture (compute_ followed by the "
                               "compute capability's digits, e.g. compute_80, compute_90a)")


def _meta(kernels: list[tuple[str, list, list]], archs=("sm_90",), ptx=("compute_90",)) -> CudaMeta:
    return CudaMeta.from_json({
        "archs": list(archs), "ptx": list(ptx), "built_without_gpu": False, "autotuned": True,
        "build_gpu": "NVIDIA H100 80GB HBM3 (sm_90)", "cuda_version": "13.0",
        "kernels": [{"name": n, "blob": f"kernels/1/{n}.cubin", "file": f"{n}.cubin", "archs": a, "ptx": p,
                     "size": 10, "shared_mem": 0, "num_warps": 4} for n, a, p in kernels]}, "cuda")


def test_gpu_that_no_kernel_serves_is_named():
    meta = _meta([("triton_a", ["sm_90"], ["compute_90"]), ("triton_b", ["sm_90"], ["compute_90"])])
    with pytest.raises(aotpack.ArchiveError) as info:
        check_cuda_device(meta, 1, "NVIDIA A10", (8, 6), "CUDA entry 1")
    assert str(info.value) == ("GPU 1 (NVIDIA A10, compute capability 8.6) cannot run CUDA entry 1 of this pack: "
                               "its kernels carry SASS for sm_90 and PTX for compute_90, none of which runs on "
                               "sm_86; rebuild with --cuda-arch 86")
    check_cuda_device(meta, 0, "NVIDIA H100", (9, 0), "CUDA entry 1")
    check_cuda_device(meta, 0, "NVIDIA B200", (10, 0), "CUDA entry 1")  # PTX compute_90 is JIT-compiled


def test_one_kernel_without_code_for_the_gpu_is_named():
    meta = _meta([("triton_a", ["sm_80", "sm_90"], ["compute_80"]), ("triton_b", ["sm_90a"], [])],
                 archs=("sm_90",), ptx=())
    with pytest.raises(aotpack.ArchiveError) as info:
        check_cuda_device(meta, 0, "NVIDIA B200", (10, 0), "CUDA entry 0")
    assert str(info.value) == ("GPU 0 (NVIDIA B200, compute capability 10.0) cannot run CUDA entry 0 of this "
                               "pack: its kernel triton_b (1 of 2) carries SASS for sm_90a and no PTX, none of "
                               "which runs on sm_100; rebuild with --cuda-arch 100")
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
    assert str(info.value) == ("GPU 0 (NVIDIA RTX A2000, compute capability 8.6) cannot run CUDA entry 0 of this "
                               "pack: its kernel triton_red_0 asks for 99,000 bytes of shared memory per block "
                               "and this GPU allows 65,536; rebuild the pack on this GPU")


def test_kernel_without_lists_uses_the_entry_lists_and_raw_json_is_accepted():
    raw = {"archs": ["sm_80"], "ptx": [], "built_without_gpu": True, "autotuned": False, "build_gpu": None,
           "cuda_version": "13.0", "kernels": [{"name": "k", "blob": "kernels/0/k.cubin", "file": "k.cubin",
                                                "size": 3, "shared_mem": 0, "num_warps": 1}]}
    assert CudaMeta.from_json(raw, "cuda").kernels[0].archs == ("sm_80",)
    check_cuda_device(raw, 0, "NVIDIA A10", (8, 6), "CUDA entry 0")
    with pytest.raises(aotpack.ArchiveError) as info:
        check_cuda_device(raw, 0, "Tesla T4", (7, 5), "CUDA entry 0")
    assert str(info.value) == ("GPU 0 (Tesla T4, compute capability 7.5) cannot run CUDA entry 0 of this pack: its "
                               "kernel k carries SASS for sm_80 and no PTX, none of which runs on sm_75; rebuild "
                               "with --cuda-arch 75")
    raw["kernels"] = []  # library calls only (cuBLAS, ATen): they run on any GPU this torch supports
    check_cuda_device(raw, 0, "Tesla T4", (7, 5), "CUDA entry 0")


# ---------------------------------------------------------------------------------------------------
# Device guards


def _guards(device: str = "cuda", names=("x",)) -> EntryGuards:
    return EntryGuards.from_json({
        "inputs": {"type": "tuple", "children": [{"type": "tuple", "children": [{"type": "leaf"}] * len(names)},
                                                 {"type": "dict", "keys": [], "children": []}]},
        "leaves": [{"kind": "tensor", "path": f"args[{i}]", "name": n, "dtype": "float32", "device": device,
                    "sizes": [2, 3], "strides": [3, 1], "requires_grad": False} for i, n in enumerate(names)],
        "symbols": {}, "param_names": list(names)}, "test")


def test_cuda_guard_refuses_cpu_tensor():
    g = _guards("cuda")
    x = torch.randn(2, 3)
    assert g.match((x,), {}) is None
    assert g.explain((x,), {}) == "input 'x' (args[0]) device mismatch: expected cuda, actual cpu"
    assert g.leaves[0].describe(g.symbols) == "float32[2, 3] cuda contiguous"


def test_cpu_guard_unchanged():
    g = _guards("cpu")
    x = torch.randn(2, 3)
    assert g.match((x,), {}) == [x]
    assert g.explain((torch.empty(2, 3, device="meta"),), {}) == \
        "input 'x' (args[0]) device mismatch: expected cpu, actual meta"


def test_device_matching_rules():
    assert device_matches("cuda", torch.device("cuda", 0))
    assert device_matches("cuda", torch.device("cuda", 1))
    assert not device_matches("cuda", torch.device("cpu"))
    assert device_matches("cpu", torch.device("cpu"))
    assert not device_matches("cpu", torch.device("cuda", 0))
    assert device_matches("cuda:1", torch.device("cuda", 1))
    assert not device_matches("cuda:1", torch.device("cuda", 0))


class FakeCudaTensor:
    """Stands in for a CUDA tensor where only its device is read (no CUDA tensor can exist on this host)."""

    def __init__(self, index: int):
        self.device = torch.device("cuda", index)

    def get_device(self) -> int:
        return self.device.index


def test_inputs_on_different_gpus_are_refused_before_anything_runs():
    g = _guards("cuda", names=("x", "y"))
    meta = {"name": "1", "library": "code/1.so", "constants": {}}
    entry = CudaEntry(1, meta, g, {"type": "leaf"}, [{"kind": "tensor", "index": 0}], _meta([]), None)
    with pytest.raises(aotpack.GuardError) as info:
        entry.run([FakeCudaTensor(0), FakeCudaTensor(1)])
    assert str(info.value) == ("the CUDA inputs are on different devices: input 'x' (args[0]) on cuda:0, input "
                               "'y' (args[1]) on cuda:1; a CUDA entry runs on one device: move them to one "
                               "(t.to('cuda:N'))")
    assert entry._runners == {}


def test_cuda_entry_without_tensor_inputs_on_a_host_without_cuda():
    g = EntryGuards.from_json({
        "inputs": {"type": "tuple", "children": [{"type": "tuple", "children": [{"type": "leaf"}]},
                                                 {"type": "dict", "keys": [], "children": []}]},
        "leaves": [{"kind": "value", "path": "args[0]", "name": "n", "type": "int", "value": 3}],
        "symbols": {}, "param_names": ["n"]}, "test")
    meta = {"name": "0", "library": "code/0.so", "constants": {}}
    state = types.SimpleNamespace(no_cuda="torch 9.9 is a CPU build")
    entry = CudaEntry(0, meta, g, {"type": "leaf"}, [{"kind": "tensor", "index": 0}], _meta([]), state)
    assert g.match((3,), {}) == []
    with pytest.raises(aotpack.GuardError) as info:
        entry.run([])
    assert str(info.value) == ("a CUDA entry without tensor inputs runs on the current CUDA device, and this host "
                               "has no usable CUDA device (torch 9.9 is a CPU build)")


# ---------------------------------------------------------------------------------------------------
# Current device and stream


class _Recorder:
    def __init__(self):
        self.calls: list = []


def test_cuda_run_makes_the_inputs_device_current(monkeypatch):
    """The container enqueues on the current device's current stream: the call makes the inputs' device
    current (only when it is not already), so the caller's current stream there is used."""
    rec = _Recorder()

    @contextlib.contextmanager
    def device(index):
        rec.calls.append(("enter", index))
        yield
        rec.calls.append(("exit", index))

    class Runner:
        def run(self, tensors):
            rec.calls.append(("run", len(tensors)))
            return ["out"]

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", device)
    assert rt_torch.cuda_run(Runner(), [1], 0) == ["out"]
    assert rec.calls == [("run", 1)]
    rec.calls.clear()
    assert rt_torch.cuda_run(Runner(), [1, 2], 1) == ["out"]
    assert rec.calls == [("enter", 1), ("run", 2), ("exit", 1)]


def test_cuda_runner_keeps_the_callers_current_device(monkeypatch):
    """The container's models call cudaSetDevice(index) and leave it set: the runner is made inside
    torch.cuda.device(index), which restores the caller's device."""
    seen = []

    @contextlib.contextmanager
    def device(index):
        seen.append(("enter", index))
        yield
        seen.append(("exit", index))

    class Runner:
        def __init__(self, *args):
            seen.append(("make", args))

    monkeypatch.setattr(rt_torch, "_aoti", lambda: types.SimpleNamespace(AOTIModelContainerRunnerCuda=Runner))
    monkeypatch.setattr(torch.cuda, "device", device)
    assert isinstance(rt_torch.cuda_runner("/lib.so", 2, "cuda:1", "/kernels"), Runner)
    assert seen == [("enter", 1), ("make", ("/lib.so", 2, "cuda:1", "/kernels")), ("exit", 1)]


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the message of a CPU build of torch")
def test_cpu_torch_has_no_cuda_runner():
    with pytest.raises(aotpack.ArchiveError) as info:
        rt_torch.cuda_runner("/nonexistent.so", 1, "cuda:0", "/nonexistent")
    assert str(info.value) == (f"this torch ({torch.__version__}) is a CPU build, and the pack's CUDA entries need "
                               "the CUDA build of torch (the same major.minor series); install it to run them")


def test_unavailable_reasons(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert platform.cuda_unavailable_reason() == f"torch {torch.__version__} is a CPU build"
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert platform.cuda_unavailable_reason() == (f"torch {torch.__version__} sees no CUDA device: no NVIDIA GPU "
                                                  "or driver, or CUDA_VISIBLE_DEVICES hides them")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert platform.cuda_unavailable_reason() is None


# ---------------------------------------------------------------------------------------------------
# The kernel folder in the extraction cache


def _files(contents: dict[str, bytes]) -> dict[str, str]:
    return {n: hashlib.sha256(d).hexdigest() for n, d in contents.items()}


def test_kernel_folder_is_content_addressed_and_rechecked(tmp_path):
    contents = {"a.cubin": b"A" * 100, "b.fatbin": b"B" * 7}
    files = _files(contents)
    assert cache.lookup_dir(str(tmp_path), files) is None
    path = cache.store_dir(str(tmp_path), files, contents)
    assert path == os.path.join(str(tmp_path), "kernels", cache.bundle_digest(files))
    assert sorted(os.listdir(path)) == ["a.cubin", "b.fatbin"]
    assert (tmp_path / "kernels" / os.path.basename(path) / "a.cubin").read_bytes() == contents["a.cubin"]
    assert not stat.S_IMODE(os.stat(os.path.join(path, "a.cubin")).st_mode) & 0o222  # read-only
    assert [n for n in os.listdir(tmp_path / "kernels") if n.endswith(".tmp")] == []
    assert cache.lookup_dir(str(tmp_path), files) == path
    # A damaged file is not trusted: the folder is not found, and storing it again replaces it.
    target = os.path.join(path, "b.fatbin")
    os.chmod(target, 0o644)
    with open(target, "wb") as f:
        f.write(b"evil!!!")
    assert cache.lookup_dir(str(tmp_path), files) is None
    assert cache.store_dir(str(tmp_path), files, contents) == path
    assert cache.lookup_dir(str(tmp_path), files) == path
    assert sorted(os.listdir(tmp_path / "kernels")) == [os.path.basename(path)]
    # Another set of files is another folder; an intact folder already there is reused.
    other = {"a.cubin": b"C"}
    assert cache.store_dir(str(tmp_path), _files(other), other) != path
    assert cache.store_dir(str(tmp_path), files, contents) == path


def test_kernel_folder_refuses_path_names(tmp_path):
    for name in ("../x", "a/b", "..", ""):
        with pytest.raises(aotpack.ArchiveError, match="not a plain file name"):
            cache.lookup_dir(str(tmp_path), {name: "0" * 64})


# ---------------------------------------------------------------------------------------------------
# A real pack with a CUDA entry added

KERNELS = [("triton_per_fused_0", "czr733aa11", 1000, ["sm_80", "sm_90"], ["compute_80"], 0, 2),
           ("triton_poi_fused_1", "cq5b0c9e2f", 2048, ["sm_80", "sm_90", "sm_100"], ["compute_80"], 1024, 4)]


def _kernel_blobs(entry_index: int) -> dict[str, bytes]:
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
            blobs = _kernel_blobs(i)
            region = add_blobs(manifest, region, blobs)
            e["cuda"] = cuda_section(i, blobs)
            e["kernels"] = [k[0] for k in KERNELS]
    manifest["entries"] = entries
    manifest["format_version"] = version
    if edit:
        edit(manifest)
    return join(version, fmt.canonical_json(manifest), region)


@pytest.fixture(scope="module")
def packs(mlp_pack, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cuda-packs")
    data = mlp_pack.path.read_bytes()
    out = {}
    for name, kwargs in {"mixed": {}, "cuda_first": {"cuda_first": True}, "cuda_only": {"cpu": False},
                         "two_cuda": {"cuda_entries": 2}}.items():
        p = folder / f"{name}.pack"
        p.write_bytes(make_cuda_pack(data, **kwargs))
        out[name] = p
    return out


def _warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, AotpackWarning)]


def _blind_warning(path, names="entry 1 was") -> str:
    return (f"{path}: CUDA {names} built without a GPU, for sm_80, sm_90 (PTX compute_80): not autotuned and never "
            "run at build time; smoke-test the pack on a target GPU before serving it")


def test_synthetic_pack_is_well_formed(packs):
    for p in packs.values():
        a = Archive.open(p)
        a.verify()
        assert a.manifest.format_version == 2 and a.header_version == 2


@needs_no_cuda
def test_mixed_pack_serves_cpu_inputs_on_a_host_without_cuda(packs, mlp_pack, tmp_path):
    with pytest.warns(AotpackWarning) as record:
        pkg = aotpack.load(packs["mixed"], cache_dir=tmp_path / "cache")
    assert _warnings(record) == [
        f"{packs['mixed']}: this host cannot run the pack's CUDA entry 1 ({NO_CUDA}); its CPU entry 0 still serves "
        "CPU inputs",
        _blind_warning(packs["mixed"]),
    ]
    assert [e.device for e in pkg.entries] == ["cpu", "cuda"]
    assert isinstance(pkg.entries[1], CudaEntry)
    x = mlp_pack.args[0]
    assert pkg.select(x) is pkg.entries[0]
    with torch.no_grad():
        torch.testing.assert_close(pkg(x), mlp_pack.model(x))
    # Nothing of the CUDA entry was extracted or loaded: its library needs libcuda.so.1.
    assert pkg.entries[1]._runners == {} and pkg.entries[1]._files is None
    assert not (tmp_path / "cache" / "kernels").exists()
    with pytest.raises(aotpack.GuardError) as info:
        pkg(x.double())
    assert str(info.value) == (
        "no entry accepts this input: entry 0 (x [8, 64]): input 'x' (args[0]) dtype mismatch: expected float32, "
        "actual float64; entry 1 (x [8, 64]): input 'x' (args[0]) dtype mismatch: expected float32, actual float64; "
        f"this host has no usable CUDA device ({NO_CUDA}), so only the pack's CPU entries can run here")


@needs_no_cuda
def test_cuda_entry_first_still_lets_the_cpu_entry_serve(packs, mlp_pack, tmp_path):
    with pytest.warns(AotpackWarning):
        pkg = aotpack.load(packs["cuda_first"], cache_dir=tmp_path / "cache")
    x = mlp_pack.args[0]
    assert [e.device for e in pkg.entries] == ["cuda", "cpu"]
    assert pkg.select(x) is pkg.entries[1]
    with torch.no_grad():
        torch.testing.assert_close(pkg(x), mlp_pack.model(x))


@needs_no_cuda
def test_cuda_only_pack_refuses_cpu_inputs_clearly(packs, mlp_pack, tmp_path):
    path = packs["cuda_only"]
    with pytest.warns(AotpackWarning) as record:
        pkg = aotpack.load(path, cache_dir=tmp_path / "cache")
    assert _warnings(record) == [
        f"{path}: this host cannot run the pack's CUDA entry 0 ({NO_CUDA}), and the pack has no CPU entry: every "
        "call will be refused here; run it on a host with an NVIDIA GPU and the CUDA build of torch",
        _blind_warning(path, "entry 0 was"),
    ]
    with pytest.raises(aotpack.GuardError) as info:
        pkg(mlp_pack.args[0])
    assert str(info.value) == (
        f"input 'x' (args[0]) device mismatch: expected cuda, actual cpu; this host has no usable CUDA device "
        f"({NO_CUDA}), and every entry of this pack is a CUDA entry: run it on a host with an NVIDIA GPU and the "
        "CUDA build of torch")
    assert info.value.note.startswith("this host has no usable CUDA device")
    assert pkg.select(mlp_pack.args[0]) is None


def test_cpu_pack_warns_about_nothing(mlp_pack, tmp_path, recwarn):
    aotpack.load(mlp_pack.path, cache_dir=tmp_path / "cache")
    assert _warnings(recwarn) == []


# ---------------------------------------------------------------------------------------------------
# Damaged cuda sections: ArchiveError naming the field, never another exception

def _kernel0(m):
    return m["entries"][1]["cuda"]["kernels"][0]


DAMAGE = [
    ("missing cuda", lambda m: m["entries"][1].pop("cuda"), "manifest.entries[1] lacks the field 'cuda'"),
    ("cuda not an object", lambda m: m["entries"][1].update(cuda=[]),
     "manifest.entries[1].cuda must be an object, found list"),
    ("archs not a list", lambda m: m["entries"][1]["cuda"].update(archs="sm_80"),
     "manifest.entries[1].cuda.archs must be a list, found str"),
    ("bad arch", lambda m: m["entries"][1]["cuda"].update(archs=["sm_80", "sm_9"]),
     "manifest.entries[1].cuda.archs[1] is 'sm_9', not a CUDA SASS architecture (sm_ followed by the compute "
     "capability's digits, e.g. sm_80, sm_90a, sm_100f)"),
    ("ptx in archs", lambda m: _kernel0(m).update(archs=["compute_80"]),
     "manifest.entries[1].cuda.kernels[0].archs[0] is 'compute_80', not a CUDA SASS architecture (sm_ followed by "
     "the compute capability's digits, e.g. sm_80, sm_90a, sm_100f)"),
    ("bad ptx", lambda m: _kernel0(m).update(ptx=["compute_8.0"]),
     "manifest.entries[1].cuda.kernels[0].ptx[0] is 'compute_8.0', not a CUDA PTX architecture (compute_ followed "
     "by the compute capability's digits, e.g. compute_80, compute_90a)"),
    ("flag not a bool", lambda m: m["entries"][1]["cuda"].update(built_without_gpu="yes"),
     "manifest.entries[1].cuda.built_without_gpu must be a boolean, found str"),
    ("build_gpu a number", lambda m: m["entries"][1]["cuda"].update(build_gpu=3),
     "manifest.entries[1].cuda.build_gpu must be a string or null, found int"),
    ("missing cuda_version", lambda m: m["entries"][1]["cuda"].pop("cuda_version"),
     "manifest.entries[1].cuda lacks the field 'cuda_version'"),
    ("kernels not a list", lambda m: m["entries"][1]["cuda"].update(kernels={}),
     "manifest.entries[1].cuda.kernels must be a list, found dict"),
    ("kernel not an object", lambda m: m["entries"][1]["cuda"]["kernels"].append("k"),
     "manifest.entries[1].cuda.kernels[2] must be a JSON object, found str"),
    ("file with a slash", lambda m: _kernel0(m).update(file="kernels/1/czr733aa11.fatbin"),
     "manifest.entries[1].cuda.kernels[0].file 'kernels/1/czr733aa11.fatbin' must be a plain file name (letters, "
     "digits and '._-', no '/', at most 255 characters)"),
    ("file dot dot", lambda m: _kernel0(m).update(file=".."),
     "manifest.entries[1].cuda.kernels[0].file '..' must be a plain file name (letters, digits and '._-', no '/', "
     "at most 255 characters)"),
    ("file not the blob's name", lambda m: _kernel0(m).update(file="other.fatbin"),
     "manifest.entries[1].cuda.kernels[0].file is 'other.fatbin' but its blob 'kernels/1/czr733aa11.fatbin' ends "
     "in 'czr733aa11.fatbin'; they must be the same name"),
    ("missing blob", lambda m: _kernel0(m).update(blob="kernels/1/nope.fatbin", file="nope.fatbin"),
     "manifest.entries[1].cuda.kernels[0].blob 'kernels/1/nope.fatbin' is not in the blob table"),
    ("blob traversal", lambda m: _kernel0(m).update(blob="../x.fatbin", file="x.fatbin"),
     "manifest.entries[1].cuda.kernels[0].blob '../x.fatbin' is not a valid blob name"),
    ("size mismatch", lambda m: _kernel0(m).update(size=5),
     "manifest.entries[1].cuda.kernels[0].size is 5 but blob 'kernels/1/czr733aa11.fatbin' holds 1004 bytes"),
    ("num_warps a bool", lambda m: _kernel0(m).update(num_warps=True),
     "manifest.entries[1].cuda.kernels[0].num_warps must be an integer or null, found a boolean"),
    ("num_warps too many", lambda m: _kernel0(m).update(num_warps=4096),
     "manifest.entries[1].cuda.kernels[0].num_warps is 4096, outside 0..1024"),
    ("negative shared_mem", lambda m: _kernel0(m).update(shared_mem=-1),
     "manifest.entries[1].cuda.kernels[0].shared_mem is -1, outside 0..1099511627776"),
    ("kernel name missing", lambda m: _kernel0(m).pop("name"),
     "manifest.entries[1].cuda.kernels[0] lacks the field 'name'"),
    ("cpu guard in a cuda entry", lambda m: m["entries"][1]["leaves"][0].update(device="cpu"),
     "manifest.entries[1].leaves[0].device is 'cpu', but the entry is a cuda entry (its tensor guards must say "
     "'cuda')"),
    ("cuda guard in a cpu entry", lambda m: m["entries"][0]["leaves"][0].update(device="cuda"),
     "manifest.entries[0].leaves[0].device is 'cuda', but the entry is a cpu entry (its tensor guards must say "
     "'cpu')"),
    ("indexed guard", lambda m: m["entries"][1]["leaves"][0].update(device="cuda:1"),
     "manifest.entries[1].leaves[0].device is 'cuda:1', but the entry is a cuda entry (its tensor guards must say "
     "'cuda')"),
    ("library missing", lambda m: m["entries"][1].update(library="code/9.so"),
     "manifest refers to blob 'code/9.so', which the blob table lacks"),
    ("version 1", lambda m: m.update(format_version=1),
     "manifest.entries[1] is a CUDA entry, which format version 2 introduced, but the manifest says format version "
     "1; the pack was written by a broken or modified writer"),
]


@pytest.mark.parametrize("label,edit,reason", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_cuda_section(mlp_pack, tmp_path, label, edit, reason):
    data = make_cuda_pack(mlp_pack.path.read_bytes(), edit=edit)
    if label == "version 1":
        version, manifest, region = split(data)
        data = join(1, fmt.canonical_json(manifest), region)
    p = tmp_path / "bad.pack"
    p.write_bytes(data)
    with pytest.raises(aotpack.ArchiveError) as info:
        aotpack.load(p, cache_dir=tmp_path / "cache")
    assert info.value.reason == reason
    assert info.value.path == str(p)


def test_two_kernels_with_one_file_name(mlp_pack, tmp_path):
    """Two kernels whose blobs differ but whose file names are equal would overwrite each other."""
    data = make_cuda_pack(mlp_pack.path.read_bytes())
    _, manifest, region = split(data)
    k0 = manifest["entries"][1]["cuda"]["kernels"][0]
    region = add_blobs(manifest, region, {f"kernels/other/{k0['file']}": b"x" * k0["size"]})
    k1 = manifest["entries"][1]["cuda"]["kernels"][1]
    k1.update(blob=f"kernels/other/{k0['file']}", file=k0["file"], size=k0["size"])
    p = tmp_path / "dup.pack"
    p.write_bytes(join(2, fmt.canonical_json(manifest), region))
    with pytest.raises(aotpack.ArchiveError) as info:
        aotpack.load(p, cache_dir=tmp_path / "cache")
    assert info.value.reason == ("manifest.entries[1].cuda.kernels[1].file 'czr733aa11.fatbin' is also the file of "
                                 "blob 'kernels/1/czr733aa11.fatbin'; the kernels of an entry share one folder, so "
                                 "their file names must differ")


# Wrong values of every JSON type for a field.
MUTATIONS = [None, True, -1, 2**70, 1.5, "", "sm_80", "../x", [], ["sm_80"], [1], {}, {"a": 1}]


def test_every_wrong_type_in_the_cuda_section_is_an_archive_error(mlp_pack, tmp_path):
    """A small fuzz: each field of the cuda object and of a kernel replaced by each wrong value. The load
    either raises ArchiveError or succeeds (a value that happens to be valid), and nothing else."""
    base = mlp_pack.path.read_bytes()
    cache_dir = tmp_path / "cache"
    n = 0
    for target in ("cuda", "kernel"):
        keys = ["archs", "ptx", "built_without_gpu", "autotuned", "build_gpu", "cuda_version", "kernels"] \
            if target == "cuda" else ["name", "blob", "file", "archs", "ptx", "size", "shared_mem", "num_warps"]
        for key in keys:
            for value in MUTATIONS:
                def edit(m, key=key, value=value, target=target):
                    obj = m["entries"][1]["cuda"] if target == "cuda" else _kernel0(m)
                    obj[key] = value
                p = tmp_path / f"m{n}.pack"
                p.write_bytes(make_cuda_pack(base, edit=edit))
                n += 1
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", AotpackWarning)
                        aotpack.load(p, cache_dir=cache_dir)
                except aotpack.ArchiveError as e:
                    assert e.reason.startswith(("manifest.entries[1].cuda", "manifest refers to blob")), e.reason
    assert n > 150


# ---------------------------------------------------------------------------------------------------
# inspect


def test_describe_and_render_show_the_kernels(packs):
    a = Archive.open(packs["mixed"])
    info = describe(a)
    cpu, cuda = info["entries"]
    assert cpu["device"] == "cpu" and "cuda" not in cpu
    assert cuda["device"] == "cuda"
    _, manifest, _ = split(packs["mixed"].read_bytes())
    assert cuda["cuda"] == manifest["entries"][1]["cuda"]
    assert cuda["cuda"]["kernels"][1] == {
        "name": "triton_poi_fused_1", "blob": "kernels/1/cq5b0c9e2f.fatbin", "file": "cq5b0c9e2f.fatbin",
        "archs": ["sm_80", "sm_90", "sm_100"], "ptx": ["compute_80"], "size": 2052, "shared_mem": 1024,
        "num_warps": 4}
    json.dumps(info)  # JSON-ready for --json
    text = render(info).splitlines()
    start = text.index(next(line for line in text if line.startswith("  entry 1 [cuda]: ")))
    assert text[start + 1:start + 10] == [
        "    cuda   SASS sm_80, sm_90, PTX compute_80 (in every kernel); CUDA 13.0",
        "    cuda   built without a GPU: not autotuned, never run; smoke-test on the target",
        "    guard  x (args[0]): float32[8, 64] cuda contiguous",
        "    guard  inputs must not require grad under grad mode (a pack computes no gradients)",
        "    output *",
        "    kernels per arch:",
        "      kernel              sm_80  sm_90  sm_100  compute_80       bytes    smem  warps",
        "      triton_per_fused_0  x      x      -       x                1,004       0      2",
        "      triton_poi_fused_1  x      x      x       x                2,052   1,024      4",
    ]
    assert text[start - 1].startswith("    kernel cpp_fused")  # the CPU entry renders as before


def test_render_of_a_gpu_build(mlp_pack, tmp_path):
    def edit(m):
        m["entries"][1]["cuda"].update(built_without_gpu=False, autotuned=True, build_gpu="NVIDIA H100 (sm_90)",
                                       ptx=[])
        _kernel0(m)["num_warps"] = None  # the build could not read it
    p = tmp_path / "gpu.pack"
    p.write_bytes(make_cuda_pack(mlp_pack.path.read_bytes(), edit=edit))
    text = render(describe(Archive.open(p)))
    assert "    cuda   SASS sm_80, sm_90, no PTX (in every kernel); CUDA 13.0\n" \
           "    cuda   built on NVIDIA H100 (sm_90), autotuned\n" in text
    assert "built without a GPU" not in text
    assert "      triton_per_fused_0  x      x      -       x                1,004       0      -\n" in text


# ---------------------------------------------------------------------------------------------------
# The GPU path, with torch.cuda and the container runner replaced by stand-ins


class FakeRunner:
    made: list = []
    outputs = 1  # how many tensors run() returns

    def __init__(self, library, num_models, device_str, cubin_dir, constants):
        self.args = (library, num_models, device_str, cubin_dir)
        self.constants = constants
        self.set: dict = {}
        self.updates: list = []
        self.runs = 0
        FakeRunner.made.append(self)

    def get_constant_names_to_original_fqns(self):
        return dict(self.constants)

    def update_constant_buffer(self, tensors, use_inactive, validate_full, user_managed=False):
        self.set.update(tensors)
        self.updates.append((dict(tensors), validate_full, user_managed))

    def run(self, tensors):
        self.runs += 1
        return [torch.zeros(8, 10)] * FakeRunner.outputs


GPUS = {0: ("NVIDIA H100 80GB HBM3", (9, 0)), 1: ("Tesla T4", (7, 5)), 2: ("NVIDIA A10", (8, 6))}


@pytest.fixture
def fake_gpu_host(monkeypatch, mlp_pack):
    """A host with the GPUs of ``GPUS``: torch.cuda's queries, the runner and the copy to a GPU replaced."""
    FakeRunner.made = []
    monkeypatch.setattr(FakeRunner, "outputs", 1)
    host = types.SimpleNamespace(copies=[], entered=[],
                                 constants=split(mlp_pack.path.read_bytes())[1]["entries"][0]["constants"])

    @contextlib.contextmanager
    def device(index):
        host.entered.append(index)
        yield

    def cuda_runner(library, num_models, device_str, cubin_dir):
        return FakeRunner(library, num_models, device_str, cubin_dir, host.constants)

    def copy_to_cuda(t, index):
        host.copies.append((index, t))
        return t.clone()

    monkeypatch.setattr(platform, "cuda_unavailable_reason", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: GPUS[i][0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: GPUS[i][1])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(
        name=GPUS[i][0], major=GPUS[i][1][0], minor=GPUS[i][1][1], shared_memory_per_block_optin=101_376))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(rt_torch, "cuda_runner", cuda_runner)
    monkeypatch.setattr(devices, "_copy_to_cuda", copy_to_cuda)
    return host


def test_gpu_path_with_stand_ins(packs, fake_gpu_host, tmp_path):
    copies, entered = fake_gpu_host.copies, fake_gpu_host.entered
    path = packs["two_cuda"]
    with pytest.warns(AotpackWarning) as record:  # only about the build without a GPU
        pkg = aotpack.load(path, cache_dir=tmp_path / "cache", num_models=2)
    assert _warnings(record) == [_blind_warning(path, "entries 1, 2 were")]
    e1, e2 = pkg.entries[1], pkg.entries[2]
    # On a host with CUDA, the code is extracted and hash-checked at load; nothing is loaded yet.
    library, kernel_dir = e1._files
    assert FakeRunner.made == [] and copies == []
    assert sorted(os.listdir(kernel_dir)) == ["cq5b0c9e2f.fatbin", "czr733aa11.fatbin"]
    blobs = _kernel_blobs(1)
    assert (tmp_path / "cache" / "kernels" / os.path.basename(kernel_dir) / "czr733aa11.fatbin").read_bytes() == \
        blobs["kernels/1/czr733aa11.fatbin"]
    # Loaded through the descriptor that was hashed (kept open: this process may have extracted it before).
    assert library.path == f"/proc/self/fd/{library._file.fd}"
    assert os.path.basename(library._file.path) == pkg.manifest.blob(e1._library_blob).sha256 + ".so"

    out = e1.run([FakeCudaTensor(0)])
    assert out.shape == (8, 10)
    (r,) = FakeRunner.made
    assert r.args == (library.path, 2, "cuda:0", kernel_dir)
    assert set(r.set) == set(e1._constants) and entered == []  # cuda:0 is current: no device switch
    n_weights = len(copies)
    assert n_weights == len(set(e1._constants.values())) and {i for i, _ in copies} == {0}
    e1.run([FakeCudaTensor(0)])
    assert len(FakeRunner.made) == 1 and r.runs == 2  # one runner per device index, made once

    # A GPU no kernel has code for: refused before anything is loaded for it.
    with pytest.raises(aotpack.ArchiveError) as info:
        e1.run([FakeCudaTensor(1)])
    assert str(info.value) == (f"{path}: GPU 1 (Tesla T4, compute capability 7.5) cannot run CUDA entry 1 of this "
                               "pack: its kernels carry SASS for sm_80, sm_90, sm_100 and PTX for compute_80, none "
                               "of which runs on sm_75; rebuild with --cuda-arch 75")
    assert len(FakeRunner.made) == 1 and 1 not in e1._runners

    # cuda:2 (8.6 runs sm_80 SASS): its own runner, made current for the call, weights copied once for it
    # and shared with the package's other CUDA entry.
    e1.run([FakeCudaTensor(2)])
    e2.run([FakeCudaTensor(2)])
    assert [m.args[2] for m in FakeRunner.made] == ["cuda:0", "cuda:2", "cuda:2"]
    assert entered == [2, 2]
    assert len(copies) == 2 * n_weights
    r2a, r2b = FakeRunner.made[1:]
    assert all(r2a.set[c] is r2b.set[c] for c in r2a.set)
    assert all(r2a.set[c] is not r.set[c] for c in r.set)


def test_gpu_path_refuses_a_mismatched_constant_table(packs, fake_gpu_host, tmp_path):
    path = packs["mixed"]
    fake_gpu_host.constants = {"other": "net.0.weight"}
    with pytest.warns(AotpackWarning):
        pkg = aotpack.load(path, cache_dir=tmp_path / "cache")
    with pytest.raises(aotpack.ArchiveError) as info:
        pkg.entries[1].run([FakeCudaTensor(0)])
    assert info.value.reason == "manifest.entries[1].constants do not match the constants of its native code"


def test_gpu_path_detects_a_damaged_kernel_folder(packs, fake_gpu_host, tmp_path):
    """A kernel file changed in the cache is not trusted: the next load writes the folder again."""
    path = packs["mixed"]
    with pytest.warns(AotpackWarning):
        pkg = aotpack.load(path, cache_dir=tmp_path / "cache")
    _, kernel_dir = pkg.entries[1]._files
    target = os.path.join(kernel_dir, "czr733aa11.fatbin")
    os.chmod(target, 0o644)
    with open(target, "wb") as f:
        f.write(b"tampered")
    with pytest.warns(AotpackWarning):
        again = aotpack.load(path, cache_dir=tmp_path / "cache")
    assert again.entries[1]._files[1] == kernel_dir
    assert open(target, "rb").read() == _kernel_blobs(1)["kernels/1/czr733aa11.fatbin"]


def test_stateful_cuda_entry_binds_each_sessions_state_per_device(counter_pack, fake_gpu_host, tmp_path):
    """A CUDA entry of a pack with state keeps a pool of num_models containers per GPU (one model each), binds
    a session's state (user-managed, no copy) just before the call that needs it, and does not rebind a
    container still bound to the calling session."""
    _, manifest, _ = split(counter_pack.read_bytes())
    fake_gpu_host.constants = manifest["entries"][0]["constants"]
    FakeRunner.outputs = 2  # (x * count * scale, history.sum())
    path = tmp_path / "stateful-cuda.pack"
    path.write_bytes(make_cuda_pack(counter_pack.read_bytes(), cpu=False, version=3))
    with pytest.warns(AotpackWarning):
        pkg = aotpack.load(path, cache_dir=tmp_path / "cache", num_models=2)
    entry = pkg.entries[0]
    assert entry.state_constants and set(entry.state_constants.values()) == {"count", "history"}
    state_a = {"count": torch.zeros(()), "history": torch.zeros(4)}
    state_b = {"count": torch.ones(()), "history": torch.ones(4)}
    entry.run_stateful([FakeCudaTensor(0)], state_a, ("a", 0))
    made = list(FakeRunner.made)
    assert [r.args[1:3] for r in made] == [(1, "cuda:0"), (1, "cuda:0")]  # num_models containers, one model each
    for r in made:  # the weights: bound once, user-managed, leaving the state to each call
        assert r.updates[0][1:] == (False, True) and not set(r.updates[0][0]) & set(entry.state_constants)
    ran = [r for r in made if r.runs]
    assert len(ran) == 1 and all(ran[0].set[c] is state_a[n] for c, n in entry.state_constants.items())
    binds = sum(len(r.updates) for r in made)
    entry.run_stateful([FakeCudaTensor(0)], state_a, ("a", 0))
    entry.run_stateful([FakeCudaTensor(0)], state_a, ("a", 0))
    assert sum(len(r.updates) for r in made) <= binds + 1  # at most the other container, once
    entry.run_stateful([FakeCudaTensor(0)], state_b, ("b", 0))
    assert any(all(r.set[c] is state_b[n] for c, n in entry.state_constants.items()) for r in made)
    assert sum(r.runs for r in made) == 4
    entry.run_stateful([FakeCudaTensor(2)], state_a, ("a", 0))  # another GPU: its own pool
    assert [r.args[2] for r in FakeRunner.made[2:]] == ["cuda:2", "cuda:2"]
