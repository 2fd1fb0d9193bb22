"""CUDA entries on a real GPU: numerics against eager, cuda:1, streams, architecture checks.

These run only where torch sees a GPU (they skip cleanly elsewhere). The packs are built on that GPU
(autotuned for it), once per session.
"""
from __future__ import annotations

import pathlib
import warnings

import pytest
import torch

from archive_tools import with_manifest
from conftest import EXAMPLES
from helpers import assert_close_to_eager

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (none visible to torch here)", allow_module_level=True)

import aotpack  # noqa: E402
import aotpack_runtime as rt  # noqa: E402
from aotpack.modelfile import load_model_file  # noqa: E402

_built: dict[str, tuple[pathlib.Path, object]] = {}


def _gpu_pack(name: str, session_dir: pathlib.Path, **options):
    key = name + repr(sorted(options.items()))
    if key not in _built:
        spec = load_model_file(str(EXAMPLES / f"{name}.py"))
        out = session_dir / f"{name}-gpu-{len(_built)}.pack"
        aotpack.build(spec.model, spec.example_inputs, out, example_kwargs=spec.example_kwargs, **options)
        _built[key] = (out, spec)
    return _built[key]


def _on(device, tree):
    return torch.utils._pytree.tree_map(lambda v: v.to(device) if isinstance(v, torch.Tensor) else v, tree)


@pytest.fixture(scope="session", params=["mlp", "convnet", "multi_io"])
def gpu_example(request, session_dir):
    return _gpu_pack(request.param, session_dir, devices=("cpu", "cuda"))


def test_numerics_match_eager_on_cuda0(gpu_example):
    path, spec = gpu_example
    assert not torch.backends.cuda.matmul.allow_tf32  # float32 tolerances: TF32 stays off
    pkg = rt.load(path)
    args, kwargs = _on("cuda:0", (spec.example_inputs, spec.example_kwargs))
    model = spec.model.to("cuda:0")
    with torch.no_grad():
        expected = model(*args, **kwargs)
        got = pkg(*args, **kwargs)
    assert pkg.select(*args, **kwargs).device == "cuda"
    assert_close_to_eager(got, expected, rel=1e-4)
    # The CPU entry of the same pack still serves CPU inputs.
    cpu_args, cpu_kwargs = _on("cpu", (spec.example_inputs, spec.example_kwargs))
    with torch.no_grad():
        assert_close_to_eager(pkg(*cpu_args, **cpu_kwargs), spec.model.to("cpu")(*cpu_args, **cpu_kwargs))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs for cuda:1")
def test_inputs_on_cuda1_work_while_cuda0_is_current(session_dir):
    path, spec = _gpu_pack("convnet", session_dir, devices=("cuda",))
    pkg = rt.load(path)
    args = _on("cuda:1", spec.example_inputs)
    model = spec.model.to("cuda:1")
    torch.cuda.set_device(0)
    with torch.no_grad():
        got = pkg(*args)
        expected = model(*args)
    assert got.device == torch.device("cuda:1")
    assert_close_to_eager(got, expected)


def test_current_stream_is_respected(session_dir):
    path, spec = _gpu_pack("mlp", session_dir, devices=("cuda",))
    pkg = rt.load(path)
    (x,) = _on("cuda:0", spec.example_inputs)
    model = spec.model.to("cuda:0")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(20):
            got = pkg(x)
    side.synchronize()
    with torch.no_grad():
        assert_close_to_eager(got, model(x))


def test_a_gpu_the_pack_cannot_serve_is_refused_before_any_launch(session_dir, tmp_path):
    path, spec = _gpu_pack("mlp", session_dir, devices=("cuda",))
    major, minor = torch.cuda.get_device_capability(0)
    newer = (major + 1) * 10

    def retarget(m):
        for e in m["entries"]:
            if e["device"] == "cuda":
                e["cuda"]["archs"], e["cuda"]["ptx"] = [f"sm_{newer}"], [f"compute_{newer}"]
                for k in e["cuda"]["kernels"]:
                    k["archs"], k["ptx"] = [f"sm_{newer}"], [f"compute_{newer}"]

    other = tmp_path / "other-arch.pack"
    other.write_bytes(with_manifest(path.read_bytes(), retarget))
    pkg = rt.load(other)
    (x,) = _on("cuda:0", spec.example_inputs)
    with pytest.raises(rt.ArchiveError) as e:
        pkg(x)
    message = str(e.value)
    assert torch.cuda.get_device_name(0) in message and f"sm_{major}{minor}" in message
    assert f"sm_{newer}" in message


def test_gpu_build_records_the_build_gpu_and_autotuning(session_dir):
    path, _ = _gpu_pack("mlp", session_dir, devices=("cuda",))
    m = rt.load(path).manifest
    (entry,) = (e.to_json() for e in m.entries)
    major, minor = torch.cuda.get_device_capability(0)
    assert entry["cuda"]["built_without_gpu"] is False and entry["cuda"]["autotuned"] is True
    assert entry["cuda"]["build_gpu"] == f"{torch.cuda.get_device_name(0)} (sm_{major}{minor})"
    assert any(a.startswith(f"sm_{major}{minor}") for a in entry["cuda"]["archs"])


def test_a_gpu_less_pack_runs_on_the_gpu_and_matches_eager(session_dir):
    from aotpack import _cuda_offline

    if _cuda_offline.versions() not in _cuda_offline.SUPPORTED:
        pytest.skip(f"GPU-less builds need {_cuda_offline.SUPPORTED}; this is {_cuda_offline.versions()}")
    major, minor = torch.cuda.get_device_capability(0)
    path, spec = _gpu_pack("convnet", session_dir, devices=("cuda",), cuda_archs=(major * 10 + minor,),
                           without_gpu=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pkg = rt.load(path)
    (x,) = _on("cuda:0", spec.example_inputs)
    with torch.no_grad():
        assert_close_to_eager(pkg(x), spec.model.to("cuda:0")(x))
