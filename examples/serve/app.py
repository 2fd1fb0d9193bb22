"""One pack behind HTTP: a FastAPI app, served by uvicorn on one machine or by Ray Serve (``ray_app.py``).

    python examples/serve/app.py model.pack --host 127.0.0.1 --port 8000

GET  /health   -> 200 {"status": "ok", "pack": ..., "entries": N, "inputs": [{"path", "name", ...}, ...],
                        "stateful": false, "replica": ...}
POST /predict  <- {"args": [...], "kwargs": {...}, "dtype": "float32" | {"input name": "int64", ...}}
               -> 200 {"outputs": ...}  (the model's output structure; tuples become JSON lists)

A pack of several methods (``encode`` and ``decode``, ``prefill`` and ``decode``) is called by method name:

POST /predict/METHOD  <- the body of /predict; -> 200 {"outputs": ...}  (/predict is the method forward)

A pack with state (an LLM's KV cache) is called in sessions, one per conversation, each with its own state
(one state for all the methods of a pack of several):

POST   /sessions               -> 201 {"session": ID}
POST   /sessions/ID/predict    <- the body of /predict; -> 200 {"outputs": ...}
POST   /sessions/ID/predict/METHOD  <- the same, for a method of the pack
POST   /sessions/ID/reset      -> 200 (back to the pack's initial state)
DELETE /sessions/ID            -> 200

A request the pack's guards refuse, or a malformed one, is answered 4xx with {"error": "..."} (for a guard,
the GuardError's own message); no client mistake reaches the native code or gives a 500. ``build_app`` is
the one place an app is made from a loaded package: this file's command line, ``create_app`` (for
``uvicorn --factory``) and the Ray Serve replicas of ``ray_app.py`` all go through it. See README.md next to
this file.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import signal
import socket
import sys
import traceback
from http import HTTPStatus
from typing import Any, Callable, Mapping

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

import aotpack
from aotpack_runtime.format import DTYPES
from jsonio import BadRequest, InputConverter, parse_json, to_json
from session_store import (DEFAULT_IDLE_TIMEOUT_S, DEFAULT_MAX_SESSIONS, SessionBusy, SessionNotFound, SessionStore,
                           StoreFull, new_holder_id, shown)

DEFAULT_MAX_BODY_MB = 16.0
DEFAULT_MAX_BODY_BYTES = int(DEFAULT_MAX_BODY_MB * 2**20)
ROUTES = "GET /health or POST /predict"
SESSION_ROUTES = ("GET /health, POST /sessions, POST /sessions/{id}/predict, POST /sessions/{id}/reset or "
                  "DELETE /sessions/{id}")
# The header that carries a session's id on Ray Serve: its proxy hands the value to the deployment's request
# router, which sends the request to the replica holding the session.
ROUTING_HEADER = "serve_multiplexed_model_id"
REPLICA_HEADER = "x-aotpack-replica"


class ConfigError(aotpack.AotpackError):
    """A serving option is missing or malformed."""


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """What a server needs to load its pack: the file, its pinned sha256, how many calls may run the model
    at once, and the largest request body it reads."""

    pack: str
    sha256: str | None = None
    num_models: int = 1
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    public_key: str | None = None
    signature: str | None = None
    max_sessions: int = DEFAULT_MAX_SESSIONS
    session_idle_s: float = DEFAULT_IDLE_TIMEOUT_S

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "ServeOptions":
        """From ``AOTPACK_SERVE_PACK`` (required), ``AOTPACK_SERVE_SHA256``, ``AOTPACK_SERVE_NUM_MODELS``,
        ``AOTPACK_SERVE_MAX_BODY_MB``, ``AOTPACK_SERVE_PUBLIC_KEY``, ``AOTPACK_SERVE_SIGNATURE``,
        ``AOTPACK_SERVE_MAX_SESSIONS`` and ``AOTPACK_SERVE_SESSION_IDLE_S``."""
        pack = env.get("AOTPACK_SERVE_PACK")
        if not pack:
            raise ConfigError("AOTPACK_SERVE_PACK is not set; set it to the .pack file to serve")
        return cls(pack=pack, sha256=env.get("AOTPACK_SERVE_SHA256") or None,
                   num_models=_number(env, "AOTPACK_SERVE_NUM_MODELS", int, 1),
                   max_body_bytes=int(_number(env, "AOTPACK_SERVE_MAX_BODY_MB", float, DEFAULT_MAX_BODY_MB) * 2**20),
                   public_key=env.get("AOTPACK_SERVE_PUBLIC_KEY") or None,
                   signature=env.get("AOTPACK_SERVE_SIGNATURE") or None,
                   max_sessions=_number(env, "AOTPACK_SERVE_MAX_SESSIONS", int, DEFAULT_MAX_SESSIONS),
                   session_idle_s=_number(env, "AOTPACK_SERVE_SESSION_IDLE_S", float, DEFAULT_IDLE_TIMEOUT_S))

    def app_options(self) -> dict:
        """The keyword arguments of :func:`build_app` that these options set."""
        return {"max_body_bytes": self.max_body_bytes, "max_sessions": self.max_sessions,
                "session_idle_s": self.session_idle_s}

    def load(self) -> aotpack.Package:
        """The pack, loaded (``ArchiveError`` if it is not the pinned file, not signed by ``public_key``, or
        this host cannot run it)."""
        return aotpack.load(self.pack, expected_sha256=self.sha256, num_models=self.num_models,
                            public_key=self.public_key, signature=self.signature)


def _number(env: Mapping[str, str], name: str, kind: type, default: float) -> Any:
    text = env.get(name)
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError(f"{name} is {text!r}, not {'an integer' if kind is int else 'a number'}") from None
    if value <= 0:
        raise ConfigError(f"{name} is {text!r}; it must be above 0")
    return value


def json_response(status: int, payload: dict, headers: Mapping[str, str] | None = None) -> Response:
    # Python's json writes NaN and Infinity, which a model's outputs may hold; JSONResponse refuses them.
    return Response(json.dumps(payload), status_code=status, media_type="application/json", headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to be above ``limit`` bytes (from its
    Content-Length before reading, or while reading a chunked body)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise BadRequest(f"the request body is {int(length)} bytes, above this server's limit of {limit}; send "
                         "a smaller request or raise the limit (--max-body-mb)", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"the request body is over {limit} bytes, above this server's limit of {limit}; "
                             "send a smaller request or raise the limit (--max-body-mb)",
                             HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        chunks.append(chunk)
    return b"".join(chunks)


FOREIGN_HERE = ("the server was restarted since, or it runs several worker processes (sessions live in the process "
                "that opened them: serve a stateful pack with one worker, or on Ray Serve)")
FOREIGN_ON_RAY = "that replica was stopped or restarted (a scale-down, a failure or a redeploy)"


class _ReplicaHeader:
    """ASGI middleware: every answer names the replica (on one machine: the server process) that gave it, in
    the ``X-Aotpack-Replica`` header."""

    def __init__(self, app: Any, replica: str):
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_named(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []), self.header])
            await send(message)

        await self.app(scope, receive, send_named)


async def _expire_idle(store: SessionStore) -> None:
    """Close idle sessions as they pass the timeout, so that their memory is freed without waiting for a
    request (a request for one is refused on time regardless: the store checks on every lookup)."""
    period = min(store.idle_timeout_s / 2, 30.0)
    while True:
        await asyncio.sleep(period)
        store.expire()


def state_bytes(pkg: aotpack.Package) -> int:
    """The most memory one session's state takes (it grows as its cache is written)."""
    return sum(math.prod(r.shape) * DTYPES[r.dtype] for r in pkg.manifest.state)


