"""Build options: one frozen value that travels through the pipeline (never a global)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from aotpack_runtime.errors import BuildError
from aotpack_runtime.platform import ISA_FLAGS, host_cpu_flags, host_machine

CPU_ISAS = ("x86-64", "avx2", "avx512", "native")


@dataclass(frozen=True)
class BuildOptions:
    """What a build may vary. Every field is recorded in the pack's manifest (``options``).

    ``cpu_isa``: the x86-64 instruction set the CPU code may use: ``x86-64`` (runs anywhere), ``avx2``
    (x86-64-v3), ``avx512`` (x86-64-v4) or ``native`` (whatever the build host has: not portable).
    ``None`` means ``avx2`` where the build host has it, else ``x86-64``.
    ``compression_level``: zstd level for blobs that compression shrinks by at least 5%.
    """

    cpu_isa: str | None = None
    compression_level: int = 9

    def resolved(self) -> "BuildOptions":
        isa = self.cpu_isa
        if isa is None:
            has_avx2 = all(f in host_cpu_flags() for f in ISA_FLAGS["avx2"])
            isa = "avx2" if host_machine() == "x86_64" and has_avx2 else "x86-64"
        if isa not in CPU_ISAS:
            raise BuildError(f"unknown CPU ISA {isa!r}: choose one of {', '.join(CPU_ISAS)}")
        if host_machine() != "x86_64":
            raise BuildError(f"CPU packs are built for x86_64; this host is {host_machine()}")
        missing = [f for f in ISA_FLAGS.get(isa, ()) if f not in host_cpu_flags()]
        if missing:
            raise BuildError(f"cannot build for {isa}: the build host lacks {', '.join(missing)}, and Inductor "
                             "checks the ISA by running code; choose --cpu-isa x86-64 or build elsewhere")
        if not 1 <= self.compression_level <= 22:
            raise BuildError(f"compression level {self.compression_level} is outside zstd's 1..22")
        return BuildOptions(cpu_isa=isa, compression_level=self.compression_level)

    def to_json(self) -> dict:
        return asdict(self)
