"""An entry: one compiled specialization of the model, its guards, its native code and its outputs.

An entry's record (``schema.EntryRecord``: guards, device, outputs, constants, blobs) was checked against
the pack when the manifest was read (``schema.Manifest.from_json``); ``entry_from_manifest`` builds the
entry's guard matcher from it and loads its native code: a CPU entry's library now, a CUDA entry's per GPU at
its first call there.

ATen ops that have no C shim run through AOTInductor's proxy executor, which libtorch's runner creates when
it finds the description of those calls (``extern_kernels``, JSON) beside the library under the same name
(``model.so`` and ``model.json``); the two are extracted into one folder of the code cache.

A CPU entry's constants listed in its ``folded_weights`` are computed from stored weights by their records'
steps (``fold_weight``: a batch norm folded into a convolution), and those listed in its ``packed_weights`` are
bound not to the plain weight but to that weight packed into oneDNN's layout for this host's CPU
(``pack_weight``); both at load, and again for new weights (``weight_constants``).

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
from typing import Any, Callable

import torch

from . import _torch, platform
from .archive import Archive
from .devices import Code, CudaState, extract_code
from .errors import ArchiveError, GuardError
from .guards import EntryGuards, TensorGuard, rebuild
from .schema import FOLD_BINARY, FOLD_UNARY, VALUE_TYPES, CudaMeta, EntryRecord, FoldRecord, PackedWeightRecord


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

    ``record`` is its checked manifest record; ``state_constants`` (the code's constant name -> state buffer
    name) is empty for a pack without state.
    """

    device = "cpu"

    def __init__(self, index: int, record: EntryRecord, guards: EntryGuards, runner: Any,
                 state_constants: dict[str, str] | None = None, pool: RunnerPool | None = None):
        self.index = index
        self.name = record.name
        self.record = record
        self.guards = guards
        self.state_constants = dict(state_constants or {})
        self._runner = runner
        self._pool = pool
        self._outputs = record.guards.outputs
        output_leaves = record.guards.output_leaves
        self._simple_output = all(o.kind == "tensor" for o in output_leaves) and \
            [o.index for o in output_leaves] == list(range(len(output_leaves)))
        # Per output leaf: (compiled output index or None for a constant, number type or None, constant).
        self._output_plan = [(o.index, VALUE_TYPES[o.type] if o.kind == "scalar" else None, o.value)
                             for o in output_leaves]
        # Shared by the calls of every entry of a package; a swap of the weights holds it alone.
        self.swap_lock: Any = contextlib.nullcontext()
        # The code's constants bound to a weight packed for oneDNN (the record's ``packed_weights``).
        self.packed_weights: dict[str, PackedWeightRecord] = dict(record.packed_weights)
        # The package's ``PackedForThreads`` where this entry has packed weights (set by the package).
        self.packing: PackedForThreads | None = None

    def weight_constants(self, weights: dict[str, torch.Tensor], shared: dict | None = None) -> dict[str, torch.Tensor]:
        """See ``weight_constants`` (the module function)."""
        return weight_constants(self.record, weights, self.state_constants, shared)

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

    def _follow_threads(self) -> None:
        """Repack this entry's packed weights (the package's, at once) if the calling thread count changed."""
        packing = self.packing
        if packing is not None and packing.threads != torch.get_num_threads():
            packing.repack()

    def run(self, tensors: list[torch.Tensor]) -> Any:
        self._follow_threads()
        with self.swap_lock:
            flat = _torch.run(self._runner, tensors)
        return self._outputs_from(flat)

    def run_stateful(self, tensors: list[torch.Tensor], state: dict[str, torch.Tensor], token: Any) -> Any:
        """Run with ``state`` (state buffer name -> the session's tensor on the inputs' device) bound. An entry
        whose code uses no state (a method of a stateful pack that neither reads nor writes it) just runs."""
        if not self.state_constants:
            return self.run(tensors)
        self._follow_threads()
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

    def __init__(self, index: int, record: EntryRecord, guards: EntryGuards, cuda_state: CudaState,
                 state_constants: dict[str, str] | None = None):
        super().__init__(index, record, guards, None, state_constants)
        self.cuda: CudaMeta = record.cuda
        self._cuda_state = cuda_state  # shared by the package's CUDA entries; not a session's state
        self._library_blob: str = record.library
        self._extern_blob: str | None = record.extern_kernels
        self._constants: dict[str, str] = record.constants
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
            runner = _load_code(load_one, st.num_models, self.record, weights, self.state_constants,
                                where, st.path)
            self._runners[index] = runner
            return runner


