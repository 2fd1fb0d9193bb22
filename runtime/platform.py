"""Can this host run a pack? CPU instruction sets, torch version, byte order, devices.

Each check returns a sentence naming both sides and what to do, or raises ``ArchiveError`` with it.

The CUDA part is pure functions of the manifest's CUDA records (``schema.CudaMeta``, which also checks them) and
of what torch says about a GPU (its name and compute capability), so that every rule can be tested on a host
without a GPU: which compiled code (SASS for an ``sm_`` architecture, PTX for a ``compute_`` one) a GPU can run.

May not: load or run anything: it compares records with the host.
"""
from __future__ import annotations

import platform as _platform
import sys

from .errors import ArchiveError
from .schema import CudaMeta, parse_arch

# The x86-64 microarchitecture levels the build side targets (gcc's -march names), as /proc/cpuinfo flags.
_V3 = ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "xsave")
ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "x86-64": (),
    "avx2": _V3,
    "avx512": _V3 + ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
}
# Flags that `native` builds record from the build host (the ones a compiler may use with -march=native).
KNOWN_FLAGS = tuple(sorted(set(ISA_FLAGS["avx512"]) | {
    "sse4_1", "sse4_2", "ssse3", "popcnt", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx512vbmi",
    "avx512_vbmi2", "avx512ifma", "avx512_bitalg", "avx512_vpopcntdq", "avx_vnni", "amx_tile", "amx_bf16",
    "amx_int8", "sha_ni", "vaes", "vpclmulqdq", "gfni", "adx"}))


def host_cpu_flags() -> frozenset[str]:
    """The CPU feature flags of this host (Linux: /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def host_machine() -> str:
    return _platform.machine().lower().replace("amd64", "x86_64")


def required_flags(target: dict) -> tuple[str, ...]:
    isa = target.get("cpu_isa")
    if isa == "native":
        flags = target.get("cpu_flags", [])
        return tuple(flags) if isinstance(flags, list) else ()
    return ISA_FLAGS.get(isa, ())


def check_target(target: dict, *, flags: frozenset[str] | None = None, machine: str | None = None,
                 running: str | None = None) -> None:
    """Refuse a pack whose CPU code this host cannot run (instead of dying of an illegal instruction), or
    whose code links another torch series than this process's (``running``, default ``torch.__version__``)."""
    machine = machine or host_machine()
    want_machine = target.get("machine")
    if want_machine and want_machine != machine:
        raise ArchiveError(f"the pack's native code is for {want_machine}, this host is {machine}; "
                           f"build the pack on (or for) {machine}")
    import torch  # here, not at import: a build-many parent checks its matrix without importing torch

    series = target.get("torch_series")
    running = running or torch.__version__
    if series is not None and series != torch_minor(running):
        raise ArchiveError(f"manifest.target.torch_series is {series!r}: the pack's native code links torch "
                           f"{series}, and this process runs torch {running}; install torch=={series}.* or "
                           "rebuild the pack with this torch")
    isa = target.get("cpu_isa")
    if isa is None:
        return
    if isa not in ISA_FLAGS and isa != "native":
        raise ArchiveError(f"the pack targets CPU ISA {isa!r}, which this reader does not know "
                           f"(it knows {', '.join(list(ISA_FLAGS) + ['native'])}); upgrade aotpack")
    have = host_cpu_flags() if flags is None else flags
    missing = [f for f in required_flags(target) if f not in have]
    if missing:
        raise ArchiveError(f"the pack's CPU code needs the {isa} instruction set, and this host's CPU lacks "
                           f"{', '.join(missing)}; rebuild the pack with --cpu-isa x86-64 (portable) or an "
                           "ISA this CPU has")


# The torch series (major.minor) aotpack supports; each has a CI lane (README, "Torch versions").
TORCH_SERIES = ("2.11", "2.12", "2.13", "2.14", "2.15")


def torch_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def check_torch(built_with: str, running: str | None = None) -> None:
    """The compiled code links libtorch: the pack's torch major.minor must be this process's."""
    import torch

    running = running or torch.__version__
    if torch_minor(built_with) != torch_minor(running):
        raise ArchiveError(f"the pack was built with torch {built_with} and this process runs torch {running}; "
                           f"native code is only loaded by the torch {torch_minor(built_with)} series: "
                           f"install torch=={torch_minor(built_with)}.* or rebuild the pack with this torch")


