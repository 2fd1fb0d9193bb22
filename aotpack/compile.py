"""Stage 3, compile: Inductor lowers each captured graph to a C++ shared object for the CPU.

Entry ``i`` always compiles in the fixed scratch folder ``/tmp/aotpack-build/slot-i`` (emptied before and
after, held under a file lock), because Inductor writes that folder's path into generated source, file
names and the library; a fixed path makes the output depend only on the model, the options and the
toolchain. A pack with several entries compiles them in parallel worker processes (as many as there are
cores), each from the entry's graph saved with ``torch.export.save``; the output does not depend on how
many workers ran.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from aotpack_runtime import _torch as rt_torch
from aotpack_runtime.errors import BuildError

from . import _torch
from .capture import Captured
from .options import BuildOptions

SCRATCH = "/tmp/aotpack-build"


@dataclass(frozen=True)
class CompiledEntry:
    """The native code of one entry and what it needs."""

    library: bytes
    sources: dict  # file name -> bytes (generated C++, build paths replaced by placeholders)
    constants: dict  # the code's constant name -> the model's parameter/buffer name
    kernels: tuple[str, ...]


@contextlib.contextmanager
def scratch_dir(slot: int = 0) -> Iterator[str]:
    """Entry ``slot``'s fixed build folder, locked against concurrent builds, emptied before and after."""
    base = SCRATCH
    try:
        os.makedirs(base, exist_ok=True)
        if os.stat(base).st_uid != os.getuid():
            raise PermissionError
    except PermissionError:
        base = f"{SCRATCH}-{os.getuid()}"
        os.makedirs(base, exist_ok=True)
    root = os.path.join(base, f"slot-{slot}")
    os.makedirs(root, exist_ok=True)
    with open(root + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            _empty(root)
            yield root
        finally:
            _empty(root)
            fcntl.flock(lock, fcntl.LOCK_UN)


def _empty(root: str) -> None:
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)


