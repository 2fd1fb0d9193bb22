"""Reading an archive: nothing in it is trusted before it is checked.

Order of checks: the header (magic, version range, manifest size against the file size), the manifest's
hash, its JSON (strict: no duplicate keys, no NaN, canonical form) and schema, the blob table's layout (every
blob aligned, in order, inside the file, and the file ending exactly where the last blob ends). A blob's
bytes are hashed before they are used.
"""
from __future__ import annotations

import hashlib
import mmap
import os

import zstandard

from . import format as fmt
from .errors import ArchiveError


def _sniff(head: bytes) -> str:
    """What a file that is not an aotpack archive most likely is, for the error message."""
    text = head.lstrip()[:64].lower()
    if head.startswith(b"version https://git-lfs"):
        return ("a Git LFS pointer file, not the pack itself: run `git lfs pull` (or fetch the real file) "
                "and load that")
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
        return "an HTML or XML page (a download that returned a web page instead of the file?)"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (a torch .pt2 / AOTInductor package or other zip), not an aotpack archive"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "a zstd-compressed file: decompress it first (`zstd -d`)"
    if head.startswith(b"\x7fELF"):
        return "an ELF binary (a shared object?), not an aotpack archive"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip file: decompress it first"
    if len(head) == 0:
        return "an empty file"
    return "not an aotpack archive (no AOTPACK magic at byte 0)"


