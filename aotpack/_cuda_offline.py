"""GPU-less CUDA builds (experimental): Inductor compiles CUDA code on a host with no GPU and no driver.

Inductor has no supported way to do this: it asks the GPU for its properties, compiles Triton kernels
through the CUDA driver, and launches each kernel once to record its binary. This module replaces those
steps, inside one ``offline_cuda(...)`` context, with a fixed description of the target GPU and a Triton
driver that compiles but never loads or launches. Every name it patches is private to torch or Triton and
changed between releases, so the whole mode is gated on the exact versions in ``SUPPORTED``; tests in
``tests/test_cuda_build.py`` cover each of them.

May not: act outside ``offline_cuda(...)`` or on a torch/triton pair not in ``SUPPORTED``.
"""
from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass
from typing import Any, Iterator

import torch

# (torch version without local suffix, triton version) pairs this mode is tested with.
SUPPORTED: tuple[tuple[str, str], ...] = (("2.11.0", "3.6.0"), ("2.14.1", "3.8.0"))


@dataclass(frozen=True)
class GpuTarget:
    """What Inductor may learn of a GPU it cannot see: a representative part per architecture."""

    arch: int  # 80 for sm_80
    name: str
    sms: int
    shared_memory_per_block_optin: int
    l2_cache_size: int
    total_memory: int

    @property
    def major(self) -> int:
        return self.arch // 10

    @property
    def minor(self) -> int:
        return self.arch % 10


GIB = 1 << 30
TARGETS: dict[int, GpuTarget] = {t.arch: t for t in (
    GpuTarget(75, "NVIDIA T4 (no GPU: a stand-in for sm_75)", 40, 65536, 4 << 20, 16 * GIB),
    GpuTarget(80, "NVIDIA A100 (no GPU: a stand-in for sm_80)", 108, 166912, 40 << 20, 80 * GIB),
    GpuTarget(86, "NVIDIA A10 (no GPU: a stand-in for sm_86)", 72, 101376, 6 << 20, 24 * GIB),
    GpuTarget(89, "NVIDIA L4 (no GPU: a stand-in for sm_89)", 58, 101376, 48 << 20, 24 * GIB),
    GpuTarget(90, "NVIDIA H100 (no GPU: a stand-in for sm_90)", 132, 232448, 50 << 20, 80 * GIB),
    GpuTarget(100, "NVIDIA B200 (no GPU: a stand-in for sm_100)", 148, 232448, 126 << 20, 180 * GIB),
    GpuTarget(120, "NVIDIA RTX PRO 6000 (no GPU: a stand-in for sm_120)", 188, 101376, 128 << 20, 96 * GIB),
)}


def versions() -> tuple[str, str]:
    import triton

    return torch.__version__.split("+")[0], triton.__version__


def check_versions() -> None:
    from aotpack_runtime.errors import BuildError

    if torch.version.cuda is None:
        raise BuildError(f"--without-gpu needs the CUDA build of torch; this is torch {torch.__version__} "
                         "(a CPU build): install it in its own environment, e.g. `pip install torch==2.14.1`")
    try:
        have = versions()
    except ImportError:
        raise BuildError("--without-gpu needs triton (it comes with the CUDA build of torch)") from None
    if have not in SUPPORTED:
        want = ", ".join(f"torch {t} with triton {tr}" for t, tr in SUPPORTED)
        raise BuildError(f"--without-gpu is experimental and tested only with {want}; this is torch {have[0]} "
                         f"with triton {have[1]}. Install one of those, or build on a machine with the GPU")


