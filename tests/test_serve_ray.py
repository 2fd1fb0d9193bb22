"""examples/serve/ray_app.py: the serving app on Ray Serve, 2 replicas on a local Ray cluster that the command
starts (and stops) itself. Every listening socket of every process it started must be on loopback; requests
from 8 threads must all match eager; a bad input must be a 400 with the guard's message; on SIGTERM the
command must exit 0 and every process it started must be gone. Select with ``-m ray``."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import threading
import time

import pytest
import torch

from helpers import assert_close_to_eager
from serve_client import (SERVE_DIR, bound_sockets, command_line, descendants, from_json, is_loopback,
                          multi_io_inputs, multi_io_payload, predict, request, start_server, start_time, stop)

pytestmark = pytest.mark.ray

for _module in ("ray", "fastapi"):
    if importlib.util.find_spec(_module) is None:
        pytest.skip(f"{_module} is not installed: pip install -e '.[serve,ray]' (CI installs it)",
                    allow_module_level=True)

START_TIMEOUT_S = 120


def _gone(pids: dict[int, int], timeout_s: float) -> dict[int, str]:
    """The processes of ``pids`` (pid: start time) still running after ``timeout_s``, with their command."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = {pid: command_line(pid) for pid, started in pids.items() if start_time(pid) == started}
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def test_two_replicas_on_loopback(multi_io_pack, session_dir):
    log_path = session_dir / "serve-ray.log"
    proc, port = start_server([str(SERVE_DIR / "ray_app.py"), str(multi_io_pack.path), "--replicas", "2",
                               "--port", "0", "--num-cpus", "2"], log_path, timeout_s=START_TIMEOUT_S,
                              env={"RAY_TMPDIR": str(session_dir / "ray")})
    started: dict[int, int] = {}
    try:
        assert "with 2 replica(s)" in log_path.read_text()
        status, health = request(port, "GET", "/health")
        assert status == 200 and health["status"] == "ok" and health["pack"] == str(multi_io_pack.path), health

        answers: dict[int, tuple[int, dict]] = {}
        errors: list[BaseException] = []

        def client(seed: int) -> None:
            try:
                tokens, mask = multi_io_inputs(seed)
                answers[seed] = predict(port, multi_io_payload(tokens, mask))
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=client, args=(seed,)) for seed in range(200, 216)]
        for th in threads[:8]:
            th.start()
        for th in threads[:8]:
            th.join(timeout=60)
        for th in threads[8:]:  # a second wave of 8
            th.start()
        for th in threads[8:]:
            th.join(timeout=60)
        assert not any(th.is_alive() for th in threads), "a client thread hung"
        assert not errors, errors
        assert sorted(answers) == list(range(200, 216))
        for seed, (status, body) in answers.items():
            assert status == 200, body
            tokens, mask = multi_io_inputs(seed)
            with torch.no_grad():
                ref = multi_io_pack.model(tokens, mask=mask, temperature=0.5)
            assert_close_to_eager(from_json(body["outputs"], ref), ref)
        assert len({json.dumps(b["outputs"]["logits"]) for _, b in answers.values()}) == len(answers)

        tokens, mask = torch.randn(2, 10, 32), torch.ones(2, 10, dtype=torch.bool)
        status, body = predict(port, multi_io_payload(tokens, mask))
        assert status == 400, body
        assert "input 'tokens' (args[0]) size mismatch at dim 1: expected 12, actual 10" in body["error"]

        started = descendants(proc.pid)
        replicas = [pid for pid in started if "ServeReplica:aotpack:PackServer" in command_line(pid)]
        assert len(replicas) == 2, {pid: command_line(pid) for pid in started}
        listening = {pid: bound_sockets(pid) for pid in started}
        assert any((addr, p) == ("127.0.0.1", port) for socks in listening.values() for _, addr, p in socks)
        exposed = {f"{pid} {command_line(pid)[:80]}": [s for s in socks if not is_loopback(s[1])]
                   for pid, socks in listening.items()}
        exposed = {who: socks for who, socks in exposed.items() if socks}
        assert not exposed, f"listening beyond loopback: {exposed}"

        assert stop(proc, timeout_s=60) == 0, log_path.read_text()
        assert not _gone(started, timeout_s=20), "processes left behind"
        log = log_path.read_text()
        assert log.rstrip().endswith("stopped") and "POST /predict 500" not in log, log
    finally:
        stop(proc, timeout_s=60)
        for pid in _gone(started, timeout_s=0):  # after a failure: what this test started, by pid
            os.kill(pid, signal.SIGKILL)
