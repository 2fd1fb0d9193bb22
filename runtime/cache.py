"""The content-addressed extraction cache: native code must be a file on disk to be loaded.

A file's name is its sha256, so two packs that share code share the file. Files are written to a unique
temporary name in the same folder and renamed into place (atomic on POSIX), so a process never sees a
half-written file, even when several load the same pack at the same moment. A file found in the cache is
hashed again before it is loaded: a cache folder is never trusted more than the archive.
"""
from __future__ import annotations

import hashlib
import os
import secrets

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
