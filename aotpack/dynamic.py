"""``dynamic_shapes`` checked against the example inputs before capture, and torch's errors about them told
in the inputs' names.

torch.export ignores a dimension past an input's rank (or a negative one): the pack would come out static
with no word said. Its own errors name a range torch changed ("64 not in range [2, 8]" for a Dim of 1..8)
and no input. So each dynamic dimension is looked up in the example inputs first: a dimension the input
does not have, an example size outside its range (or 0 or 1, which torch treats as constants), two inputs
that share a ``Dim`` with different sizes, a name that is no input: each a :class:`CaptureError` naming the
input, the dimension and the range.

May not: capture: it checks specs against the example inputs before capture runs.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

from aotpack_runtime.errors import CaptureError

from . import _torch

# Why an example of a dynamic dimension must be 2 or more, in the words of every error that says so.
SPECIALIZED_SIZES = ("torch's capture treats sizes 0 and 1 as constants, so a dynamic dim's example (and the "
                     "range torch reports) starts at 2; the pack still serves the whole range given")


@dataclass(frozen=True)
class DynamicDim:
    """One dimension ``dynamic_shapes`` makes dynamic, and the example input's size there."""

    name: str  # the input's name (forward's parameter)
    path: str  # where it is in the call: args[0], kwargs['mask'], args[1][0]
    dim: int
    size: int  # the example's size
    spec: _torch.DimSpec

    def where(self) -> str:
        return f"input {self.name!r} ({self.path}) dim {self.dim}"

    def given(self) -> str:
        return given(self.spec)


def given(s: _torch.DimSpec) -> str:
    """A dim's spec as the user gave it: ``batch, 1..64``, ``n, >= 0``, ``Dim.AUTO``."""
    if s.kind in ("auto", "dynamic") and s.low is None and s.high is None:
        return s.text
    low = 0 if s.low is None else s.low
    span = f"{low}..{s.high}" if s.high is not None else f">= {low}"
    return f"{s.text}, {span}" if s.text else span


