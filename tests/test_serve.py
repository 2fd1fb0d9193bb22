"""examples/serve/app.py: a pack behind HTTP, a FastAPI app under uvicorn. The server runs as its own process
on 127.0.0.1 (port 0: it binds a free one and prints it); answers are checked against eager, client mistakes
must be 4xx with the guard's own message, never a 500."""
from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import subprocess
import sys
import threading

import pytest
import torch

import aotpack
from helpers import assert_close_to_eager
from serve_client import (SERVE_DIR, from_json, multi_io_inputs, multi_io_payload, predict, request, start_server,
                          stop)

pytest.importorskip("fastapi", reason="the serving example needs its extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the serving example needs its extra: pip install -e '.[serve]'")

APP = SERVE_DIR / "app.py"
MAX_BODY_MB = 0.25
LIMIT = int(MAX_BODY_MB * 2**20)


def sha256_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def server(multi_io_pack, session_dir):
    """The server process (the pinned pack, 2 model copies, a 0.25 MiB body limit) on a free port; yields
    (port, log path, process); stopped at the end."""
    log_path = session_dir / "serve.log"
    proc, port = start_server([str(APP), str(multi_io_pack.path), "--host", "127.0.0.1", "--port", "0",
                               "--num-models", "2", "--max-body-mb", str(MAX_BODY_MB),
                               "--sha256", sha256_of(multi_io_pack.path)], log_path, timeout_s=60)
    try:
        yield port, log_path, proc
    finally:
        stop(proc)


def test_health_describes_the_inputs(server, multi_io_pack):
    port, _, _ = server
    status, health = request(port, "GET", "/health")
    assert status == 200
    assert health["status"] == "ok" and health["pack"] == str(multi_io_pack.path) and health["entries"] == 1
    assert [(i["name"], i.get("dtype"), i.get("sizes")) for i in health["inputs"]] == [
        ("tokens", "float32", [2, 12, 32]), ("mask", "bool", [2, 12]), ("temperature", None, None)]
    assert health["inputs"][2] == {"path": "kwargs['temperature']", "name": "temperature", "kind": "value",
                                   "type": "float", "value": 0.5}


def test_concurrent_requests_match_eager(server, multi_io_pack):
    port, _, _ = server
    n_threads, per_thread = 8, 3
    answers: dict[int, tuple[int, dict]] = {}
    errors: list[BaseException] = []

    def client(t: int) -> None:
        try:
            for j in range(per_thread):
                seed = 100 + t * per_thread + j
                tokens, mask = multi_io_inputs(seed)
                answers[seed] = predict(port, multi_io_payload(tokens, mask))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads), "a client thread hung"
    assert not errors, errors
    assert len(answers) == n_threads * per_thread
    logits = set()
    for seed, (status, body) in sorted(answers.items()):
        assert status == 200, body
        tokens, mask = multi_io_inputs(seed)
        with torch.no_grad():
            ref = multi_io_pack.model(tokens, mask=mask, temperature=0.5)
        assert_close_to_eager(from_json(body["outputs"], ref), ref)
        logits.add(json.dumps(body["outputs"]["logits"]))
    assert len(logits) == len(answers)  # distinct inputs, distinct answers


def test_tensors_without_a_dtype_take_the_dtype_the_pack_expects(server, multi_io_pack):
    """A request without "dtype" was read as float32 everywhere, and the bool mask made it a 400."""
    port, _, _ = server
    tokens, mask = multi_io_inputs(7)
    payload = multi_io_payload(tokens, mask)
    del payload["dtype"]
    status, body = predict(port, payload)
    assert status == 200, body
    with torch.no_grad():
        ref = multi_io_pack.model(tokens, mask=mask, temperature=0.5)
    assert_close_to_eager(from_json(body["outputs"], ref), ref)


def test_the_converter_takes_each_tensors_dtype_from_the_guards(monkeypatch):
    """int64 token ids and a bool mask from plain JSON lists, as the pack's guards say (no compile: the guards
    of a captured graph); a dtype the request names still wins."""
    import types

    from aotpack import guards
    from aotpack.capture import capture
    from aotpack_runtime.guards import EntryGuards

    monkeypatch.syspath_prepend(str(SERVE_DIR))
    from jsonio import InputConverter

    def lookup(ids, mask, scale):
        return torch.nn.functional.embedding(ids, torch.ones(10, 3)) * mask.unsqueeze(-1) * scale

    captured = capture(lookup, (torch.tensor([[1, 2]]), torch.tensor([[True, False]]), torch.tensor(2.0)))
    g = EntryGuards.of(guards.derive(captured), "entry 0")
    converter = InputConverter(types.SimpleNamespace(entries=[types.SimpleNamespace(guards=g)]))
    args, _ = converter.convert({"args": [[[3, 4]], [[1, 0]], 3]})
    assert [a.dtype for a in args] == [torch.int64, torch.bool, torch.float32]
    args, _ = converter.convert({"args": [[[3, 4]], [[1, 0]], 3], "dtype": {"ids": "int32"}})
    assert [a.dtype for a in args] == [torch.int32, torch.bool, torch.float32]
    assert g.match(*converter.convert({"args": [[[3, 4]], [[1, 0]], 3]})) is not None


