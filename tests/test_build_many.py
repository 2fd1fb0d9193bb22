"""aotpack build-many: the matrix file, local worker processes, the build cache across runs, and Ray (a local
cluster whose listeners are all on loopback, stopped with every process it started)."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from aotpack.matrix import MatrixError, load_matrix
from aotpack_cli.main import cli
from aotpack_runtime.errors import BuildError
from conftest import ROOT
from helpers import assert_facts
from serve_client import bound_sockets, descendants, is_loopback, start_time

DATA = ROOT / "tests" / "data" / "many"
GOOD = ("tiny_a.avx2", "tiny_a.avx2-t4", "tiny_b-make.avx2", "tiny_b-make.avx2-t4")
BROKEN = ("broken.avx2", "broken.avx2-t4")

MATRIX = f"""
[[model]]
file = "{DATA / 'tiny_a.py'}"
[[model]]
file = "{DATA / 'broken.py'}"
[[model]]
file = "{DATA / 'tiny_b.py'}:make"

[[target]]
name = "avx2"
cpu_isa = "avx2"
[[target]]
cpu_isa = "avx2"
cpu_threads = 4
"""


def _matrix(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    path = tmp_path / "m.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,message", [
    ('[[model]]\nfile = "nothere.py"\n', "m.toml: [[model]] 1: model file {tmp}/nothere.py does not exist "
                                         "(paths are relative to the matrix file)"),
    (f'[[model]]\nfile = "{DATA / "tiny_a.py"}"\n[[target]]\nisa = "avx2"\n',
     "m.toml: [[target]] 1 has unknown key 'isa'; its keys are name, cpu_isa, devices, cuda_archs, without_gpu, "
     "cpu_threads, onednn_convs, dynamic"),
    (f'[[model]]\nfile = "{DATA / "tiny_a.py"}"\n[[target]]\ncpu_isa = "sse9"\n',
     "m.toml: [[target]] 1: cpu_isa 'sse9' is not one of x86-64, avx2, avx512, native"),
    (f'[[model]]\nfile = "{DATA / "tiny_a.py"}"\ndynamic = ["x0=1..4"]\n',
     "m.toml: [[model]] 1: dynamic 'x0=1..4' is not INPUT:DIM=MIN..MAX or INPUT:DIM=NAME:MIN..MAX (e.g. x:0=1..64; "
     "x:0=2.. for no upper bound)"),
    (f'[[model]]\nfile = "{DATA / "tiny_a.py"}"\n[[model]]\nfile = "{DATA / "tiny_a.py"}"\n',
     "m.toml: two models are named 'tiny_a'; give each a distinct name = \"...\""),
    ('[[target]]\ncpu_isa = "avx2"\n', "m.toml: no models: add a [[model]] table with file = \"FILE.py\""),
    (f'models = 3\n[[model]]\nfile = "{DATA / "tiny_a.py"}"\n',
     "m.toml: unknown top-level key 'models'; a matrix has [[model]] and [[target]] tables"),
    ('[[model]\n', "m.toml: not valid TOML: "),
])
def test_matrix_errors_say_where_and_what(tmp_path, text, message):
    with pytest.raises(BuildError) as e:
        load_matrix(_matrix(tmp_path, text))
    assert str(e.value).startswith(f"{tmp_path}/" + message.format(tmp=tmp_path))


def test_every_mistake_in_a_matrix_is_reported_in_one_run(tmp_path):
    text = (f'top = 1\n[[model]]\nfile = "nothere.py"\ndynamic = ["x0=1..4"]\n'
            f'[[model]]\nfile = "{DATA / "tiny_a.py"}"\nname = "a b"\n[[model]]\nfile = "{DATA / "tiny_a.py"}"\n[[model]]\nfile = "{DATA / "tiny_a.py"}"\n'
            '[[target]]\ncpu_isa = "sse9"\ncpu_threads = 0\ndevices = ["tpu"]\n[[target]]\nisa = "avx2"\n')
    with pytest.raises(MatrixError) as e:
        load_matrix(_matrix(tmp_path, text))
    assert e.value.problems == [
        "unknown top-level key 'top'; a matrix has [[model]] and [[target]] tables",
        f"[[model]] 1: model file {tmp_path}/nothere.py does not exist (paths are relative to the matrix file)",
        "[[model]] 1: dynamic 'x0=1..4' is not INPUT:DIM=MIN..MAX or INPUT:DIM=NAME:MIN..MAX (e.g. x:0=1..64; x:0=2.. "
        "for no upper bound)",
        "[[model]] 2: name 'a b' must be letters, digits, '-' and '_' (it names the pack file)",
        "[[target]] 1: cpu_isa 'sse9' is not one of x86-64, avx2, avx512, native",
        "[[target]] 1: devices ['tpu'] must name cpu and/or cuda",
        "[[target]] 1: cpu_threads must be an integer from 1 to 1024, got 0",
        "[[target]] 2 has unknown key 'isa'; its keys are name, cpu_isa, devices, cuda_archs, without_gpu, "
        "cpu_threads, onednn_convs, dynamic",
        "two models are named 'tiny_a'; give each a distinct name = \"...\"",
    ]
    assert str(e.value).startswith(f"{tmp_path}/m.toml: 9 mistakes, fix each and run again:\n  - unknown top-level")
    code, _, err = _run(_matrix(tmp_path, text), "-o", tmp_path / "out")
    assert code == 1 and err.count("\n  - ") == 9


def test_matrix_tasks_and_names(tmp_path):
    m = load_matrix(_matrix(tmp_path, MATRIX))
    assert [t.name for t in m.tasks] == ["tiny_a.avx2", "tiny_a.avx2-t4", "broken.avx2", "broken.avx2-t4",
                                         "tiny_b-make.avx2", "tiny_b-make.avx2-t4"]
    assert m.tasks[1].to_json()["options"] == {"cpu_isa": "avx2", "devices": ["cpu"], "cuda_archs": [],
                                               "without_gpu": False, "cpu_threads": 4, "onednn_convs": True}
    assert load_matrix(ROOT / "examples" / "matrix.toml").tasks  # the shipped example parses
    aten = load_matrix(_matrix(tmp_path, MATRIX.replace("cpu_threads = 4", "onednn_convs = false")))
    assert [t.name for t in aten.tasks][:2] == ["tiny_a.avx2", "tiny_a.avx2-aten-convs"]
    assert aten.tasks[1].to_json()["options"]["onednn_convs"] is False
    from aotpack import front

    assert front.options(**aten.tasks[1].to_json()["options"]).onednn_convs is False  # what a task builds with
    with pytest.raises(MatrixError) as e:
        load_matrix(_matrix(tmp_path, MATRIX.replace("cpu_threads = 4", 'onednn_convs = "no"')))
    assert e.value.problems == ["[[target]] 2: onednn_convs must be true or false, got 'no'"]


def _run(*args) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, ["build-many", *map(str, args)])
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The matrix built on local worker processes (2 at once, 1 thread each), then again from the cache."""
    tmp = tmp_path_factory.mktemp("many")
    matrix = _matrix(tmp, MATRIX)
    cache = tmp / "cache"
    first = _run(matrix, "-o", tmp / "out", "--jobs", "2", "--threads", "1", "--cache-dir", cache)
    second = _run(matrix, "-o", tmp / "again", "--jobs", "2", "--threads", "1", "--cache-dir", cache, "--json")
    return tmp, matrix, first, second


