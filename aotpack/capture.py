"""Stage 1, capture: Dynamo bytecode capture of the whole model with fullgraph enforced.

A graph break is a :class:`CaptureError` that names the user's file and line, the reason, and what to
change. Module state (parameters, buffers, attributes, the training flag) is read at capture time and frozen
into the graph.

May not: compile or write anything: its output is the captured graph and what it assumed.
"""
from __future__ import annotations

import functools
import inspect
import linecache
import os
import re
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

from aotpack_runtime.errors import CaptureError

from . import _torch, _torch_text, dynamic

# Hints keyed by Dynamo's graph-break type (``gb_type``) or a phrase of its message.
HINTS: tuple[tuple[str, str], ...] = (
    ("Data-dependent branching", "branch without Python control flow: compute both sides and pick with "
     "torch.where(cond, a, b), or use torch.cond(pred, true_fn, false_fn, operands)"),
    ("builtin operator", "remove the call (print, logging, I/O) from forward, or move it out of the model"),
    ("print", "remove print/logging from forward, or move it out of the model"),
    ("data-dependent", "avoid reading tensor values in Python (.item(), .tolist(), bool(t)); keep the "
     "computation in tensors, or use torch.cond / torch.where"),
    ("numpy", "replace NumPy calls in forward with the torch equivalents"),
    ("Unsupported method call", "use a torch operation instead of this Python method"),
    ("mutation", "avoid mutating inputs, module attributes or globals in forward"),
)


@dataclass(frozen=True)
class Captured:
    """The captured graph and what it was captured from."""

    exported: Any  # torch.export.ExportedProgram
    args: tuple
    kwargs: dict
    param_names: tuple[str, ...]
    grad_mode: bool
    training: bool
    dynamic_shapes: Any = None
    # Buffers the forward writes in place (names in the model): the pack's state.
    state: tuple[str, ...] = ()
    # Positions among the flat user inputs of the tensors forward writes into (the pack writes them too).
    mutated_inputs: tuple[int, ...] = ()


class _FunctionModule(torch.nn.Module):
    """Wraps a plain function so it can be captured like a module. ``forward`` carries the function's
    signature, so ``dynamic_shapes`` can name the function's own parameters. The modules the function reads
    from its globals or its closure become this module's submodules, under the name the function uses, so
    their parameters and buffers are the model's weights (``linear.weight``), as a module's own would be."""

    def __init__(self, fn: Callable):
        super().__init__()
        self._aotpack_function = fn
        for name, module in sorted(_modules_used(fn).items()):
            if name == "forward" or hasattr(torch.nn.Module, name):
                raise CaptureError(f"the model function {fn.__name__!r} reads a module through the name {name!r}, "
                                   "which nn.Module itself uses: its weights cannot be named after it",
                                   hint=f"rename the variable {name!r}")
            self.add_module(name, module)

        @functools.wraps(fn)
        def forward(*args, **kwargs):
            return self._aotpack_function(*args, **kwargs)

        self.forward = forward


def _modules_used(fn: Callable) -> dict[str, torch.nn.Module]:
    """The ``nn.Module`` objects a function reads by name: globals named in its code (and in the code of the
    functions and lambdas it defines, and of the plain functions it calls by a global name), and the variables
    of its closure. A name is the one the function that reads it uses; the first one found wins."""
    found: dict[str, torch.nn.Module] = {}
    seen: set[int] = set()
    todo: list[Callable] = [fn]
    while todo:
        f = todo.pop(0)
        code = getattr(f, "__code__", None)
        if code is None or id(code) in seen:
            continue
        seen.add(id(code))
        names: list[str] = []
        codes = [code]
        while codes:
            c = codes.pop()
            names += c.co_names
            codes += [k for k in c.co_consts if hasattr(k, "co_names")]
        scope = getattr(f, "__globals__", {})
        values = [(n, scope.get(n)) for n in names]
        for n, cell in zip(code.co_freevars, getattr(f, "__closure__", None) or ()):
            try:
                values.append((n, cell.cell_contents))
            except ValueError:  # an empty cell
                pass
        for n, v in values:
            if isinstance(v, torch.nn.Module):
                found.setdefault(n, v)
            elif inspect.isfunction(v):
                todo.append(v)
    return found


def _param_names(fn: Callable, n_args: int) -> tuple[str, ...]:
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params][:n_args]
    return tuple(names + [f"arg{i}" for i in range(len(names), n_args)])


