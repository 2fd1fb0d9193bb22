"""Methods: several functions of one model built into one pack (``aotpack.build(..., methods=...)``).

A method is a bound method of the model (``model.encode``), the name of one, or a function that takes the
model first (``lambda m, x: m.encode(x)``), with its own example inputs, dynamic shapes, specializations and
cache-position rules (``Method``). Each is captured as the model's ``forward`` for the time of its capture
(``as_forward``), so the graph names parameters and buffers as the model does (``embed.weight``, not
``wrapper.model.embed.weight``): a weight that several methods read is one weight of the pack, and a buffer
that any method writes in place is the one state all methods share.

May not: capture or compile: it resolves what each method is, how eager calls it and how capture sees it.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from aotpack_runtime.errors import BuildError
from aotpack_runtime.format import DEFAULT_METHOD, METHOD_NAME

# What a Method (or a dict standing for one) may hold.
FIELDS = ("fn", "example_inputs", "example_kwargs", "dynamic_shapes", "specializations", "cache_positions")


@dataclass(frozen=True)
class Method:
    """One method of a pack to build.

    ``fn``: ``None`` for the model's method of the same name as the key in ``methods``; a method name
    (``"encode"``); a bound method of the model (``model.encode``); or a function taking the model first
    (``def step(model, x): ...``). The other fields are as ``aotpack.build``'s for ``forward``."""

    fn: Any = None
    example_inputs: tuple = ()
    example_kwargs: dict | None = None
    dynamic_shapes: Any = None
    specializations: Sequence = ()
    cache_positions: Any = None


@dataclass(frozen=True)
class Resolved:
    """A method ready to capture: its name, how eager runs it (``call``), the signature its inputs bind to,
    and its example calls."""

    name: str
    call: Callable[..., Any]
    signature: inspect.Signature | None
    is_forward: bool  # the model's own forward: captured as it is
    example_inputs: tuple
    example_kwargs: dict = field(default_factory=dict)
    dynamic_shapes: Any = None
    specializations: tuple = ()
    cache_positions: Any = None

    def describe(self) -> dict:
        """The method as plain data (for the source key): what it calls, not where in memory it is."""
        fn = getattr(self.call, "func", None) or getattr(self.call, "__func__", self.call)
        return {"name": self.name, "fn": f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}",
                "example_inputs": self.example_inputs, "example_kwargs": self.example_kwargs,
                "dynamic_shapes": self.dynamic_shapes, "specializations": list(self.specializations),
                "cache_positions": self.cache_positions}


def reserved_names() -> frozenset[str]:
    """Names a method may not have: attributes of a loaded package and of a session (``pkg.session`` must
    stay the package's)."""
    from aotpack_runtime.loader import Package
    from aotpack_runtime.sessions import Session

    return frozenset(n for n in set(dir(Package)) | set(dir(Session)) | {"path", "manifest", "entries", "weights",
                                                                      "load_seconds", "checked", "stateful"}
                     if not n.startswith("__")) - {DEFAULT_METHOD}


