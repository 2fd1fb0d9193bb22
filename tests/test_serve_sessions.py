"""examples/serve/app.py with a stateful pack (the tiny Llama of examples/llm): conversations as sessions over
HTTP. The server runs as its own process on 127.0.0.1 for the conversation tests; the limit, idle-timeout,
busy and failure tests serve an app made in this process (uvicorn in a thread) so that they can hold a call
in the model or make one fail. Answers are checked against sessions of the same pack used directly."""
from __future__ import annotations

import json
import threading
import time

import pytest
import torch

import aotpack
from serve_client import (NEW_TOKENS, PROMPTS, SERVE_DIR, Conversation, assert_matches, exchange, llm_payload,
                          reference_conversations, request, serve_in_thread, start_server, stop)

pytest.importorskip("fastapi", reason="the serving example needs its extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the serving example needs its extra: pip install -e '.[serve]'")

APP = SERVE_DIR / "app.py"
CACHE = 64  # examples/llm: MAX_CACHE_LEN
OPEN_HINT = "open a new one (POST /sessions) and send the conversation so far"


def over_http(port: int, session_id: str, headers: dict | None = None):
    def call(ids, position):
        status, body = request(port, "POST", f"/sessions/{session_id}/predict", llm_payload(ids, position), headers)
        assert status == 200, body
        return torch.tensor(body["outputs"])
    return call


def open_session(port: int, headers: dict | None = None) -> str:
    status, body, answer_headers = exchange(port, "POST", "/sessions", headers=headers)
    assert status == 201, body
    assert answer_headers["location"] == f"/sessions/{body['session']}"
    return body["session"]


@pytest.fixture(scope="module")
def reference(llama_pack) -> dict:
    return reference_conversations(aotpack.load(llama_pack.path))


@pytest.fixture(scope="module")
def llm_server(llama_pack, session_dir):
    """app.py serving the Llama pack (2 model copies, at most 8 sessions) on a free port; yields (port, log
    path, process); stopped at the end."""
    log_path = session_dir / "serve-llm.log"
    proc, port = start_server([str(APP), str(llama_pack.path), "--host", "127.0.0.1", "--port", "0",
                               "--num-models", "2", "--max-sessions", "8", "--session-idle-s", "300"], log_path,
                              timeout_s=90)
    try:
        yield port, log_path, proc
    finally:
        stop(proc)


def test_health_of_a_stateful_pack(llm_server, llama_pack):
    port, log_path, _ = llm_server
    assert "sessions: at most 8 open, each closed after 300 s idle" in log_path.read_text()
    status, health, headers = exchange(port, "GET", "/health")
    assert status == 200 and health["stateful"] is True and health["pack"] == str(llama_pack.path)
    assert [(i["name"], i["dtype"]) for i in health["inputs"]] == [("input_ids", "int64"), ("cache_position", "int64")]
    state = aotpack.load(llama_pack.path).manifest.state
    assert health["sessions"] == {"open": 0, "busy": 0, "max": 8, "idle_timeout_s": 300.0, "evicted": 0,
                                  "expired": 0, "cache_positions": CACHE,
                                  "state_bytes": sum(torch.zeros(r.shape, dtype=getattr(torch, r.dtype)).nbytes
                                                     for r in state)}
    assert headers["x-aotpack-replica"] == health["replica"]


def test_two_conversations_interleaved_match_sessions_used_directly(llm_server, reference):
    port, _, _ = llm_server
    a_id, b_id = open_session(port), open_session(port)
    assert a_id != b_id and a_id.split(".")[0] == b_id.split(".")[0]  # held by this one server process
    assert len(a_id.split(".")[1]) >= 22  # 128 random bits, URL-safe
    a, b = Conversation(over_http(port, a_id), PROMPTS[0]), Conversation(over_http(port, b_id), PROMPTS[1])
    for _ in range(NEW_TOKENS):
        a.step()
        b.step()
    assert_matches(a, reference)
    assert_matches(b, reference)
    assert a.tokens != b.tokens
    status, health = request(port, "GET", "/health")
    assert health["sessions"]["open"] >= 2