def test_build_many_locally_reports_the_failure_and_lands_the_rest(local_run):
    tmp, _, (code, out, err), _ = local_run
    assert code == 1
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:-1]}
    assert out.splitlines()[-1].startswith("6 tasks: 4 built, 0 cached, 2 failed, in ")
    for name in GOOD:
        assert rows[name][1] == "built" and rows[name][-1] == str(tmp / "out" / f"{name}.pack")
    for name in BROKEN:
        assert rows[name][1] == "failed"
        assert f"{DATA / 'broken.py'}:6: graph break: Data-dependent branching" in out
        assert f"(log: logs/{name}.log)" in out
        assert "graph break" in (tmp / "out" / "logs" / f"{name}.log").read_text()
    packs = sorted(p.name for p in (tmp / "out").glob("*.pack"))
    assert packs == sorted(f"{n}.pack" for n in GOOD)
    assert "running 2" in err and "[6/6]" in err and "failed 2" in err
    # tasks given other threads plans are other packs; the same plan is the same pack whichever task built it
    assert (tmp / "out" / "tiny_a.avx2.pack").read_bytes() != (tmp / "out" / "tiny_a.avx2-t4.pack").read_bytes()


def test_second_run_comes_from_the_cache_byte_for_byte(local_run):
    tmp, _, _, (code, out, _) = local_run
    assert code == 1
    result = json.loads(out)
    status = {t["name"]: t["status"] for t in result["tasks"]}
    assert status == {**{n: "cached" for n in GOOD}, **{n: "failed" for n in BROKEN}}
    # found by the source key: no task captured its model
    assert {t["name"]: t["cache_hit"] for t in result["tasks"] if t["name"] in GOOD} == dict.fromkeys(GOOD, "source")
    for name in GOOD:
        assert "capture:" not in (tmp / "again" / "logs" / f"{name}.log").read_text()
    for name in GOOD:
        assert (tmp / "again" / f"{name}.pack").read_bytes() == (tmp / "out" / f"{name}.pack").read_bytes()


