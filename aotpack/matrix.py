"""The matrix file of ``aotpack build-many``: models times targets, one build task per pair.

```toml
[[model]]
file = "mlp.py"                      # FILE.py or FILE.py:NAME, relative to this file
[[model]]
file = "multi_io.py:make"
name = "scorer"                      # optional; default: the file's stem (and -NAME)
dynamic = ["tokens:0=batch:1..8"]    # optional, as --dynamic

[[target]]
name = "avx2"                        # optional; default: made from the values below
cpu_isa = "avx2"                     # as --cpu-isa; also devices, cuda_archs, without_gpu, cpu_threads,
                                     # onednn_convs, dynamic (added to each model's)
```

Task ``MODEL.TARGET`` writes ``MODEL.TARGET.pack``: the name depends only on the matrix, never on the order
or the host. The file is checked whole before any build starts, and every mistake in it is reported in one
error; what only a build host can tell (does it have AVX-512, a CUDA toolkit) fails that task alone.

May not: build anything: it reads and checks the matrix file.
"""
from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from typing import Iterator

from aotpack_runtime.errors import BuildError

from .modelfile import check_dynamic
from .options import CPU_ISAS, DEFAULT_CPU_THREADS, DEVICES, MAX_CPU_THREADS

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
MODEL_KEYS = ("file", "name", "dynamic")
TARGET_KEYS = ("name", "cpu_isa", "devices", "cuda_archs", "without_gpu", "cpu_threads", "onednn_convs", "dynamic")


@dataclass(frozen=True)
class Model:
    name: str
    target: str  # FILE.py[:NAME] with an absolute path
    dynamic: tuple[str, ...] = ()


@dataclass(frozen=True)
class Target:
    name: str
    cpu_isa: str | None = None
    devices: tuple[str, ...] = ("cpu",)
    cuda_archs: tuple[int, ...] = ()
    without_gpu: bool = False
    cpu_threads: int = DEFAULT_CPU_THREADS
    dynamic: tuple[str, ...] = ()
    onednn_convs: bool = True


@dataclass(frozen=True)
class Task:
    """One build: a model for a target, written to ``output``."""

    model: Model
    target: Target

    @property
    def name(self) -> str:
        return f"{self.model.name}.{self.target.name}"

    @property
    def output(self) -> str:
        return f"{self.name}.pack"

    def to_json(self) -> dict:
        t = self.target
        return {"name": self.name, "model": self.model.target, "output": self.output,
                "dynamic": list(self.model.dynamic + t.dynamic),
                "options": {"cpu_isa": t.cpu_isa, "devices": list(t.devices), "cuda_archs": list(t.cuda_archs),
                            "without_gpu": t.without_gpu, "cpu_threads": t.cpu_threads,
                            "onednn_convs": t.onednn_convs}}


@dataclass(frozen=True)
class Matrix:
    path: str
    models: tuple[Model, ...]
    targets: tuple[Target, ...]
    tasks: tuple[Task, ...] = field(default=())


class MatrixError(BuildError):
    """Every mistake found in a matrix file, in one error: ``path`` and ``problems`` (each says where in the
    file, ``[[target]] 2: ...``, and what is wrong)."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = list(problems)
        if len(self.problems) == 1:
            text = f"{path}: {self.problems[0]}"
        else:
            text = f"{path}: {len(self.problems)} mistakes, fix each and run again:\n" + \
                "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(text)


class _Problem(Exception):
    """One mistake in a table's value (where and what), collected by ``_Problems``."""


class _Problems:
    """Collects every mistake of a matrix file so that one run reports them all."""

    def __init__(self):
        self.found: list[str] = []

    @contextlib.contextmanager
    def collect(self) -> Iterator[None]:
        try:
            yield
        except _Problem as e:
            self.found.append(str(e))