def _guard_message(pack_path, *args, **kwargs) -> str:
    with pytest.raises(aotpack.GuardError) as info:
        aotpack.load(pack_path)(*args, **kwargs)
    return str(info.value)


def test_wrong_shape_is_400_with_the_guard_message(server, multi_io_pack):
    port, _, _ = server
    tokens, mask = torch.randn(2, 10, 32), torch.ones(2, 10, dtype=torch.bool)
    status, body = predict(port, multi_io_payload(tokens, mask))
    assert status == 400
    assert body["error"] == _guard_message(multi_io_pack.path, tokens, mask=mask, temperature=0.5)
    assert "input 'tokens' (args[0]) size mismatch at dim 1: expected 12, actual 10" in body["error"]


@pytest.mark.parametrize("change, message", [
    ({"dtype": {"mask": "float32"}}, "input 'mask' (kwargs['mask']) dtype mismatch: expected bool, actual float32"),
    ({"temperature": 1.0}, "input 'temperature' (kwargs['temperature']) value mismatch: expected 0.5, actual 1.0"),
    ({"temperature": 1}, "input 'temperature' (kwargs['temperature']) type mismatch: expected float 0.5, actual int 1"),
    ({"no_kwargs": True}, "missing keyword argument 'mask'"),
])
def test_guard_failures_are_400_with_the_guard_message(server, change, message):
    port, _, _ = server
    tokens, mask = multi_io_inputs(1)
    payload = multi_io_payload(tokens, mask, temperature=change.get("temperature", 0.5))
    if "dtype" in change:
        payload["dtype"] = change["dtype"]
    if change.get("no_kwargs"):
        payload["kwargs"] = {}
    status, body = predict(port, payload)
    assert status == 400, body
    assert message in body["error"]


@pytest.mark.parametrize("body, status, message", [
    ("{not json", 400, "invalid JSON"),
    ("", 400, "invalid JSON"),
    (b"\xff\xfe", 400, "not UTF-8"),
    ("[1, 2]", 400, "must be a JSON object"),
    ('{"args": {}}', 400, "'args' must be a JSON list"),
    ('{"args": [], "kwargs": []}', 400, "'kwargs' must be a JSON object"),
    ('{"inputs": []}', 400, "unknown field(s) ['inputs']"),
    ('{"args": [[[1, 2], [3]]]}', 400, "args[0]: cannot make a float32 tensor"),
    ('{"args": [[["a"]]]}', 400, "args[0]: cannot make a float32 tensor"),
    ('{"args": [[1]], "dtype": "complex7"}', 400, "unknown dtype 'complex7'"),
    ('{"args": [[1]], "dtype": {"nope": "int64"}}', 400, "'dtype' names input(s) ['nope']"),
    ('{"args": [[1]], "kwargs": {"mask": [[true]], "temperature": 0.5}, "dtype": {"tokens": "int64", "mask": "bool"}}',
     400, "input 'tokens' (args[0]) dtype mismatch: expected float32, actual int64"),
    ("[" * 100_000, 400, "invalid JSON: nested too deeply"),
])
def test_malformed_requests_are_4xx_never_500(server, body, status, message):
    port, _, _ = server
    got, answer = request(port, "POST", "/predict", body)
    assert got == status, answer
    assert message in answer["error"]


def test_http_level_mistakes(server):
    port, _, _ = server
    assert request(port, "GET", "/nope") == (404, {"error": "no such path '/nope'; use GET /health or POST /predict"})
    assert request(port, "GET", "/predict") == (
        405, {"error": "GET is not allowed on /predict; use GET /health or POST /predict"})
    assert request(port, "POST", "/health", "{}") == (
        405, {"error": "POST is not allowed on /health; use GET /health or POST /predict"})


def test_a_pack_without_state_has_no_sessions(server):
    port, _, _ = server
    status, health = request(port, "GET", "/health")
    assert status == 200 and health["stateful"] is False and "sessions" not in health
    for method, path in (("POST", "/sessions"), ("POST", "/sessions/abc.def/predict"), ("DELETE", "/sessions/abc.def")):
        assert request(port, method, path, "{}") == (404, {"error": (
            f"no such path {path!r}: this pack keeps no state between calls, so this server has no sessions; send "
            "each call to POST /predict")})


def _padded(size: int) -> bytes:
    """A JSON body of exactly ``size`` bytes (a request the guards refuse, padded with spaces)."""
    body = b'{"args": [[1]]}'
    return body + b" " * (size - len(body))


