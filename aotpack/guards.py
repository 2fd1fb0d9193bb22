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
    raise CaptureError(f"{what} holds a {getattr(node_type, '__name__', node_type)}; packs support tuples, "
                       "lists, dicts and None around tensors and Python scalars",
                       hint="return a tuple or dict (for a dataclass output: dataclasses.asdict)")


def _sym_name(value: Any) -> str | int:
    if isinstance(value, torch.SymInt):
        node = value.node
        expr = node.expr
        if getattr(expr, "is_Integer", False) or getattr(expr, "is_number", False):
            return int(expr)
        if getattr(expr, "is_Symbol", False):
            return str(expr)
        raise CaptureError(f"an input size is the expression {expr}; aotpack supports sizes that are a "
                           "number or a single symbol", hint="declare that dimension as its own Dim")
    return int(value)


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
    symbols: dict[str, list[int]] = {}
    ranges = {str(k): v for k, v in ep.range_constraints.items()}
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
        sizes = [_sym_name(s) for s in facts["sizes"]]
        for s in sizes:
            if isinstance(s, str) and s not in symbols:
                rng = ranges.get(s)
                lo = int(rng.lower) if rng is not None else 0
                hi = int(rng.upper) if rng is not None and rng.upper.is_finite else 2**62
                symbols[s] = [lo, hi]
        strides: list = []
        for size, stride in zip(sizes, facts["strides"]):
            if isinstance(size, int) and size <= 1:
                strides.append(None)  # any stride indexes the same elements
            else:
                strides.append(_sym_name(stride))
        if any(isinstance(s, str) for s in strides):
            raise CaptureError(f"input {path} has a symbolic stride; not supported yet")
        leaves.append({"kind": "tensor", "path": path, "name": top, "dtype": dtype_name(facts["dtype"]),
                       "device": str(facts["device"]), "sizes": sizes, "strides": strides,
                       "requires_grad": False})
    return Guards(inputs=inputs, leaves=tuple(leaves), symbols=symbols, param_names=captured.param_names,
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
