"""The source key: a first build cache key, computed from what a model file is made of, before capture.

A build that starts from a model file (``aotpack build FILE.py[:NAME]``, each ``build-many`` task) imports the
file while ``load`` watches which modules the import loads or asks for. Before capture, ``key`` hashes:

- the model file and every Python source (or extension) that import loaded or asked for, outside the
  standard library and the toolchain's packages (torch, triton, aotpack: their versions and aotpack's source
  digest are in the toolchain record), each by content (``FileDigests`` remembers a file's sha256 by its
  path, size, mtime and ctime, so an unchanged file is not read again), and the installed version of each
  distribution those modules belong to;
- every tensor the model holds (parameters, buffers, tensor attributes) or its code reaches through globals
  and closures, as the graph key records weights; the example inputs, specializations, dynamic shapes and
  cache positions;
- the target string (``FILE.py:NAME``), the resolved options, what the graph key takes from outside the
  graph (``pipeline.context_material``: producer, target, toolchain) and the Inductor config's inputs
  (``pipeline.source_key`` says which).

The build cache maps a source key to the graph key of the pack its build made (``BuildCache.remember``);
a source key found there whose pack is intact is a hit with no capture. Any other case is a miss, and the
graph key decides as before. A module asked for but loaded before the model file's import (by an earlier
build in the same process) leaves its own imports unseen: when it is not part of an installed
distribution, the build has no source key.

May not: capture: it keys a build by what it can see before capture.
"""
from __future__ import annotations

import builtins
import contextlib
import functools
import hashlib
import importlib
import json
import os
import pathlib
import secrets
import sys
import time
import types
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Iterator

from aotpack_runtime.format import canonical_json

from . import buildcache

# Packages whose code the toolchain record already identifies (versions, git commit, source digest).
TOOLCHAIN_PACKAGES = frozenset({"torch", "torchgen", "functorch", "triton", "aotpack", "aotpack_runtime",
                                "aotpack_cli"})
# Environment variables that set torch's compile config (torch/_inductor/config.py, torch/_functorch/config.py).
CONFIG_ENV_PREFIXES = ("TORCH", "INDUCTOR_", "AOT", "ENABLE_", "PARTITIONER_", "LOG_")
# A file changed this recently may change again within its timestamp's resolution: hashed, never remembered.
RACY_SECONDS = 2.0


@dataclass(frozen=True)
class ModelFile:
    """What importing a model file brought in: the file, the modules its import loaded or asked for, and those
    of them that were loaded before (by an earlier import in this process)."""

    target: str
    path: str
    modules: tuple[str, ...]
    loaded_before: tuple[str, ...]


def load(target: str) -> tuple[Any, ModelFile]:
    """``modelfile.load_model_file(target)`` and what its import brought in."""
    from .modelfile import load_model_file

    with _watch() as (before, asked):
        spec = load_model_file(target)
    loaded = set(sys.modules) - before
    path = os.path.abspath(target.partition(":")[0])
    # the model file's own module is hashed as the model file (and belongs to no distribution)
    names = {n for n in loaded | asked if _tracked(n) and _file(n) != path}
    return spec, ModelFile(target=target, path=path, modules=tuple(sorted(names)),
                           loaded_before=tuple(sorted(n for n in names if n not in loaded)))


def _file(name: str) -> str | None:
    path = getattr(sys.modules.get(name), "__file__", None)
    return os.path.abspath(path) if path else None


def _tracked(name: str) -> bool:
    top = name.partition(".")[0]
    return top not in sys.stdlib_module_names and top not in TOOLCHAIN_PACKAGES and name in sys.modules


