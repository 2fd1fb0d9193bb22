"""Every private torch API the runtime touches, in one place, each with a test (tests/test_torch_private.py).

A torch upgrade that moves one of these breaks here, with a message that names the API, and nowhere else.
The runtime uses only torch core: ``torch._C._aoti`` is part of libtorch's Python bindings and needs neither
a compiler nor ``torch._inductor``.

No other runtime module calls a private torch API.

May not: import any runtime module but ``errors``.
"""
from __future__ import annotations

import torch

from .errors import ArchiveError


def _aoti():
    try:
        from torch._C import _aoti  # the C++ AOTInductor model-container runner bindings
    except ImportError as e:  # pragma: no cover - present in every supported torch
        raise ArchiveError(f"this torch ({torch.__version__}) lacks torch._C._aoti, which aotpack needs "
                           "to run compiled code; install torch 2.11 to 2.15") from e
    return _aoti


def cpu_runner(library_path: str, num_models: int = 1):
    """Load an Inductor-compiled model container (a ``.so``) for the CPU. Runs no compiler."""
    return _aoti().AOTIModelContainerRunnerCpu(library_path, num_models)


def cuda_runner(library_path: str, num_models: int, device_str: str, cubin_dir: str):
    """Load an Inductor-compiled model container for a CUDA device (``device_str``, e.g. ``cuda:1``).

    The library loads each GPU kernel at its first run from ``cubin_dir/<file>``: the kernels must already
    be there. Loading the library needs libcuda.so.1, so call this only on a host with a usable GPU.

    Each model the container creates calls ``cudaSetDevice(index)`` and leaves it set; it is created inside
    ``torch.cuda.device(index)``, which puts the caller's current device back afterwards.
    """
    aoti = _aoti()
    cls = getattr(aoti, "AOTIModelContainerRunnerCuda", None)
    if cls is None:
        raise ArchiveError(f"this torch ({torch.__version__}) is a CPU build, and the pack's CUDA entries need "
                           "the CUDA build of torch (the same major.minor series); install it to run them")
    with torch.cuda.device(torch.device(device_str).index or 0):
        # torch 2.11 to 2.15: (model_so_path, num_models, device_str, cubin_dir)
        return cls(library_path, num_models, device_str, cubin_dir)


def cuda_run(runner, tensors: list[torch.Tensor], index: int) -> list[torch.Tensor]:
    """Call a CUDA container on flat input tensors that lie on device ``index``.

    Without a stream argument, the runner enqueues its work on ``c10::cuda::getCurrentCUDAStream()`` of
    the *current* device, not of the inputs' device. Making ``index`` current for the call makes it use the
    caller's current stream on the inputs' device, as an eager op on those tensors would; the common case
    (the inputs are on the current device) costs one cheap check.
    """
    if torch.cuda.current_device() == index:
        return runner.run(tensors)
    with torch.cuda.device(index):
        return runner.run(tensors)


def constant_fqns(runner) -> dict[str, str]:
    """The compiled code's constant names mapped to the model's parameter or buffer names."""
    return dict(runner.get_constant_names_to_original_fqns())


def set_constants(runner, tensors: dict[str, torch.Tensor]) -> None:
    """Point the compiled code's constants at ``tensors`` (no copy: the caller keeps them alive)."""
    try:
        runner.update_constant_buffer(tensors, False, True, True)
    except TypeError:  # torch builds without the user_managed flag copy the tensors instead
        runner.update_constant_buffer(tensors, False, True)


def bind_constants(runner, tensors: dict[str, torch.Tensor]) -> None:
    """Point some of the compiled code's constants at ``tensors`` (no copy; the others stay as they are).
    The code writes into a constant it mutates (a state buffer) in place, through this pointer."""
    runner.update_constant_buffer(tensors, False, False, True)


def run(runner, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Call the compiled code on flat input tensors; returns its flat output tensors."""
    return runner.run(tensors)


def onednn_conv_weight(weight: torch.Tensor, padding: list[int], stride: list[int], dilation: list[int],
                       groups: int, input_size: list[int]) -> torch.Tensor:
    """``weight`` (a float32 convolution weight, OIHW) in the layout oneDNN's convolution wants for an input of
    ``input_size`` on this host's CPU: an opaque oneDNN tensor that ``mkldnn._convolution_pointwise`` takes as
    its weight without reordering it on every call. The layout depends on the host's ISA, so it is computed
    here, at load, never stored."""
    return torch.ops.mkldnn._reorder_convolution_weight(weight, padding, stride, dilation, groups, input_size)


def onednn_linear_weight(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` (a float32 linear weight, [out, in]) in the layout oneDNN's linear wants for an input of
    ``rows`` rows on this host's CPU, which ``mkldnn._linear_pointwise`` takes as its weight without packing it
    on every call. Computed at load, never stored, as ``onednn_conv_weight``."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)
