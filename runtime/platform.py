"""Can this host run a pack? CPU instruction sets, torch version, byte order, devices.

Each check returns a sentence naming both sides and what to do, or raises ``ArchiveError`` with it.
"""
from __future__ import annotations

import platform as _platform
import sys

import torch

from .errors import ArchiveError

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


def check_target(target: dict, *, flags: frozenset[str] | None = None, machine: str | None = None) -> None:
    """Refuse a pack whose CPU code this host cannot run (instead of dying of an illegal instruction)."""
    machine = machine or host_machine()
    want_machine = target.get("machine")
    if want_machine and want_machine != machine:
        raise ArchiveError(f"the pack's native code is for {want_machine}, this host is {machine}; "
                           f"build the pack on (or for) {machine}")
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


def torch_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def check_torch(built_with: str, running: str | None = None) -> None:
    """The compiled code links libtorch: the pack's torch major.minor must be this process's."""
    running = running or torch.__version__
    if torch_minor(built_with) != torch_minor(running):
        raise ArchiveError(f"the pack was built with torch {built_with} and this process runs torch {running}; "
                           f"native code is only loaded by the torch {torch_minor(built_with)} series: "
                           f"install torch=={torch_minor(built_with)}.* or rebuild the pack with this torch")


def check_byteorder() -> None:
    if sys.byteorder != "little":  # pragma: no cover - no big-endian hosts among supported platforms
        raise ArchiveError("aotpack archives hold little-endian data; this host is big-endian")