def test_a_cache_hit_rebuilt_without_the_cache_is_the_same_pack(local_run, tmp_path):
    """A key that missed an input would let a changed build be served from the cache: rebuilding one task
    with --no-cache must give the cached bytes."""
    tmp, matrix, _, _ = local_run
    only = _matrix(tmp_path, MATRIX.split("[[model]]\nfile = \"" + str(DATA / "broken.py"))[0]
                   + "[[target]]\nname = \"avx2\"\ncpu_isa = \"avx2\"\n")
    code, out, _ = _run(only, "-o", tmp_path / "fresh", "--no-cache", "--jobs", "1", "--threads", "2")
    assert code == 0, out
    assert (tmp_path / "fresh" / "tiny_a.avx2.pack").read_bytes() == (tmp / "out" / "tiny_a.avx2.pack").read_bytes()


def test_a_weight_change_reuses_the_object_files_and_gives_the_same_bytes(local_run, tmp_path):
    """A retrained model (new weights, same graph) misses the pack cache but keeps its generated code: its
    object files come from the cache (no new ones are stored), and the pack equals a build that compiled
    everything."""
    import torch

    import aotpack
    from aotpack.buildcache import BuildCache
    from aotpack.modelfile import load_model_file

    tmp, _, _, _ = local_run
    objects = BuildCache(tmp / "cache").objects()
    before = {e.key: e.last_used for e in objects.entries()}
    assert before  # the runs above stored the wrapper's and the kernels' objects
    spec = load_model_file(str(DATA / "tiny_a.py"))
    with torch.no_grad():
        spec.model[0].weight.mul_(-1)
    lines: list[str] = []
    reused = aotpack.build(spec.model, spec.example_inputs, tmp_path / "reused.pack", cache=tmp / "cache",
                           progress=lines.append)
    assert any(line.strip().startswith("build cache: miss") for line in lines)
    after = {e.key: e.last_used for e in objects.entries()}
    assert set(after) == set(before), "the new weights changed the generated code"
    assert any(after[k] > before[k] for k in before)  # used again
    fresh = aotpack.build(spec.model, spec.example_inputs, tmp_path / "fresh.pack", cache=False)
    assert reused.read_bytes() == fresh.read_bytes()
    assert reused.read_bytes() != (tmp / "out" / "tiny_a.avx2.pack").read_bytes()