def build_app(pkg: aotpack.Package, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              max_sessions: int = DEFAULT_MAX_SESSIONS, session_idle_s: float = DEFAULT_IDLE_TIMEOUT_S,
              replica: str | None = None) -> FastAPI:
    """A FastAPI app that serves ``pkg``: ``GET /health`` and ``POST /predict``; for a pack with state,
    sessions instead of ``/predict``: ``POST /sessions``, ``POST /sessions/{id}/predict``,
    ``POST /sessions/{id}/reset`` and ``DELETE /sessions/{id}``.

    The model runs in the server's thread pool, so several requests run at once, up to the ``num_models``
    the package was loaded with (the rest wait for a free copy of the model's state).

    Sessions live in this process: at most ``max_sessions`` open (opening one more closes the least recently
    used one that is not running a call), each closed after ``session_idle_s`` seconds without a request.
    ``replica`` is the Ray Serve replica's id when the app runs in one (``ray_app.py``): session ids then name
    it, and every request of a session must carry the session's id in the ``serve_multiplexed_model_id``
    header, by which Ray Serve routes it to this replica.
    """
    methods = list(pkg.methods)
    several = len(methods) > 1 or methods != ["forward"]
    converters = {name: InputConverter(pkg, name if several else None) for name in methods}
    on_ray = replica is not None
    holder = replica if on_ray else new_holder_id()
    store = None
    if pkg.stateful:
        store = SessionStore(pkg.session, holder=holder, max_sessions=max_sessions, idle_timeout_s=session_idle_s,
                             holder_kind="replica" if on_ray else "server process",
                             foreign_hint=FOREIGN_ON_RAY if on_ray else FOREIGN_HERE)
    routes = SESSION_ROUTES if pkg.stateful else ROUTES
    if several:
        routes += (f" (a method: POST {'/sessions/{id}' if pkg.stateful else ''}/predict/{{method}}, for "
                   f"{', '.join(methods)})")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        sweeper = asyncio.create_task(_expire_idle(store)) if store is not None else None
        try:
            yield
        finally:
            if sweeper is not None:
                sweeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sweeper

    app = FastAPI(title=f"aotpack {os.path.basename(pkg.path)}", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.pkg = pkg
    app.add_middleware(_ReplicaHeader, replica=holder)

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest) -> Response:
        return json_response(exc.status, {"error": str(exc)})

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        path = request.url.path
        if exc.status_code == HTTPStatus.NOT_FOUND and store is None and (path == "/sessions" or
                                                                          path.startswith("/sessions/")):
            message = (f"no such path {path!r}: this pack keeps no state between calls, so this server has no "
                       "sessions; send each call to POST /predict")
        elif exc.status_code == HTTPStatus.NOT_FOUND:
            message = f"no such path {path!r}; use {routes}"
        elif exc.status_code == HTTPStatus.METHOD_NOT_ALLOWED:
            message = f"{request.method} is not allowed on {path}; use {routes}"
        else:
            message = str(exc.detail)
        return json_response(exc.status_code, {"error": message}, headers=exc.headers)

    @app.get("/health")
    def health() -> Response:
        body = {"status": "ok", "pack": pkg.path, "entries": len(pkg.entries),
                "inputs": converters[methods[0] if "forward" not in converters else "forward"].describe(),
                "stateful": pkg.stateful, "replica": holder}
        if several:
            body["methods"] = {name: c.describe() for name, c in converters.items()}
        if store is not None:
            store.expire()
            body["sessions"] = dict(store.stats(), state_bytes=state_bytes(pkg),
                                    cache_positions=min((r.limit for m in pkg.manifest.method_table()
                                                         for r in m.positions), default=None))
        return json_response(HTTPStatus.OK, body)

    def method_of(name: str) -> str:
        """The method a path names; a 404 naming those the pack has, for one it does not have."""
        if name not in converters:
            raise BadRequest(f"this pack has no method {name!r}; its methods: {', '.join(methods)} (POST /predict/"
                             f"{methods[0]})", status=HTTPStatus.NOT_FOUND)
        return name

    def answer(call: Any, raw: bytes, session_id: str | None = None, method: str = "forward") -> tuple[int, dict]:
        """Run ``method`` of ``call`` (the package, or a session of it) on the request body ``raw``: (status,
        answer)."""
        args, kwargs = converters[method_of(method)].convert(parse_json(raw))
        try:
            with torch.inference_mode():
                out = getattr(call, method)(*args, **kwargs)
        except aotpack.GuardError as e:
            return HTTPStatus.BAD_REQUEST, {"error": str(e)}
        except aotpack.SessionError as e:  # an earlier call failed: the state is undefined until a reset
            return HTTPStatus.CONFLICT, {"error": f"session {shown(session_id)}: {e} (POST /sessions/{session_id}/"
                                                  "reset)"}
        except Exception:  # a server fault, not the client's: log it, say little
            traceback.print_exc(file=sys.stderr)
            message = "internal error while running the model"
            if session_id is not None:
                message += (f"; the state of session {shown(session_id)} is now undefined: reset it (POST /sessions/"
                            f"{session_id}/reset) or open a new one")
            return HTTPStatus.INTERNAL_SERVER_ERROR, {"error": message}
        return HTTPStatus.OK, {"outputs": to_json(out)}

    async def predict_method(request: Request, method: str) -> Response:
        method_of(method)
        if store is not None:
            return json_response(HTTPStatus.CONFLICT, {"error": (
                f"this pack keeps state between calls ({len(pkg.manifest.state)} state buffers, such as an LLM's KV "
                "cache), so its calls run in a session, which holds its own copy of it: open one with POST "
                "/sessions, then send each call to POST /sessions/{id}/predict"
                + ("" if method == "forward" else f"/{method}") + " (the same body as /predict)")})
        raw = await read_body(request, max_body_bytes)
        status, payload = await run_in_threadpool(answer, pkg, raw, None, method)
        return json_response(status, payload)

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        return await predict_method(request, "forward")

    if several:
        @app.post("/predict/{method}")
        async def predict_named(method: str, request: Request) -> Response:
            return await predict_method(request, method)

    if store is not None:
        _add_session_routes(app, store, answer, max_body_bytes, on_ray, several)
    return app


