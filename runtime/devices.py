"""What the CUDA entries of one package share per GPU, and what a host without CUDA is told.

CUDA code needs libcuda.so.1 and a GPU it has kernels for, so it is loaded per device index at the first
call there (``CudaEntry.runner``); the weights are copied once per GPU, and the kernels are extracted once
into a folder of the code cache.

May not: read an entry's private fields: ``entries`` passes in the blob names and records it needs.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import warnings

import torch

from . import cache, elf, platform
from .archive import Archive
from .errors import AotpackWarning, ArchiveError
from .platform import _union
from .schema import CudaMeta


def _copy_to_cuda(t: torch.Tensor, index: int) -> torch.Tensor:
    """A copy of a host tensor on CUDA device ``index`` (synchronous: it is complete when this returns)."""
    return t.to(torch.device("cuda", index))


class CudaState:
    """What the CUDA entries of one package share: where to extract their code, and the pack's weights
    copied once per device index (the compiled code reads its constants on its own device)."""

    def __init__(self, archive: Archive, cache_root: str, num_models: int, weights: dict[str, torch.Tensor],
                 needed: set[str], no_cuda: str | None):
        self.path = archive.path
        self.no_cuda = no_cuda  # why this host cannot run CUDA code, or None
        self.archive = archive
        self.cache_root = cache_root
        self.num_models = num_models
        self._weights = weights
        self._needed = sorted(needed)
        self._by_device: dict[int, dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def device_weights(self, index: int) -> dict[str, torch.Tensor]:
        with self._lock:
            on_device = self._by_device.get(index)
            if on_device is None:
                on_device = {name: _copy_to_cuda(self._weights[name], index) for name in self._needed}
                self._by_device[index] = on_device
            return on_device

    def prepare(self, new: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
        """Copies of new weights on every GPU that holds the current ones (a weight that did not change keeps
        its copy); ``commit`` puts them in place. Nothing changes here: a call may still run meanwhile."""
        with self._lock:
            held = dict(self._by_device)
            old = self._weights
        return {index: {name: on[name] if new[name] is old[name] else _copy_to_cuda(new[name], index)
                        for name in self._needed} for index, on in held.items()}

    def commit(self, new: dict[str, torch.Tensor], prepared: dict[int, dict[str, torch.Tensor]]) \
            -> dict[int, dict[str, torch.Tensor]]:
        """Make ``new`` (with ``prepared``, its copies per GPU) the weights the CUDA entries use from now on;
        return the copies on every GPU that now holds them. Call it while no call runs."""
        with self._lock:
            for index in self._by_device.keys() - prepared.keys():  # a GPU first used since ``prepare``
                prepared[index] = {name: _copy_to_cuda(new[name], index) for name in self._needed}
            self._weights = new
            self._by_device = prepared
            return dict(prepared)

    def extract(self, library_blob: str, extern_blob: str | None, cuda: CudaMeta) -> tuple["Code", str]:
        """A CUDA entry's library (kept open for the loads of its code on each GPU) and kernel folder in the
        code cache, each hash-checked: the blobs its manifest record names, and its ``cuda`` record."""
        library = extract_code(self.archive, library_blob, extern_blob, self.cache_root)
        return library, extract_kernels(self.archive, cuda, self.cache_root)


def _entry_list(entries: list, kind: str) -> str:
    names = ", ".join(e.name for e in entries)
    return f"{kind} entr{'y' if len(entries) == 1 else 'ies'} {names}"


def warn_cuda(path: str, entries: list, no_cuda: str | None) -> str | None:
    """Warn about CUDA entries this host cannot run, and about CUDA code built without a GPU; return the
    sentence a GuardError of this package ends with on a host without CUDA (else None). ``entries``: the
    package's entries (each with ``name``, ``device`` and, for CUDA, its ``cuda`` record)."""
    cuda = [e for e in entries if e.device == "cuda"]
    cpu = [e for e in entries if e.device != "cuda"]
    note = None
    if no_cuda is not None:
        if cpu:
            warnings.warn(f"{path}: this host cannot run the pack's {_entry_list(cuda, 'CUDA')} ({no_cuda}); "
                          f"its {_entry_list(cpu, 'CPU')} still serve{'s' if len(cpu) == 1 else ''} CPU inputs",
                          AotpackWarning, stacklevel=3)
            note = f"this host has no usable CUDA device ({no_cuda}), so only the pack's CPU entries can run here"
        else:
            warnings.warn(f"{path}: this host cannot run the pack's {_entry_list(cuda, 'CUDA')} ({no_cuda}), and "
                          "the pack has no CPU entry: every call will be refused here; run it on a host with an "
                          "NVIDIA GPU and the CUDA build of torch", AotpackWarning, stacklevel=3)
            note = (f"this host has no usable CUDA device ({no_cuda}), and every entry of this pack is a CUDA "
                    "entry: run it on a host with an NVIDIA GPU and the CUDA build of torch")
    blind = [e for e in cuda if e.cuda.built_without_gpu]
    if blind:
        archs = _union(e.cuda.archs for e in blind)
        ptx = _union(e.cuda.ptx for e in blind)
        targets = ", ".join(archs) or "no SASS"
        if ptx:
            targets += f" (PTX {', '.join(ptx)})"
        warnings.warn(f"{path}: {_entry_list(blind, 'CUDA')} {'was' if len(blind) == 1 else 'were'} built "
                      f"without a GPU, for {targets}: not autotuned and never run at build time; smoke-test "
                      "the pack on a target GPU before serving it", AotpackWarning, stacklevel=3)
    return note


