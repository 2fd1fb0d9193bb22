"""aotpack: ahead-of-time export and packaging for PyTorch models.

``aotpack.build(model, example_inputs, output)`` compiles a model into one archive (``methods=`` several of
its methods, ``aotpack.Method``, into one archive sharing weights and state);
``aotpack.load(path)`` loads it for serving; ``aotpack.sign(path, key)`` signs it. ``import aotpack`` stays
light: it imports the error types only; the runtime's loader comes with the first use of ``load`` (or
``Package``, ``Session``, ``Entry``), the build side (Dynamo, Inductor) only when ``build`` is called, the
signing package only when ``sign`` is.

May not: build itself (``build`` goes through ``front``, as the CLI and ``build-many`` do), or import at
import time what a load or a build imports when it needs it.
"""
from __future__ import annotations

import pathlib
import sys
from typing import Any, Callable

__version__ = "0.1.0"

from aotpack_runtime.errors import (AotpackError, ArchiveError, BuildError, CaptureError, GuardError,  # noqa: E402
                                   MethodError, ModelFileError, SessionError, SigningError,
                                   WeightsError)

# Public names imported at first use: the runtime's (``load``...) and the build side's ``Method``.
_LAZY = {"load": "aotpack_runtime", "Package": "aotpack_runtime", "Session": "aotpack_runtime",
         "Entry": "aotpack_runtime", "Method": "aotpack.methods"}


