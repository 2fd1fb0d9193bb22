"""Ray Serve start-up and scale-up: aotpack vs AOTInductor's own loader, behind the same HTTP app.

Run from the repository root, with the serving extras installed (``pip install -e '.[serve,ray]'``)::

    .venv/bin/python benchmarks/bench_serve.py [--quick] [--repeats 3] [--model mlp] [--calls 200]

It builds the example into a pack and into an AOTInductor package (``aoti_compile_and_package``, in a
subprocess, as ``bench.py`` does), starts one local Ray cluster (every listener on 127.0.0.1, ``--num-cpus``
CPUs, no usage statistics) and Serve's HTTP proxy on a free port, loads each model once in this process (so
aotpack's code cache and Inductor's cache are warm, as on a serving host after its first start), then
in each repetition, for each variant in turn (the order alternates):

1. *start*: ``serve.run`` of a 1-replica deployment whose constructor loads the model, until the first
   ``POST /predict`` is answered; the variants: ``examples/serve/ray_app.py``'s ``PackServer``
   (``aotpack.load``), and the same FastAPI handling of the same request body in a deployment whose
   constructor calls ``torch._inductor.aoti_load_package`` (no guards);
2. *scale-up*: ``serve.run`` of the same application with 2 replicas, until it returns (Serve reports both
   replicas running) and a request is answered; the deployment has a fixed version, so the first replica
   stays and one is added (checked);
3. *p50*: ``--calls`` requests one after another on one keep-alive connection through Serve's proxy, after
   10 warm-up requests, with 2 replicas; and each replica's PSS (``/proc/PID/smaps_rollup``);

then ``serve.delete``. For reference it also times requests to the pack under ``examples/serve/app.py``
(uvicorn, one process, no Ray), with one OpenMP thread (as a 1-CPU replica) and with torch's default. Every
request must be answered 200; the first answer of each run is compared with eager (``max_abs_diff_vs_eager``
in the JSON). Figures are medians over the repetitions (p50 over all their requests). Writes
``benchmarks/results-serve.md`` and ``results-serve.json`` and puts the table into README.md and
examples/serve/README.md between their ``bench-serve`` markers. Builds, caches and Ray's session folder are
removed at the end.
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from _markers import put_between_markers

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SERVE_DIR = ROOT / "examples" / "serve"
WORK = HERE / ".work-serve"
MARK_START, MARK_END = "<!-- bench-serve:start -->", "<!-- bench-serve:end -->"
VARIANTS = ("aotpack", "aoti")
LABELS = {"aotpack": "aotpack (`aotpack.load`)", "aoti": "AOTInductor (`aoti_load_package`)"}
APP_NAME = "bench"
WARMUP_CALLS = 10


def build(example: Path, pack: Path, pt2: Path, inputs: Path) -> None:
    """The pack, the AOTInductor package and the example inputs, by ``_child.py build`` in a subprocess."""
    result = WORK / "build.json"
    proc = subprocess.run([sys.executable, str(HERE / "_child.py"), "build", str(result), str(example), str(pack),
                           str(pt2), str(inputs)], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise SystemExit(f"bench_serve.py: the build failed:\n{proc.stderr[-3000:]}")
    built = json.loads(result.read_text())
    failed = {k: v["error"] for k, v in built.items() if "error" in v}
    if failed:
        raise SystemExit(f"bench_serve.py: the build failed: {failed}")


def post(conn: http.client.HTTPConnection, body: bytes) -> dict:
    conn.request("POST", "/predict", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"POST /predict answered {resp.status}: {data[:300]!r}")
    return json.loads(data)


def first_answer(port: int, body: bytes, timeout_s: float = 120) -> dict:
    """The first 200 answer to ``body``, retrying while the proxy has no route or replica yet."""
    deadline = time.monotonic() + timeout_s
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            return post(conn, body)
        except (RuntimeError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
        finally:
            conn.close()


def request_ms(port: int, body: bytes, calls: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.connect()
    # http.client sends a body above 2000 bytes apart from the headers: without this, Nagle's algorithm and
    # the server's delayed ACK add about 40 ms to every request.
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    samples = []
    try:
        for i in range(WARMUP_CALLS + calls):
            start = time.perf_counter()
            post(conn, body)
            if i >= WARMUP_CALLS:
                samples.append(1e3 * (time.perf_counter() - start))
    finally:
        conn.close()
    return samples


def max_abs_diff(answer: dict, ref) -> float:
    import torch

    got = torch.tensor(answer["outputs"], dtype=ref.dtype)
    if got.shape != ref.shape:
        raise RuntimeError(f"the answer has shape {list(got.shape)}, eager's output {list(ref.shape)}")
    return (got - ref).abs().max().item()


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def replica_pids(app_name: str) -> list[int]:
    """The replicas of ``app_name`` among this process's descendants (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if f"ServeReplica:{app_name}:".encode() not in Path(f"/proc/{entry}/cmdline").read_bytes():
                continue
            pid = int(entry)
            while pid > 1 and pid != os.getpid():
                pid = _parent(pid)
        except OSError:  # ended meanwhile
            continue
        if pid == os.getpid():
            found.append(int(entry))
    return sorted(found)


