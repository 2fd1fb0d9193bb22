"""``aotpack build-many``: every task of a matrix (``matrix.py``), on local worker processes or on Ray.

Each build runs in a process of its own with the threads it was given (``OMP_NUM_THREADS`` and the compile's
process count), and the same code (``_worker``) builds a task locally and on a Ray worker, so a pack built on
Ray is byte-identical to one built here. On Ray that process is ``python -m aotpack.many worker TASK RESULT``;
locally it is forked from one server process that imported torch and the build side once (``Forks``), so
that a task whose pack is in the build cache does not pay Python's start and ``import torch`` again. A failed
build is reported and the others go on.

With Ray, packs come back through the output folder when the workers can see it (a marker file tells), else
through the object store, in chunks pulled one at a time by the driver from the node that built the pack,
so that neither the driver's memory nor the object store ever holds all the packs at once.

May not: build in its own process: each task builds in a process of its own.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

from aotpack_runtime.errors import BuildError

from .matrix import Task, load_matrix

ProgressFn = Callable[[str], None]
CHUNK_BYTES = 64 << 20  # object store transfers: one chunk of a pack per pull
LOG_TAIL = 200  # lines of a task's output kept in its result


@dataclass
class Result:
    """What became of one task."""

    name: str
    status: str = "failed"  # built | cached | failed
    seconds: float = 0.0
    output: str | None = None
    size: int = 0
    sha256: str = ""
    key: str = ""
    source_key: str = ""  # see aotpack.sourcekey
    cache_hit: str = ""  # which key found the pack in the build cache: source (no capture), graph, or "" (none)
    error: str = ""
    log: str = ""
    via: str = "local"  # local | shared storage | object store

    def to_json(self) -> dict:
        return asdict(self)


# --- the worker process ------------------------------------------------------------------------------------

def _worker(task_path: str, result_path: str) -> int:
    """Build one task (JSON at ``task_path``) and write its result (JSON) to ``result_path``."""
    with open(task_path) as f:
        task = json.load(f)
    result = {"name": task["name"], "status": "failed"}
    start = time.perf_counter()
    try:
        import torch

        from aotpack_runtime.errors import AotpackError

        from . import sourcekey
        from .buildcache import BuildCache
        from .modelfile import parse_dynamic
        from .options import BuildOptions
        from .pipeline import build

        torch.set_num_threads(task["threads"])
        try:
            options = BuildOptions(**{k: tuple(v) if isinstance(v, list) else v
                                      for k, v in task["options"].items()}).resolved()
            print(f"loading {task['model']}", flush=True)
            spec, model_file = sourcekey.load(task["model"])
            dynamic = parse_dynamic(task["dynamic"]) if task["dynamic"] else spec.dynamic_shapes
            cache = None if task["no_cache"] else BuildCache.open(task["cache_dir"] or True)
            report = build(spec.model, spec.example_inputs, task["output_path"], example_kwargs=spec.example_kwargs,
                           dynamic_shapes=dynamic, specializations=spec.specializations, options=options,
                           cache_positions=spec.cache_positions,
                           progress=lambda line: print(line, flush=True), cache=cache, source=task["model"],
                           threads=task["threads"], model_file=model_file, methods=spec.methods)
        except AotpackError as e:
            result["error"] = str(e)
            print(f"error: {e}", flush=True)
        else:
            result.update(status="cached" if report.cached else "built", key=report.key, cache_hit=report.hit,
                          source_key=report.source_key, size=report.size,
                          sha256=_file_sha256(task["output_path"]))
    except Exception as e:  # anything else a model file or the toolchain raised: this task fails alone
        import traceback

        traceback.print_exc()
        result["error"] = f"{type(e).__name__}: {e}"
    result["seconds"] = time.perf_counter() - start
    tmp = f"{result_path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, result_path)
    return 0 if result["status"] != "failed" else 1


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _task_json(task: Task, output_path: str, threads: int, cache_dir: str | None, no_cache: bool) -> dict:
    return dict(task.to_json(), output_path=output_path, threads=threads, cache_dir=cache_dir, no_cache=no_cache)


def _tail(text: str) -> str:
    return "\n".join(text.splitlines()[-LOG_TAIL:])


def _worker_env(threads: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")


def run_task_process(task: dict, folder: str) -> dict:
    """Run the worker for ``task`` in a subprocess with ``task['threads']`` threads; return its result with
    the end of its output as ``log``. Used on Ray workers (locally, ``Forks`` runs it)."""
    task_path, result_path = _write_task(task, folder)
    proc = subprocess.run([sys.executable, "-m", "aotpack.many", "worker", task_path, result_path],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                          env=_worker_env(task["threads"]))
    return _collected(task, result_path, proc.stdout.decode(errors="replace"), proc.returncode)


def _write_task(task: dict, folder: str) -> tuple[str, str]:
    task_path = os.path.join(folder, "task.json")
    with open(task_path, "w") as f:
        json.dump(task, f)
    return task_path, os.path.join(folder, "result.json")


def _collected(task: dict, result_path: str, log: str, returncode: int | None) -> dict:
    """The result the worker wrote, or a failure that says how its process ended."""
    try:
        with open(result_path) as f:
            result = json.load(f)
    except (OSError, ValueError):
        lines = [ln for ln in log.splitlines() if ln.strip()]
        how = ("no exit status" if returncode is None else
               f"signal {-returncode}" if returncode < 0 else f"exit {returncode}")
        result = {"name": task["name"], "status": "failed",
                  "error": f"the build process ended ({how}) without a result: {lines[-1] if lines else 'no output'}"}
    result["log"] = _tail(log)
    return result


# --- local worker processes ----------------------------------------------------------------------------------

class Forks:
    """Local worker processes forked from one server process (``python -m aotpack.many forks``) that imported
    torch and aotpack's build side once: each task still builds in a process of its own, as ``worker`` would
    (the same code, environment and thread settings), without paying Python's start and ``import torch``
    again, which is most of the time of a task whose pack is in the build cache."""

    def __init__(self, threads: int):
        self.proc = subprocess.Popen([sys.executable, "-m", "aotpack.many", "forks"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=_worker_env(threads),
                                     text=True, bufsize=1)
        self.lock = threading.Lock()
        self.done: dict[str, tuple[threading.Event, list]] = {}
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            folder, _, code = line.rstrip("\n").rpartition(" ")
            with self.lock:
                event, box = self.done.pop(folder, (None, None))
            if event is not None:
                box.append(int(code))
                event.set()
        with self.lock:  # the server is gone: every task still waiting has no exit status
            for event, _ in self.done.values():
                event.set()
            self.done.clear()

    def run(self, task: dict, folder: str) -> dict:
        """Build ``task`` in a forked process; its result, as ``run_task_process`` returns it."""
        task_path, result_path = _write_task(task, folder)
        event, box = threading.Event(), []
        with self.lock:
            self.done[folder] = (event, box)
            try:
                self.proc.stdin.write(f"{folder}\n")
                self.proc.stdin.flush()
            except OSError:
                event.set()
        event.wait()
        try:
            with open(os.path.join(folder, "log"), errors="replace") as f:
                log = f.read()
        except OSError:
            log = ""
        return _collected(task, result_path, log, box[0] if box else None)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        self.proc.wait()
        self.reader.join(10)


def _forks() -> int:
    """The server of ``Forks``: import the build side, then for each task folder read from stdin fork a
    process that builds it (its output to FOLDER/log), and write ``FOLDER EXIT`` when it ends."""
    import select

    import torch  # noqa: F401  imported once, before any fork

    from . import pipeline, sourcekey  # noqa: F401

    children: dict[int, str] = {}
    pending: list[str] = []
    buffer = b""
    open_input = True
    while open_input or children or pending:
        if open_input and not pending and select.select([0], [], [], 0.05)[0]:
            chunk = os.read(0, 1 << 16)
            open_input = bool(chunk)
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            pending += [ln.decode() for ln in lines if ln]
        elif not pending:
            time.sleep(0.05)
        if pending:
            folder = pending.pop(0)
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    log = os.open(os.path.join(folder, "log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                    null = os.open(os.devnull, os.O_RDONLY)
                    os.dup2(null, 0)
                    os.dup2(log, 1)
                    os.dup2(log, 2)
                    code = _worker(os.path.join(folder, "task.json"), os.path.join(folder, "result.json"))
                finally:
                    with contextlib.suppress(Exception):
                        sys.stdout.flush()
                        sys.stderr.flush()
                    os._exit(code)
            children[pid] = folder
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            print(f"{children.pop(pid)} {os.waitstatus_to_exitcode(status)}", flush=True)
    return 0


class _Board:
    """Counts and prints progress: tasks done, running, cached and failed."""

    def __init__(self, total: int, progress: ProgressFn | None):
        self.total = total
        self.progress = progress
        self.running = 0
        self.done: list[Result] = []

    def started(self, name: str, threads: int, where: str = "") -> None:
        self.running += 1
        self._say(f"      {name}: started ({threads} thread{'s' if threads > 1 else ''}{where})")

    def finished(self, result: Result) -> None:
        self.running -= 1
        self.done.append(result)
        if result.status == "failed":
            what = f"FAILED after {result.seconds:.1f} s: {result.error.splitlines()[0] if result.error else ''}"
        else:
            what = f"{result.status} in {result.seconds:.1f} s ({result.size / 1e6:.2f} MB)"
        self._say(f"[{len(self.done)}/{self.total}] {result.name}: {what}")

    def _say(self, line: str) -> None:
        if not self.progress:
            return
        counts = {s: sum(r.status == s for r in self.done) for s in ("built", "cached", "failed")}
        self.progress(f"{line}  -- done {len(self.done)}/{self.total}, running {self.running}, "
                      f"cached {counts['cached']}, failed {counts['failed']}")


def _write_log(out_dir: pathlib.Path, result: Result) -> None:
    logs = out_dir / "logs"
    logs.mkdir(exist_ok=True)
    (logs / f"{result.name}.log").write_text(result.log + ("\n" if result.log else ""))


def _result(raw: dict, out_dir: pathlib.Path, task: Task, via: str) -> Result:
    r = Result(name=raw["name"], status=raw.get("status", "failed"), seconds=float(raw.get("seconds", 0.0)),
               size=int(raw.get("size", 0)), sha256=raw.get("sha256", ""), key=raw.get("key", ""),
               source_key=raw.get("source_key", ""), cache_hit=raw.get("cache_hit", ""),
               error=raw.get("error", ""), log=raw.get("log", ""), via=via)
    if r.status != "failed":
        r.output = str(out_dir / task.output)
    return r


def run_local(tasks: list[Task], out_dir: pathlib.Path, *, jobs: int, threads: int, cache_dir: str | None,
              no_cache: bool, progress: ProgressFn | None) -> list[Result]:
    """Run the tasks on ``jobs`` local worker processes at a time, ``threads`` threads each."""
    board = _Board(len(tasks), progress)
    results: dict[str, Result] = {}
    pending = list(tasks)
    running: dict = {}
    forks = Forks(threads)
    with tempfile.TemporaryDirectory(prefix="aotpack-many-") as tmp, contextlib.closing(forks):
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            while pending or running:
                while pending and len(running) < jobs:
                    task = pending.pop(0)
                    folder = os.path.join(tmp, task.name)
                    os.mkdir(folder)
                    spec = _task_json(task, str(out_dir / task.output), threads, cache_dir, no_cache)
                    board.started(task.name, threads)
                    running[pool.submit(forks.run, spec, folder)] = task
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in finished:
                    task = running.pop(future)
                    result = _result(future.result(), out_dir, task, "local")
                    _write_log(out_dir, result)
                    results[task.name] = result
                    board.finished(result)
    return [results[t.name] for t in tasks]


# --- Ray ------------------------------------------------------------------------------------------------------

def _ray_build(task: dict, marker: str, token: str) -> dict:
    """A Ray task: build in a subprocess on this node. The pack goes straight into the output folder when
    this node sees the driver's marker file there; otherwise it stays in a temporary folder on this node
    and the driver pulls it (``_ray_read``), then removes it (``_ray_remove``)."""
    import ray

    shared = False
    with contextlib.suppress(OSError):
        with open(marker) as f:
            shared = f.read() == token
    folder = tempfile.mkdtemp(prefix="aotpack-many-")
    if not shared:
        task = dict(task, output_path=os.path.join(folder, os.path.basename(task["output_path"])))
    result = run_task_process(task, folder)
    result["via"] = "shared storage" if shared else "object store"
    if shared or result.get("status") == "failed":
        shutil.rmtree(folder, ignore_errors=True)
    else:
        result["remote_path"] = task["output_path"]
        result["remote_folder"] = folder
        result["node"] = ray.get_runtime_context().get_node_id()
    return result


def _ray_read(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def _ray_remove(folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def _pull(ray, raw: dict, target: pathlib.Path, chunk_bytes: int) -> None:
    """Copy a pack from the node that built it into ``target``, one chunk in memory at a time, and check
    its sha256."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    on_node = NodeAffinitySchedulingStrategy(node_id=raw["node"], soft=False)
    read = ray.remote(num_cpus=0)(_ray_read).options(scheduling_strategy=on_node)
    tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            for offset in range(0, raw["size"], chunk_bytes):
                chunk = ray.get(read.remote(raw["remote_path"], offset, chunk_bytes))
                h.update(chunk)
                f.write(chunk)
                del chunk
        if h.hexdigest() != raw["sha256"]:
            raise BuildError(f"{raw['name']}: the pack fetched from its build node has sha256 {h.hexdigest()[:16]}…, "
                             f"the build reported {raw['sha256'][:16]}…")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
        ray.get(ray.remote(num_cpus=0)(_ray_remove).options(scheduling_strategy=on_node).remote(raw["remote_folder"]))


