"""What a CUDA entry needs at build time: the toolchain, a libcuda stub, and a record of every kernel.

The pack's manifest, not Inductor's metadata, is the record of a CUDA entry's architectures: after each
compile, every kernel binary is read with ``cuobjdump`` (shipped in Triton's wheel) and the SASS and PTX
architectures it really carries are written down. A kernel that lacks an architecture the user asked for
fails the build.

May not: patch torch: the GPU-less build's patches are in ``_cuda_offline``.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
from typing import Iterator

import torch

from aotpack_runtime.errors import BuildError

# Compute capabilities a pack can name (--cuda-arch); a GPU-less build also needs a device table entry
# for the lowest one (aotpack/_cuda_offline.py, TARGETS).
KNOWN_ARCHS = (75, 80, 86, 87, 89, 90, 100, 103, 110, 120, 121)


def parse_archs(text: str | int | list | tuple) -> tuple[int, ...]:
    """``"80,90"``, ``"sm_80"``, ``"8.0;9.0"`` or a list of those -> ``(80, 90)``, sorted, unique."""
    items: list[str] = []
    for part in (text if isinstance(text, (list, tuple)) else [text]):
        items += [p for p in re.split(r"[,;\s]+", str(part).strip()) if p]
    out = set()
    for item in items:
        raw = item.lower().removeprefix("sm_").removeprefix("compute_")
        if re.fullmatch(r"\d+\.\d", raw):
            raw = raw.replace(".", "")
        if not re.fullmatch(r"\d{2,3}", raw) or int(raw) not in KNOWN_ARCHS:
            known = ", ".join(str(a) for a in KNOWN_ARCHS)
            raise BuildError(f"unknown CUDA architecture {item!r}: give compute capabilities as numbers, "
                             f"e.g. --cuda-arch 80,90 (known: {known})")
        out.add(int(raw))
    if not out:
        raise BuildError("--cuda-arch is empty: name at least one architecture, e.g. --cuda-arch 90")
    return tuple(sorted(out))


def cuda_home() -> str | None:
    """The CUDA toolkit: $CUDA_HOME, $CUDA_PATH, nvcc's parent folder, or /usr/local/cuda."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "include", "cuda.h")) and os.path.isfile(os.path.join(c, "bin", "nvcc")):
            return c
    return None


def cuobjdump() -> str:
    """Triton's ``cuobjdump`` (its wheel ships one), else the toolkit's."""
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    home = cuda_home()
    for path in ([os.path.join(home, "bin", "cuobjdump")] if home else []) + [shutil.which("cuobjdump") or ""]:
        if path and os.access(path, os.X_OK):
            return path
    raise BuildError("cuobjdump not found: CUDA builds read every kernel's architectures with it. Install "
                     "triton (it ships one) or the CUDA toolkit")


def check_toolchain(without_gpu: bool) -> dict:
    """Everything a CUDA build needs, checked before any work; returns what was found."""
    if torch.version.cuda is None:
        raise BuildError(f"--device cuda needs the CUDA build of torch; this is torch {torch.__version__}, a CPU "
                         "build. Install it in its own environment: `pip install torch==2.14.1` (Linux x86_64 "
                         "wheels from PyPI are CUDA builds)")
    try:
        import triton  # noqa: F401
    except ImportError:
        raise BuildError("--device cuda needs triton, which comes with the CUDA build of torch: "
                         "`pip install triton`") from None
    found = {"cuobjdump": cuobjdump()}
    home = cuda_home()
    if home is None:
        flag = "--without-gpu" if without_gpu else "--device cuda"
        raise BuildError(f"{flag} needs the CUDA toolkit (nvcc, cuda.h): none found in $CUDA_HOME, $CUDA_PATH, "
                         "nvcc's folder or /usr/local/cuda. The generated wrapper includes its headers and each "
                         "kernel is packed as a fatbin with nvcc. Install it (e.g. NVIDIA's cuda-toolkit "
                         "package) and set CUDA_HOME to its folder")
    found["cuda_home"] = home
    if without_gpu:
        if shutil.which(os.environ.get("CC", "gcc")) is None:
            raise BuildError("--without-gpu builds a libcuda stub with gcc, which is not on PATH; install gcc")
    elif not torch.cuda.is_available():
        raise BuildError("--device cuda: this host has no usable GPU (torch.cuda.is_available() is False). "
                         "Build on a machine with the target GPU, or add --without-gpu --cuda-arch ARCHS "
                         "(experimental: not autotuned) to build for named architectures here")
    return found


