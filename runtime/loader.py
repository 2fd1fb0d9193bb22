"""``load(path) -> Package``: check the archive, map its code, and call it behind its guards.

Loading runs no compiler and no tracer: the archive is checked (header, manifest, layout), the host is
checked (CPU instruction set, torch series), every blob is hashed (in parallel threads) unless the code
cache records a completed check of this very file, the native code is hash-checked and put in the code
cache, ``dlopen``-ed through libtorch's model-container runner, and pointed at the pack's weights, which are
views of the mapped file: no page of them is read until the code uses it.

CUDA entries are checked at load like CPU entries, but their native code needs libcuda.so.1, so it is
loaded only when a call first selects the entry on a given GPU: after the GPU's architecture is checked
against the entry's kernels, with the kernels extracted into one code cache folder and the weights copied once
to that GPU. On a host without CUDA their code is never loaded, and the CPU entries serve as usual.

May not: reach into a session's, an entry's or the code cache's internals: each gets what it needs as data.
"""
from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING, Any

import torch

from . import archive as _archive
from . import cache, platform
from .archive import Archive
from .devices import CudaState, warn_cuda
from .entries import CudaEntry, Entry, PackedForThreads, entry_from_manifest
from .errors import ArchiveError, GuardError, MethodError, SessionError
from .format import DEFAULT_METHOD, DTYPES
from .guards import rebuild
from .schema import ExampleLeaf, Manifest, MethodRecord
from . import weights as _weights
from .weights import load_weights, prefetch as _prefetch, tensor_from_bytes

# An integer dtype of each element width, to move elements of any dtype (complex32, float8) as bits.
_SAME_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

if TYPE_CHECKING:
    from .sessions import Session

# Imported when a load needs them, not with the loader: sessions for a pack with state, the signature check
# when a key is given (runtime/__init__.py: a fresh process pays for what it uses).
__all__ = ["CudaEntry", "Entry", "Method", "Package", "load", "tensor_from_bytes"]

VERIFY_MODES = ("auto", "full")


class Method:
    """One method of a loaded pack (``pkg.encode``, ``pkg.methods["encode"]``): call it like the model's
    method. ``entries`` are the entries that serve it, in the order their guards are tried."""

    def __init__(self, package: "Package", record: MethodRecord, entries: list[Entry]):
        self.name = record.name
        self.record = record
        self.entries = entries
        self._package = package

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._package._call(self.name, args, kwargs)

    def select(self, *args: Any, **kwargs: Any) -> Entry | None:
        """The entry that would run for this input, or None (runs nothing)."""
        for entry in self.entries:
            if entry.guards.match(args, kwargs) is not None:
                return entry
        return None

    def example_inputs(self) -> tuple[tuple, dict]:
        """The example ``(args, kwargs)`` this method was built with."""
        return self._package.example_inputs(self.name)

    def __repr__(self) -> str:
        n = len(self.entries)
        return f"<aotpack.Method {self.name!r} of {self._package.path!r}: {n} entr{'y' if n == 1 else 'ies'}>"