def __getattr__(name: str) -> Any:
    """``aotpack.load``, ``Package``, ``Session``, ``Entry`` (the runtime's) and ``Method`` (the build side's),
    imported at first use (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'aotpack' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def build(model: Any, example_inputs: tuple | None = None, output: str | pathlib.Path | None = None, *,
          example_kwargs: dict | None = None,
          dynamic_shapes: Any = None, specializations: Any = (), cpu_isa: str | None = None,
          devices: tuple[str, ...] = ("cpu",), cuda_archs: Any = (), without_gpu: bool = False,
          cpu_threads: int | None = None, cache_positions: Any = None, cache: Any = True,
          progress: Any = None, methods: dict | None = None, weights: str = "internal",
          onednn_convs: bool = True) -> pathlib.Path:
    """Capture, guard, compile and package ``model(*example_inputs, **example_kwargs)`` into ``output``.

    ``model`` is an ``nn.Module`` or a plain function of tensors; ``example_inputs`` a tuple. Module state
    (parameters, buffers, attributes, the training flag) is frozen into the pack.

    ``dynamic_shapes`` (torch.export's format: ``{"x": {0: Dim("batch", min=1, max=64)}}``) makes sizes
    symbolic within ranges; ``specializations`` is a list of further example inputs (args tuples, or
    ``(args, kwargs)``), each compiled as its own entry unless an earlier entry's guards accept it. At call
    time the first entry whose guards pass runs. ``cpu_isa`` picks the
    instruction set of the CPU code (``x86-64``, ``avx2``, ``avx512``, ``native``; default ``avx2`` where
    the host has it). ``devices`` picks the kinds of entries (``("cpu",)``, ``("cuda",)`` or both);
    ``cuda_archs`` the compute capabilities of CUDA code (``"80,90"`` or ``(80, 90)``; default the build
    GPU's); ``without_gpu`` builds CUDA entries on a host with no GPU (experimental, see the README).
    ``cpu_threads`` is the thread count the CPU code's parallel loops are planned for (default 16; the code
    runs on as many threads as the serving process has). ``onednn_convs`` (default on) runs the CPU code's
    float32 convolutions and large linears through oneDNN, batch norms folded into the convolutions, with
    weights the runtime folds and packs into oneDNN's layout at load.
    Buffers the model writes in place (an LLM's KV cache) become the pack's state, served through sessions
    (``pkg.session()``); ``cache_positions`` (``{"input": "cache_position", "limit": 64, "span": ["input_ids",
    1]}``) names the input holding cache positions, so that calls past the cache are refused; for Hugging
    Face's ``TorchExportableModuleWithStaticCache`` it is found by itself.
    ``cache`` is the build cache: ``True`` (default) uses ``$AOTPACK_BUILD_CACHE`` or
    ``~/.cache/aotpack/build``, a path picks another folder, ``False`` always compiles. A pack is reused only
    when everything that decides its bytes is the same (graph, weights, example inputs, options, toolchain),
    so the cache changes how long a build takes, never what it writes.
    ``methods`` builds several methods of one module into one pack: ``{"encode": aotpack.Method(model.encode,
    (x,)), "decode": aotpack.Method(model.decode, (t,), dynamic_shapes=...)}``; each method has its own example
    inputs and kwargs, ``dynamic_shapes``, ``specializations`` and ``cache_positions`` (``example_inputs`` and
    the arguments above for them are then not given). Weights read by several methods are stored once; the
    buffers any method writes in place are one state that a session shares between methods
    (``s = pkg.session(); s.encode(x); s.decode(t)``). ``forward`` alone builds the pack of one forward.
    ``progress`` says where the build's progress goes, one line per stage and event as the CLI prints them:
    ``None`` (default) to stderr when stderr is a terminal, else nowhere; ``True`` to stderr always; ``False``
    nowhere; a function is called with each line.
    ``weights="external"`` keeps the weights in a safetensors file beside the pack (``output`` with the suffix
    ``.safetensors``), which the pack pins by its sha256; ``load`` finds it there (or takes ``weights=PATH``).
    Returns the path of the written pack.
    """
    from . import front

    if output is None:
        raise BuildError("build needs output, the path of the pack to write")
    if methods is None and example_inputs is None:
        raise BuildError("build needs example_inputs (a tuple), or methods= (name -> aotpack.Method)")
    options = front.options(cpu_isa=cpu_isa, devices=devices, cuda_archs=cuda_archs, without_gpu=without_gpu,
                            cpu_threads=cpu_threads, onednn_convs=onednn_convs)
    report = front.build(model, example_inputs, output, options=options, cache=cache, progress=_progress(progress),
                         source=f"aotpack.build({type(model).__name__})", example_kwargs=example_kwargs,
                         dynamic_shapes=dynamic_shapes, specializations=specializations,
                         cache_positions=cache_positions, methods=methods, weights=weights)
    return report.output


def _progress(progress: Any) -> Callable[[str], None] | None:
    """``build``'s ``progress`` argument as the pipeline's callback (None: silent)."""
    if progress is None:
        isatty = getattr(sys.stderr, "isatty", None)
        progress = bool(isatty and isatty())
    if progress is True:
        return lambda line: print(line, file=sys.stderr, flush=True)
    if progress is False:
        return None
    if callable(progress):
        return progress
    raise BuildError(f"progress must be None, True, False or a function of one line of text, got "
                     f"{type(progress).__name__}")


def sign(pack: str | pathlib.Path, key: str | pathlib.Path, output: str | pathlib.Path | None = None, *,
         certificate: str | pathlib.Path | None = None, chain: Any = ()) -> pathlib.Path:
    """Sign the pack at ``pack`` with the EC private key ``key`` (PEM) using OpenSSF model-signing; write the
    detached signature (a Sigstore bundle) to ``output`` (default ``PACK.sig``) and return its path.

    ``certificate`` (PEM, issued for ``key``) and ``chain`` (intermediate and root certificates) make a
    certificate signature. ``load(pack, public_key=...)`` checks it. Needs ``pip install aotpack[sign]``;
    raises ``SigningError`` for a missing package or an unusable key, ``ArchiveError`` for a damaged pack.
    """
    from .signing import sign as _sign

    written, _ = _sign(pack, key, output, certificate=certificate, chain=chain)
    return pathlib.Path(written)


__all__ = ["build", "load", "sign", "Method", "Package", "Session", "Entry", "AotpackError", "ArchiveError",
           "CaptureError", "GuardError", "MethodError", "SessionError", "WeightsError", "BuildError", "ModelFileError", "SigningError",
           "__version__"]
