"""The exception hierarchy shared by the runtime and the build side.

Every error a user can cause derives from :class:`AotpackError`. The data travels on the exception as
fields, so callers (the CLI, a server) can report it without parsing the message.

May not: import any other module of aotpack: every module imports it.
"""
from __future__ import annotations


class AotpackError(Exception):
    """Base class of every error aotpack raises on purpose."""


class ArchiveError(AotpackError):
    """The archive is malformed, truncated, tampered with or incompatible with this host.

    ``path`` is the archive (when known) and ``reason`` the sentence that says what is wrong.
    """

    def __init__(self, reason: str, *, path: str | None = None):
        self.reason = reason
        self.path = path
        super().__init__(f"{path}: {reason}" if path else reason)


class WeightsError(AotpackError):
    """New weights do not fit a pack, or a weights file is malformed; nothing was changed.

    ``missing``, ``unexpected`` and ``mismatched`` list every problem found (names; for ``mismatched``,
    ``(name, expected, actual)``), all in one error. ``path`` is the file concerned, when there is one.
    """

    def __init__(self, reason: str, *, path: str | None = None, missing: tuple = (), unexpected: tuple = (),
                 mismatched: tuple = ()):
        self.reason = reason
        self.path = path
        self.missing = tuple(missing)
        self.unexpected = tuple(unexpected)
        self.mismatched = tuple(mismatched)
        super().__init__(f"{path}: {reason}" if path else reason)


class GuardError(AotpackError):
    """An input does not match the guards of any entry in the pack; nothing was computed.

    ``reasons`` holds one ``(entry_name, reason)`` pair per entry tried, in dispatch order.

    ``note`` (optional) is a sentence about the host rather than the input, e.g. that it has no usable CUDA
    device for the pack's CUDA entries; it ends the message.
    """

    def __init__(self, reasons: list[tuple[str, str]], *, note: str | None = None):
        self.reasons = list(reasons)
        self.note = note
        if len(self.reasons) == 1:
            message = self.reasons[0][1]
        else:
            parts = [f"entry {name}: {why}" for name, why in self.reasons]
            message = "no entry accepts this input: " + "; ".join(parts)
        if note:
            message = f"{message}; {note}"
        super().__init__(message)


class SessionError(AotpackError):
    """A stateful pack was called in a way its state does not allow: without a session, from two threads at
    once in one session, on another device than the session's state, or after a call that failed (the state
    is then undefined until ``reset()``)."""


class MethodError(AotpackError, AttributeError):
    """A pack was asked for a method it does not have (``pkg.decode`` on a pack without ``decode``, or
    ``pkg(...)`` on a pack without ``forward``). An ``AttributeError`` too, so ``hasattr(pkg, "decode")`` is
    False. ``name`` is the method asked for and ``methods`` those the pack has."""

    def __init__(self, name: str, methods: list[str], *, path: str | None = None):
        self.name = name
        self.methods = list(methods)
        self.path = path
        text = (f"this pack has no method {name!r}; its methods: {', '.join(self.methods)}"
                + (f" (call them as pkg.{self.methods[0]}(...))" if self.methods else ""))
        super().__init__(f"{path}: {text}" if path else text)


class CaptureError(AotpackError):
    """The model could not be captured as one graph (a graph break, or an untraceable construct).

    ``filename`` and ``lineno`` point at the user's code where known; ``reason`` is what the tracer said
    and ``hint`` what to change.
    """

    def __init__(self, reason: str, *, filename: str | None = None, lineno: int | None = None,
                 hint: str | None = None, code: str | None = None):
        self.reason = reason
        self.filename = filename
        self.lineno = lineno
        self.hint = hint
        self.code = code
        where = f"{filename}:{lineno}: " if filename and lineno else ""
        text = f"{where}{reason}"
        if code:
            text += f"\n    {code.strip()}"
        if hint:
            text += f"\n  hint: {hint}"
        super().__init__(text)


class BuildError(AotpackError):
    """The build could not finish for a reason other than capture (bad options, compiler failure)."""


class SigningError(AotpackError):
    """A pack could not be signed: the signing package is missing, or the key or certificate is unusable.
    (A signature that does not check out when a pack is loaded or verified is an ``ArchiveError``.)"""


class ModelFileError(AotpackError):
    """A model file given to the CLI does not follow the model file convention."""


class AotpackWarning(UserWarning):
    """Something about a pack or this host that does not stop it from loading but that a person should
    know: CUDA entries that cannot run on this host, or CUDA code that was never run where it was built."""
