"""Reading an archive: nothing in it is trusted before it is checked.

Order of checks: the header (magic, version range, manifest size against the file size), the manifest's
hash, its JSON (strict: no duplicate keys, no NaN, canonical form) and its records (``schema.Manifest``: every
field and what the records say of each other, entries and examples included), the blob table's layout (every
blob aligned, in order, inside the file, and the file ending exactly where the last blob ends). A blob's
bytes are hashed before they are used: when it is read (``read_blob``), or for the whole pack at once
(``check_blobs``, in parallel threads) before blobs are mapped unchecked (``map_blob(checked=True)``).

The archive keeps the file it opened: every read and the mapping come from that file, so a pack renamed over
while it is loaded is read consistently, and ``identity`` (device, inode, size, modification and change
time, from the open file) names exactly the bytes that were checked. A load opens the pack once
(``open_regular``) and hashes it for a pin or a signature through the same descriptor it then reads and maps
(``whole_file_sha256``, ``Archive.from_fd``): a path opened twice would be two files to whoever can rename
or re-link it in between. Only a regular file is opened: a FIFO or a device would block a reader or never end.

May not: give meaning to entries, guards or state (``entries``, ``guards``, ``sessions`` do), or load native code
(``devices``, ``entries``).
"""
from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import mmap
import os
import stat

from . import format as fmt
from . import schema
from .errors import ArchiveError

