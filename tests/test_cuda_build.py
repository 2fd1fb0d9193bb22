"""CUDA packs built without a GPU (the CUDA lane: the CUDA build of torch on a CPU-only host, `.ci/test-cuda`).

Nothing here runs a kernel: the packs are checked for structure. Every kernel binary must carry SASS for each
requested architecture (cuobjdump), the wrapper library must need the driver and libtorch_cuda and resolve
against the libcuda stub, the manifest and `inspect` must say what was built and how, two builds must be
byte-identical, and loading on this host must serve the CPU entries and refuse CUDA calls clearly.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import warnings

import pytest
import torch

from conftest import EXAMPLES, ROOT, run_python
from helpers import assert_close_to_eager

if torch.version.cuda is None:
    pytest.skip("needs the CUDA build of torch (the CUDA lane: bash .ci/test-cuda)", allow_module_level=True)

from aotpack import _cuda_offline, cudabuild  # noqa: E402

if _cuda_offline.versions() not in _cuda_offline.SUPPORTED:
    pytest.skip(f"GPU-less builds are tested with {_cuda_offline.SUPPORTED}, this is {_cuda_offline.versions()}",
                allow_module_level=True)

import aotpack_runtime as rt  # noqa: E402
from aotpack_runtime.archive import Archive  # noqa: E402


def _cli_build(folder: pathlib.Path, model: str, out_name: str, *flags: str) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tmp").mkdir(exist_ok=True)
    env = dict(os.environ, TMPDIR=str(folder / "tmp"), TORCHINDUCTOR_CACHE_DIR=str(folder / "inductor"),
               PYTHONPATH=str(ROOT))
    out = folder / out_name
    proc = subprocess.run([sys.executable, "-m", "aotpack", "build", str(EXAMPLES / model), "-o", str(out), *flags],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    (folder / "build.log").write_text(proc.stderr)
    return out


@pytest.fixture(scope="session")
def mixed_pack(session_dir) -> pathlib.Path:
    """The MLP with a CPU and a CUDA entry, CUDA code for sm_80 and sm_90."""
    return _cli_build(session_dir / "cuda-mixed", "mlp.py", "mlp-cuda.pack", "--device", "cpu", "--device", "cuda",
                      "--cuda-arch", "80,90", "--without-gpu")


@pytest.fixture(scope="session")
def cuda_only_pack(session_dir) -> pathlib.Path:
    """The conv net with a CUDA entry only, for sm_90."""
    return _cli_build(session_dir / "cuda-only", "convnet.py", "convnet-cuda.pack", "--device", "cuda",
                      "--cuda-arch", "90", "--without-gpu")


@pytest.fixture(scope="session")
def llama_cuda_pack(session_dir) -> pathlib.Path:
    """A tiny Llama with a static KV cache (a pack with state): a CPU and a CUDA entry, sm_80 and sm_90."""
    return _cli_build(session_dir / "cuda-llama", "llm/llama.py", "llama-cuda.pack", "--device", "cpu", "--device",
                      "cuda", "--cuda-arch", "80,90", "--without-gpu")


@pytest.fixture(scope="session")
def kwargs_pack(session_dir) -> pathlib.Path:
    """The keyword-argument model (a masked_fill with -inf, a one-element bias) for sm_86: Inductor would
    evaluate the fill and read the bias's value at compile time, which fake weights on no GPU cannot give."""
    return _cli_build(session_dir / "cuda-kwargs", "multi_io.py", "multi-io-cuda.pack", "--device", "cuda",
                      "--cuda-arch", "86", "--without-gpu")


@pytest.fixture(scope="session")
def methods_cuda_pack(session_dir) -> pathlib.Path:
    """The tiny encoder-decoder of tests/programs.py (``encode`` writes the cross-attention cache that
    ``decode`` reads): two methods sharing weights and state, each with a CPU and a CUDA entry, sm_80."""
    folder = session_dir / "cuda-methods"
    folder.mkdir(parents=True, exist_ok=True)
    model_file = folder / "seq2seq.py"
    model_file.write_text(f"import sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\nimport programs\n"
                          "model = programs.TinySeq2Seq().eval()\nmethods = programs.seq2seq_methods(model)\n")
    return _cli_build(folder, str(model_file), "seq2seq-cuda.pack", "--device", "cpu", "--device", "cuda",
                      "--cuda-arch", "80", "--without-gpu")


