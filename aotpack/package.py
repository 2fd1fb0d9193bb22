"""Stage 4, package: write the archive. Same inputs, same bytes.

The writer takes the manifest as the runtime's records (``aotpack_runtime.schema.Manifest``), adds the blob
table and the format version, and writes its JSON in the format's one form (``format.canonical_json``). Before
writing, it reads those bytes back (the tensors' hashes, made as they are written, aside) through the reader's
``Manifest.from_json`` (every record, entries and examples included, as ``load`` checks them), so a pack its
reader would refuse is never written. The file
appears atomically (written beside the target, then renamed).

Weights are written from the tensors' own memory, each hashed as it is written (several at once, each at its
offset; the header and manifest last), so packaging holds no copy of them and reads each byte once. Runs of zero bytes inside a weight are left as holes (the file is
sparse where the file system allows; the bytes read back are the same zeros).

May not: decide what is valid: the runtime's ``schema`` checks the manifest before it is written.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import hashlib
import os
import secrets
from dataclasses import dataclass

import torch
import zstandard

from aotpack_runtime import format as fmt
from aotpack_runtime.errors import ArchiveError, BuildError
from aotpack_runtime.schema import BlobRecord, Manifest

# A compressed blob is kept only when it saves at least this fraction of the raw size.
MIN_SAVING = 0.05
# Weights are written in chunks of this size; a chunk of zeros becomes a hole.
WRITE_CHUNK = 1 << 20
_ZEROS = bytes(WRITE_CHUNK)
HASH_THREADS = 8


@dataclass(frozen=True)
class Blob:
    """One blob: ``data`` is bytes, or a tensor whose memory is written as it is (never copied whole).
    ``sha256``: the content's hash where the caller has just checked it (a weight kept from a checked pack),
    so the writer does not hash it again."""

    name: str
    data: bytes | torch.Tensor
    compressible: bool = True
    sha256: str | None = None

    @property
    def size(self) -> int:
        return self.data.numel() * self.data.element_size() if isinstance(self.data, torch.Tensor) else len(self.data)


@dataclass(frozen=True)
class StoredBlob:
    """A blob copied as another pack stores it (``stored``: its bytes, maybe compressed, with ``compression``),
    whose content of ``size`` bytes the caller checked against ``sha256``: written verbatim, neither
    recompressed nor hashed again. The same bytes as a build writes, which compresses deterministically."""

    name: str
    stored: bytes | bytearray
    compression: str
    size: int
    sha256: str


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The tensor's elements as contiguous little-endian bytes (no pickle, no NumPy needed)."""
    t = t.detach().to("cpu").contiguous()
    n = t.numel() * t.element_size()
    return ctypes.string_at(t.data_ptr(), n) if n else b""


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of the tensor's elements as ``tensor_bytes`` gives them, hashed in place when it is dense."""
    return hashlib.sha256(_memory(_plain(t))).hexdigest()


def _plain(t: torch.Tensor) -> torch.Tensor:
    """The tensor as a dense, contiguous CPU tensor: itself when it already is one (no copy)."""
    return t.detach().to("cpu").contiguous()


