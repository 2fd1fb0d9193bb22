"""Guards as data, and the check that runs before every call.

An entry's guards are plain JSON in the manifest (see docs/FORMAT.md, "Guards"), read into the records of
``schema`` (``InputGuards``: ``TensorGuard``, ``ValueGuard``):

* ``inputs``: the structure of ``(args, kwargs)`` as a tree of ``tuple``/``list``/``dict``/``none``/``leaf``
  nodes, with the path and parameter name of each leaf;
* ``leaves``: one guard per leaf, in flattening order: a tensor guard (dtype, device, sizes with symbols or
  polynomials over them, strides, requires_grad, whether the pack writes into it) or a value guard (the exact
  Python value the graph specialised on);
* ``symbols``: the range of each symbolic size (``[min, None]`` without an upper bound).

A derived size (``2*d + 1``) binds its symbol when no plain size does: the matcher checks every tensor first,
then solves the derived sizes.

:class:`EntryGuards` turns those records into a fast matcher (``match``) that returns the flat tensors to hand to
native code, or ``None``; ``explain`` re-walks the input slowly to say which guard failed, for the error.

May not: run native code or read the archive: it checks a call's inputs against plain data.
"""
from __future__ import annotations

from typing import Any

import torch

from .errors import ArchiveError
from .format import DTYPES
from .schema import VALUE_TYPES, InputGuards, TensorGuard, ValueGuard, describe_layout
from .symbolic import Poly

DTYPE_BY_NAME = {name: getattr(torch, name) for name in DTYPES}
_NAME_BY_DTYPE = {v: k for k, v in DTYPE_BY_NAME.items()}
_INF = float("inf")
_Tensor, _Parameter, _strided = torch.Tensor, torch.nn.Parameter, torch.strided


# A guard's device: "cpu"; "cuda" (no index) accepts a CUDA tensor on any device, since the compiled code
# runs on the device of its inputs; a device with an index ("cuda:1") only that one. The hot path tests the
# first two through ``Tensor.is_cpu`` / ``is_cuda`` (about 35 ns, where building ``t.device`` and comparing
# it costs 60 ns, and ``t.device.type`` over 200 ns).
_CPU = "cpu"
_ANY_CUDA = "cuda"


def _device_check(device: str) -> Any:
    """What the hot path compares a tensor's device with: the ``_CPU`` or ``_ANY_CUDA`` marker (checked by
    identity), else the exact ``torch.device``."""
    if device == "cpu":
        return _CPU
    if device == "cuda":
        return _ANY_CUDA
    return torch.device(device)


def device_matches(guard_device: str, actual: torch.device) -> bool:
    """Whether a tensor on ``actual`` passes a guard on ``guard_device`` (an index-less guard accepts any index)."""
    want = torch.device(guard_device)
    return actual.type == want.type if want.index is None else actual == want


def dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype's name for people (``float32``), also for dtypes the format cannot store."""
    return _NAME_BY_DTYPE.get(dtype, str(dtype).replace("torch.", ""))


def stored_dtype(dtype: torch.dtype) -> str | None:
    """The format's name of a torch dtype, or None when the format cannot store it (the build refuses it)."""
    return _NAME_BY_DTYPE.get(dtype)


def _spec_leaves(node: dict, path: str, out: list[str]) -> None:
    kind = node["type"]
    if kind == "leaf":
        out.append(path)
    elif kind in ("tuple", "list"):
        for i, c in enumerate(node["children"]):
            _spec_leaves(c, f"{path}[{i}]", out)
    elif kind == "dict":
        for k, c in zip(node["keys"], node["children"]):
            _spec_leaves(c, f"{path}[{k!r}]", out)