def _user_frame(stack: list) -> Any:
    """The innermost frame that belongs to the user's code (not torch, not aotpack)."""
    torch_dir = os.path.dirname(torch.__file__)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for frame in reversed(stack):
        fname = os.path.abspath(frame.filename)
        if not fname.startswith(torch_dir) and not fname.startswith(os.path.join(here, "aotpack")):
            return frame
    return None


def _hint_for(gb_type: str | None, message: str) -> str:
    text = f"{gb_type or ''} {message}"
    for key, hint in HINTS:
        if key.lower() in text.lower():
            return hint
    return "rewrite this line so Dynamo can trace it (see the reason), or move it out of forward"


def _reason(gb_type: str | None, message: str) -> str:
    first = message.strip().splitlines()[0] if message.strip() else type(message).__name__
    explanation = ""
    for line in message.splitlines():
        if line.strip().startswith("Explanation:"):
            explanation = line.strip()[len("Explanation:"):].strip()
            break
    reason = f"graph break: {gb_type or first}"
    return f"{reason}. {explanation}" if explanation else reason


def _check_inputs(args: tuple, kwargs: dict) -> None:
    def walk(v: Any, path: str) -> None:
        if isinstance(v, torch.Tensor) or v is None or type(v) in (int, float, bool, str):
            return
        if type(v) in (tuple, list):
            for i, x in enumerate(v):
                walk(x, f"{path}[{i}]")
            return
        if type(v) is dict:
            for k, x in v.items():
                if not isinstance(k, str):
                    raise CaptureError(f"example input {path} has a non-string dict key {k!r}",
                                       hint="use string keys for dict inputs")
                walk(x, f"{path}[{k!r}]")
            return
        raise CaptureError(f"example input {path} is a {type(v).__name__}; packs take tensors, int, float, "
                           "bool, str and None, nested in tuples, lists and dicts",
                           hint="pass the tensors inside it as separate arguments")

    for i, a in enumerate(args):
        walk(a, f"args[{i}]")
    for k, v in kwargs.items():
        walk(v, f"kwargs[{k!r}]")


def capture(model: Any, args: tuple, kwargs: dict | None = None, *, dynamic_shapes: Any = None) -> Captured:
    """Capture ``model(*args, **kwargs)`` as one graph. Raises :class:`CaptureError` on a graph break."""
    kwargs = dict(kwargs or {})
    if not isinstance(args, tuple):
        raise CaptureError(f"example_inputs must be a tuple, got {type(args).__name__}",
                           hint="write example_inputs = (x,) for a single input")
    _check_inputs(args, kwargs)
    if isinstance(model, torch.nn.Module):
        module, fn = model, model.forward
    elif callable(model):
        module, fn = _FunctionModule(model), model
    else:
        raise CaptureError(f"model must be a torch.nn.Module or a function, got {type(model).__name__}")
    dims = dynamic.check(fn, args, kwargs, dynamic_shapes)
    grad_mode = torch.is_grad_enabled()
    try:
        with warnings.catch_warnings(record=True) as caught, _torch.quiet_capture_logs():
            warnings.simplefilter("always")
            exported = _torch.export_strict(module, args, kwargs, dynamic_shapes)
    except _torch.graph_break_types() as e:
        raise _capture_error(e, dims) from e
    except CaptureError:
        raise
    except Exception as e:  # anything else the tracer or the model raised
        raise _capture_error(e, dims) from e
    _check_no_reassigned_buffers(caught, module)
    _check_output_structure(exported)
    training = bool(getattr(module, "training", False))
    state, mutated = _check_mutation(exported, training)
    _check_no_custom_ops(exported)
    _check_constants_are_tensors(exported)
    return Captured(exported=exported, args=args, kwargs=kwargs,
                    param_names=_param_names(fn, len(args)), grad_mode=grad_mode,
                    training=training, dynamic_shapes=dynamic_shapes, state=state,
                    mutated_inputs=tuple(mutated))


def _check_no_reassigned_buffers(caught: list, module: torch.nn.Module) -> None:
    """Refuse ``self.buf = self.buf + 1`` in forward: torch.export drops the assignment (the graph and the
    pack would compute with the build-time value forever), and says so only in a warning. Other warnings
    are passed on as they were."""
    for w in caught:
        path = _torch_text.reassigned_buffer_owner(str(w.message))
        if path is None:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
            continue
        owner = module
        for name in path:
            owner = getattr(owner, name, owner)
        filename, lineno, code, attr = _assignment_site(owner)
        what = f"the buffer {'.'.join(path + [attr])!r}" if attr else \
            f"a buffer of {'.'.join(path) or 'the model'} ({type(owner).__name__})"
        raise CaptureError(f"forward assigns a new tensor to {what}; the captured graph drops such an assignment, so "
                           "a pack would keep the build-time value forever", filename=filename, lineno=lineno,
                           code=code, hint=f"update the buffer in place: self.{attr or 'buf'}.copy_(new_value) "
                           "(or .add_(), .index_copy_()); a pack then carries it as state")