def test_ray_without_ray_installed_says_how_to_install_it(tmp_path):
    code = ("import sys; sys.modules['ray'] = None\n"
            "from aotpack_cli.main import main\n"
            f"sys.argv = ['aotpack', 'build-many', {str(_matrix(tmp_path, MATRIX))!r}, '-o', {str(tmp_path / 'o')!r}, "
            "'--ray']\nmain()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    assert_facts(last, "--ray", "Ray", "not installed", "pip install 'aotpack[ray]'")


# --- Ray ------------------------------------------------------------------------------------------------------

@pytest.mark.ray
def test_build_many_on_a_local_ray_cluster(local_run, tmp_path):
    """--ray starts a local cluster: every listener of every process it starts is on loopback, the packs
    (compiled on Ray workers, with an empty cache) equal the local builds byte for byte, the failure is
    reported, and when the command ends no process it started is left."""
    pytest.importorskip("ray")
    tmp, _, _, _ = local_run
    # two of the local run's tasks (one model that builds, one that fails; one target): a Ray cluster's start
    # is what this test is about, not many compiles
    matrix = _matrix(tmp_path, MATRIX.split(f"[[model]]\nfile = \"{DATA / 'tiny_b.py'}")[0]
                     + "[[target]]\nname = \"avx2\"\ncpu_isa = \"avx2\"\n")
    out = tmp_path / "ray"
    cmd = [sys.executable, "-m", "aotpack", "build-many", str(matrix), "-o", str(out), "--threads", "1",
           "--cache-dir", str(tmp_path / "empty-cache"), "--ray"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    seen: dict[int, int] = {}  # pid -> start time: every process the run started
    listeners: dict[str, str] = {}  # "pid name" -> address
    try:
        while proc.poll() is None:
            pids = descendants(proc.pid)
            pids.pop(proc.pid, None)
            seen.update(pids)
            for pid in pids:
                for protocol, address, port in bound_sockets(pid):
                    if protocol.startswith("tcp"):
                        try:
                            name = open(f"/proc/{pid}/comm").read().strip()
                        except OSError:
                            name = "?"
                        listeners[f"{pid} {name} {port}"] = address
            time.sleep(0.5)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, stderr[-3000:]
    names = {k.split()[1] for k in listeners}
    assert {"gcs_server", "raylet"} <= names, listeners  # the cluster was up while we looked
    assert all(is_loopback(a) for a in listeners.values()), listeners
    assert "listeners on 127.0.0.1" in stderr
    rows = {line.split()[0]: line.split() for line in stdout.splitlines()[1:-1]}
    assert stdout.splitlines()[-1].startswith("2 tasks: 1 built, 0 cached, 1 failed")
    assert rows["tiny_a.avx2"][1] == "built"
    assert (out / "tiny_a.avx2.pack").read_bytes() == (tmp / "out" / "tiny_a.avx2.pack").read_bytes()
    assert rows["broken.avx2"][1] == "failed" and "graph break" in (out / "logs" / "broken.avx2.log").read_text()
    def left() -> list[int]:
        return [p for p, start in seen.items() if start_time(p) == start]

    deadline = time.monotonic() + 20
    while left() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left(), "processes left behind by the Ray run"
    assert not [p for p in out.iterdir() if p.name.startswith(".aotpack-many-")]  # the marker file is gone


def test_a_worker_process_that_dies_fails_its_task_alone(tmp_path):
    """Local tasks run in processes forked from one server: one killed by a signal is reported as such, and
    the server goes on with the others."""
    (tmp_path / "dies.py").write_text("import os\nimport signal\n\nos.kill(os.getpid(), signal.SIGKILL)\n")
    matrix = _matrix(tmp_path, f'[[model]]\nfile = "{tmp_path / "dies.py"}"\n[[model]]\nfile = "{DATA / "broken.py"}"\n'
                               '[[target]]\nname = "avx2"\ncpu_isa = "avx2"\n')
    code, out, _ = _run(matrix, "-o", tmp_path / "out", "--jobs", "2", "--threads", "1", "--json")
    assert code == 1
    errors = {t["name"]: t["error"] for t in json.loads(out)["tasks"]}
    assert_facts(errors["dies.avx2"], "ended (signal 9)", "without a result", f"loading {tmp_path / 'dies.py'}")
    assert "graph break" in errors["broken.avx2"]
