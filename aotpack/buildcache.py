"""The build cache: finished packs kept under a key of everything that decides their bytes.

Builds are reproducible (README, "Reproducibility"), so a pack is a function of its inputs; the key is a
sha256 of those inputs, computed after capture and before compile:

- each entry's captured graph (torch.export's serialized graph and signature, not the Python source), its
  guards and its device;
- every weight's dtype, shape, strides and sha256; the example inputs stored in the pack; the training flag;
- the build options (``BuildOptions.to_json()``: ISA, thread plan, devices, CUDA archs, ...), the pack's
  ``producer`` and ``target`` records, and for each device the whole Inductor and AOT-autograd config a
  compile sees (aotpack's settings and anything set through ``TORCHINDUCTOR_*``);
- the toolchain: aotpack's version and a digest of its own source files, torch's version and git commit,
  triton's version, Python, the C++ compiler's and the linker's version lines, the C library; for CUDA
  entries nvcc's version, torch's CUDA version and the build GPU.

Each entry's record keeps the key's material (``material``), and the manifest sha256 of each stored pack
leads to its key (``remember_manifest``): ``reweight`` finds the record of its base pack there and stores the
pack it writes under the key a full build of the same model with the new weights computes (the material with
the new weights' sha256; see ``reweight.cache_reweighted``).

A hit copies the cached pack to the output (hashing it on the way: a damaged entry is dropped and the build
compiles instead). The cache is a folder (``$AOTPACK_BUILD_CACHE/packs``, beside the toolchain folder of
``toolchain.toolchain_dir``): every file is written under a temporary name and renamed into place, so several
builds, on one host or on many sharing the folder, may write the same entry at once.

May not: capture or compile: it keys, stores and finds finished packs.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import pathlib
import platform
import secrets
import subprocess
import time
import warnings
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from aotpack_runtime.errors import AotpackWarning, BuildError
from aotpack_runtime.format import canonical_json

# g++'s suffix of a precompiled header: Inductor's header NAME.h is precompiled to NAME.h.gch (in the toolchain
# folder, see toolchain.toolchain_dir).
PRECOMPILED_SUFFIX = ".gch"
# Bumped when the key's recipe changes, so that entries made by another recipe are never found.
KEY_VERSION = 1
CHUNK = 1 << 20


def default_root() -> str:
    """``$AOTPACK_BUILD_CACHE``, else ``$XDG_CACHE_HOME/aotpack/build``, else ``~/.cache/aotpack/build``."""
    return os.environ.get("AOTPACK_BUILD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "aotpack", "build")


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@functools.lru_cache(maxsize=None)
def source_digest() -> str:
    """A sha256 of aotpack's own Python files (build side and runtime): a change to aotpack that keeps its
    version number still changes every key."""
    import aotpack
    import aotpack_runtime

    h = hashlib.sha256()
    for package in (aotpack, aotpack_runtime):
        folder = pathlib.Path(package.__file__).parent
        for path in sorted(folder.rglob("*.py")):
            h.update(f"{package.__name__}/{path.relative_to(folder).as_posix()}\0".encode())
            h.update(path.read_bytes())
            h.update(b"\0")
    return h.hexdigest()


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0].strip() if lines else f"exit {out.returncode}"


@functools.lru_cache(maxsize=None)
def _compiler_identity(cxx: str) -> dict:
    ld = _first_line([cxx, "-print-prog-name=ld"])
    return {"cxx": _first_line([cxx, "--version"]), "cxx_target": _first_line([cxx, "-dumpmachine"]),
            "ld": _first_line([ld, "--version"]) if ld and ld != "not found" else "not found"}


def installed_version(dist: str) -> str:
    """The installed version of a distribution (``not installed`` when it is not)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def toolchain(devices: tuple[str, ...]) -> dict:
    """What builds the code, as far as it can change the bytes."""
    import torch

    from . import __version__

    out = {"aotpack": __version__, "aotpack_source": source_digest(), "torch": torch.__version__,
           "torch_git": getattr(torch.version, "git_version", ""), "triton": installed_version("triton"),
           "python": f"{platform.python_implementation()} {platform.python_version()}",
           "libc": " ".join(platform.libc_ver()), **_compiler_identity(os.environ.get("CXX", "g++"))}
    if "cuda" in devices:
        from . import cudabuild

        home = cudabuild.cuda_home()
        out["nvcc"] = _last_line([os.path.join(home, "bin", "nvcc"), "--version"]) if home else "not found"
        out["torch_cuda"] = torch.version.cuda
    return out