# Blobs are hashed in chunks of this many bytes (read into a buffer per thread, never the whole blob).
HASH_CHUNK = 8 << 20
# At most this many threads hash blobs at once (hashlib and file reads release the GIL), each a blob of at
# least PARALLEL_MIN_BYTES.
MAX_HASH_THREADS = 16
PARALLEL_MIN_BYTES = 1 << 20
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
# A compressed blob is decompressed into a buffer of this many bytes at a time, with a window of at most
# 2**ZSTD_WINDOW_LOG_MAX bytes (zstd's default limit; the writer's levels use far less).
DECOMPRESS_CHUNK = 1 << 20
ZSTD_WINDOW_LOG_MAX = 27
_ZEROS: bytes | None = None  # zeros to hash a hole with, made at first use


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


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def file_kind(mode: int) -> str:
    """What a file of this mode is, in words ("a regular file", "a FIFO (named pipe)", ...)."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((word for test, word in _KINDS if test(mode)), "not a regular file")


def open_regular(path: str) -> tuple[int, os.stat_result]:
    """Open ``path`` for reading and return ``(descriptor, its stat)``; refuse at once anything but a regular
    file with an ArchiveError (without a path; the caller names the file).

    The open does not block: a FIFO opened for reading would wait for a writer, so the file is opened with
    O_NONBLOCK (which regular files ignore) and checked with fstat, the descriptor's own stat. OSErrors of
    the open (no such file, permission denied) propagate for the caller to word."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ArchiveError(f"is {file_kind(st.st_mode)}, not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def identity_of(st: os.stat_result) -> tuple:
    """What tells a file from a replacement or a rewrite: device, inode, size, modification and change time."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def whole_file_sha256(fd: int, size: int, path: str) -> str:
    """sha256 of the first ``size`` bytes of the open file (the whole pack), read in chunks through ``fd``."""
    return _hash_range(fd, 0, size, path, "the file")


class Archive:
    """An opened, checked archive. Blobs are read on demand with :meth:`read_blob`.

    ``identity`` is ``(device, inode, size, mtime_ns, ctime_ns)`` of the opened file, and
    ``manifest_sha256`` the hash the header gives for the manifest (checked).
    """

    def __init__(self, path: str, manifest: schema.Manifest, manifest_bytes: bytes, region_start: int,
                 file_size: int, header_version: int, fd: int | None = None, identity: tuple | None = None):
        self.path = path
        self.manifest = manifest
        self.manifest_bytes = manifest_bytes
        self.manifest_sha256 = hashlib.sha256(manifest_bytes).hexdigest()
        self.region_start = region_start
        self.file_size = file_size
        self.header_version = header_version
        self.identity = identity
        self._fd = fd
        self._map: mmap.mmap | None = None

    def __del__(self) -> None:
        self.close()

    def close(self, _close=os.close) -> None:  # ``_close`` bound now: __del__ may run at interpreter exit
        """Close the file (a mapping made by ``map_blob`` stays valid while its views are used)."""
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            _close(fd)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Archive":
        """Open and check the pack at ``path`` (a regular file)."""
        path = os.fspath(path)
        fd, st = open_pack(path)
        return cls.from_fd(path, fd, st)

    @classmethod
    def from_fd(cls, path: str, fd: int, st: os.stat_result) -> "Archive":
        """Check the pack open at ``fd`` (``st``: its fstat) and return it; the archive owns the descriptor
        from now on (it is closed here if the pack is refused)."""
        try:
            head = _pread(fd, 0, fmt.HEADER_SIZE)
            archive = cls._open(path, fd, st, head)
            fd = None  # the archive owns it now
            return archive
        except ArchiveError as e:
            if e.path is None:
                raise ArchiveError(e.reason, path=path) from None
            raise
        finally:
            if fd is not None:
                os.close(fd)

    @classmethod
    def _open(cls, path: str, fd: int, st: os.stat_result, head: bytes) -> "Archive":
        size = st.st_size
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
        mbytes = bytes(_pread(fd, fmt.HEADER_SIZE, mlen))
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
        manifest = schema.Manifest.from_json(obj)
        if manifest.format_version != version:
            raise ArchiveError(f"manifest says format version {manifest.format_version} but the header "
                               f"says {version}")
        region = fmt.align(fmt.HEADER_SIZE + mlen)
        cls._check_layout(manifest, region, size)
        return cls(path, manifest, mbytes, region, size, version, fd, identity_of(st))

    @staticmethod
    def _check_layout(manifest: schema.Manifest, region: int, size: int) -> None:
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

    def still_same_file(self) -> bool:
        """Whether the opened file still has the identity it had when it was opened (not written since)."""
        if self._fd is None:
            return False
        return identity_of(os.fstat(self._fd)) == self.identity

    def _file(self) -> int:
        if self._fd is None:
            raise ArchiveError("the archive was closed", path=self.path)
        return self._fd

    # -- blobs ---------------------------------------------------------------------------------

    def read_stored(self, name: str) -> bytes | bytearray:
        """The blob's bytes as stored (maybe compressed), unchecked."""
        b = self.manifest.blob(name)
        data = _pread(self._file(), self.region_start + b.offset, b.stored_size)
        if len(data) != b.stored_size:
            raise ArchiveError(f"truncated: blob {name!r} has {len(data)} of {b.stored_size} bytes "
                               "(the file changed while it was read?)", path=self.path)
        return data

    def chunks(self, name: str):
        """The blob's content in chunks (views valid until the next one), checked against its sha256 at the end:
        the last chunk is followed by an ArchiveError instead of the end when the blob does not match. A
        compressed blob is decompressed as it is read, through fixed buffers (``zstd_chunks``)."""
        b = self.manifest.blob(name)
        h = hashlib.sha256()
        if b.compression == "zstd":
            for chunk in zstd_chunks(self._file(), self.region_start + b.offset, b.stored_size, b.size, name,
                                     self.path):
                h.update(chunk)
                yield chunk
        else:
            data = self.read_stored(name)
            h.update(data)
            yield data
        if h.hexdigest() != b.sha256:
            raise ArchiveError(_mismatch(name), path=self.path)

    def read_blob(self, name: str) -> bytes | bytearray:
        """The blob's content, decompressed and checked against its sha256. A compressed blob's memory grows
        with what its frame holds, checked as it is read, not with what it declares."""
        b = self.manifest.blob(name)
        if b.compression == "zstd":
            data = bytearray()
            for chunk in self.chunks(name):
                data += chunk
            return data
        data = self.read_stored(name)
        if len(data) != b.size:
            raise ArchiveError(f"blob {name!r} is {len(data)} bytes, the manifest says {b.size}", path=self.path)
        if hashlib.sha256(data).hexdigest() != b.sha256:
            raise ArchiveError(_mismatch(name), path=self.path)
        return data

    def map_blob(self, name: str, checked: bool = False) -> memoryview | bytearray:
        """The blob's checked content without a copy where possible.

        An uncompressed blob is a view of a private copy-on-write mapping of the file: its pages are
        shared with the page cache (and with every process that maps the same pack) until written, and
        read from the file only when first used. A pack must therefore be replaced by renaming a new file
        over it, never rewritten in place while loaded. A compressed blob is decompressed into memory.

        The view is hashed first unless ``checked`` says that ``check_blobs`` (or a record of it for this
        very file) already did; hashing reads every page of the blob.
        """
        b = self.manifest.blob(name)
        if b.compression != "none" or b.size == 0:
            data = self.read_blob(name)
            return data if isinstance(data, bytearray) else bytearray(data)
        if self._map is None:
            fd = self._file()
            if os.fstat(fd).st_size != self.file_size:
                raise ArchiveError("the file changed size since it was opened", path=self.path)
            self._map = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
        start = self.region_start + b.offset
        view = memoryview(self._map)[start:start + b.size]
        if not checked and hashlib.sha256(view).hexdigest() != b.sha256:
            raise ArchiveError(_mismatch(name), path=self.path)
        return view

    def check_blobs(self, threads: int | None = None) -> int:
        """Hash every blob against the manifest, several at once; return the bytes hashed.

        Uncompressed blobs are read in chunks through a buffer per thread (the file's pages go to the page
        cache, not into this process's mapping), holes of a sparse file are hashed as the zeros they read
        as without reading them, and compressed blobs are decompressed as they are read, through fixed
        buffers: memory stays bounded whatever a blob declares. ``threads`` defaults to the
        cores this process may use (at most ``MAX_HASH_THREADS``). The first mismatch in table order is
        the error.
        """
        # Large blobs go to the threads, longest first (they finish together); small ones are hashed here,
        # where a thread hand-off would cost more than the hash (a pack may hold 100,000 tiny blobs).
        large = sorted((b for b in self.manifest.blobs if b.stored_size >= PARALLEL_MIN_BYTES),
                       key=lambda b: -b.stored_size)
        if threads is None:
            threads = min(MAX_HASH_THREADS, len(os.sched_getaffinity(0)))
        threads = max(1, min(threads, len(large)))
        failed: dict[str, ArchiveError] = {}

        def one(b: schema.BlobRecord) -> None:
            try:
                if b.compression != "none":
                    for _ in self.chunks(b.name):
                        pass
                elif _hash_range(self._file(), self.region_start + b.offset, b.size, self.path,
                                 f"blob {b.name!r}") != b.sha256:
                    raise ArchiveError(_mismatch(b.name), path=self.path)
            except ArchiveError as e:
                failed[b.name] = e

        for b in self.manifest.blobs:
            if b.stored_size < PARALLEL_MIN_BYTES:
                one(b)
        if threads == 1:
            for b in large:
                one(b)
        else:
            with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="aotpack-hash") as pool:
                list(pool.map(one, large))
        for b in self.manifest.blobs:
            if b.name in failed:
                raise failed[b.name]
        return sum(b.size for b in self.manifest.blobs)

    def verify(self) -> None:
        """Hash every blob, and check that padding between blobs is zero."""
        self.check_blobs()
        fd = self._file()
        pos = self.region_start
        for b in self.manifest.blobs:
            start = self.region_start + b.offset
            if bytes(_pread(fd, pos, start - pos)).strip(b"\x00"):
                raise ArchiveError(f"non-zero padding before blob {b.name!r}", path=self.path)
            pos = start + b.stored_size
        end = fmt.HEADER_SIZE + len(self.manifest_bytes)
        if bytes(_pread(fd, end, self.region_start - end)).strip(b"\x00"):
            raise ArchiveError("non-zero padding after the manifest", path=self.path)