def _assignment_site(owner: torch.nn.Module) -> tuple[str | None, int | None, str | None, str | None]:
    """Where ``owner``'s forward assigns to one of its buffers: (file, line, code, buffer name)."""
    import ast
    import textwrap

    try:
        lines, first = inspect.getsourcelines(type(owner).forward)
        filename = inspect.getsourcefile(type(owner).forward)
    except (OSError, TypeError):
        return None, None, None, None
    tree = ast.parse(textwrap.dedent("".join(lines)))
    buffers = set(getattr(owner, "_buffers", {}))
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
            if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for t in targets:
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self" \
                    and t.attr in buffers:
                lineno = first + node.lineno - 1
                return filename, lineno, linecache.getline(filename, lineno), t.attr
    return filename, None, None, None


def _capture_error(e: BaseException, dims: tuple[dynamic.DynamicDim, ...] = ()) -> CaptureError:
    gb_type, stack = _torch.unsupported_details(e)
    message = str(e)
    violation = _torch_text.constraint_violation(message)
    if violation is not None and violation.reasons:
        return _violation_error(violation, dims)
    out_of_range = _torch_text.range_violation(message)
    if out_of_range is not None:
        size, low, high = out_of_range
        span = f"{low}..{high}" if high is not None else f">= {low}"
        return CaptureError(f"capture failed: an example size {size} is outside the range {span} of a dynamic dim "
                            f"(a range given from 0 or 1 shows here from 2: {dynamic.SPECIALIZED_SIZES})",
                            hint="give example inputs whose dynamic sizes lie in their Dims' ranges")
    unknown_output = _torch_text.unrecognized_output(message)
    if unknown_output:
        kind, index = unknown_output
        return CaptureError(f"the model's output {index} is a {kind} object; packs return tensors, scalars, "
                            "strings and None in tuples, lists and dicts",
                            hint="return the tensors it holds; for Hugging Face models pass use_cache=False")
    if not stack and e.__traceback__ is not None:
        stack = traceback.extract_tb(e.__traceback__)
    frame = _user_frame(stack)
    filename = lineno = code = None
    if frame is not None:
        filename, lineno = frame.filename, frame.lineno
        code = frame.line or linecache.getline(filename, lineno)
    if gb_type:
        return CaptureError(_reason(gb_type, message), filename=filename, lineno=lineno, code=code,
                            hint=_hint_for(gb_type, message))
    first = message.strip().splitlines()[0] if message.strip() else ""
    if "dynamic_shapes" in message or "Constraints violated" in message:
        return CaptureError(f"capture failed: {type(e).__name__}: {first}",
                            hint="check dynamic_shapes against torch.export's format: keys are forward's "
                                 "parameter names (a **kwargs parameter takes a dict of its own), values give "
                                 "a Dim per dynamic dimension, and the model must not specialise those sizes")
    return CaptureError(f"capture failed: {type(e).__name__}: {first}", filename=filename, lineno=lineno,
                        code=code, hint=_hint_for(None, message))


def _violation_error(violation: _torch_text.ConstraintViolation,
                     dims: tuple[dynamic.DynamicDim, ...]) -> CaptureError:
    """A dynamic dim the model does not keep dynamic (it fixes the size, or allows only part of the range):
    which input and dim, torch's reason, and the model line that decided it."""
    named = dynamic.by_symbol(dims)
    subjects = [", ".join(f"{d.where()} ({d.given()})" for d in named.get(s, ())) or f"the dynamic dim {s}"
                for s in violation.symbols]
    frames = [traceback.FrameSummary(f, n, "", lookup_line=False, line=code) for f, n, code in violation.stack]
    frame = _user_frame(frames)
    where = (frame.filename, frame.lineno, frame.line) if frame is not None else (None, None, None)
    if not violation.fixes or any(re.fullmatch(r"\w+ = \d+", f) for f in violation.fixes):
        hint = ("make that dim static (leave it out of dynamic_shapes / --dynamic), or change the line so it does "
                "not fix the size (e.g. reshape(-1, ...) instead of a literal size)")
    else:
        hint = (f"change dynamic_shapes as torch suggests: {'; '.join(violation.fixes)} (with --dynamic: the range "
                "that Dim names, or one NAME: for dims that must be equal)")
    return CaptureError(f"{'; '.join(subjects) or 'a dynamic dim'}: the model does not take it as dynamic_shapes "
                        f"gives it: {'; '.join(violation.reasons)}", filename=where[0], lineno=where[1],
                        code=where[2], hint=hint)


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in [^\n]*\n\s*([^\n]*)')