def _type_word(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        if value.is_nested:  # has no shape
            return f"a nested tensor {dtype_name(value.dtype)}"
        return f"a tensor {dtype_name(value.dtype)}{list(value.shape)}"
    if value is None:
        return "None"
    return f"{type(value).__name__} {value!r}" if isinstance(value, (int, float, bool, str)) \
        else type(value).__name__


class _Mismatch(Exception):
    """Raised inside :meth:`EntryGuards.explain` with the first reason found."""


class EntryGuards:
    """The guards of one entry, compiled into a fast matcher and a slow explainer."""

    def __init__(self, inputs: dict, leaves: list, symbols: dict, param_names: list[str]):
        self.inputs = inputs
        self.leaves = leaves
        self.symbols = symbols  # name -> (min, max); max None: no upper bound
        self.param_names = param_names
        self._bounds = {k: (lo, _INF if hi is None else hi) for k, (lo, hi) in symbols.items()}
        args_node, kwargs_node = inputs["children"]
        self._n_args = len(args_node["children"])
        self._kw_keys = tuple(kwargs_node["keys"])
        # The common case, no nesting (leaves directly in args and kwargs), skips the tree walk.
        self._flat = all(c["type"] == "leaf" for c in args_node["children"] + kwargs_node["children"])
        self._tensor_checks = []
        self._value_checks = []
        self._static = True
        self._derived = False  # some size is a polynomial: solved once every tensor was seen
        # Positions, among the tensor leaves, of the inputs the code writes into: none may share memory with
        # another input (the code assumes its inputs do not alias; eager would see the writes through both).
        tensor_guards = [g for g in leaves if isinstance(g, TensorGuard)]
        self._written = tuple(k for k, g in enumerate(tensor_guards) if g.mutated)
        for i, g in enumerate(leaves):
            if isinstance(g, TensorGuard):
                if any(not isinstance(x, int) for x in g.sizes):
                    self._static = False
                if any(isinstance(x, Poly) for x in g.sizes):
                    self._derived = True
                stride_idx = tuple(d for d, st in enumerate(g.strides) if isinstance(st, int))
                exp_strides = tuple(g.strides[d] for d in stride_idx)
                full_strides = len(stride_idx) == len(g.strides)
                sym_strides = tuple((d, st) for d, st in enumerate(g.strides) if isinstance(st, Poly))
                # The elements a static tensor addresses past its storage offset (its strides are known on every
                # dim longer than 1); for a symbolic one, _DENSE when its layout is contiguous (the span is then its
                # element count, once its strides are checked), else None (worked out from the call's strides).
                if all(type(n) is int for n in g.sizes) and \
                        all(type(st) is int or n <= 1 for n, st in zip(g.sizes, g.strides)):
                    span = _span(g.sizes, g.strides)
                else:
                    span = _DENSE if g.layout() == "contiguous" else None
                self._tensor_checks.append((i, DTYPE_BY_NAME[g.dtype], _device_check(g.device), len(g.sizes),
                                            tuple(g.sizes), stride_idx, exp_strides, full_strides, span,
                                            DTYPES[g.dtype], sym_strides))
            else:
                self._value_checks.append((i, VALUE_TYPES[g.type], g.value))

    def label(self) -> str:
        """A short name for people: the symbol ranges of a dynamic entry, else the first tensor's sizes."""
        if self.symbols:
            return ", ".join(f"{k} {lo}..{hi}" if hi is not None else f"{k} >= {lo}"
                             for k, (lo, hi) in self.symbols.items())
        for g in self.leaves:
            if isinstance(g, TensorGuard):
                return f"{g.name} {list(g.sizes)}"
        return "no tensors"

    @classmethod
    def of(cls, guards: InputGuards | Any, where: str = "entry") -> "EntryGuards":
        """The matcher of a schema record's guards (``InputGuards``, or an entry's ``Guards``: checked records).
        A device the schema allows but this torch does not know is an ArchiveError naming ``where``."""
        for i, g in enumerate(guards.leaves):
            if isinstance(g, TensorGuard):
                try:
                    torch.device(g.device)
                except RuntimeError:
                    raise ArchiveError(f"{where}.leaves[{i}].device {g.device!r} is not a device name") from None
        return cls(guards.inputs, list(guards.leaves), dict(guards.symbols), list(guards.param_names))

    @classmethod
    def from_json(cls, entry: dict, where: str) -> "EntryGuards":
        """The matcher of guards given as manifest JSON (checked: ``schema.InputGuards``)."""
        return cls.of(InputGuards.from_json(entry, where), where)

    # -- the hot path -------------------------------------------------------------------------------

    def bind(self, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """``(args, kwargs)`` with the positional parameters the call passed by name moved to their positions,
        as Python binds them (``pkg(x=t)`` for ``forward(self, x)``); None when that does not give the packaged
        structure's number of positional arguments."""
        start = len(args)
        names = self.param_names[start:self._n_args]
        if start >= self._n_args or len(names) != self._n_args - start or any(k not in kwargs for k in names):
            return None
        return (*args, *[kwargs[k] for k in names]), {k: v for k, v in kwargs.items() if k not in names}

    def flatten(self, args: tuple, kwargs: dict) -> list | None:
        """The input's leaves in spec order, or None when its structure differs from the spec."""
        if len(args) != self._n_args or len(kwargs) != len(self._kw_keys):
            bound = self.bind(args, kwargs) if kwargs else None
            if bound is None:
                return None
            args, kwargs = bound
            if len(kwargs) != len(self._kw_keys):
                return None
        if self._flat:
            if not kwargs:
                return list(args)
            try:
                return [*args, *[kwargs[k] for k in self._kw_keys]]
            except KeyError:
                return None
        out: list = []
        try:
            _walk(self.inputs["children"][0], args, out)
            _walk(self.inputs["children"][1], kwargs, out)
        except _Mismatch:
            return None
        return out

    def match(self, args: tuple, kwargs: dict) -> list | None:
        """Return the tensors to pass to native code if every guard holds, else None."""
        leaves = self.flatten(args, kwargs)
        if leaves is None:
            return None
        grad = torch.is_grad_enabled()
        bound: dict | None = None if self._static else {}
        pending: list | None = [] if self._derived else None
        tensors = []
        deferred = []
        for i, dtype, device, rank, sizes, stride_idx, exp_strides, full, span, itemsize, _ in self._tensor_checks:
            t = leaves[i]
            tp = type(t)
            if (tp is not _Tensor and tp is not _Parameter) or t.dtype is not dtype \
                    or not (t.is_cpu if device is _CPU else t.is_cuda if device is _ANY_CUDA else t.device == device) \
                    or t.layout is not _strided or (grad and t.requires_grad) or t.is_nested:
                return None
            if bound is None:
                if t.shape != sizes:
                    return None
            elif not self._sizes_ok(t.shape, rank, sizes, bound, pending):
                return None
            st = t.stride()
            if full:
                if st != exp_strides:
                    return None
            elif tuple(st[d] for d in stride_idx) != exp_strides:
                return None
            if t.is_neg() or (dtype.is_complex and t.is_conj()):  # x.conj().imag is real, with the negation bit
                return None
            # The code reads every element the sizes and strides address: the storage must hold them all (a
            # storage resized to zero, or a ZeroTensor, which has none, would make it read unmapped memory). A
            # symbolic tensor is checked once its strides are.
            if span is None or span is _DENSE:
                deferred.append((t, span, itemsize))
            elif span and not _holds(t, span, itemsize):
                return None
            tensors.append(t)
        if pending and not self._solve(pending, bound):
            return None
        if self._written and _shares_memory(tensors, self._written) is not None:
            return None
        if bound is not None:  # symbolic strides, once every size symbol is bound
            for i, *_, sym_strides in self._tensor_checks:
                for d, poly in sym_strides:
                    if leaves[i].stride(d) != poly.eval(bound):
                        return None
        for t, span, itemsize in deferred:
            span = t.numel() if span is _DENSE else _span(t.shape, t.stride())
            if span and not _holds(t, span, itemsize):
                return None
        for i, vtype, value in self._value_checks:
            v = leaves[i]
            if type(v) is not vtype or v != value:
                return None
        return tensors

    def _sizes_ok(self, shape, rank, sizes, bound, pending) -> bool:
        if len(shape) != rank:
            return False
        for actual, want in zip(shape, sizes):
            tw = type(want)
            if tw is int:
                if actual != want:
                    return False
            elif tw is str:
                prev = bound.get(want)
                if prev is None:
                    lo, hi = self._bounds[want]
                    if actual < lo or actual > hi:
                        return False
                    bound[want] = actual
                elif prev != actual:
                    return False
            else:  # a derived size: checked once every tensor was seen
                pending.append((actual, want))
        return True

    def _solve(self, pending: list, bound: dict) -> bool:
        """Check the derived sizes, binding each symbol that only they determine (``a*d + b = size``)."""
        while pending:
            rest = []
            for actual, poly in pending:
                free = [s for s in poly.symbols if s not in bound]
                if not free:
                    if poly.eval(bound) != actual:
                        return False
                    continue
                ab = poly.linear(free[0], bound) if len(free) == 1 else None
                if ab is None:
                    rest.append((actual, poly))
                    continue
                value, rem = divmod(actual - ab[1], ab[0])
                lo, hi = self._bounds[free[0]]
                if rem or value < lo or value > hi:
                    return False
                bound[free[0]] = value
            if len(rest) == len(pending):
                return False  # no size determines the remaining symbols
            pending = rest
        return True

    # -- the slow path: say why -------------------------------------------------------------------

    def explain(self, args: tuple, kwargs: dict) -> str:
        """The first guard this input fails, as a sentence for people ("" if it passes)."""
        try:
            bound_call = self.bind(args, kwargs) if kwargs and len(args) < self._n_args else None
            if bound_call is not None:
                args, kwargs = bound_call
            self._explain_structure(args, kwargs)
            leaves = self.flatten(args, kwargs)
            if leaves is None:  # pragma: no cover - _explain_structure names every structural mismatch
                return "input structure differs from the packaged one"
            bound: dict = {}
            where: dict = {}
            pending: list = []
            for g, v in zip(self.leaves, leaves):
                self._explain_leaf(g, v, bound, where, pending)
            self._explain_derived(pending, bound, where)
            for g, v in zip(self.leaves, leaves):
                if isinstance(g, TensorGuard):
                    self._explain_strides(g, v, bound)
            tensor_leaves = [(g, v) for g, v in zip(self.leaves, leaves) if isinstance(g, TensorGuard)]
            pair = _shares_memory([v for _, v in tensor_leaves], self._written) if self._written else None
            if pair is not None:
                (w, _), (o, _) = tensor_leaves[pair[0]], tensor_leaves[pair[1]]
                raise _Mismatch(f"input {w.name!r} ({w.path}) shares memory with input {o.name!r} ({o.path}); the "
                                f"pack writes into {w.path} and its code assumes that no other input sees those "
                                "writes: pass tensors that do not overlap (.clone() one of them)")
        except _Mismatch as m:
            return str(m)
        return ""

    def call_form(self) -> str:
        """How to call the pack, for people: ``pkg(x, mask=..., temperature=...)``."""
        names = [self.param_names[i] if i < len(self.param_names) else f"arg{i}" for i in range(self._n_args)]
        return f"pkg({', '.join(names + [f'{k}=...' for k in self._kw_keys])})"

    def _explain_structure(self, args: tuple, kwargs: dict) -> None:
        names = self.param_names
        how = f"; call it as {self.call_form()}"
        twice = [i for i, k in enumerate(names[:len(args)]) if k in kwargs]
        if twice:
            raise _Mismatch(f"positional argument {names[twice[0]]!r} (args[{twice[0]}]) is also given as a keyword "
                            f"argument{how}")
        if len(args) != self._n_args:
            listed = ", ".join(names[: self._n_args])
            raise _Mismatch(f"expected {self._n_args} positional argument{'s' if self._n_args != 1 else ''}"
                            f"{f' ({listed})' if listed else ''}, actual {len(args)}{how}")
        missing = [k for k in self._kw_keys if k not in kwargs]
        if missing:
            raise _Mismatch(f"missing keyword argument {missing[0]!r} (the pack was built with "
                            f"keyword arguments {list(self._kw_keys)}){how}")
        extra = [k for k in kwargs if k not in self._kw_keys]
        if extra:
            raise _Mismatch(f"unexpected keyword argument {extra[0]!r}: the pack was built with "
                            f"{'keyword arguments ' + str(list(self._kw_keys)) if self._kw_keys else 'no keyword arguments'}"
                            f" (a default value left out at build time is frozen into the pack){how}")
        self._explain_node(self.inputs["children"][0], args, "args")
        self._explain_node(self.inputs["children"][1], kwargs, "kwargs")

    def _explain_node(self, node: dict, value: Any, path: str) -> None:
        kind = node["type"]
        if kind == "leaf":
            return
        if kind == "none":
            if value is not None:
                raise _Mismatch(f"input {path} structure mismatch: expected None, actual {_type_word(value)}")
            return
        if kind in ("tuple", "list"):
            want = tuple if kind == "tuple" else list
            n = len(node["children"])
            if not isinstance(value, want):
                raise _Mismatch(f"input {path} structure mismatch: expected a {kind} of {n}, "
                                f"actual {_type_word(value)}")
            if len(value) != n:
                raise _Mismatch(f"input {path} structure mismatch: expected a {kind} of {n}, "
                                f"actual a {kind} of {len(value)}")
            for i, c in enumerate(node["children"]):
                self._explain_node(c, value[i], f"{path}[{i}]")
            return
        if not isinstance(value, dict):
            raise _Mismatch(f"input {path} structure mismatch: expected a dict with keys {node['keys']}, "
                            f"actual {_type_word(value)}")
        if set(value) != set(node["keys"]):
            raise _Mismatch(f"input {path} structure mismatch: expected keys {sorted(node['keys'])}, "
                            f"actual {sorted(map(str, value))}")
        for k, c in zip(node["keys"], node["children"]):
            self._explain_node(c, value[k], f"{path}[{k!r}]")

    def _explain_leaf(self, g: TensorGuard | ValueGuard, v: Any, bound: dict, where: dict, pending: list) -> None:
        who = f"input {g.name!r} ({g.path})"
        if isinstance(g, ValueGuard):
            if isinstance(v, torch.Tensor) or type(v) is not VALUE_TYPES[g.type]:
                raise _Mismatch(f"{who} type mismatch: expected {g.type} {g.value!r}, actual {_type_word(v)}")
            if v != g.value:
                raise _Mismatch(f"{who} value mismatch: expected {g.value!r}, actual {v!r} (the graph was "
                                "specialised on this value; build the pack with the value you call it with)")
            return
        if not isinstance(v, torch.Tensor):
            raise _Mismatch(f"{who} type mismatch: expected a tensor {g.describe(self.symbols)}, "
                            f"actual {_type_word(v)}")
        if type(v) not in (torch.Tensor, torch.nn.Parameter):
            raise _Mismatch(f"{who} type mismatch: expected a plain torch.Tensor, actual the subclass "
                            f"{type(v).__name__}")
        if v.layout is not torch.strided:
            raise _Mismatch(f"{who} layout mismatch: expected torch.strided, actual {v.layout}")
        if v.is_nested:
            raise _Mismatch(f"{who} layout mismatch: expected a plain strided tensor, actual a nested tensor")
        if dtype_name(v.dtype) != g.dtype:
            raise _Mismatch(f"{who} dtype mismatch: expected {g.dtype}, actual {dtype_name(v.dtype)}")
        if not device_matches(g.device, v.device):
            raise _Mismatch(f"{who} device mismatch: expected {g.device}, actual {v.device}")
        if v.dim() != len(g.sizes):
            raise _Mismatch(f"{who} rank mismatch: expected {len(g.sizes)} dims {g.describe(self.symbols)}, "
                            f"actual {v.dim()} dims {list(v.shape)}")
        for d, (actual, want) in enumerate(zip(v.shape, g.sizes)):
            if isinstance(want, int):
                if actual != want:
                    raise _Mismatch(f"{who} size mismatch at dim {d}: expected {want}, actual {actual} (the pack "
                                    f"was built for size {want} only; to accept other sizes, rebuild it with "
                                    f"--dynamic {g.name}:{d}=MIN..MAX, or dynamic_shapes= in aotpack.build)")
                continue
            if isinstance(want, Poly):
                pending.append((who, d, actual, want))
                continue
            lo, hi = self._bounds[want]
            if actual < lo:
                raise _Mismatch(f"{who} dim {d} ({want}) is {actual}, below {lo}")
            if actual > hi:
                raise _Mismatch(f"{who} dim {d} ({want}) is {actual}, above {hi}")
            if want in bound and bound[want] != actual:
                raise _Mismatch(f"{who} dim {d} ({want}) is {actual}, but {want} is {bound[want]} in "
                                f"{where[want]} (these dims must be equal)")
            bound[want] = actual
            where.setdefault(want, f"{who} dim {d}")
        st = v.stride()
        for d, want in enumerate(g.strides):
            if isinstance(want, int) and st[d] != want:
                self._stride_mismatch(g, v, d, want)
        if v.is_neg() or (v.is_complex() and v.is_conj()):
            raise _Mismatch(f"{who} has a lazy conjugate or negation bit; call .resolve_conj().resolve_neg()")
        self._explain_memory(who, v)
        if torch.is_grad_enabled() and v.requires_grad:
            raise _Mismatch(f"{who} requires_grad mismatch: the tensor requires grad under grad mode, but a pack "
                            "computes no gradients; call it under torch.inference_mode() or torch.no_grad(), "
                            "or pass x.detach()")

    @staticmethod
    def _explain_memory(who: str, v: torch.Tensor) -> None:
        """Say why a tensor's storage cannot hold the elements its sizes, strides and offset address."""
        span = _span(v.shape, v.stride())
        if not span:
            return
        if v._is_zerotensor():
            raise _Mismatch(f"{who} is a ZeroTensor, which has no memory for the code to read; pass a tensor "
                            "that holds its zeros (torch.zeros(...))")
        try:
            have = v.untyped_storage().nbytes()
        except RuntimeError:
            raise _Mismatch(f"{who} has no storage of its own (a functorch or functionalization wrapper?); pass a "
                            "plain tensor") from None
        need = (v.storage_offset() + span) * v.element_size()
        if have < need:
            raise _Mismatch(f"{who} addresses {need} bytes of its storage (offset {v.storage_offset()}, sizes "
                            f"{list(v.shape)}, strides {list(v.stride())}), but its storage holds {have} bytes "
                            "(was it resized or freed?); pass a tensor whose storage holds its elements")

    def _explain_derived(self, pending: list, bound: dict, where: dict) -> None:
        """Say which derived size (``dx + 1``) does not fit the sizes its symbols took elsewhere."""
        while pending:
            rest = []
            for who, d, actual, poly in pending:
                free = [s for s in poly.symbols if s not in bound]
                text = poly.text()
                if not free:
                    expected = poly.eval(bound)
                    if expected != actual:
                        values = ", ".join(f"{s} is {bound[s]} in {where[s]}" for s in poly.symbols)
                        raise _Mismatch(f"{who} dim {d} ({text}) is {actual}, expected {expected} ({values})")
                    continue
                ab = poly.linear(free[0], bound) if len(free) == 1 else None
                if ab is None:
                    rest.append((who, d, actual, poly))
                    continue
                sym = free[0]
                value, rem = divmod(actual - ab[1], ab[0])
                if rem:
                    raise _Mismatch(f"{who} dim {d} ({text}) is {actual}, but {text} is never {actual} for an "
                                    f"integer {sym}")
                lo, hi = self._bounds[sym]
                if value < lo:
                    raise _Mismatch(f"{who} dim {d} ({text}) is {actual}, so {sym} would be {value}, below {lo}")
                if value > hi:
                    raise _Mismatch(f"{who} dim {d} ({text}) is {actual}, so {sym} would be {value}, above {hi}")
                bound[sym] = value
                where[sym] = f"{who} dim {d} ({text})"
            if len(rest) == len(pending):
                who, d, actual, poly = rest[0]
                raise _Mismatch(f"{who} dim {d} ({poly.text()}) is {actual}, and no input gives "
                                f"{', '.join(s for s in poly.symbols if s not in bound)} on its own")
            pending = rest

    def _explain_strides(self, g: TensorGuard, v: torch.Tensor, bound: dict) -> None:
        st = v.stride()
        for d, want in enumerate(g.strides):
            if isinstance(want, Poly) and all(s in bound for s in want.symbols) and st[d] != want.eval(bound):
                self._stride_mismatch(g, v, d, want.eval(bound))

    @staticmethod
    def _stride_mismatch(g: TensorGuard, v: torch.Tensor, d: int, expected: int) -> None:
        exp_layout = g.layout()
        act_layout = describe_layout(tuple(v.shape), tuple(v.stride()))
        raise _Mismatch(f"input {g.name!r} ({g.path}) stride mismatch at dim {d}: expected {expected}, actual "
                        f"{v.stride(d)} (expected layout {exp_layout}, actual {act_layout}; call .contiguous() "
                        "or build the pack with this layout)")


_DENSE = object()  # a guard whose layout is contiguous: a tensor that passed it spans its element count


def _holds(t: torch.Tensor, span: int, itemsize: int) -> bool:
    """Whether ``t``'s storage holds the ``span`` elements from its storage offset on (never for a ZeroTensor,
    which has no memory, or a wrapper without a storage of its own)."""
    if t._is_zerotensor():
        return False
    try:
        return t.untyped_storage().nbytes() >= (t.storage_offset() + span) * itemsize
    except RuntimeError:  # a functorch wrapper
        return False


def _span(shape, strides) -> int:
    """How many elements from its first one a tensor of these sizes and strides spans (0 when empty)."""
    if 0 in shape:
        return 0
    return 1 + sum((n - 1) * s for n, s in zip(shape, strides) if n > 1)


def _shares_memory(tensors: list, written: tuple) -> tuple[int, int] | None:
    """(written input, other input) of the first written input whose memory overlaps another input's, or None.
    A tensor's memory is the range of bytes from its first element to its last; empty tensors hold none. Two
    tensors over different storages may overlap (two views of one numpy array), and two over one storage may
    not (``x[0]`` and ``x[1]``)."""
    ranges = []
    for t in tensors:
        span = _span(t.shape, t.stride())
        start = t.data_ptr()
        ranges.append((start, start + span * t.element_size()) if span else None)
    for k in written:
        if ranges[k] is not None:
            lo, hi = ranges[k]
            for j, other in enumerate(ranges):
                if j != k and other is not None and other[0] < hi and lo < other[1]:
                    return k, j
    return None


def _walk(node: dict, value: Any, out: list) -> None:
    kind = node["type"]
    if kind == "leaf":
        out.append(value)
    elif kind == "none":
        if value is not None:
            raise _Mismatch
    elif kind == "tuple" or kind == "list":
        children = node["children"]
        if not isinstance(value, tuple if kind == "tuple" else list) or len(value) != len(children):
            raise _Mismatch
        for c, v in zip(children, value):
            _walk(c, v, out)
    else:
        keys = node["keys"]
        if not isinstance(value, dict) or len(value) != len(keys):
            raise _Mismatch
        for k, c in zip(keys, node["children"]):
            if k not in value:
                raise _Mismatch
            _walk(c, value[k], out)


def leaf_paths(inputs: dict) -> list[str]:
    """The path of each leaf of an input structure (``args[0]``, ``kwargs['mask']``), in order."""
    out: list[str] = []
    args_node, kwargs_node = inputs["children"]
    _spec_leaves(args_node, "args", out)
    _spec_leaves(kwargs_node, "kwargs", out)
    return out


def rebuild(node: dict, leaves: list, pos: list) -> Any:
    """Rebuild a structure from its tree and a flat list of leaves (``pos`` is a one-item cursor)."""
    kind = node["type"]
    if kind == "leaf":
        v = leaves[pos[0]]
        pos[0] += 1
        return v
    if kind == "none":
        return None
    if kind == "dict":
        return {k: rebuild(c, leaves, pos) for k, c in zip(node["keys"], node["children"])}
    items = [rebuild(c, leaves, pos) for c in node["children"]]
    return tuple(items) if kind == "tuple" else items