def _load_toml(path: str) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise BuildError(f"matrix file {path} does not exist") from None
    except OSError as e:
        raise BuildError(f"cannot read the matrix file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise MatrixError(path, [f"not valid TOML: {e}"]) from None


def _check_keys(item: object, allowed: tuple[str, ...], where: str) -> dict:
    if not isinstance(item, dict):
        raise _Problem(f"{where} is a {type(item).__name__}, expected a table")
    unknown = sorted(set(item) - set(allowed))
    if unknown:
        raise _Problem(f"{where} has unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                       f"its keys are {', '.join(allowed)}")
    return item


def _table(item: object, allowed: tuple[str, ...], where: str, problems: _Problems) -> dict | None:
    """``item`` as a table whose unknown keys are noted in ``problems``; None where it is not a table."""
    with problems.collect():
        _check_keys(item, allowed, where)
    return item if isinstance(item, dict) else None


def _strings(value: object, where: str, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Problem(f"{where}: {key} must be a string or a list of strings, got {value!r}")
    return tuple(value)


def _dynamic(value: object, where: str, problems: _Problems) -> tuple[str, ...]:
    specs: tuple[str, ...] = ()
    with problems.collect():
        specs = _strings(value, where, "dynamic")
    for spec in specs:
        problem = check_dynamic(spec)
        if problem:
            problems.found.append(f"{where}: dynamic {problem}")
    return specs


def _name(value: object, where: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise _Problem(f"{where}: name {value!r} must be letters, digits, '-' and '_' (it names the pack file)")
    return value


def _model(item: object, i: int, folder: str, problems: _Problems) -> Model | None:
    where = f"[[model]] {i + 1}"
    item = _table(item, MODEL_KEYS, where, problems)
    if item is None:
        return None
    count = len(problems.found)
    file, func, full = "", "", ""
    if "file" not in item or not isinstance(item["file"], str) or not item["file"]:
        problems.found.append(f"{where} needs file = \"FILE.py\" or \"FILE.py:NAME\" (relative to the matrix file)")
    else:
        file, _, func = item["file"].partition(":")
        full = os.path.normpath(os.path.join(folder, file))
        if not os.path.isfile(full):
            problems.found.append(f"{where}: model file {full} does not exist (paths are relative to the matrix file)")
    stem = os.path.splitext(os.path.basename(file))[0]
    default = f"{stem}-{func}" if func else stem
    name = ""
    with problems.collect():
        name = _name(item.get("name", default.replace(".", "-") or "model"), where)
    dynamic = _dynamic(item.get("dynamic", []), where, problems)
    if len(problems.found) > count:
        return None
    return Model(name=name, target=f"{full}:{func}" if func else full, dynamic=dynamic)


def _target(item: object, i: int, problems: _Problems) -> Target | None:
    where = f"[[target]] {i + 1}"
    item = _table(item, TARGET_KEYS, where, problems)
    if item is None:
        return None
    count = len(problems.found)
    isa = item.get("cpu_isa")
    if isa is not None and isa not in CPU_ISAS:
        problems.found.append(f"{where}: cpu_isa {isa!r} is not one of {', '.join(CPU_ISAS)}")
    devices: tuple[str, ...] = ("cpu",)
    with problems.collect():
        devices = _strings(item.get("devices", ["cpu"]), where, "devices")
        if not devices or any(d not in DEVICES for d in devices):
            raise _Problem(f"{where}: devices {list(devices)} must name {' and/or '.join(DEVICES)}")
    archs = item.get("cuda_archs", [])
    if isinstance(archs, (int, str)):
        archs = [archs]
    if not isinstance(archs, list):
        problems.found.append(f"{where}: cuda_archs must be a list such as [80, 90], got {archs!r}")
        archs = []
    elif archs:
        from .cudabuild import parse_archs

        try:
            archs = parse_archs([str(a) for a in archs])
        except BuildError as e:
            problems.found.append(f"{where}: {e}")
    without_gpu = item.get("without_gpu", False)
    if not isinstance(without_gpu, bool):
        problems.found.append(f"{where}: without_gpu must be true or false, got {without_gpu!r}")
    onednn = item.get("onednn_convs", True)
    if not isinstance(onednn, bool):
        problems.found.append(f"{where}: onednn_convs must be true or false, got {onednn!r}")
    threads = item.get("cpu_threads", DEFAULT_CPU_THREADS)
    if type(threads) is not int or not 1 <= threads <= MAX_CPU_THREADS:
        problems.found.append(f"{where}: cpu_threads must be an integer from 1 to {MAX_CPU_THREADS}, got {threads!r}")
    name = ""
    if "name" in item:
        with problems.collect():
            name = _name(item["name"], where)
    dynamic = _dynamic(item.get("dynamic", []), where, problems)
    if len(problems.found) > count:
        return None
    if not name:
        parts = [isa or "default"]
        if "cuda" in devices:
            parts.append("cuda" + "-".join(str(a) for a in archs))
            if "cpu" not in devices:
                parts.pop(0)
        if threads != DEFAULT_CPU_THREADS:
            parts.append(f"t{threads}")
        if not onednn:
            parts.append("aten-convs")
        name = "-".join(parts)
    return Target(name=name, cpu_isa=isa, devices=devices, cuda_archs=tuple(archs), without_gpu=without_gpu,
                  cpu_threads=threads, dynamic=dynamic, onednn_convs=onednn)


def _unique(names: list[str], kind: str, problems: _Problems) -> None:
    seen = set()
    for n in names:
        if n in seen:
            problems.found.append(f"two {kind}s are named {n!r}; give each a distinct name = \"...\"")
        seen.add(n)


def load_matrix(path: str | os.PathLike) -> Matrix:
    """Read and check a matrix file; every (model, target) pair becomes a task, models first. Every mistake in
    the file is reported at once, in one :class:`MatrixError`."""
    path = os.fspath(path)
    data = _load_toml(path)
    problems = _Problems()
    unknown = sorted(set(data) - {"model", "target"})
    if unknown:
        problems.found.append(f"unknown top-level key{'s' if len(unknown) > 1 else ''} "
                              f"{', '.join(map(repr, unknown))}; a matrix has [[model]] and [[target]] tables")
    folder = os.path.dirname(os.path.abspath(path))
    models_raw = data.get("model", [])
    targets_raw = data.get("target", [{}])
    if not isinstance(models_raw, list) or not models_raw:
        problems.found.append("no models: add a [[model]] table with file = \"FILE.py\"")
        models_raw = []
    if not isinstance(targets_raw, list) or not targets_raw:
        problems.found.append("[[target]] must be a list of tables (or left out for the default target)")
        targets_raw = []
    models = [_model(m, i, folder, problems) for i, m in enumerate(models_raw)]
    targets = [_target(t, i, problems) for i, t in enumerate(targets_raw)]
    _unique([m.name for m in models if m is not None], "model", problems)
    _unique([t.name for t in targets if t is not None], "target", problems)
    if problems.found:
        raise MatrixError(path, problems.found)
    tasks = tuple(Task(m, t) for m in models for t in targets)
    return Matrix(path=path, models=tuple(models), targets=tuple(targets), tasks=tasks)