def _extract(archive: Archive, blob: str, folder: pathlib.Path) -> pathlib.Path:
    path = folder / blob.replace("/", "_")
    path.write_bytes(archive.read_blob(blob))
    return path


def test_manifest_records_devices_archs_and_how_it_was_built(mixed_pack):
    m = Archive.open(str(mixed_pack)).manifest
    assert m.format_version == 2
    assert [e.device for e in m.entries] == ["cpu", "cuda"]
    cpu, gpu = (e.to_json() for e in m.entries)
    assert [leaf["device"] for leaf in gpu["leaves"]] == ["cuda"]
    assert [leaf["device"] for leaf in cpu["leaves"]] == ["cpu"]
    c = gpu["cuda"]
    assert c["archs"] == ["sm_80", "sm_90"] and c["ptx"] == ["compute_80"]
    assert c["built_without_gpu"] is True and c["autotuned"] is False and c["build_gpu"] is None
    assert c["cuda_version"] == torch.version.cuda
    assert len(c["kernels"]) == len(gpu["kernels"]) >= 1
    for k in c["kernels"]:
        assert k["blob"] == f"kernels/1/{k['file']}" and k["file"].endswith(".fatbin")
        assert k["archs"] == ["sm_80", "sm_90"] and k["ptx"] == ["compute_80"]
        assert m.blob(k["blob"]).size == k["size"] > 0
        assert k["num_warps"] in (1, 2, 4, 8, 16, 32) and k["shared_mem"] >= 0
    assert m.options["devices"] == ["cpu", "cuda"] and m.options["cuda_archs"] == [80, 90]
    assert m.options["without_gpu"] is True


def test_weights_are_stored_once_and_every_entry_uses_all_of_them(mixed_pack):
    """Both entries name the same weights; two same-shaped biases stay two constants (fake weights all have
    data pointer 0, and Inductor would merge them)."""
    m = Archive.open(str(mixed_pack)).manifest
    cpu, gpu = m.entries
    assert gpu.constants == cpu.constants
    assert sorted(w.name for w in m.weights) == sorted(cpu.constants.values())
    assert {"net.0.bias", "net.2.bias"} <= set(gpu.constants.values())
    assert len([b for b in m.blobs if b.name.startswith("weights/")]) == len(m.weights)


def test_every_kernel_carries_the_requested_sass_and_disassembles(mixed_pack, cuda_only_pack, kwargs_pack,
                                                                tmp_path):
    for pack, sass, ptx in ((mixed_pack, ["sm_80", "sm_90"], ["compute_80"]),
                            (cuda_only_pack, ["sm_90a"], ["compute_90a"]),
                            (kwargs_pack, ["sm_86"], ["compute_86"])):
        archive = Archive.open(str(pack))
        cuda_entries = [e for e in archive.manifest.entries if e.device == "cuda"]
        assert len(cuda_entries) == 1
        kernels = [k.to_json() for k in cuda_entries[0].cuda.kernels]
        assert kernels
        for k in kernels:
            path = _extract(archive, k["blob"], tmp_path)
            out = subprocess.run([cudabuild.cuobjdump(), "-elf", "-ptx", str(path)], capture_output=True,
                                 text=True, check=True).stdout
            images = re.findall(r"^Fatbin (elf|ptx) code:\n=+\narch = (\S+)$", out, re.M)
            assert sorted(a for kind, a in images if kind == "elf") == sass, out
            assert [a.replace("sm_", "compute_") for kind, a in images if kind == "ptx"] == ptx, out
            assert cudabuild.disassembles(str(path)), k["name"]
            assert k["archs"] == sass and k["ptx"] == ptx