def libcuda_stub(folder: str, home: str) -> str:
    """Write ``libcuda.so`` (soname libcuda.so.1) that defines every ``cu*`` function of the toolkit's cuda.h.

    The wrapper library links against the driver; a host without a driver has no libcuda to link to. The
    stub is only for linking: at run time the real driver is loaded. Every function is defined (an empty
    stub would link but drop libcuda.so.1 from the library's needs). Returns the folder to link from.
    """
    cc = os.environ.get("CC", "gcc")
    header = os.path.join(home, "include", "cuda.h")
    try:
        pre = subprocess.run([cc, "-E", "-P", f"-I{os.path.join(home, 'include')}", header], capture_output=True,
                             text=True, check=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"cannot read {header} to make a libcuda stub: {e}") from None
    names = sorted(set(re.findall(r"\b(cu[A-Z]\w*)\s*\(", pre)))
    if len(names) < 100:
        raise BuildError(f"{header} declares only {len(names)} driver functions; is it the CUDA toolkit's cuda.h?")
    os.makedirs(folder, exist_ok=True)
    source = "".join(f"int {n}(void) {{ return 999; }}\n" for n in names)  # 999: CUDA_ERROR_UNKNOWN
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    out = os.path.join(folder, "libcuda.so")
    stamp = os.path.join(folder, "stub.sha256")
    if os.path.exists(out) and os.path.exists(stamp) and open(stamp).read() == digest:
        return folder
    c_file = os.path.join(folder, "libcuda_stub.c")
    with open(c_file, "w") as f:
        f.write(source)
    try:
        subprocess.run([cc, "-shared", "-fPIC", "-O0", "-Wl,-soname,libcuda.so.1", "-o", out, c_file],
                       capture_output=True, check=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"compiling the libcuda stub failed: {e}") from None
    with open(stamp, "w") as f:
        f.write(digest)
    return folder


@contextlib.contextmanager
def build_environment(archs: tuple[int, ...], stub_dir: str | None, home: str | None) -> Iterator[None]:
    """Environment of one CUDA compile: target architectures, toolkit, stub to link, no line info."""
    env = {
        "TORCH_CUDA_ARCH_LIST": ";".join(f"{a // 10}.{a % 10}" for a in archs),
        # Triton's line info embeds a random temporary path; without it, builds are byte-identical.
        "TRITON_DISABLE_LINE_INFO": "1",
    }
    if home:
        env["CUDA_HOME"] = home
    if stub_dir:
        env["LIBRARY_PATH"] = os.pathsep.join(p for p in (stub_dir, os.environ.get("LIBRARY_PATH")) if p)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# The header of each image in `cuobjdump -elf -ptx` output. Its arch is the image's own; the file names that
# `-lelf` lists drop the ``a`` of an arch-specific image in older cuobjdumps (CUDA 12.8, in Triton 3.6).
_IMAGE = re.compile(r"^Fatbin (elf|ptx) code:\n=+\narch = (sm_\d+[af]?)$", re.M)


def binary_archs(path: str) -> tuple[list[str], list[str]]:
    """(SASS archs, PTX archs) of a cubin or fatbin, read with cuobjdump: (["sm_80", "sm_90"], ["compute_80"])."""
    tool = cuobjdump()
    try:
        out = subprocess.run([tool, "-elf", "-ptx", path], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BuildError(f"cuobjdump could not read {os.path.basename(path)}: {e}") from None
    text = out.stdout
    images = _IMAGE.findall(text)
    sass = sorted({a for kind, a in images if kind == "elf"}, key=arch_number)
    ptx = sorted({"compute_" + a.removeprefix("sm_") for kind, a in images if kind == "ptx"}, key=arch_number)
    if out.returncode != 0 or not (sass or ptx):
        if path.endswith(".cubin") and out.returncode == 0:
            return _cubin_arch(tool, path), []
        raise BuildError(f"cuobjdump finds no CUDA code in kernel {os.path.basename(path)}: "
                         f"{(out.stderr or out.stdout).strip()[:200]}")
    return sass, ptx


def _cubin_arch(tool: str, path: str) -> list[str]:
    out = subprocess.run([tool, "-elf", path], capture_output=True, text=True, timeout=120).stdout
    found = sorted(set(re.findall(r"\b(sm_\d+[af]?)\b", out)), key=arch_number)
    if not found:
        raise BuildError(f"cannot tell the architecture of {os.path.basename(path)}")
    return found[:1]


def arch_number(arch: str) -> int:
    return int(re.sub(r"\D", "", arch))


def disassembles(path: str) -> bool:
    """Whether ``cuobjdump -sass`` reads every SASS image of the binary (a malformed one fails)."""
    out = subprocess.run([cuobjdump(), "-sass", path], capture_output=True, text=True, timeout=300)
    return out.returncode == 0 and "Function :" in out.stdout


def missing_archs(sass: list[str], archs: tuple[int, ...]) -> list[str]:
    """The requested architectures a kernel has no SASS for (``sm_90a`` counts as 90: Inductor compiles
    9.0, 10.0 and 12.0 with the arch-specific suffix, which runs on exactly that compute capability)."""
    have = {arch_number(s) for s in sass}
    return [f"sm_{a}" for a in archs if a not in have]


def gpu_description() -> str:
    """The build GPU, for the manifest: 'NVIDIA H100 80GB HBM3 (sm_90)'."""
    major, minor = torch.cuda.get_device_capability()
    return f"{torch.cuda.get_device_name()} (sm_{major}{minor})"