def open_pack(path: str) -> tuple[int, os.stat_result]:
    """``open_regular`` for a pack: every failure is an ArchiveError naming the pack."""
    try:
        return open_regular(path)
    except ArchiveError as e:
        raise ArchiveError(e.reason, path=path) from None
    except FileNotFoundError:
        raise ArchiveError("no such file", path=path) from None
    except PermissionError:
        raise ArchiveError("permission denied reading the pack", path=path) from None
    except OSError as e:
        raise ArchiveError(f"cannot open the pack: {e.strerror}", path=path) from None


def _mismatch(name: str) -> str:
    return f"hash mismatch in blob {name!r}: the file is corrupt or was modified"


def _pread(fd: int, offset: int, n: int) -> bytes | bytearray:
    """Up to ``n`` bytes at ``offset`` (fewer only at the end of the file); large reads loop, as the
    kernel returns at most about 2 GiB per call."""
    first = os.pread(fd, min(n, 1 << 30), offset)
    if len(first) == n or len(first) < min(n, 1 << 30):
        return first
    buf = bytearray(n)
    buf[:len(first)] = first
    got = len(first)
    view = memoryview(buf)
    while got < n:
        k = os.preadv(fd, [view[got:got + (1 << 30)]], offset + got)
        if k == 0:
            break
        got += k
    del view
    if got < n:
        del buf[got:]
    return buf


