"""``load(path) -> Package``: check the archive, map its code, and call it behind its guards.

Loading runs no compiler and no tracer: the archive is checked (header, manifest, layout), the host is
checked (CPU instruction set, torch series), the native code is hash-checked and put in the extraction cache,
``dlopen``-ed through libtorch's model-container runner, and pointed at the pack's weights.

CUDA entries are checked at load like CPU entries, but their native code needs libcuda.so.1, so it is
loaded only when a call first selects the entry on a given GPU: after the GPU's architecture is checked
against the entry's kernels, with the kernels extracted into one cache folder and the weights copied once
to that GPU. On a host without CUDA their code is never loaded, and the CPU entries serve as usual.
"""
from __future__ import annotations

import math
import os
import threading
import time
import warnings
import weakref
from typing import Any

import torch

from . import _torch, cache, platform
from . import signature as _signature
from .archive import Archive
from .errors import AotpackWarning, ArchiveError, GuardError
from .format import DTYPE_SIZES, field_of
from .guards import EntryGuards, TensorGuard, _DTYPE_BY_NAME, check_spec, rebuild
from .platform import CudaMeta, _union

_RUNTIME_DEVICES = ("cpu", "cuda")


def tensor_from_bytes(data: bytes | bytearray | memoryview, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor over ``data`` (little-endian, contiguous); no copy for a bytearray or writable view."""
    tdtype = _DTYPE_BY_NAME[dtype]
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=tdtype)
    buf = data if isinstance(data, (bytearray, memoryview)) else bytearray(data)
    return torch.frombuffer(buf, dtype=torch.uint8).view(tdtype).reshape(shape)


# Weights already loaded in this process, by file identity and content hash: a second load of the same,
# unchanged pack shares them instead of reading them again. Another file (a copy, a rebuilt or a corrupt
# pack) is read and checked anew. Entries go when no Package uses them.
_loaded_weights: "weakref.WeakValueDictionary[tuple, torch.Tensor]" = weakref.WeakValueDictionary()
_loaded_lock = threading.Lock()


def _weight(archive: Archive, identity: tuple, w) -> torch.Tensor:
    key = (*identity, archive.manifest.blob(w.blob).sha256, w.dtype, w.shape)
    with _loaded_lock:
        t = _loaded_weights.get(key)
        if t is None:
            t = tensor_from_bytes(archive.map_blob(w.blob), w.dtype, w.shape)
            _loaded_weights[key] = t
    return t


class Entry:
    """One compiled specialization: its guards, its native code, and how to rebuild its outputs."""

    device = "cpu"

    def __init__(self, index: int, meta: dict, guards: EntryGuards, runner: Any, outputs: dict,
                 output_leaves: list):
        self.index = index
        self.name = str(meta.get("name", index))
        self.meta = meta
        self.guards = guards
        self._runner = runner
        self._outputs = outputs
        self._output_leaves = output_leaves
        self._simple_output = all(o["kind"] == "tensor" for o in output_leaves) and \
            [o["index"] for o in output_leaves] == list(range(len(output_leaves)))

    def run(self, tensors: list[torch.Tensor]) -> Any:
        return self._outputs_from(_torch.run(self._runner, tensors))

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
                 cuda: CudaMeta, state: "_CudaState"):
        super().__init__(index, meta, guards, None, outputs, output_leaves)
        self.cuda = cuda
        self._state = state
        self._library_blob: str = meta["library"]
        self._constants: dict[str, str] = meta["constants"]
        self._runners: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._files: tuple[str, str] | None = None  # (library path, kernel folder) once extracted
        self._tensor_names = [f"input {g.name!r} ({g.path})" for g in guards.leaves if isinstance(g, TensorGuard)]

    def run(self, tensors: list[torch.Tensor]) -> Any:
        if tensors:
            index = tensors[0].get_device()
            for t in tensors:
                if t.get_device() != index:
                    self._refuse_mixed(tensors)
        elif self._state.no_cuda is not None:
            raise GuardError([(f"{self.name} ({self.guards.label()})",
                               "a CUDA entry without tensor inputs runs on the current CUDA device, and this host "
                               f"has no usable CUDA device ({self._state.no_cuda})")])
        else:  # no tensor inputs: the current device, as an eager op creating tensors would use
            index = torch.cuda.current_device()
        runner = self._runners.get(index)
        if runner is None:
            runner = self.runner(index)
        return self._outputs_from(_torch.cuda_run(runner, tensors, index))

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
            try:
                runner = _torch.cuda_runner(library, st.num_models, f"cuda:{index}", kernel_dir)
            except RuntimeError as e:  # not a shared object, not a model container, or a CUDA error
                raise ArchiveError(f"{where}: blob {self._library_blob!r} cannot be loaded on cuda:{index} "
                                   f"({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                                   path=st.path) from None
            if _torch.constant_fqns(runner) != self._constants:
                raise ArchiveError(f"{where}.constants do not match the constants of its native code",
                                   path=st.path)
            if self._constants:
                weights = st.device_weights(index)
                _torch.set_constants(runner, {c: weights[w] for c, w in self._constants.items()})
            self._runners[index] = runner
            return runner


def _copy_to_cuda(t: torch.Tensor, index: int) -> torch.Tensor:
    """A copy of a host tensor on CUDA device ``index`` (synchronous: it is complete when this returns)."""
    return t.to(torch.device("cuda", index))


class _CudaState:
    """What the CUDA entries of one package share: where to extract their code, and the pack's weights
    copied once per device index (the compiled code reads its constants on its own device)."""

    def __init__(self, archive: Archive, cache_root: str, num_models: int, weights: dict[str, torch.Tensor],
                 needed: set[str], no_cuda: str | None):
        self.path = archive.path
        self.no_cuda = no_cuda  # why this host cannot run CUDA code, or None
        self.archive = archive
        self.cache_root = cache_root
        self.num_models = num_models
        self._weights = weights
        self._needed = sorted(needed)
        self._by_device: dict[int, dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def device_weights(self, index: int) -> dict[str, torch.Tensor]:
        with self._lock:
            on_device = self._by_device.get(index)
            if on_device is None:
                on_device = {name: _copy_to_cuda(self._weights[name], index) for name in self._needed}
                self._by_device[index] = on_device
            return on_device

    def extract(self, entry: CudaEntry) -> tuple[str, str]:
        """The entry's library and kernel folder in the extraction cache, each hash-checked."""
        library = _extract(self.archive, entry._library_blob, self.cache_root)
        return library, _extract_kernels(self.archive, entry.cuda, self.cache_root)


class Package:
    """A loaded pack. Call it like the model: ``pkg(x)``, ``pkg(x, mask=m)``.

    Before every call the entries' guards are checked in order (the order ``aotpack inspect`` shows);
    the first entry that accepts the input runs. If none does, :class:`GuardError` says, per entry, the
    first guard that failed, and no native code has run.

    Calls from several threads are safe. Each entry owns ``num_models`` copies of the compiled model's
    state; a call takes a free copy or waits for one, so with the default of one copy, calls to the same
    entry run one at a time (each already uses every core through OpenMP).

    A CUDA entry accepts CUDA tensors on any device and runs on theirs, on the caller's current stream
    there. ``weights`` are the pack's weights in host memory; CUDA entries use copies of them on each GPU.
    """

    def __init__(self, archive: Archive, entries: list[Entry], weights: dict[str, torch.Tensor],
                 load_seconds: float, *, guard_note: str | None = None, cuda_state: _CudaState | None = None):
        self.path = archive.path
        self.manifest = archive.manifest
        self.entries = entries
        self.weights = weights
        self.load_seconds = load_seconds
        self._archive = archive
        self._example = None
        self._guard_note = guard_note
        self._cuda_state = cuda_state

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        for entry in self.entries:
            tensors = entry.guards.match(args, kwargs)
            if tensors is not None:
                return entry.run(tensors)
        raise GuardError([(f"{e.name} ({e.guards.label()})", e.guards.explain(args, kwargs) or "guards failed")
                          for e in self.entries], note=self._guard_note)

    def select(self, *args: Any, **kwargs: Any) -> Entry | None:
        """The entry that would run for this input, or None (runs nothing)."""
        for entry in self.entries:
            if entry.guards.match(args, kwargs) is not None:
                return entry
        return None

    @property
    def producer(self) -> dict:
        return self.manifest.producer

    def example_inputs(self) -> tuple[tuple, dict]:
        """The example ``(args, kwargs)`` the pack was built with (stored in the pack)."""
        ex = self.manifest.example
        if ex is None:
            raise ArchiveError("this pack stores no example inputs", path=self.path)
        inputs = field_of(ex, "inputs", dict, "manifest.example")
        n = check_spec(inputs, "manifest.example.inputs")
        if inputs["type"] != "tuple" or [c["type"] for c in inputs["children"]] != ["tuple", "dict"]:
            raise ArchiveError("manifest.example.inputs must be a tuple of (args tuple, kwargs dict)", path=self.path)
        leaves_json = field_of(ex, "leaves", list, "manifest.example")
        if len(leaves_json) != n:
            raise ArchiveError("manifest.example has a leaf count that does not match its structure",
                               path=self.path)
        leaves = []
        for i, leaf in enumerate(leaves_json):
            where = f"manifest.example.leaves[{i}]"
            if field_of(leaf, "kind", str, where) == "value":
                leaves.append(leaf.get("value"))
                continue
            dtype = field_of(leaf, "dtype", str, where)
            if dtype not in _DTYPE_BY_NAME:
                raise ArchiveError(f"{where}.dtype {dtype!r} is unknown", path=self.path)
            shape = tuple(field_of(leaf, "shape", list, where))
            strides = tuple(field_of(leaf, "strides", list, where))
            if len(strides) != len(shape) or not all(type(s) is int and 0 <= s < 2**48 for s in shape + strides):
                raise ArchiveError(f"{where}: shape and strides must be non-negative integers, one per dim",
                                   path=self.path)
            blob = self._archive.read_blob(field_of(leaf, "blob", str, where))
            if len(blob) != math.prod(shape) * DTYPE_SIZES[dtype]:
                raise ArchiveError(f"{where} is {dtype}{list(shape)} but its blob holds {len(blob)} bytes",
                                   path=self.path)
            t = tensor_from_bytes(blob, dtype, shape)
            span = 1 + sum((n - 1) * s for n, s in zip(shape, strides)) if t.numel() else 0
            if span >= 2**48:
                raise ArchiveError(f"{where}.strides {list(strides)} span {span} elements", path=self.path)
            try:
                storage = torch.empty(span, dtype=t.dtype)
            except RuntimeError:  # more memory than this host can allocate
                raise ArchiveError(f"{where}.strides {list(strides)} span {span} elements", path=self.path) from None
            # Each element goes to its offset through an index, not a strided copy: the strides of an expanded
            # input overlap.
            offsets = torch.zeros((), dtype=torch.int64)
            for n, s in zip(shape, strides):
                offsets = offsets[..., None] + torch.arange(n) * s
            storage[offsets.reshape(-1)] = t.reshape(-1)
            leaves.append(storage.as_strided(shape, strides))
        args, kwargs = rebuild(inputs, leaves, [0])
        return tuple(args), dict(kwargs)

    def __repr__(self) -> str:
        return f"<aotpack.Package {self.path!r}: {len(self.entries)} entr{'y' if len(self.entries) == 1 else 'ies'}>"




def load(path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
         expected_sha256: str | None = None, num_models: int = 1, signature: str | os.PathLike | None = None,
         public_key: str | os.PathLike | bytes | None = None) -> Package:
    """Load a pack for serving. Raises ``ArchiveError`` if the file or this host cannot serve it.

    ``expected_sha256`` pins the exact file (hex sha256 of the whole pack); ``cache_dir`` is where native
    code is extracted (default: ``$AOTPACK_CACHE_DIR`` or ``~/.cache/aotpack``); ``num_models`` is how
    many calls of one entry may run at the same time (per GPU, for a CUDA entry).

    ``public_key`` (a PEM file or PEM bytes: the signer's EC public key, or a certificate holding it)
    requires the pack to be signed by that key: ``signature`` is the detached signature ``aotpack sign``
    wrote (default ``PATH.sig``). A missing, malformed, altered or foreign signature, or a pack that is not
    the signed file, is an ``ArchiveError`` before anything in the pack is read. This check needs the
    ``cryptography`` package.

    A pack with CUDA entries loads on a host without CUDA (its CPU entries serve), with an
    ``AotpackWarning``; so does a pack whose CUDA code was built without a GPU (never run, not autotuned).
    """
    start = time.perf_counter()
    path = os.fspath(path)
    checked = None
    if signature is not None and public_key is None:
        raise ArchiveError("a signature was given but no public key to check it with: pass public_key= (the "
                           "signer's PEM public key)", path=path)
    if expected_sha256 is not None or public_key is not None:
        checked = _identity(path)
    if expected_sha256 is not None:
        _check_pin(path, expected_sha256)
    if public_key is not None:
        _signature.check(path, signature, public_key)
    archive = Archive.open(path)
    if checked is not None and _identity(path) != checked:
        raise ArchiveError("the file was replaced or changed while its hash was being checked; load it again "
                           "once it is in place", path=path)
    m = archive.manifest
    platform.check_byteorder()
    producer_torch = m.producer.get("torch")
    if not isinstance(producer_torch, str):
        raise ArchiveError("manifest.producer lacks the torch version", path=path)
    platform.check_torch(producer_torch)
    try:
        platform.check_target(m.target)
    except ArchiveError as e:
        raise ArchiveError(e.reason, path=path) from None
    cache_root = os.fspath(cache_dir) if cache_dir is not None else cache.default_cache_dir()

    st = os.stat(path)
    identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    weights: dict[str, torch.Tensor] = {}
    for w in m.weights:
        weights[w.name] = _weight(archive, identity, w)

    cuda_metas = {i: meta for i, meta in enumerate(m.entries) if meta.get("device") == "cuda"}
    # Why this host cannot run CUDA code, or None; asked only of packs with CUDA entries, so loading a CPU
    # pack never touches torch.cuda.
    no_cuda = platform.cuda_unavailable_reason() if cuda_metas else None
    blob_sizes = {b.name: b.size for b in m.blobs} if cuda_metas else {}
    cuda_state = None
    if cuda_metas:
        needed = {w for meta in cuda_metas.values() if isinstance(meta.get("constants"), dict)
                  for w in meta["constants"].values() if isinstance(w, str)}
        cuda_state = _CudaState(archive, cache_root, num_models, weights, needed, no_cuda)

    entries: list[Entry] = []
    for i, meta in enumerate(m.entries):
        where = f"manifest.entries[{i}]"
        guards = EntryGuards.from_json(meta, where)
        device = field_of(meta, "device", str, where)
        if device not in _RUNTIME_DEVICES:
            raise ArchiveError(f"{where} is a {device} entry; this runtime serves {', '.join(_RUNTIME_DEVICES)}",
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
        for cname, wname in constants.items():
            if not isinstance(wname, str) or wname not in weights:
                raise ArchiveError(f"{where} constant {cname!r} refers to weight {wname!r}, which the pack "
                                   "lacks", path=path)
        library_blob = field_of(meta, "library", str, where)
        if device == "cuda":
            try:
                cuda = CudaMeta.from_json(field_of(meta, "cuda", dict, where), f"{where}.cuda", blob_sizes)
                m.blob(library_blob)
            except ArchiveError as e:
                raise ArchiveError(e.reason, path=path) from None
            entry = CudaEntry(i, meta, guards, outputs, output_leaves, cuda, cuda_state)
            if no_cuda is None:  # this host can run it: extract and hash-check its code now, fail at load
                entry._files = cuda_state.extract(entry)
            entries.append(entry)
            continue
        library = _extract(archive, library_blob, cache_root)
        try:
            runner = _torch.cpu_runner(library, num_models)
        except RuntimeError as e:  # not a shared object, or not a model container
            raise ArchiveError(f"{where}: blob {library_blob!r} is not loadable native code "
                               f"({str(e).splitlines()[0]})", path=path) from None
        # The code knows the weight each of its constants came from: a manifest that says otherwise is wrong.
        if _torch.constant_fqns(runner) != constants:
            raise ArchiveError(f"{where}.constants do not match the constants of its native code", path=path)
        if constants:
            _torch.set_constants(runner, {c: weights[w] for c, w in constants.items()})
        entries.append(Entry(i, meta, guards, runner, outputs, output_leaves))
    guard_note = None
    if cuda_metas:
        guard_note = _warn_cuda(path, entries, no_cuda)
    return Package(archive, entries, weights, time.perf_counter() - start, guard_note=guard_note,
                   cuda_state=cuda_state)


def _entry_list(entries: list[Entry], kind: str) -> str:
    names = ", ".join(e.name for e in entries)
    return f"{kind} entr{'y' if len(entries) == 1 else 'ies'} {names}"


def _warn_cuda(path: str, entries: list[Entry], no_cuda: str | None) -> str | None:
    """Warn about CUDA entries this host cannot run, and about CUDA code built without a GPU; return the
    sentence a GuardError of this package ends with on a host without CUDA (else None)."""
    cuda = [e for e in entries if isinstance(e, CudaEntry)]
    cpu = [e for e in entries if not isinstance(e, CudaEntry)]
    note = None
    if no_cuda is not None:
        if cpu:
            warnings.warn(f"{path}: this host cannot run the pack's {_entry_list(cuda, 'CUDA')} ({no_cuda}); "
                          f"its {_entry_list(cpu, 'CPU')} still serve{'s' if len(cpu) == 1 else ''} CPU inputs",
                          AotpackWarning, stacklevel=3)
            note = f"this host has no usable CUDA device ({no_cuda}), so only the pack's CPU entries can run here"
        else:
            warnings.warn(f"{path}: this host cannot run the pack's {_entry_list(cuda, 'CUDA')} ({no_cuda}), and "
                          "the pack has no CPU entry: every call will be refused here; run it on a host with an "
                          "NVIDIA GPU and the CUDA build of torch", AotpackWarning, stacklevel=3)
            note = (f"this host has no usable CUDA device ({no_cuda}), and every entry of this pack is a CUDA "
                    "entry: run it on a host with an NVIDIA GPU and the CUDA build of torch")
    blind = [e for e in cuda if e.cuda.built_without_gpu]
    if blind:
        archs = _union(e.cuda.archs for e in blind)
        ptx = _union(e.cuda.ptx for e in blind)
        targets = ", ".join(archs) or "no SASS"
        if ptx:
            targets += f" (PTX {', '.join(ptx)})"
        warnings.warn(f"{path}: {_entry_list(blind, 'CUDA')} {'was' if len(blind) == 1 else 'were'} built "
                      f"without a GPU, for {targets}: not autotuned and never run at build time; smoke-test "
                      "the pack on a target GPU before serving it", AotpackWarning, stacklevel=3)
    return note


def _extract(archive: Archive, blob_name: str, cache_root: str) -> str:
    rec = archive.manifest.blob(blob_name)
    hit = cache.lookup(cache_root, rec.sha256, ".so")
    if hit:
        return hit
    return cache.store(cache_root, rec.sha256, ".so", archive.read_blob(blob_name))


def _extract_kernels(archive: Archive, cuda: CudaMeta, cache_root: str) -> str:
    """The folder of the entry's kernel files (the compiled code's ``cubin_dir``), hash-checked."""
    files: dict[str, str] = {}
    blobs: dict[str, str] = {}
    for k in cuda.kernels:
        files[k.file] = archive.manifest.blob(k.blob).sha256
        blobs[k.file] = k.blob
    hit = cache.lookup_dir(cache_root, files)
    if hit:
        return hit
    return cache.store_dir(cache_root, files, {name: archive.read_blob(blob) for name, blob in blobs.items()})


def _identity(path: str) -> tuple | None:
    """What tells this file from a replacement (a rename over it) or a rewrite, or None if it is unreadable."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _check_pin(path: str, expected: str) -> None:
    want = expected.lower().strip()
    got = cache.file_sha256(path)
    if got is None:
        raise ArchiveError("cannot read the file to check its pinned sha256", path=path)
    if got != want:
        raise ArchiveError(f"sha256 mismatch: expected {want}, actual {got}; refusing to load a pack that is "
                           "not the pinned one", path=path)