class _Props:
    """Stands in for ``torch.cuda.get_device_properties(i)``."""

    def __init__(self, t: GpuTarget):
        self.name = t.name
        self.major = t.major
        self.minor = t.minor
        self.multi_processor_count = t.sms
        self.total_memory = t.total_memory
        self.warp_size = 32
        self.regs_per_multiprocessor = 65536
        self.max_threads_per_multi_processor = 2048 if t.arch in (80, 90, 100) else 1536
        self.max_threads_per_block = 1024
        self.shared_memory_per_block = 49152
        self.shared_memory_per_block_optin = t.shared_memory_per_block_optin
        self.shared_memory_per_multiprocessor = t.shared_memory_per_block_optin + 1024
        self.L2_cache_size = t.l2_cache_size
        self.gcnArchName = "NV"
        self.is_integrated = False
        self.is_multi_gpu_board = False
        self.uuid = "00000000-0000-0000-0000-000000000000"
        self.pci_bus_id = self.pci_device_id = self.pci_domain_id = 0

    def __repr__(self) -> str:
        return f"_CudaDeviceProperties(name={self.name!r}, major={self.major}, minor={self.minor})"


def _offline_driver(target: GpuTarget):
    """A Triton CUDA driver that reports ``target`` and never touches libcuda."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver

    class _Utils:
        @staticmethod
        def load_binary(name, kernel, shared, device):  # module, function, n_regs, n_spills, n_max_threads
            # No module: a CompiledKernel with module None unloads nothing when it is collected, which may
            # be after this driver is gone.
            return None, 0, 0, 0, 1024

        @staticmethod
        def unload_module(*_):
            return None

        get_current_device = staticmethod(lambda: 0)
        set_current_device = staticmethod(lambda device: None)
        get_default_stream = staticmethod(lambda device: 0)
        get_device_capability = staticmethod(lambda device: (target.major, target.minor))
        get_device_properties = staticmethod(lambda device: {
            "max_shared_mem": target.shared_memory_per_block_optin, "multiprocessor_count": target.sms,
            "max_num_regs": 65536, "warpSize": 32, "sm_clock_rate": 1_755_000, "mem_clock_rate": 2_619_000,
            "mem_bus_width": 5120})

    class _Launcher:
        def __init__(self, src, metadata):
            self.launch_cooperative_grid = False
            self.launch_pdl = False

        def __call__(self, *args, **kwargs):
            raise RuntimeError("a kernel compiled without a GPU cannot be launched")

    class OfflineCudaDriver(CudaDriver):
        def __init__(self):  # no CudaUtils: that compiles and dlopens libcuda
            self.utils = _Utils()
            self.launcher_cls = _Launcher
            self.get_device_capability = lambda device=None: (target.major, target.minor)
            self.get_current_stream = lambda device=None: 0
            self.get_current_device = lambda: 0
            self.set_current_device = lambda device: None

        def get_current_target(self):
            return GPUTarget("cuda", target.arch, 32)

        def get_active_torch_device(self):
            return torch.device("cuda", 0)

        @staticmethod
        def is_active():
            return True

        def get_device_interface(self):
            return torch.cuda

    return OfflineCudaDriver()


# Every private name ``offline_cuda`` replaces, as "module:attribute", in every supported version, and those
# it replaces in one version only (tests/test_cuda_build.py checks each exists in the versions that use it
# and that the list is complete).
PATCHED_IN: dict[str, tuple[str, ...]] = {
    # 2.11 has no switch to keep Inductor from looking for a GPU backend before each kernel compile.
    "2.11.0": ("torch._inductor.runtime.triton_helpers:set_driver_to_gpu",),
    "2.14.1": (),
}
PATCHED = (
    "torch.cuda:get_device_properties", "torch.cuda:get_device_capability", "torch.cuda:get_device_name",
    "torch.cuda:_DeviceGuard", "torch._C:_cuda_getCurrentRawStream", "torch._C._dynamo.guards:_empty_strided_cuda",
    *(f"torch._dynamo.device_interface:CudaInterface.{n}" for n in (
        "get_device_properties", "is_available", "exchange_device", "maybe_exchange_device", "set_device",
        "current_device", "device_count", "get_raw_stream", "synchronize", "get_compute_capability",
        "is_bf16_supported")),
    "torch._inductor.runtime.triton_heuristics:CachingAutotuner.run",
    "torch._inductor.select_algorithm:AlgorithmSelectorCache.generate_example_value",
    "torch._inductor.graph:is_same_tensor",
)


def patched_names() -> tuple[str, ...]:
    """Every private name ``offline_cuda`` replaces under this torch."""
    return PATCHED + PATCHED_IN.get(torch.__version__.split("+")[0], ())


class _NoDeviceGuard:
    """Stands in for ``torch.cuda._DeviceGuard``: there is no device to enter."""

    def __init__(self, index):
        self.idx = index

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _example_value(size, stride, device, dtype, extra_size, allocation_size=None):
    """Stands in for ``AlgorithmSelectorCache.generate_example_value``: a meta tensor, no GPU memory."""
    t = torch.empty_strided(allocation_size or size, stride, device="meta", dtype=dtype)
    return t.as_strided(size, stride) if allocation_size not in (None, size) else t


def _empty_strided_meta(size, stride, dtype, *rest, **kwargs):
    return torch.empty_strided(size, stride, device="meta", dtype=dtype)


def _run_without_launch(self, *args, stream, benchmark_run=False, **kwargs):
    """Stands in for ``CachingAutotuner.run``: compile the kernel's first heuristic config and record its
    binary for the package (what AOTInductor's autotune block wants), with no launch and no benchmark."""
    if not self.launchers:
        self.configs = self.configs[:1]
        self.compile_results = self.compile_results[:1]
        self.precompile()
    launcher = self.launchers[0]
    self.launchers = [launcher]
    if self.save_cache_hook:
        self.save_cache_hook(launcher.config, 0)
    self.save_gpu_kernel(stream, launcher)


last_patched: list[str] = []  # the names the last offline_cuda replaced (for the completeness test)


@contextlib.contextmanager
def offline_cuda(arch: int) -> Iterator[GpuTarget]:
    """Within this context Inductor compiles CUDA graphs for ``arch`` with no GPU present. Everything it
    changes is put back on exit, also when entering fails half way."""
    check_versions()
    import triton
    from torch._dynamo import device_interface as di
    from torch._inductor import graph, select_algorithm
    from torch._inductor.runtime import hints, triton_heuristics, triton_helpers
    from torch.utils import _triton as torch_triton

    from aotpack_runtime.errors import BuildError

    target = TARGETS[arch]
    props = _Props(target)
    undo: list = []
    last_patched.clear()

    def patch(obj: Any, name: str, value: Any) -> None:
        if not hasattr(obj, name):
            owner = getattr(obj, "__name__", type(obj).__name__)
            raise BuildError(f"--without-gpu: {owner}.{name} does not exist in this torch/triton; the GPU-less "
                             f"build supports only {SUPPORTED}")
        if isinstance(obj, type) and name not in vars(obj):  # inherited: remove the override afterwards
            undo.append(lambda: delattr(obj, name))
        else:  # the raw attribute (a staticmethod stays a staticmethod)
            saved = vars(obj)[name] if isinstance(obj, type) else getattr(obj, name)
            undo.append(lambda: setattr(obj, name, saved))
        setattr(obj, name, value)
        owner = obj.__name__ if isinstance(obj, types.ModuleType) else f"{obj.__module__}:{obj.__qualname__}"
        last_patched.append(f"{owner}:{name}" if isinstance(obj, types.ModuleType) else f"{owner}.{name}")

    def get_props(device: Any = None) -> _Props:
        return props

    try:
        iface = di.CudaInterface
        patch(torch.cuda, "get_device_properties", get_props)
        patch(torch.cuda, "get_device_capability", lambda device=None: (target.major, target.minor))
        patch(torch.cuda, "get_device_name", lambda device=None: target.name)
        patch(iface, "get_device_properties", staticmethod(get_props))
        patch(iface, "is_available", staticmethod(lambda: True))
        patch(iface, "exchange_device", staticmethod(lambda device: 0))
        patch(iface, "maybe_exchange_device", staticmethod(lambda device: 0))
        patch(iface, "set_device", staticmethod(lambda device: None))
        patch(iface, "current_device", staticmethod(lambda: 0))
        patch(iface, "device_count", staticmethod(lambda: 1))
        patch(iface, "get_raw_stream", staticmethod(lambda device=None: 0))
        patch(iface, "synchronize", staticmethod(lambda device=None: None))
        patch(iface, "get_compute_capability", staticmethod(lambda device=None: target.arch))
        patch(iface, "is_bf16_supported", staticmethod(lambda including_emulation=False: True))

        # Compile workers' cached view of the devices.
        saved_workers = (dict(di.caching_worker_current_devices), dict(di.caching_worker_device_properties))

        def restore_workers():
            for live, saved in zip((di.caching_worker_current_devices, di.caching_worker_device_properties),
                                   saved_workers):
                live.clear()
                live.update(saved)

        undo.append(restore_workers)
        di.caching_worker_current_devices["cuda"] = 0
        di.caching_worker_device_properties["cuda"] = [props]
        # Cached answers computed before (no GPU, no Triton device) must be asked again, and again after.
        undo.append(hints.DeviceProperties.create.cache_clear)
        undo.append(torch_triton.has_triton.cache_clear)
        hints.DeviceProperties.create.cache_clear()
        torch_triton.has_triton.cache_clear()

        driver = triton.runtime.driver
        previous_driver = driver._active  # None until something asks (asking, with no GPU, raises)
        undo.append(lambda: setattr(driver, "_active", previous_driver))
        driver.set_active(_offline_driver(target))
        # Before each kernel compile Inductor makes Triton's GPU backend the active driver, which it finds
        # by asking for a GPU: the offline driver is already the active one.
        if hasattr(triton_helpers, "_skip_gpu_driver_setup"):  # 2.14: a switch for this
            token = triton_helpers._skip_gpu_driver_setup.set(True)
            undo.append(lambda: triton_helpers._skip_gpu_driver_setup.reset(token))
        else:  # 2.11
            patch(triton_helpers, "set_driver_to_gpu", lambda: None)

        patch(triton_heuristics.CachingAutotuner, "run", _run_without_launch)
        # The autotune block Inductor generates allocates example inputs on the GPU, enters the device and
        # asks for its stream: meta tensors, no-ops and stream 0 instead.
        patch(select_algorithm.AlgorithmSelectorCache, "generate_example_value", staticmethod(_example_value))
        patch(torch._C._dynamo.guards, "_empty_strided_cuda", _empty_strided_meta)
        patch(torch.cuda, "_DeviceGuard", _NoDeviceGuard)
        patch(torch._C, "_cuda_getCurrentRawStream", lambda device=None: 0)
        # Inductor merges constants whose storages share a data pointer; every fake weight's pointer is 0, so
        # two different weights of one shape (two biases) would become one: a wrong answer, not an error.
        # Only the very same tensor object is the same constant here.
        patch(graph, "is_same_tensor", lambda data, value: data is value)
        yield target
    finally:
        for step in reversed(undo):
            step()


def fake_cuda_program(exported):
    """A copy of the exported program moved to CUDA with fake weights (the real ones stay in the pack);
    the original is not changed."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.export.passes import move_to_device_pass

    from ._torch import program_copy

    copied = program_copy(exported)
    # The fake weights must live in the program's own shape environment: a mode without it loses the size
    # hints of dynamic dimensions, which Inductor needs to lower e.g. an expand over a dynamic size.
    shape_env = next((n.meta["val"].fake_mode.shape_env for n in copied.graph.nodes if n.op == "placeholder"
                      and getattr(n.meta.get("val"), "fake_mode", None) is not None), None)
    with FakeTensorMode(allow_non_fake_inputs=True, shape_env=shape_env):
        return move_to_device_pass(copied, "cuda:0")