def _extent(fd: int, pos: int, end: int) -> tuple[int, int]:
    """``(start, stop)`` of the next stretch of data at or after ``pos``, within ``end``: the bytes before
    ``start`` are a hole of a sparse file, which reads as zeros. Without hole support, ``(pos, end)``."""
    seek_data, seek_hole = getattr(os, "SEEK_DATA", None), getattr(os, "SEEK_HOLE", None)
    if seek_data is None or seek_hole is None:
        return pos, end
    try:
        start = os.lseek(fd, pos, seek_data)
    except OSError as e:
        if e.errno != errno.ENXIO or os.fstat(fd).st_size < end:  # no hole support, or a truncated file
            return pos, end
        return end, end  # ENXIO: a hole up to the end of the file
    if start >= end:
        return end, end
    try:
        stop = os.lseek(fd, start, seek_hole)
    except OSError:
        stop = end
    return start, min(stop, end)


def _hash_range(fd: int, offset: int, size: int, path: str, what: str) -> str:
    """sha256 of ``size`` bytes of the file at ``offset``, read in chunks; holes are hashed as zeros."""
    global _ZEROS
    if size == 0:
        return _EMPTY_SHA256
    if size < PARALLEL_MIN_BYTES:  # one read
        data = _pread(fd, offset, size)
        if len(data) != size:
            raise ArchiveError(f"truncated: {what} ends early (the file changed while it was read?)", path=path)
        return hashlib.sha256(data).hexdigest()
    h = hashlib.sha256()
    view = memoryview(bytearray(min(size, HASH_CHUNK)))
    pos, end = offset, offset + size
    while pos < end:
        start, stop = _extent(fd, pos, end)
        while pos < start:
            if _ZEROS is None:
                _ZEROS = bytes(HASH_CHUNK)
            n = min(start - pos, HASH_CHUNK)
            h.update(memoryview(_ZEROS)[:n])
            pos += n
        while pos < stop:
            got = os.preadv(fd, [view[:min(stop - pos, HASH_CHUNK)]], pos)
            if got == 0:
                raise ArchiveError(f"truncated: {what} ends early (the file changed while it was read?)",
                                   path=path)
            h.update(view[:got])
            pos += got
    return h.hexdigest()


