"""One pack behind HTTP: a FastAPI app, served by uvicorn on one machine or by Ray Serve (``ray_app.py``).

    python examples/serve/app.py model.pack --host 127.0.0.1 --port 8000

GET  /health   -> 200 {"status": "ok", "pack": ..., "entries": N, "inputs": [{"path", "name", ...}, ...]}
POST /predict  <- {"args": [...], "kwargs": {...}, "dtype": "float32" | {"input name": "int64", ...}}
               -> 200 {"outputs": ...}  (the model's output structure; tuples become JSON lists)

A request the pack's guards refuse, or a malformed one, is answered 4xx with {"error": "..."} (for a guard,
the GuardError's own message); no client mistake reaches the native code or gives a 500. ``build_app`` is
the one place an app is made from a loaded package: this file's command line, ``create_app`` (for
``uvicorn --factory``) and the Ray Serve replicas of ``ray_app.py`` all go through it. See README.md next to
this file.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import socket
import sys
import traceback
from http import HTTPStatus
from typing import Any, Mapping

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

import aotpack
from jsonio import BadRequest, InputConverter, parse_json, to_json

DEFAULT_MAX_BODY_MB = 16.0
DEFAULT_MAX_BODY_BYTES = int(DEFAULT_MAX_BODY_MB * 2**20)
ROUTES = "GET /health or POST /predict"


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

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "ServeOptions":
        """From ``AOTPACK_SERVE_PACK`` (required), ``AOTPACK_SERVE_SHA256``, ``AOTPACK_SERVE_NUM_MODELS``,
        ``AOTPACK_SERVE_MAX_BODY_MB``, ``AOTPACK_SERVE_PUBLIC_KEY`` and ``AOTPACK_SERVE_SIGNATURE``."""
        pack = env.get("AOTPACK_SERVE_PACK")
        if not pack:
            raise ConfigError("AOTPACK_SERVE_PACK is not set; set it to the .pack file to serve")
        return cls(pack=pack, sha256=env.get("AOTPACK_SERVE_SHA256") or None,
                   num_models=_number(env, "AOTPACK_SERVE_NUM_MODELS", int, 1),
                   max_body_bytes=int(_number(env, "AOTPACK_SERVE_MAX_BODY_MB", float, DEFAULT_MAX_BODY_MB) * 2**20),
                   public_key=env.get("AOTPACK_SERVE_PUBLIC_KEY") or None,
                   signature=env.get("AOTPACK_SERVE_SIGNATURE") or None)

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


def build_app(pkg: aotpack.Package, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """A FastAPI app that serves ``pkg``: ``GET /health`` and ``POST /predict``.

    The model runs in the server's thread pool, so several requests run at once, up to the ``num_models``
    the package was loaded with (the rest wait for a free copy of the model's state).
    """
    converter = InputConverter(pkg)
    app = FastAPI(title=f"aotpack {os.path.basename(pkg.path)}", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pkg = pkg

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest) -> Response:
        return json_response(exc.status, {"error": str(exc)})

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == HTTPStatus.NOT_FOUND:
            message = f"no such path {request.url.path!r}; use {ROUTES}"
        elif exc.status_code == HTTPStatus.METHOD_NOT_ALLOWED:
            message = f"{request.method} is not allowed on {request.url.path}; use {ROUTES}"
        else:
            message = str(exc.detail)
        return json_response(exc.status_code, {"error": message}, headers=exc.headers)

    @app.get("/health")
    def health() -> Response:
        return json_response(HTTPStatus.OK, {"status": "ok", "pack": pkg.path, "entries": len(pkg.entries),
                                             "inputs": converter.describe()})

    def answer(raw: bytes) -> tuple[int, dict]:
        args, kwargs = converter.convert(parse_json(raw))
        try:
            with torch.inference_mode():
                out = pkg(*args, **kwargs)
        except aotpack.GuardError as e:
            return HTTPStatus.BAD_REQUEST, {"error": str(e)}
        except Exception:  # a server fault, not the client's: log it, say little
            traceback.print_exc(file=sys.stderr)
            return HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error while running the model"}
        return HTTPStatus.OK, {"outputs": to_json(out)}

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        raw = await read_body(request, max_body_bytes)
        status, payload = await run_in_threadpool(answer, raw)
        return json_response(status, payload)

    return app


def create_app() -> FastAPI:
    """The app for ``uvicorn --factory app:create_app``, its options from the environment (see
    :meth:`ServeOptions.from_env`)."""
    opts = ServeOptions.from_env(os.environ)
    return build_app(opts.load(), max_body_bytes=opts.max_body_bytes)


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


def options_from_args(parser: argparse.ArgumentParser, opts: argparse.Namespace) -> ServeOptions:
    if opts.signature is not None and opts.public_key is None:
        parser.error("--signature needs --public-key to check it with")
    return ServeOptions(pack=opts.pack, sha256=opts.sha256, num_models=opts.num_models,
                        max_body_bytes=int(opts.max_body_mb * 2**20), public_key=opts.public_key,
                        signature=opts.signature)


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
                                            "(POST /predict, GET /health).")
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
    server = uvicorn.Server(uvicorn.Config(build_app(pkg, max_body_bytes=opts.max_body_bytes),
                                           access_log=not args.quiet, log_level="info"))
    # uvicorn stops on SIGINT/SIGTERM, then sends the signal again to the handler it found: this one, so the
    # process ends normally (exit 0) instead of by the signal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: None)
    print(f"serving {args.pack} on {url(host, port)} (loaded in {pkg.load_seconds * 1000:.0f} ms)", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