def pss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    return int(re.search(r"^Pss:\s+(\d+) kB", text, re.M).group(1)) / 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def aoti_app(model, max_body_bytes: int):
    """The request handling of ``app.build_app`` (same body, same answer) around an AOTInductor model: every
    ``args`` item becomes a float32 tensor; no guards."""
    import torch
    from fastapi import FastAPI, Request
    from starlette.concurrency import run_in_threadpool

    from app import json_response, read_body
    from jsonio import parse_json, to_json

    fastapi_app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    def answer(raw: bytes) -> dict:
        body = parse_json(raw)
        args = [torch.tensor(a, dtype=torch.float32) for a in body["args"]]
        with torch.inference_mode():
            return {"outputs": to_json(model(*args))}

    async def predict(request):
        raw = await read_body(request, max_body_bytes)
        return json_response(200, await run_in_threadpool(answer, raw))

    # A FastAPI route, as build_app's. This function goes to the replicas by value, where the name of a string
    # annotation (this file's `from __future__ import annotations`) would not resolve: annotate with the class.
    predict.__annotations__["request"] = Request
    fastapi_app.add_api_route("/predict", predict, methods=["POST"])
    return fastapi_app


def deployments(pack: Path, pt2: Path):
    """``{variant: replicas -> Ray Serve application}``."""
    from ray import serve

    import ray_app
    from app import DEFAULT_MAX_BODY_BYTES, ServeOptions

    @serve.deployment
    @serve.ingress()
    class AOTIServer:
        def __init__(self, path: str):
            import torch._inductor

            ray_app._bind_replica_grpc_to_node_address()
            self.model = torch._inductor.aoti_load_package(path)

        def __serve_build_asgi_app__(self):
            return aoti_app(self.model, DEFAULT_MAX_BODY_BYTES)

    # serve.run gives a deployment without a version a new random one each time, so a second serve.run with 2
    # replicas would replace the first replica too. A fixed version (set as Serve's own config deploys set
    # it) makes it a scale-up: the first replica stays and one is added.
    def scaled(deployment, replicas: int, *args):
        return deployment.options(num_replicas=replicas, ray_actor_options={"num_cpus": 1}, version="bench",
                                  _internal=True).bind(*args)

    opts = ServeOptions(pack=str(pack))
    return {"aotpack": lambda n: scaled(ray_app.PackServer, n, opts), "aoti": lambda n: scaled(AOTIServer, n, str(pt2))}


