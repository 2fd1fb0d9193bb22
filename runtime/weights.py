"""The pack's weights as tensors: views of the mapped file, shared by every entry and every load.

Each weight is a tensor over its blob's bytes (``Archive.map_blob``): a view of a private copy-on-write
mapping of the pack, so no copy is made, processes that load the same pack share its pages, and a page is
read from the file only when the compiled code first uses it. A second load of the same, unchanged file in
one process reuses the tensors of the first.

``prefetch`` reads the weights' pages in the background instead (opt-in: ``load(..., prefetch=True)``).

``fit`` checks new weights for a loaded pack (``Package.load_weights``) against its manifest, and
``SwapLock`` makes their swap one step between calls.

May not: copy a weight at load: a tensor is a view of the mapped blob; bind weights to code (``entries``).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import math
import mmap
import os
import threading
import weakref
from collections.abc import Mapping

import torch

from .archive import Archive
from .guards import DTYPE_BY_NAME

# madvise advice values (Linux): MADV_POPULATE_READ (5.14+) reads the pages and maps them into this process;
# MADV_WILLNEED, the fallback, starts reading them into the page cache.
MADV_WILLNEED = 3
MADV_POPULATE_READ = 22
# The background reader asks for this many bytes at a time (the page cache fills in order, and the first
# call's page faults wait only for the chunk they need).
PREFETCH_CHUNK = 32 << 20


def tensor_from_bytes(data: bytes | bytearray | memoryview, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor over ``data`` (little-endian, contiguous); no copy for a bytearray or writable view."""
    tdtype = DTYPE_BY_NAME[dtype]
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=tdtype)
    buf = data if isinstance(data, (bytearray, memoryview)) else bytearray(data)
    return torch.frombuffer(buf, dtype=torch.uint8).view(tdtype).reshape(shape)


# Weights already loaded in this process, by file identity and content hash: a second load of the same,
# unchanged pack shares them instead of mapping them again. Another file (a copy, a rebuilt or a corrupt
# pack) is mapped anew. Entries go when no Package uses them.
_loaded_weights: "weakref.WeakValueDictionary[tuple, torch.Tensor]" = weakref.WeakValueDictionary()
_loaded_lock = threading.Lock()


def _weight(archive: Archive, w, checked: bool) -> torch.Tensor:
    key = (*archive.identity, archive.manifest.blob(w.blob).sha256, w.dtype, w.shape)
    with _loaded_lock:
        t = _loaded_weights.get(key)
        if t is None:
            t = tensor_from_bytes(archive.map_blob(w.blob, checked=checked), w.dtype, w.shape)
            _loaded_weights[key] = t
    return t


def load_weights(archive: Archive, checked: bool) -> dict[str, torch.Tensor]:
    """Every weight of the pack by name, as views of the mapped file (or shared with an earlier load of the
    same file in this process). ``checked``: every blob was already hashed (``Archive.check_blobs``, or a
    record of that check for this very file), so mapping reads no page; otherwise each weight is hashed
    as it is mapped."""
    return {w.name: _weight(archive, w, checked) for w in archive.manifest.weights}


