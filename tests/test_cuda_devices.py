"""CUDA device guards and the current device and stream around a CUDA run, on a host without a GPU (torch.cuda
and the runner replaced by stand-ins where a test needs a GPU)."""
from __future__ import annotations

import contextlib
import types

import pytest
import torch

import aotpack
from aotpack_runtime import _torch as rt_torch
from aotpack_runtime import platform
from aotpack_runtime.guards import EntryGuards, device_matches
from aotpack_runtime.loader import CudaEntry
from aotpack_runtime.schema import EntryRecord

from cuda_packs import FakeCudaTensor, cuda_meta
from helpers import assert_facts


# ---------------------------------------------------------------------------------------------------
# Device guards


def _guards_json(device: str = "cuda", names=("x",)) -> dict:
    return {
        "inputs": {"type": "tuple", "children": [{"type": "tuple", "children": [{"type": "leaf"}] * len(names)},
                                                 {"type": "dict", "keys": [], "children": []}]},
        "leaves": [{"kind": "tensor", "path": f"args[{i}]", "name": n, "dtype": "float32", "device": device,
                    "sizes": [2, 3], "strides": [3, 1], "requires_grad": False} for i, n in enumerate(names)],
        "symbols": {}, "param_names": list(names)}


def _guards(device: str = "cuda", names=("x",)) -> EntryGuards:
    return EntryGuards.from_json(_guards_json(device, names), "test")


def _cuda_entry(index: int, guards: dict, cuda_state) -> CudaEntry:
    """A CUDA entry of one tensor output over ``guards`` (an entry record's guard fields), no native code."""
    record = EntryRecord.from_json({"name": str(index), "device": "cuda", "library": f"code/{index}.so",
                                    "constants": {}, "outputs": {"type": "leaf"},
                                    "output_leaves": [{"kind": "tensor", "index": 0}],
                                    "cuda": cuda_meta([]).to_json(), **guards}, f"manifest.entries[{index}]")
    return CudaEntry(index, record, EntryGuards.of(record.guards), cuda_state)


def test_cuda_guard_refuses_cpu_tensor():
    g = _guards("cuda")
    x = torch.randn(2, 3)
    assert g.match((x,), {}) is None
    assert_facts(g.explain((x,), {}), "input 'x' (args[0])", "device", "expected cuda", "actual cpu")
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


def test_inputs_on_different_gpus_are_refused_before_anything_runs():
    entry = _cuda_entry(1, _guards_json("cuda", names=("x", "y")), None)
    with pytest.raises(aotpack.GuardError) as info:
        entry.run([FakeCudaTensor(0), FakeCudaTensor(1)])
    assert_facts(str(info.value), "different devices", "input 'x' (args[0]) on cuda:0", "input 'y' (args[1]) on cuda:1",
                 "t.to('cuda:N')")
    assert entry._runners == {}


def test_cuda_entry_without_tensor_inputs_on_a_host_without_cuda():
    state = types.SimpleNamespace(no_cuda="torch 9.9 is a CPU build")
    entry = _cuda_entry(0, {
        "inputs": {"type": "tuple", "children": [{"type": "tuple", "children": [{"type": "leaf"}]},
                                                 {"type": "dict", "keys": [], "children": []}]},
        "leaves": [{"kind": "value", "path": "args[0]", "name": "n", "type": "int", "value": 3}],
        "symbols": {}, "param_names": ["n"]}, state)
    assert entry.guards.match((3,), {}) == []
    with pytest.raises(aotpack.GuardError) as info:
        entry.run([])
    assert_facts(str(info.value), "without tensor inputs", "no usable CUDA device", "torch 9.9 is a CPU build")


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
    assert_facts(str(info.value), f"({torch.__version__}) is a CPU build", "CUDA entries", "CUDA build of torch",
                 "major.minor series")


def test_unavailable_reasons(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert platform.cuda_unavailable_reason() == f"torch {torch.__version__} is a CPU build"
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert_facts(platform.cuda_unavailable_reason(), f"torch {torch.__version__} sees no CUDA device", "driver",
                 "CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert platform.cuda_unavailable_reason() is None