def test_wrapper_library_needs_the_driver_and_resolves_against_the_stub(mixed_pack, tmp_path):
    archive = Archive.open(str(mixed_pack))
    lib = _extract(archive, archive.manifest.entries[1].library, tmp_path)
    dynamic = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    assert "[libcuda.so.1]" in dynamic and "[libtorch_cuda.so]" in dynamic
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True,
                             check=True).stdout
    assert "AOTInductorModelContainerCreateWithDevice" in symbols
    stub = cudabuild.libcuda_stub(str(tmp_path / "stub"), cudabuild.cuda_home())
    # A fresh process: the stub first (its soname satisfies libcuda.so.1), then every symbol bound now.
    code = (f"import ctypes, os, torch; ctypes.CDLL({os.path.join(stub, 'libcuda.so')!r}, mode=ctypes.RTLD_GLOBAL); "
            f"ctypes.CDLL({str(lib)!r}, mode=os.RTLD_NOW | os.RTLD_LOCAL); print('resolved')")
    proc = run_python(code)
    assert proc.returncode == 0 and "resolved" in proc.stdout, proc.stderr


def test_libcuda_stub_defines_the_driver_api(tmp_path):
    stub = pathlib.Path(cudabuild.libcuda_stub(str(tmp_path), cudabuild.cuda_home())) / "libcuda.so"
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(stub)], capture_output=True, text=True,
                             check=True).stdout
    for name in ("cuInit", "cuModuleLoad", "cuModuleGetFunction", "cuLaunchKernel", "cuFuncSetAttribute"):
        assert f" T {name}\n" in symbols
    assert "libcuda.so.1" in subprocess.run(["readelf", "-d", str(stub)], capture_output=True, text=True).stdout


