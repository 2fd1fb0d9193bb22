"""JSON requests to model inputs and model outputs to JSON, for serving one pack over HTTP.

A /predict body is ``{"args": [...], "kwargs": {...}, "dtype": "float32" | {"input name": "int64", ...}}``.
Nested JSON lists become tensors of the dtype the pack's guards expect for that input (unless "dtype" says
otherwise; float32 where the pack expects no tensor there); numbers, strings, booleans and
null where the pack expects a Python value stay Python values; tuples, lists and dicts of the pack's input
structure are rebuilt as such. A request that cannot be converted raises :class:`BadRequest`, which the
server answers with its status (400 unless it says otherwise) and ``{"error": message}``.
"""
from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

import torch

import aotpack
from aotpack_runtime.guards import DTYPE_BY_NAME, TensorGuard

DTYPES = {name: getattr(torch, name) for name in (
    "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")}
DEFAULT_DTYPE = "float32"
MAX_DEPTH = 32


class BadRequest(Exception):
    """A client mistake: answered with 400 (or ``status``) and {"error": message}."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


def parse_json(raw: bytes) -> Any:
    """The request body ``raw`` as a JSON value."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BadRequest(f"the request body is not UTF-8: {e}") from None
    except json.JSONDecodeError as e:
        raise BadRequest(f"invalid JSON: {e}") from None
    except RecursionError:
        raise BadRequest("invalid JSON: nested too deeply") from None


# --- JSON -> model inputs --------------------------------------------------------------------------

def _tensor(value: Any, dtype: str, where: str) -> torch.Tensor:
    try:
        return torch.tensor(value, dtype=DTYPE_BY_NAME[dtype])  # a request names one of DTYPES; a guard, any
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise BadRequest(f"{where}: cannot make a {dtype} tensor from this value: {e}") from None


