"""The model file convention of the CLI.

``FILE.py`` is imported and its module-level ``model`` and ``example_inputs`` (and ``example_kwargs``,
``dynamic_shapes``, ``specializations``, ``cache_positions`` if present) are used, or ``model`` and
``methods`` (name -> ``aotpack.Method``: a pack of several methods); ``FILE.py:NAME`` calls the zero-argument
function ``NAME``, which returns ``(model, example_inputs)``, ``(model, example_inputs, example_kwargs)``, or
a dict with the keys ``model`` and ``example_inputs`` (or ``methods``) and optionally ``example_kwargs``,
``dynamic_shapes``, ``specializations``, ``cache_positions``.

May not: capture: it imports the user's file and returns what it names.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any

from aotpack_runtime.errors import ModelFileError


_FIELDS = ("model", "example_inputs", "example_kwargs", "dynamic_shapes", "specializations", "cache_positions",
           "methods")


@dataclass(frozen=True)
class ModelSpec:
    model: Any
    example_inputs: tuple
    example_kwargs: dict = field(default_factory=dict)
    dynamic_shapes: Any = None
    specializations: tuple = ()
    cache_positions: Any = None
    source: str = ""
    methods: dict | None = None  # name -> aotpack.Method: a pack of several methods (example_inputs is then None)


def _import(path: str) -> Any:
    if not os.path.exists(path):
        raise ModelFileError(f"model file {path} does not exist")
    if not os.path.isfile(path):
        raise ModelFileError(f"model file {path} is not a regular file; give FILE.py or FILE.py:NAME")
    if not path.endswith(".py"):
        raise ModelFileError(f"model file {path} is not a .py file; give FILE.py or FILE.py:NAME")
    folder = os.path.dirname(os.path.abspath(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    # A real module name: Dynamo looks a function's globals up through sys.modules.
    name = f"aotpack_model_{stem}_{hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelFileError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    if folder not in sys.path:
        sys.path.insert(0, folder)  # lets the file import its sibling modules
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        tb = traceback.extract_tb(e.__traceback__)
        frame = next((f for f in reversed(tb) if os.path.abspath(f.filename) == os.path.abspath(path)), None)
        where = f" (line {frame.lineno}: {frame.line})" if frame else ""
        raise ModelFileError(f"importing {path} failed{where}: {type(e).__name__}: {e}") from e
    return module


def load_model_file(target: str) -> ModelSpec:
    """Import ``FILE.py`` or ``FILE.py:NAME`` and return the model and its example inputs."""
    path, _, func = target.partition(":")
    module = _import(path)
    if func:
        fn = getattr(module, func, None)
        if fn is None:
            defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                             and getattr(v, "__module__", None) == module.__name__)
            raise ModelFileError(f"{path} has no function {func!r}; functions it defines: "
                                 f"{', '.join(defined) or 'none'}")
        if not callable(fn):
            raise ModelFileError(f"{path}:{func} is a {type(fn).__name__}, not a function")
        try:
            result = fn()
        except Exception as e:
            raise ModelFileError(f"calling {path}:{func}() failed: {type(e).__name__}: {e}") from e
        if isinstance(result, dict):
            unknown = sorted(set(result) - set(_FIELDS))
            missing = [k for k in ("model", "example_inputs" if "methods" not in result else "methods")
                       if k not in result]
            if unknown or missing:
                raise ModelFileError(f"{path}:{func}() returned a dict "
                                     f"{'with unknown keys ' + str(unknown) if unknown else 'without ' + str(missing)}; "
                                     f"its keys are {', '.join(_FIELDS)}")
            extras = result
        elif not isinstance(result, tuple) or len(result) not in (2, 3):
            raise ModelFileError(f"{path}:{func}() must return (model, example_inputs) or (model, "
                                 f"example_inputs, example_kwargs) or a dict; it returned "
                                 f"{type(result).__name__ if not isinstance(result, tuple) else f'a tuple of {len(result)}'}")
        else:
            extras = dict(zip(_FIELDS, result))
        model, inputs, kwargs = extras["model"], extras.get("example_inputs"), extras.get("example_kwargs") or {}
    else:
        missing = [n for n in ("model", "example_inputs" if not hasattr(module, "methods") else "methods")
                   if not hasattr(module, n)]
        if missing:
            raise ModelFileError(f"{path} defines no {' and no '.join(repr(m) for m in missing)}: a model file "
                                 "sets module-level `model` and `example_inputs` (a tuple), or use "
                                 f"'{path}:NAME' to name a function that returns (model, example_inputs)")
        extras = {k: getattr(module, k) for k in _FIELDS if hasattr(module, k)}
        model, inputs = module.model, getattr(module, "example_inputs", None)
        kwargs = getattr(module, "example_kwargs", {}) or {}
    methods = extras.get("methods")
    if methods is not None:
        return _with_methods(target, model, methods, extras)
    if not isinstance(inputs, tuple):
        raise ModelFileError(f"example_inputs in {target} must be a tuple, got {type(inputs).__name__}; "
                             "write example_inputs = (x,) for one input")
    if not isinstance(kwargs, dict):
        raise ModelFileError(f"example_kwargs in {target} must be a dict, got {type(kwargs).__name__}")
    if not callable(model):
        raise ModelFileError(f"model in {target} is a {type(model).__name__}, not a module or function")
    specializations = extras.get("specializations") or ()
    if not isinstance(specializations, (list, tuple)):
        raise ModelFileError(f"specializations in {target} must be a list of example input tuples")
    return ModelSpec(model=model, example_inputs=inputs, example_kwargs=kwargs,
                     dynamic_shapes=extras.get("dynamic_shapes"), specializations=tuple(specializations),
                     cache_positions=extras.get("cache_positions"), source=target)


def _with_methods(target: str, model: Any, methods: Any, extras: dict) -> ModelSpec:
    """The spec of a model file that defines ``methods``: each method carries its own example inputs."""
    if not isinstance(methods, dict) or not methods:
        raise ModelFileError(f"methods in {target} must be a non-empty dict of name -> aotpack.Method, got "
                             f"{type(methods).__name__ if not isinstance(methods, dict) else 'an empty dict'}")
    given = [k for k in ("example_inputs", "example_kwargs", "dynamic_shapes", "specializations", "cache_positions")
             if extras.get(k) not in (None, {}, (), [])]
    if given:
        raise ModelFileError(f"{target} defines methods and also {', '.join(given)}; with methods, each method gives "
                             "its own (aotpack.Method(fn, example_inputs, ...))")
    if not callable(model):
        raise ModelFileError(f"model in {target} is a {type(model).__name__}, not a module")
    return ModelSpec(model=model, example_inputs=None, source=target, methods=dict(methods))  # type: ignore[arg-type]


_DYNAMIC = re.compile(r"([A-Za-z_]\w*):(\d+)=(?:([A-Za-z_]\w*):)?(\d+)\.\.(\d*)")


def check_dynamic(spec: str) -> str | None:
    """What is wrong with one ``INPUT:DIM=[NAME:]MIN..[MAX]`` text, or None (no torch needed)."""
    m = _DYNAMIC.fullmatch(spec)
    if not m:
        return (f"{spec!r} is not INPUT:DIM=MIN..MAX or INPUT:DIM=NAME:MIN..MAX (e.g. x:0=1..64; x:0=2.. for no "
                "upper bound)")
    if m.group(5) and int(m.group(4)) > int(m.group(5)):
        return f"{spec!r}: the minimum {m.group(4)} is above the maximum {m.group(5)}"
    return None


def parse_dynamic(specs: tuple[str, ...] | list[str]) -> dict:
    """``x:0=1..64`` / ``x:0=batch:1..64`` / ``x:0=2..`` (no upper bound) texts into torch.export's
    dynamic_shapes dict; the same NAME on several inputs is one symbol (equal sizes). Raises
    :class:`ModelFileError` for a malformed text."""
    from torch.export import Dim

    dims: dict = {}
    out: dict = {}
    for spec in specs:
        problem = check_dynamic(spec)
        if problem:
            raise ModelFileError(problem)
        name, dim, sym, lo, hi = _DYNAMIC.fullmatch(spec).groups()
        dim, lo, hi = int(dim), int(lo), int(hi) if hi else None
        sym = sym or f"{name}_{dim}"
        if sym in dims and dims[sym][1:] != (lo, hi):
            raise ModelFileError(f"{sym!r} is given two ranges")
        dims.setdefault(sym, (Dim(sym, min=lo) if hi is None else Dim(sym, min=lo, max=hi), lo, hi))
        out.setdefault(name, {})[dim] = dims[sym][0]
    return out