class Archive:
    """An opened, checked archive. Blobs are read on demand with :meth:`read_blob`."""

    def __init__(self, path: str, manifest: fmt.Manifest, manifest_bytes: bytes, region_start: int,
                 file_size: int, header_version: int):
        self.path = path
        self.manifest = manifest
        self.manifest_bytes = manifest_bytes
        self.region_start = region_start
        self.file_size = file_size
        self.header_version = header_version
        self._map: mmap.mmap | None = None

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Archive":
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(fmt.HEADER_SIZE)
                return cls._open(path, f, size, head)
        except ArchiveError as e:
            if e.path is None:
                raise ArchiveError(e.reason, path=path) from None
            raise
        except FileNotFoundError:
            raise ArchiveError("no such file", path=path) from None
        except IsADirectoryError:
            raise ArchiveError("is a directory, not a pack file", path=path) from None
        except PermissionError:
            raise ArchiveError("permission denied reading the pack", path=path) from None

    @classmethod
    def _open(cls, path: str, f, size: int, head: bytes) -> "Archive":
        if not head.startswith(fmt.MAGIC):
            if len(head) < len(fmt.MAGIC) and fmt.MAGIC.startswith(head) and head:
                raise ArchiveError(f"truncated at byte {len(head)}: the file ends inside the header")
            raise ArchiveError(_sniff(head))
        if len(head) < fmt.HEADER_SIZE:
            raise ArchiveError(f"truncated at byte {size}: the header needs {fmt.HEADER_SIZE} bytes")
        _, version, flags, mlen, msha = fmt.HEADER.unpack(head)
        if not fmt.MIN_READ_VERSION <= version <= fmt.FORMAT_VERSION:
            newer = version > fmt.FORMAT_VERSION
            raise ArchiveError(
                f"unsupported format version {version} (this reader: {fmt.MIN_READ_VERSION}.."
                f"{fmt.FORMAT_VERSION}); " + ("upgrade aotpack to load it" if newer else
                                              "rebuild the pack with this aotpack"))
        if flags != 0:
            raise ArchiveError(f"header flags are {flags:#x}; this reader knows none (expected 0)")
        if mlen > fmt.MAX_MANIFEST_BYTES:
            raise ArchiveError(f"manifest too large: header says {mlen} bytes, the limit is "
                               f"{fmt.MAX_MANIFEST_BYTES}")
        if fmt.HEADER_SIZE + mlen > size:
            raise ArchiveError(f"truncated at byte {size}: the manifest should end at byte "
                               f"{fmt.HEADER_SIZE + mlen}")
        mbytes = f.read(mlen)
        if len(mbytes) != mlen:
            raise ArchiveError(f"truncated at byte {fmt.HEADER_SIZE + len(mbytes)} while reading the manifest")
        if hashlib.sha256(mbytes).digest() != msha:
            raise ArchiveError("hash mismatch in the manifest: the file is corrupt or was modified")
        obj = fmt.parse_json(mbytes)
        try:
            canonical = fmt.canonical_json(obj)
        except UnicodeEncodeError:  # a lone surrogate, which only a \u escape (not canonical) can spell
            canonical = None
        if canonical != mbytes:
            raise ArchiveError("manifest is not in canonical form (sorted keys, no whitespace)")
        manifest = fmt.Manifest.from_json(obj)
        if manifest.format_version != version:
            raise ArchiveError(f"manifest says format version {manifest.format_version} but the header "
                               f"says {version}")
        region = fmt.align(fmt.HEADER_SIZE + mlen)
        cls._check_layout(manifest, region, size)
        return cls(path, manifest, mbytes, region, size, version)

    @staticmethod
    def _check_layout(manifest: fmt.Manifest, region: int, size: int) -> None:
        expected = 0
        for b in manifest.blobs:
            if b.offset != expected:
                raise ArchiveError(f"blob {b.name!r} starts at offset {b.offset}; the layout requires "
                                   f"{expected} (blobs are stored in table order, {fmt.ALIGN}-byte aligned)")
            end = region + b.offset + b.stored_size
            if end > size:
                raise ArchiveError(f"truncated at byte {size}: blob {b.name!r} should end at byte {end}")
            expected = fmt.align(b.offset + b.stored_size)
        last = region + manifest.blobs[-1].offset + manifest.blobs[-1].stored_size if manifest.blobs else region
        if size != last:
            raise ArchiveError(f"file is {size} bytes but its last blob ends at byte {last} "
                               "(trailing data, or a truncated copy)")

    # -- blobs ---------------------------------------------------------------------------------

    def read_stored(self, name: str) -> bytes:
        """The blob's bytes as stored (maybe compressed), unchecked."""
        b = self.manifest.blob(name)
        with open(self.path, "rb") as f:
            f.seek(self.region_start + b.offset)
            data = f.read(b.stored_size)
        if len(data) != b.stored_size:
            raise ArchiveError(f"truncated: blob {name!r} has {len(data)} of {b.stored_size} bytes "
                               "(the file changed while it was read?)", path=self.path)
        return data

    def read_blob(self, name: str) -> bytes:
        """The blob's content, decompressed and checked against its sha256."""
        b = self.manifest.blob(name)
        data = self.read_stored(name)
        if b.compression == "zstd":
            data = decompress(data, b.size, name, self.path)
        if len(data) != b.size:
            raise ArchiveError(f"blob {name!r} is {len(data)} bytes, the manifest says {b.size}", path=self.path)
        if hashlib.sha256(data).hexdigest() != b.sha256:
            raise ArchiveError(f"hash mismatch in blob {name!r}: the file is corrupt or was modified",
                               path=self.path)
        return data

    def map_blob(self, name: str) -> memoryview | bytearray:
        """The blob's checked content without a copy where possible.

        An uncompressed blob is a view of a private copy-on-write mapping of the file: its pages are
        shared with the page cache (and with every process that maps the same pack) until written. A
        pack must therefore be replaced by renaming a new file over it, never rewritten in place while
        loaded. A compressed blob is decompressed into memory.
        """
        b = self.manifest.blob(name)
        if b.compression != "none" or b.size == 0:
            return bytearray(self.read_blob(name))
        if self._map is None:
            with open(self.path, "rb") as f:
                if os.fstat(f.fileno()).st_size != self.file_size:
                    raise ArchiveError("the file changed size since it was opened", path=self.path)
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        start = self.region_start + b.offset
        view = memoryview(self._map)[start:start + b.size]
        if hashlib.sha256(view).hexdigest() != b.sha256:
            raise ArchiveError(f"hash mismatch in blob {name!r}: the file is corrupt or was modified",
                               path=self.path)
        return view

    def verify(self) -> None:
        """Read and hash every blob, and check that padding between blobs is zero."""
        for b in self.manifest.blobs:
            self.read_blob(b.name)
        with open(self.path, "rb") as f:
            pos = self.region_start
            for b in self.manifest.blobs:
                start = self.region_start + b.offset
                f.seek(pos)
                pad = f.read(start - pos)
                if pad.strip(b"\x00"):
                    raise ArchiveError(f"non-zero padding before blob {b.name!r}", path=self.path)
                pos = start + b.stored_size
            f.seek(fmt.HEADER_SIZE + len(self.manifest_bytes))
            if f.read(self.region_start - fmt.HEADER_SIZE - len(self.manifest_bytes)).strip(b"\x00"):
                raise ArchiveError("non-zero padding after the manifest", path=self.path)


def decompress(data: bytes, size: int, name: str, path: str | None = None) -> bytes:
    """Decompress one zstd frame of known size; anything else is an ArchiveError."""
    try:
        params = zstandard.get_frame_parameters(data)
    except zstandard.ZstdError as e:
        raise ArchiveError(f"blob {name!r} is not valid zstd data ({e})", path=path) from None
    if params.content_size != size:
        raise ArchiveError(f"blob {name!r}: zstd frame declares {params.content_size} bytes, the manifest "
                           f"says {size}", path=path)
    try:
        # Bytes after the frame would be covered by no hash: the format allows exactly one frame.
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise ArchiveError(f"blob {name!r}: zstd data is corrupt ({e})", path=path) from None
    except MemoryError:  # the frame, like the manifest, declares the size; this host cannot hold it
        raise ArchiveError(f"blob {name!r} declares {size} bytes, more than this process can allocate",
                           path=path) from None
    return out