class PackedForThreads:
    """The thread count a package's packed weights (convolutions, linears) were packed for, and their repacking
    when a call runs with another one.

    oneDNN picks a convolution weight's packed layout for the thread count the packing runs with; a call on
    another thread count finds the weight in a layout its convolution does not expect and reorders it on every
    call (MobileNetV2 at 1 thread with weights packed for 2: 8x slower). So each call compares the calling
    thread's ``torch.get_num_threads()`` with the count the bound weights were packed for; on a change, the CPU
    entries' packed constants are made again for the new count (kept for up to ``KEEP`` counts, so threads that
    alternate rebind without packing again) and bound while no call runs (the package's swap lock)."""

    KEEP = 4

    def __init__(self, entries: list, weights: Callable[[], dict], swap_lock: Any, swapping: threading.Lock,
                 threads: int):
        self.entries = entries  # the CPU entries with packed weights
        self._weights = weights  # the package's current weights
        self._swap_lock = swap_lock
        self._lock = swapping  # the package's one-swap-at-a-time lock: no new weights arrive while this packs
        self.threads = threads
        self._bound: dict[int, list] = {}  # thread count -> each entry's constants, for the current weights

    def packed(self, threads: int, bound: list) -> None:
        """New weights were packed (and bound) for ``threads``: forget the constants of the old ones."""
        self._bound = {threads: bound}
        self.threads = threads

    def repack(self) -> None:
        threads = torch.get_num_threads()
        with self._lock:
            if threads == self.threads:
                return
            bound = self._bound.get(threads)
            if bound is None:
                weights, shared = self._weights(), {}
                bound = [entry.weight_constants(weights, shared) for entry in self.entries]
                if len(self._bound) >= self.KEEP:
                    self._bound.pop(next(iter(self._bound)))
                self._bound[threads] = bound
            with self._swap_lock.swap():
                for entry, constants in zip(self.entries, bound):
                    entry.bind_weights(self._weights(), {}, constants)
                self.threads = threads