def user_line(stack: str) -> tuple[str | None, int | None, str | None]:
    """(file, line, code) of the innermost frame of a graph node's ``stack_trace``: the user's call."""
    frames = _FRAME.findall(stack or "")
    return (frames[-1][0], int(frames[-1][1]), frames[-1][2]) if frames else (None, None, None)


def _check_no_custom_ops(exported: Any) -> None:
    for name, stack in _torch.custom_ops(exported):
        filename, lineno, code = user_line(stack)
        raise CaptureError(f"forward calls the custom operator {name}, whose implementation a pack cannot carry",
                           filename=filename, lineno=lineno, code=code,
                           hint="use torch operations instead (Hugging Face mixture-of-experts models: "
                                "experts_implementation='batched_mm')")


def _check_constants_are_tensors(exported: Any) -> None:
    """A model attribute the graph reads (lifted as a constant) must be a tensor: the pack stores it as a
    weight. (A script object, e.g. a packed quantized weight, has no bytes a pack could store.)"""
    for name, value in exported.constants.items():
        if not isinstance(value, torch.Tensor):
            raise CaptureError(f"forward uses the attribute {name!r}, a {type(value).__name__} object (not a "
                               "tensor), which a pack cannot store",
                               hint="keep tensors, numbers and strings as the model's attributes")


def _check_output_structure(exported: Any) -> None:
    """Refuse an output that holds an object other than tuples, lists, dicts and None around its leaves here,
    as the capture does for an object torch cannot flatten. A library may register its own classes with
    torch's pytree (transformers does for its KV cache, ``DynamicCache``, once its export helpers are used);
    the capture then succeeds, but a pack cannot rebuild such an object in a serving process, and the checks
    after the capture would fail on it."""
    spec_to_json(exported.call_spec.out_spec, "the model's output")


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
    name = getattr(node_type, "__name__", str(node_type))
    if hasattr(node_type, "to_tuple"):
        hint = "call the model with return_dict=False, or return output.to_tuple()"
    elif name.endswith("Cache"):
        hint = "return the tensors it holds; for Hugging Face models pass use_cache=False"
    else:
        hint = "return a tuple or dict (for a dataclass output: dataclasses.asdict)"
    raise CaptureError(f"{what} holds a {name}; packs support tuples, "
                       "lists, dicts and None around tensors and Python scalars", hint=hint)


def _has_mutable_ops(exported: Any) -> bool:
    for node in exported.graph.nodes:
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        if schema is not None and schema.is_mutable:
            return True
    return False


_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _check_mutation(exported: Any, training: bool) -> tuple[tuple[str, ...], list[int]]:
    """The buffers the forward writes in place (the pack's state), in the model's names, and the positions
    (among the flat user inputs) of the inputs it writes into, which the pack writes into as eager does. A
    batch norm updating its statistics in training mode is refused, and so is a forward that writes both."""
    # The capture graph keeps in-place ops; functionalizing it shows what they write to.
    if not _has_mutable_ops(exported):
        return (), []
    sig = exported.run_decompositions({}).graph_signature
    buffers = sorted(set((getattr(sig, "buffers_to_mutate", {}) or {}).values()))
    inputs = dict(getattr(sig, "user_inputs_to_mutate", {}) or {})
    stats = [b for b in buffers if b.rsplit(".", 1)[-1] in _RUNNING_STATS]
    if training and stats:
        raise CaptureError(f"forward updates the batch-norm statistics {stats} (the model is in training mode); "
                           "a pack is for inference", hint="call model.eval() before building")
    written = set(inputs.values())
    if buffers and written:
        raise CaptureError(f"forward writes into its inputs {sorted(written)} and into the buffers {buffers}; "
                           "a pack writes into its inputs or carries state, not both",
                           hint="return the new input values instead of writing them in place")
    user = [spec.arg.name for spec in sig.input_specs if getattr(spec.kind, "name", "") == "USER_INPUT"]
    return tuple(buffers), [i for i, name in enumerate(user) if name in written]
