"""The content-addressed code cache: native code must be a file on disk to be loaded.

A file's name is its sha256, so two packs that share code share the file. Files are written to a unique
temporary name in the same folder and renamed into place (atomic on POSIX), so a process never sees a
half-written file, even when several load the same pack at the same moment. A file found in the code cache is
hashed again before it is loaded: a cache folder is never trusted more than the archive.

Whoever can write a folder the native code is loaded from runs code in this process, so every folder of the
cache (the root, ``lib/``, ``kernels/`` and each kernel folder) is created private (mode 0700) and checked
before use: a folder, not a symbolic link (the root may be one: its target is checked), owned by this user,
writable by no other (``private_folder``; a folder that fails is an ArchiveError naming it). Only regular
files are read from it, opened without following links. A library is hashed through a descriptor and loaded
through the same one (``CachedFile.loadable``: ``/proc/self/fd/N``), so the bytes that are loaded are the
bytes that were hashed, whatever happens to the name in between.

The GPU kernels of a CUDA entry are loaded by its compiled code from one folder, by file name, so they are
cached as a folder (``kernels/<sha256 of the file names and hashes>/``), written whole into a temporary
folder and renamed into place, and every file in it is hashed again when it is found.

The cache also keeps records of completed checks (``checked/``): that every blob of one pack file matched its
sha256 (and, when a load hashed the whole file for a pin or a signature, that file's sha256). A record names
the file by its identity (device, inode, size, modification and change time) and its manifest's sha256, so a
later load of the same, unchanged file can skip hashing its weights; any write to the file, or a file renamed
over it, changes the identity and means a full check again. Records are written only for a file whose last
change is ``SETTLE_SECONDS`` older than the check (a write in the same clock tick as the last one would not
change the identity) and are trusted only in a folder that no other user can write.

May not: decide what a blob means or load it: it stores and checks bytes by their hash.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
import stat

from .errors import ArchiveError

# A file changed less than this long before its check began gets no record: file times tick coarsely (a
# jiffy on Linux, up to 2 s on some file systems), and a write in the tick of the last change before the
# check would leave the identity unchanged.
SETTLE_SECONDS = 2.0
CHECK_RECORD = "aotpack-check"
MAX_RECORD_BYTES = 1 << 16


def default_cache_dir() -> str:
    """``$AOTPACK_CACHE_DIR``, else ``$XDG_CACHE_HOME/aotpack``, else ``~/.cache/aotpack``."""
    env = os.environ.get("AOTPACK_CACHE_DIR")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "aotpack")


_HASH_CHUNK = 1 << 20


def private_folder(folder: str, *, root: bool = False) -> str:
    """``folder``, created (mode 0700) if absent, after checking that it is a folder (not a symbolic link,
    unless ``root``: then its target is checked) that this user owns and no other user can write. Anything
    else is an ArchiveError naming the folder and what to do."""
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        st = os.stat(folder) if root else os.lstat(folder)
    except OSError as e:
        raise ArchiveError(f"cannot create the code cache folder {folder}: {e.strerror}; set "
                           "AOTPACK_CACHE_DIR or pass cache_dir= to a writable folder") from None
    problem = None
    if stat.S_ISLNK(st.st_mode):
        problem = "a symbolic link"
    elif not stat.S_ISDIR(st.st_mode):
        problem = "not a folder"
    elif st.st_uid != os.geteuid():
        problem = f"owned by user {st.st_uid}, not by this user ({os.geteuid()})"
    elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = f"writable by other users (mode {stat.S_IMODE(st.st_mode):04o})"
    if problem is not None:
        raise ArchiveError(f"the code cache folder {folder} is {problem}: native code is loaded from it, so "
                           "it must be a folder of this user's that no other user can write; fix it (chmod 700) or "
                           "set AOTPACK_CACHE_DIR or pass cache_dir= to another folder")
    return folder


def code_folder(cache_dir: str, name: str) -> str:
    """The checked private folder ``name`` (``lib``, ``kernels``) of the cache, its root checked first."""
    private_folder(cache_dir, root=True)
    return private_folder(os.path.join(cache_dir, name))


def open_file(path: str) -> int | None:
    """A descriptor of the regular file at ``path`` (not followed if it is a link), or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def fd_sha256(fd: int) -> str:
    """sha256 of the whole file open at ``fd``, read through it from the start."""
    h = hashlib.sha256()
    pos = 0
    while True:
        chunk = os.pread(fd, _HASH_CHUNK, pos)
        if not chunk:
            return h.hexdigest()
        h.update(chunk)
        pos += len(chunk)