def _chunked_post(port: int, body: bytes) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/predict", body=(body[i:i + 65536] for i in range(0, len(body), 65536)),
                     headers={"Content-Type": "application/json"}, encode_chunked=True)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_body_limit_is_413(server):
    port, _, _ = server
    status, body = request(port, "POST", "/predict", _padded(LIMIT))  # at the limit: read, then refused by a guard
    assert status == 400 and "missing keyword argument 'mask'" in body["error"], body
    status, body = request(port, "POST", "/predict", _padded(LIMIT + 1))
    assert (status, body["error"]) == (413, f"the request body is {LIMIT + 1} bytes, above this server's limit of "
                                            f"{LIMIT}; send a smaller request or raise the limit (--max-body-mb)")
    status, body = request(port, "POST", "/predict", "{}", headers={"Content-Length": "999999999999"})
    assert status == 413 and "the request body is 999999999999 bytes, above this server's limit" in body["error"]
    status, body = _chunked_post(port, _padded(LIMIT))  # no Content-Length: counted while read
    assert status == 400 and "missing keyword argument 'mask'" in body["error"], body
    status, body = _chunked_post(port, _padded(LIMIT + 1))
    assert (status, body["error"]) == (413, f"the request body is over {LIMIT} bytes, above this server's limit of "
                                            f"{LIMIT}; send a smaller request or raise the limit (--max-body-mb)")


def test_a_pack_that_is_not_the_pinned_one_is_refused_at_start(multi_io_pack):
    wrong = "0" * 64
    proc = subprocess.run([sys.executable, str(APP), str(multi_io_pack.path), "--port", "0", "--sha256", wrong],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {multi_io_pack.path}: sha256 mismatch: expected {wrong}, actual {sha256_of(multi_io_pack.path)}; "
        "refusing to load a pack that is not the pinned one")
    assert "serving" not in proc.stdout


@pytest.fixture
def app_module(monkeypatch):
    monkeypatch.syspath_prepend(str(SERVE_DIR))
    import app

    return app


def test_create_app_takes_its_options_from_the_environment(app_module, monkeypatch, multi_io_pack):
    monkeypatch.delenv("AOTPACK_SERVE_PACK", raising=False)
    with pytest.raises(app_module.ConfigError, match="AOTPACK_SERVE_PACK is not set; set it to the .pack file"):
        app_module.create_app()
    monkeypatch.setenv("AOTPACK_SERVE_PACK", str(multi_io_pack.path))
    monkeypatch.setenv("AOTPACK_SERVE_NUM_MODELS", "two")
    with pytest.raises(app_module.ConfigError, match="AOTPACK_SERVE_NUM_MODELS is 'two', not an integer"):
        app_module.create_app()
    monkeypatch.setenv("AOTPACK_SERVE_NUM_MODELS", "2")
    monkeypatch.setenv("AOTPACK_SERVE_SHA256", "0" * 64)
    with pytest.raises(aotpack.ArchiveError, match="sha256 mismatch"):
        app_module.create_app()
    monkeypatch.setenv("AOTPACK_SERVE_SHA256", sha256_of(multi_io_pack.path))
    monkeypatch.setenv("AOTPACK_SERVE_MAX_BODY_MB", "0.5")
    monkeypatch.setenv("AOTPACK_SERVE_PUBLIC_KEY", "release.pub")
    monkeypatch.setenv("AOTPACK_SERVE_SIGNATURE", "model.sig")
    assert app_module.ServeOptions.from_env(os.environ) == app_module.ServeOptions(
        pack=str(multi_io_pack.path), sha256=sha256_of(multi_io_pack.path), num_models=2, max_body_bytes=2**19,
        public_key="release.pub", signature="model.sig")
    monkeypatch.delenv("AOTPACK_SERVE_PUBLIC_KEY")
    monkeypatch.delenv("AOTPACK_SERVE_SIGNATURE")
    app = app_module.create_app()
    assert sorted((r.path, tuple(r.methods)) for r in app.routes) == [("/health", ("GET",)), ("/predict", ("POST",))]
    status, body = _asgi_post(app, "/predict", b" " * (2**19 + 1))
    assert status == 413 and f"above this server's limit of {2**19}" in body["error"], body


def _asgi_post(app, path: str, body: bytes) -> tuple[int, dict]:
    """POST ``body`` to the ASGI ``app`` in this process (no server, no socket)."""
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"content-length", str(len(body)).encode())], "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


def test_server_survives_mistakes_and_stops_cleanly(server, multi_io_pack):
    """Runs last in this file: after every mistake above the server still answers, never logged a
    traceback or a 500, and exits 0 on SIGTERM."""
    port, log_path, proc = server
    tokens, mask = multi_io_inputs(7)
    status, body = predict(port, multi_io_payload(tokens, mask))
    assert status == 200
    with torch.no_grad():
        ref = multi_io_pack.model(tokens, mask=mask, temperature=0.5)
    assert_close_to_eager(from_json(body["outputs"], ref), ref)
    assert stop(proc, timeout_s=20) == 0
    log = log_path.read_text()
    assert "Traceback" not in log and '" 500 ' not in log, log
    assert log.rstrip().endswith("stopped"), log
