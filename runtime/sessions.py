"""Sessions: one conversation's state (an LLM's KV cache) on a loaded stateful pack.

A pack with state records, apart from its weights, the buffers its code writes in place between calls, and
their initial values (``manifest.state``). ``Package.session()`` gives a ``Session`` with its own fresh copy
of them; it is called like the model, dispatches by the same guards, and its calls write into its own
state only. The weights stay mapped from the file and are never written; state memory is never a view of
the file and never shared between sessions or between two loads.

State memory: a buffer whose initial value is zeros is allocated as anonymous memory that the OS zero-fills
on first touch, so opening a session costs no time per byte and a session's memory grows only with the part
of its cache it writes; a buffer with another initial value is a copy of it.

A session's state lives on one device: the CPU, or the GPU of its first call (or the one given to
``Package.session``); a call with inputs elsewhere is refused. A pack of several methods has one state for
all of them: ``s.encode(...)`` writes the cache that ``s.decode(...)`` then reads. Positions: where the pack says which input
holds cache positions, a call that would write before the start or past the end of the cache is a
``GuardError`` before any native code runs.

May not: reach into the package: it gets a ``SessionSource`` (template, dispatch, position checks).
"""
from __future__ import annotations

import itertools
import mmap
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from .errors import ArchiveError, GuardError, MethodError, SessionError
from .format import DEFAULT_METHOD
from .schema import PositionRule, StateRecord
from .guards import TensorGuard, DTYPE_BY_NAME
from .weights import tensor_from_bytes

if TYPE_CHECKING:
    from .entries import Entry

_ids = itertools.count(1)