def test_reset_starts_the_conversation_again(llm_server, reference):
    port, _, _ = llm_server
    sid = open_session(port)
    c = Conversation(over_http(port, sid), PROMPTS[0])
    c.step()
    c.step()
    assert request(port, "POST", f"/sessions/{sid}/reset") == (200, {"session": sid, "reset": True})
    again = Conversation(over_http(port, sid), PROMPTS[0])
    for _ in range(NEW_TOKENS):
        again.step()
    assert_matches(again, reference)


def test_a_closed_session_is_404(llm_server):
    port, _, _ = llm_server
    sid = open_session(port)
    assert request(port, "DELETE", f"/sessions/{sid}") == (200, {"session": sid, "closed": True})
    gone = (404, {"error": f"session {sid!r} was closed (DELETE /sessions/{{id}}); its state is gone: {OPEN_HINT}"})
    assert request(port, "POST", f"/sessions/{sid}/predict", llm_payload([PROMPTS[0]], 0)) == gone
    assert request(port, "POST", f"/sessions/{sid}/reset") == gone
    assert request(port, "DELETE", f"/sessions/{sid}") == gone


def test_unknown_ids_are_404(llm_server):
    port, _, _ = llm_server
    status, health = request(port, "GET", "/health")
    here = health["replica"]
    status, body = request(port, "POST", f"/sessions/{here}.nope/predict", llm_payload([PROMPTS[0]], 0))
    assert (status, body["error"]) == (404, f"no open session '{here}.nope' on this server process: it ended "
                                            "(closed, idle for over 300 s, or closed to make room) or was never "
                                            f"opened; {OPEN_HINT}")
    assert request(port, "POST", "/sessions/nope/reset")[0] == 404
    status, body = request(port, "POST", "/sessions/gone1234.abc/predict", llm_payload([PROMPTS[0]], 0))
    assert (status, body["error"]) == (
        404, f"session 'gone1234.abc' is not held by this server process ({here}) but by 'gone1234', which does not "
             "serve here: the server was restarted since, or it runs several worker processes (sessions live in "
             "the process that opened them: serve a stateful pack with one worker, or on Ray Serve); its state is "
             f"not reachable from here: {OPEN_HINT}")


def test_positions_past_the_cache_are_400_with_the_guard_message(llm_server, llama_pack, reference):
    port, _, _ = llm_server
    sid = open_session(port)
    with pytest.raises(aotpack.GuardError) as info:
        aotpack.load(llama_pack.path).session()(input_ids=torch.tensor([[1, 2, 3]]),
                                                cache_position=torch.tensor([CACHE - 2]))
    status, body = request(port, "POST", f"/sessions/{sid}/predict", llm_payload([[1, 2, 3]], CACHE - 2))
    assert (status, body) == (400, {"error": str(info.value)})
    assert "starts at cache position 62 and input 'input_ids' (kwargs['input_ids']) writes 3 positions from there " \
           "(up to 64), past the end of the cache (64 positions, 0..63)" in body["error"]
    # Refused before native code ran: the session goes on as if that call had not been sent.
    c = Conversation(over_http(port, sid), PROMPTS[1])
    c.step()
    assert_matches(c, reference)


def test_predict_on_a_stateful_pack_is_409(llm_server, llama_pack):
    port, _, _ = llm_server
    n = len(aotpack.load(llama_pack.path).manifest.state)
    assert request(port, "POST", "/predict", llm_payload([PROMPTS[0]], 0)) == (409, {"error": (
        f"this pack keeps state between calls ({n} state buffers, such as an LLM's KV cache), so its calls run in a "
        "session, which holds its own copy of it: open one with POST /sessions, then send each call to POST "
        "/sessions/{id}/predict (the same body as /predict)")})