def _page_ranges(tensors: list[torch.Tensor]) -> list[tuple[int, int]]:
    """The page-aligned address ranges the tensors' memory covers, merged, in address order."""
    page = mmap.PAGESIZE
    spans = sorted((t.data_ptr() // page * page, -(-(t.data_ptr() + t.nbytes) // page) * page)
                   for t in tensors if t.nbytes)
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def prefetch(tensors: list[torch.Tensor]) -> threading.Thread:
    """Read the pages of ``tensors`` (views of the mapped pack) in a background thread, in file order, so
    that a first call finds them in memory; return the started thread.

    It asks the kernel to populate the mapping (``MADV_POPULATE_READ``), or, on kernels without it, to read
    ahead (``MADV_WILLNEED``). Either is a hint: an error stops the prefetch, never the load. The pages stay
    shared with the page cache and with other processes, as when the code touches them itself.
    """
    ranges = _page_ranges(tensors)

    def run(keep: list[torch.Tensor]) -> None:  # ``keep``: the mapping must outlive the reads
        libc = ctypes.CDLL(None, use_errno=True)  # ctypes calls drop the GIL: the caller keeps running
        madvise = libc.madvise
        madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        advice = MADV_POPULATE_READ
        for start, end in ranges:
            for at in range(start, end, PREFETCH_CHUNK):
                n = min(PREFETCH_CHUNK, end - at)
                while madvise(at, n, advice) != 0:
                    if advice == MADV_POPULATE_READ and ctypes.get_errno() == errno.EINVAL:
                        advice = MADV_WILLNEED
                        continue
                    return

    thread = threading.Thread(target=run, args=(tensors,), name="aotpack-prefetch", daemon=True)
    thread.start()
    return thread


# ---------------------------------------------------------------------------------------------------
# New weights for a loaded pack (``Package.load_weights``): checked whole before anything changes.

class SwapLock:
    """Calls share it; a swap of the weights holds it alone. A swap waits for the calls in flight (they
    finish on the old weights) and calls that start while a swap waits wait for it (they see the new ones).

    A pack holds several compiled containers (one per entry, per device), so the swap of all of them must be
    one step: AOTInductor's own double buffer (``update_constant_buffer(use_inactive=True)`` then
    ``swap_constant_buffer``, which waits for the container's runs under its exec mutex) is per container.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._calls = 0
        self._swapping = 0  # swaps waiting or running: new calls wait for them

    def __enter__(self) -> None:  # a call
        with self._cond:
            while self._swapping:
                self._cond.wait()
            self._calls += 1

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._calls -= 1
            if not self._calls:
                self._cond.notify_all()

    @contextlib.contextmanager
    def swap(self):
        """The context in which the weights are swapped: it waits for the calls in flight, and no call runs
        in it."""
        with self._cond:
            self._swapping += 1
            while self._calls:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._swapping -= 1
                self._cond.notify_all()


def _describe(dtype: str, shape: tuple[int, ...]) -> str:
    return f"{dtype}{list(shape)}"


def _given_info(value) -> tuple[str | None, tuple[int, ...] | None, str]:
    """(dtype name, shape, description) of a value given as a weight; dtype None when it cannot be one."""
    from .safetensors_file import TensorInfo
    from .guards import stored_dtype

    if isinstance(value, TensorInfo):
        return value.dtype, value.shape, _describe(value.dtype, value.shape)
    if not isinstance(value, torch.Tensor):
        return None, None, f"a {type(value).__name__}, not a tensor"
    if value.device.type == "meta":
        return None, None, "a tensor on the meta device (it holds no values)"
    if value.layout != torch.strided:
        return None, None, f"a tensor of layout {str(value.layout).removeprefix('torch.')} (only dense tensors)"
    name = stored_dtype(value.dtype)
    if name is None:
        return None, None, f"a tensor of dtype {str(value.dtype).removeprefix('torch.')}"
    return name, tuple(value.shape), _describe(name, tuple(value.shape))


def _source_items(source) -> tuple[dict, str | None]:
    """(name -> tensor or ``TensorInfo``, and a function to get a file's tensor) of a weights source, and the
    path it came from (None for a mapping)."""
    from .errors import WeightsError
    from .safetensors_file import open_source

    if isinstance(source, torch.nn.Module):
        source = source.state_dict()
    if isinstance(source, (str, os.PathLike)):
        files = open_source(source)
        return {name: (f, key) for name, (f, key) in files.items()}, os.fspath(source)
    if isinstance(source, Mapping):
        for name in source:
            if not isinstance(name, str):
                raise WeightsError(f"weights are named by strings (state_dict names); found the key {name!r}")
        return dict(source), None
    raise WeightsError(f"weights come as a state_dict-like mapping of name -> tensor, a safetensors file or a "
                       f"checkpoint folder; got a {type(source).__name__}")


def fit(manifest, source, strict: bool, current: dict[str, torch.Tensor], path: str | None = None) \
        -> dict[str, torch.Tensor]:
    """Every stored weight of the pack (by ``WeightRecord.name``) with ``source``'s values where it gives them,
    checked against the manifest before any tensor is read: each given name, dtype and shape; tied names
    (``aliases``, and records that share a blob) may come under any one of them, must hold equal values when
    given together, and get one tensor. Every problem is one ``WeightsError`` (missing, unexpected,
    mismatched, each with what was expected and what was given). ``strict=False`` keeps the
    current value of a weight not given and ignores names the pack does not know. A state buffer's name and
    the model's names the code never reads (``unread_weights``) are accepted and ignored.

    Tensors of a file are views of its mapping (no copy); tensors of a mapping are copied (dense, on the
    CPU), so that the caller may go on changing its own tensors."""
    from .errors import WeightsError

    items, where = _source_items(source)
    file_values = where is not None
    groups = tied_groups(manifest)
    records = {}
    for group in groups:
        for w in group:
            for n in (w.name, *w.aliases):
                records[n] = w
    ignored = {r.name for r in manifest.state} | set(manifest.unread_weights)
    infos = {name: (value[0].info[value[1]] if file_values else value) for name, value in items.items()}
    missing, unexpected, mismatched = [], [], []
    for name, value in infos.items():
        rec = records.get(name)
        if rec is None:
            if name not in ignored:
                unexpected.append(name)
            continue
        dtype, shape, actual = _given_info(value)
        if (dtype, shape) != (rec.dtype, rec.shape):
            mismatched.append((name, _describe(rec.dtype, rec.shape), actual))
    names = [[n for w in group for n in (w.name, *w.aliases)] for group in groups]
    for group, group_names in zip(groups, names):
        if strict and any(w.in_state_dict for w in group) and not any(n in infos for n in group_names):
            first, others = group_names[0], group_names[1:]
            missing.append(first if not others else f"{first} (or {', '.join(others)})")
    if not strict:
        unexpected = []

    def get(name: str) -> torch.Tensor:
        if file_values:
            f, key = items[name]
            return f[key]
        return items[name]

    bad = {n for n, _, _ in mismatched}
    for group_names in names:
        given = [n for n in group_names if n in infos and n not in bad]
        first = get(given[0]) if given else None
        for other in given[1:]:
            if not torch.equal(first, get(other)):
                mismatched.append((other, f"equal to {given[0]} (tied to it in the model)", "other values"))
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {', '.join(unexpected)}")
        if mismatched:
            parts.append(f"mismatched {len(mismatched)}: " + "; ".join(f"{n} (expected {e}, actual {a})"
                                                                        for n, e, a in mismatched))
        hint = " (strict=False keeps the pack's value of a weight not given and ignores unknown names)" \
            if strict and (missing or unexpected) else ""
        raise WeightsError(f"the new weights do not fit the pack, nothing was changed: {'; '.join(parts)}{hint}",
                           path=where or path, missing=missing, unexpected=unexpected, mismatched=mismatched)
    out = {}
    for group, group_names in zip(groups, names):
        given = next((n for n in group_names if n in infos), None)
        if given is None:
            for w in group:
                out[w.name] = current[w.name]
            continue
        t = get(given).detach()
        if not file_values:
            t = t.to("cpu", copy=True, memory_format=torch.contiguous_format)
        for w in group:  # records of one blob (tied weights the code reads under several names): one tensor
            out[w.name] = t
    return out


def given(source, names) -> dict[str, torch.Tensor]:
    """The tensors ``source`` (as ``fit`` takes it) gives under any of ``names`` (views of a file's mapping,
    or the mapping's own tensors), unchecked: what ``reweight`` keys the names the code never reads by."""
    items, where = _source_items(source)
    out = {}
    for name in names:
        if name in items:
            out[name] = items[name][0][items[name][1]] if where is not None else items[name]
    return out


def tied_groups(manifest) -> list[list]:
    """The pack's weight records, grouped by the tensor they are: records that share a blob (a pack of several
    methods stores tied weights whose several names the code reads as one blob under several records), or in a
    pack whose weights are beside it one tensor of the file (``same_as``), form one group, every other record
    its own; groups in the order of their first record in the manifest."""
    groups: list[list] = []
    by_tensor: dict[tuple, list] = {}
    for w in manifest.weights:
        tensor = ("blob", w.blob) if w.blob is not None else ("file", w.file_name)
        if tensor in by_tensor:
            by_tensor[tensor].append(w)
            continue
        group = [w]
        groups.append(group)
        by_tensor[tensor] = group
    return groups


def file_name_of(group: list) -> str:
    """The name a group of records that are one tensor (``tied_groups``) has in a weights file beside the pack:
    its first record's that is in the ``state_dict`` (a ``state_dict`` name), else its first record's."""
    return next((w.name for w in group if w.in_state_dict), group[0].name)


# ---------------------------------------------------------------------------------------------------
# Weights kept apart from the pack (``external_weights``): a safetensors file pinned by its sha256

# Tensors of external weights files loaded in this process, by file identity: loads of several packs (or the
# same pack twice) with one weights file share one mapping of it.
_external: "weakref.WeakValueDictionary[tuple, torch.Tensor]" = weakref.WeakValueDictionary()


def external_path(archive: Archive, given: str | os.PathLike | None) -> str:
    """The weights file of a pack that keeps its weights apart: ``given``, else the file its manifest names
    in the pack's own folder."""
    if given is not None:
        return os.fspath(given)
    return os.path.join(os.path.dirname(os.path.abspath(archive.path)), archive.manifest.external_weights.file)


def load_external(archive: Archive, path: str, sha256: str, cache_root: str, verify: str) -> dict[str, torch.Tensor]:
    """The pack's weights from the safetensors file at ``path``, which must have the sha256 ``sha256``.

    The file is opened once: its hash (skipped when the cache records a check of this same, unchanged file
    with that hash and ``verify`` is ``"auto"``), its header and the mapping its tensors view all go through
    that one descriptor. Every weight the manifest lists must be in it with its dtype and shape (an
    ``ArchiveError`` lists every one that is not), under its ``file_name`` or another name of its tensor
    (records of one tensor, their aliases); other tensors in the file are ignored."""
    from . import cache
    from .archive import identity_of, open_regular, whole_file_sha256
    from .errors import ArchiveError, WeightsError
    from .safetensors_file import read_fd

    import time

    began = time.time()
    try:
        fd, st = open_regular(path)
    except ArchiveError as e:
        raise ArchiveError(f"the pack's weights file {e.reason}", path=path) from None
    except OSError as e:
        raise ArchiveError(f"cannot open the pack's weights file: {e.strerror}; it keeps its weights apart "
                           f"(load(pack, weights=PATH) names the file)", path=path) from None
    try:
        identity = identity_of(st)
        with _loaded_lock:
            shared = {w.name: _external.get((*identity, sha256, w.name)) for w in archive.manifest.weights}
        if all(t is not None for t in shared.values()):
            return shared  # this very file, checked by an earlier load in this process
        recorded = cache.find_check(cache_root, identity) if verify == "auto" else None
        if recorded is None or recorded.get("file_sha256") != sha256:
            got = whole_file_sha256(fd, st.st_size, path)
            if got != sha256:
                raise ArchiveError(f"sha256 mismatch of the weights file: expected {sha256}, actual {got}; it is not "
                                   "the file the pack was built or pinned with", path=path)
            cache.save_check(cache_root, identity, "external weights", began, path, got)
        try:
            file = read_fd(path, fd, st.st_size)
        except WeightsError as e:
            raise ArchiveError(e.reason, path=path) from None
    finally:
        os.close(fd)
    problems, keys = [], {}
    for group in tied_groups(archive.manifest):
        # one tensor: under the name the pack's own file gives it, else under any other name of it (a checkpoint
        # that keeps tied weights once, under another of their names)
        names = [group[0].file_name] + [n for w in group for n in (w.name, *w.aliases) if n != group[0].file_name]
        key = next((n for n in names if n in file.info), None)
        w = group[0]
        if key is None:
            problems.append(f"{names[0]} (missing" + (f"; nor under {', '.join(names[1:])})" if names[1:] else ")"))
            continue
        info = file.info[key]
        if (info.dtype, info.shape) != (w.dtype, w.shape):
            problems.append(f"{key} (expected {w.dtype}{list(w.shape)}, actual {info.dtype}{list(info.shape)})")
        keys.update((r.name, key) for r in group)
    if problems:
        raise ArchiveError(f"the weights file does not hold the pack's weights: {'; '.join(problems)}", path=path)
    out, views = {}, {}
    with _loaded_lock:
        for w in archive.manifest.weights:
            t = views.get(keys[w.name])
            if t is None:  # records of one tensor: one view
                t = views[keys[w.name]] = file[keys[w.name]]
            _external[(*identity, sha256, w.name)] = t
            out[w.name] = t
    return out