def _shape(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')}[{', '.join(str(n) for n in t.shape)}]"


def _inputs(fn: Callable, args: tuple, kwargs: dict) -> tuple[dict, dict] | None:
    """forward's inputs in this call, as torch.export keys ``dynamic_shapes``: name -> (value, path or a
    function of a child's index giving its path). None when the call does not bind (torch says why)."""
    try:
        signature = inspect.signature(fn)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    values, paths = {}, {}
    position = 0
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        values[name] = value
        if kind is inspect.Parameter.VAR_POSITIONAL:
            paths[name] = [f"args[{position + i}]" for i in range(len(value))]
            position += len(value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            paths[name] = {k: f"kwargs[{k!r}]" for k in value}
        elif kind is not inspect.Parameter.KEYWORD_ONLY and position < len(args):
            paths[name] = f"args[{position}]"
            position += 1
        else:
            paths[name] = f"kwargs[{name!r}]"
    return values, paths


def check(fn: Callable, args: tuple, kwargs: dict, dynamic_shapes: Any) -> tuple[DynamicDim, ...]:
    """Check ``dynamic_shapes`` (torch.export's format) against the example call ``fn(*args, **kwargs)``;
    return the dynamic dimensions it gives, or raise :class:`CaptureError` for a dimension or input the
    example does not have, or an example size the spec rules out."""
    if dynamic_shapes is None:
        return ()
    bound = _inputs(fn, args, kwargs)
    if bound is None:
        return ()
    values, paths = bound
    names = list(values)
    if isinstance(dynamic_shapes, dict):
        unknown = [k for k in dynamic_shapes if k not in values]
        if unknown:
            key = unknown[0]
            params = inspect.signature(fn).parameters
            why = (f"forward has a parameter {key!r}, but the example call does not pass it" if key in params
                   else f"forward has no parameter {key!r}")
            raise CaptureError(f"dynamic_shapes names the input {key!r}, which is not an input of this call: "
                               f"{why}; its inputs are {', '.join(map(repr, names)) or 'none'}",
                               hint="key dynamic_shapes (or --dynamic INPUT:DIM=...) by forward's parameter names")
        specs = [(n, dynamic_shapes.get(n)) for n in names]
    elif isinstance(dynamic_shapes, (tuple, list)):
        if len(dynamic_shapes) != len(names):
            raise CaptureError(f"dynamic_shapes is a {type(dynamic_shapes).__name__} of {len(dynamic_shapes)}, "
                               f"but this call has {len(names)} input(s) ({', '.join(map(repr, names))})",
                               hint="give one entry per input (None for a static one), or a dict keyed by name")
        specs = list(zip(names, dynamic_shapes))
    else:
        return ()
    found: list[DynamicDim] = []
    for name, spec in specs:
        _walk(name, values[name], spec, paths[name], found)
    _check_shared(found)
    return tuple(found)


def _walk(name: str, value: Any, spec: Any, path: Any, found: list[DynamicDim]) -> None:
    if spec is None:
        return
    if isinstance(value, torch.Tensor):
        _tensor(name, value, spec, path, found)
    elif isinstance(value, (tuple, list)) and isinstance(spec, (tuple, list)):
        for i, (v, sp) in enumerate(zip(value, spec)):
            _walk(name, v, sp, path[i] if isinstance(path, list) else f"{path}[{i}]", found)
    elif isinstance(value, dict) and isinstance(spec, dict):
        for k, v in value.items():
            _walk(name, v, spec.get(k), path[k] if isinstance(path, dict) else f"{path}[{k!r}]", found)


def _tensor(name: str, t: torch.Tensor, spec: Any, path: str, found: list[DynamicDim]) -> None:
    rank = t.dim()
    if isinstance(spec, dict):
        items = list(spec.items())
    elif isinstance(spec, (tuple, list)):
        if len(spec) != rank:
            raise CaptureError(f"dynamic_shapes gives input {name!r} ({path}) {len(spec)} dims, but the example "
                               f"is {_shape(t)}, with {rank}",
                               hint=f"give one entry per dim ({rank}; None for a static one), or a dict {{dim: Dim}}")
        items = list(enumerate(spec))
    else:
        return
    for dim, d in items:
        parsed = _torch.dim_spec(d)
        if type(dim) is not int or not 0 <= dim < rank:
            dims = f"dims 0 to {rank - 1}" if rank > 1 else "dim 0" if rank == 1 else "no dims (a 0-d tensor)"
            raise CaptureError(f"dynamic_shapes makes dim {dim!r} of input {name!r} ({path}) dynamic "
                               f"({given(parsed)}), but the example is {_shape(t)}: it has {dims}",
                               hint="name a dim the input has, counting from 0 (a dim past the rank would be "
                                    "ignored and the pack built static)")
        if parsed.kind == "static" or parsed.kind == "unknown":
            continue
        one = DynamicDim(name=name, path=path, dim=dim, size=int(t.shape[dim]), spec=parsed)
        _check_size(one)
        found.append(one)


def _check_size(d: DynamicDim) -> None:
    s = d.spec
    if s.kind == "size":
        if d.size != s.low:
            raise CaptureError(f"{d.where()}: dynamic_shapes fixes its size at {s.low}, but the example's size is "
                               f"{d.size}", hint=f"give an example of size {s.low}, or a Dim for a dynamic size")
        return
    low = 0 if s.low is None else s.low
    if d.size < low or (s.high is not None and d.size > s.high):
        lowest = max(low, 2)
        fits = f"{lowest}..{s.high}" if s.high is not None else f"{lowest} or more"
        raise CaptureError(f"{d.where()}: the example's size is {d.size}, outside the range given for it "
                           f"({d.given()})",
                           hint=f"give an example whose size there is {fits}, or widen the range"
                                + (f"; {SPECIALIZED_SIZES}" if low <= 1 else ""))
    if d.size in (0, 1) and s.kind != "auto":
        raise CaptureError(f"{d.where()}: the example's size is {d.size}, but the dim is dynamic ({d.given()})",
                           hint=f"give an example whose size there is 2 or more; {SPECIALIZED_SIZES}")


def _check_shared(found: list[DynamicDim]) -> None:
    """Inputs that share a Dim have equal sizes there; a derived dim (``dx + 1``) is its function of the
    root's size."""
    roots: dict[str, DynamicDim] = {}
    for d in found:
        if d.spec.kind != "dim":
            continue
        first = roots.setdefault(d.spec.name, d)
        if first.size != d.size:
            raise CaptureError(f"{first.where()} and {d.where()} share the Dim {d.spec.name!r}, but the example "
                               f"sizes differ: {first.size} and {d.size}",
                               hint="give examples of equal size there, or a Dim of its own to each")
    for d in found:
        root = roots.get(d.spec.name) if d.spec.kind == "derived" else None
        if root is None:
            continue
        try:
            expected = int(d.spec.fn(root.size))
        except Exception:  # a function the Dim was made with that an int does not fit: torch will say
            continue
        if expected != d.size:
            raise CaptureError(f"{d.where()} is {d.spec.text}, {expected} for the example ({d.spec.name} is "
                               f"{root.size} in {root.where()}), but the example's size is {d.size}",
                               hint=f"give an example of size {expected} there")


def by_symbol(dims: tuple[DynamicDim, ...]) -> dict[str, list[DynamicDim]]:
    """The dynamic dimensions by the name torch gives their symbol in its errors (the Dim's name)."""
    out: dict[str, list[DynamicDim]] = {}
    for d in dims:
        if d.spec.name:
            out.setdefault(d.spec.name if d.spec.kind == "dim" else d.spec.text, []).append(d)
    return out