@contextlib.contextmanager
def ray_cluster(address: str | None, cpus: int, progress: ProgressFn | None) -> Iterator[object]:
    """Ray, connected to the cluster at ``address``, or to a new local one (every listener on 127.0.0.1,
    its files in a private temporary folder) that is stopped, with all its processes, on the way out."""
    if address is None:
        # Read by Ray at import: with it off, Ray binds every listener to 127.0.0.1, never the host's address.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        import ray
    except ImportError:
        raise BuildError("--ray needs Ray, which is not installed: pip install 'aotpack[ray]'") from None
    temp = None
    try:
        if address is None:
            from ray._private import ray_constants

            if ray_constants.ENABLE_RAY_CLUSTER:
                raise BuildError("Ray was imported before build-many could keep its local cluster on 127.0.0.1; "
                                 "set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before importing Ray")
            temp = tempfile.mkdtemp(prefix="aotpack-ray-", dir="/tmp")  # Ray's socket paths must stay short
            if progress:
                progress(f"starting a local Ray cluster ({cpus} CPUs, listeners on 127.0.0.1)")
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, _temp_dir=temp,
                     logging_level="WARNING", log_to_driver=False, configure_logging=False)
        else:
            if progress:
                progress(f"connecting to the Ray cluster at {address}")
            ray.init(address=address, logging_level="WARNING", log_to_driver=False, configure_logging=False)
        yield ray
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