def _add_session_routes(app: FastAPI, store: SessionStore, answer: Callable[..., tuple[int, dict]],
                        max_body_bytes: int, on_ray: bool, several: bool = False) -> None:
    """The routes of a stateful pack's sessions, and the answers to what can go wrong with one."""

    @app.exception_handler(SessionNotFound)
    async def not_found(request: Request, exc: SessionNotFound) -> Response:
        return json_response(HTTPStatus.NOT_FOUND, {"error": str(exc)})

    @app.exception_handler(SessionBusy)
    async def busy(request: Request, exc: SessionBusy) -> Response:
        return json_response(HTTPStatus.CONFLICT, {"error": str(exc)})

    @app.exception_handler(StoreFull)
    async def full(request: Request, exc: StoreFull) -> Response:
        return json_response(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)}, headers={"Retry-After": "1"})

    def check_routing(request: Request, session_id: str) -> None:
        """The routing header, where sent, must name the session of the path; on Ray Serve it must be sent."""
        sent = request.headers.get(ROUTING_HEADER, request.headers.get(ROUTING_HEADER.replace("_", "-")))
        if sent is None and on_ray:
            raise BadRequest(f"this request names session {shown(session_id)} in its path but not in the header "
                             f"{ROUTING_HEADER}: on Ray Serve, send that header with the session's id with every "
                             f"request of a session (-H '{ROUTING_HEADER}: {session_id}'), so that it reaches the "
                             "replica that holds the session")
        if sent is not None and sent != session_id:
            raise BadRequest(f"the header {ROUTING_HEADER} names session {shown(sent)} but the path names "
                             f"{shown(session_id)}; send the session's id in both")

    @app.post("/sessions")
    async def open_session() -> Response:
        held = store.open()
        return json_response(HTTPStatus.CREATED, {"session": held.id}, headers={"Location": f"/sessions/{held.id}"})

    async def session_call(session_id: str, request: Request, method: str) -> Response:
        check_routing(request, session_id)
        raw = await read_body(request, max_body_bytes)
        held = store.acquire(session_id)
        try:
            status, payload = await run_in_threadpool(answer, held.session, raw, session_id, method)
        finally:
            store.release(held)
        return json_response(status, payload)

    @app.post("/sessions/{session_id}/predict")
    async def session_predict(session_id: str, request: Request) -> Response:
        return await session_call(session_id, request, "forward")

    if several:
        @app.post("/sessions/{session_id}/predict/{method}")
        async def session_predict_named(session_id: str, method: str, request: Request) -> Response:
            return await session_call(session_id, request, method)

    @app.post("/sessions/{session_id}/reset")
    async def reset_session(session_id: str, request: Request) -> Response:
        check_routing(request, session_id)
        held = store.acquire(session_id)
        try:
            held.session.reset()
        finally:
            store.release(held)
        return json_response(HTTPStatus.OK, {"session": session_id, "reset": True})

    @app.delete("/sessions/{session_id}")
    async def close_session(session_id: str, request: Request) -> Response:
        check_routing(request, session_id)
        store.close(session_id)
        return json_response(HTTPStatus.OK, {"session": session_id, "closed": True})


