"""``load(path) -> Package``: check the archive, map its code, and call it behind its guards.

Loading runs no compiler and no tracer: the archive is checked (header, manifest, layout), the host is
checked (CPU instruction set, torch series), the native code is hash-checked and put in the extraction cache,
``dlopen``-ed through libtorch's model-container runner, and pointed at the pack's weights.
"""
from __future__ import annotations

import math
import os
import threading
import time
import weakref
from typing import Any

import torch

from . import _torch, cache, platform
from .archive import Archive
from .errors import ArchiveError, GuardError
from .format import DTYPE_SIZES, field_of
from .guards import EntryGuards, _DTYPE_BY_NAME, check_spec, rebuild

_RUNTIME_DEVICES = ("cpu",)


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
        flat = _torch.run(self._runner, tensors)
        if not self._simple_output:
            flat = [flat[o["index"]] if o["kind"] == "tensor" else o["value"] for o in self._output_leaves]
        if self._outputs["type"] == "leaf":
            return flat[0]
        return rebuild(self._outputs, flat, [0])


class Package:
    """A loaded pack. Call it like the model: ``pkg(x)``, ``pkg(x, mask=m)``.

    Before every call the entries' guards are checked in order (the order ``aotpack inspect`` shows);
    the first entry that accepts the input runs. If none does, :class:`GuardError` says, per entry, the
    first guard that failed, and no native code has run.

    Calls from several threads are safe. Each entry owns ``num_models`` copies of the compiled model's
    state; a call takes a free copy or waits for one, so with the default of one copy, calls to the same
    entry run one at a time (each already uses every core through OpenMP).
    """

    def __init__(self, archive: Archive, entries: list[Entry], weights: dict[str, torch.Tensor],
                 load_seconds: float):
        self.path = archive.path
        self.manifest = archive.manifest
        self.entries = entries
        self.weights = weights
        self.load_seconds = load_seconds
        self._archive = archive
        self._example = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        for entry in self.entries:
            tensors = entry.guards.match(args, kwargs)
            if tensors is not None:
                return entry.run(tensors)
        raise GuardError([(f"{e.name} ({e.guards.label()})", e.guards.explain(args, kwargs) or "guards failed")
                          for e in self.entries])

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
         expected_sha256: str | None = None, num_models: int = 1) -> Package:
    """Load a pack for serving. Raises ``ArchiveError`` if the file or this host cannot serve it.

    ``expected_sha256`` pins the exact file (hex sha256 of the whole pack); ``cache_dir`` is where native
    code is extracted (default: ``$AOTPACK_CACHE_DIR`` or ``~/.cache/aotpack``); ``num_models`` is how
    many calls of one entry may run at the same time.
    """
    start = time.perf_counter()
    path = os.fspath(path)
    if expected_sha256 is not None:
        _check_pin(path, expected_sha256)
    archive = Archive.open(path)
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

    entries = []
    for i, meta in enumerate(m.entries):
        where = f"manifest.entries[{i}]"
        guards = EntryGuards.from_json(meta, where)
        device = field_of(meta, "device", str, where)
        if device not in _RUNTIME_DEVICES:
            raise ArchiveError(f"{where} is a {device} entry; this runtime serves {', '.join(_RUNTIME_DEVICES)}",
                               path=path)
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
    return Package(archive, entries, weights, time.perf_counter() - start)


def _extract(archive: Archive, blob_name: str, cache_root: str) -> str:
    rec = archive.manifest.blob(blob_name)
    hit = cache.lookup(cache_root, rec.sha256, ".so")
    if hit:
        return hit
    return cache.store(cache_root, rec.sha256, ".so", archive.read_blob(blob_name))


def _check_pin(path: str, expected: str) -> None:
    want = expected.lower().strip()
    got = cache.file_sha256(path)
    if got is None:
        raise ArchiveError("cannot read the file to check its pinned sha256", path=path)
    if got != want:
        raise ArchiveError(f"sha256 mismatch: expected {want}, actual {got}; refusing to load a pack that is "
                           "not the pinned one", path=path)