@contextlib.contextmanager
def _watch() -> Iterator[tuple[set, set]]:
    """The modules loaded before, and the names every ``import`` statement and ``importlib.import_module``
    call asks for while the block runs."""
    before, asked = set(sys.modules), set()
    original_import, original_import_module = builtins.__import__, importlib.import_module

    def watched_import(name, globals=None, locals=None, fromlist=(), level=0):
        module = original_import(name, globals, locals, fromlist, level)
        base = name if level == 0 and not fromlist else getattr(module, "__name__", name)
        asked.add(base)
        asked.update(f"{base}.{item}" for item in fromlist or () if f"{base}.{item}" in sys.modules)
        return module

    def watched_import_module(name, package=None):
        module = original_import_module(name, package)
        asked.add(module.__name__)
        return module

    builtins.__import__, importlib.import_module = watched_import, watched_import_module
    try:
        yield before, asked
    finally:
        builtins.__import__, importlib.import_module = original_import, original_import_module


@functools.lru_cache(maxsize=None)
def _distributions() -> dict[str, list[str]]:
    return metadata.packages_distributions()


class FileDigests:
    """sha256 of files, remembered in ``index`` by path, size, mtime, ctime and inode: a file whose
    record is unchanged is not read again. The index is rewritten whole (under a temporary name, then renamed)
    when it learnt something; concurrent builds may lose each other's records, never corrupt them."""

    def __init__(self, index: pathlib.Path | None):
        self.index = index
        self.known: dict[str, list] = {}
        self.learnt = False
        if index is not None:
            with contextlib.suppress(OSError, ValueError):
                loaded = json.loads(index.read_text())
                if isinstance(loaded, dict):
                    self.known = loaded

    def digest(self, path: str) -> str:
        try:
            st = os.stat(path)
        except OSError as e:
            return f"unreadable: {e.strerror}"
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        record = self.known.get(path)
        if isinstance(record, list) and record[:4] == stamp and len(record) == 5:
            return record[4]
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                while chunk := f.read(buildcache.CHUNK):
                    h.update(chunk)
        except OSError as e:
            return f"unreadable: {e.strerror}"
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_SECONDS * 1e9:
            self.known[path] = stamp + [h.hexdigest()]
            self.learnt = True
        return h.hexdigest()

    def save(self) -> None:
        if self.index is None or not self.learnt:
            return
        tmp = self.index.with_name(f".{self.index.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            self.index.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(canonical_json(self.known))
            os.replace(tmp, self.index)
        except OSError:
            tmp.unlink(missing_ok=True)  # only a slower next build


def unseen(model_file: ModelFile) -> list[str]:
    """The modules the import asked for that were loaded before it and belong to no installed distribution:
    what they import is unseen, so the build has no source key."""
    return [n for n in model_file.loaded_before if not _distributions().get(n.partition(".")[0])]


def sources(model_file: ModelFile, files: FileDigests) -> dict | None:
    """The model file's sources record: each file's sha256 and each distribution's version; None when
    ``unseen`` names a module."""
    if unseen(model_file):
        return None
    digests = {model_file.path: files.digest(model_file.path)}
    versions = {}
    for name in model_file.modules:
        for dist in _distributions().get(name.partition(".")[0], []):
            versions[dist] = buildcache.installed_version(dist)
        path = _file(name)
        if path:
            digests[path] = files.digest(path)
    files.save()
    return {"files": digests, "distributions": versions}


def config_environment() -> dict[str, str]:
    """The environment variables torch's Inductor, Dynamo and AOT-autograd config modules may read (by their
    prefixes), less those naming host paths and cache switches, which the graph key leaves out too."""
    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith(CONFIG_ENV_PREFIXES) and "CACHE" not in k and not k.endswith(("_DIR", "_PATH"))}