def run_ray(tasks: list[Task], out_dir: pathlib.Path, *, address: str | None, jobs: int | None, threads: int,
            cache_dir: str | None, no_cache: bool, progress: ProgressFn | None, cpus: int,
            chunk_bytes: int = CHUNK_BYTES, shared: bool | None = None) -> list[Result]:
    """Run the tasks as Ray tasks of ``threads`` CPUs each (at most ``jobs`` at once, if given).
    ``shared=False`` sends every pack through the object store even where workers see the output folder."""
    board = _Board(len(tasks), progress)
    results: dict[str, Result] = {}
    token = secrets.token_hex(16)
    marker = out_dir / f".aotpack-many-{token[:12]}"
    marker.write_text(token if shared is not False else "")
    try:
        with ray_cluster(address, cpus, progress) as ray:
            build = ray.remote(_ray_build).options(num_cpus=threads, max_retries=0)
            pending = list(tasks)
            running: dict = {}
            while pending or running:
                while pending and (jobs is None or len(running) < jobs):
                    task = pending.pop(0)
                    spec = _task_json(task, str(out_dir / task.output), threads, cache_dir, no_cache)
                    running[build.remote(spec, str(marker), token)] = task
                    board.started(task.name, threads, ", Ray task")
                ready, _ = ray.wait(list(running), num_returns=1)
                for ref in ready:
                    task = running.pop(ref)
                    try:
                        raw = ray.get(ref)
                    except Exception as e:  # the worker or its node died
                        raw = {"name": task.name, "status": "failed", "error": f"the Ray task failed: {e}"}
                    result = _result(raw, out_dir, task, raw.get("via", "Ray"))
                    if result.status != "failed" and raw.get("node"):
                        try:
                            _pull(ray, raw, out_dir / task.output, chunk_bytes)
                        except Exception as e:
                            result.status, result.output = "failed", None
                            result.error = f"fetching the pack from its build node failed: {e}"
                    _write_log(out_dir, result)
                    results[task.name] = result
                    board.finished(result)
    finally:
        marker.unlink(missing_ok=True)
    return [results[t.name] for t in tasks]