def run_variant(variant: str, make_app, port: int, body: bytes, ref, calls: int) -> dict:
    from ray import serve

    start = time.perf_counter()
    serve.run(make_app(1), name=APP_NAME, route_prefix="/")
    first = first_answer(port, body)
    start_s = time.perf_counter() - start
    before = replica_pids(APP_NAME)
    start = time.perf_counter()
    serve.run(make_app(2), name=APP_NAME, route_prefix="/")
    first_answer(port, body)
    scale_s = time.perf_counter() - start
    after = replica_pids(APP_NAME)
    if len(after) != 2 or not set(before) <= set(after):
        raise RuntimeError(f"{variant}: scaling to 2 replicas gave replicas {after}, from {before}: not a scale-up")
    samples = request_ms(port, body, calls)
    row = {"start_s": start_s, "scale_up_s": scale_s, "request_ms": samples,
           "pss_mb_per_replica": [pss_mb(pid) for pid in after], "max_abs_diff_vs_eager": max_abs_diff(first, ref)}
    serve.delete(APP_NAME)
    print(f"  {variant}: start {start_s:.2f} s, scale-up {scale_s:.2f} s, p50 {statistics.median(samples):.2f} ms",
          flush=True)
    return row


def uvicorn_request_ms(pack: Path, body: bytes, calls: int, threads: int | None) -> list[float]:
    """Request latencies of ``app.py`` (uvicorn, one process) serving the pack, its OpenMP threads set to
    ``threads`` (None: torch's default, one per core)."""
    log = WORK / "uvicorn.log"
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(SERVE_DIR / "app.py"), str(pack), "--port", "0", "--quiet"],
                                stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (m := re.search(r"on http://127\.0\.0\.1:(\d+)", log.read_text())):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"bench_serve.py: app.py did not start:\n{log.read_text()}")
            time.sleep(0.1)
        return request_ms(int(m.group(1)), body, calls)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def markdown(results: dict) -> str:
    m, c = results["machine"], results["config"]
    load = m["load_average_1min"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores (load average {load[0]:.1f} at the start, {load[1]:.1f} at "
             f"the end), torch {m['torch']}, ray {m['ray']}, Python {m['python']}, {m['date']}. Model "
             f"`{c['model']}` (one request: {c['request']}), a local Ray cluster of {c['num_cpus']} CPUs, 1 CPU "
             f"per replica. Medians of {c['repeats']} repetitions; p50 over {c['repeats']} x {c['calls']} "
             "requests.", "",
             "| loader in the replica | `serve.run` → first answer (s) | scale-up 1 → 2 replicas (s) | "
             "p50 request, 2 replicas (ms) | PSS per replica (MB) |",
             "|---|---|---|---|---|"]
    for v in VARIANTS:
        s = results["summary"][v]
        lines.append(f"| {LABELS[v]} | {s['start_s']:.2f} | {s['scale_up_s']:.2f} | {s['p50_ms']:.2f} | "
                     f"{s['pss_mb']:.0f} |")
    u = results["uvicorn_p50_ms"]
    lines += ["", f"The same pack under `app.py` (uvicorn, one process, no Ray): p50 {u['1_thread']:.2f} ms with "
                  f"`OMP_NUM_THREADS=1` (as a replica with 1 CPU), {u['default_threads']:.2f} ms with torch's "
                  f"default of one thread per core."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mlp", help="the example to serve (examples/NAME.py; default mlp)")
    ap.add_argument("--repeats", type=int, default=None, help="repetitions per variant (default 3; --quick: 1)")
    ap.add_argument("--calls", type=int, default=None, help="requests per latency run (default 200; --quick: 30)")
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster (default 2)")
    ap.add_argument("--quick", action="store_true", help="one repetition, fewer requests: a smoke run")
    opts = ap.parse_args()
    repeats = opts.repeats or (1 if opts.quick else 3)
    calls = opts.calls or (30 if opts.quick else 200)
    example = ROOT / "examples" / f"{opts.model}.py"
    if not example.exists():
        ap.error(f"no example {example.relative_to(ROOT)}")

    began = time.perf_counter()
    load_before = os.getloadavg()[0]
    shutil.rmtree(WORK, ignore_errors=True)
    (WORK / "tmp").mkdir(parents=True)
    ray_tmp = tempfile.mkdtemp(prefix="aotpack-ray-")  # short: Ray's socket paths live under it
    # Read by Ray when imported, and inherited by the cluster's processes (replicas import app, jsonio, ray_app).
    os.environ.update(TMPDIR=str(WORK / "tmp"), TORCHINDUCTOR_CACHE_DIR=str(WORK / "inductor"),
                      AOTPACK_CACHE_DIR=str(WORK / "aotpack-cache"), RAY_TMPDIR=ray_tmp,
                      RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
                      PYTHONPATH=os.pathsep.join([str(SERVE_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]))
    sys.path.insert(0, str(SERVE_DIR))
    pack, pt2, inputs = WORK / f"{opts.model}.pack", WORK / f"{opts.model}.pt2", WORK / "inputs.pt"
    ray_started = False
    try:
        print(f"building {opts.model} (pack and AOTInductor package) ...", flush=True)
        build(example, pack, pt2, inputs)
        import torch
        import torch._inductor

        import aotpack

        args, kwargs = torch.load(inputs, weights_only=True)
        body = json.dumps({"args": [args[0].tolist()]}).encode()
        with torch.inference_mode():  # warm the caches, as a host's first start would
            ref = aotpack.load(pack)(*args, **kwargs)
            torch._inductor.aoti_load_package(str(pt2))(*args, **kwargs)
        if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor) or not isinstance(ref, torch.Tensor):
            raise SystemExit(f"bench_serve.py: {opts.model} must take one tensor and return one (the AOTInductor "
                             "app converts args to float32 tensors only)")

        import ray
        from ray import serve

        ray.init(address="local", num_cpus=opts.num_cpus, include_dashboard=False, log_to_driver=False)
        ray_started = True
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        apps = deployments(pack, pt2)
        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for rep in range(repeats):
            print(f"repetition {rep + 1}/{repeats}", flush=True)
            for v in (VARIANTS if rep % 2 == 0 else VARIANTS[::-1]):
                runs[v].append(run_variant(v, apps[v], port, body, ref, calls))
        serve.shutdown()
        ray.shutdown()
        ray_started = False
        print("app.py under uvicorn ...", flush=True)
        uvicorn_ms = {label: statistics.median(uvicorn_request_ms(pack, body, calls, threads))
                      for label, threads in (("1_thread", 1), ("default_threads", None))}
    finally:
        if ray_started:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()
        shutil.rmtree(WORK, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)

    summary = {v: {"start_s": statistics.median(r["start_s"] for r in rs),
                   "scale_up_s": statistics.median(r["scale_up_s"] for r in rs),
                   "p50_ms": statistics.median(x for r in rs for x in r["request_ms"]),
                   "pss_mb": statistics.median(x for r in rs for x in r["pss_mb_per_replica"])}
               for v, rs in runs.items()}
    results = {"machine": {"cpu": _cpu(), "cores": os.cpu_count(), "torch": metadata.version("torch"),
                           "ray": metadata.version("ray"), "python": platform.python_version(),
                           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                           "load_average_1min": [load_before, os.getloadavg()[0]]},
               "config": {"model": opts.model, "request": f"float32{list(args[0].shape)}", "repeats": repeats,
                          "calls": calls, "num_cpus": opts.num_cpus, "quick": opts.quick},
               "total_seconds": time.perf_counter() - began, "summary": summary, "runs": runs,
               "uvicorn_p50_ms": uvicorn_ms}
    table = markdown(results)
    (HERE / "results-serve.json").write_text(json.dumps(results, indent=1) + "\n")
    (HERE / "results-serve.md").write_text("# Serving on Ray Serve: aotpack vs AOTInductor\n\n" + table)
    for doc in (ROOT / "README.md", SERVE_DIR / "README.md"):
        put_between_markers(doc, MARK_START, MARK_END, table)
    print(table)
    print(f"wrote benchmarks/results-serve.md and results-serve.json in {results['total_seconds']:.0f} s")
    return 0


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "unknown CPU")
    except OSError:
        return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