class Package:
    """A loaded pack. Call it like the model: ``pkg(x)``, ``pkg(x, mask=m)``.

    A pack of several methods (``methods``: name -> ``Method``) is called by method: ``pkg.encode(x)``;
    ``pkg(...)`` calls its ``forward``, where it has one. Each method dispatches among its own entries.

    Before every call the entries' guards are checked in order (the order ``aotpack inspect`` shows);
    the first entry that accepts the input runs. If none does, :class:`GuardError` says, per entry, the
    first guard that failed, and no native code has run.

    Calls from several threads are safe. Each entry owns ``num_models`` copies of the compiled model's
    state; a call takes a free copy or waits for one, so with the default of one copy, calls to the same
    entry run one at a time (each already uses every core through OpenMP).

    A CUDA entry accepts CUDA tensors on any device and runs on theirs, on the caller's current stream
    there. ``weights`` are the pack's weights in host memory; CUDA entries use copies of them on each GPU.

    A pack with state (``stateful``: its code writes buffers such as an LLM's KV cache between calls) is
    called through sessions, each with its own state: ``s = pkg.session(); s(...)`` (``runtime/sessions.py``).
    """

    def __init__(self, archive: Archive, entries: list[Entry], weights: dict[str, torch.Tensor],
                 load_seconds: float, *, guard_note: str | None = None, cuda_state: CudaState | None = None,
                 checked: str = "full", prefetching: threading.Thread | None = None):
        self.path = archive.path
        self.manifest = archive.manifest
        self.entries = entries
        self.weights = weights
        self.load_seconds = load_seconds
        # "full": this load hashed every blob; "record": a recorded full check of this unchanged file stood in
        self.checked = checked
        self._archive = archive
        self._example = None
        self._guard_note = guard_note
        self._cuda_state = cuda_state
        self.stateful = bool(archive.manifest.state)
        if self.stateful:
            from .sessions import PositionCheck, SessionSource, StateTemplate
        self._state_template = StateTemplate.from_archive(archive) if self.stateful else None
        table = archive.manifest.method_table()
        # name -> (record, its entries); ``methods`` makes the Method objects on demand (no cycle to the package)
        self._methods: dict[str, tuple[MethodRecord, list[Entry]]] = {
            r.name: (r, [entries[i] for i in r.entries]) for r in table}
        # Methods called through a session only: a method whose code neither reads nor writes the state (an
        # encoder's ``encode``) runs on the package too.
        self._needs_session = frozenset(
            name for name, (r, es) in self._methods.items()
            if self.stateful and (r.positions or any(e.state_constants for e in es)))
        position_checks: list[list[PositionCheck]] = [[] for _ in entries]
        for k, r in enumerate(table):
            where = f"manifest.methods[{k}].positions" if archive.manifest.methods else "manifest.state.positions"
            for i in r.entries:
                position_checks[i] = [PositionCheck.bind(rule, entries[i], archive.path, f"{where}[{j}]")
                                      for j, rule in enumerate(r.positions)]
        self._sessions = None if not self.stateful else SessionSource(
            path=archive.path, template=self._state_template, dispatch=self._dispatch,
            position_checks=position_checks, methods=tuple(self._methods))
        self._prefetching = prefetching
        self._swap = _weights.SwapLock()
        self._swapping = threading.Lock()  # one load_weights at a time
        for entry in entries:
            entry.swap_lock = self._swap
        # Packed weights follow the calling thread count (``PackedForThreads``); they were packed at
        # load, with this thread's count.
        packed = [e for e in entries if e.device == "cpu" and e.packed_weights]
        self._packing = PackedForThreads(packed, lambda: self.weights, self._swap, self._swapping,
                                         torch.get_num_threads()) \
            if packed else None
        for entry in packed:
            entry.packing = self._packing

    def load_weights(self, source: Any, strict: bool = True) -> None:
        """Serve new weights from now on, without a compiler: ``source`` is a ``state_dict``-like mapping of
        name -> tensor (or a module, whose ``state_dict()`` is used), a safetensors file, or a Hugging Face
        checkpoint folder (``model.safetensors``, or shards with ``model.safetensors.index.json``).

        Names are the model's own ``state_dict`` names (``aotpack inspect`` lists them). Every name, dtype and
        shape is checked before anything changes; missing, unexpected and mismatched weights are one
        ``WeightsError`` listing them all, and then nothing has changed. ``strict=False`` keeps the current
        value of a weight not given and ignores names the pack does not know. Tied names given together
        must hold equal values; state buffers' names and weights the code never reads are ignored.

        The swap is atomic: a call in flight finishes on the old weights, every later call sees the new ones;
        sessions keep their state. A file's tensors are mapped, not copied (replace such a file by renaming a
        new one over it, never by rewriting it in place); a mapping's tensors are copied, so the caller may go
        on changing its own. CUDA entries get copies on every GPU they run on, made before the swap."""
        with self._swapping:
            new = _weights.fit(self.manifest, source, strict, self.weights, path=self.path)
            prepared = self._cuda_state.prepare(new) if self._cuda_state is not None else {}
            # CPU entries' constants (weights packed for oneDNN among them) are made before calls wait.
            shared: dict = {}  # a weight several entries pack alike is packed once
            threads = torch.get_num_threads()
            bound = [entry.weight_constants(new, shared) if entry.device == "cpu" else None for entry in self.entries]
            with self._swap.swap():
                on_device = self._cuda_state.commit(new, prepared) if self._cuda_state is not None else {}
                for entry, constants in zip(self.entries, bound):
                    entry.bind_weights(new, on_device, constants)
                self.weights = new
                if self._packing is not None:
                    self._packing.packed(threads, [b for e, b in zip(self.entries, bound) if e.packing is not None])

    def wait_prefetch(self, timeout: float | None = None) -> bool:
        """Wait for the background read of ``load(..., prefetch=True)``; True once it is done (or when
        there was none)."""
        if self._prefetching is not None:
            self._prefetching.join(timeout)
            return not self._prefetching.is_alive()
        return True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(DEFAULT_METHOD, args, kwargs)

    @property
    def methods(self) -> dict[str, Method]:
        """The pack's methods by name, in the order they were built (one, ``forward``, for a pack without
        methods)."""
        return {name: Method(self, r, entries) for name, (r, entries) in self._methods.items()}

    def __getattr__(self, name: str) -> Method:
        # Only for names that are not attributes: a method of the pack, else a MethodError (an AttributeError).
        methods = self.__dict__.get("_methods")
        if methods is None or name.startswith("__"):
            raise AttributeError(name)
        if name not in methods:
            raise MethodError(name, list(methods), path=self.__dict__.get("path"))
        record, entries = methods[name]
        return Method(self, record, entries)

    def _call(self, method: str, args: tuple, kwargs: dict) -> Any:
        if method not in self._methods:
            raise MethodError(method, list(self._methods), path=self.path)
        if method in self._needs_session:
            call = "s(...)" if method == DEFAULT_METHOD else f"s.{method}(...)"
            raise SessionError(f"this pack carries state that its calls write ({self._state_template.describe()}): "
                               f"open a session, which holds its own copy of it: s = pkg.session(); {call}")
        entry, tensors = self._dispatch(args, kwargs, method)
        return entry.run(tensors)

    def _dispatch(self, args: tuple, kwargs: dict, method: str = DEFAULT_METHOD) -> tuple[Entry, list[torch.Tensor]]:
        """The first entry of ``method`` whose guards accept this input, and the tensors to hand it; else
        GuardError (MethodError for a method the pack does not have)."""
        if method not in self._methods:
            raise MethodError(method, list(self._methods), path=self.path)
        entries = self._methods[method][1]
        for entry in entries:
            tensors = entry.guards.match(args, kwargs)
            if tensors is not None:
                return entry, tensors
        raise GuardError([(e.label(), e.guards.explain(args, kwargs) or "guards failed") for e in entries],
                         note=self._guard_note)

    def session(self, device: torch.device | str | None = None) -> Session:
        """A new session of a stateful pack, with fresh state (the pack's initial values). Its state lives on
        ``device``, by default on the device of its first call."""
        if not self.stateful:
            raise SessionError("this pack has no state: call the package itself (pkg(...)); sessions are for packs "
                               "whose code writes buffers between calls, such as an LLM's KV cache")
        if device is not None and torch.device(device).type == "cuda":
            reason = self._cuda_state.no_cuda if self._cuda_state is not None else "the pack has no CUDA entry"
            if reason is not None:
                raise SessionError(f"cannot keep this session's state on {device}: {reason}")
        from .sessions import Session

        return Session(self._sessions, device)

    def select(self, *args: Any, **kwargs: Any) -> Entry | None:
        """The entry of ``forward`` that would run for this input, or None (runs nothing)."""
        return getattr(self, DEFAULT_METHOD).select(*args, **kwargs)

    @property
    def producer(self) -> dict:
        return self.manifest.producer

    def example_inputs(self, method: str | None = None) -> tuple[tuple, dict]:
        """The example ``(args, kwargs)`` the pack (its ``method``, default the first) was built with."""
        if method is not None and method not in self._methods:
            raise MethodError(method, list(self._methods), path=self.path)
        try:
            inputs, checked = check_example(self.manifest, method)
        except ArchiveError as e:
            raise ArchiveError(e.reason, path=self.path) from None
        leaves = []
        for where, leaf in checked:
            if leaf.kind == "value":
                leaves.append(leaf.value)
                continue
            dtype, shape, strides = leaf.dtype, leaf.shape, leaf.strides
            t = tensor_from_bytes(self._archive.read_blob(leaf.blob), dtype, shape)
            span = 1 + sum((n - 1) * s for n, s in zip(shape, strides)) if t.numel() else 0
            # Elements are placed as integers of the same width: indexing is not implemented for every dtype.
            bits = _SAME_WIDTH.get(DTYPES[dtype], t.dtype)
            try:
                storage = torch.empty(span, dtype=bits)
            except RuntimeError:  # more memory than this host can allocate
                raise ArchiveError(f"{where}.strides {list(strides)} span {span} elements",
                                   path=self.path) from None
            # Each element goes to its offset through an index, not a strided copy: the strides of an expanded
            # input overlap.
            offsets = torch.zeros((), dtype=torch.int64)
            for n, s in zip(shape, strides):
                offsets = offsets[..., None] + torch.arange(n) * s
            storage[offsets.reshape(-1)] = t.reshape(-1).view(bits)
            leaves.append(storage.view(t.dtype).as_strided(shape, strides))
        args, kwargs = rebuild(inputs, leaves, [0])
        return tuple(args), dict(kwargs)

    def __repr__(self) -> str:
        methods = f", methods {', '.join(self._methods)}" if self.manifest.methods else ""
        return (f"<aotpack.Package {self.path!r}: {len(self.entries)} entr{'y' if len(self.entries) == 1 else 'ies'}"
                f"{methods}>")


