"""Property test of the guards (issue 6): an input that differs from the packaged example in any way either
gives the eager model's answer or raises GuardError naming the input; never a silently different answer,
never another exception.

Hypothesis (derandomized: every run draws the same inputs) starts from each example pack's own example
inputs and changes up to three of them: a tensor's values, dtype, a dim, its rank, its strides (transposed,
sliced, expanded, overlapping), its storage offset, its memory format, its device, requires_grad, its kind
(subclass, Parameter, sparse, nested, inference tensor, lazy conjugate or negation, ZeroTensor, a storage
resized below what its sizes address, a Python value or None in its place), or the value of a specialised
keyword argument; and sometimes the arguments' structure (positional arguments added or left out, keyword
arguments added, left out or passed positionally, positional ones passed by name). Then it calls the pack
under grad mode, no_grad or inference_mode.

``AOTPACK_FUZZ_EXAMPLES=N`` draws N inputs per pack instead of the CI budget.
"""
from __future__ import annotations

import inspect
import math
import os
import re
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import aotpack

EXAMPLES = int(os.environ.get("AOTPACK_FUZZ_EXAMPLES", "500"))

# A GuardError must say which input it is about: a leaf's path, or the arguments' count or keywords.
PATH = re.compile(r"\((args\[\d+\]|kwargs\['\w+'\])\)")
STRUCTURE = re.compile(r"positional argument|keyword argument")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8,
          torch.bool, torch.complex64]
