"""aotpack's runtime: load a pack and call it. Imports only the standard library, torch core, zstandard
and cffi (and cryptography, when a signature is checked); never the build side, the signing package, click,
triton, torch._dynamo or torch._inductor, and never runs a compiler.

``import aotpack_runtime`` imports only the error types: the loader and what it needs come with the first use
of ``load`` (or of another name below), and a load imports only what that pack needs (zstandard when a blob
is decompressed, sessions for a pack with state, the signature check when a key is given). A fresh process
pays for what it uses.

May not: import a module at import time that not every load uses.
"""
from .errors import AotpackError, AotpackWarning, ArchiveError, CaptureError, GuardError, MethodError, SessionError, \
    WeightsError

# Each public name that is not an error type, and the module that defines it (imported at first use).
_LAZY = {"FORMAT_VERSION": "format", "MIN_READ_VERSION": "format", "CudaEntry": "entries", "Entry": "entries",
         "Package": "loader", "Method": "loader", "load": "loader", "Session": "sessions"}

__all__ = ["AotpackError", "AotpackWarning", "ArchiveError", "CaptureError", "GuardError", "MethodError", "SessionError",
           "WeightsError", "Package", "Method", "Session", "Entry", "CudaEntry", "load", "FORMAT_VERSION", "MIN_READ_VERSION"]


def __getattr__(name: str):
    """The lazily imported public names (PEP 562): ``aotpack_runtime.load`` imports the loader."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'aotpack_runtime' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
