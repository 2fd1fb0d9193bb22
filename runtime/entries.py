"""An entry: one compiled specialization of the model, its guards, its native code and its outputs.

``check_entry`` checks an entry's record against the pack (guards, devices, outputs, constants, blobs)
without loading anything; the writer runs it on every entry before it writes a pack. ``entry_from_manifest``
checks an entry the same way and loads its native code: a CPU entry's library now, a CUDA entry's per GPU at
its first call there.

ATen ops that have no C shim run through AOTInductor's proxy executor, which libtorch's runner creates when
it finds the description of those calls (``extern_kernels``, JSON) beside the library under the same name
(``model.so`` and ``model.json``); the two are extracted into one folder of the code cache.

A CPU entry's constants listed in its ``packed_weights`` are bound not to the stored weight but to that weight
packed into oneDNN's layout for this host's CPU (``PackedWeight``), computed at load and again for new weights.

An entry of a pack with state runs only for a session (``runtime/sessions.py``): its code writes the state
buffers in place through the pointers it was given, so each call binds the calling session's state first.
Such an entry keeps ``num_models`` containers of its code (a ``RunnerPool``, per device), each one call at
a time; a container still bound to the calling session from its last call there is not rebound.

May not: open files (``archive`` does) or decide which entry runs (``loader`` dispatches).
"""
from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import _torch, platform
from .archive import Archive
from .devices import Code, CudaState, extract_code
from .errors import ArchiveError, GuardError
from .format import DEVICES, Manifest, field_of
from .guards import VALUE_TYPES, EntryGuards, TensorGuard, check_spec, rebuild
from .platform import CudaMeta

# Output leaves that are Python numbers in eager: the compiled code returns a 0-d tensor, made a number here.
SCALAR_TYPES = ("int", "float", "bool")


