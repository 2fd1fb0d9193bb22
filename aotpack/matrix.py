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
                                     # dynamic (added to each model's)
```

Task ``MODEL.TARGET`` writes ``MODEL.TARGET.pack``: the name depends only on the matrix, never on the order
or the host. The file is checked whole before any build starts; what only a build host can tell (does it
have AVX-512, a CUDA toolkit) fails that task alone.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from aotpack_runtime.errors import BuildError

from .modelfile import check_dynamic
from .options import CPU_ISAS, DEFAULT_CPU_THREADS, DEVICES, MAX_CPU_THREADS

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
MODEL_KEYS = ("file", "name", "dynamic")
TARGET_KEYS = ("name", "cpu_isa", "devices", "cuda_archs", "without_gpu", "cpu_threads", "dynamic")


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
                            "without_gpu": t.without_gpu, "cpu_threads": t.cpu_threads}}


@dataclass(frozen=True)
class Matrix:
    path: str
    models: tuple[Model, ...]
    targets: tuple[Target, ...]
    tasks: tuple[Task, ...] = field(default=())


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
        raise BuildError(f"{path}: not valid TOML: {e}") from None


def _check_keys(item: object, allowed: tuple[str, ...], where: str) -> dict:
    if not isinstance(item, dict):
        raise BuildError(f"{where} is a {type(item).__name__}, expected a table")
    unknown = sorted(set(item) - set(allowed))
    if unknown:
        raise BuildError(f"{where} has unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                         f"its keys are {', '.join(allowed)}")
    return item


def _strings(value: object, where: str, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BuildError(f"{where}: {key} must be a string or a list of strings, got {value!r}")
    return tuple(value)


def _dynamic(value: object, where: str) -> tuple[str, ...]:
    specs = _strings(value, where, "dynamic")
    for spec in specs:
        problem = check_dynamic(spec)
        if problem:
            raise BuildError(f"{where}: dynamic {problem}")
    return specs


def _name(value: object, where: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise BuildError(f"{where}: name {value!r} must be letters, digits, '-' and '_' (it names the pack file)")
    return value


def _model(item: object, i: int, folder: str, path: str) -> Model:
    where = f"{path}: [[model]] {i + 1}"
    item = _check_keys(item, MODEL_KEYS, where)
    if "file" not in item or not isinstance(item["file"], str) or not item["file"]:
        raise BuildError(f"{where} needs file = \"FILE.py\" or \"FILE.py:NAME\" (relative to the matrix file)")
    file, _, func = item["file"].partition(":")
    full = os.path.normpath(os.path.join(folder, file))
    if not os.path.isfile(full):
        raise BuildError(f"{where}: model file {full} does not exist (paths are relative to the matrix file)")
    stem = os.path.splitext(os.path.basename(file))[0]
    default = f"{stem}-{func}" if func else stem
    name = _name(item.get("name", default.replace(".", "-")), where)
    return Model(name=name, target=f"{full}:{func}" if func else full, dynamic=_dynamic(item.get("dynamic", []), where))


def _target(item: object, i: int, path: str) -> Target:
    where = f"{path}: [[target]] {i + 1}"
    item = _check_keys(item, TARGET_KEYS, where)
    isa = item.get("cpu_isa")
    if isa is not None and isa not in CPU_ISAS:
        raise BuildError(f"{where}: cpu_isa {isa!r} is not one of {', '.join(CPU_ISAS)}")
    devices = _strings(item.get("devices", ["cpu"]), where, "devices")
    if not devices or any(d not in DEVICES for d in devices):
        raise BuildError(f"{where}: devices {list(devices)} must name {' and/or '.join(DEVICES)}")
    archs = item.get("cuda_archs", [])
    if isinstance(archs, (int, str)):
        archs = [archs]
    if not isinstance(archs, list):
        raise BuildError(f"{where}: cuda_archs must be a list such as [80, 90], got {archs!r}")
    if archs:
        from .cudabuild import parse_archs

        archs = parse_archs([str(a) for a in archs])
    without_gpu = item.get("without_gpu", False)
    if not isinstance(without_gpu, bool):
        raise BuildError(f"{where}: without_gpu must be true or false, got {without_gpu!r}")
    threads = item.get("cpu_threads", DEFAULT_CPU_THREADS)
    if type(threads) is not int or not 1 <= threads <= MAX_CPU_THREADS:
        raise BuildError(f"{where}: cpu_threads must be an integer from 1 to {MAX_CPU_THREADS}, got {threads!r}")
    if "name" in item:
        name = _name(item["name"], where)
    else:
        parts = [isa or "default"]
        if "cuda" in devices:
            parts.append("cuda" + "-".join(str(a) for a in archs))
            if "cpu" not in devices:
                parts.pop(0)
        if threads != DEFAULT_CPU_THREADS:
            parts.append(f"t{threads}")
        name = "-".join(parts)
    return Target(name=name, cpu_isa=isa, devices=devices, cuda_archs=tuple(archs), without_gpu=without_gpu,
                  cpu_threads=threads, dynamic=_dynamic(item.get("dynamic", []), where))


def _unique(names: list[str], kind: str, path: str) -> None:
    seen = set()
    for n in names:
        if n in seen:
            raise BuildError(f"{path}: two {kind}s are named {n!r}; give each a distinct name = \"...\"")
        seen.add(n)


def load_matrix(path: str | os.PathLike) -> Matrix:
    """Read and check a matrix file; every (model, target) pair becomes a task, models first."""
    path = os.fspath(path)
    data = _load_toml(path)
    unknown = sorted(set(data) - {"model", "target"})
    if unknown:
        raise BuildError(f"{path}: unknown top-level key{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(map(repr, unknown))}; a matrix has [[model]] and [[target]] tables")
    folder = os.path.dirname(os.path.abspath(path))
    models_raw = data.get("model", [])
    targets_raw = data.get("target", [{}])
    if not isinstance(models_raw, list) or not models_raw:
        raise BuildError(f"{path}: no models: add a [[model]] table with file = \"FILE.py\"")
    if not isinstance(targets_raw, list) or not targets_raw:
        raise BuildError(f"{path}: [[target]] must be a list of tables (or left out for the default target)")
    models = tuple(_model(m, i, folder, path) for i, m in enumerate(models_raw))
    targets = tuple(_target(t, i, path) for i, t in enumerate(targets_raw))
    _unique([m.name for m in models], "model", path)
    _unique([t.name for t in targets], "target", path)
    tasks = tuple(Task(m, t) for m in models for t in targets)
    return Matrix(path=path, models=models, targets=targets, tasks=tasks)