def _generic(value: Any, dtype: str | None, where: str, depth: int = 0) -> Any:
    """Without the pack's structure to follow: lists are tensors (float32 unless ``dtype`` says), objects are
    dicts, the rest stays."""
    if depth > MAX_DEPTH:
        raise BadRequest(f"{where} is nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, list):
        return _tensor(value, dtype or DEFAULT_DTYPE, where)
    if isinstance(value, dict):
        return {k: _generic(v, dtype, f"{where}[{k!r}]", depth + 1) for k, v in value.items()}
    return value


def _follow(node: dict, value: Any, path: str, dtype: str | None, guards: dict, depth: int = 0) -> Any:
    """Convert ``value`` along the pack's input structure ``node``: a tensor where the pack expects a
    tensor (of ``dtype``, else the dtype the pack's guard expects), the right container type
    (tuple/list/dict) where it expects one. Where the request does not fit the structure, convert
    generically and let the pack's guards say what is wrong."""
    if depth > MAX_DEPTH:
        raise BadRequest(f"{path} is nested deeper than {MAX_DEPTH} levels")
    kind = node["type"]
    if kind == "leaf":
        guard = guards.get(path)
        if isinstance(guard, TensorGuard) and isinstance(value, (list, int, float)):
            return _tensor(value, dtype or guard.dtype, path)  # a bare number for a 0-d tensor input
        return _generic(value, dtype, path, depth)
    if kind in ("tuple", "list") and isinstance(value, list) and len(value) == len(node["children"]):
        items = [_follow(c, v, f"{path}[{i}]", dtype, guards, depth + 1)
                 for i, (c, v) in enumerate(zip(node["children"], value))]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict" and isinstance(value, dict) and set(value) == set(node["keys"]):
        return {k: _follow(c, value[k], f"{path}[{k!r}]", dtype, guards, depth + 1)
                for k, c in zip(node["keys"], node["children"])}
    return _generic(value, dtype, path, depth)


class InputConverter:
    """Turns a /predict body into ``(args, kwargs)`` for the package, following its first entry's inputs (of
    ``method``, in a pack of several methods)."""

    def __init__(self, pkg: aotpack.Package, method: str | None = None):
        g = (pkg.entries if method is None else pkg.methods[method].entries)[0].guards
        self.args_node, self.kwargs_node = g.inputs["children"]
        self.param_names = list(g.param_names)
        self.guards = {leaf.path: leaf for leaf in g.leaves}
        self.leaves = g.leaves
        self.symbols = g.symbols

    def _dtype_for(self, dtype: Any, top: str, name: str | None) -> str | None:
        """The dtype the request gives this input, or None: then the pack's guards decide."""
        if dtype is None or isinstance(dtype, str):
            return dtype
        for key in (top, name):
            if key is not None and key in dtype:
                return dtype[key]
        return None

    def convert(self, body: Any) -> tuple[tuple, dict]:
        if not isinstance(body, dict):
            raise BadRequest(f"the request body must be a JSON object, not {type(body).__name__}")
        unknown = sorted(set(body) - {"args", "kwargs", "dtype"})
        if unknown:
            raise BadRequest(f"unknown field(s) {unknown} in the request body; expected args, kwargs, dtype")
        args, kwargs, dtype = body.get("args", []), body.get("kwargs", {}), body.get("dtype")
        if not isinstance(args, list):
            raise BadRequest(f"'args' must be a JSON list, not {type(args).__name__}")
        if not isinstance(kwargs, dict):
            raise BadRequest(f"'kwargs' must be a JSON object, not {type(kwargs).__name__}")
        self._check_dtype(dtype, args, kwargs)
        arg_nodes = self.args_node["children"]
        out_args = []
        for i, a in enumerate(args):
            name = self.param_names[i] if i < len(self.param_names) else None
            dt = self._dtype_for(dtype, f"args[{i}]", name)
            if i < len(arg_nodes):
                out_args.append(_follow(arg_nodes[i], a, f"args[{i}]", dt, self.guards))
            else:
                out_args.append(_generic(a, dt, f"args[{i}]"))
        kw_nodes = dict(zip(self.kwargs_node["keys"], self.kwargs_node["children"]))
        out_kwargs = {}
        for k, v in kwargs.items():
            dt = self._dtype_for(dtype, k, k)
            path = f"kwargs[{k!r}]"
            out_kwargs[k] = _follow(kw_nodes[k], v, path, dt, self.guards) if k in kw_nodes else \
                _generic(v, dt, path)
        return tuple(out_args), out_kwargs

    def _check_dtype(self, dtype: Any, args: list, kwargs: dict) -> None:
        if dtype is None:
            return
        if isinstance(dtype, str):
            names = [dtype]
        elif isinstance(dtype, dict):
            known = ({f"args[{i}]" for i in range(max(len(args), len(self.param_names)))} | set(self.param_names)
                     | set(self.kwargs_node["keys"]) | set(kwargs))
            unknown = sorted(k for k in dtype if k not in known)
            if unknown:
                raise BadRequest(f"'dtype' names input(s) {unknown} that neither the request nor the pack has; "
                                 "use a keyword name, a positional parameter name or args[i]")
            names = list(dtype.values())
        else:
            raise BadRequest("'dtype' must be a dtype name or an object mapping input names to dtype names")
        for n in names:
            if not isinstance(n, str) or n not in DTYPES:
                raise BadRequest(f"unknown dtype {n!r}; expected one of {', '.join(DTYPES)}")

    def describe(self) -> list[dict]:
        out = []
        for leaf in self.leaves:
            if isinstance(leaf, TensorGuard):
                out.append({"path": leaf.path, "name": leaf.name, "kind": "tensor", "dtype": leaf.dtype,
                            "sizes": list(leaf.sizes)})
            else:
                out.append({"path": leaf.path, "name": leaf.name, "kind": "value", "type": leaf.type,
                            "value": leaf.value})
        return out


# --- model outputs -> JSON -------------------------------------------------------------------------

def to_json(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.is_complex():
            t = torch.view_as_real(t.resolve_conj())
        return t.tolist()
    if isinstance(value, (tuple, list)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    return value
