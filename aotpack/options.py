"""Build options: one frozen value that travels through the pipeline (never a global).

May not: read the environment: options travel as this value, set at the edge (the CLI)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from aotpack_runtime.errors import BuildError
from aotpack_runtime.format import CPU_ISAS, DEVICES
from aotpack_runtime.platform import ISA_FLAGS, host_cpu_flags, host_machine

DEFAULT_CPU_THREADS = 16
MAX_CPU_THREADS = 1024


@dataclass(frozen=True)
class BuildOptions:
    """What a build may vary. Every field is recorded in the pack's manifest (``options``).

    ``cpu_isa``: the x86-64 instruction set the CPU code may use: ``x86-64`` (runs anywhere), ``avx2``
    (x86-64-v3), ``avx512`` (x86-64-v4) or ``native`` (whatever the build host has: not portable).
    ``None`` means ``avx2`` where the build host has it, else ``x86-64``.
    ``compression_level``: zstd level for blobs that compression shrinks by at least 5%.
    ``devices``: the kinds of entries to build, ``("cpu",)``, ``("cuda",)`` or both: each captured graph
    gets one entry per device, all sharing the pack's weights.
    ``cuda_archs``: compute capabilities the CUDA code is for (``(80, 90)``): SASS for each, PTX for the
    lowest. Empty means the build GPU's own.
    ``without_gpu``: build CUDA entries on a host with no GPU (experimental: not autotuned, never run at
    build time; needs ``cuda_archs`` and an exact torch/triton pair, see ``aotpack/_cuda_offline.py``).
    ``cpu_threads``: the thread count the CPU code's parallel loops are planned for. It decides which
    kernels run in parallel and how many loop levels they split; the code itself runs on as many threads as
    the serving process has (OpenMP's, i.e. ``OMP_NUM_THREADS`` or the cores). It is an option, not read
    from the build host, so that the bytes do not depend on where the pack was built.
    ``onednn_convs``: CPU entries run float32 2-d convolutions through oneDNN, with the per-channel ops after
    each (a batch norm, a scale) folded into its weight and bias and its activation run inside it, and with
    weights that the runtime folds and packs into oneDNN's layout at load, on the serving host (see README,
    "Convolutions"); and large float32 linears run through oneDNN with weights packed at load too. Off, ATen
    picks each convolution's kernel on every call, as eager PyTorch does, and MKL runs the linears.
    """

    cpu_isa: str | None = None
    compression_level: int = 9
    devices: tuple[str, ...] = ("cpu",)
    cuda_archs: tuple[int, ...] = ()
    without_gpu: bool = False
    cpu_threads: int = DEFAULT_CPU_THREADS
    onednn_convs: bool = True

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
        if type(self.cpu_threads) is not int or not 1 <= self.cpu_threads <= MAX_CPU_THREADS:
            raise BuildError(f"--cpu-threads must be an integer from 1 to {MAX_CPU_THREADS}, got {self.cpu_threads!r}")
        if type(self.onednn_convs) is not bool:
            raise BuildError(f"onednn_convs must be True or False, got {self.onednn_convs!r}")
        devices = tuple(dict.fromkeys(self.devices))
        if not devices or any(d not in DEVICES for d in devices):
            raise BuildError(f"--device must be one of {', '.join(DEVICES)} (repeatable), got {list(self.devices)}")
        archs = self.cuda_archs
        if "cuda" not in devices:
            if archs or self.without_gpu:
                flag = "--cuda-arch" if archs else "--without-gpu"
                raise BuildError(f"{flag} applies to CUDA entries: add --device cuda")
        else:
            from . import cudabuild

            archs = cudabuild.parse_archs(list(archs)) if archs else ()
            cudabuild.check_toolchain(self.without_gpu)
            if self.without_gpu:
                from . import _cuda_offline

                _cuda_offline.check_versions()
                if not archs:
                    raise BuildError("--without-gpu needs --cuda-arch: with no GPU to ask, name the architectures "
                                     "to build for, e.g. --cuda-arch 80,90")
                if min(archs) not in _cuda_offline.TARGETS:
                    known = ", ".join(str(a) for a in _cuda_offline.TARGETS)
                    raise BuildError(f"--without-gpu compiles for the lowest architecture named, {min(archs)}, and "
                                     f"has no device description for it (it has {known})")
            elif not archs:
                import torch

                major, minor = torch.cuda.get_device_capability()
                archs = cudabuild.parse_archs(f"{major}{minor}")
        return BuildOptions(cpu_isa=isa, compression_level=self.compression_level, devices=devices,
                            cuda_archs=tuple(archs), without_gpu=self.without_gpu, cpu_threads=self.cpu_threads,
                            onednn_convs=self.onednn_convs)

    def to_json(self) -> dict:
        out = asdict(self)
        out["devices"] = list(self.devices)
        out["cuda_archs"] = list(self.cuda_archs)
        return out

    @classmethod
    def from_json(cls, obj: dict) -> "BuildOptions":
        """The options ``to_json`` wrote (for compile worker processes)."""
        return cls(cpu_isa=obj["cpu_isa"], compression_level=obj["compression_level"], devices=tuple(obj["devices"]),
                   cuda_archs=tuple(obj["cuda_archs"]), without_gpu=obj["without_gpu"],
                   cpu_threads=obj["cpu_threads"], onednn_convs=obj["onednn_convs"])
