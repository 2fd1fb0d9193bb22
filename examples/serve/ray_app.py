"""The app of app.py on Ray Serve: several replicas, each loading the pack once, autoscaled if asked.

    python examples/serve/ray_app.py model.pack --replicas 2 --port 8000        # 2 replicas
    python examples/serve/ray_app.py model.pack --replicas 1 --max-replicas 4   # autoscaled, 1 to 4

The command starts a local Ray cluster for itself, every listener on 127.0.0.1 and no usage statistics
sent, deploys the pack on it, and stops what it started on SIGINT or SIGTERM. Each replica (``PackServer``)
loads the pack in its constructor and serves ``app.build_app`` of it, so the endpoints and error answers are
those of app.py. For a pack with state, a session lives in the replica that opened it: the deployment
routes with ``session_router.SessionRouter``, which sends every request carrying the session's id in the
``serve_multiplexed_model_id`` header to that replica. A pack of several methods is served by method name
(``POST /predict/METHOD``, in a session ``POST /sessions/ID/predict/METHOD``), as app.py serves it. From your own Ray driver, on a cluster where the
pack's path exists on every node and this folder is on ``PYTHONPATH``:
``serve.run(ray_app.application(ServeOptions(pack="/abs/model.pack"), replicas=2))``.
"""
from __future__ import annotations

import os

if __name__ == "__main__":
    # Ray reads these when it is imported. The cluster this command starts binds 127.0.0.1 only (by default
    # Ray binds the host's routable address, and some of its listeners all interfaces), and sends no usage
    # statistics (on by default).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import argparse
import dataclasses
import signal
import socket
import sys
import threading
import time

import ray
from fastapi import FastAPI
from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

import aotpack
from aotpack_runtime.archive import Archive
from app import ServeOptions, add_pack_arguments, build_app, options_from_args, url
from session_router import SessionRouter

APP_NAME = "aotpack"


@serve.deployment
@serve.ingress()
class PackServer:
    """One replica: loads the pack once, when the replica starts, and serves it through ``build_app``; the
    sessions of a pack with state live here, under ids that name this replica."""

    def __init__(self, opts: ServeOptions):
        _bind_replica_grpc_to_node_address()
        self.opts = opts
        self.pkg = opts.load()

    def __serve_build_asgi_app__(self) -> FastAPI:
        replica = serve.get_replica_context().replica_id.unique_id
        return build_app(self.pkg, **self.opts.app_options(), replica=replica)


def _bind_replica_grpc_to_node_address() -> None:
    """Ray Serve 2.60 starts an internal gRPC server in every replica, after the replica's constructor, on
    all interfaces ("[::]:0", with no option to change it: ray-project/ray#64544). Make it bind this node's
    Ray address instead (127.0.0.1 on the loopback cluster of ``main``), the address other Ray processes
    reach this replica by."""
    from ray.serve._private import replica

    add_port = getattr(replica, "add_port_to_grpc_server", None)
    if add_port is None or getattr(add_port, "binds_node_address", False):
        return
    ip = ray.util.get_node_ip_address()
    host = f"[{ip}]" if ":" in ip else ip

    def add_port_on_node_address(server, address: str) -> int:
        return add_port(server, address.replace("[::]", host, 1))

    add_port_on_node_address.binds_node_address = True
    replica.add_port_to_grpc_server = add_port_on_node_address


def application(opts: ServeOptions, *, replicas: int = 1, max_replicas: int | None = None,
                replica_cpus: float = 1.0) -> Application:
    """The deployment, bound to ``opts``: ``replicas`` replicas, or autoscaled from ``replicas`` up to
    ``max_replicas`` (Ray Serve adds a replica when the ongoing requests per replica stay above 2).

    Each replica reserves ``replica_cpus`` CPUs, and Ray sets its OpenMP threads to that number. A pack with
    state is routed by :class:`SessionRouter` (every request of a session to the replica holding it); one
    without keeps Ray Serve's default routing.
    """
    if max_replicas is not None and max_replicas > replicas:
        options: dict = {"autoscaling_config": {"min_replicas": replicas, "initial_replicas": replicas,
                                                "max_replicas": max_replicas, "target_ongoing_requests": 2}}
    else:
        options = {"num_replicas": replicas}
    if Archive.open(opts.pack).manifest.state:
        options["request_router_config"] = RequestRouterConfig(request_router_class=SessionRouter)
    return PackServer.options(**options, ray_actor_options={"num_cpus": replica_cpus}).bind(opts)


def free_port(host: str) -> int:
    """A port that is free on ``host`` now (Ray Serve's proxy binds it a moment later)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _absolute(path: str | None) -> str | None:
    return None if path is None else os.path.abspath(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Serve one aotpack pack on Ray Serve replicas, on a local Ray "
                                            "cluster this command starts (and stops).")
    add_pack_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address of Ray Serve's HTTP proxy (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port of the proxy; 0 picks a free one (default 8000)")
    p.add_argument("--replicas", type=int, default=2, help="replicas to start with (default 2)")
    p.add_argument("--max-replicas", type=int, default=None,
                   help="autoscale between --replicas and this many replicas (default: a fixed number)")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs each replica reserves (default 1)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local cluster (default: all)")
    args = p.parse_args(argv)
    if args.replicas < 1 or (args.max_replicas is not None and args.max_replicas < args.replicas):
        p.error("--replicas must be at least 1, and --max-replicas at least --replicas")
    opts = options_from_args(p, args)
    # The replicas run in other folders: they get absolute paths.
    opts = dataclasses.replace(opts, pack=os.path.abspath(opts.pack), public_key=_absolute(opts.public_key),
                               signature=_absolute(opts.signature))
    try:  # refuse a pack this host cannot serve (or not the pinned one) before starting a cluster
        stateful = opts.load().stateful
    except aotpack.AotpackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    port = args.port or free_port(args.host)

    start = time.perf_counter()
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False)
    stop = threading.Event()
    try:
        # ray.init installed a SIGTERM handler that exits at once; stop cleanly instead.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: stop.set())
        serve.start(http_options={"host": args.host, "port": port})
        serve.run(application(opts, replicas=args.replicas, max_replicas=args.max_replicas,
                              replica_cpus=args.replica_cpus), name=APP_NAME, route_prefix="/")
        scaling = (f"{args.replicas} to {args.max_replicas} replicas" if args.max_replicas
                   and args.max_replicas > args.replicas else f"{args.replicas} replica(s)")
        sessions = (f"; sessions: at most {opts.max_sessions} open per replica, each closed after "
                    f"{opts.session_idle_s:g} s idle" if stateful else "")
        print(f"serving {args.pack} on {url(args.host, port)} with {scaling} "
              f"(ready in {time.perf_counter() - start:.1f} s{sessions})", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        print("stopping", flush=True)
        serve.shutdown()
        ray.shutdown()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