class RunnerPool:
    """Containers of one entry's code on one device, for calls that bind a session's state.

    A call takes a free container (or waits for one), binds the session's state buffers to it unless it is
    still bound to that session (same ``token``), runs and gives it back, so state is never shared between
    two sessions and a container is never rebound while it runs."""

    def __init__(self, runners: list, state_constants: dict[str, str]):
        self.runners = list(runners)
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
        self.name = meta["name"]
        self.meta = meta
        self.guards = guards
        self.state_constants = dict(state_constants or {})
        self._runner = runner
        self._pool = pool
        self._outputs = outputs
        self._output_leaves = output_leaves
        self._simple_output = all(o["kind"] == "tensor" for o in output_leaves) and \
            [o["index"] for o in output_leaves] == list(range(len(output_leaves)))
        # Per output leaf: (compiled output index or None for a constant, number type or None, constant).
        self._output_plan = [(o.get("index"), VALUE_TYPES[o["type"]] if o["kind"] == "scalar" else None,
                              o.get("value")) for o in output_leaves]
        # Shared by the calls of every entry of a package; a swap of the weights holds it alone.
        self.swap_lock: Any = contextlib.nullcontext()
        # The code's constants bound to a weight packed for oneDNN (``packed_weights``, checked by check_entry).
        self.packed_weights: dict[str, PackedWeight] = {}

    def weight_constants(self, weights: dict[str, torch.Tensor], shared: dict | None = None) -> dict[str, torch.Tensor]:
        """The code's constants that are weights (not state), bound to ``weights`` (by weight name), those in
        ``packed_weights`` packed for oneDNN from them (``shared``: see ``packed_constants``)."""
        return packed_constants({c: weights[w] for c, w in self.meta["constants"].items()
                                 if c not in self.state_constants}, self.packed_weights, shared)

    def bind_weights(self, weights: dict[str, torch.Tensor], on_device: dict[int, dict[str, torch.Tensor]],
                     bound: dict[str, torch.Tensor] | None = None) -> None:
        """Point the code at new weights (no copy; the caller keeps them alive). Call it only while no call
        runs (under ``swap_lock.swap()``). ``on_device``: the weights on each GPU (CUDA entries); ``bound``:
        ``weight_constants(weights)``, computed beforehand (packing weights takes a while: calls need not
        wait for it)."""
        _bind(self._pool if self._pool is not None else self._runner,
              self.weight_constants(weights) if bound is None else bound)

    def label(self) -> str:
        """The entry's name and guard summary, as GuardError messages show it."""
        return f"{self.name} ({self.guards.label()})"

    def run(self, tensors: list[torch.Tensor]) -> Any:
        with self.swap_lock:
            flat = _torch.run(self._runner, tensors)
        return self._outputs_from(flat)

    def run_stateful(self, tensors: list[torch.Tensor], state: dict[str, torch.Tensor], token: Any) -> Any:
        """Run with ``state`` (state buffer name -> the session's tensor on the inputs' device) bound. An entry
        whose code uses no state (a method of a stateful pack that neither reads nor writes it) just runs."""
        if not self.state_constants:
            return self.run(tensors)
        with self.swap_lock:
            flat = self._pool.run(lambda runner: _torch.run(runner, tensors), state, token)
        return self._outputs_from(flat)

    def _outputs_from(self, flat: list) -> Any:
        """The model's output structure from the native code's flat output tensors."""
        if not self._simple_output:
            flat = [value if index is None else flat[index] if number is None else number(flat[index].item())
                    for index, number, value in self._output_plan]
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
                 cuda: CudaMeta, cuda_state: CudaState, state_constants: dict[str, str] | None = None):
        super().__init__(index, meta, guards, None, outputs, output_leaves, state_constants)
        self.cuda = cuda
        self._cuda_state = cuda_state  # shared by the package's CUDA entries; not a session's state
        self._library_blob: str = meta["library"]
        self._extern_blob: str | None = meta.get("extern_kernels")
        self._constants: dict[str, str] = meta["constants"]
        self._runners: dict[int, Any] = {}  # device index -> runner, or RunnerPool for a pack with state
        self._lock = threading.Lock()
        self._files: tuple[Code, str] | None = None  # (library, kernel folder) once extracted
        self._tensor_names = [f"input {g.name!r} ({g.path})" for g in guards.leaves if isinstance(g, TensorGuard)]

    def extract(self) -> tuple[Code, str]:
        """This entry's library and kernel folder in the code cache, extracted and hash-checked once (at
        load where this host can run CUDA, else at its first call on a GPU)."""
        if self._files is None:
            self._files = self._cuda_state.extract(self._library_blob, self._extern_blob, self.cuda)
        return self._files

    def device_index(self, tensors: list[torch.Tensor]) -> int:
        """The GPU this call runs on: its inputs' (all on one), else the current one."""
        if tensors:
            index = tensors[0].get_device()
            for t in tensors:
                if t.get_device() != index:
                    self._refuse_mixed(tensors)
            return index
        if self._cuda_state.no_cuda is not None:
            raise GuardError([(self.label(), "a CUDA entry without tensor inputs runs on the current CUDA device, "
                               f"and this host has no usable CUDA device ({self._cuda_state.no_cuda})")])
        return torch.cuda.current_device()  # no tensor inputs: as an eager op creating tensors would

    def run(self, tensors: list[torch.Tensor]) -> Any:
        index = self.device_index(tensors)
        with self.swap_lock:
            runner = self._runners.get(index)
            if runner is None:
                runner = self.runner(index)
            flat = _torch.cuda_run(runner, tensors, index)
        return self._outputs_from(flat)

    def run_stateful(self, tensors: list[torch.Tensor], state: dict[str, torch.Tensor], token: Any) -> Any:
        if not self.state_constants:
            return self.run(tensors)
        index = self.device_index(tensors)
        with self.swap_lock:
            pool = self._runners.get(index)
            if pool is None:
                pool = self.runner(index)
            flat = pool.run(lambda runner: _torch.cuda_run(runner, tensors, index), state, token)
        return self._outputs_from(flat)

    def bind_weights(self, weights: dict[str, torch.Tensor], on_device: dict[int, dict[str, torch.Tensor]],
                     bound: dict[str, torch.Tensor] | None = None) -> None:
        """Point the code loaded on each GPU at that GPU's copy of the new weights (``on_device``)."""
        for index, runner in self._runners.items():
            _bind(runner, self.weight_constants(on_device[index]))

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
            st = self._cuda_state
            try:
                props = torch.cuda.get_device_properties(index)
                platform.check_cuda_device(self.cuda, index, props.name, (props.major, props.minor),
                                           f"CUDA entry {self.name}",
                                           getattr(props, "shared_memory_per_block_optin", None))
            except ArchiveError as e:
                raise ArchiveError(e.reason, path=st.path) from None
            library, kernel_dir = self.extract()
            where = f"manifest.entries[{self.index}]"

            def load_one(num_models: int) -> Any:
                try:
                    return _torch.cuda_runner(library.path, num_models, f"cuda:{index}", kernel_dir)
                except RuntimeError as e:  # not a shared object, not a model container, or a CUDA error
                    raise ArchiveError(f"{where}: blob {self._library_blob!r} cannot be loaded on cuda:{index} "
                                       f"({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                                       path=st.path) from None

            weights = st.device_weights(index) if len(self._constants) > len(self.state_constants) else {}
            runner = _load_code(load_one, st.num_models, self._constants, weights, self.state_constants,
                                where, st.path)
            self._runners[index] = runner
            return runner


@dataclass(frozen=True)
class CheckedEntry:
    """An entry's record, checked against its pack (``check_entry``)."""

    guards: EntryGuards
    device: str
    outputs: dict
    output_leaves: list
    constants: dict
    library: str  # blob name
    extern_kernels: str | None  # blob name of the proxy executor's description, if the code needs one
    cuda: CudaMeta | None
    state_constants: dict  # the code's constant name -> state buffer name (empty without state)
    packed_weights: dict  # the code's constant name -> PackedWeight (empty when the entry has none)


# The kinds of ``packed_weights`` records this reader computes.
PACKED_KINDS = ("onednn_conv",)


@dataclass(frozen=True)
class PackedWeight:
    """How to compute, at load, the tensor a constant of the code is bound to from the weight it names: a
    convolution weight in oneDNN's layout for this host (``kind`` ``onednn_conv``), for the convolution's
    padding, stride, dilation, groups and input size."""

    padding: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    input_size: tuple[int, ...]

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        return _torch.onednn_conv_weight(weight, list(self.padding), list(self.stride), list(self.dilation),
                                         self.groups, list(self.input_size))


def packed_constants(bound: dict[str, torch.Tensor], packed: dict[str, PackedWeight],
                     shared: dict | None = None) -> dict[str, torch.Tensor]:
    """``bound`` (the code's constant name -> weight) with each constant of ``packed`` bound to its weight packed
    for this host instead. A weight is packed once per record: in ``shared`` (a dict the caller keeps for one
    load or one swap of weights, across the entries) or else within this call."""
    if not packed:
        return bound
    out, done = dict(bound), ({} if shared is None else shared)
    for c, p in packed.items():
        key = (id(bound[c]), p)
        if key not in done:
            done[key] = (bound[c], p.pack(bound[c]))  # the weight is kept with it, so that its id stays its own
        out[c] = done[key][1]
    return out


def _packed_weights(meta: dict, where: str, device: str, constants: dict, state_constants: dict,
                    weights: dict) -> dict[str, PackedWeight]:
    """The entry's ``packed_weights``, checked against its constants and the weights' records."""
    if "packed_weights" not in meta:
        return {}
    where = f"{where}.packed_weights"
    records = field_of(meta, "packed_weights", dict, where.rsplit(".", 1)[0])
    if device != "cpu":
        raise ArchiveError(f"{where} is on a {device} entry; only CPU entries have packed weights")
    out = {}
    for cname, r in records.items():
        rw = f"{where}[{cname!r}]"
        if cname not in constants or cname in state_constants:
            raise ArchiveError(f"{rw} names a constant that is not one of the entry's weight constants")
        if not isinstance(r, dict):
            raise ArchiveError(f"{rw} must be a JSON object")
        kind = field_of(r, "kind", str, rw)
        if kind not in PACKED_KINDS:
            raise ArchiveError(f"{rw}.kind is {kind!r}; this reader knows {', '.join(PACKED_KINDS)}")

        def ints(key: str, n: int, low: int) -> tuple[int, ...]:
            v = field_of(r, key, list, rw)
            if len(v) != n or not all(type(x) is int and x >= low for x in v):
                raise ArchiveError(f"{rw}.{key} is {v!r}; expected {n} integers of at least {low}")
            return tuple(v)

        groups = field_of(r, "groups", int, rw)
        p = PackedWeight(ints("padding", 2, 0), ints("stride", 2, 1), ints("dilation", 2, 1), groups,
                         ints("input_size", 4, 1))
        w = weights.get(constants[cname])
        shape = tuple(getattr(w, "shape", ()) or ())
        if getattr(w, "dtype", None) != "float32" or len(shape) != 4 or groups < 1 \
                or shape[0] % groups or shape[1] * groups != p.input_size[1]:
            raise ArchiveError(f"{rw} packs weight {constants[cname]!r} ({getattr(w, 'dtype', None)} "
                               f"{list(shape)}) for a convolution of {groups} groups on an input of "
                               f"{list(p.input_size)}; expected a float32 weight [out, in/groups, h, w] that fits it")
        out[cname] = p
    return out


def check_entry(i: int, m: Manifest, weight_names: set[str], blob_sizes: dict[str, int]) -> CheckedEntry:
    """Check entry ``i`` of the manifest: guards, device, outputs, constants and blobs. Loads nothing;
    raises ArchiveError (without a path) on the first problem."""
    meta = m.entries[i]
    where = f"manifest.entries[{i}]"
    field_of(meta, "name", str, where)
    guards = EntryGuards.from_json(meta, where)
    if "grad_mode" in meta:
        field_of(meta, "grad_mode", bool, where)
    for key in ("sources", "kernels"):
        if key in meta and not all(isinstance(v, str) for v in field_of(meta, key, list, where)):
            raise ArchiveError(f"{where}.{key} must be a list of strings")
    device = field_of(meta, "device", str, where)
    if device not in DEVICES:
        raise ArchiveError(f"{where} is a {device} entry; this runtime serves {', '.join(DEVICES)}")
    for j, leaf in enumerate(guards.leaves):
        # The native code reads its inputs on the entry's device: a guard that admits another device
        # would hand it pointers it cannot use.
        if isinstance(leaf, TensorGuard) and leaf.device != device:
            raise ArchiveError(f"{where}.leaves[{j}].device is {leaf.device!r}, but the entry is a {device} "
                               f"entry (its tensor guards must say {device!r})")
    outputs = field_of(meta, "outputs", dict, where)
    n_out = check_spec(outputs, f"{where}.outputs")
    output_leaves = field_of(meta, "output_leaves", list, where)
    if len(output_leaves) != n_out:
        raise ArchiveError(f"{where} has {len(output_leaves)} output leaves for {n_out} in its structure")
    n_returned = 0
    for j, o in enumerate(output_leaves):
        ow = f"{where}.output_leaves[{j}]"
        kind = field_of(o, "kind", str, ow)
        if kind in ("tensor", "scalar"):
            # The compiled code returns its outputs in this order; anything else would pick the wrong one.
            if field_of(o, "index", int, ow) != n_returned:
                raise ArchiveError(f"{ow}.index is {o['index']}, expected {n_returned}")
            if kind == "scalar" and field_of(o, "type", str, ow) not in SCALAR_TYPES:
                raise ArchiveError(f"{ow}.type is {o['type']!r}; this reader knows {', '.join(SCALAR_TYPES)}")
            n_returned += 1
        elif kind != "value" or "value" not in o:
            raise ArchiveError(f"{ow} must be a tensor or scalar index, or a value")
    constants = field_of(meta, "constants", dict, where)
    state_names = {r.name for r in m.state}
    for cname, wname in constants.items():
        if not isinstance(wname, str) or (wname not in weight_names and wname not in state_names):
            raise ArchiveError(f"{where} constant {cname!r} refers to weight {wname!r}, which the pack lacks")
    state_constants = {c: n for c, n in constants.items() if n in state_names}
    library = field_of(meta, "library", str, where)
    m.blob(library)
    extern = field_of(meta, "extern_kernels", str, where) if "extern_kernels" in meta else None
    if extern is not None:
        m.blob(extern)
    cuda = CudaMeta.from_json(field_of(meta, "cuda", dict, where), f"{where}.cuda", blob_sizes) \
        if device == "cuda" else None
    packed = _packed_weights(meta, where, device, constants, state_constants, {w.name: w for w in m.weights})
    return CheckedEntry(guards, device, outputs, output_leaves, constants, library, extern, cuda, state_constants,
                        packed)


def entry_from_manifest(i: int, archive: Archive, weights: dict[str, torch.Tensor], cache_root: str,
                        num_models: int, cuda_state: CudaState | None, blob_sizes: dict[str, int],
                        shared: dict | None = None) -> Entry:
    """Check entry ``i`` of the manifest and load it (a CUDA entry's code only where this host can run it,
    and then only at its first call on a GPU)."""
    path = archive.path
    meta = archive.manifest.entries[i]
    where = f"manifest.entries[{i}]"
    try:
        c = check_entry(i, archive.manifest, set(weights), blob_sizes)
    except ArchiveError as e:
        raise ArchiveError(e.reason, path=path) from None
    if c.device == "cuda":
        entry = CudaEntry(i, meta, c.guards, c.outputs, c.output_leaves, c.cuda, cuda_state, c.state_constants)
        if cuda_state.no_cuda is None:  # this host can run it: extract and hash-check its code now, fail at load
            entry.extract()
        return entry
    library = extract_code(archive, c.library, c.extern_kernels, cache_root)

    def load_one(n: int) -> Any:
        try:
            return _torch.cpu_runner(library.path, n)
        except RuntimeError as e:  # not a shared object, not a model container, or a proxy executor it refuses
            raise ArchiveError(f"{where}: blob {c.library!r} is not loadable native code "
                               f"({str(e).splitlines()[0]})", path=path) from None

    try:
        runner = _load_code(load_one, num_models, c.constants, weights, c.state_constants, where, path,
                            c.packed_weights, shared)
    finally:
        library.close()  # loaded (the runner read the extern-kernel description at its construction)
    if c.state_constants:
        entry = Entry(i, meta, c.guards, None, c.outputs, c.output_leaves, c.state_constants, pool=runner)
    else:
        entry = Entry(i, meta, c.guards, runner, c.outputs, c.output_leaves)
    entry.packed_weights = c.packed_weights
    return entry


def _bind(runner: Any, bound: dict[str, torch.Tensor]) -> None:
    """Point a container (or each of a ``RunnerPool``'s, leaving their state bound) at new weights."""
    if isinstance(runner, RunnerPool):
        for r in runner.runners if bound else ():
            _torch.bind_constants(r, bound)
    elif bound:
        _torch.set_constants(runner, bound)


def _load_code(load_one: Callable[[int], Any], num_models: int, constants: dict[str, str],
               weights: dict[str, torch.Tensor], state_constants: dict[str, str], where: str, path: str,
               packed: dict[str, PackedWeight] | None = None, shared: dict | None = None) -> Any:
    """An entry's code with its weights bound: one container of ``num_models`` models for an entry without
    state; for one with state, a ``RunnerPool`` of ``num_models`` containers (one model each: the models of
    one container share its constants, so two of them could not hold two sessions' state)."""
    runners = [load_one(1 if state_constants else num_models) for _ in range(num_models if state_constants else 1)]
    # The code knows the weight each of its constants came from: a manifest that says otherwise is wrong.
    if _torch.constant_fqns(runners[0]) != constants:
        raise ArchiveError(f"{where}.constants do not match the constants of its native code", path=path)
    bound = packed_constants({c: weights[w] for c, w in constants.items() if c not in state_constants}, packed or {},
                             shared)
    for runner in runners:
        if state_constants:  # the state is bound per call (RunnerPool)
            _torch.bind_constants(runner, bound)
        elif bound:
            _torch.set_constants(runner, bound)
    return RunnerPool(runners, state_constants) if state_constants else runners[0]