def zstd_chunks(fd: int, offset: int, stored_size: int, size: int, name: str, path: str | None = None):
    """The content of the zstd blob ``name`` stored at ``offset`` of the open file, decompressed in chunks of
    at most ``DECOMPRESS_CHUNK`` bytes (each a view of one reused buffer: use it before asking for the next).

    The blob must be exactly one frame that declares ``size`` bytes and holds them; anything else is an
    ArchiveError, raised as soon as it shows (a frame that holds more than it declares stops there). Memory
    is bounded whatever the frame declares: a read buffer, this output buffer, and zstd's window, at most
    ``2**ZSTD_WINDOW_LOG_MAX`` bytes (and no more than ``size``)."""
    # Imported here, not with the module: a load whose blobs are all stored uncompressed (weights, and code
    # already in the code cache) never needs zstd.
    import zstandard
    from zstandard import backend_cffi as _zstd  # zstd's streaming API, for decompression through fixed buffers

    where = f"blob {name!r}"
    head = bytes(_pread(fd, offset, min(stored_size, 18)))  # 18: the longest frame header
    try:
        params = zstandard.get_frame_parameters(head)
    except zstandard.ZstdError as e:
        raise ArchiveError(f"{where} is not valid zstd data ({e})", path=path) from None
    if params.content_size != size:
        raise ArchiveError(f"{where}: zstd frame declares {params.content_size} bytes, the manifest says {size}",
                           path=path)
    if size <= DECOMPRESS_CHUNK and stored_size <= DECOMPRESS_CHUNK:  # small: in one go, within the same bound
        data = _pread(fd, offset, stored_size)
        if len(data) != stored_size:
            raise ArchiveError(f"truncated: {where} ends early (the file changed while it was read?)", path=path)
        try:
            # Bytes after the frame would be covered by no hash: the format allows exactly one frame.
            yield zstandard.ZstdDecompressor().decompress(data, max_output_size=size, allow_extra_data=False)
        except zstandard.ZstdError as e:
            raise ArchiveError(f"{where}: zstd data is corrupt ({e})", path=path) from None
        return
    lib, ffi = _zstd.lib, _zstd.ffi
    dctx = lib.ZSTD_createDCtx()
    if dctx == ffi.NULL:
        raise ArchiveError(f"{where}: cannot allocate a zstd decompressor", path=path)
    try:
        lib.ZSTD_DCtx_setParameter(dctx, lib.ZSTD_d_windowLogMax, ZSTD_WINDOW_LOG_MAX)
        out = ffi.new("char[]", DECOMPRESS_CHUNK)
        out_buf, in_buf = ffi.new("ZSTD_outBuffer *"), ffi.new("ZSTD_inBuffer *")
        out_buf.dst, out_buf.size = out, DECOMPRESS_CHUNK
        pos, end, produced, ended = offset, offset + stored_size, 0, False
        while pos < end and not ended:
            data = _pread(fd, pos, min(HASH_CHUNK, end - pos))
            if not data:
                raise ArchiveError(f"truncated: {where} ends early (the file changed while it was read?)", path=path)
            pos += len(data)
            source = ffi.from_buffer(data)
            in_buf.src, in_buf.size, in_buf.pos = source, len(data), 0
            while True:
                out_buf.pos = 0
                ret = lib.ZSTD_decompressStream(dctx, out_buf, in_buf)
                if lib.ZSTD_isError(ret):
                    reason = ffi.string(lib.ZSTD_getErrorName(ret)).decode("ascii", "replace")
                    raise ArchiveError(f"{where}: zstd data is corrupt ({reason})", path=path)
                if out_buf.pos:
                    produced += out_buf.pos
                    if produced > size:
                        raise ArchiveError(f"{where}: zstd data holds more than the {size} bytes its frame declares",
                                           path=path)
                    yield ffi.buffer(out, out_buf.pos)
                if ret == 0:  # the frame ended
                    ended = True
                    # Bytes after the frame would be covered by no hash: the format allows exactly one frame.
                    if in_buf.pos != in_buf.size or pos != end:
                        raise ArchiveError(f"{where}: {end - pos + in_buf.size - in_buf.pos} bytes follow its zstd "
                                           "frame; a blob is exactly one frame", path=path)
                    break
                if in_buf.pos == in_buf.size and out_buf.pos < out_buf.size:
                    break  # all input used and no output pending: read more
        if not ended:
            raise ArchiveError(f"{where}: zstd data is corrupt (its frame ends after {produced} of {size} bytes)",
                               path=path)
        if produced != size:
            raise ArchiveError(f"{where} is {produced} bytes, the manifest says {size}", path=path)
    finally:
        lib.ZSTD_freeDCtx(dctx)
