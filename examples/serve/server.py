"""A small HTTP prediction service for one pack, on the Python standard library only.

    python examples/serve/server.py model.pack --host 127.0.0.1 --port 8000

GET  /health   -> 200 {"status": "ok", "pack": ..., "inputs": [{"path", "name", "dtype", "sizes"}, ...]}
POST /predict  <- {"args": [...], "kwargs": {...}, "dtype": "float32" | {"input name": "int64", ...}}
               -> 200 {"outputs": ...}  (the model's output structure; tuples become JSON lists)

Nested JSON lists become tensors (float32 unless "dtype" says otherwise); numbers, strings, booleans and
null where the pack expects a Python value stay Python values. A request the pack's guards refuse, or a
malformed one, is answered 4xx with {"error": "..."} (for a guard, the GuardError's own message); no
client mistake reaches the native code or gives a 500. See README.md next to this file.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

import aotpack
from jsonio import BadRequest, InputConverter, parse_json, to_json

# --- HTTP ------------------------------------------------------------------------------------------

class PredictionServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, pkg: aotpack.Package, *, max_body: int, quiet: bool):
        self.pkg = pkg
        self.converter = InputConverter(pkg)
        self.max_body = max_body
        self.quiet = quiet
        super().__init__(address, Handler)


class Handler(BaseHTTPRequestHandler):
    server: PredictionServer
    protocol_version = "HTTP/1.1"
    server_version = "aotpack-serve/0.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        if not self.server.quiet:
            super().log_message(format, *args)

    def _send(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, *, close: bool = False) -> None:
        if close:  # the request body was not read: the connection cannot carry another request
            self.close_connection = True
        self._send(status, {"error": message})

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/health":
            pkg = self.server.pkg
            self._send(HTTPStatus.OK, {"status": "ok", "pack": pkg.path, "entries": len(pkg.entries),
                                       "inputs": self.server.converter.describe()})
        elif self.path == "/predict":
            self._error(HTTPStatus.METHOD_NOT_ALLOWED, "use POST /predict with a JSON body")
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such path {self.path!r}; use GET /health or POST /predict")

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/predict":
            self._error(HTTPStatus.NOT_FOUND, f"no such path {self.path!r}; use POST /predict", close=True)
            return
        try:
            body = self._read_json()
        except BadRequest as e:  # the body was not (fully) read
            self._error(e.status, str(e), close=True)
            return
        try:
            args, kwargs = self.server.converter.convert(body)
        except BadRequest as e:
            self._error(e.status, str(e))
            return
        try:
            with torch.inference_mode():
                out = self.server.pkg(*args, **kwargs)
        except aotpack.GuardError as e:
            self._error(HTTPStatus.BAD_REQUEST, str(e))
            return
        except Exception:  # a server fault, not the client's: log it, say little
            traceback.print_exc(file=sys.stderr)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error while running the model")
            return
        self._send(HTTPStatus.OK, {"outputs": to_json(out)})

    def _read_json(self) -> Any:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise BadRequest("chunked request bodies are not supported; send Content-Length",
                             HTTPStatus.LENGTH_REQUIRED)
        length = self.headers.get("Content-Length")
        if length is None:
            raise BadRequest("a request body with Content-Length is required", HTTPStatus.LENGTH_REQUIRED)
        try:
            n = int(length)
        except ValueError:
            raise BadRequest(f"Content-Length {length!r} is not a number", HTTPStatus.LENGTH_REQUIRED) from None
        if n < 0:
            raise BadRequest(f"Content-Length {n} is negative", HTTPStatus.LENGTH_REQUIRED)
        if n > self.server.max_body:
            raise BadRequest(f"the request body is {n} bytes, above this server's limit of "
                             f"{self.server.max_body}", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        raw = self.rfile.read(n)
        if len(raw) != n:
            raise BadRequest(f"the request body ended after {len(raw)} of {n} bytes",
                             HTTPStatus.BAD_REQUEST)
        return parse_json(raw)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Serve one aotpack pack over HTTP (POST /predict, GET /health).")
    p.add_argument("pack", help="the .pack file to serve")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one (default 8000)")
    p.add_argument("--num-models", type=int, default=1,
                   help="how many calls may run the model at the same time (default 1)")
    p.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body (default 16 MiB)")
    p.add_argument("--sha256", default=None, help="refuse any pack file but the one with this sha256")
    p.add_argument("--public-key", default=None,
                   help="refuse the pack unless it is signed by this key (PEM; the signature is PACK.sig or --signature)")
    p.add_argument("--signature", default=None, help="the pack's detached signature (default PACK.sig)")
    p.add_argument("--quiet", action="store_true", help="no access log")
    opts = p.parse_args(argv)

    if opts.signature is not None and opts.public_key is None:
        p.error("--signature needs --public-key to check it with")
    try:
        pkg = aotpack.load(opts.pack, expected_sha256=opts.sha256, num_models=opts.num_models,
                           signature=opts.signature, public_key=opts.public_key)
    except aotpack.AotpackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    server = PredictionServer((opts.host, opts.port), pkg, max_body=int(opts.max_body_mb * 2**20),
                              quiet=opts.quiet)

    def stop(signum, frame):  # shutdown() waits for serve_forever, which runs in this thread
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = server.server_address[:2]
    print(f"serving {opts.pack} on http://{host}:{port} (loaded in {pkg.load_seconds * 1000:.0f} ms)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