def _tensors(root: Any) -> dict:
    """Every tensor the model holds or its code reaches: a module's parameters, buffers and tensor attributes,
    and what functions and ``forward`` methods name in their globals and closures, by path from the model."""
    import torch

    out: dict = {}
    seen: set[int] = set()
    todo: list[tuple[str, Any]] = [("model", root)]
    while todo:
        where, obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            out[where] = buildcache.tensor_record(obj, _tensor_digest(obj))
        elif isinstance(obj, torch.nn.Module):
            for name, value in vars(obj).items():
                if name in ("_parameters", "_buffers", "_modules"):
                    todo += [(f"{where}.{k}", v) for k, v in value.items() if v is not None]
                elif isinstance(value, (torch.Tensor, torch.nn.Module, types.FunctionType)):
                    todo.append((f"{where}.{name}", value))
            forward = getattr(type(obj), "forward", None)
            if isinstance(forward, types.FunctionType) and forward.__module__ != "torch.nn.modules.module":
                todo.append((f"{where}.forward", forward))
        elif isinstance(obj, (types.FunctionType, types.MethodType)):
            fn = obj.__func__ if isinstance(obj, types.MethodType) else obj
            if isinstance(obj, types.MethodType):
                todo.append((f"{where}.__self__", obj.__self__))
            if fn.__module__ and fn.__module__.partition(".")[0] in TOOLCHAIN_PACKAGES:
                continue
            for name in _names(fn.__code__):
                if name in fn.__globals__:
                    value = fn.__globals__[name]
                    if isinstance(value, (torch.Tensor, torch.nn.Module, types.FunctionType)):
                        todo.append((f"{where}:{name}", value))
            for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
                with contextlib.suppress(ValueError):
                    todo.append((f"{where}:{name}", cell.cell_contents))
        elif isinstance(obj, (list, tuple)):
            todo += [(f"{where}[{i}]", v) for i, v in enumerate(obj)]
        elif isinstance(obj, dict):
            todo += [(f"{where}[{k!r}]", v) for k, v in obj.items()]
        elif isinstance(obj, functools.partial):
            todo += [(f"{where}.func", obj.func), (f"{where}.args", obj.args), (f"{where}.keywords", obj.keywords)]
        elif where == "model" and hasattr(obj, "__dict__") and not isinstance(obj, type):  # a callable object
            todo += [(f"{where}.{k}", v) for k, v in vars(obj).items()
                     if isinstance(v, (torch.Tensor, torch.nn.Module, types.FunctionType))]
            call = getattr(type(obj), "__call__", None)
            if isinstance(call, types.FunctionType):
                todo.append((f"{where}.__call__", call))
    return out


def _names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _tensor_digest(t) -> str:
    from . import package

    return package.tensor_digest(t)


def _plain(value: Any) -> Any:
    """Example inputs, dynamic shapes and cache positions as JSON: tensors by record, ``Dim``s by name and
    range, anything else by type and repr."""
    import torch

    if isinstance(value, torch.Tensor):
        return {"tensor": buildcache.tensor_record(value, _tensor_digest(value)), "device": value.device.type,
                "requires_grad": value.requires_grad}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return {"float": value.hex()}
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [_plain(v) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[_plain(k), _plain(v)] for k, v in value.items()]}
    if isinstance(value, type) and hasattr(value, "min") and hasattr(value, "max"):  # torch.export.Dim
        return {"dim": value.__name__, "min": _plain(value.min), "max": _plain(value.max)}
    return {"object": f"{type(value).__module__}.{type(value).__qualname__}", "repr": repr(value)}


def key(model_file: ModelFile, model: Any, calls: dict, options_json: dict, context: dict,
        files: FileDigests) -> str | None:
    """The source key of a build (see the module's docstring), or None when the import cannot vouch for its
    sources. ``calls``: the example inputs, specializations, dynamic shapes and cache positions; ``context``:
    what the graph key takes from outside the graph."""
    found = sources(model_file, files)
    if found is None:
        return None
    name = model_file.target.partition(":")[2]
    material = {"source_key": {"model_file": model_file.path, "name": name, **found},
                "tensors": _tensors(model), "calls": _plain(calls), "options": options_json, **context}
    return buildcache.digest(canonical_json({"key_version": buildcache.KEY_VERSION, **material}))
