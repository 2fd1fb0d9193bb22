"""State: the buffers a model writes in place between calls (an LLM's KV cache, a step counter).

Capture finds them (``Captured.state``); here they become the pack's state records, apart from the
weights, with their initial values; the rules that say which input holds cache positions (so a call that
would write outside the cache is refused before any native code runs) are resolved; and the built pack is
run against eager for three successive calls from the initial state before it is written in place (for a
pack of several methods, a sequence that crosses them: each method once, in order, then the last again).

May not: capture or compile: it turns what capture found into state records.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import tempfile
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from aotpack_runtime import format as fmt
from aotpack_runtime.errors import AotpackError, BuildError
from aotpack_runtime.guards import dtype_name
from aotpack_runtime.schema import PositionRule, StateRecord

from . import package

# How many calls from the initial state the build compares with eager.
CHECKED_CALLS = 3


def state_records(tensors: dict[str, torch.Tensor]) -> tuple[list[StateRecord], list[package.Blob]]:
    """The manifest's state buffers and the blobs of their initial values (none for a buffer of zeros)."""
    records, blobs = [], []
    for i, name in enumerate(sorted(tensors)):
        t = tensors[name].detach()
        init = "zeros"
        if t.numel() and bool(torch.any(t != 0)):
            init = fmt.state_blob(i)
            blobs.append(package.Blob(init, package.tensor_bytes(t)))
        records.append(StateRecord(name=name, dtype=dtype_name(t.dtype), shape=tuple(t.shape), init=init))
    return records, blobs


def position_rules(model: Any, cache_positions: Any, kwargs: dict, args: tuple,
                   param_names: tuple[str, ...]) -> list[PositionRule]:
    """The cache-position rules of a stateful pack, as the manifest's records.

    ``cache_positions`` is a dict ``{"input": NAME, "limit": CACHE_LEN, "span": N or [INPUT, DIM]}`` or a list
    of them; None derives the rule of Hugging Face's ``TorchExportableModuleWithStaticCache`` (its
    ``cache_position`` input starts the positions that one call writes, one per token of ``input_ids``, into
    a cache of ``max_cache_len``) and gives none for other models.
    """
    if cache_positions is None:
        rule = _static_cache_rule(model, kwargs)
        rules = [rule] if rule else []
    else:
        rules = cache_positions if isinstance(cache_positions, (list, tuple)) else [cache_positions]
    names = set(param_names[: len(args)]) | set(kwargs)
    values = dict(zip(param_names, args)) | kwargs
    out = []
    for i, rule in enumerate(rules):
        where = f"cache_positions[{i}]"
        if not isinstance(rule, dict) or set(rule) - {"input", "limit", "span"} or "input" not in rule \
                or "limit" not in rule:
            raise BuildError(f"{where} must be a dict with keys 'input', 'limit' and optionally 'span' "
                             f"(e.g. {{'input': 'cache_position', 'limit': 64, 'span': ['input_ids', 1]}}), got {rule!r}")
        name, limit, span = rule["input"], rule["limit"], rule.get("span", 1)
        if name not in names:
            raise BuildError(f"{where} names the input {name!r}, which the model is not called with (its inputs: "
                             f"{', '.join(sorted(names))})")
        t = values[name]
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype.is_floating_point or t.dtype.is_complex:
            raise BuildError(f"{where}: the input {name!r} must be a 1-D integer tensor of cache positions, got "
                             f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}"
                             f"{list(t.shape) if isinstance(t, torch.Tensor) else ''}")
        if type(limit) is not int or limit < 1:
            raise BuildError(f"{where}: limit (the cache length) must be a positive integer, got {limit!r}")
        if isinstance(span, (list, tuple)):
            if len(span) != 2 or span[0] not in names or not isinstance(values[span[0]], torch.Tensor) \
                    or type(span[1]) is not int or not 0 <= span[1] < values[span[0]].dim():
                raise BuildError(f"{where}: span must be an integer or [INPUT, DIM] naming a tensor input and one "
                                 f"of its dimensions, got {span!r}")
            span_rule: Any = (span[0], span[1])
        elif type(span) is int and span >= 0:
            span_rule = span
        else:
            raise BuildError(f"{where}: span must be a non-negative integer or [INPUT, DIM], got {span!r}")
        out.append(PositionRule(input=name, limit=limit, span=span_rule))
    return out


def _static_cache_rule(model: Any, kwargs: dict) -> dict | None:
    """The rule of Hugging Face's static-cache export wrapper, recognised by what it has (no import)."""
    cache = getattr(model, "static_cache", None)
    layers = getattr(cache, "layers", None) or [None]
    limit = getattr(cache, "max_cache_len", None) or getattr(layers[0], "max_cache_len", None)
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return None
    if type(limit) is not int or "cache_position" not in params or "cache_position" not in kwargs:
        return None
    for source in ("input_ids", "inputs_embeds"):
        if isinstance(kwargs.get(source), torch.Tensor):
            return {"input": "cache_position", "limit": limit, "span": [source, 1]}
    return None


def _tolerance(dtype: torch.dtype) -> float:
    return 2e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4