def load(path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
         expected_sha256: str | None = None, num_models: int = 1, signature: str | os.PathLike | None = None,
         public_key: str | os.PathLike | bytes | None = None, verify: str = "auto",
         prefetch: bool = False, weights: str | os.PathLike | None = None,
         weights_sha256: str | None = None) -> Package:
    """Load a pack for serving. Raises ``ArchiveError`` if the file or this host cannot serve it.

    ``expected_sha256`` pins the exact file (hex sha256 of the whole pack); ``cache_dir`` is where native
    code is extracted and checks are recorded (default: ``$AOTPACK_CACHE_DIR`` or ``~/.cache/aotpack``);
    ``num_models`` is how many calls of one entry may run at the same time (per GPU, for a CUDA entry).

    ``verify``: ``"auto"`` hashes every blob of the pack (in parallel threads) unless the code cache records a
    completed check of this same, unchanged file (same device, inode, size, modification and change time,
    same manifest), and records the check it makes; ``"full"`` always hashes every blob. Native code is
    hashed before it is loaded either way.

    ``prefetch``: read the weights into memory in a background thread, so that the first call does not
    wait for their pages; by default a page is read when the code first uses it.

    ``public_key`` (a PEM file or PEM bytes: the signer's EC public key, or a certificate holding it)
    requires the pack to be signed by that key: ``signature`` is the detached signature ``aotpack sign``
    wrote (default ``PATH.sig``). A missing, malformed, altered or foreign signature, or a pack that is not
    the signed file, is an ``ArchiveError`` before anything in the pack is parsed or used. This check needs
    the ``cryptography`` package. A pin or a signature is checked against the whole file's sha256, which a
    recorded check of the same unchanged file supplies when it has one (``verify="full"`` hashes it again).

    The pack is opened once, and only a regular file (a FIFO, a device or a directory is an ``ArchiveError``
    at once): the pin, the signature, the blob checks, every read and the mapping use that one descriptor,
    so a check vouches for exactly the bytes that are used, and a record of it names that file.

    A pack built with ``--weights external`` keeps its weights in a safetensors file: ``weights`` names it
    (default: the file its manifest names, beside the pack). The file must have the sha256 the pack pins, or
    ``weights_sha256`` for another file of the same weights' names, dtypes and shapes (a fine-tune); it is
    hashed once (and not again while the cache records that check of the same, unchanged file), checked,
    and mapped, all through one descriptor. Packs that load one file share one mapping of it.

    A pack with CUDA entries loads on a host without CUDA (its CPU entries serve), with an
    ``AotpackWarning``; so does a pack whose CUDA code was built without a GPU (never run, not autotuned).
    """
    start = time.perf_counter()
    path = os.fspath(path)
    if verify not in VERIFY_MODES:
        raise ArchiveError(f"verify={verify!r} is not a verify mode: use 'auto' (skip hashing a file whose check is "
                           "recorded) or 'full' (hash every blob)", path=path)
    if signature is not None and public_key is None:
        raise ArchiveError("a signature was given but no public key to check it with: pass public_key= (the "
                           "signer's PEM public key)", path=path)
    cache_root = os.fspath(cache_dir) if cache_dir is not None else cache.default_cache_dir()
    began = time.time()
    pinned = expected_sha256 is not None or public_key is not None
    # The pack is opened once: the pin, the signature, the checks of every blob, the reads and the mapping all
    # go through this one descriptor, and a record of the check names the file it describes (its fstat).
    fd, st = _archive.open_pack(path)
    try:
        identity = _archive.identity_of(st)
        recorded = cache.find_check(cache_root, identity) if pinned and verify == "auto" else None
        file_sha = None
        if pinned:
            file_sha = _check_whole_file(path, fd, st, expected_sha256, signature, public_key, recorded)
            st = os.fstat(fd)
            if _archive.identity_of(st) != identity:
                raise ArchiveError("the file was changed while its hash was being checked; load it again once it "
                                   "is in place", path=path)
    except BaseException:
        os.close(fd)
        raise
    archive = Archive.from_fd(path, fd, st)
    if recorded is not None and recorded["manifest_sha256"] != archive.manifest_sha256:
        # A record for this identity but another manifest: trust neither, hash the file itself.
        file_sha = _check_whole_file(path, fd, st, expected_sha256, signature, public_key, None)
        recorded = None
    check_host(archive)
    if verify == "auto" and recorded is None:
        recorded = cache.find_check(cache_root, archive.identity, archive.manifest_sha256)
    checked = "record"
    if recorded is None:
        if not pinned:
            began = time.time()
        archive.check_blobs()
        checked = "full"
    if (recorded is None or (file_sha and not recorded.get("file_sha256"))) and archive.still_same_file():
        cache.save_check(cache_root, archive.identity, archive.manifest_sha256, began, path, file_sha)
    external = None
    if archive.manifest.external_weights is not None:
        pin = weights_sha256.lower().strip() if weights_sha256 is not None else archive.manifest.external_weights.sha256
        external = _weights.load_external(archive, _weights.external_path(archive, weights), pin, cache_root, verify)
    elif weights is not None or weights_sha256 is not None:
        raise ArchiveError("weights= names a weights file, but this pack carries its own weights; to serve other "
                           "weights, call pkg.load_weights(PATH) after loading", path=path)
    return serve(archive, cache_root, num_models=num_models, checked=checked, prefetch=prefetch, started=start,
                 weights=external)