def _memory(t: torch.Tensor) -> memoryview:
    """A byte view of a dense, contiguous CPU tensor's memory (valid while ``t`` lives)."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def _stored(blob: Blob | StoredBlob, level: int) -> tuple[bytes | None, str, str | None]:
    """(the stored bytes of a bytes blob, or None for a tensor; compression; sha256 of the content, or None for
    a tensor whose hash is made as it is written)."""
    if isinstance(blob, StoredBlob):
        return blob.stored, blob.compression, blob.sha256
    if isinstance(blob.data, torch.Tensor):
        return None, "none", blob.sha256
    sha = hashlib.sha256(blob.data).hexdigest()
    if blob.compressible and len(blob.data) >= 256:
        packed = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False) \
            .compress(blob.data)
        if len(packed) <= len(blob.data) * (1 - MIN_SAVING) and len(blob.data) <= fmt.zstd_limit(len(packed)):
            return packed, "zstd", sha
    return blob.data, "none", sha


def _pwrite(fd: int, data, at: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, at)
        view, at = view[n:], at + n


def _write_tensor(fd: int, t: torch.Tensor, at: int, hashed: bool) -> str | None:
    """Write a tensor's bytes at offset ``at`` of the file, leaving a hole for each chunk of zeros; hash them
    on the way unless ``hashed`` (its sha256 is known). Returns the sha256 made, or None."""
    t = _plain(t)
    view = _memory(t)
    h = None if hashed else hashlib.sha256()
    for start in range(0, len(view), WRITE_CHUNK):
        chunk = view[start:start + WRITE_CHUNK]
        if h is not None:
            h.update(chunk)
        # The two end bytes rule out almost every chunk of real weights before a full comparison.
        if not (chunk[0] == 0 and chunk[-1] == 0 and bytes(chunk) == _ZEROS[:len(chunk)]):
            _pwrite(fd, chunk, at + start)
    return None if h is None else h.hexdigest()


def _records(blobs: list, stored: list, hashes: dict[int, str]) -> tuple[BlobRecord, ...]:
    """The blob table: each blob at the next aligned offset (a tensor's sha256 from ``hashes`` by its index,
    or 64 zeros while it is not made yet: a sha256 is always 64 hex digits, so the table's length is final)."""
    records = []
    offset = 0
    for i, (blob, (data, compression, sha)) in enumerate(zip(blobs, stored)):
        offset = fmt.align(offset)
        size = blob.size
        records.append(BlobRecord(name=blob.name, offset=offset, stored_size=size if data is None else len(data),
                                  size=size, sha256=sha or hashes.get(i, "0" * 64), compression=compression))
        offset += records[-1].stored_size
    return tuple(records)


def write_archive(path: str | os.PathLike, manifest: Manifest | dict, blobs: list[Blob | StoredBlob],
                  level: int) -> int:
    """Write ``manifest`` (its blob table and format version are filled in here) and ``blobs`` to ``path``;
    return the file size. ``manifest`` is the records a build or a reweight made, or, for a synthetic pack (a
    test's), the manifest's JSON without its blob table; either way its bytes are read back and checked.

    Bytes blobs are compressed and hashed first. A tensor is hashed as it is written, several tensors at once
    (one thread per core), each at its offset in the file: the offsets and the manifest's length do not
    depend on the hashes, so the header and the manifest, with the hashes, are written last. Each byte of a
    weight is read from memory once."""
    with concurrent.futures.ThreadPoolExecutor(HASH_THREADS) as pool:  # hashlib and zstd release the GIL
        stored = list(pool.map(lambda b: _stored(b, level), blobs))
    if isinstance(manifest, Manifest):
        version = fmt.version_for(manifest.to_json())  # the oldest that can describe it (blobs change nothing)

        def body_of(hashes: dict[int, str]) -> dict:
            return manifest.with_blobs(_records(blobs, stored, hashes), version).to_json()
    else:
        version = fmt.version_for(manifest)

        def body_of(hashes: dict[int, str]) -> dict:
            return dict(manifest, blobs=[r.to_json() for r in _records(blobs, stored, hashes)], format="aotpack",
                        format_version=version)

    records = _records(blobs, stored, {})
    mbytes = fmt.canonical_json(body_of({}))
    try:  # the reader's checks are the writer's: the bytes about to be written (tensors' hashes aside), read back
        Manifest.from_json(fmt.parse_json(mbytes))
    except ArchiveError as e:
        raise BuildError(f"the pack's manifest fails the reader's check ({e.reason}); this is a bug in aotpack: "
                         "please report it with the model") from None
    region = fmt.align(fmt.HEADER_SIZE + len(mbytes))
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise BuildError(f"cannot write {path}: the folder {folder} does not exist")
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            tensors = []
            for i, (rec, blob, (data, _, sha)) in enumerate(zip(records, blobs, stored)):
                if data is None:
                    tensors.append((i, blob.data, region + rec.offset, sha is not None))
                else:
                    _pwrite(fd, data, region + rec.offset)
            threads = max(1, min(HASH_THREADS, len(os.sched_getaffinity(0)), len(tensors)))
            with concurrent.futures.ThreadPoolExecutor(threads) as pool:  # hashlib and pwrite release the GIL
                made = list(pool.map(lambda job: _write_tensor(fd, job[1], job[2], job[3]), tensors))
            hashes = {i: sha for (i, _, _, _), sha in zip(tensors, made) if sha is not None}
            mbytes = fmt.canonical_json(body_of(hashes))
            if fmt.align(fmt.HEADER_SIZE + len(mbytes)) != region:
                raise BuildError("the manifest's length changed with its hashes; this is a bug in aotpack")
            header = fmt.HEADER.pack(fmt.MAGIC, version, 0, len(mbytes), hashlib.sha256(mbytes).digest())
            _pwrite(fd, header + mbytes, 0)  # the padding up to the blobs is a hole: zeros
            last = records[-1] if records else None
            size = region + (last.offset + last.stored_size if last else 0)
            os.ftruncate(fd, size)  # a hole at the end still counts
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise BuildError(f"cannot write {path}: {e.strerror}") from None
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return size