def _last_line(cmd: list[str]) -> str:
    """The last line of a tool's version text (nvcc's names the release and build)."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    lines = out.stdout.strip().splitlines()
    return lines[-1].strip() if lines else f"exit {out.returncode}"


def tensor_record(t, sha256: str) -> dict:
    """A weight's key record: its dtype, shape, strides and the sha256 of its elements."""
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "strides": list(t.stride()),
            "sha256": sha256}


def key_of(material: dict) -> str:
    """The key: sha256 of the canonical JSON of the key material."""
    return digest(canonical_json({"key_version": KEY_VERSION, **material}))


@dataclass(frozen=True)
class CacheEntry:
    """One pack in the cache and what was recorded when it was stored."""

    key: str
    pack: pathlib.Path
    meta: dict
    size: int
    last_used: float

    @property
    def created(self) -> float:
        return float(self.meta.get("created", 0.0))


class BuildCache:
    """A build cache folder (``root/packs``, or ``root/objects`` for object files). Reads and writes never
    fail a build: a problem with the folder is a warning, and the build compiles as if the cache were not
    there."""

    def __init__(self, root: str | os.PathLike, kind: str = "packs"):
        self.root = pathlib.Path(root)
        self.folder = self.root / kind

    def objects(self) -> "BuildCache":
        """The object files beside the packs (``objects/``): compiler outputs reused by builds whose generated
        code is the same (see ``compile``)."""
        return BuildCache(self.root, "objects")

    @classmethod
    def open(cls, cache: Any) -> "BuildCache | None":
        """``True``: the default folder (``default_root``); a path: that folder; ``False``/``None``: no cache."""
        if cache is None or cache is False:
            return None
        if cache is True:
            return cls(default_root())
        if isinstance(cache, BuildCache):
            return cache
        if isinstance(cache, (str, os.PathLike)):
            return cls(cache)
        raise BuildError(f"cache must be True, False or a folder, got {type(cache).__name__}")

    def _paths(self, key: str) -> tuple[pathlib.Path, pathlib.Path]:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise BuildError(f"not a build cache key: {key!r}")
        folder = self.folder / key[:2]
        return folder / f"{key}.pack", folder / f"{key}.json"

    def fetch(self, key: str, output: str | os.PathLike) -> CacheEntry | None:
        """Copy the pack cached under ``key`` to ``output`` (atomically) if it is there and intact."""
        pack, meta_path = self._paths(key)
        try:
            meta = json.loads(meta_path.read_text())
            expected = meta["sha256"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            self._drop(key, f"its record {meta_path} is unreadable ({e})")
            return None
        output = pathlib.Path(output)
        if not output.parent.is_dir():
            raise BuildError(f"cannot write {output}: the folder {output.parent} does not exist")
        tmp = output.parent / f".{output.name}.{secrets.token_hex(4)}.tmp"
        h = hashlib.sha256()
        try:
            with open(pack, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    dst.write(chunk)
        except FileNotFoundError:
            tmp.unlink(missing_ok=True)
            return None
        except OSError as e:
            tmp.unlink(missing_ok=True)
            _warn(f"cannot read the build cache entry {pack}: {e.strerror}; compiling instead")
            return None
        if h.hexdigest() != expected:
            tmp.unlink(missing_ok=True)
            self._drop(key, f"its sha256 is {h.hexdigest()[:16]}…, its record says {expected[:16]}…")
            return None
        try:
            os.replace(tmp, output)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise BuildError(f"cannot write {output}: {e.strerror}") from None
        with contextlib.suppress(OSError):
            os.utime(meta_path)  # the last use, for ``prune``
        return CacheEntry(key=key, pack=pack, meta=meta, size=output.stat().st_size, last_used=time.time())

    def _drop(self, key: str, why: str) -> None:
        _warn(f"ignoring the damaged build cache entry {key[:12]}: {why}; it is rebuilt")
        for path in self._paths(key):
            with contextlib.suppress(OSError):
                path.unlink()

    def store(self, key: str, pack: str | os.PathLike, meta: dict) -> CacheEntry | None:
        """Copy the freshly built ``pack`` into the cache under ``key``; the record (``meta`` plus the pack's
        sha256 and size) is written after the pack, so a reader never finds a record without its pack."""
        path, meta_path = self._paths(key)
        token = f"{os.getpid()}.{secrets.token_hex(4)}"
        tmp = path.parent / f".{key[:16]}.{token}.tmp"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()
            with open(pack, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            size = tmp.stat().st_size
            os.replace(tmp, path)
            record = dict(meta, key=key, sha256=h.hexdigest(), size=size, created=time.time())
            meta_tmp = path.parent / f".{key[:16]}.{token}.json.tmp"
            meta_tmp.write_bytes(canonical_json(record))
            os.replace(meta_tmp, meta_path)
        except OSError as e:
            for leftover in path.parent.glob(f".{key[:16]}.{token}*"):
                with contextlib.suppress(OSError):
                    leftover.unlink()
            _warn(f"cannot write the build cache at {self.folder}: {e.strerror}; the pack was built but not "
                  "cached (pick a writable folder with --cache-dir or AOTPACK_BUILD_CACHE)")
            return None
        return CacheEntry(key=key, pack=path, meta=record, size=size, last_used=time.time())

    def _source_path(self, source_key: str, index: str = "sources") -> pathlib.Path:
        if len(source_key) != 64 or any(c not in "0123456789abcdef" for c in source_key):
            raise BuildError(f"not a {'source key' if index == 'sources' else 'sha256'}: {source_key!r}")
        return self.root / index / source_key[:2] / f"{source_key}.json"

    def file_index(self) -> pathlib.Path:
        """The index of source files' digests the source keys use (``sourcekey.FileDigests``)."""
        return self.root / "sources" / "files.json"

    def recall(self, source_key: str, index: str = "sources") -> str | None:
        """The key of the pack a build with this source key made (``sourcekey``), or None. ``index="manifests"``:
        the key of the pack cached with this manifest sha256 (``remember_manifest``)."""
        try:
            found = json.loads(self._source_path(source_key, index).read_text()).get("key")
        except (OSError, ValueError, AttributeError):
            return None
        if isinstance(found, str) and len(found) == 64 and all(c in "0123456789abcdef" for c in found):
            return found
        return None

    def remember(self, source_key: str, key: str, index: str = "sources") -> None:
        """Record that the build with ``source_key`` made the pack cached under ``key`` (``index="manifests"``:
        that the pack whose manifest has the sha256 ``source_key`` is cached under ``key``)."""
        path = self._source_path(source_key, index)
        tmp = path.with_name(f".{source_key[:16]}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(canonical_json({"source_key": source_key, "key": key, "created": time.time()}))
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            _warn(f"cannot write the build cache at {path.parent}: {e.strerror}; " + (
                "the next build of this model captures it again to find its pack" if index == "sources" else
                "reweight cannot find this pack's record to cache the packs it writes from it"))

    def remember_manifest(self, pack: str | os.PathLike, key: str) -> None:
        """Record that the pack at ``pack`` (its manifest pins every byte of it) is cached under ``key``: what
        ``reweight`` looks its base up by (``record_of``)."""
        from aotpack_runtime.archive import Archive

        try:
            archive = Archive.open(os.fspath(pack))
        except Exception as e:  # noqa: BLE001 -- the pack was just written; the cache never fails a build
            _warn(f"cannot read {pack} to index it in the build cache ({e})")
            return
        try:
            self.remember(archive.manifest_sha256, key, "manifests")
        finally:
            archive.close()

    def record_of(self, manifest_sha256: str) -> tuple[str, dict] | None:
        """The key and record of the cached pack whose manifest has this sha256 (``remember_manifest``), if the
        pack is still there; else None."""
        key = self.recall(manifest_sha256, "manifests")
        if key is None:
            return None
        pack, meta_path = self._paths(key)
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or not pack.is_file():
            return None
        return key, meta

    def _forget_sources(self, keys: set[str], everything: bool) -> None:
        """Remove the source keys and manifest records that lead to the given pack keys (all, and the file
        index, with ``everything``)."""
        if everything:
            self.file_index().unlink(missing_ok=True)
        for index in ("sources", "manifests"):
            for path in (self.root / index).glob("??/*.json"):
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    if everything or json.loads(path.read_text()).get("key") in keys:
                        path.unlink()

    def entries(self) -> list[CacheEntry]:
        """Every complete entry, most recently used first."""
        out = []
        if not self.folder.is_dir():
            return out
        for meta_path in self.folder.glob("??/*.json"):
            key = meta_path.stem
            pack = meta_path.with_suffix(".pack")
            try:
                meta = json.loads(meta_path.read_text())
                size = pack.stat().st_size
                used = meta_path.stat().st_mtime
            except (OSError, ValueError):
                continue
            out.append(CacheEntry(key=key, pack=pack, meta=meta, size=size, last_used=used))
        return sorted(out, key=lambda e: (-e.last_used, e.key))

    def remove(self, entry: CacheEntry) -> None:
        for path in (entry.pack.with_suffix(".json"), entry.pack):  # the record first: never a record alone
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def prune(self, *, older_than: float | None = None, max_bytes: int | None = None,
              everything: bool = False, now: float | None = None) -> list[CacheEntry]:
        """Remove entries unused for ``older_than`` seconds, then the least recently used until the rest fit
        in ``max_bytes`` (or all with ``everything``), and temporary files left by builds that died over an
        hour ago. Return the entries removed."""
        now = time.time() if now is None else now
        removed = _to_remove(self.entries(), older_than=older_than, max_bytes=max_bytes, everything=everything,
                             now=now)
        for entry in removed:
            self.remove(entry)
        if self.folder.name == "packs" and (removed or everything):
            self._forget_sources({e.key for e in removed}, everything)
        if self.folder.is_dir():
            for tmp in self.folder.glob("??/.*.tmp"):
                with contextlib.suppress(OSError):
                    if now - tmp.stat().st_mtime > 3600:
                        tmp.unlink()
        return removed

    def toolchain_bytes(self) -> int:
        """Size of the toolchain folder beside the packs (compiler wrapper, precompiled headers)."""
        return _tree_size(self.root / "toolchain")

    def headers(self) -> list[Header]:
        """The precompiled headers in the toolchain folder (``toolchain/pch``), most recently used first."""
        folder = self.root / "toolchain" / "pch"
        out = []
        if not folder.is_dir():
            return out
        for gch in folder.glob(f"*.h{PRECOMPILED_SUFFIX}"):
            source = gch.with_suffix("")
            try:
                st = gch.stat()
                size = st.st_size + (source.stat().st_size if source.exists() else 0)
            except OSError:
                continue
            out.append(Header(path=gch, size=size, last_used=st.st_mtime))
        return sorted(out, key=lambda h: (-h.last_used, h.path.name))

    def prune_headers(self, *, older_than: float | None = None, max_bytes: int | None = None,
                      everything: bool = False, now: float | None = None) -> list[Header]:
        """Remove precompiled headers by the rules of ``prune`` (last use: the last compile that used one).
        A build remakes a header it misses (about 7 s for each of the two a CPU entry uses)."""
        removed = _to_remove(self.headers(), older_than=older_than, max_bytes=max_bytes, everything=everything,
                             now=time.time() if now is None else now)
        for h in removed:
            source = h.path.with_suffix("")
            lock = h.path.parent / "locks" / f"{source.stem}.lock"
            for path in (h.path, source, lock):  # the precompiled file first: never a header alone
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        return removed


def _to_remove(items: list, *, older_than: float | None, max_bytes: int | None, everything: bool,
               now: float) -> list:
    """What a prune removes of ``items`` (each with ``last_used`` and ``size``, most recently used first): all
    with ``everything``; else those unused for ``older_than`` seconds, then the least recently used until the
    rest fit in ``max_bytes``."""
    kept, removed = [], []
    for item in items:
        if everything or (older_than is not None and now - item.last_used > older_than):
            removed.append(item)
        else:
            kept.append(item)
    if max_bytes is not None:
        total = sum(item.size for item in kept)
        while kept and total > max_bytes:
            item = kept.pop()  # least recently used
            total -= item.size
            removed.append(item)
    return removed


@dataclass(frozen=True)
class Header:
    """One precompiled header of the toolchain folder: the ``.gch`` file, its size with its source, its last
    use."""

    path: pathlib.Path
    size: int
    last_used: float


def _tree_size(folder: pathlib.Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _warn(message: str) -> None:
    warnings.warn(message, AotpackWarning, stacklevel=3)
