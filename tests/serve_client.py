"""What the serving tests share: a server process started on loopback and stopped by the test, an app served
by uvicorn in a thread of the test process, an HTTP client, the multi_io example's requests, and the listening
sockets and lifetimes of processes (from /proc)."""
from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import threading
import time

import torch

from conftest import ROOT

SERVE_DIR = ROOT / "examples" / "serve"


def exchange(port: int, method: str, path: str, body: bytes | str | None = None,
             headers: dict | None = None) -> tuple[int, dict, dict]:
    """One request to 127.0.0.1:``port``; the status, the JSON answer (which every answer must be) and the
    answer's headers (names in lower case)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        if isinstance(body, str):
            body = body.encode()
        conn.request(method, path, body=body, headers=dict({"Content-Type": "application/json"}, **(headers or {})))
        resp = conn.getresponse()
        data = resp.read()
        assert resp.getheader("Content-Type") == "application/json", (resp.status, data)
        return resp.status, json.loads(data), {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def request(port: int, method: str, path: str, body: bytes | str | None = None,
            headers: dict | None = None) -> tuple[int, dict]:
    """One request to 127.0.0.1:``port``; the status and the JSON answer (which every answer must be)."""
    status, answer, _ = exchange(port, method, path, body, headers)
    return status, answer


def predict(port: int, payload: dict) -> tuple[int, dict]:
    return request(port, "POST", "/predict", json.dumps(payload))


def multi_io_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct ``(tokens, mask)`` per seed, in the shapes the multi_io pack was built for."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(2, 12, 32, generator=gen)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[seed % 2, 4 + seed % 8:] = False
    return tokens, mask


def multi_io_payload(tokens, mask, temperature=0.5, **extra) -> dict:
    return dict({"args": [tokens.tolist()], "kwargs": {"mask": mask.tolist(), "temperature": temperature},
                 "dtype": {"mask": "bool"}}, **extra)


# --- conversations with the tiny Llama pack (examples/llm) -------------------------------------------------

PROMPTS = ([5, 17, 42], [9, 8, 7, 6])
NEW_TOKENS = 4


def llm_payload(ids: list[list[int]], position: int) -> str:
    """A request body for one call of the Llama pack: token ids, and the cache position of the first (no
    "dtype": both are int64 because the pack's guards say so)."""
    return json.dumps({"kwargs": {"input_ids": ids, "cache_position": [position]}})


class Conversation:
    """Greedy generation one call at a time: the whole prompt first, then one token per call.
    ``call(ids, position)`` runs one call and returns the logits."""

    def __init__(self, call, prompt: list[int]):
        self.call, self.prompt, self.tokens, self.logits = call, prompt, [], []

    def next_call(self) -> tuple[list[list[int]], int]:
        """The token ids and the cache position of the next call."""
        if not self.tokens:
            return [self.prompt], 0
        return [[self.tokens[-1]]], len(self.prompt) + len(self.tokens) - 1

    def record(self, logits) -> None:
        """Take the answer of the next call: the next token is the most likely one."""
        self.logits.append(logits)
        self.tokens.append(int(logits[0, -1].argmax()))

    def step(self) -> None:
        self.record(self.call(*self.next_call()))


def reference_conversations(pkg) -> dict[tuple, tuple[list, list]]:
    """Each prompt of PROMPTS: its tokens and logits from a session of ``pkg`` used directly."""
    out = {}
    for prompt in PROMPTS:
        session = pkg.session()

        def call(ids, position, session=session):
            with torch.inference_mode():
                return session(input_ids=torch.tensor(ids), cache_position=torch.tensor([position]))

        c = Conversation(call, prompt)
        for _ in range(NEW_TOKENS):
            c.step()
        out[tuple(prompt)] = (c.tokens, c.logits)
    return out


def assert_matches(conversation: Conversation, reference: dict) -> None:
    """The conversation's tokens so far are those of the reference, and its logits close to them."""
    tokens, logits = reference[tuple(conversation.prompt)]
    assert conversation.tokens == tokens[:len(conversation.tokens)]
    for got, want in zip(conversation.logits, logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def from_json(value, like):
    """The JSON answer rebuilt as tensors in the structure of the eager output ``like``."""
    if isinstance(like, torch.Tensor):
        return torch.tensor(value, dtype=like.dtype)
    if isinstance(like, dict):
        assert isinstance(value, dict) and list(value) == list(like), (list(value), list(like))
        return {k: from_json(value[k], like[k]) for k in like}
    if isinstance(like, (tuple, list)):
        assert isinstance(value, list) and len(value) == len(like)
        return type(like)(from_json(v, x) for v, x in zip(value, like))
    return value


def start_server(argv: list[str], log_path: pathlib.Path, timeout_s: float,
                 env: dict | None = None) -> tuple[subprocess.Popen, int]:
    """Start ``python argv...`` (a server script), its output in ``log_path``; wait until it prints
    ``serving ... on http://127.0.0.1:PORT``. Returns the process and the port; the caller stops it."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT),
                                env=dict(os.environ, **(env or {})))
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            m = re.search(r"serving .* on http://127\.0\.0\.1:(\d+)", log_path.read_text())
            if m:
                return proc, int(m.group(1))
            assert proc.poll() is None, f"server exited early ({proc.returncode}):\n{log_path.read_text()}"
            time.sleep(0.2)
        raise AssertionError(f"server did not start in {timeout_s} s:\n{log_path.read_text()}")
    except BaseException:
        stop(proc)
        raise


def stop(proc: subprocess.Popen, timeout_s: float = 60) -> int:
    """SIGTERM, then SIGKILL if it has not ended after ``timeout_s``; the exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
    return proc.returncode


@contextlib.contextmanager
def serve_in_thread(app, timeout_s: float = 60):
    """Serve the ASGI ``app`` with uvicorn on a free port of 127.0.0.1, in a thread of this process (its
    lifespan runs); yields the port, and stops the server on exit."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


# --- processes, from /proc ---------------------------------------------------------------------------

def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (tells it from a later process with the same pid), or None
    when it has ended (a zombie counts as ended)."""
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """``{pid: start time}`` of ``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(pathlib.Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        started = start_time(pid)
        if started is not None:
            found[pid] = started
            todo += children.get(pid, [])
    return found


def command_line(pid: int) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def _address(hex_address: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    # /proc/net writes each 32-bit word of the address in host (little-endian) order.
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw), int(port, 16)


def bound_sockets(pid: int) -> list[tuple[str, str, int]]:
    """``(protocol, address, port)`` of each TCP socket of ``pid`` that listens and each UDP socket it
    has bound."""
    try:
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[len("socket:["):-1])
    except OSError:  # ended meanwhile
        return []
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = pathlib.Path(f"/proc/{pid}/net/{proto}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            local, state, inode = f[1], f[3], f[9]
            if inode in inodes and (proto.startswith("udp") or state == "0A"):  # 0A: LISTEN
                address, port = _address(local)
                found.append((proto, str(address), port))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)
