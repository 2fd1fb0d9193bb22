"""Stage 2, guards: turn what the captured graph assumed about its inputs into plain data.

Per entry: the input structure, one guard per input leaf (tensor: dtype, device, sizes or symbols, strides;
value: the exact value the graph specialised on), the symbol ranges, and the output structure, as the
schema's records (``aotpack_runtime.schema.Guards``), which the manifest writes and the runtime's
``aotpack_runtime.guards`` matches calls against; ``docs/FORMAT.md`` documents them.

May not: check a call: the runtime's ``guards`` does, from the data written here.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from aotpack_runtime.errors import CaptureError
from aotpack_runtime.format import DTYPES
from aotpack_runtime.guards import dtype_name, leaf_paths, stored_dtype
from aotpack_runtime.schema import VALUE_TYPES, Guards, OutputLeaf, TensorGuard, ValueGuard
from aotpack_runtime.symbolic import Poly

from . import _torch
from .capture import Captured, spec_to_json

_VALUE_TYPE_NAMES = {v: k for k, v in VALUE_TYPES.items()}


def _dim_names(captured: Captured) -> dict[str, dict[int, str]]:
    """Input path -> {dim: Dim name} from the user's ``dynamic_shapes`` (torch.export's format, nested like
    the inputs); for a derived dim (``dx + 1``) the name of its root ``Dim``, which names the symbol inside the
    expression. ``Dim.AUTO`` and ``Dim.DYNAMIC`` have no name: their symbols are called d0, d1, ..."""
    ds = captured.dynamic_shapes
    if ds is None:
        return {}
    paths = [f"args[{i}]" for i in range(len(captured.args))] + [f"kwargs[{k!r}]" for k in captured.kwargs]
    values = list(captured.args) + list(captured.kwargs.values())
    names = list(captured.param_names) + list(captured.kwargs)
    if isinstance(ds, dict):
        specs = [ds.get(n) for n in names]
    else:
        specs = list(ds) + [None] * (len(values) - len(ds))
    out: dict[str, dict[int, str]] = {}

    def walk(value: Any, spec: Any, path: str) -> None:
        if spec is None:
            return
        if isinstance(value, torch.Tensor):
            items = spec.items() if isinstance(spec, dict) else enumerate(spec) if isinstance(spec, (list, tuple)) \
                else ()
            dims = {int(d): getattr(getattr(dim, "root", dim), "__name__") for d, dim in items
                    if isinstance(getattr(getattr(dim, "root", dim), "__name__", None), str)}
            if dims:
                out[path] = dims
        elif isinstance(value, (tuple, list)) and isinstance(spec, (tuple, list)):
            for i, (v, sp) in enumerate(zip(value, spec)):
                walk(v, sp, f"{path}[{i}]")
        elif isinstance(value, dict) and isinstance(spec, dict):
            for k, v in value.items():
                walk(v, spec.get(k), f"{path}[{k!r}]")

    for value, spec, path in zip(values, specs, paths):
        walk(value, spec, path)
    return out


class _Symbols:
    """Gives each shape symbol of the graph a readable, deterministic name and records its range."""

    def __init__(self, ranges: dict):
        self.ranges = ranges
        self.names: dict[str, str] = {}
        self.table: dict[str, tuple[int, int | None]] = {}

    def name(self, symbol: str, preferred: str | None) -> str:
        if symbol not in self.names:
            name = preferred if preferred and preferred not in self.table else f"d{len(self.table)}"
            lo, hi = _torch.symbol_range(self.ranges.get(symbol))
            self.names[symbol] = name
            self.table[name] = (lo, hi)
        return self.names[symbol]

    def _poly(self, expr: Any, preferred: str | None) -> Poly | None:
        """A sympy expression as a polynomial over the symbols' readable names (a root ``Dim``'s name for the
        one symbol of a derived size), or None when it is not a polynomial."""
        terms = _torch.polynomial_terms(expr)
        if terms is None:
            return None
        symbols = sorted({s for k in terms for s in k})
        named = {sym: self.name(sym, preferred if len(symbols) == 1 else None) for sym in symbols}
        return Poly({tuple(sorted(named[x] for x in k)): c for k, c in terms.items()})

    def _value(self, value: Any, preferred: str | None) -> tuple[int | Poly | None, Any]:
        """A size or stride as an int or a polynomial of the Dims, with its sympy expression (None, expr
        where it is no polynomial)."""
        if not isinstance(value, torch.SymInt):
            return int(value), None
        expr = value.node.expr
        if getattr(expr, "is_number", False):
            return int(expr), expr
        return self._poly(expr, preferred), expr

    def size(self, value: Any, preferred: str | None, who: str, d: int) -> int | str | Poly:
        size, expr = self._value(value, preferred)
        if size is None:
            raise CaptureError(f"{who} dim {d} has a size that is not a polynomial of its Dims ({expr}); packs "
                               "guard sizes that are numbers, Dims, or derived from them as torch.export defines "
                               "(a*dim + b)", hint="give that dimension its own Dim")
        return size.single_symbol() or size if isinstance(size, Poly) else size

    def stride(self, value: Any, who: str, d: int) -> int | Poly:
        stride, expr = self._value(value, None)
        if stride is None:
            raise CaptureError(f"{who} has the stride {expr} at dim {d}, which is not a polynomial of its sizes; "
                               "pass a dense tensor (.contiguous())")
        return stride


def derive(captured: Captured) -> Guards:
    """Guards for one captured entry."""
    ep = captured.exported
    call_spec = ep.call_spec
    inputs = spec_to_json(call_spec.in_spec, "the model's inputs")
    outputs = spec_to_json(call_spec.out_spec, "the model's output")
    paths = leaf_paths(inputs)
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    user_inputs = [spec.arg for spec in ep.graph_signature.input_specs
                   if getattr(spec.kind, "name", str(spec.kind)) == "USER_INPUT"]
    if len(user_inputs) != len(paths):
        raise CaptureError(f"the captured graph has {len(user_inputs)} inputs for {len(paths)} input leaves; "
                           "this input structure is not supported")
    leaves = []
    symbols = _Symbols({str(k): v for k, v in ep.range_constraints.items()})
    dim_names = _dim_names(captured)
    for arg, path in zip(user_inputs, paths):
        if type(arg).__name__ == "ConstantArgument":
            val = arg.value
        else:
            val = placeholders[arg.name].meta.get("val")
        top = _top_name(path, captured.param_names)
        who = f"input {top!r} ({path})"
        facts = _torch.fake_tensor_facts(val)
        if facts is None:
            if type(val) not in _VALUE_TYPE_NAMES:
                raise CaptureError(f"{who} is a {type(val).__name__}, which a pack cannot guard")
            leaves.append(ValueGuard(path, top, _VALUE_TYPE_NAMES[type(val)], val))
            continue
        dtype = stored_dtype(facts["dtype"])
        if dtype is None:
            raise CaptureError(f"{who} is a tensor of dtype {dtype_name(facts['dtype'])}, which a pack cannot "
                               f"carry; packs take {', '.join(DTYPES)}", hint="convert the input to one of these")
        preferred = dim_names.get(path, {})
        sizes = [symbols.size(s, preferred.get(d), who, d) for d, s in enumerate(facts["sizes"])]
        strides = [None if isinstance(size, int) and size <= 1 else symbols.stride(stride, who, d)
                   for d, (size, stride) in enumerate(zip(sizes, facts["strides"]))]  # size 0/1: any stride
        leaves.append(TensorGuard(path, top, dtype, str(facts["device"]), tuple(sizes), tuple(strides),
                                  requires_grad=False, mutated=len(leaves) in captured.mutated_inputs))
    return Guards(inputs=inputs, leaves=tuple(leaves), symbols=symbols.table, param_names=tuple(captured.param_names),
                  grad_mode=captured.grad_mode, outputs=outputs, output_leaves=tuple(_output_leaves(ep)))


def _top_name(path: str, param_names: tuple[str, ...]) -> str:
    if path.startswith("args["):
        idx = int(path[5:path.index("]")])
        return param_names[idx] if idx < len(param_names) else f"arg{idx}"
    key = path[len("kwargs["):]
    return key[1:key.index("]") - 1]


# Output arguments that are Python numbers computed at run time: the compiled code returns them as 0-d tensors
# (``_torch.outputs_for_inductor``) and the runtime turns them back into numbers of this type.
_SCALAR_ARGUMENTS = {"SymIntArgument": "int", "SymFloatArgument": "float", "SymBoolArgument": "bool"}


def _output_leaves(ep: Any) -> list[OutputLeaf]:
    """Each output leaf: a constant value, or the index among the compiled code's outputs (which are the
    user outputs that are not constants, in order) of a tensor or of a Python number."""
    out = []
    k = 0
    for spec in ep.graph_signature.output_specs:
        if getattr(spec.kind, "name", str(spec.kind)) != "USER_OUTPUT":
            continue
        arg = spec.arg
        if type(arg).__name__ == "ConstantArgument":
            value = arg.value
            if type(value) not in _VALUE_TYPE_NAMES:
                raise CaptureError(f"the model returns a {type(value).__name__} constant, which a pack cannot "
                                   "store", hint="return tensors, numbers, strings or None")
            if type(value) is float and not math.isfinite(value):
                raise CaptureError(f"the model returns the constant {value}, which a pack cannot store (its "
                                   "manifest is JSON)", hint="return it as a tensor: torch.tensor(value)")
            out.append(OutputLeaf("value", value=value))
        elif type(arg).__name__ in _SCALAR_ARGUMENTS:
            out.append(OutputLeaf("scalar", index=k, type=_SCALAR_ARGUMENTS[type(arg).__name__]))
            k += 1
        else:
            out.append(OutputLeaf("tensor", index=k))
            k += 1
    return out