def test_mistakes_in_a_session_request_are_4xx_and_leave_it_usable(llm_server, reference):
    port, _, _ = llm_server
    sid = open_session(port)
    assert request(port, "POST", f"/sessions/{sid}/predict", "{not json")[0] == 400
    int32 = json.dumps(dict(json.loads(llm_payload([PROMPTS[0]], 0)), dtype="int32"))
    status, body = request(port, "POST", f"/sessions/{sid}/predict", int32)
    assert status == 400 and "input 'input_ids' (kwargs['input_ids']) dtype mismatch: expected int64, actual int32" \
        in body["error"], body
    status, body = request(port, "POST", f"/sessions/{sid}/predict", llm_payload([PROMPTS[0]], 0),
                           headers={"serve_multiplexed_model_id": "other.id"})
    assert (status, body["error"]) == (400, f"the header serve_multiplexed_model_id names session 'other.id' but the "
                                            f"path names {sid!r}; send the session's id in both")
    assert request(port, "GET", f"/sessions/{sid}") == (
        405, {"error": f"GET is not allowed on /sessions/{sid}; use GET /health, POST /sessions, POST "
                       "/sessions/{id}/predict, POST /sessions/{id}/reset or DELETE /sessions/{id}"})
    c = Conversation(over_http(port, sid, headers={"serve-multiplexed-model-id": sid}), PROMPTS[0])
    for _ in range(NEW_TOKENS):
        c.step()
    assert_matches(c, reference)


def test_llm_server_survives_mistakes_and_stops_cleanly(llm_server):
    """Runs last of the server's tests: it never logged a traceback or a 500, and exits 0 on SIGTERM."""
    port, log_path, proc = llm_server
    assert request(port, "GET", "/health")[0] == 200
    assert stop(proc, timeout_s=20) == 0
    log = log_path.read_text()
    assert "Traceback" not in log and '" 500 ' not in log, log
    assert log.rstrip().endswith("stopped"), log


# --- limits, idle timeout, busy and failed sessions: an app made in this process ------------------------

@pytest.fixture
def app_module(monkeypatch):
    monkeypatch.syspath_prepend(str(SERVE_DIR))
    import app

    return app


@pytest.fixture(scope="module")
def llm_pkg(llama_pack):
    return aotpack.load(llama_pack.path, num_models=2)


class Gate:
    """Makes every native call of ``pkg`` wait until ``open()``: ``entered`` is set once a call waits."""

    def __init__(self, pkg, monkeypatch, fail: Exception | None = None):
        self.entered, self.released, self.fail = threading.Event(), threading.Event(), fail
        for entry in pkg.entries:
            run = entry.run_stateful

            def gated(*args, run=run, **kwargs):
                self.entered.set()
                assert self.released.wait(timeout=60)
                if self.fail is not None:
                    fail, self.fail = self.fail, None
                    raise fail
                return run(*args, **kwargs)

            monkeypatch.setattr(entry, "run_stateful", gated)

    def open(self) -> None:
        self.released.set()


def test_at_the_limit_the_least_recently_used_idle_session_is_closed(app_module, llm_pkg, reference):
    with serve_in_thread(app_module.build_app(llm_pkg, max_sessions=2)) as port:
        a, b = open_session(port), open_session(port)
        Conversation(over_http(port, a), PROMPTS[0]).step()  # a is used after b was opened: b is the older
        c = open_session(port)
        status, body = request(port, "POST", f"/sessions/{b}/predict", llm_payload([PROMPTS[0]], 0))
        assert (status, body["error"]) == (
            404, f"session {b!r} was closed to make room for a new one: this server process keeps at most 2 sessions "
                 f"open (--max-sessions), and it was the least recently used; its state is gone: {OPEN_HINT}")
        for sid in (a, c):
            assert request(port, "POST", f"/sessions/{sid}/reset")[0] == 200
        status, health = request(port, "GET", "/health")
        assert (health["sessions"]["open"], health["sessions"]["evicted"]) == (2, 1)
        conversation = Conversation(over_http(port, c), PROMPTS[1])
        for _ in range(NEW_TOKENS):
            conversation.step()
        assert_matches(conversation, reference)


