"""examples/serve/ray_app.py: the serving app on Ray Serve, 2 replicas on a local Ray cluster that the command
starts (and stops) itself. Every listening socket of every process it started must be on loopback; requests
from 8 threads must all match eager; a bad input must be a 400 with the guard's message; conversations with a
stateful pack must stay on the replica that holds them; on SIGTERM the command must exit 0 and every process
it started must be gone; a pack of several methods is served by method name, its sessions routed as any other.
Select with ``-m ray``."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import threading
import time

import pytest
import torch

import aotpack
from helpers import assert_close_to_eager
from serve_client import (NEW_TOKENS, PROMPTS, SERVE_DIR, Conversation, assert_matches, bound_sockets, command_line,
                          descendants, exchange, from_json, is_loopback, llm_payload, multi_io_inputs, multi_io_payload,
                          predict, reference_conversations, request, start_server, start_time, stop)

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


def _start(pack, session_dir, name: str, *extra: str):
    """``ray_app.py PACK`` with 2 replicas on a 2-CPU local cluster, on a free port; (process, port, log path)."""
    log_path = session_dir / f"{name}.log"
    proc, port = start_server([str(SERVE_DIR / "ray_app.py"), str(pack), "--replicas", "2", "--port", "0",
                               "--num-cpus", "2", *extra], log_path, timeout_s=START_TIMEOUT_S,
                              env={"RAY_TMPDIR": str(session_dir / "ray")})
    return proc, port, log_path


def _check_loopback(proc, port: int) -> None:
    """Two replicas, and every socket of every process the command started listens on loopback."""
    started = descendants(proc.pid)
    replicas = [pid for pid in started if "ServeReplica:aotpack:PackServer" in command_line(pid)]
    assert len(replicas) == 2, {pid: command_line(pid) for pid in started}
    listening = {pid: bound_sockets(pid) for pid in started}
    assert any((addr, p) == ("127.0.0.1", port) for socks in listening.values() for _, addr, p in socks)
    exposed = {f"{pid} {command_line(pid)[:80]}": [s for s in socks if not is_loopback(s[1])]
               for pid, socks in listening.items()}
    exposed = {who: socks for who, socks in exposed.items() if socks}
    assert not exposed, f"listening beyond loopback: {exposed}"


def _stop(proc, log_path, started: dict[int, int]) -> None:
    """SIGTERM stops the command with exit 0, it leaves none of the processes it started behind, and no answer
    was a 5xx. ``started`` is filled with what it started (pid: start time), for the caller to clean up after a
    failure."""
    started.update(descendants(proc.pid))
    assert stop(proc, timeout_s=60) == 0, log_path.read_text()
    assert not _gone(started, timeout_s=20), "processes left behind"
    log = log_path.read_text()
    assert log.rstrip().endswith("stopped") and not re.search(r"(GET|POST|DELETE) /\S* 5\d\d ", log), log


def _kill_leftovers(proc, started: dict[int, int]) -> None:
    """After a failure: stop the command, then what it started, by pid."""
    stop(proc, timeout_s=60)
    for pid in _gone(started, timeout_s=0):
        os.kill(pid, signal.SIGKILL)


def test_two_replicas_on_loopback(multi_io_pack, session_dir):
    proc, port, log_path = _start(multi_io_pack.path, session_dir, "serve-ray")
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

        _check_loopback(proc, port)
        _stop(proc, log_path, started)
    finally:
        _kill_leftovers(proc, started)


@pytest.fixture(scope="module")
def reference(llama_pack) -> dict:
    return reference_conversations(aotpack.load(llama_pack.path))


def test_conversations_stay_on_the_replica_that_holds_them(llama_pack, session_dir, reference):
    """Two conversations, one on each replica, interleaved over several turns: every request of a session is
    answered by its replica (the X-Aotpack-Replica header) with the tokens of a session used directly. A
    session request without the routing header is a 400. When a replica dies, a request for a session it held
    is a 404 from the other replica, never an answer from fresh state, and the other conversation goes on."""
    proc, port, log_path = _start(llama_pack.path, session_dir, "serve-ray-llm", "--max-sessions", "100")
    started: dict[int, int] = {}
    try:
        assert "sessions: at most 100 open per replica" in log_path.read_text()
        status, health = request(port, "GET", "/health")
        assert status == 200 and health["stateful"] is True and health["sessions"]["max"] == 100, health

        # POST /sessions goes to the less busy of two random replicas: open until each replica holds one (the
        # newest on each: older ones may be closed to make room).
        held: dict[str, str] = {}
        for _ in range(12):
            status, body, headers = exchange(port, "POST", "/sessions")
            assert status == 201, body
            replica = body["session"].split(".")[0]
            assert headers["x-aotpack-replica"] == replica
            held[replica] = body["session"]
            if len(held) == 2:
                break
        assert len(held) == 2, held
        conversations = {}
        for (replica, sid), prompt in zip(held.items(), PROMPTS):
            conversations[replica] = Conversation(_on_ray(port, sid, replica), prompt)
        for _ in range(NEW_TOKENS - 1):
            for c in conversations.values():
                c.step()

        sid = next(iter(held.values()))
        status, body = request(port, "POST", f"/sessions/{sid}/predict", llm_payload([[1]], 9))
        assert (status, body["error"]) == (
            400, f"this request names session {sid!r} in its path but not in the header serve_multiplexed_model_id: "
                 "on Ray Serve, send that header with the session's id with every request of a session "
                 f"(-H 'serve_multiplexed_model_id: {sid}'), so that it reaches the replica that holds the session")
        _check_loopback(proc, port)

        # A replica stops (here: killed). The sessions it held are gone: a request for one is answered 404 by
        # the other replica, never from fresh state; the other conversation goes on.
        replica_pids = [pid for pid in descendants(proc.pid) if "ServeReplica:aotpack:PackServer" in command_line(pid)]
        os.kill(replica_pids[0], signal.SIGKILL)
        answers = {replica: exchange(port, "POST", f"/sessions/{held[replica]}/predict",
                                     llm_payload(*c.next_call()), {"serve_multiplexed_model_id": held[replica]})
                   for replica, c in conversations.items()}
        (dead,) = [replica for replica, (status, _, _) in answers.items() if status == 404]
        (alive,) = set(held) - {dead}
        status, body, headers = answers[dead]
        assert (body["error"], headers["x-aotpack-replica"]) == (
            f"session {held[dead]!r} is not held by this replica ({alive}) but by {dead!r}, which does not serve "
            "here: that replica was stopped or restarted (a scale-down, a failure or a redeploy); its state is not "
            "reachable from here: open a new one (POST /sessions) and send the conversation so far", alive)
        status, body, headers = answers[alive]
        assert (status, headers["x-aotpack-replica"]) == (200, alive), body
        conversations[alive].record(torch.tensor(body["outputs"]))
        assert_matches(conversations[alive], reference)
        assert_matches(conversations[dead], reference)
        sid = held[alive]
        assert request(port, "DELETE", f"/sessions/{sid}", headers={"serve_multiplexed_model_id": sid}) == (
            200, {"session": sid, "closed": True})

        _stop(proc, log_path, started)
    finally:
        _kill_leftovers(proc, started)


def _on_ray(port: int, sid: str, replica: str):
    """A call in session ``sid`` through Ray Serve, checked to be answered by ``replica``."""
    def call(ids, position):
        status, body, headers = exchange(port, "POST", f"/sessions/{sid}/predict", llm_payload(ids, position),
                                         {"serve_multiplexed_model_id": sid})
        assert status == 200, body
        assert headers["x-aotpack-replica"] == replica
        return torch.tensor(body["outputs"])
    return call


def test_a_pack_of_methods_is_served_by_method_name(seq2seq_pack, session_dir):
    """The encoder-decoder of tests/programs.py (``encode`` writes the cross-attention cache ``decode`` reads):
    two conversations, one on each replica, interleaved, each ``POST /sessions/{id}/predict/encode`` then
    ``.../decode`` token by token, give eager's greedy tokens from the replica that holds them; an unknown
    method is a 404 naming the pack's; ``/predict/encode`` outside a session is a 409 naming the session route."""
    import programs

    proc, port, log_path = _start(seq2seq_pack.path, session_dir, "serve-ray-methods")
    started: dict[int, int] = {}
    try:
        status, health = request(port, "GET", "/health")
        assert status == 200 and sorted(health["methods"]) == ["decode", "encode"] and health["stateful"], health
        status, body = request(port, "POST", "/predict/encode", json.dumps({"args": [[[1, 5, 7, 2, 9, 4]]]}))
        assert status == 409 and "/sessions/{id}/predict/encode" in body["error"], body

        held: dict[str, str] = {}  # replica -> session, one on each (see the conversations test)
        for _ in range(12):
            status, body, headers = exchange(port, "POST", "/sessions")
            assert status == 201, body
            held[headers["x-aotpack-replica"]] = body["session"]
            if len(held) == 2:
                break
        assert len(held) == 2, held

        def call(replica: str, method: str, *args: torch.Tensor) -> torch.Tensor:
            sid = held[replica]
            status, body, headers = exchange(port, "POST", f"/sessions/{sid}/predict/{method}",
                                             json.dumps({"args": [a.tolist() for a in args]}),
                                             {"serve_multiplexed_model_id": sid})
            assert (status, headers["x-aotpack-replica"]) == (200, replica), body
            return torch.tensor(body["outputs"])

        sources = dict(zip(held, (torch.tensor([[1, 5, 7, 2, 9, 4]]), torch.tensor([[3, 3, 8, 21, 30, 11]]))))
        steps, tokens = 6, {replica: [] for replica in held}
        for replica, src in sources.items():
            call(replica, "encode", src)
        for pos in range(steps):  # the conversations take turns
            for replica in held:
                last = tokens[replica][-1] if tokens[replica] else 1
                logits = call(replica, "decode", torch.tensor([[last]]), torch.tensor([pos]))
                tokens[replica].append(int(logits[0].argmax()))
        for replica, src in sources.items():
            eager = programs.TinySeq2Seq().eval()
            with torch.no_grad():
                assert tokens[replica] == programs.greedy_seq2seq(eager.encode, eager.decode, src, steps)

        sid = next(iter(held.values()))
        status, body = request(port, "POST", f"/sessions/{sid}/predict/translate", json.dumps({"args": [[[1]]]}),
                               {"serve_multiplexed_model_id": sid})
        assert status == 404 and "no method 'translate'; its methods: encode, decode" in body["error"], body

        _check_loopback(proc, port)
        _stop(proc, log_path, started)
    finally:
        _kill_leftovers(proc, started)
