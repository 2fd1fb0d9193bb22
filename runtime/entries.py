"""An entry: one compiled specialization of the model, its guards, its native code and its outputs.

``entry_from_manifest`` checks an entry's record against the pack (guards, devices, outputs, constants)
and loads its native code: a CPU entry's library now, a CUDA entry's per GPU at its first call there.

An entry of a pack with state runs only for a session (``runtime/sessions.py``): its code writes the state
buffers in place through the pointers it was given, so each call binds the calling session's state first.
Such an entry keeps ``num_models`` containers of its code (a ``RunnerPool``, per device), each one call at
a time; a container still bound to the calling session from its last call there is not rebound.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable

import torch

from . import _torch, platform
from .archive import Archive
from .devices import CudaState, extract_library
from .errors import ArchiveError, GuardError
from .format import field_of
from .guards import EntryGuards, TensorGuard, check_spec, rebuild
from .platform import CudaMeta

RUNTIME_DEVICES = ("cpu", "cuda")


class RunnerPool:
    """Containers of one entry's code on one device, for calls that bind a session's state.

    A call takes a free container (or waits for one), binds the session's state buffers to it unless it is
    still bound to that session (same ``token``), runs and gives it back, so state is never shared between
    two sessions and a container is never rebound while it runs."""

    def __init__(self, runners: list, state_constants: dict[str, str]):
        self._state_constants = state_constants  # the code's constant name -> state buffer name
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for runner in runners:
            self._free.put([runner, None])

    def run(self, call: Callable[[Any], list], state: dict[str, torch.Tensor], token: Any) -> list:
        slot = self._free.get()
        try:
            runner, bound = slot
            if bound != token:
                slot[1] = None
                _torch.bind_constants(runner, {c: state[n] for c, n in self._state_constants.items()})
                slot[1] = token
            return call(runner)
        finally:
            self._free.put(slot)


class Entry:
    """One compiled specialization: its guards, its native code, and how to rebuild its outputs.

    ``state_constants`` (the code's constant name -> state buffer name) is empty for a pack without state.
    """

    device = "cpu"

    def __init__(self, index: int, meta: dict, guards: EntryGuards, runner: Any, outputs: dict,
                 output_leaves: list, state_constants: dict[str, str] | None = None,
                 pool: RunnerPool | None = None):
        self.index = index
        self.name = str(meta.get("name", index))
        self.meta = meta
        self.guards = guards
        self.state_constants = dict(state_constants or {})
        self._runner = runner
        self._pool = pool
        self._outputs = outputs
        self._output_leaves = output_leaves
        self._simple_output = all(o["kind"] == "tensor" for o in output_leaves) and \
            [o["index"] for o in output_leaves] == list(range(len(output_leaves)))

    def label(self) -> str:
        """The entry's name and guard summary, as GuardError messages show it."""
        return f"{self.name} ({self.guards.label()})"

    def run(self, tensors: list[torch.Tensor]) -> Any:
        return self._outputs_from(_torch.run(self._runner, tensors))

    def run_stateful(self, tensors: list[torch.Tensor], state: dict[str, torch.Tensor], token: Any) -> Any:
        """Run with ``state`` (state buffer name -> the session's tensor on the inputs' device) bound."""
        return self._outputs_from(self._pool.run(lambda runner: _torch.run(runner, tensors), state, token))

    def _outputs_from(self, flat: list) -> Any:
        """The model's output structure from the native code's flat output tensors."""
        if not self._simple_output:
            flat = [flat[o["index"]] if o["kind"] == "tensor" else o["value"] for o in self._output_leaves]
        if self._outputs["type"] == "leaf":
            return flat[0]
        return rebuild(self._outputs, flat, [0])


class CudaEntry(Entry):
    """A CUDA entry: its guards accept CUDA tensors on any device, and it runs on the device of its inputs.

    Its native code is loaded per device index when a call first selects it there (``runner(index)``):
    the library needs libcuda.so.1 and a GPU it has kernels for, which the load of a pack cannot assume.
    """

    device = "cuda"

    def __init__(self, index: int, meta: dict, guards: EntryGuards, outputs: dict, output_leaves: list,
                 cuda: CudaMeta, state: CudaState, state_constants: dict[str, str] | None = None):
        super().__init__(index, meta, guards, None, outputs, output_leaves, state_constants)
        self.cuda = cuda
        self._state = state
        self._library_blob: str = meta["library"]
        self._constants: dict[str, str] = meta["constants"]
        self._runners: dict[int, Any] = {}  # device index -> runner, or RunnerPool for a pack with state
        self._lock = threading.Lock()
        self._files: tuple[str, str] | None = None  # (library path, kernel folder) once extracted
        self._tensor_names = [f"input {g.name!r} ({g.path})" for g in guards.leaves if isinstance(g, TensorGuard)]

    def device_index(self, tensors: list[torch.Tensor]) -> int:
        """The GPU this call runs on: its inputs' (all on one), else the current one."""
        if tensors:
            index = tensors[0].get_device()
            for t in tensors:
                if t.get_device() != index:
                    self._refuse_mixed(tensors)
            return index
        if self._state.no_cuda is not None:
            raise GuardError([(self.label(), "a CUDA entry without tensor inputs runs on the current CUDA device, "
                               f"and this host has no usable CUDA device ({self._state.no_cuda})")])
        return torch.cuda.current_device()  # no tensor inputs: as an eager op creating tensors would

    def run(self, tensors: list[torch.Tensor]) -> Any:
        index = self.device_index(tensors)
        runner = self._runners.get(index)
        if runner is None:
            runner = self.runner(index)
        return self._outputs_from(_torch.cuda_run(runner, tensors, index))

    def run_stateful(self, tensors: list[torch.Tensor], state: dict[str, torch.Tensor], token: Any) -> Any:
        index = self.device_index(tensors)
        pool = self._runners.get(index)
        if pool is None:
            pool = self.runner(index)
        return self._outputs_from(pool.run(lambda runner: _torch.cuda_run(runner, tensors, index), state, token))

    def _refuse_mixed(self, tensors: list[torch.Tensor]) -> None:
        placed = ", ".join(f"{who} on {t.device}" for who, t in zip(self._tensor_names, tensors))
        raise GuardError([(f"{self.name} ({self.guards.label()})",
                           f"the CUDA inputs are on different devices: {placed}; a CUDA entry runs on one "
                           "device: move them to one (t.to('cuda:N'))")])

    def runner(self, index: int) -> Any:
        """The entry's native code on CUDA device ``index``, loaded on first use (thread-safe).

        Before anything is loaded, the GPU's compute capability is checked against every kernel's
        architectures: a GPU the pack has no code for is an ArchiveError naming both.
        """
        with self._lock:
            runner = self._runners.get(index)
            if runner is not None:
                return runner
            st = self._state
            try:
                props = torch.cuda.get_device_properties(index)
                platform.check_cuda_device(self.cuda, index, props.name, (props.major, props.minor),
                                           f"CUDA entry {self.name}",
                                           getattr(props, "shared_memory_per_block_optin", None))
            except ArchiveError as e:
                raise ArchiveError(e.reason, path=st.path) from None
            if self._files is None:
                self._files = st.extract(self)
            library, kernel_dir = self._files
            where = f"manifest.entries[{self.index}]"

            def load_one(num_models: int) -> Any:
                try:
                    return _torch.cuda_runner(library, num_models, f"cuda:{index}", kernel_dir)
                except RuntimeError as e:  # not a shared object, not a model container, or a CUDA error
                    raise ArchiveError(f"{where}: blob {self._library_blob!r} cannot be loaded on cuda:{index} "
                                       f"({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                                       path=st.path) from None

            weights = st.device_weights(index) if len(self._constants) > len(self.state_constants) else {}
            runner = _load_code(load_one, st.num_models, self._constants, weights, self.state_constants,
                                where, st.path)
            self._runners[index] = runner
            return runner


def entry_from_manifest(i: int, archive: Archive, weights: dict[str, torch.Tensor], cache_root: str,
                        num_models: int, cuda_state: CudaState | None, blob_sizes: dict[str, int]) -> Entry:
    """Check entry ``i`` of the manifest and load it (a CUDA entry's code only where this host can run it,
    and then only at its first call on a GPU)."""
    path = archive.path
    meta = archive.manifest.entries[i]
    m = archive.manifest
    where = f"manifest.entries[{i}]"
    guards = EntryGuards.from_json(meta, where)
    device = field_of(meta, "device", str, where)
    if device not in RUNTIME_DEVICES:
        raise ArchiveError(f"{where} is a {device} entry; this runtime serves {', '.join(RUNTIME_DEVICES)}",
                           path=path)
    for j, leaf in enumerate(guards.leaves):
        # The native code reads its inputs on the entry's device: a guard that admits another device
        # would hand it pointers it cannot use.
        if isinstance(leaf, TensorGuard) and leaf.device != device:
            raise ArchiveError(f"{where}.leaves[{j}].device is {leaf.device!r}, but the entry is a {device} "
                               f"entry (its tensor guards must say {device!r})", path=path)
    outputs = field_of(meta, "outputs", dict, where)
    n_out = check_spec(outputs, f"{where}.outputs")
    output_leaves = field_of(meta, "output_leaves", list, where)
    if len(output_leaves) != n_out:
        raise ArchiveError(f"{where} has {len(output_leaves)} output leaves for {n_out} in its structure",
                           path=path)
    n_tensors = 0
    for j, o in enumerate(output_leaves):
        kind = field_of(o, "kind", str, f"{where}.output_leaves[{j}]")
        if kind == "tensor":
            # The compiled code returns its tensors in this order; anything else would pick the wrong one.
            if field_of(o, "index", int, f"{where}.output_leaves[{j}]") != n_tensors:
                raise ArchiveError(f"{where}.output_leaves[{j}].index is {o['index']}, expected {n_tensors}",
                                   path=path)
            n_tensors += 1
        elif kind != "value" or "value" not in o:
            raise ArchiveError(f"{where}.output_leaves[{j}] must be a tensor index or a value", path=path)
    constants = field_of(meta, "constants", dict, where)
    state_names = {r.name for r in m.state}
    for cname, wname in constants.items():
        if not isinstance(wname, str) or (wname not in weights and wname not in state_names):
            raise ArchiveError(f"{where} constant {cname!r} refers to weight {wname!r}, which the pack "
                               "lacks", path=path)
    state_constants = {c: n for c, n in constants.items() if n in state_names}
    library_blob = field_of(meta, "library", str, where)
    if device == "cuda":
        try:
            cuda = CudaMeta.from_json(field_of(meta, "cuda", dict, where), f"{where}.cuda", blob_sizes)
            m.blob(library_blob)
        except ArchiveError as e:
            raise ArchiveError(e.reason, path=path) from None
        entry = CudaEntry(i, meta, guards, outputs, output_leaves, cuda, cuda_state, state_constants)
        if cuda_state.no_cuda is None:  # this host can run it: extract and hash-check its code now, fail at load
            entry._files = cuda_state.extract(entry)
        return entry
    library = extract_library(archive, library_blob, cache_root)

    def load_one(n: int) -> Any:
        try:
            return _torch.cpu_runner(library, n)
        except RuntimeError as e:  # not a shared object, or not a model container
            raise ArchiveError(f"{where}: blob {library_blob!r} is not loadable native code "
                               f"({str(e).splitlines()[0]})", path=path) from None

    runner = _load_code(load_one, num_models, constants, weights, state_constants, where, path)
    if state_constants:
        return Entry(i, meta, guards, None, outputs, output_leaves, state_constants, pool=runner)
    return Entry(i, meta, guards, runner, outputs, output_leaves)


def _load_code(load_one: Callable[[int], Any], num_models: int, constants: dict[str, str],
               weights: dict[str, torch.Tensor], state_constants: dict[str, str], where: str, path: str) -> Any:
    """An entry's code with its weights bound: one container of ``num_models`` models for an entry without
    state; for one with state, a ``RunnerPool`` of ``num_models`` containers (one model each: the models of
    one container share its constants, so two of them could not hold two sessions' state)."""
    runners = [load_one(1 if state_constants else num_models) for _ in range(num_models if state_constants else 1)]
    # The code knows the weight each of its constants came from: a manifest that says otherwise is wrong.
    if _torch.constant_fqns(runners[0]) != constants:
        raise ArchiveError(f"{where}.constants do not match the constants of its native code", path=path)
    bound = {c: weights[w] for c, w in constants.items() if c not in state_constants}
    for runner in runners:
        if state_constants:  # the state is bound per call (RunnerPool)
            _torch.bind_constants(runner, bound)
        elif bound:
            _torch.set_constants(runner, bound)
    return RunnerPool(runners, state_constants) if state_constants else runners[0]
