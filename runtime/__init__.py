"""aotpack's runtime: load a pack and call it. Imports only the standard library, torch core, zstandard
and cffi (and cryptography, when a signature is checked); never the build side, the signing package, click,
triton, torch._dynamo or torch._inductor, and never runs a compiler."""
from .errors import AotpackError, AotpackWarning, ArchiveError, CaptureError, GuardError, SessionError, WeightsError
from .format import FORMAT_VERSION, MIN_READ_VERSION
from .loader import CudaEntry, Entry, Package, load
from .sessions import Session

__all__ = ["AotpackError", "AotpackWarning", "ArchiveError", "CaptureError", "GuardError", "SessionError", "WeightsError", "Package",
           "Session", "Entry", "CudaEntry", "load", "FORMAT_VERSION", "MIN_READ_VERSION"]
