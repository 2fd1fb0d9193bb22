"""Every private torch API the runtime touches, in one place, each with a test (tests/test_torch_private.py).

A torch upgrade that moves one of these breaks here, with a message that names the API, and nowhere else.
The runtime uses only torch core: ``torch._C._aoti`` is part of libtorch's Python bindings and needs neither
a compiler nor ``torch._inductor``.
"""
from __future__ import annotations

import torch

from .errors import ArchiveError


def _aoti():
    try:
        from torch._C import _aoti  # the C++ AOTInductor model-container runner bindings
    except ImportError as e:  # pragma: no cover - present in every supported torch
        raise ArchiveError(f"this torch ({torch.__version__}) lacks torch._C._aoti, which aotpack needs "
                           "to run compiled code; install torch 2.11 to 2.14") from e
    return _aoti


def cpu_runner(library_path: str, num_models: int = 1):
    """Load an Inductor-compiled model container (a ``.so``) for the CPU. Runs no compiler."""
    return _aoti().AOTIModelContainerRunnerCpu(library_path, num_models)


def constant_fqns(runner) -> dict[str, str]:
    """The compiled code's constant names mapped to the model's parameter or buffer names."""
    return dict(runner.get_constant_names_to_original_fqns())


def set_constants(runner, tensors: dict[str, torch.Tensor]) -> None:
    """Point the compiled code's constants at ``tensors`` (no copy: the caller keeps them alive)."""
    try:
        runner.update_constant_buffer(tensors, False, True, True)
    except TypeError:  # torch builds without the user_managed flag copy the tensors instead
        runner.update_constant_buffer(tensors, False, True)


def run(runner, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Call the compiled code on flat input tensors; returns its flat output tensors."""
    return runner.run(tensors)