def compiler_version() -> str:
    """The C++ compiler Inductor will call, as ``g++ 12.2.0`` (recorded in the manifest)."""
    cxx = os.environ.get("CXX", "g++")
    try:
        out = subprocess.run([cxx, "-dumpfullversion", "-dumpversion"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        raise BuildError(f"no C++ compiler: {cxx!r} cannot be run; install g++ (Debian/Ubuntu: "
                         "apt-get install g++) or set CXX") from None
    return f"{os.path.basename(cxx)} {out.stdout.strip()}"


def normalize_source(text: str, root: str) -> str:
    """Replace build-host paths in generated source with placeholders."""
    text = text.replace(root, "<build>")
    text = text.replace(os.path.dirname(torch.__file__), "<torch>")
    text = text.replace(sys.prefix, "<python>").replace(sys.base_prefix, "<python>")
    return text


def compile_entries(captured: list[Captured], options: BuildOptions,
                    progress: Callable[[str], None] | None = None) -> list[CompiledEntry]:
    """Compile every entry; several entries compile in parallel worker processes."""
    if len(captured) == 1:
        start = time.perf_counter()
        entry = compile_exported(captured[0].exported, options, slot=0)
        if progress:
            progress(f"      entry 1 of 1: {len(entry.kernels)} kernels in {time.perf_counter() - start:.1f} s")
        return [entry]
    workers = max(1, min(len(captured), os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="aotpack-entries-") as tmp:
        jobs = []
        for i, c in enumerate(captured):
            folder = os.path.join(tmp, str(i))
            os.makedirs(folder)
            _torch.save_exported(c.exported, os.path.join(folder, "graph.pt2"))
            jobs.append(folder)
        results: list[CompiledEntry | None] = [None] * len(jobs)
        pending = list(enumerate(jobs))
        running: list[tuple[int, str, subprocess.Popen, float]] = []
        while pending or running:
            while pending and len(running) < workers:
                i, folder = pending.pop(0)
                cmd = [sys.executable, "-m", "aotpack.compile", folder, options.cpu_isa, str(i)]
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                running.append((i, folder, proc, time.perf_counter()))
            i, folder, proc, start = running.pop(0)
            _, err = proc.communicate()
            if proc.returncode != 0:
                for *_, other, _ in running:
                    other.kill()
                lines = [ln for ln in err.decode(errors="replace").splitlines() if ln.strip()]
                raise BuildError(f"compiling entry {i} failed in its worker process: "
                                 f"{lines[-1] if lines else f'exit {proc.returncode}'}")
            results[i] = _read_result(folder)
            if progress:
                progress(f"      entry {i + 1} of {len(jobs)}: {len(results[i].kernels)} kernels in "
                         f"{time.perf_counter() - start:.1f} s ({workers} worker process{'es' if workers > 1 else ''})")
    return [r for r in results if r is not None]


def _write_result(entry: CompiledEntry, folder: str) -> None:
    with open(os.path.join(folder, "library.so"), "wb") as f:
        f.write(entry.library)
    for name, data in entry.sources.items():
        with open(os.path.join(folder, f"source-{name}"), "wb") as f:
            f.write(data)
    with open(os.path.join(folder, "result.json"), "w") as f:
        json.dump({"constants": entry.constants, "kernels": list(entry.kernels),
                   "sources": sorted(entry.sources)}, f)


def _read_result(folder: str) -> CompiledEntry:
    with open(os.path.join(folder, "result.json")) as f:
        meta = json.load(f)
    with open(os.path.join(folder, "library.so"), "rb") as f:
        library = f.read()
    sources = {}
    for name in meta["sources"]:
        with open(os.path.join(folder, f"source-{name}"), "rb") as f:
            sources[name] = f.read()
    return CompiledEntry(library=library, sources=sources, constants=meta["constants"],
                         kernels=tuple(meta["kernels"]))


def compile_exported(exported, options: BuildOptions, slot: int = 0) -> CompiledEntry:
    """Compile one exported graph to a CPU shared object, in scratch folder ``slot``."""
    config = dict(_torch.BASE_INDUCTOR_CONFIG)
    config.update(_torch.ISA_COMPILER_OPTIONS[options.cpu_isa])
    with scratch_dir(slot) as root, _torch.private_build_dirs(root):
        package = os.path.join(root, "entry.pt2")
        try:
            _torch.aoti_compile(exported, package, config)
        except Exception as e:  # a compiler failure, or a lowering Inductor does not support
            raise BuildError(f"Inductor could not compile the graph: {type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
        library, sources = _unpack(package, root)
        # dlopen returns an already-loaded library for a path it has seen: name the file by its content.
        so_path = os.path.join(root, hashlib.sha256(library).hexdigest() + ".so")
        with open(so_path, "wb") as f:
            f.write(library)
        constants = rt_torch.constant_fqns(rt_torch.cpu_runner(so_path, 1))
    kernels = tuple(sorted(set(re.findall(r'extern "C"\s+void\s+(\w+)\s*\(',
                                          sources.get("kernel.cpp", b"").decode()))))
    return CompiledEntry(library=library, sources=sources, constants=constants, kernels=kernels)


def _unpack(package: str, root: str) -> tuple[bytes, dict]:
    library = None
    sources = {}
    with zipfile.ZipFile(package) as z:
        for info in z.infolist():
            name = info.filename.rsplit("/", 1)[-1]
            if name.endswith(".so"):
                if library is not None:
                    raise BuildError("Inductor produced more than one shared object for one graph")
                library = z.read(info)
            elif name.endswith(".wrapper.cpp"):
                sources["wrapper.cpp"] = normalize_source(z.read(info).decode(), root).encode()
            elif name.endswith(".kernel.cpp"):
                sources["kernel.cpp"] = normalize_source(z.read(info).decode(), root).encode()
    if library is None:
        raise BuildError("Inductor produced no shared object")
    return library, sources


def _worker(folder: str, cpu_isa: str, slot: int) -> None:
    """Worker process: compile the graph saved in ``folder`` and write the result beside it."""
    exported = _torch.load_exported(os.path.join(folder, "graph.pt2"))
    _write_result(compile_exported(exported, BuildOptions(cpu_isa=cpu_isa), slot=slot), folder)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], int(sys.argv[3]))