def file_sha256(path: str) -> str | None:
    """sha256 of the regular file at ``path`` (not a link), or None."""
    fd = open_file(path)
    if fd is None:
        return None
    try:
        return fd_sha256(fd)
    finally:
        os.close(fd)


class CachedFile:
    """A file of the cache, open: ``fd`` is the descriptor its content was hashed (or written) through, and
    ``loadable`` the name that opens that very file (``/proc/self/fd/N``, or the path where there is no
    /proc). ``close()`` once it is loaded."""

    def __init__(self, path: str, fd: int):
        self.path = path
        self.fd = fd
        self.loadable = f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else path

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        self.close()


def cached_path(cache_dir: str, sha256: str, suffix: str) -> str:
    if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
        raise ArchiveError(f"refusing a cache name that is not a sha256: {sha256!r}")
    return os.path.join(cache_dir, "lib", f"{sha256}{suffix}")


def lookup(cache_dir: str, sha256: str, suffix: str) -> CachedFile | None:
    """The cached file with this content, open, if present, a regular file and intact."""
    path = cached_path(cache_dir, sha256, suffix)
    code_folder(cache_dir, "lib")
    fd = open_file(path)
    if fd is None:
        return None
    if fd_sha256(fd) != sha256:
        os.close(fd)
        return None
    return CachedFile(path, fd)