def check_byteorder() -> None:
    if sys.byteorder != "little":  # pragma: no cover - no big-endian hosts among supported platforms
        raise ArchiveError("aotpack archives hold little-endian data; this host is big-endian")


# ---------------------------------------------------------------------------------------------------
# CUDA architectures: which code a GPU runs (``schema.CudaArch.runs_on``)

def cuda_arch_runs(archs: list[str] | tuple[str, ...], ptx: list[str] | tuple[str, ...],
                   capability: tuple[int, int], where: str = "cuda") -> bool:
    """Whether code that carries SASS for ``archs`` and PTX for ``ptx`` runs on a GPU of ``capability``
    (major, minor). A malformed architecture string is an ArchiveError naming ``where``."""
    sass = [parse_arch(a, "sm", f"{where}.archs[{i}]") for i, a in enumerate(archs)]
    jit = [parse_arch(a, "compute", f"{where}.ptx[{i}]") for i, a in enumerate(ptx)]
    return any(a.runs_on(capability) for a in sass) or any(a.runs_on(capability) for a in jit)


def _carried(archs: list[str], ptx: list[str]) -> str:
    sass = f"SASS for {', '.join(archs)}" if archs else "no SASS"
    jit = f"PTX for {', '.join(ptx)}" if ptx else "no PTX"
    return f"{sass} and {jit}"


def _union(lists) -> list[str]:
    out: list[str] = []
    for items in lists:
        out.extend(a for a in items if a not in out)
    return out


def check_cuda_device(meta: CudaMeta | dict, index: int, name: str, capability: tuple[int, int],
                      where: str, max_shared_mem: int | None = None) -> None:
    """Refuse, before any kernel is loaded or launched, a GPU that cannot run every kernel of a CUDA entry.

    ``meta`` is the entry's ``cuda`` object (checked, or raw JSON), ``index``, ``name`` and ``capability``
    describe the GPU (``torch.cuda.get_device_name(i)``, ``get_device_capability(i)``), ``where`` names
    the entry for people ("CUDA entry 1"). A kernel without code for this GPU would fail at launch with a
    CUDA error that names neither the kernel nor the architectures; this says both, and how to fix it.
    """
    if not isinstance(meta, CudaMeta):
        meta = CudaMeta.from_json(meta, "cuda")
    major, minor = capability
    gpu = f"sm_{major}{minor}"
    kernels = meta.kernels
    # An entry without kernels of its own does all its GPU work through libtorch (cuBLAS, cuDNN, ATen),
    # which runs on any GPU this torch supports: its lists only record what the build asked for.
    failing = [k for k in kernels if not cuda_arch_runs(k.archs, k.ptx, capability)]
    if not failing:
        # Same architecture, smaller part: a kernel tuned on a GPU with more shared memory per block than
        # this one (``max_shared_mem``: the opt-in limit) would fail at its first launch.
        greedy = [k for k in kernels if max_shared_mem is not None and k.shared_mem > max_shared_mem]
        if greedy:
            k = max(greedy, key=lambda k: k.shared_mem)
            raise ArchiveError(f"GPU {index} ({name}, compute capability {major}.{minor}) cannot run {where} of "
                               f"this pack: its kernel {k.name} asks for {k.shared_mem:,} bytes of shared memory "
                               f"per block and this GPU allows {max_shared_mem:,}; rebuild the pack on this GPU")
        return
    carried = _carried(_union(k.archs for k in failing), _union(k.ptx for k in failing))
    if len(failing) == len(kernels):
        subject = f"its kernel {kernels[0].name} carries" if len(kernels) == 1 else "its kernels carry"
    else:
        names = ", ".join(k.name for k in failing[:3]) + (f" and {len(failing) - 3} more" if len(failing) > 3 else "")
        subject = f"its kernel{'s' if len(failing) > 1 else ''} {names} ({len(failing)} of {len(kernels)}) " \
                  f"carr{'y' if len(failing) > 1 else 'ies'}"
    raise ArchiveError(f"GPU {index} ({name}, compute capability {major}.{minor}) cannot run {where} of this "
                       f"pack: {subject} {carried}, none of which runs on {gpu}; rebuild with --cuda-arch "
                       f"{major}{minor}")


def cuda_unavailable_reason() -> str | None:
    """None when this process can use a CUDA device; else why not, for people."""
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if not torch.cuda.is_available():
        return (f"torch {torch.__version__} sees no CUDA device: no NVIDIA GPU or driver, or "
                "CUDA_VISIBLE_DEVICES hides them")
    return None