# The file names libtorch's runner looks for: the library, and beside it the proxy executor's description of
# the ATen calls the code makes through it (the library's name with ``.json``).
LIBRARY_FILE = "model.so"
EXTERN_KERNELS_FILE = "model.json"


# Libraries of the code cache this process loaded, by sha256, each open for the life of the process: it is
# loaded as /proc/self/fd/N, and the dynamic loader knows a library by the name it was opened by, so N must keep
# naming that library (a closed descriptor's number would be reused for another file, which the loader would
# then take for the library it already has).
_open_libraries: dict[str, cache.CachedFile] = {}
_open_lock = threading.Lock()


class Code:
    """An entry's native code, ready for the loader: ``path`` names the very file whose content was checked
    (the hashed descriptor as ``/proc/self/fd/N``, or a private copy written from checked bytes). ``close()``
    removes a private copy once the code is loaded; a cached library's descriptor stays open."""

    def __init__(self, path: str, file: cache.CachedFile | None = None, folder: str | None = None):
        self.path = path
        self._file = file
        self._folder = folder

    def close(self) -> None:
        folder, self._folder = self._folder, None
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def __del__(self) -> None:
        self.close()


def extract_code(archive: Archive, library_blob: str, extern_blob: str | None, cache_root: str) -> Code:
    """An entry's library, hash-checked and its ELF headers checked, ready to load.

    A library alone goes to the code cache under its sha256 (a copy there is hashed again) and is
    loaded through the descriptor it was hashed or written through. A library with an extern-kernel
    description is loaded from a private folder of this process (mode 0700), written from the checked
    blobs, as ``model.so`` beside ``model.json``: the runner reads the description by that name."""
    where = f"blob {library_blob!r}"
    if extern_blob is None:
        sha = archive.manifest.blob(library_blob).sha256
        cache.code_folder(cache_root, "lib")
        with _open_lock:
            file = _open_libraries.get(sha)
            if file is not None:
                if cache.fd_sha256(file.fd) != sha:
                    raise ArchiveError(f"the library {file.path} of {where} changed in the code cache since "
                                       "this process loaded it; clear the code cache folder", path=archive.path)
                return Code(file.loadable, file=file)
            file = cache.lookup(cache_root, sha, ".so")
            if file is None:
                file = cache.store(cache_root, sha, ".so", archive.chunks(library_blob))
            _check_elf(archive, file.fd, where)
            _open_libraries[sha] = file
        return Code(file.loadable, file=file)
    folder = tempfile.mkdtemp(prefix="aotpack-code-")
    try:
        for name, blob in ((LIBRARY_FILE, library_blob), (EXTERN_KERNELS_FILE, extern_blob)):
            fd = os.open(os.path.join(folder, name), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o500)
            try:
                for chunk in archive.chunks(blob):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
                if name == LIBRARY_FILE:
                    _check_elf(archive, fd, where)
            finally:
                os.close(fd)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return Code(os.path.join(folder, LIBRARY_FILE), folder=folder)


def _check_elf(archive: Archive, fd: int, where: str) -> None:
    try:
        elf.check_shared_object(fd, os.fstat(fd).st_size, platform.host_machine(), where)
    except ArchiveError as e:
        raise ArchiveError(e.reason, path=archive.path) from None


def extract_kernels(archive: Archive, cuda: CudaMeta, cache_root: str) -> str:
    """The folder of the entry's kernel files (the compiled code's ``cubin_dir``), hash-checked."""
    files: dict[str, str] = {}
    blobs: dict[str, str] = {}
    for k in cuda.kernels:
        files[k.file] = archive.manifest.blob(k.blob).sha256
        blobs[k.file] = k.blob
    hit = cache.lookup_dir(cache_root, files)
    if hit:
        return hit
    return cache.store_dir(cache_root, files, {name: archive.read_blob(blob) for name, blob in blobs.items()})