def pack_weight(record: PackedWeightRecord, weight: torch.Tensor) -> torch.Tensor:
    """The tensor a constant of the code is bound to, computed from the weight it names by its packed-weight
    record: a convolution weight (``kind`` ``onednn_conv``) or a linear's weight (``onednn_linear``) in oneDNN's
    layout for this host, the kinds ``schema.PACKED_KINDS`` admits. A record oneDNN refuses (a convolution it
    cannot describe: sizes out of its range, a kernel larger than the padded input) is an ArchiveError, not a
    crash of the load."""
    try:
        if record.kind == "onednn_linear":
            return _torch.onednn_linear_weight(weight, record.rows)
        return _torch.onednn_conv_weight(weight, list(record.padding), list(record.stride), list(record.dilation),
                                         record.groups, list(record.input_size))
    except RuntimeError as e:
        raise ArchiveError(f"packed weight record {record.to_json()} for a {list(weight.shape)} weight: oneDNN "
                           f"cannot pack it on this host ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                           ) from None


def fold_weight(record: FoldRecord, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tensor a folded constant of the code is bound to: its record's steps run on the stored ``weights``
    (by name). The manifest's check (``FoldRecord.check_shapes``) followed every step's shape, so no step here
    allocates more than the weights it reads; a result of another shape or dtype is still an ArchiveError."""
    values: list[torch.Tensor] = []
    with torch.no_grad():
        for s in record.steps:
            args = [values[i] for i in s.inputs]
            if s.op == "weight":
                t = weights[s.name]
            elif s.op == "zeros":
                t = torch.zeros(s.shape, dtype=torch.float32)
            elif s.op == "unsqueeze":
                t = args[0].unsqueeze(s.dim)
            elif s.op == "reshape":
                t = args[0].reshape(s.shape)
            elif s.op == "transpose":
                t = args[0].t()
            elif s.op in FOLD_UNARY:
                t = getattr(torch, s.op)(args[0])
            elif s.op in FOLD_BINARY:
                t = getattr(torch, s.op)(args[0], args[1] if len(args) == 2 else s.value)
            else:  # schema.FOLD_OPS admits no other
                raise ArchiveError(f"folded weight step {s.op!r} is unknown to this reader")
            values.append(t)
    out = values[-1].contiguous()
    if tuple(out.shape) != record.shape or out.dtype != torch.float32:
        raise ArchiveError(f"folded weight record computes {out.dtype} {list(out.shape)}; it says float32 "
                           f"{list(record.shape)}")
    return out


def weight_constants(record: EntryRecord, weights: dict[str, torch.Tensor], state_constants: dict[str, str],
                     shared: dict | None = None) -> dict[str, torch.Tensor]:
    """The tensors an entry's code's weight constants (not its state) are bound to, from ``weights`` (by weight
    name): a stored weight as it is, a ``folded_weights`` constant computed from the weights its record reads
    (``fold_weight``), and a ``packed_weights`` constant then packed for oneDNN (``packed_constants``).
    ``shared``: a dict the caller keeps for one load or one swap of weights, across the entries, so that each
    fold and each packing is computed once."""
    done = {} if shared is None else shared
    bound = {}
    for c, w in record.constants.items():
        if c in state_constants:
            continue
        fold = record.folded_weights.get(c)
        if fold is None:
            bound[c] = weights[w]
            continue
        reads = tuple(weights[n] for n in fold.weight_names)
        key = ("fold", fold, tuple(id(t) for t in reads))
        if key not in done:
            done[key] = (reads, fold_weight(fold, weights))  # the weights are kept with it: their ids stay theirs
        bound[c] = done[key][1]
    return packed_constants(bound, record.packed_weights, done)


def packed_constants(bound: dict[str, torch.Tensor], packed: dict[str, PackedWeightRecord],
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
            done[key] = (bound[c], pack_weight(p, bound[c]))  # the weight is kept with it, so that its id stays its own
        out[c] = done[key][1]
    return out


def entry_from_manifest(i: int, archive: Archive, weights: dict[str, torch.Tensor], cache_root: str,
                        num_models: int, cuda_state: CudaState | None, shared: dict | None = None) -> Entry:
    """Load entry ``i`` of the (checked) manifest: its guard matcher and its code (a CUDA entry's code only
    where this host can run it, and then only at its first call on a GPU). ``shared``: see ``packed_constants``."""
    path = archive.path
    c = archive.manifest.entries[i]
    where = f"manifest.entries[{i}]"
    try:
        guards = EntryGuards.of(c.guards, where)
    except ArchiveError as e:
        raise ArchiveError(e.reason, path=path) from None
    state_names = {r.name for r in archive.manifest.state}
    state_constants = {k: n for k, n in c.constants.items() if n in state_names}
    if c.device == "cuda":
        entry = CudaEntry(i, c, guards, cuda_state, state_constants)
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
        runner = _load_code(load_one, num_models, c, weights, state_constants, where, path, shared)
    finally:
        library.close()  # loaded (the runner read the extern-kernel description at its construction)
    if state_constants:
        return Entry(i, c, guards, None, state_constants, pool=runner)
    return Entry(i, c, guards, runner)


def _bind(runner: Any, bound: dict[str, torch.Tensor]) -> None:
    """Point a container (or each of a ``RunnerPool``'s, leaving their state bound) at new weights."""
    if isinstance(runner, RunnerPool):
        for r in runner.runners if bound else ():
            _torch.bind_constants(r, bound)
    elif bound:
        _torch.set_constants(runner, bound)


def _load_code(load_one: Callable[[int], Any], num_models: int, record: EntryRecord,
               weights: dict[str, torch.Tensor], state_constants: dict[str, str], where: str, path: str,
               shared: dict | None = None) -> Any:
    """An entry's code with its weights bound: one container of ``num_models`` models for an entry without
    state; for one with state, a ``RunnerPool`` of ``num_models`` containers (one model each: the models of
    one container share its constants, so two of them could not hold two sessions' state)."""
    runners = [load_one(1 if state_constants else num_models) for _ in range(num_models if state_constants else 1)]
    # The code knows the weight each of its constants came from: a manifest that says otherwise is wrong.
    if _torch.constant_fqns(runners[0]) != record.constants:
        raise ArchiveError(f"{where}.constants do not match the constants of its native code", path=path)
    try:
        bound = weight_constants(record, weights, state_constants, shared)
    except ArchiveError as e:
        raise ArchiveError(f"{where}: {e.reason}", path=path) from None
    for runner in runners:
        if state_constants:  # the state is bound per call (RunnerPool)
            _torch.bind_constants(runner, bound)
        elif bound:
            _torch.set_constants(runner, bound)
    return RunnerPool(runners, state_constants) if state_constants else runners[0]
