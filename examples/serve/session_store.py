"""The open sessions (conversations) of a stateful pack in one server process: ids, limits, idle expiry.

A session id is ``HOLDER.TOKEN``. ``HOLDER`` names the process that holds the session's state: on Ray Serve
the replica's id, which ``session_router.py`` reads to send every request of a session to that replica; under
uvicorn a random id drawn when the app is made. ``TOKEN`` is ``secrets.token_urlsafe(16)`` (128 random bits),
so an id cannot be guessed.

The store bounds memory: at most ``max_sessions`` open; opening one more closes the least recently used
session that is not running a call (if every one is running a call, :class:`StoreFull`). A session without a
request for ``idle_timeout_s`` is closed. A closed session's id is never reused and never answered from a
fresh state: a request for it is :class:`SessionNotFound`, whose message says why (closed, expired,
evicted, held elsewhere) as long as the store remembers the id, and what to do.

This module imports only the standard library, so that Ray Serve's proxy can import the id format cheaply.
"""
from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

DEFAULT_MAX_SESSIONS = 64
DEFAULT_IDLE_TIMEOUT_S = 600.0
OPEN_HINT = "open a new one (POST /sessions) and send the conversation so far"


def holder_of(session_id: str) -> str | None:
    """The holder part of a session id (``HOLDER.TOKEN``), or None if it has none."""
    holder, dot, token = session_id.partition(".")
    return holder if dot and holder and token else None


def new_holder_id() -> str:
    """A random holder id for a server process that has no other name (not on Ray Serve)."""
    return secrets.token_hex(4)


def shown(session_id: str) -> str:
    """The id as error messages quote it (a client may send anything as an id)."""
    return repr(session_id if len(session_id) <= 80 else session_id[:80] + "...")


class SessionNotFound(Exception):
    """No open session has this id here (answered 404)."""


class SessionBusy(Exception):
    """The session is running another request (answered 409)."""


class StoreFull(Exception):
    """Every open session is running a call, so none can be closed to make room (answered 503)."""


@dataclass
class Held:
    """One open session: the runtime's ``Session`` and its bookkeeping."""

    id: str
    session: Any
    opened: float
    last_used: float
    busy: bool = False
    calls: int = 0