def _predict_in_thread(port: int, sid: str, answers: list) -> threading.Thread:
    th = threading.Thread(target=lambda: answers.append(
        request(port, "POST", f"/sessions/{sid}/predict", llm_payload([PROMPTS[0]], 0))))
    th.start()
    return th


def test_a_busy_session_is_409_and_a_full_server_503(app_module, llm_pkg, monkeypatch, reference):
    gate = Gate(llm_pkg, monkeypatch)
    with serve_in_thread(app_module.build_app(llm_pkg, max_sessions=1)) as port:
        sid = open_session(port)
        answers: list = []
        th = _predict_in_thread(port, sid, answers)
        try:
            assert gate.entered.wait(timeout=60)
            busy = (409, {"error": f"session {sid!r} is running another request; a session runs one call at a time: "
                                   "wait for that answer before sending the next call, or open another session "
                                   "(POST /sessions)"})
            assert request(port, "POST", f"/sessions/{sid}/predict", llm_payload([PROMPTS[0]], 0)) == busy
            assert request(port, "POST", f"/sessions/{sid}/reset") == busy
            assert request(port, "DELETE", f"/sessions/{sid}") == (
                409, {"error": f"session {sid!r} is running a request; close it once that request has its answer"})
            status, body, headers = exchange(port, "POST", "/sessions")
            assert (status, body, headers["retry-after"]) == (503, {"error": (
                "all 1 open sessions are running a call, so none can be closed to make room (at most 1 open, "
                "--max-sessions); retry in a moment")}, "1")
            status, health = request(port, "GET", "/health")
            assert (health["sessions"]["open"], health["sessions"]["busy"]) == (1, 1)
        finally:
            gate.open()
            th.join(timeout=60)
        assert answers[0][0] == 200, answers
        tokens, logits = reference[tuple(PROMPTS[0])]
        torch.testing.assert_close(torch.tensor(answers[0][1]["outputs"]), logits[0], rtol=1e-4, atol=1e-4)
        assert request(port, "DELETE", f"/sessions/{sid}")[0] == 200


def test_idle_sessions_expire(app_module, llm_pkg):
    with serve_in_thread(app_module.build_app(llm_pkg, session_idle_s=0.5)) as port:
        sid = open_session(port)
        assert request(port, "POST", f"/sessions/{sid}/predict", llm_payload([PROMPTS[0]], 0))[0] == 200
        time.sleep(1.5)
        status, health = request(port, "GET", "/health")
        assert (health["sessions"]["open"], health["sessions"]["expired"]) == (0, 1)
        status, body = request(port, "POST", f"/sessions/{sid}/predict", llm_payload([[7]], 3))
        assert (status, body["error"]) == (404, f"session {sid!r} expired: it had no request for over 0.5 s "
                                                f"(--session-idle-s); its state is gone: {OPEN_HINT}")


def test_a_failed_call_leaves_the_session_409_until_reset(app_module, llm_pkg, monkeypatch, reference, capsys):
    gate = Gate(llm_pkg, monkeypatch, fail=RuntimeError("the kernel failed"))
    gate.open()
    with serve_in_thread(app_module.build_app(llm_pkg)) as port:
        sid = open_session(port)
        assert request(port, "POST", f"/sessions/{sid}/predict", llm_payload([PROMPTS[0]], 0)) == (500, {"error": (
            f"internal error while running the model; the state of session {sid!r} is now undefined: reset it (POST "
            f"/sessions/{sid}/reset) or open a new one")})
        assert "RuntimeError: the kernel failed" in capsys.readouterr().err
        assert request(port, "POST", f"/sessions/{sid}/predict", llm_payload([PROMPTS[0]], 0)) == (409, {"error": (
            f"session {sid!r}: an earlier call of this session failed (RuntimeError: the kernel failed), so its state "
            f"is undefined; call reset() to start it again (POST /sessions/{sid}/reset)")})
        assert request(port, "POST", f"/sessions/{sid}/reset")[0] == 200
        conversation = Conversation(over_http(port, sid), PROMPTS[0])
        for _ in range(NEW_TOKENS):
            conversation.step()
        assert_matches(conversation, reference)