def check_host(archive: Archive) -> None:
    """Refuse a pack this host cannot run: byte order, torch series, machine and CPU instruction set."""
    m, path = archive.manifest, archive.path
    platform.check_byteorder()
    producer_torch = m.producer.get("torch")
    if not isinstance(producer_torch, str):
        raise ArchiveError("manifest.producer lacks the torch version", path=path)
    platform.check_torch(producer_torch)
    try:
        platform.check_target(m.target)
    except ArchiveError as e:
        raise ArchiveError(e.reason, path=path) from None


def serve(archive: Archive, cache_root: str, *, num_models: int = 1, checked: str = "full", prefetch: bool = False,
          started: float | None = None, weights: dict[str, torch.Tensor] | None = None) -> Package:
    """A package of an archive whose every blob was checked (``check_blobs``, ``verify``, or a record of that
    check, which ``checked`` names) on a host ``check_host`` accepted: its weights mapped from the archive's
    file, its entries' code extracted and loaded. ``aotpack verify`` loads the archive it checked this way."""
    start = time.perf_counter() if started is None else started
    path, m = archive.path, archive.manifest
    if weights is None:  # ``weights``: the pack's external weights, checked (``load``)
        weights = load_weights(archive, checked=True)
    prefetching = None
    if prefetch:
        mapped = {w.name for w in m.weights if w.blob is None or m.blob(w.blob).compression == "none"}
        prefetching = _prefetch([t for name, t in weights.items() if name in mapped])

    cuda_records = [e for e in m.entries if e.device == "cuda"]
    # Why this host cannot run CUDA code, or None; asked only of packs with CUDA entries, so loading a CPU
    # pack never touches torch.cuda.
    no_cuda = platform.cuda_unavailable_reason() if cuda_records else None
    cuda_state = None
    if cuda_records:
        state_names = {r.name for r in m.state}
        needed = {w for e in cuda_records for w in e.constants.values() if w not in state_names}
        cuda_state = CudaState(archive, cache_root, num_models, weights, needed, no_cuda)

    shared: dict = {}  # a weight several entries pack alike (packed_weights) is packed once
    entries = [entry_from_manifest(i, archive, weights, cache_root, num_models, cuda_state, shared)
               for i in range(len(m.entries))]
    guard_note = None
    if cuda_records:
        guard_note = warn_cuda(path, entries, no_cuda)
    return Package(archive, entries, weights, time.perf_counter() - start, guard_note=guard_note,
                   cuda_state=cuda_state, checked=checked, prefetching=prefetching)