def resolve(model: Any, methods: Any) -> list[Resolved]:
    """Check ``methods`` (name -> ``Method`` or dict of its fields) against ``model``; in order."""
    import torch

    if not isinstance(model, torch.nn.Module):
        raise BuildError(f"methods= needs the model to be a torch.nn.Module (its methods are what a pack of several "
                         f"methods holds), got {type(model).__name__}")
    if not isinstance(methods, dict) or not methods:
        raise BuildError(f"methods must be a non-empty dict of name -> aotpack.Method, got "
                         f"{type(methods).__name__ if not isinstance(methods, dict) else 'an empty dict'}")
    reserved = reserved_names()
    out = []
    for name, spec in methods.items():
        where = f"methods[{name!r}]"
        if not isinstance(name, str) or not METHOD_NAME.match(name):
            raise BuildError(f"{where}: a method's name must be a Python identifier of at most 128 characters "
                             "(it is called as pkg.NAME(...))")
        if name in reserved or name.startswith("_"):
            what = "private" if name.startswith("_") else "an attribute of a loaded package or session"
            raise BuildError(f"{where}: {name!r} is {what}; give the method another name")
        if isinstance(spec, dict):
            unknown = sorted(set(spec) - set(FIELDS))
            if unknown:
                raise BuildError(f"{where} has unknown keys {unknown}; a method's keys are {', '.join(FIELDS)}")
            spec = Method(**spec)
        if not isinstance(spec, Method):
            raise BuildError(f"{where} must be an aotpack.Method or a dict of its fields, got {type(spec).__name__}")
        call, signature, is_forward = _callable(model, name, spec.fn, where)
        if not isinstance(spec.example_inputs, tuple):
            raise BuildError(f"{where}.example_inputs must be a tuple, got {type(spec.example_inputs).__name__}; "
                             "write (x,) for one input")
        if spec.example_kwargs is not None and not isinstance(spec.example_kwargs, dict):
            raise BuildError(f"{where}.example_kwargs must be a dict, got {type(spec.example_kwargs).__name__}")
        if not isinstance(spec.specializations, (list, tuple)):
            raise BuildError(f"{where}.specializations must be a list of example inputs, got "
                             f"{type(spec.specializations).__name__}")
        out.append(Resolved(name=name, call=call, signature=signature, is_forward=is_forward,
                            example_inputs=spec.example_inputs, example_kwargs=dict(spec.example_kwargs or {}),
                            dynamic_shapes=spec.dynamic_shapes, specializations=tuple(spec.specializations),
                            cache_positions=spec.cache_positions))
    return out


def _callable(model: Any, name: str, fn: Any, where: str) -> tuple[Callable, inspect.Signature | None, bool]:
    """(how eager calls the method, the signature its inputs bind to, whether it is the model's forward)."""
    if fn is None or isinstance(fn, str):
        attr = name if fn is None else fn
        fn = getattr(model, attr, None)
        if not callable(fn):
            raise BuildError(f"{where}: the model ({type(model).__name__}) has no method {attr!r}; give fn= (a bound "
                             "method of the model, or a function taking the model first)")
    if not callable(fn):
        raise BuildError(f"{where}.fn must be a method of the model, its name, or a function taking the model "
                         f"first, got {type(fn).__name__}")
    if getattr(fn, "__self__", None) is model:
        is_forward = getattr(fn, "__func__", None) is getattr(type(model).forward, "__func__", type(model).forward) \
            and "forward" not in vars(model)
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):
            signature = None
        return fn, signature, is_forward
    try:
        full = inspect.signature(fn)
    except (TypeError, ValueError):
        raise BuildError(f"{where}.fn: cannot read the signature of {fn!r}; give a function taking the model "
                         "first") from None
    params = list(full.parameters.values())
    if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        raise BuildError(f"{where}.fn takes no positional parameter for the model; a function method takes the model "
                         "first: def step(model, x): ...")
    return functools.partial(fn, model), full.replace(parameters=params[1:]), False


@contextlib.contextmanager
def as_forward(model: Any, method: Resolved) -> Iterator[None]:
    """For the time of the block, ``model.forward`` is ``method`` (with its signature, so dynamic shapes name
    its parameters); the model's own forward afterwards. Capture then names weights as the model does."""
    if method.is_forward:
        yield
        return
    call = method.call

    def forward(*args: Any, **kwargs: Any) -> Any:
        return call(*args, **kwargs)

    forward.__name__ = forward.__qualname__ = method.name
    if method.signature is not None:
        forward.__signature__ = method.signature  # type: ignore[attr-defined]
    had = "forward" in vars(model)
    old = vars(model).get("forward")
    object.__setattr__(model, "forward", forward)
    try:
        yield
    finally:
        if had:
            object.__setattr__(model, "forward", old)
        else:
            vars(model).pop("forward", None)