def _anonymous_zeros(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A zero tensor in fresh anonymous memory: pages are zero-filled by the OS when first touched."""
    n = 1
    for d in shape:
        n *= d
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    if nbytes < mmap.PAGESIZE:
        return torch.zeros(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(shape)


class StateTemplate:
    """The initial value of every state buffer of a pack, read once at load (a copy, never a view of the
    file), from which each session's state is made."""

    def __init__(self, records: tuple[StateRecord, ...], initial: dict[str, torch.Tensor | None]):
        self.records = records
        self._initial = initial  # name -> initial tensor, or None for zeros

    @classmethod
    def from_archive(cls, archive) -> "StateTemplate":
        initial: dict[str, torch.Tensor | None] = {}
        for r in archive.manifest.state:
            if r.init == "zeros":
                initial[r.name] = None
            else:
                data = bytearray(archive.read_blob(r.init))  # checked against its sha256; an owned copy
                initial[r.name] = tensor_from_bytes(data, r.dtype, r.shape)
        return cls(archive.manifest.state, initial)

    def fresh(self, device: torch.device) -> dict[str, torch.Tensor]:
        """New state buffers with their initial values, on ``device``."""
        out = {}
        for r in self.records:
            init = self._initial[r.name]
            dtype = DTYPE_BY_NAME[r.dtype]
            if device.type == "cpu":
                out[r.name] = _anonymous_zeros(dtype, r.shape) if init is None else init.clone()
            else:
                out[r.name] = torch.zeros(r.shape, dtype=dtype, device=device) if init is None \
                    else init.to(device, copy=True)
        return out

    def describe(self) -> str:
        names = ", ".join(r.name for r in self.records[:4]) + (f" and {len(self.records) - 4} more"
                                                               if len(self.records) > 4 else "")
        return f"{len(self.records)} state buffer{'s' if len(self.records) != 1 else ''} ({names})"


@dataclass(frozen=True)
class PositionCheck:
    """A position rule bound to one entry's inputs: where the positions and the span are among the tensors
    the entry's guards hand to native code."""

    rule: PositionRule
    tensor: int  # index among the entry's tensor inputs
    who: str  # "input 'cache_position' (kwargs['cache_position'])"
    span_tensor: int | None
    span_dim: int
    span_who: str

    @classmethod
    def bind(cls, rule: PositionRule, entry: "Entry", path: str, where: str) -> "PositionCheck":
        tensors = [g for g in entry.guards.leaves if isinstance(g, TensorGuard)]
        index = {g.name: i for i, g in enumerate(tensors)}
        if rule.input not in index:
            raise ArchiveError(f"{where} names the input {rule.input!r}, which entry {entry.name} does not take as a "
                               "tensor", path=path)
        g = tensors[index[rule.input]]
        span_tensor, span_dim, span_who = None, 0, ""
        if not isinstance(rule.span, int):
            name, span_dim = rule.span
            if name not in index or span_dim >= len(tensors[index[name]].sizes):
                raise ArchiveError(f"{where}.span names dimension {span_dim} of the input {name!r}, which entry "
                                   f"{entry.name} does not have", path=path)
            span_tensor = index[name]
            s = tensors[span_tensor]
            span_who = f"input {s.name!r} ({s.path}) writes"
        return cls(rule, index[rule.input], f"input {g.name!r} ({g.path})", span_tensor, span_dim, span_who)

    def check(self, tensors: list[torch.Tensor]) -> str | None:
        """Why this call would write outside the cache, or None."""
        p = tensors[self.tensor]
        limit = self.rule.limit
        if p.dim() != 1 or p.numel() == 0 or p.dtype.is_floating_point or p.dtype.is_complex or p.dtype == torch.bool:
            return f"{self.who} must be a 1-D integer tensor holding at least one cache position"
        values = p.tolist()
        low, high, first = min(values), max(values), values[0]
        span = self.rule.span if self.span_tensor is None else tensors[self.span_tensor].shape[self.span_dim]
        if low < 0:
            return f"{self.who} holds the cache position {low}; positions start at 0"
        if high >= limit or first + span > limit:
            writes = f"{self.span_who} {span} position{'s' if span != 1 else ''} from there" if self.span_tensor \
                is not None else f"the call writes {span} position{'s' if span != 1 else ''} from there"
            return (f"{self.who} starts at cache position {first} and {writes} (up to {max(high, first + span - 1)}), "
                    f"past the end of the cache ({limit} positions, 0..{limit - 1}); start a new session, or reset() "
                    "this one, for a longer conversation")
        return None


@dataclass(frozen=True)
class SessionSource:
    """What a session needs of its package: the pack's path (for messages), its state template, the dispatch
    that picks an entry of a method for a call (entry and the tensors to hand it, or GuardError), each entry's
    position checks (by entry index) and the names of the pack's methods."""

    path: str
    template: "StateTemplate"
    dispatch: Callable[[tuple, dict, str], tuple["Entry", list[torch.Tensor]]]
    position_checks: list[list["PositionCheck"]]
    methods: tuple[str, ...] = (DEFAULT_METHOD,)


class Session:
    """One conversation on a stateful pack: its own state, fresh from the pack's initial values.

    Call it like the model: ``s(...)`` for ``forward``, ``s.decode(...)`` for a method of the pack (all
    methods share the session's state). ``reset()`` restores the initial state; ``state_dict()`` / ``load_state_dict()``
    read and restore it (to reuse a prompt's KV cache); ``fork()`` opens a new session holding a copy of this
    one's state. Sessions of one package may run at the same time from several threads (as many calls at
    once as the package's ``num_models``); one session runs one call at a time.
    """

    def __init__(self, source: SessionSource, device: torch.device | str | None = None):
        self._source = source
        self._template = source.template
        self._device = torch.device(device) if device is not None else None
        self._state: dict[str, torch.Tensor] | None = None
        self._uid = next(_ids)
        self._generation = 0
        self._failed: str | None = None
        self._busy = threading.Lock()
        if self._device is not None:
            self._state = self._template.fresh(self._device)

    @property
    def device(self) -> torch.device | None:
        """Where the state lives: set by ``Package.session(device=...)`` or by the first call."""
        return self._device

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(DEFAULT_METHOD, args, kwargs)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        # Only for names that are not attributes: a method of the pack, else a MethodError (an AttributeError).
        source = self.__dict__.get("_source")
        if source is None or name.startswith("__"):
            raise AttributeError(name)
        if name not in source.methods:
            raise MethodError(name, list(source.methods), path=source.path)

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._call(name, args, kwargs)

        call.__name__ = call.__qualname__ = name
        return call

    def _call(self, method: str, args: tuple, kwargs: dict) -> Any:
        if method not in self._source.methods:
            raise MethodError(method, list(self._source.methods), path=self._source.path)
        if not self._busy.acquire(blocking=False):
            raise SessionError("this session is already running a call in another thread; a session is one "
                               "conversation, one call at a time: open a session per thread (pkg.session())")
        try:
            if self._failed is not None:
                raise SessionError(f"an earlier call of this session failed ({self._failed}), so its state is "
                                   "undefined; call reset() to start it again")
            entry, tensors = self._source.dispatch(args, kwargs, method)
            for check in self._source.position_checks[entry.index]:
                why = check.check(tensors)
                if why is not None:
                    raise GuardError([(entry.label(), why)])
            state = self._state_on(entry, tensors)
            try:
                return entry.run_stateful(tensors, state, (self._uid, self._generation))
            except BaseException as e:
                self._failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
                raise
        finally:
            self._busy.release()

    def _state_on(self, entry: "Entry", tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        device = torch.device("cpu") if entry.device == "cpu" else torch.device("cuda", entry.device_index(tensors))
        if self._state is None:
            self._device = device
            self._state = self._template.fresh(device)
        elif device != self._device:
            raise SessionError(f"this session's state is on {self._device} and this call's inputs are on {device}; "
                               f"move the inputs to {self._device}, or open a session there (pkg.session(device="
                               f"'{device}'))")
        return self._state

    def reset(self) -> None:
        """Back to the pack's initial state (also after a failed call)."""
        with self._busy:
            if self._state is not None:
                self._state = self._template.fresh(self._device)
                self._generation += 1
            self._failed = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of the state: buffer name -> tensor (on the session's device)."""
        with self._busy:
            state = self._state if self._state is not None else self._template.fresh(torch.device("cpu"))
            return {name: t.clone() for name, t in state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a state saved with ``state_dict()`` (of this pack): every buffer, same dtype and shape."""
        records = {r.name: r for r in self._template.records}
        if not isinstance(state, dict) or set(state) != set(records):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise SessionError(f"a state must hold exactly the pack's state buffers {sorted(records)}; got {got}")
        for name, t in state.items():
            r = records[name]
            if not isinstance(t, torch.Tensor) or t.dtype != DTYPE_BY_NAME[r.dtype] or tuple(t.shape) != r.shape:
                got = f"{t.dtype}{list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise SessionError(f"state buffer {name!r} must be {r.dtype}{list(r.shape)}, got {got}")
        with self._busy:
            device = self._device or next(iter(state.values())).device
            new = self._template.fresh(device)
            for name, t in state.items():
                new[name].copy_(t)
            self._state, self._device = new, device
            self._generation += 1
            self._failed = None

    def fork(self) -> "Session":
        """A new session whose state is a copy of this one's (e.g. to continue one prompt several ways)."""
        other = Session(self._source, self._device)
        if self._state is not None:
            other.load_state_dict(self.state_dict())
        return other

    def __repr__(self) -> str:
        where = self._device or "no device yet"
        return f"<aotpack.Session of {self._source.path!r}: {self._template.describe()} on {where}>"