# --- the command -------------------------------------------------------------------------------------------

def build_many(matrix_path: str | os.PathLike, out_dir: str | os.PathLike, *, ray: bool = False,
               address: str | None = None, jobs: int | None = None, threads: int | None = None,
               cache_dir: str | None = None, no_cache: bool = False,
               progress: ProgressFn | None = None, **ray_options) -> list[Result]:
    """Build every task of the matrix into ``out_dir``; return one :class:`Result` per task, in matrix order.

    Locally (the default), ``jobs`` builds run at once (default: half the cores this process may use, at
    least one) with ``threads`` threads each (default: the cores divided among the jobs). With ``ray``, on a
    new local Ray cluster, or on the one at ``address``; each task asks Ray for ``threads`` CPUs (default 2).
    ``cache_dir`` is the build cache the workers use (default: theirs, ``$AOTPACK_BUILD_CACHE`` or
    ``~/.cache/aotpack/build``); ``no_cache`` compiles everything.
    """
    matrix = load_matrix(matrix_path)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = list(matrix.tasks)
    cores = len(os.sched_getaffinity(0))
    if jobs is not None and jobs < 1 or threads is not None and threads < 1:
        raise BuildError("--jobs and --threads must be at least 1")
    if cache_dir is not None:
        cache_dir = os.path.abspath(cache_dir)
    if progress:
        progress(f"{len(tasks)} task{'s' if len(tasks) != 1 else ''}: {len(matrix.models)} model"
                 f"{'s' if len(matrix.models) != 1 else ''} x {len(matrix.targets)} target"
                 f"{'s' if len(matrix.targets) != 1 else ''}, into {out}")
    if ray or address:
        threads = threads or 2
        return run_ray(tasks, out, address=address, jobs=jobs, threads=threads, cache_dir=cache_dir,
                       no_cache=no_cache, progress=progress, cpus=ray_options.pop("cpus", max(cores, threads)),
                       **ray_options)
    jobs = jobs or max(1, cores // 2)
    threads = threads or max(1, cores // jobs)
    return run_local(tasks, out, jobs=jobs, threads=threads, cache_dir=cache_dir, no_cache=no_cache,
                     progress=progress)


def summary_table(results: list[Result], seconds: float) -> str:
    """The results as a table, and a closing count."""
    rows = [("task", "result", "seconds", "MB", "pack or error")]
    for r in results:
        if r.status == "failed":
            first = r.error.splitlines()[0] if r.error else "no message"
            last = f"{first} (log: logs/{r.name}.log)"
        else:
            last = r.output or ""
        rows.append((r.name, r.status, f"{r.seconds:.1f}", f"{r.size / 1e6:.2f}" if r.size else "-", last))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join([row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].rjust(widths[2]),
                        row[3].rjust(widths[3]), row[4]]).rstrip() for row in rows]
    counts = {s: sum(r.status == s for r in results) for s in ("built", "cached", "failed")}
    lines.append(f"{len(results)} task{'s' if len(results) != 1 else ''}: {counts['built']} built, "
                 f"{counts['cached']} cached, {counts['failed']} failed, in {seconds:.1f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] == ["forks"]:
        sys.exit(_forks())
    if len(sys.argv) != 4 or sys.argv[1] != "worker":
        sys.exit("usage: python -m aotpack.many worker TASK.json RESULT.json | python -m aotpack.many forks")
    sys.exit(_worker(sys.argv[2], sys.argv[3]))