GRAD_MODES = {"grad mode": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


class Subclass(torch.Tensor):
    pass


_packages: dict = {}


def _package(built) -> aotpack.Package:
    if built.path not in _packages:
        _packages[built.path] = aotpack.load(built.path)
    return _packages[built.path]


def _values(shape, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A fresh tensor of this shape and dtype."""
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) < 0.7
    if dtype.is_floating_point or dtype.is_complex:
        return (torch.randn(shape, generator=gen) * 3).to(dtype)
    return torch.randint(0, 5, shape, generator=gen).to(dtype)


def _contiguous_strides(shape) -> tuple:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.insert(0, acc)
        acc *= max(n, 1)
    return tuple(strides)


def _tensor_changes(t: torch.Tensor) -> list[str]:
    """The changes that apply to this tensor."""
    kinds = ["fresh values", "dtype", "size", "rank up", "storage offset", "meta device", "subclass",
             "inference tensor", "not a tensor", "as_strided", "storage resized", "zero tensor"]
    if t.dim() > 0:
        kinds += ["rank down", "sliced", "sparse", "nested tensor"]
    if t.dim() >= 2:
        kinds.append("transposed")
    if any(n > 1 for n in t.shape):
        kinds.append("expanded")
    if t.dim() == 4:
        kinds.append("channels_last")
    if t.is_floating_point():
        kinds += ["requires_grad", "parameter", "special values", "negative view", "lazy conjugate"]
    return kinds


def change_tensor(draw, t: torch.Tensor, gen: torch.Generator) -> tuple[str, object]:
    """(what was changed, the new value) for one tensor input."""
    kind = draw(st.sampled_from(_tensor_changes(t)))
    shape = tuple(t.shape)
    if kind == "fresh values":  # the same layout: the pack must compute, not replay the example
        return kind, torch.empty_strided(shape, t.stride(), dtype=t.dtype).copy_(_values(shape, t.dtype, gen))
    if kind == "dtype":
        dtype = draw(st.sampled_from([d for d in DTYPES if d != t.dtype]))
        return f"dtype {dtype}", _values(shape, dtype, gen)
    if kind == "size":
        if not shape:
            return "rank 1", _values((2,), t.dtype, gen)
        d = draw(st.integers(0, t.dim() - 1))
        n = draw(st.integers(0, shape[d] + 2).map(lambda n: n if n < shape[d] else n + 1))  # any but shape[d]
        return f"dim {d} = {n}", _values(shape[:d] + (n,) + shape[d + 1:], t.dtype, gen)
    if kind == "rank up":
        d = draw(st.integers(0, t.dim()))
        return f"unsqueeze({d})", t.unsqueeze(d)
    if kind == "rank down":
        how = draw(st.sampled_from(["t[0]", "flattened", "0-dim"]))
        return how, {"t[0]": t[0], "flattened": t.reshape(-1), "0-dim": t.reshape(-1)[0]}[how]
    if kind == "storage offset":
        k = draw(st.integers(1, 100))
        return f"storage offset {k}", torch.cat([_values((k,), t.dtype, gen), t.reshape(-1)])[k:].view(shape)
    if kind == "storage resized":  # the sizes and strides still say where the elements were
        keep = draw(st.integers(0, max(t.numel() * t.element_size() - 1, 0)))
        out = t.clone()
        out.untyped_storage().resize_(keep)
        return f"storage resized to {keep} bytes", out
    if kind == "zero tensor":
        return "ZeroTensor", torch._efficientzerotensor(shape, dtype=t.dtype)
    if kind == "meta device":
        return "on meta", torch.empty_like(t, device="meta")
    if kind == "subclass":
        return "subclass", t.as_subclass(Subclass)
    if kind == "inference tensor":
        with torch.inference_mode():
            return "inference tensor", t.clone()
    if kind == "not a tensor":
        what = draw(st.sampled_from(["None", "int", "float", "bool", "list", "numpy array", "str"]))
        value = {"None": None, "int": 1, "float": 0.5, "bool": True, "list": t.tolist(), "str": "x",
                 "numpy array": np.zeros(shape)}[what]
        return f"{what} in place of a tensor", value
    if kind == "as_strided":  # zero and overlapping strides over a small storage
        strides = tuple(draw(st.lists(st.integers(0, 3), min_size=t.dim(), max_size=t.dim())))
        span = 1 + sum((n - 1) * s for n, s in zip(shape, strides) if n > 0)
        return f"as_strided{strides}", _values((span,), t.dtype, gen).as_strided(shape, strides)
    if kind == "sliced":
        d = draw(st.integers(0, t.dim() - 1))
        big = _values(shape[:d] + (2 * shape[d],) + shape[d + 1:], t.dtype, gen)
        return f"every other element of dim {d}", big[(slice(None),) * d + (slice(None, None, 2),)]
    if kind == "sparse":
        return "sparse", t.to_sparse()
    if kind == "nested tensor":
        return "nested tensor", nested(t)
    if kind == "transposed":
        order = draw(st.permutations(range(t.dim())))
        inverse = [order.index(i) for i in range(t.dim())]
        return f"memory order {order}", t.permute(order).contiguous().permute(inverse)
    if kind == "expanded":
        d = draw(st.sampled_from([i for i, n in enumerate(shape) if n > 1]))
        return f"expanded along dim {d}", _values(shape[:d] + (1,) + shape[d + 1:], t.dtype, gen).expand(shape)
    if kind == "channels_last":
        return "channels_last", t.contiguous(memory_format=torch.channels_last)
    if kind == "requires_grad":
        return "requires_grad", t.detach().clone().requires_grad_()
    if kind == "parameter":
        grad = draw(st.booleans())
        return f"Parameter(requires_grad={grad})", torch.nn.Parameter(t.detach().clone(), requires_grad=grad)
    if kind == "special values":
        out = t.clone().reshape(-1)
        for _ in range(draw(st.integers(1, 3))):
            out[draw(st.integers(0, out.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf, -0.0]))
        return "special values", out.view(shape)
    if kind == "negative view":
        return "negative view", negative_view(t)
    assert kind == "lazy conjugate"
    return "lazy conjugate", t.to(torch.complex64).conj()


def negative_view(t: torch.Tensor) -> torch.Tensor:
    """A tensor equal to ``t``, with ``t``'s strides, whose storage holds -t under the lazy negation bit.
    Made with public calls: the imaginary part of a conjugate is a negation view; as_strided lays it out."""
    floats = torch.zeros(t.numel() + 2 - t.numel() % 2, dtype=t.dtype)  # room for an offset of 1, even
    floats[1:t.numel() + 1] = -t.reshape(-1)
    imag = torch.view_as_complex(floats.view(-1, 2)).conj().imag
    return imag.as_strided(t.shape, _contiguous_strides(t.shape), 1)


def nested(t: torch.Tensor) -> torch.Tensor:
    """A nested tensor (strided layout, like a plain tensor) holding ``t``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the nested tensor API is in prototype stage"
        return torch.nested.nested_tensor([t])


def change_value(draw, value: object) -> tuple[str, object]:
    """Another value (or the same value, by another route) for a specialised non-tensor input."""
    others = st.sampled_from([value, -0.0, 0.0, 1, True, None, "0.5", math.nan, math.inf]) | st.floats() \
        | st.integers(-3, 3)
    if type(value) in (int, float):  # the same number as another type
        others |= st.sampled_from([np.float64(value), torch.tensor(value), float(value), int(value)])
        others |= st.just(nested(torch.tensor([value])))
    new = draw(others)
    return f"value {new!r}", new


STRUCTURE_CHANGES = ["drop the last positional argument", "extra positional argument", "drop a keyword argument",
                     "extra keyword argument", "keyword argument passed positionally",
                     "positional argument passed by keyword"]


def positional_names(built) -> list[str]:
    return [p.name for p in inspect.signature(built.model.forward).parameters.values()
            if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]


def change_structure(draw, args: list, kwargs: dict, names: list[str], gen: torch.Generator) -> str:
    """Change the arguments' number or kind in place; return what was done."""
    kind = draw(st.sampled_from(STRUCTURE_CHANGES))
    if kind == "drop the last positional argument" and args:
        args.pop()
    elif kind == "extra positional argument":
        args.append(draw(st.sampled_from([None, 1.0, "tensor"])))
        if args[-1] == "tensor":
            args[-1] = _values((2, 3), torch.float32, gen)
    elif kind == "drop a keyword argument" and kwargs:
        del kwargs[draw(st.sampled_from(sorted(kwargs)))]
    elif kind == "extra keyword argument":
        name = draw(st.sampled_from(["bias", "scale", "x", "tokens", "mask", "temperature", "out"]))
        kwargs[name] = draw(st.sampled_from([None, 1.0, 2, "tensor"]))
        if kwargs[name] == "tensor":
            kwargs[name] = _values((2, 12), torch.bool, gen)
    elif kind == "keyword argument passed positionally" and kwargs:
        args.append(kwargs.pop(draw(st.sampled_from(sorted(kwargs)))))
    elif kind == "positional argument passed by keyword" and 0 < len(args) <= len(names):
        kwargs[names[len(args) - 1]] = args.pop()
    else:
        return "nothing (no argument of that kind)"
    return kind


def draw_call(draw, built) -> tuple[list, dict, str, list[str], bool]:
    """(args, kwargs, grad mode, what was changed, whether the arguments' structure was changed).

    Up to three inputs are changed, each once, from its example value; then, sometimes, the structure."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    args, kwargs = list(built.args), dict(built.kwargs)
    slots = [("args", i) for i in range(len(args))] + [("kwargs", k) for k in kwargs]
    n = min(draw(st.sampled_from([0, 1, 1, 1, 2, 3])), len(slots))
    changes = []
    for where, key in draw(st.permutations(slots))[:n]:
        container = args if where == "args" else kwargs
        old = container[key]
        what, container[key] = (change_tensor(draw, old, gen) if isinstance(old, torch.Tensor)
                                else change_value(draw, old))
        changes.append(f"{where}[{key!r}]: {what}")
    structural = n == 0 or draw(st.integers(0, 3)) == 0
    if structural:
        changes.append(change_structure(draw, args, kwargs, positional_names(built), gen))
    return args, kwargs, draw(st.sampled_from(sorted(GRAD_MODES))), changes, structural


def changed_paths(changes: list[str]) -> set[str]:
    return {c.split(":", 1)[0] for c in changes if c.startswith(("args[", "kwargs["))}


@settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_result_is_eager_or_guard_error(example_pack, data):
    pkg = _package(example_pack)
    args, kwargs, mode, changes, structural = draw_call(data.draw, example_pack)
    note = f"{example_pack.name}: {'; '.join(changes)}; under {mode}"
    try:
        with GRAD_MODES[mode]():
            out = pkg(*args, **kwargs)
    except aotpack.GuardError as e:
        message = str(e)
        # Named: a changed input's path, or the arguments' count or keywords after a structural change.
        paths = set(PATH.findall(message))
        assert paths or (structural and STRUCTURE.search(message)), f"{note}: the error names no input: {message}"
        assert structural or paths & changed_paths(changes), f"{note}: the error names another input: {message}"
        event("GuardError")
        return
    event("ran, compared with eager")
    with torch.no_grad():
        expected = example_pack.model(*args, **kwargs)
    torch.testing.assert_close(out, expected, equal_nan=True, msg=lambda m: f"{note}: pack != eager: {m}")
    assert not any(t.requires_grad for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)), note


def test_negative_view_is_refused_or_right(convnet_pack):
    x = convnet_pack.args[0]
    try:
        with torch.no_grad():
            out = _package(convnet_pack)(negative_view(x))
    except aotpack.GuardError as e:
        assert "(args[0])" in str(e)
        return
    with torch.no_grad():
        torch.testing.assert_close(out, convnet_pack.model(x))


def test_nested_tensor_is_refused(mlp_pack):
    with pytest.raises(aotpack.GuardError, match=r"\(args\[0\]\)"):
        _package(mlp_pack)(nested(mlp_pack.args[0]))
