"""The pack's weights as tensors: views of the mapped file, shared by every entry and every load.

Each weight is a tensor over its blob's bytes (``Archive.map_blob``): a view of a private copy-on-write
mapping of the pack, so no copy is made and processes that load the same pack share its pages. A second
load of the same, unchanged file in one process reuses the tensors of the first.
"""
from __future__ import annotations

import math
import threading
import weakref

import torch

from .archive import Archive
from .guards import _DTYPE_BY_NAME


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


def load_weights(archive: Archive, identity: tuple) -> dict[str, torch.Tensor]:
    """Every weight of the pack by name, each checked against its sha256 (or shared with an earlier load of
    the same file, ``identity`` being its device, inode, size and modification time)."""
    return {w.name: _weight(archive, identity, w) for w in archive.manifest.weights}