def _check_whole_file(path: str, fd: int, st: os.stat_result, expected_sha256: str | None, signature, public_key,
                      recorded: dict | None) -> str:
    """Check the pin and the signature against the sha256 of the file open at ``fd`` (the recorded one when a
    record of this unchanged file has it); return that sha256."""
    file_sha = recorded.get("file_sha256") if recorded is not None else None
    if file_sha is None:
        file_sha = _archive.whole_file_sha256(fd, st.st_size, path)
    if expected_sha256 is not None:
        file_sha = _check_pin(path, expected_sha256, file_sha)
    if public_key is not None:
        from . import signature as _signature

        file_sha = _signature.check(path, signature, public_key, file_sha256=file_sha).file_sha256
    return file_sha


def check_example(m: Manifest, method: str | None = None) -> tuple[dict, list[tuple[str, ExampleLeaf]]]:
    """The example record's structure and leaves (of ``method``, default the first), each leaf with where it
    lies in the manifest (the record was checked against the blob table when the manifest was read)."""
    table = m.method_table()
    k = 0 if method is None else next((k for k, r in enumerate(table) if r.name == method), None)
    if k is None:
        raise ArchiveError(f"this pack has no method {method!r}; its methods: {', '.join(r.name for r in table)}")
    ex = table[k].example
    if ex is None:
        raise ArchiveError("this pack stores no example inputs" + (f" for the method {table[k].name!r}"
                                                                   if m.methods else ""))
    return ex.inputs, [(f"{m.example_where(k)}.leaves[{i}]", leaf) for i, leaf in enumerate(ex.leaves)]


def _check_pin(path: str, expected: str, got: str) -> str:
    """Check the file's sha256 against the pin; return it."""
    want = expected.lower().strip()
    if got != want:
        raise ArchiveError(f"sha256 mismatch: expected {want}, actual {got}; refusing to load a pack that is "
                           "not the pinned one", path=path)
    return got
