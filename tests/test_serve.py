"""examples/serve/server.py: a pack behind HTTP. The server runs as its own process on 127.0.0.1 (port 0:
the OS picks a free one, the server prints it); answers are checked against eager, client mistakes must
be 4xx with the guard's own message, never a 500."""
from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import threading
import time

import pytest
import torch

import aotpack
from conftest import ROOT
from helpers import assert_close_to_eager

SERVER = ROOT / "examples" / "serve" / "server.py"
START_TIMEOUT_S = 60


def request(port: int, method: str, path: str, body: bytes | str | None = None,
            headers: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        if isinstance(body, str):
            body = body.encode()
        conn.request(method, path, body=body, headers=dict({"Content-Type": "application/json"}, **(headers or {})))
        resp = conn.getresponse()
        data = resp.read()
        assert resp.getheader("Content-Type") == "application/json"
        return resp.status, json.loads(data)
    finally:
        conn.close()


def predict(port: int, payload: dict) -> tuple[int, dict]:
    return request(port, "POST", "/predict", json.dumps(payload))


@pytest.fixture(scope="module")
def server(multi_io_pack, session_dir):
    """The server process on a free port; yields (port, log path); stopped (SIGTERM, then wait) at the end."""
    log_path = session_dir / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(SERVER), str(multi_io_pack.path), "--host", "127.0.0.1",
                                 "--port", "0", "--num-models", "2"],
                                stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT))
    try:
        port = None
        deadline = time.monotonic() + START_TIMEOUT_S
        while port is None and time.monotonic() < deadline:
            assert proc.poll() is None, f"server exited early:\n{log_path.read_text()}"
            m = re.search(r"on http://127\.0\.0\.1:(\d+)", log_path.read_text())
            if m:
                port = int(m.group(1))
            else:
                time.sleep(0.1)
        assert port is not None, f"server did not start in {START_TIMEOUT_S} s:\n{log_path.read_text()}"
        status, health = request(port, "GET", "/health")
        assert status == 200 and health["status"] == "ok", health
        yield port, log_path, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=20)


def _inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(2, 12, 32, generator=gen)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[seed % 2, 4 + seed % 8:] = False
    return tokens, mask


def _payload(tokens, mask, temperature=0.5, **extra) -> dict:
    return dict({"args": [tokens.tolist()], "kwargs": {"mask": mask.tolist(), "temperature": temperature},
                 "dtype": {"mask": "bool"}}, **extra)


def _from_json(value, like):
    """The JSON answer rebuilt as tensors in the structure of the eager output ``like``."""
    if isinstance(like, torch.Tensor):
        return torch.tensor(value, dtype=like.dtype)
    if isinstance(like, dict):
        assert isinstance(value, dict) and list(value) == list(like), (list(value), list(like))
        return {k: _from_json(value[k], like[k]) for k in like}
    if isinstance(like, (tuple, list)):
        assert isinstance(value, list) and len(value) == len(like)
        return type(like)(_from_json(v, x) for v, x in zip(value, like))
    return value


def test_health_describes_the_inputs(server):
    port, _, _ = server
    status, health = request(port, "GET", "/health")
    assert status == 200
    assert health["entries"] == 1
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
                tokens, mask = _inputs(seed)
                answers[seed] = predict(port, _payload(tokens, mask))
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
    model = multi_io_pack.model
    logits = set()
    for seed, (status, body) in sorted(answers.items()):
        assert status == 200, body
        tokens, mask = _inputs(seed)
        with torch.no_grad():
            ref = model(tokens, mask=mask, temperature=0.5)
        assert_close_to_eager(_from_json(body["outputs"], ref), ref)
        logits.add(json.dumps(body["outputs"]["logits"]))
    assert len(logits) == len(answers)  # distinct inputs, distinct answers


def _guard_message(pack_path, *args, **kwargs) -> str:
    with pytest.raises(aotpack.GuardError) as info:
        aotpack.load(pack_path)(*args, **kwargs)
    return str(info.value)


def test_wrong_shape_is_400_with_the_guard_message(server, multi_io_pack):
    port, _, _ = server
    tokens, mask = torch.randn(2, 10, 32), torch.ones(2, 10, dtype=torch.bool)
    status, body = predict(port, _payload(tokens, mask))
    assert status == 400
    assert body["error"] == _guard_message(multi_io_pack.path, tokens, mask=mask, temperature=0.5)
    assert "input 'tokens' (args[0]) size mismatch at dim 1: expected 12, actual 10" in body["error"]


@pytest.mark.parametrize("change, message", [
    ({"dtype": None}, "input 'mask' (kwargs['mask']) dtype mismatch: expected bool, actual float32"),
    ({"temperature": 1.0}, "input 'temperature' (kwargs['temperature']) value mismatch: expected 0.5, actual 1.0"),
    ({"temperature": 1}, "input 'temperature' (kwargs['temperature']) type mismatch: expected float 0.5, actual int 1"),
    ({"no_kwargs": True}, "missing keyword argument 'mask'"),
])
def test_guard_failures_are_400_with_the_guard_message(server, change, message):
    port, _, _ = server
    tokens, mask = _inputs(1)
    payload = _payload(tokens, mask, temperature=change.get("temperature", 0.5))
    if "dtype" in change:
        del payload["dtype"]
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
])
def test_malformed_requests_are_4xx_never_500(server, body, status, message):
    port, _, _ = server
    got, answer = request(port, "POST", "/predict", body)
    assert got == status, answer
    assert message in answer["error"]


def test_http_level_mistakes(server):
    port, _, _ = server
    assert request(port, "GET", "/nope")[0] == 404
    assert request(port, "GET", "/predict")[0] == 405
    assert request(port, "POST", "/health", "{}")[0] == 404
    status, body = request(port, "POST", "/predict", "{}", headers={"Content-Length": "999999999999"})
    assert status == 413 and "above this server's limit" in body["error"]


def test_server_survives_mistakes_and_stops_cleanly(server, multi_io_pack):
    """Runs last in this file: after every mistake above the server still answers, never logged a
    traceback, and exits 0 on SIGTERM."""
    port, log_path, proc = server
    tokens, mask = _inputs(7)
    status, body = predict(port, _payload(tokens, mask))
    assert status == 200
    with torch.no_grad():
        ref = multi_io_pack.model(tokens, mask=mask, temperature=0.5)
    assert_close_to_eager(_from_json(body["outputs"], ref), ref)
    proc.terminate()
    assert proc.wait(timeout=20) == 0
    log = log_path.read_text()
    assert "Traceback" not in log and '" 500 ' not in log, log
    assert "stopped" in log
