"""Stage 2, guards: turn what the captured graph assumed about its inputs into plain data.

Per entry: the input structure, one guard per input leaf (tensor: dtype, device, sizes or symbols, strides;
value: the exact value the graph specialised on), the symbol ranges, and the output structure. The runtime's
``aotpack_runtime.guards`` reads the same data back; ``docs/FORMAT.md`` documents it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from aotpack_runtime.errors import CaptureError
from aotpack_runtime.guards import VALUE_TYPES, dtype_name, leaf_paths

from . import _torch
from .capture import Captured

_VALUE_TYPE_NAMES = {v: k for k, v in VALUE_TYPES.items()}


@dataclass(frozen=True)
class Guards:
    """The guard data of one entry, ready for the manifest."""

    inputs: dict
    leaves: tuple[dict, ...]
    symbols: dict
    param_names: tuple[str, ...]
    grad_mode: bool
    outputs: dict
    output_leaves: tuple[dict, ...]

    def to_json(self) -> dict:
        return {"inputs": self.inputs, "leaves": list(self.leaves), "symbols": self.symbols,
                "param_names": list(self.param_names), "grad_mode": self.grad_mode,
                "outputs": self.outputs, "output_leaves": list(self.output_leaves)}


def spec_to_json(spec: Any, what: str) -> dict:
    """A pytree TreeSpec as the format's structure tree (tuple, list, dict, none, leaf)."""
    node_type, context, children = _torch.treespec_parts(spec)
    if node_type is None:
        return {"type": "leaf"}
    if node_type is type(None):
        return {"type": "none"}
    kids = [spec_to_json(c, what) for c in children]
    if node_type is tuple:
        return {"type": "tuple", "children": kids}
    if node_type is list:
        return {"type": "list", "children": kids}
    if node_type is dict:
        keys = list(context)
        if not all(isinstance(k, str) for k in keys):
            raise CaptureError(f"{what} holds a dict with non-string keys {keys!r}",
                               hint="use string keys")
        return {"type": "dict", "keys": keys, "children": kids}
    hint = ("call the model with return_dict=False, or return output.to_tuple()" if hasattr(node_type, "to_tuple")
            else "return a tuple or dict (for a dataclass output: dataclasses.asdict)")
    raise CaptureError(f"{what} holds a {getattr(node_type, '__name__', node_type)}; packs support tuples, "
                       "lists, dicts and None around tensors and Python scalars", hint=hint)


def _dim_names(captured: Captured) -> dict[str, dict[int, str]]:
    """Input path -> {dim: Dim name} from the user's ``dynamic_shapes`` (top-level inputs)."""
    ds = captured.dynamic_shapes
    if ds is None:
        return {}
    paths = [f"args[{i}]" for i in range(len(captured.args))] + [f"kwargs[{k!r}]" for k in captured.kwargs]
    names = list(captured.param_names) + list(captured.kwargs)
    if isinstance(ds, dict):
        specs = [(p, ds.get(n)) for p, n in zip(paths, names)]
    else:
        specs = list(zip(paths, ds))
    out: dict[str, dict[int, str]] = {}
    for path, spec in specs:
        items = spec.items() if isinstance(spec, dict) else enumerate(spec) if isinstance(spec, (list, tuple)) else ()
        dims = {int(d): getattr(dim, "__name__") for d, dim in items
                if isinstance(getattr(dim, "__name__", None), str)}
        if dims:
            out[path] = dims
    return out


class _Symbols:
    """Gives each shape symbol of the graph a readable, deterministic name and records its range."""

    def __init__(self, ranges: dict):
        self.ranges = ranges
        self.names: dict[str, str] = {}
        self.table: dict[str, list[int]] = {}

    def name(self, expr: Any, preferred: str | None) -> str:
        key = str(expr)
        if key not in self.names:
            name = preferred if preferred and preferred not in self.table else f"d{len(self.table)}"
            rng = self.ranges.get(key)
            lo = int(rng.lower) if rng is not None else 0
            hi = int(rng.upper) if rng is not None and rng.upper.is_finite else 2**62
            self.names[key] = name
            self.table[name] = [lo, hi]
        return self.names[key]

    def size(self, value: Any, preferred: str | None, path: str) -> int | str:
        if not isinstance(value, torch.SymInt):
            return int(value)
        expr = value.node.expr
        if getattr(expr, "is_number", False):
            return int(expr)
        if getattr(expr, "is_Symbol", False):
            return self.name(expr, preferred)
        raise CaptureError(f"input {path} has a size that is the expression {expr}; aotpack supports sizes "
                           "that are a number or one symbol", hint="give that dimension its own Dim")

    def stride(self, value: Any, path: str) -> int | list:
        if not isinstance(value, torch.SymInt):
            return int(value)
        expr = value.node.expr
        if getattr(expr, "is_number", False):
            return int(expr)
        coeff, factors = expr.as_coeff_mul()
        mono: list = [int(coeff)]
        for f in factors:
            base, exp = f.as_base_exp()
            if not (getattr(base, "is_Symbol", False) and getattr(exp, "is_Integer", False) and int(exp) > 0):
                raise CaptureError(f"input {path} has the stride {expr}, which is not a product of sizes; "
                                   "pass a dense tensor (.contiguous())")
            mono += [self.name(base, None)] * int(exp)
        if not getattr(coeff, "is_Integer", False):
            raise CaptureError(f"input {path} has the stride {expr}, which is not a product of sizes")
        return mono


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
        facts = _torch.fake_tensor_facts(val)
        if facts is None:
            if type(val) not in _VALUE_TYPE_NAMES:
                raise CaptureError(f"input {path} is a {type(val).__name__}, which a pack cannot guard")
            leaves.append({"kind": "value", "path": path, "name": top, "type": _VALUE_TYPE_NAMES[type(val)],
                           "value": val})
            continue
        preferred = dim_names.get(path, {})
        sizes = [symbols.size(s, preferred.get(d), path) for d, s in enumerate(facts["sizes"])]
        strides = [None if isinstance(size, int) and size <= 1 else symbols.stride(stride, path)
                   for size, stride in zip(sizes, facts["strides"])]  # size 0/1: any stride will do
        leaves.append({"kind": "tensor", "path": path, "name": top, "dtype": dtype_name(facts["dtype"]),
                       "device": str(facts["device"]), "sizes": sizes, "strides": strides,
                       "requires_grad": False})
    return Guards(inputs=inputs, leaves=tuple(leaves), symbols=symbols.table, param_names=captured.param_names,
                  grad_mode=captured.grad_mode, outputs=outputs, output_leaves=tuple(_output_leaves(ep)))


def _top_name(path: str, param_names: tuple[str, ...]) -> str:
    if path.startswith("args["):
        idx = int(path[5:path.index("]")])
        return param_names[idx] if idx < len(param_names) else f"arg{idx}"
    key = path[len("kwargs["):]
    return key[1:key.index("]") - 1]


def _output_leaves(ep: Any) -> list[dict]:
    """Each output leaf: the index among the compiled code's tensor outputs, or a constant value."""
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
            out.append({"kind": "value", "value": value})
        else:
            out.append({"kind": "tensor", "index": k})
            k += 1
    return out