def create_app() -> FastAPI:
    """The app for ``uvicorn --factory app:create_app``, its options from the environment (see
    :meth:`ServeOptions.from_env`)."""
    opts = ServeOptions.from_env(os.environ)
    return build_app(opts.load(), **opts.app_options())


def add_pack_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options that make a :class:`ServeOptions` (this file's and ``ray_app.py``'s)."""
    parser.add_argument("pack", help="the .pack file to serve")
    parser.add_argument("--num-models", type=int, default=1,
                        help="how many calls may run the model at the same time (default 1)")
    parser.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB,
                        help=f"largest request body in MiB (default {DEFAULT_MAX_BODY_MB:g})")
    parser.add_argument("--sha256", default=None, help="refuse any pack file but the one with this sha256")
    parser.add_argument("--public-key", default=None,
                        help="refuse the pack unless it is signed by this key (PEM; the signature is PACK.sig or "
                             "--signature)")
    parser.add_argument("--signature", default=None, help="the pack's detached signature (default PACK.sig)")
    parser.add_argument("--max-sessions", type=int, default=DEFAULT_MAX_SESSIONS,
                        help="for a pack with state: most sessions open at once (per replica); opening one more "
                             f"closes the least recently used idle one (default {DEFAULT_MAX_SESSIONS})")
    parser.add_argument("--session-idle-s", type=float, default=DEFAULT_IDLE_TIMEOUT_S,
                        help="for a pack with state: close a session after this many seconds without a request "
                             f"(default {DEFAULT_IDLE_TIMEOUT_S:g})")


def options_from_args(parser: argparse.ArgumentParser, opts: argparse.Namespace) -> ServeOptions:
    if opts.signature is not None and opts.public_key is None:
        parser.error("--signature needs --public-key to check it with")
    if opts.max_sessions < 1 or not opts.session_idle_s > 0:
        parser.error("--max-sessions must be at least 1 and --session-idle-s above 0")
    return ServeOptions(pack=opts.pack, sha256=opts.sha256, num_models=opts.num_models,
                        max_body_bytes=int(opts.max_body_mb * 2**20), public_key=opts.public_key,
                        signature=opts.signature, max_sessions=opts.max_sessions,
                        session_idle_s=opts.session_idle_s)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    return sock


def url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Serve one aotpack pack over HTTP with uvicorn "
                                            "(GET /health, POST /predict or, for a pack with state, /sessions).")
    add_pack_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one (default 8000)")
    p.add_argument("--quiet", action="store_true", help="no access log")
    args = p.parse_args(argv)
    opts = options_from_args(p, args)
    try:
        pkg = opts.load()
    except aotpack.AotpackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        sock = listen(args.host, args.port)
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e.strerror or e}; pick another --port "
              "(0 picks a free one)", file=sys.stderr)
        return 1
    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(uvicorn.Config(build_app(pkg, **opts.app_options()), access_log=not args.quiet,
                                           log_level="info"))
    # uvicorn stops on SIGINT/SIGTERM, then sends the signal again to the handler it found: this one, so the
    # process ends normally (exit 0) instead of by the signal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: None)
    sessions = (f"; sessions: at most {opts.max_sessions} open, each closed after {opts.session_idle_s:g} s idle"
                if pkg.stateful else "")
    print(f"serving {args.pack} on {url(host, port)} (loaded in {pkg.load_seconds * 1000:.0f} ms{sessions})",
          flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
