"""The runtime's CUDA side, tested on a host without a GPU (the plain CPU venv).

What runs here: the architecture rules (which SASS / PTX runs on which compute capability), device guards,
the checks of an entry's ``cuda`` object, the kernel folder in the code cache, and a real pack with a
CUDA entry added (a copy of its CPU entry with device "cuda" and made-up kernel blobs): on this host it loads
with warnings, its CPU entry serves, its CUDA entries never load native code, and a CUDA-only pack refuses
CPU inputs saying the host has no CUDA device. The GPU path itself (arch check, kernel extraction, runner per
device index, weights per device, current device and stream) runs with torch.cuda and the runner replaced by
stand-ins, which is as far as a host without a GPU can go.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import types

import pytest
import torch

import aotpack
from aotpack_runtime import _torch as rt_torch
from aotpack_runtime import devices, platform
from aotpack_runtime.archive import Archive
from aotpack_runtime.describe import describe, render
from aotpack_runtime.errors import AotpackWarning
from aotpack_runtime.loader import CudaEntry
from archive_tools import split

from cuda_packs import FakeCudaTensor, kernel0, kernel_blobs, make_cuda_pack
from helpers import assert_facts

NO_CUDA = platform.cuda_unavailable_reason()
needs_no_cuda = pytest.mark.skipif(NO_CUDA is None, reason="this host has a usable CUDA device; these tests "
                                                           "are about a host without one")

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
    text = str(info.value)
    assert text.startswith("no entry accepts this input")
    for entry in (0, 1):
        assert_facts(text, f"entry {entry} (x [8, 64]): input 'x' (args[0]) dtype mismatch: expected float32, "
                           "actual float64")
    assert_facts(text, "no usable CUDA device", f"({NO_CUDA})", "only the pack's CPU entries")


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
    assert_facts(str(info.value), "input 'x' (args[0]) device mismatch: expected cuda, actual cpu",
                 "no usable CUDA device", f"({NO_CUDA})", "every entry of this pack is a CUDA entry", "NVIDIA GPU",
                 "CUDA build of torch")
    assert info.value.note.startswith("this host has no usable CUDA device")
    assert pkg.select(mlp_pack.args[0]) is None


def test_cpu_pack_warns_about_nothing(mlp_pack, tmp_path, recwarn):
    aotpack.load(mlp_pack.path, cache_dir=tmp_path / "cache")
    assert _warnings(recwarn) == []


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
        kernel0(m)["num_warps"] = None  # the build could not read it
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
    blobs = kernel_blobs(1)
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
    assert_facts(str(info.value), str(path), "GPU 1 (Tesla T4, compute capability 7.5)", "cannot run CUDA entry 1",
                 "SASS for sm_80, sm_90, sm_100", "PTX for compute_80", "sm_75", "--cuda-arch 75")
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
    assert_facts(info.value.reason, "manifest.entries[1].constants", "do not match", "native code")


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
    assert open(target, "rb").read() == kernel_blobs(1)["kernels/1/czr733aa11.fatbin"]


def test_stateful_cuda_entry_binds_each_sessions_state_per_device(counter_pack, fake_gpu_host, tmp_path):
    """A CUDA entry of a pack with state keeps a pool of num_models containers per GPU (one model each), binds
    a session's state (user-managed, no copy) just before the call that needs it, and does not rebind a
    container still bound to the calling session."""
    _, manifest, _ = split(counter_pack.path.read_bytes())
    fake_gpu_host.constants = manifest["entries"][0]["constants"]
    FakeRunner.outputs = 2  # (x * count * scale, history.sum())
    path = tmp_path / "stateful-cuda.pack"
    path.write_bytes(make_cuda_pack(counter_pack.path.read_bytes(), cpu=False, version=3))
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


def test_gpu_path_swaps_weights_on_every_gpu_it_runs_on(packs, fake_gpu_host, mlp_pack, tmp_path):
    """load_weights on a pack with CUDA entries: each GPU that holds the weights gets copies of the new ones
    (made before the swap), every runner there is pointed at them (no copy, user-managed), a GPU first used
    after the swap copies the new ones, and the CPU entry serves the new weights."""
    copies = fake_gpu_host.copies
    with pytest.warns(AotpackWarning):
        pkg = aotpack.load(packs["two_cuda"], cache_dir=tmp_path / "cache")
    cpu, e1, e2 = pkg.entries
    e1.run([FakeCudaTensor(0)])
    e2.run([FakeCudaTensor(0)])
    r0a, r0b = FakeRunner.made
    n = len(copies)
    new = {k: torch.randn_like(v) for k, v in mlp_pack.model.state_dict().items()}
    pkg.load_weights(new)
    assert len(copies) == 2 * n and {i for i, _ in copies[n:]} == {0}  # one copy of each, for cuda:0
    for runner in (r0a, r0b):
        update, validate_full, user_managed = runner.updates[-1]
        assert validate_full and user_managed
        assert {c: t.tolist() for c, t in update.items()} == {c: new[w].tolist() for c, w in e1._constants.items()}
    assert all(r0a.set[c] is r0b.set[c] for c in r0a.set)  # the entries share the copies on one GPU
    e1.run([FakeCudaTensor(2)])  # cuda:2, first used after the swap: the new weights
    r2 = FakeRunner.made[-1]
    assert {c: t.tolist() for c, t in r2.set.items()} == {c: new[w].tolist() for c, w in e1._constants.items()}
    assert len(copies) == 3 * n
    reference = copy.deepcopy(mlp_pack.model)
    reference.load_state_dict(new)
    with torch.no_grad():
        torch.testing.assert_close(pkg(*mlp_pack.args), reference(*mlp_pack.args), rtol=1e-4, atol=1e-3)
    # Weights that do not fit: nothing is copied to any GPU, no runner is touched.
    updates = [len(r.updates) for r in FakeRunner.made]
    with pytest.raises(aotpack.WeightsError):
        pkg.load_weights({k: v[:1] for k, v in new.items()})
    assert len(copies) == 3 * n and [len(r.updates) for r in FakeRunner.made] == updates
