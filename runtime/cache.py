"""The content-addressed extraction cache: native code must be a file on disk to be loaded.

A file's name is its sha256, so two packs that share code share the file. Files are written to a unique
temporary name in the same folder and renamed into place (atomic on POSIX), so a process never sees a
half-written file, even when several load the same pack at the same moment. A file found in the cache is
hashed again before it is loaded: a cache folder is never trusted more than the archive.

The GPU kernels of a CUDA entry are loaded by its compiled code from one folder, by file name, so they are
cached as a folder (``kernels/<sha256 of the file names and hashes>/``), written whole into a temporary
folder and renamed into place, and every file in it is hashed again when it is found.
"""
from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil

from .errors import ArchiveError


def default_cache_dir() -> str:
    """``$AOTPACK_CACHE_DIR``, else ``$XDG_CACHE_HOME/aotpack``, else ``~/.cache/aotpack``."""
    env = os.environ.get("AOTPACK_CACHE_DIR")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "aotpack")


def file_sha256(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest() if hasattr(hashlib, "file_digest") \
                else hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def cached_path(cache_dir: str, sha256: str, suffix: str) -> str:
    if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
        raise ArchiveError(f"refusing a cache name that is not a sha256: {sha256!r}")
    return os.path.join(cache_dir, "lib", f"{sha256}{suffix}")


def lookup(cache_dir: str, sha256: str, suffix: str) -> str | None:
    """The cached file with this content, if present and intact."""
    path = cached_path(cache_dir, sha256, suffix)
    return path if file_sha256(path) == sha256 else None


def store(cache_dir: str, sha256: str, suffix: str, data: bytes) -> str:
    """Write ``data`` (already checked against ``sha256``) into the cache atomically; return its path."""
    path = cached_path(cache_dir, sha256, suffix)
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{sha256[:16]}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o555)
        os.replace(tmp, path)
    except OSError as e:
        raise ArchiveError(f"cannot write the extraction cache at {folder}: {e.strerror}; set "
                           "AOTPACK_CACHE_DIR or pass cache_dir= to a writable folder") from None
    return path


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
    """The cached folder holding these files, if present and every file in it intact."""
    path = bundle_path(cache_dir, files)
    if all(file_sha256(os.path.join(path, name)) == sha for name, sha in files.items()) and os.path.isdir(path):
        return path
    return None


def store_dir(cache_dir: str, files: dict[str, str], contents: dict[str, bytes]) -> str:
    """Write a folder of files (``contents``, already checked against ``files``' hashes) into the cache
    atomically: whole into a temporary folder, then renamed into place. Return its path.

    A folder already there (another process won the race) is used if intact; a damaged one is moved aside
    and removed, then replaced.
    """
    path = bundle_path(cache_dir, files)
    parent = os.path.dirname(path)
    token = f"{os.getpid()}.{secrets.token_hex(4)}"
    tmp = os.path.join(parent, f".{os.path.basename(path)[:16]}.{token}.tmp")
    try:
        os.makedirs(parent, exist_ok=True)
        os.mkdir(tmp)
        for name in sorted(files):
            target = os.path.join(tmp, name)
            with open(target, "wb") as f:
                f.write(contents[name])
                f.flush()
                os.fsync(f.fileno())
            os.chmod(target, 0o444)
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
        raise ArchiveError(f"cannot write the extraction cache at {parent}: {e.strerror}; set "
                           "AOTPACK_CACHE_DIR or pass cache_dir= to a writable folder") from None
    shutil.rmtree(tmp, ignore_errors=True)
    raise ArchiveError(f"cannot put the kernel folder {path} into the extraction cache: another process keeps "
                       "replacing it with different content; clear the cache folder")
