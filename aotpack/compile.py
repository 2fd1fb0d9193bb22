"""Stage 3, compile: Inductor lowers the captured graph to a C++ shared object for the CPU.

Every build compiles in one fixed scratch folder (``/tmp/aotpack-build``, emptied before and after, held
under a file lock), because Inductor writes that folder's path into generated source, file names and the
library; a fixed path makes the output depend only on the model, the options and the toolchain.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from typing import Iterator

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
def scratch_dir() -> Iterator[str]:
    """The fixed build folder, locked against concurrent builds and emptied before and after use."""
    root = SCRATCH
    try:
        os.makedirs(root, exist_ok=True)
        if os.stat(root).st_uid != os.getuid():
            raise PermissionError
    except PermissionError:
        root = f"{SCRATCH}-{os.getuid()}"
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


def compile_entry(captured: Captured, options: BuildOptions) -> CompiledEntry:
    """Compile one captured graph to a CPU shared object."""
    config = dict(_torch.BASE_INDUCTOR_CONFIG)
    config.update(_torch.ISA_COMPILER_OPTIONS[options.cpu_isa])
    with scratch_dir() as root, _torch.private_build_dirs(root):
        package = os.path.join(root, "entry.pt2")
        try:
            _torch.aoti_compile(captured.exported, package, config)
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