def _differs(got: Any, want: Any) -> str | None:
    """How ``got`` differs from ``want`` (a structure of tensors and values), or None."""
    g_flat, g_spec = pytree.tree_flatten(got)
    w_flat, w_spec = pytree.tree_flatten(want)
    if g_spec != w_spec:
        return f"its structure is {g_spec}, eager's is {w_spec}"
    for i, (g, w) in enumerate(zip(g_flat, w_flat)):
        if not isinstance(w, torch.Tensor):
            if g != w:
                return f"leaf {i} is {g!r}, eager's is {w!r}"
            continue
        if not isinstance(g, torch.Tensor) or g.shape != w.shape or g.dtype != w.dtype:
            return f"leaf {i} is {_describe(g)}, eager's is {_describe(w)}"
        if not w.numel():
            continue
        if not (w.dtype.is_floating_point or w.dtype.is_complex):
            if not torch.equal(g.cpu(), w.cpu()):
                return f"leaf {i} differs from eager's in {int((g.cpu() != w.cpu()).sum())} of {w.numel()} elements"
            continue
        g64, w64 = g.detach().cpu().to(torch.complex128 if w.is_complex() else torch.float64), \
            w.detach().cpu().to(torch.complex128 if w.is_complex() else torch.float64)
        scale = max(float(w64.abs().max()), 1e-6)
        err = float((g64 - w64).abs().max())
        if not err <= _tolerance(w.dtype) * scale:  # also catches NaN
            return f"leaf {i} differs from eager's by {err:.3g} (scale {scale:.3g}, tolerance {_tolerance(w.dtype):g})"
    return None


def _describe(v: Any) -> str:
    return f"a tensor {dtype_name(v.dtype)}{list(v.shape)}" if isinstance(v, torch.Tensor) else repr(v)


def crossing_sequence(methods: list[tuple[str, Callable, tuple, dict]]) -> list[tuple[str, Callable, tuple, dict]]:
    """The calls the check makes on a pack of several methods: each method once, in the order given (e.g.
    encode, decode), then the last one again, ``CHECKED_CALLS`` calls at least (encode, decode, decode)."""
    return list(methods) + [methods[-1]] * max(1, CHECKED_CALLS - len(methods))


def check_against_eager(model: Any, path: str, args: tuple, kwargs: dict, names: tuple[str, ...],
                        say: Callable[[str], None], sequence: list | None = None) -> None:
    """Run the built pack and eager side by side for ``CHECKED_CALLS`` calls from the initial state on the
    example inputs, comparing every output and the final state; raise BuildError at the first difference.
    ``sequence`` (a pack of several methods): the calls instead, each ``(method, eager callable, args,
    kwargs)``, all in one session.

    Eager runs on the model itself; its state buffers are restored afterwards."""
    import aotpack_runtime

    buffers = dict(model.named_buffers()) if isinstance(model, torch.nn.Module) else {}
    missing = [n for n in names if n not in buffers]
    if missing:
        raise BuildError(f"the state buffers {missing} are not buffers of the model; cannot check the pack")
    saved = {n: buffers[n].detach().clone() for n in names}
    with tempfile.TemporaryDirectory(prefix="aotpack-check-") as cache, contextlib.ExitStack() as restore:
        restore.callback(lambda: [buffers[n].copy_(saved[n]) for n in names])
        try:
            pkg = aotpack_runtime.load(path, cache_dir=os.path.join(cache, "c"))
            session = pkg.session()
        except AotpackError as e:
            raise BuildError(f"the built pack cannot be loaded to check it against eager: {e}") from None
        calls = sequence or [(None, model, args, kwargs)] * CHECKED_CALLS
        total = len(calls)
        with torch.no_grad():
            for call, (method, eager, c_args, c_kwargs) in enumerate(calls, 1):
                what = f"call {call} of {total}" + (f" ({method})" if method else "")
                try:
                    got = session(*c_args, **c_kwargs) if method is None else getattr(session, method)(*c_args,
                                                                                                      **c_kwargs)
                except AotpackError as e:
                    raise BuildError(f"the built pack fails {what} on the example inputs: {e}") from None
                want = eager(*c_args, **c_kwargs)
                why = _differs(got, want)
                if why is None:
                    state = session.state_dict()
                    for n in names:
                        why = _differs(state[n], buffers[n])
                        if why is not None:
                            why = f"after the call, state {n!r}: {why.replace('leaf 0 ', '')}"
                            break
                else:
                    why = f"output {why}"
                if why is not None:
                    raise BuildError(
                        f"the compiled code does not match eager on {what} from the initial "
                        f"state: {why}. Inductor may have folded a state value into the code or lost an in-place "
                        "write; report it with the model, and keep serving the model in eager meanwhile")
    if sequence:
        say(f"      state: compiled code matches eager on {total} successive calls ({', '.join(m for m, *_ in calls)}; "
            f"outputs and {len(names)} state buffers, one session)")
    else:
        say(f"      state: compiled code matches eager on {CHECKED_CALLS} successive calls (outputs and {len(names)} "
            "state buffers)")