def store(cache_dir: str, sha256: str, suffix: str, data) -> CachedFile:
    """Write ``data`` (bytes, or chunks of them that end in an ArchiveError if they do not match) into the
    cache atomically, hashing what is written; return the file, open through the descriptor it was written
    with. A content other than ``sha256`` is an ArchiveError and leaves nothing behind."""
    path = cached_path(cache_dir, sha256, suffix)
    folder = code_folder(cache_dir, "lib")
    tmp = os.path.join(folder, f".{sha256[:16]}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = None
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        h = hashlib.sha256()
        for chunk in ([data] if isinstance(data, (bytes, bytearray, memoryview)) else data):
            h.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        if h.hexdigest() != sha256:
            raise ArchiveError(f"refusing to cache content whose sha256 is {h.hexdigest()}, not {sha256}")
        os.fsync(fd)
        os.fchmod(fd, 0o555)
        os.replace(tmp, path)
    except OSError as e:
        _discard(fd, tmp)
        raise ArchiveError(f"cannot write the code cache at {folder}: {e.strerror}; set "
                           "AOTPACK_CACHE_DIR or pass cache_dir= to a writable folder") from None
    except BaseException:
        _discard(fd, tmp)
        raise
    return CachedFile(path, fd)


def _discard(fd: int | None, tmp: str) -> None:
    if fd is not None:
        os.close(fd)
    try:
        os.unlink(tmp)
    except OSError:
        pass


def bundle_digest(files: dict[str, str]) -> str:
    """The name of the folder that holds exactly ``files`` (file name -> sha256 of its content)."""
    text = "".join(f"{name}\0{sha}\n" for name, sha in sorted(files.items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def bundle_path(cache_dir: str, files: dict[str, str]) -> str:
    for name, sha in files.items():
        if "/" in name or "\0" in name or name in ("", ".", ".."):
            raise ArchiveError(f"refusing a cache file name that is not a plain file name: {name!r}")
        cached_path(cache_dir, sha, "")  # checks that it is a sha256
    return os.path.join(cache_dir, "kernels", bundle_digest(files))


def lookup_dir(cache_dir: str, files: dict[str, str]) -> str | None:
    """The cached folder holding these files, if present, private, and every file in it a regular file and
    intact. (GPU kernels are loaded by name from it, at their first launch: the folder's privacy, checked
    here, is what keeps them the files that were hashed.)"""
    path = bundle_path(cache_dir, files)
    code_folder(cache_dir, "kernels")
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return None
    private_folder(path)
    if all(file_sha256(os.path.join(path, name)) == sha for name, sha in files.items()):
        return path
    return None


def store_dir(cache_dir: str, files: dict[str, str], contents: dict[str, bytes]) -> str:
    """Write a folder of files (``contents``, already checked against ``files``' hashes) into the cache
    atomically: whole into a temporary folder, then renamed into place. Return its path.

    A folder already there (another process won the race) is used if intact; a damaged one is moved aside
    and removed, then replaced.
    """
    path = bundle_path(cache_dir, files)
    parent = code_folder(cache_dir, "kernels")
    token = f"{os.getpid()}.{secrets.token_hex(4)}"
    tmp = os.path.join(parent, f".{os.path.basename(path)[:16]}.{token}.tmp")
    try:
        os.mkdir(tmp, 0o700)
        for name in sorted(files):
            target = os.path.join(tmp, name)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(contents[name])
                f.flush()
                os.fsync(f.fileno())
                os.fchmod(f.fileno(), 0o444)
        for attempt in range(3):
            try:
                os.rename(tmp, path)
                return path
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
            if lookup_dir(cache_dir, files):
                shutil.rmtree(tmp, ignore_errors=True)
                return path
            aside = f"{path}.{token}.{attempt}.bad"
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue
            shutil.rmtree(aside, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ArchiveError(f"cannot write the code cache at {parent}: {e.strerror}; set "
                           "AOTPACK_CACHE_DIR or pass cache_dir= to a writable folder") from None
    shutil.rmtree(tmp, ignore_errors=True)
    raise ArchiveError(f"cannot put the kernel folder {path} into the code cache: another process keeps "
                       "replacing it with different content; clear the code cache folder")


# -- records of completed checks -------------------------------------------------------------------------

def check_record_path(cache_dir: str, identity: tuple) -> str:
    """Where the record of a check of the file with this identity lives."""
    key = ":".join(str(int(v)) for v in identity)
    return os.path.join(cache_dir, "checked", hashlib.sha256(key.encode("ascii")).hexdigest() + ".json")


def _private(st: os.stat_result) -> bool:
    """Owned by this user and writable by nobody else: a record there was written by this user."""
    return st.st_uid == os.geteuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def find_check(cache_dir: str, identity: tuple, manifest_sha256: str | None = None) -> dict | None:
    """The record of a completed check of the file with ``identity`` (and this manifest, when given), or None:
    absent, unreadable, for another file, or in a folder other users can write."""
    path = check_record_path(cache_dir, identity)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
        try:
            st = os.fstat(fd)
            data = os.read(fd, MAX_RECORD_BYTES + 1) if stat.S_ISREG(st.st_mode) else b""
        finally:
            os.close(fd)
        if not _private(st) or not _private(os.stat(os.path.dirname(path))):
            return None
        record = json.loads(data.decode("utf-8")) if 0 < len(data) <= MAX_RECORD_BYTES else None
    except (OSError, ValueError):  # no record (or a damaged one): the load checks every blob again
        return None
    if not isinstance(record, dict) or record.get("format") != CHECK_RECORD or \
            record.get("identity") != [int(v) for v in identity]:
        return None
    if not isinstance(record.get("manifest_sha256"), str) or \
            (manifest_sha256 is not None and record["manifest_sha256"] != manifest_sha256):
        return None
    file_sha = record.get("file_sha256")
    if file_sha is not None and not (isinstance(file_sha, str) and len(file_sha) == 64):
        return None
    return record


def save_check(cache_dir: str, identity: tuple, manifest_sha256: str, started: float, pack_path: str,
               file_sha256: str | None = None) -> bool:
    """Record that every blob of the file with ``identity`` matched its sha256, in a check that began at
    ``started`` (``time.time()``); ``file_sha256`` is the whole file's, when it was hashed for this identity.

    Nothing is written for a file changed less than ``SETTLE_SECONDS`` before the check began. Returns
    whether a record was written; a cache folder that cannot be written is not an error (the next load
    checks again).
    """
    ctime = identity[4] / 1e9
    if started - ctime < SETTLE_SECONDS:
        return False
    path = check_record_path(cache_dir, identity)
    folder = os.path.dirname(path)
    record = {"format": CHECK_RECORD, "identity": [int(v) for v in identity], "manifest_sha256": manifest_sha256,
              "file_sha256": file_sha256, "checked": "every blob", "path": os.path.abspath(pack_path),
              "checked_at": round(started, 3)}
    tmp = os.path.join(folder, f".{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return False
    return True

