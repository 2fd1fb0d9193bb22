"""Stage 4, package: write the archive. Same inputs, same bytes.

The writer follows the runtime's format module (``aotpack_runtime.format``) and checks its own manifest
with the reader's checks before writing (the schema, and every entry and the example as ``load`` checks
them), so a pack its reader would refuse is never written. The file appears atomically (written beside the target, then
renamed).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import secrets
from dataclasses import dataclass

import torch
import zstandard

from aotpack_runtime import format as fmt
from aotpack_runtime.errors import ArchiveError, BuildError
from aotpack_runtime.loader import check_manifest

# A compressed blob is kept only when it saves at least this fraction of the raw size.
MIN_SAVING = 0.05


@dataclass(frozen=True)
class Blob:
    name: str
    data: bytes
    compressible: bool = True


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The tensor's elements as contiguous little-endian bytes (no pickle, no NumPy needed)."""
    t = t.detach().to("cpu").contiguous()
    n = t.numel() * t.element_size()
    return ctypes.string_at(t.data_ptr(), n) if n else b""


def _store(blob: Blob, level: int) -> tuple[bytes, str]:
    if blob.compressible and len(blob.data) >= 256:
        packed = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False) \
            .compress(blob.data)
        if len(packed) <= len(blob.data) * (1 - MIN_SAVING):
            return packed, "zstd"
    return blob.data, "none"


def write_archive(path: str | os.PathLike, manifest: dict, blobs: list[Blob], level: int) -> int:
    """Write ``manifest`` (without its blob table) and ``blobs`` to ``path``; return the file size."""
    records = []
    stored = []
    offset = 0
    for blob in blobs:
        data, compression = _store(blob, level)
        offset = fmt.align(offset)
        records.append(fmt.BlobRecord(name=blob.name, offset=offset, stored_size=len(data),
                                      size=len(blob.data), sha256=hashlib.sha256(blob.data).hexdigest(),
                                      compression=compression).to_json())
        stored.append(data)
        offset += len(data)
    version = fmt.version_for(manifest)
    body = dict(manifest, blobs=records, format="aotpack", format_version=version)
    try:  # the reader's checks are the writer's
        check_manifest(fmt.Manifest.from_json(body))
    except ArchiveError as e:
        raise BuildError(f"the pack's manifest fails the reader's check ({e.reason}); this is a bug in aotpack: "
                         "please report it with the model") from None
    mbytes = fmt.canonical_json(body)
    header = fmt.HEADER.pack(fmt.MAGIC, version, 0, len(mbytes), hashlib.sha256(mbytes).digest())
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise BuildError(f"cannot write {path}: the folder {folder} does not exist")
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(mbytes)
            pos = fmt.HEADER_SIZE + len(mbytes)
            region = fmt.align(pos)
            f.write(b"\x00" * (region - pos))
            pos = 0
            for rec, data in zip(records, stored):
                f.write(b"\x00" * (rec["offset"] - pos))
                f.write(data)
                pos = rec["offset"] + len(data)
            size = f.tell()
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise BuildError(f"cannot write {path}: {e.strerror}") from None
    return size
