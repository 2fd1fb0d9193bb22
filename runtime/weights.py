"""The pack's weights as tensors: views of the mapped file, shared by every entry and every load.

Each weight is a tensor over its blob's bytes (``Archive.map_blob``): a view of a private copy-on-write
mapping of the pack, so no copy is made, processes that load the same pack share its pages, and a page is
read from the file only when the compiled code first uses it. A second load of the same, unchanged file in
one process reuses the tensors of the first.

``prefetch`` reads the weights' pages in the background instead (opt-in: ``load(..., prefetch=True)``).

May not: copy a weight at load: a tensor is a view of the mapped blob.
"""
from __future__ import annotations

import ctypes
import errno
import math
import mmap
import threading
import weakref

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