class SessionStore:
    """The open sessions of one server process. Thread-safe: the app's handlers run on its event loop and
    the model's calls in its thread pool.

    ``open_session`` makes a new runtime session (``pkg.session``). ``holder`` is this process's holder id,
    ``holder_kind`` what it is in messages ("replica", "server process"), and ``foreign_hint`` the sentence
    that says why a session held elsewhere cannot be reached from here.
    """

    def __init__(self, open_session: Callable[[], Any], *, holder: str, max_sessions: int = DEFAULT_MAX_SESSIONS,
                 idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S, holder_kind: str = "server process",
                 foreign_hint: str = "", clock: Callable[[], float] = time.monotonic):
        if max_sessions < 1 or idle_timeout_s <= 0:
            raise ValueError(f"max_sessions must be at least 1 and idle_timeout_s above 0, got {max_sessions} and "
                             f"{idle_timeout_s}")
        self._open_session = open_session
        self.holder = holder
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self._holder_kind = holder_kind
        self._foreign_hint = foreign_hint
        self._clock = clock
        self._lock = threading.Lock()
        self._open: OrderedDict[str, Held] = OrderedDict()  # least recently used first
        # Why recently ended sessions ended, so that a late request hears it (bounded: oldest forgotten).
        self._ended: OrderedDict[str, str] = OrderedDict()
        self._ended_cap = max(1024, 4 * max_sessions)
        self.evicted = 0
        self.expired = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)

    def open(self) -> Held:
        """A new session, with fresh state. At the limit, the least recently used idle session is closed to
        make room; if every session is running a call, :class:`StoreFull`."""
        session = self._open_session()
        now = self._clock()
        with self._lock:
            self._expire(now)
            if len(self._open) >= self.max_sessions:
                victim = next((h for h in self._open.values() if not h.busy), None)
                if victim is None:
                    raise StoreFull(f"all {len(self._open)} open sessions are running a call, so none can be closed "
                                    f"to make room (at most {self.max_sessions} open, --max-sessions); retry in a "
                                    "moment")
                self._end(victim.id, f"was closed to make room for a new one: this {self._holder_kind} keeps at most "
                                     f"{self.max_sessions} sessions open (--max-sessions), and it was the least "
                                     "recently used")
                self.evicted += 1
            sid = f"{self.holder}.{secrets.token_urlsafe(16)}"
            held = Held(sid, session, opened=now, last_used=now)
            self._open[sid] = held
            return held

    def acquire(self, session_id: str) -> Held:
        """The open session ``session_id``, marked busy until :meth:`release`: :class:`SessionNotFound` if it
        is not open here, :class:`SessionBusy` if another request is running in it."""
        with self._lock:
            self._expire(self._clock())
            held = self._find(session_id)
            if held.busy:
                raise SessionBusy(f"session {shown(session_id)} is running another request; a session runs one call "
                                  "at a time: wait for that answer before sending the next call, or open another "
                                  "session (POST /sessions)")
            held.busy = True
            self._open.move_to_end(session_id)
            return held

    def release(self, held: Held) -> None:
        """End a request in ``held`` (from :meth:`acquire`); its idle time starts now."""
        with self._lock:
            held.busy = False
            held.last_used = self._clock()

    def close(self, session_id: str) -> None:
        """Close an open session: :class:`SessionNotFound` or :class:`SessionBusy` as for :meth:`acquire`."""
        with self._lock:
            self._expire(self._clock())
            held = self._find(session_id)
            if held.busy:
                raise SessionBusy(f"session {shown(session_id)} is running a request; close it once that request "
                                  "has its answer")
            self._end(session_id, "was closed (DELETE /sessions/{id})")

    def expire(self) -> int:
        """Close every session idle for longer than the timeout; how many were closed."""
        with self._lock:
            return self._expire(self._clock())

    def stats(self) -> dict:
        """What ``/health`` says about sessions."""
        with self._lock:
            return {"open": len(self._open), "busy": sum(h.busy for h in self._open.values()),
                    "max": self.max_sessions, "idle_timeout_s": self.idle_timeout_s, "evicted": self.evicted,
                    "expired": self.expired}

    def _find(self, session_id: str) -> Held:
        held = self._open.get(session_id)
        if held is not None:
            return held
        why = self._ended.get(session_id)
        if why is not None:
            raise SessionNotFound(f"session {shown(session_id)} {why}; its state is gone: {OPEN_HINT}")
        holder = holder_of(session_id)
        if holder is not None and holder != self.holder:
            raise SessionNotFound(f"session {shown(session_id)} is not held by this {self._holder_kind} "
                                  f"({self.holder}) but by {holder!r}, which does not serve here: "
                                  f"{self._foreign_hint}; its state is not reachable from here: {OPEN_HINT}")
        raise SessionNotFound(f"no open session {shown(session_id)} on this {self._holder_kind}: it ended (closed, "
                              f"idle for over {self.idle_timeout_s:g} s, or closed to make room) or was never "
                              f"opened; {OPEN_HINT}")

    def _expire(self, now: float) -> int:
        stale = [h.id for h in self._open.values()
                 if not h.busy and now - h.last_used > self.idle_timeout_s]
        for sid in stale:
            self._end(sid, f"expired: it had no request for over {self.idle_timeout_s:g} s (--session-idle-s)")
        self.expired += len(stale)
        return len(stale)

    def _end(self, session_id: str, why: str) -> None:
        del self._open[session_id]
        self._ended[session_id] = why
        while len(self._ended) > self._ended_cap:
            self._ended.popitem(last=False)
