"""The host toolchain a compile runs with, and what keeps its output free of the host: the compiler wrapper
(``-ffile-prefix-map`` for every host path, the build folder replaced in generated sources, ``-march``
rewritten before torch 2.13), the nvcc wrapper that adds architectures to kernel fatbins before torch 2.13,
the shared toolchain folder (wrapper scripts and precompiled headers, ``$AOTPACK_BUILD_CACHE/toolchain``),
private build folders, the compiler's version, and the placeholders that stand for host paths in the sources
a pack stores.

Owns no torch internals: Inductor's private hooks (its precompiled-header folder, its compiler calls) are in
``_torch.py``. Used by ``compile``, and by ``pipeline`` for the compiler's version.

May not: touch a private torch API (those are ``_torch.py``'s) or decide what a pack holds.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Iterator

import torch
from aotpack_runtime.errors import BuildError

from . import buildcache
from ._torch import torch_version

def toolchain_dir() -> str:
    """Where builds keep what they share on this host: the compiler wrapper and precompiled headers
    (``$AOTPACK_BUILD_CACHE/toolchain``, beside the build cache's ``packs``; see ``buildcache``)."""
    return os.path.join(buildcache.default_root(), "toolchain")


# The environment variable through which the compiler wrapper learns the current build's scratch folder.
BUILD_ROOT_ENV = "AOTPACK_BUILD_ROOT"


def build_prefixes(root: str) -> list[tuple[str, str]]:
    """(host folder, fixed name) pairs that the compiler writes into code in place of host paths (through
    ``__FILE__`` in torch's headers and the generated sources): the Python installation, torch's folder and
    the build's scratch folder ``root``. In GCC's ``-ffile-prefix-map`` the last matching pair wins: the
    most specific comes last."""
    return install_prefixes() + [(os.path.realpath(root), "/aotpack/build"), (root, "/aotpack/build")]


def install_prefixes() -> list[tuple[str, str]]:
    pairs = []
    for prefix in dict.fromkeys((sys.base_prefix, sys.prefix)):
        pairs += [(os.path.realpath(prefix), "/aotpack/python"), (prefix, "/aotpack/python")]
    torch_dir = os.path.dirname(torch.__file__)
    pairs += [(os.path.realpath(torch_dir), "/aotpack/torch"), (torch_dir, "/aotpack/torch")]
    return list(dict.fromkeys(pairs))


# Run by the compiler wrapper on each generated source in the build folder before it is compiled: the
# folder's path in string literals (a CUDA wrapper names each kernel's file by its absolute path; the
# runtime loads kernels from its own folder by file name) becomes the fixed name, as -ffile-prefix-map does
# for __FILE__.
_UNROOT = ("import os, sys\n"
           "root, path = os.environ['" + "AOTPACK_BUILD_ROOT" + "'], sys.argv[1]\n"
           "with open(path, encoding='utf-8') as f:\n"
           "    text = f.read()\n"
           "if root in text:\n"
           "    with open(path, 'w', encoding='utf-8') as f:\n"
           "        f.write(text.replace(root, '/aotpack/build'))\n")


def compiler_wrapper(folder: str, compiler: str, march: str | None = None) -> str:
    """A wrapper script, under ``folder``, that runs ``compiler`` with ``-ffile-prefix-map`` options
    replacing every host path (``build_prefixes``) in what the compiler writes, after replacing the build
    folder's path in the generated C++ sources it compiles (``_UNROOT``), and with ``-march=native``
    replaced by ``-march={march}`` when ``march`` is given (``compiler_march``); return its path for
    Inductor's ``cpp.cxx``. The script is the same for every build with this toolchain and target (the
    scratch folder comes from ``$AOTPACK_BUILD_ROOT``), so its path, which Inductor hashes into cache keys,
    is stable. The name keeps "g++" because Inductor picks GCC's flags by the compiler's name."""
    import shlex

    maps = " ".join(shlex.quote(f"-ffile-prefix-map={host}={fixed}") for host, fixed in install_prefixes())
    root = f'"-ffile-prefix-map=${BUILD_ROOT_ENV}=/aotpack/build"'
    unroot = (f'for arg in "$@"; do\n  case "$arg" in\n    "${BUILD_ROOT_ENV}"/*.cpp) '
              f'{shlex.quote(sys.executable)} -c {shlex.quote(_UNROOT)} "$arg" || exit 1;;\n  esac\ndone\n')
    rewrite = ""
    if march is not None:  # POSIX sh: rebuild "$@" with each -march=native replaced
        rewrite = (f'for arg do shift; case $arg in -march=native) arg={shlex.quote("-march=" + march)};; esac; '
                   'set -- "$@" "$arg"; done\n')
    script = f"#!/bin/sh\n{unroot}{rewrite}exec {shlex.quote(compiler)} \"$@\" {maps} {root}\n"
    return write_script(folder, "g++", script)


def write_script(folder: str, name: str, script: str) -> str:
    """Write ``script`` as ``folder/<hash of script>/name`` (once; executable) and return its path."""
    import hashlib

    path = os.path.join(folder, hashlib.sha256(script.encode()).hexdigest()[:16], name)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(script)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    return path


# Compute capabilities whose code Inductor compiles arch-specifically (sm_90a: exactly that GPU); SASS for
# another architecture cannot come from their PTX.
ARCH_SPECIFIC = (90, 100, 103, 120)


def fatbin_config(folder: str, nvcc: str, archs: tuple[int, ...]) -> dict[str, Any]:
    """Inductor config that gives every kernel fatbin SASS for each of ``archs`` (PTX for the lowest).

    torch 2.14 does this itself, from TORCH_CUDA_ARCH_LIST. Before 2.13, Inductor packs each kernel with
    ``nvcc -fatbin`` for the lowest architecture only: its nvcc (``cuda.cuda_cxx``) is then a wrapper,
    under ``folder``, that adds the same ``-gencode`` for each other architecture as 2.14 does. (2.13
    packs with ``fatbinary`` and gets SASS for one architecture; the build then names the missing ones.)
    """
    import shlex

    base = min(archs)
    if torch_version() >= (2, 13) or len(archs) == 1 or base in ARCH_SPECIFIC:
        return {}
    extra = " ".join(f"-gencode arch=compute_{a},code=sm_{a}" for a in sorted(archs) if a != base)
    script = (f'#!/bin/sh\ncase " $* " in *" -fatbin "*) exec {shlex.quote(nvcc)} "$@" {extra};; esac\n'
              f'exec {shlex.quote(nvcc)} "$@"\n')
    return {"cuda.cuda_cxx": write_script(folder, "nvcc", script)}


@contextlib.contextmanager
def private_build_dirs(root: str) -> Iterator[None]:
    """Point Inductor's cache and every temporary file of the build at ``root`` for the duration."""
    saved = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TMPDIR", BUILD_ROOT_ENV)}
    saved_tempdir = tempfile.tempdir
    os.environ[BUILD_ROOT_ENV] = root
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(root, "inductor")
    os.environ["TMPDIR"] = os.path.join(root, "tmp")
    os.makedirs(os.environ["TMPDIR"], exist_ok=True)
    tempfile.tempdir = os.environ["TMPDIR"]
    try:
        yield
    finally:
        tempfile.tempdir = saved_tempdir
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
    """Replace build-host paths in generated source (the compile commands Inductor appends as comments)
    with placeholders: the scratch folder, torch's and Python's folders, and the toolchain folder's compiler
    wrapper and precompiled headers (whose names hash host paths)."""
    toolchain = toolchain_dir()
    text = re.sub(re.escape(toolchain) + r"/bin/[0-9a-f]+/g\+\+", "g++", text)
    text = re.sub(re.escape(toolchain) + r"/pch/[a-z0-9]+\.h", "<precompiled header>", text)
    placeholders = {"/aotpack/build": "<build>", "/aotpack/torch": "<torch>", "/aotpack/python": "<python>"}
    for host, fixed in reversed(build_prefixes(root)):  # most specific first
        text = text.replace(host, placeholders[fixed])
    return text.replace("/aotpack/build", "<build>")  # what the compiler wrapper already replaced