def test_inspect_lists_kernels_per_arch(mixed_pack):
    proc = subprocess.run([sys.executable, "-m", "aotpack", "inspect", str(mixed_pack), "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    gpu = info["entries"][1]
    assert gpu["device"] == "cuda"
    assert gpu["cuda"]["built_without_gpu"] is True
    assert [k["archs"] for k in gpu["cuda"]["kernels"]] == [["sm_80", "sm_90"]] * len(gpu["cuda"]["kernels"])
    text = subprocess.run([sys.executable, "-m", "aotpack", "inspect", str(mixed_pack)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120).stdout
    kernel = gpu["cuda"]["kernels"][0]
    assert "entries:  2: 1 cpu + 1 cuda (tried in this order" in text
    assert "entry 1 [cuda]" in text and kernel["name"] in text
    assert "sm_80" in text and "sm_90" in text and "compute_80" in text
    assert "without a GPU" in text


def test_load_here_serves_cpu_entries_and_warns(mixed_pack):
    from aotpack.modelfile import load_model_file

    spec = load_model_file(str(EXAMPLES / "mlp.py"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pkg = rt.load(mixed_pack)
    text = " ".join(str(w.message) for w in caught)
    assert "this host cannot run the pack's CUDA entry 1" in text and "its CPU entry 0 still serves" in text, text
    assert "CUDA entry 1 was built without a GPU, for sm_80, sm_90 (PTX compute_80)" in text, text
    with torch.no_grad():
        assert_close_to_eager(pkg(*spec.example_inputs), spec.model(*spec.example_inputs))
    assert pkg.select(*spec.example_inputs).device == "cpu"


def test_cuda_only_pack_called_with_cpu_tensors_is_a_clear_error(cuda_only_pack):
    from aotpack.modelfile import load_model_file

    spec = load_model_file(str(EXAMPLES / "convnet.py"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pkg = rt.load(cuda_only_pack)
    with pytest.raises(rt.GuardError) as e:
        pkg(*spec.example_inputs)
    message = str(e.value)
    assert "expected cuda, actual cpu" in message and "no usable CUDA" in message


def test_two_gpu_less_builds_are_byte_identical(mixed_pack, tmp_path):
    again = _cli_build(tmp_path / "elsewhere", "mlp.py", "other.pack", "--device", "cpu", "--device", "cuda",
                       "--cuda-arch", "80,90", "--without-gpu", "--quiet")
    assert again.read_bytes() == mixed_pack.read_bytes()


def test_build_log_shows_the_cuda_stage(mixed_pack):
    log = (mixed_pack.parent / "build.log").read_text()
    assert "Triton for sm_80, sm_90 without a GPU" in log
    assert "SASS sm_80, sm_90, PTX compute_80, built without a GPU" in log
    assert "not autotuned" in log


def _resolve(qualified: str):
    import importlib

    module, attr = qualified.split(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = vars(obj)[part] if isinstance(obj, type) and part in vars(obj) else getattr(obj, part)
    return obj


def test_offline_mode_patches_exactly_the_listed_private_names_and_restores_them():
    from torch._dynamo.device_interface import CudaInterface

    before = {name: _resolve(name) for name in _cuda_offline.patched_names()}  # each exists in this torch
    raw_before = vars(CudaInterface)["is_available"]
    with _cuda_offline.offline_cuda(80) as target:
        assert torch.cuda.get_device_properties(0).multi_processor_count == target.sms == 108
        assert torch.cuda.get_device_capability(0) == (8, 0)
        assert CudaInterface.is_available()
    assert sorted(_cuda_offline.last_patched) == sorted(_cuda_offline.patched_names())
    assert all(_resolve(name) is value for name, value in before.items())
    assert vars(CudaInterface)["is_available"] is raw_before  # still the staticmethod object
    assert not torch.cuda.is_available() and not CudaInterface.is_available()


def test_offline_mode_restores_what_it_changed_when_entering_fails(monkeypatch):
    from torch._inductor import graph

    original = graph.is_same_tensor
    props, guard = torch.cuda.get_device_properties, torch.cuda._DeviceGuard
    monkeypatch.delattr(torch._C, "_cuda_getCurrentRawStream")
    with pytest.raises(rt.AotpackError, match=r"_cuda_getCurrentRawStream does not exist in this torch/triton"):
        with _cuda_offline.offline_cuda(90):
            pass
    assert torch.cuda.get_device_properties is props and torch.cuda._DeviceGuard is guard
    assert graph.is_same_tensor is original
    assert not torch.cuda.is_available()


def test_verify_on_this_host_checks_the_cpu_entry_and_says_what_cannot_run(mixed_pack, cuda_only_pack):
    proc = subprocess.run([sys.executable, "-m", "aotpack", "verify", str(mixed_pack), "--against",
                           str(EXAMPLES / "mlp.py"), "--json"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = {c["check"]: c for c in json.loads(proc.stdout)["checks"]}
    assert checks["host"]["detail"].startswith("this host's CPU and torch can run the pack's 1 CPU entry; its 1 "
                                               "CUDA entry cannot run here (torch ")
    assert checks["numerics"]["detail"].startswith(f"matches eager on {EXAMPLES / 'mlp.py'}'s example inputs (cpu: ")
    proc = subprocess.run([sys.executable, "-m", "aotpack", "verify", str(cuda_only_pack), "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 1
    checks = {c["check"]: c for c in json.loads(proc.stdout)["checks"]}
    assert checks["hashes"]["ok"] and not checks["host"]["ok"]
    assert checks["host"]["detail"].startswith("the pack has only CUDA entries and torch ")


@pytest.mark.parametrize("which, example", [("mixed_pack", "mlp.py"), ("cuda_only_pack", "convnet.py"),
                                            ("kwargs_pack", "multi_io.py")])
def test_stored_weights_are_the_models_real_values(which, example, request):
    """The CUDA compile works on a fake copy of the graph; the pack must hold the real weights (one build
    compiles in this process, the other in worker processes)."""
    from aotpack.modelfile import load_model_file

    archive = Archive.open(str(request.getfixturevalue(which)))
    state = load_model_file(str(EXAMPLES / example)).model.state_dict()
    assert archive.manifest.weights
    for w in archive.manifest.weights:
        t = state[w.name].detach().contiguous()
        assert archive.read_blob(w.blob) == t.numpy().tobytes(), w.name


def test_run_command_on_this_host(mixed_pack, cuda_only_pack):
    proc = subprocess.run([sys.executable, "-m", "aotpack", "run", str(mixed_pack), "--repeat", "3"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("output: tensor float32[8, 10] [")
    proc = subprocess.run([sys.executable, "-m", "aotpack", "run", str(cuda_only_pack)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith("--device cuda: this host has no usable CUDA device")


def test_a_pack_with_state_builds_cuda_entries_without_a_gpu(llama_cuda_pack):
    """The KV cache is state for the CUDA entry as for the CPU entry (the CUDA code writes it in place on the
    GPU, in the session's own copy there); the kernels carry the requested SASS; the CPU entry serves a session
    here with eager's tokens, and a session on a GPU is refused clearly on this host."""
    sys.path.insert(0, str(EXAMPLES / "llm"))
    from decoders import greedy, wrapped

    m = Archive.open(llama_cuda_pack).manifest
    assert m.format_version == 3  # state; rotary buffers outside the state_dict need no newer version
    names = {r.name for r in m.state}
    assert names == {f"{k}_{i}" for k in ("key_cache", "value_cache", "cumulative_length") for i in (0, 1)}
    cpu, cuda = (e.to_json() for e in m.entries)
    assert cuda["device"] == "cuda" and names <= set(cuda["constants"].values()) and names <= set(
        cpu["constants"].values())
    assert all({"sm_80", "sm_90"} <= set(k["archs"]) for k in cuda["cuda"]["kernels"]) and cuda["cuda"]["kernels"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rt.AotpackWarning)
        pkg = rt.load(llama_cuda_pack)
    s = pkg.session()
    _, wrapper = wrapped("llama")
    with torch.inference_mode():
        got = greedy(lambda ids, pos: s(input_ids=ids, cache_position=pos), [5, 17, 42], 12)
        want = greedy(lambda ids, pos: wrapper(input_ids=ids, cache_position=pos), [5, 17, 42], 12)
    assert got == want
    with pytest.raises(rt.SessionError, match=r"cannot keep this session's state on cuda: torch .* sees no CUDA device"):
        pkg.session(device="cuda")


def test_a_pack_of_methods_builds_cuda_entries_for_each_method_without_a_gpu(methods_cuda_pack):
    """Each method has its own CPU and CUDA entry; the CUDA entries carry sm_80 kernels and were built without
    a GPU; each device's entry of a method reads the same weights and state, the weights are stored once, and
    the CPU entries serve a session here with eager's tokens."""
    import programs

    m = Archive.open(str(methods_cuda_pack)).manifest
    assert m.format_version == 5 and m.options["devices"] == ["cpu", "cuda"]
    assert [r.name for r in m.methods] == ["encode", "decode"]
    assert {r.name: sorted(m.entries[i].device for i in r.entries) for r in m.methods} == {
        "encode": ["cpu", "cuda"], "decode": ["cpu", "cuda"]}
    assert [r.writes for r in m.methods] == [("cross_k_cache", "cross_v_cache"), ("self_k_cache", "self_v_cache")]
    for r in m.methods:
        cpu, cuda = sorted((m.entries[i].to_json() for i in r.entries), key=lambda e: e["device"])
        assert cuda["constants"] == cpu["constants"] and set(r.writes) <= set(cuda["constants"].values())
        assert cuda["cuda"]["built_without_gpu"] is True and cuda["cuda"]["archs"] == ["sm_80"]
        assert cuda["cuda"]["kernels"] and all(k["archs"] == ["sm_80"] for k in cuda["cuda"]["kernels"])
        assert [leaf["device"] for leaf in cuda["leaves"]] == ["cuda"] * len(cuda["leaves"])
    params = dict(programs.TinySeq2Seq().named_parameters())
    assert sorted(w.name for w in m.weights) == sorted(params)
    assert len([b for b in m.blobs if b.name.startswith("weights/")]) == len(params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rt.AotpackWarning)
        pkg = rt.load(methods_cuda_pack)
    s = pkg.session()
    src = torch.tensor([[1, 5, 7, 2, 9, 4]])
    eager = programs.TinySeq2Seq().eval()
    with torch.no_grad():
        want = programs.greedy_seq2seq(eager.encode, eager.decode, src, programs.MAX_LEN)
    assert programs.greedy_seq2seq(s.encode, s.decode, src, programs.MAX_LEN) == want
