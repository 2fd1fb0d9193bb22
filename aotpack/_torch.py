"""Every private or experimental torch API the build side touches, in one place, each with a test
(tests/test_torch_private.py). A torch upgrade that moves one breaks here first, with a clear message.

Two neighbours hold the rest: ``_torch_text.py`` reads the text torch writes (generated code, Dynamo's and
torch.export's messages), and the experimental GPU-less CUDA build's patches of torch and Triton internals live
in ``_cuda_offline.py``, gated on exact versions and tested by tests/test_cuda_build.py.

May not: be bypassed: no other build module calls a private torch API (except ``_cuda_offline``)."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.utils._pytree as pytree

from .buildcache import PRECOMPILED_SUFFIX

# The name Inductor gives its generated files instead of a hash of their content and compile command (the
# command names the torch install folder, and the file name ends up in the code through __FILE__).
GENERATED_NAME = "model"

# Inductor options every aotpack build uses (see README, "Reproducibility"):
#  - weights are not embedded in the .so: the pack stores them once and hands them to each entry;
#  - no debug line tables and no precompiled headers: both put build paths into the code;
#  - no FX graph cache and one compile thread, so a build starts from nothing (each build compiles in a
#    new, private folder) and its output depends only on its inputs;
#  - fixed file names, dynamic OpenMP regions (the code takes the serving process's thread count), and
#    the vector ISA taken from the build options instead of probing the build host's CPU (cpp.vec_isa_ok:
#    no test program is compiled). See ``inductor_options`` for the thread plan.
BASE_INDUCTOR_CONFIG: dict[str, Any] = {
    "aot_inductor.package_constants_in_so": False,
    "aot_inductor.enable_line_tables": False,
    "aot_inductor.precompile_headers": True,
    "aot_inductor.debug_compile": False,
    "aot_inductor.model_name_for_generated_files": GENERATED_NAME,
    "fx_graph_cache": False,
    "compile_threads": 1,
    "cpp.dynamic_threads": True,
    "cpp.vec_isa_ok": True,
    # Every weight stays a constant the loader binds, however small: Inductor would otherwise copy the value of
    # a weight of a few elements (a bias of one, a scale buffer) into the code, so the code would depend on
    # the weights' values and new weights (load_weights, reweight) would not reach it.
    "always_keep_tensor_constants": True,
    # The code must not depend on the weights' values either: joint-graph constant folding evaluates what is
    # computed from weights alone at build time and puts a result whose elements are all equal into the code
    # as a number (``scale.exp()`` of a one-element scale; ``1 + weight`` of a norm weight initialised to
    # zeros), so such a weight would stop reaching the code, and new weights would be ignored in silence.
    # It also reads a mutated one-element state buffer's build-time value (pytorch/pytorch#165444), and with
    # no GPU it would run ops on one.
    "joint_graph_constant_folding": False,
}

# Options that older torch releases lack, with the first minor version that has each and why leaving it out
# there gives the same code: ``inductor_options`` sets an option only where this torch has it.
ADDED_IN: dict[str, tuple[tuple[int, int], str]] = {
    "aot_inductor.enable_line_tables": ((2, 13), "before 2.13 AOTInductor adds debug information only with "
                                                  "debug_compile or debug_symbols, both off"),
    "cpp.march": ((2, 13), "before 2.13 Inductor always compiles with -march=native; the compiler wrapper "
                           "puts the target's -march in its place (see compiler_march)"),
}


def torch_version() -> tuple[int, int]:
    """(major, minor) of the running torch."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def _available(config: dict[str, Any]) -> dict[str, Any]:
    have = torch_version()
    return {k: v for k, v in config.items() if k not in ADDED_IN or have >= ADDED_IN[k][0]}


# Added for CUDA entries: one fatbin per kernel (SASS for each architecture in TORCH_CUDA_ARCH_LIST at or
# above ``cuda.arch``, PTX for ``cuda.arch``), no autotuning by benchmarks that would differ between runs.
CUDA_INDUCTOR_CONFIG: dict[str, Any] = {
    "aot_inductor.emit_multi_arch_kernel": True,
    "max_autotune": False,
    "max_autotune_gemm": False,
    "benchmark_fusion": False,
    "coordinate_descent_tuning": False,
}

# Added when there is no GPU: nothing may benchmark on one (pad_mm does). Nothing runs a real op on one or
# reads a weight's value either (the weights are fake here): BASE_INDUCTOR_CONFIG keeps every weight a
# constant and turns joint-graph constant folding off.
NO_GPU_INDUCTOR_CONFIG: dict[str, Any] = {
    "shape_padding": False,
    "benchmark_kernel": False,
}

def _complex_casts_to_aten(graph) -> None:
    """Inductor's post-grad pass (``post_grad_custom_pre_pass``): a dtype conversion from or to a complex dtype
    calls ``aten._to_copy`` instead of ``prims.convert_element_type``.

    Inductor generates no code for complex tensors: it runs such ops as calls to the graph's op, and after its
    decompositions a conversion is the prim, whose implementation is Python (a serving process would import
    Dynamo to run it). ``aten._to_copy`` is the same conversion, implemented in libtorch."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.prims.convert_element_type.default:
            continue
        source, out = node.args[0].meta.get("val"), node.meta.get("val")
        if not (isinstance(source, torch.Tensor) and isinstance(out, torch.Tensor)
                and (source.is_complex() or out.is_complex())):
            continue
        with graph.inserting_before(node):
            copy = graph.call_function(torch.ops.aten._to_copy.default, (node.args[0],), {"dtype": node.args[1]})
        copy.meta.update(node.meta)
        node.replace_all_uses_with(copy)
        graph.erase_node(node)


# oneDNN convolutions (``BuildOptions.onednn_convs``): what the post-grad passes below recorded in the compile
# now running (see ``conv_records``), or None when no compile collects them.
_conv_records: "ConvRecords | None" = None
# The oneDNN convolution op that the pass emits (``mkldnn._convolution_pointwise``: Inductor lowers it to an
# extern call, ``aoti_torch_cpu_mkldnn__convolution_pointwise``, with the weight passed as the constant itself).
ONEDNN_CONV_OP = "mkldnn._convolution_pointwise"
# The prefix of the names of the constants ``_fold_into_convolutions`` adds (a folded weight or bias).
FOLDED_PREFIX = "_aotpack_folded_"


@dataclass
class ConvRecords:
    """What the convolution passes of one compile recorded. ``onednn``: for each weight routed to oneDNN (by the
    get_attr target of its node, the weight's ``state_dict`` name or a folded constant's name) the
    convolution's ``padding``, ``stride``, ``dilation``, ``groups`` and ``input_size``, which is what packing
    the weight for oneDNN at load needs. ``folded``: for each constant ``_fold_into_convolutions`` added (by
    its get_attr target), the ``schema.FoldRecord`` the loader computes it by."""

    onednn: dict = field(default_factory=dict)
    folded: dict = field(default_factory=dict)
    # For each weight routed to oneDNN's linear (``_linears_to_onednn``, by its get_attr target): the number
    # of rows of the linear's input, which packing it at load needs.
    linear: dict = field(default_factory=dict)


@contextlib.contextmanager
def conv_records() -> Iterator[ConvRecords]:
    """Collect what the convolution passes record during one compile (``ConvRecords``)."""
    global _conv_records
    records = ConvRecords()
    _conv_records = records
    try:
        yield records
    finally:
        _conv_records = None


def _static_ints(values) -> list[int] | None:
    try:
        return [int(v) for v in values] if all(isinstance(v, int) for v in values) else None
    except TypeError:
        return None


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) != float("inf") and v == v


class _Fold:
    """The steps (``schema.FoldStep``) of one folded constant, built from the post-grad graph's nodes that compute
    a value from stored weights alone."""

    # aten op -> the step's op (schema.FOLD_UNARY, schema.FOLD_BINARY)
    UNARY = {torch.ops.aten.sqrt.default: "sqrt", torch.ops.aten.rsqrt.default: "rsqrt",
             torch.ops.aten.reciprocal.default: "reciprocal", torch.ops.aten.neg.default: "neg"}
    BINARY = {torch.ops.aten.add.Tensor: "add", torch.ops.aten.sub.Tensor: "sub",
              torch.ops.aten.mul.Tensor: "mul", torch.ops.aten.div.Tensor: "div"}

    def __init__(self, module):
        self.module, self.steps, self.memo = module, [], {}

    def step(self, op: str, inputs: tuple = (), **kw) -> int:
        from aotpack_runtime.schema import FoldStep

        self.steps.append(FoldStep(op=op, inputs=tuple(inputs), **kw))
        return len(self.steps) - 1

    def of(self, node) -> int | None:
        """The index of the step that computes ``node``, or None where it is not computed from stored float32
        weights alone by the ops a fold may take."""
        if node in self.memo:
            return self.memo[node]
        index = None
        if node.op == "get_attr":
            try:
                t = _attr(self.module, str(node.target))
            except AttributeError:
                t = None
            if type(t) in (torch.Tensor, torch.nn.Parameter) and t.dtype == torch.float32 \
                    and t.device.type == "cpu":
                index = self.step("weight", name=str(node.target))
        elif node.op == "call_function" and not node.kwargs:
            if node.target in self.UNARY:
                a = self.of(node.args[0])
                index = None if a is None else self.step(self.UNARY[node.target], (a,))
            elif node.target is torch.ops.aten.unsqueeze.default and isinstance(node.args[1], int):
                a = self.of(node.args[0])
                index = None if a is None else self.step("unsqueeze", (a,), dim=node.args[1])
            elif node.target in (torch.ops.aten.view.default, torch.ops.aten.reshape.default) \
                    and _static_ints(node.args[1]) is not None:
                a = self.of(node.args[0])
                index = None if a is None else self.step("reshape", (a,), shape=tuple(_static_ints(node.args[1])))
            elif node.target in self.BINARY and len(node.args) == 2:
                index = self.binary(self.BINARY[node.target], *node.args)
        self.memo[node] = index
        return index

    def binary(self, op: str, a, b) -> int | None:
        if _number(a) and op in ("add", "mul"):
            a, b = b, a
        if not isinstance(a, torch.fx.Node):
            return None
        x = self.of(a)
        if x is None:
            return None
        if _number(b):
            return self.step(op, (x,), value=b)
        y = self.of(b) if isinstance(b, torch.fx.Node) else None
        return None if y is None else self.step(op, (x, y))

    def operand(self, other, op: str, cout: int, target: str, current: int | None) -> int | None:
        """``current`` (the weight's or the bias's step; None for no bias) after ``op`` with ``other`` (a number or
        a per-channel tensor node) applied to the convolution's output, on the weight (``mul``/``div`` only) or
        the bias."""
        if current is None:
            if op in ("mul", "div"):
                return None
            current = self.step("zeros", shape=(cout,))
        if _number(other):
            return self.step(op, (current,), value=other)
        c = self.of(other)
        shape = (-1, 1, 1, 1) if target == "weight" else (-1,)
        return self.step(op, (current, self.step("reshape", (c,), shape=shape)))


def _fake_val(node) -> None:
    """Set a node this module's passes made to the fake value its op computes on its inputs' fake values, as
    Inductor's own passes do (from torch 2.15 Inductor recomputes the metadata of nodes it did not make, and
    refuses to when a value copied from the node they replace differs: a fused convolution's users then cannot
    be lowered). Left as it is where the inputs carry no fake values."""
    from torch._dispatch.python import enable_python_dispatcher
    from torch._guards import detect_fake_mode

    args = torch.fx.node.map_arg(node.args, lambda n: n.meta.get("val"))
    mode = detect_fake_mode([a for a in args if isinstance(a, torch.Tensor)])
    if mode is None:
        return
    with mode, enable_python_dispatcher():
        node.meta["val"] = node.target(*args)


def _attr(module, target: str):
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _per_channel(node, cout: int) -> bool:
    """Whether ``node`` (another operand of an elementwise op on a convolution's [N, cout, H, W] output) is a
    number or a float32 tensor that varies along the channels only (it broadcasts to the output unchanged)."""
    if _number(node):
        return True
    v = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if not isinstance(v, torch.Tensor) or v.dtype != torch.float32 or v.dim() > 4:
        return False
    shape = [1] * (4 - v.dim()) + [int(d) if isinstance(d, int) else -1 for d in v.shape]
    return shape[0] == 1 and shape[2] == 1 and shape[3] == 1 and shape[1] in (1, cout)


def _fold_records(module, chain: list, w, bias, cout: int, wshape: tuple) -> dict | None:
    """The ``FoldRecord`` of a convolution's weight and of its bias (absent: no bias) after the per-channel ops of
    ``chain`` ((op, other operand, node) in order), or None where an operand is not computed from stored weights
    alone."""
    from aotpack_runtime.schema import FoldRecord

    records = {}
    for target in ("weight", "bias"):
        fold = _Fold(module)
        source = w if target == "weight" else bias
        current = None if source is None else fold.of(source)
        if current is None and source is not None:
            return None
        for op, other, _ in chain:
            if target == "weight" and op in ("add", "sub"):
                continue
            if not _number(other) and fold.of(other) is None:
                return None
            current = fold.operand(other, op, cout, target, current)
        if current is not None:
            records[target] = FoldRecord(shape=wshape if target == "weight" else (cout,),
                                         steps=tuple(fold.steps[:current + 1]))
    return records


def _folded_constant(graph, before, record, like: torch.Tensor):
    """A new constant of the code, ``record`` (a ``schema.FoldRecord``) evaluated on the stored weights of the
    graph's module: registered as a buffer ``_aotpack_folded_N`` of it, read by a get_attr node inserted before
    ``before`` (returned; its fake value made from ``like``), and recorded in ``conv_records().folded`` for the
    loader to compute the same way."""
    from aotpack_runtime.entries import fold_weight

    module = graph.owning_module
    value = fold_weight(record, {n: _attr(module, n) for n in record.weight_names})
    taken = 0
    while hasattr(module, f"{FOLDED_PREFIX}{taken}"):
        taken += 1
    name = f"{FOLDED_PREFIX}{taken}"
    module.register_buffer(name, value)
    with graph.inserting_before(before):
        attr = graph.get_attr(name)
    attr.meta["val"] = like.new_empty(record.shape)
    if _conv_records is not None:
        _conv_records.folded[name] = record
    return attr


def _get_attr_reads(graph) -> dict[str, int]:
    """get_attr target -> how many get_attr nodes of ``graph`` read it (a weight routed to oneDNN must be read
    once: its constant is then bound to a packed layout nothing else can read)."""
    reads: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            reads[str(node.target)] = reads.get(str(node.target), 0) + 1
    return reads


def _writes_a_buffer(graph) -> bool:
    """Whether ``graph`` has no module to hold new constants or calls an op that writes its input in place (a
    graph that writes state is left as it is by the passes that add constants)."""
    return graph.owning_module is None or any(
        n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable
        for n in graph.nodes)


def _fold_into_convolutions(graph) -> None:
    """Inductor's post-grad pass for CPU entries with ``onednn_convs``, before ``_convolutions_to_onednn``: the
    per-channel ops that follow a float32 2-d convolution and read stored weights alone (a batch norm in eval
    mode: ``(y - mean) * rsqrt(var + eps) * gamma + beta``; a scale, a shift) are folded into the convolution's
    weight and bias. The folded weight and bias become new constants of the code, recorded with the steps that
    compute them from the stored weights (``schema.FoldRecord``, ``conv_records().folded``): the loader computes
    them on the serving host, so the pack stores only the model's own weights and new weights reach the code.
    The build evaluates the same steps to compile against. A graph that writes a buffer is left as it is."""
    if _writes_a_buffer(graph):
        return
    module = graph.owning_module
    conv = torch.ops.aten.convolution.default
    binary = _Fold.BINARY
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not conv or len(node.args) != 9:
            continue
        x, w, bias, _, _, _, transposed, _, _ = node.args
        wv, ov = w.meta.get("val"), node.meta.get("val")
        if transposed or not isinstance(wv, torch.Tensor) or not isinstance(ov, torch.Tensor) or wv.dim() != 4 \
                or ov.dim() != 4 or wv.dtype != torch.float32 or _static_ints(wv.shape) is None:
            continue
        cout = int(wv.shape[0])
        chain, cur = [], node
        while len(cur.users) == 1:
            user = next(iter(cur.users))
            if user.op != "call_function" or user.target not in binary or user.kwargs or len(user.args) != 2:
                break
            op = binary[user.target]
            first, second = user.args
            other = second if first is cur else first
            if (first is not cur and op in ("sub", "div")) or other is cur or not _per_channel(other, cout):
                break
            chain.append((op, other, user))
            cur = user
        if not chain:
            continue
        records = _fold_records(module, chain, w, bias, cout, tuple(wv.shape))
        if records is None:
            continue
        if len(records["weight"].steps) == 1:  # only shifts: the weight stays the stored one
            del records["weight"]
        new_args = list(node.args)
        for target, position in (("weight", 1), ("bias", 2)):
            record = records.get(target)
            if record is None:
                new_args[position] = None if target == "bias" else w
                continue
            new_args[position] = _folded_constant(graph, node, record, wv)
        with graph.inserting_before(node):
            folded = graph.call_function(conv, tuple(new_args))
        folded.meta.update(node.meta)
        _fake_val(folded)
        cur.replace_all_uses_with(folded)
        for _, _, user in reversed(chain):
            graph.erase_node(user)
        graph.erase_node(node)
    graph.eliminate_dead_code()


# Activations that oneDNN's convolution applies to its output (``_convolution_pointwise``'s ``attr``) exactly as
# eager does, NaN and infinities included: sigmoid and tanh (see ``_eager_activations``).
_ONEDNN_UNARY = {torch.ops.aten.sigmoid.default: "sigmoid", torch.ops.aten.tanh.default: "tanh"}


def _fused_activation(node) -> tuple[str, list, list] | None:
    """The activation that is the sole user of a convolution ``node``'s output, as oneDNN's (attr, scalars) with
    the nodes it replaces, or None: sigmoid and tanh (see ``_ONEDNN_UNARY``)."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if user.op != "call_function" or user.kwargs:
        return None
    if user.target in _ONEDNN_UNARY and len(user.args) == 1:
        return _ONEDNN_UNARY[user.target], [], [user]
    return None


def _eager_activations(graph) -> None:
    """Keep the activations after oneDNN convolutions computing as eager does, NaN included.

    Inductor's own mkldnn passes fuse the activation after a ``mkldnn._convolution_pointwise`` into it, alone
    or after a fused residual add; oneDNN computes ReLU as max(x, 0) and ReLU6 (hardtanh) as a clip, which
    turn a NaN into 0 or a bound where eager keeps the NaN (a pack must not answer differently from eager on an
    input that holds a NaN). ``relu(x)`` becomes ``clamp_min(x, 0)`` and ``clamp_max(clamp_min(x, a), b)``
    becomes ``clamp_min(clamp_max(x, b), a)`` (a <= b): the same values, eager's NaN included, in a form those
    patterns do not match, which Inductor computes in its own kernel. (Hardsigmoid and erf-GELU, the other
    activations whose fusion changes NaN or infinities, start with an op on a number; a convolution followed
    by one stays with ATen: ``_convolutions_to_onednn``.)"""
    aten = torch.ops.aten
    conv = aten.convolution.default

    def after_conv(n) -> bool:  # a convolution's output, or a sum with one (a residual add Inductor may fuse)
        if not isinstance(n, torch.fx.Node) or n.op != "call_function":
            return False
        return n.target is conv or (n.target in (aten.add.Tensor, aten.sub.Tensor) and any(
            isinstance(a, torch.fx.Node) and a.op == "call_function" and a.target is conv for a in n.args))

    for node in list(graph.nodes):
        if node.op != "call_function" or node.kwargs:
            continue
        if node.target is aten.relu.default and len(node.args) == 1 and after_conv(node.args[0]):
            with graph.inserting_before(node):
                new = graph.call_function(aten.clamp_min.default, (node.args[0], 0.0))
            new.meta.update(node.meta)
            _fake_val(new)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
        elif node.target is aten.clamp_max.default and len(node.args) == 2 and _number(node.args[1]):
            inner = node.args[0]
            if not (isinstance(inner, torch.fx.Node) and inner.op == "call_function" and not inner.kwargs
                    and inner.target is aten.clamp_min.default and len(inner.args) == 2 and after_conv(inner.args[0])
                    and _number(inner.args[1]) and inner.args[1] <= node.args[1] and len(inner.users) == 1):
                continue
            with graph.inserting_before(node):
                top = graph.call_function(aten.clamp_max.default, (inner.args[0], node.args[1]))
                new = graph.call_function(aten.clamp_min.default, (top, inner.args[1]))
            top.meta.update(inner.meta)
            new.meta.update(node.meta)
            _fake_val(top)
            _fake_val(new)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            graph.erase_node(inner)


def _starts_an_unsafe_fusion(node) -> bool:
    """Whether a user of a convolution ``node``'s output adds or multiplies it by a number: how Inductor's
    patterns for hardsigmoid and erf-GELU after a oneDNN convolution begin, whose fused forms differ from eager
    on NaN or infinities (``_eager_activations``)."""
    aten = torch.ops.aten
    return any(u.op == "call_function" and u.target in (aten.add.Tensor, aten.mul.Tensor)
               and any(_number(a) for a in u.args) for u in node.users)


def _convolutions_to_onednn(graph) -> None:
    """Inductor's post-grad pass for CPU entries with ``onednn_convs``: a float32 2-d convolution (not
    transposed) of static shape whose weight is a stored weight read by no other op calls oneDNN
    (``mkldnn._convolution_pointwise``) with that weight as it is, instead of ``aten.convolution``.

    ATen's own choice at batch 1 is its im2col + GEMM kernel for most convolutions; oneDNN's is several times
    faster once its weight is in oneDNN's packed layout, which the runtime computes at load, on the serving
    host, from the stored weight (``packed_weights`` in the manifest). The op also accepts the plain weight
    (it then reorders it on every call), so code whose constant is bound to the stored weight, by an older
    reader, computes the same outputs, only slower. Records each rewritten weight in ``conv_records().onednn``.
    """
    if not torch.backends.mkldnn.is_available():
        return
    conv = torch.ops.aten.convolution.default
    targets: dict[Any, list] = {}
    reads = _get_attr_reads(graph)
    for node in graph.nodes:
        if node.op == "call_function" and node.target is conv and len(node.args) == 9:
            targets.setdefault(node.args[1], []).append(node)
    for weight, convs in targets.items():
        if getattr(weight, "op", None) != "get_attr" or reads.get(str(weight.target)) != 1 \
                or len(weight.users) != len(convs):
            continue
        plans = []
        for node in convs:
            x, w, bias, stride, padding, dilation, transposed, _, groups = node.args
            xv, wv = x.meta.get("val"), w.meta.get("val")
            if not (isinstance(xv, torch.Tensor) and isinstance(wv, torch.Tensor)) or transposed:
                break
            if _starts_an_unsafe_fusion(node):
                break
            if xv.dim() != 4 or wv.dim() != 4 or xv.dtype != torch.float32 or wv.dtype != torch.float32 \
                    or xv.device.type != "cpu" or wv.device.type != "cpu" or not wv.is_contiguous():
                break
            if bias is not None and not (isinstance(bias.meta.get("val"), torch.Tensor)
                                         and bias.meta["val"].dtype == torch.float32):
                break
            record = {"padding": _static_ints(padding), "stride": _static_ints(stride),
                      "dilation": _static_ints(dilation), "groups": groups if isinstance(groups, int) else None,
                      "input_size": _static_ints(xv.shape)}
            if any(v is None for v in record.values()) or len(record["padding"]) != 2 \
                    or len(record["stride"]) != 2 or len(record["dilation"]) != 2:
                break
            plans.append((node, record))
        else:
            # One packed weight per stored weight: every convolution that reads it must pack it the same way.
            if any(r != plans[0][1] for _, r in plans):
                continue
            for node, record in plans:
                x, w, bias = node.args[:3]
                attr, scalars, fused = _fused_activation(node) or ("none", [], [])
                with graph.inserting_before(node):
                    new = graph.call_function(torch.ops.mkldnn._convolution_pointwise.default,
                                              (x, w, bias, record["padding"], record["stride"],
                                               record["dilation"], record["groups"], attr, scalars, ""))
                new.meta.update((fused[-1] if fused else node).meta)
                _fake_val(new)
                (fused[-1] if fused else node).replace_all_uses_with(new)
                for n in reversed(fused):
                    graph.erase_node(n)
                graph.erase_node(node)
            if _conv_records is not None:
                _conv_records.onednn[str(weight.target)] = plans[0][1]


# Ops that Inductor's mkldnn passes fuse into a oneDNN linear when they read its output directly (as its
# unary attr), or that begin such a fused pattern (GELU, SiLU, hardswish, leaky ReLU): oneDNN's forms may
# differ from eager on NaN or infinities (``_eager_activations``). A linear read by one of them, or by a product
# or sum with a number, stays with ATen (``_linears_to_onednn``).
_LINEAR_FUSED_USERS = frozenset(getattr(torch.ops.aten, name).default for name in (
    "relu", "sigmoid", "tanh", "clamp_min", "clamp_max", "clamp", "hardtanh", "gelu", "silu", "hardswish",
    "hardsigmoid", "leaky_relu", "mish", "elu", "erf", "abs", "exp")) | {
    torch.ops.aten.gt.Scalar, torch.ops.aten.lt.Scalar, torch.ops.aten.ge.Scalar, torch.ops.aten.le.Scalar}


def _starts_a_linear_fusion(node) -> bool:
    """Whether a user of a linear ``node``'s output is one Inductor may fuse into oneDNN's linear in a form
    that is not eager's (``_LINEAR_FUSED_USERS``, or a product or sum with a number)."""
    return _starts_an_unsafe_fusion(node) or any(
        u.op == "call_function" and u.target in _LINEAR_FUSED_USERS for u in node.users)


# The smallest linear (rows x in x out multiply-adds) routed to oneDNN: below it MKL's GEMM is faster, oneDNN's
# op costing about 10 µs more per call (1 thread: 8x256x10 4.8 against 15.9 µs, 64x256x256 equal, 64x256x1024
# 357 against 311 µs with the weight packed; benchmarks/README.md).
ONEDNN_LINEAR_MIN_MACS = 2**22
# The most bytes of linear weights an entry packs at load: a model with more keeps MKL's GEMM (see
# ``_linears_to_onednn``). A packed weight is a copy in each serving process, where plain weights stay mapped
# from the pack, shared between the processes that serve it, and read only when a call needs them.
ONEDNN_LINEAR_MAX_BYTES = 64 * 2**20


def _linears_to_onednn(graph) -> None:
    """Inductor's post-grad pass for CPU entries with ``onednn_convs``: a float32 linear of static shape and at
    least ``ONEDNN_LINEAR_MIN_MACS`` multiply-adds (``addmm(bias, x, w.T)`` or ``mm(x, w.T)``, as ``nn.Linear``
    decomposes) whose weight ``w`` [out, in] is a stored weight read by nothing else calls oneDNN
    (``mkldnn._linear_pointwise``) with that weight as it is, instead of MKL's GEMM. A weight stored ``[in, out]``
    (``addmm(bias, x, w)``, as GPT-2's ``Conv1D`` stores it) becomes a folded constant, the weight transposed at
    load (a ``transpose`` fold step), in a graph that writes no buffer. Where the linears so chosen hold more
    than ``ONEDNN_LINEAR_MAX_BYTES`` of weights, none is routed: packing would copy the bulk of a large model's
    weights into every serving process.

    The runtime binds that constant to the weight packed for oneDNN on the serving host, at load
    (``packed_weights``, kind ``onednn_linear``): at the transformers' shapes oneDNN's GEMM with its weight
    packed once is about 10% faster than MKL's here, which repacks its operand on every call. The op also takes
    the plain weight, so code whose constant is bound to the stored weight computes the same outputs, slower.
    A linear whose output an activation reads directly stays with ATen: Inductor's own passes would fuse the
    activation into oneDNN's op (``_starts_a_linear_fusion``). Records each weight in ``conv_records().linear``.
    """
    if not torch.backends.mkldnn.is_available():
        return
    aten = torch.ops.aten
    reads = _get_attr_reads(graph)
    stateless = not _writes_a_buffer(graph)  # where a new (transposed) constant may be added
    plans = []
    for node in list(graph.nodes):
        if node.op != "call_function" or node.kwargs:
            continue
        if node.target is aten.addmm.default and len(node.args) == 3:
            bias, x, wt = node.args
        elif node.target is aten.mm.default and len(node.args) == 2:
            bias, (x, wt) = None, node.args
        else:
            continue
        if isinstance(wt, torch.fx.Node) and wt.op == "call_function" and wt.target is aten.permute.default \
                and list(wt.args[1]) == [1, 0] and len(wt.users) == 1:
            w, stored_in_out = wt.args[0], False
        elif stateless and isinstance(wt, torch.fx.Node) and wt.op == "get_attr":
            w, stored_in_out = wt, True  # stored [in, out], as GPT-2's Conv1D stores it: transposed at load
        else:
            continue
        if not (isinstance(w, torch.fx.Node) and w.op == "get_attr" and reads.get(str(w.target)) == 1
                and len(w.users) == 1):
            continue
        xv, wv, ov = x.meta.get("val"), w.meta.get("val"), node.meta.get("val")
        if not all(isinstance(v, torch.Tensor) and v.dim() == 2 and v.dtype == torch.float32
                   and v.device.type == "cpu" for v in (xv, wv, ov)) or not wv.is_contiguous():
            continue
        if stored_in_out:
            wv = wv.t()
        rows = _static_ints(xv.shape)
        if rows is None or _static_ints(wv.shape) is None \
                or math.prod(rows) * int(wv.shape[0]) < ONEDNN_LINEAR_MIN_MACS:
            continue
        if bias is not None:
            bv = bias.meta.get("val") if isinstance(bias, torch.fx.Node) else None
            if not (isinstance(bv, torch.Tensor) and bv.dtype == torch.float32
                    and tuple(bv.shape) == (wv.shape[0],)):
                continue
        if _starts_a_linear_fusion(node):
            continue
        plans.append((node, x, bias, w, wt, wv, stored_in_out, rows[0]))
    # Packing copies each weight into the process at load: a model whose linears hold more than the budget keeps
    # MKL's GEMM on its plain weights, which stay mapped from the pack, shared between processes and read lazily.
    if sum(wv.numel() * 4 for _, _, _, _, _, wv, _, _ in plans) > ONEDNN_LINEAR_MAX_BYTES:
        return
    for node, x, bias, w, wt, wv, stored_in_out, rows in plans:
        if stored_in_out:
            from aotpack_runtime.schema import FoldRecord, FoldStep

            record = FoldRecord(shape=tuple(int(d) for d in wv.shape), steps=(
                FoldStep(op="weight", name=str(w.target)), FoldStep(op="transpose", inputs=(0,))))
            weight = _folded_constant(graph, node, record, wv)
        else:
            weight = w
        with graph.inserting_before(node):
            new = graph.call_function(torch.ops.mkldnn._linear_pointwise.default, (x, weight, bias, "none", [], ""))
        new.meta.update(node.meta)
        _fake_val(new)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        graph.erase_node(wt)  # the permute of w, or (stored [in, out]) w itself, read now by the folded constant
        if _conv_records is not None:
            _conv_records.linear[str(weight.target)] = rows


def _cpu_post_grad(graph) -> None:
    """The post-grad passes of a CPU entry with ``onednn_convs``."""
    _complex_casts_to_aten(graph)
    _fold_into_convolutions(graph)
    _eager_activations(graph)
    _convolutions_to_onednn(graph)
    _linears_to_onednn(graph)


def _graph_pass(fn):
    """``fn`` as an Inductor custom graph pass (with the identity Inductor's caches ask for)."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class Pass(CustomGraphPass):
        def __call__(self, graph) -> None:
            fn(graph)

        def uuid(self) -> str:
            # the linear thresholds decide what the pass rewrites: a build with others is another build
            return f"aotpack.{fn.__name__}.4.{ONEDNN_LINEAR_MIN_MACS}.{ONEDNN_LINEAR_MAX_BYTES}"

    return Pass()


# gcc -march level and Inductor vector width for each CPU ISA a pack can target.
ISA_COMPILER_OPTIONS: dict[str, dict[str, Any]] = {
    "x86-64": {"cpp.march": "x86-64", "cpp.simdlen": 0},
    "avx2": {"cpp.march": "x86-64-v3", "cpp.simdlen": 256},
    "avx512": {"cpp.march": "x86-64-v4", "cpp.simdlen": 512},
    "native": {"cpp.march": "native"},
}


# Added for graphs that write buffers in place (a pack's state): runtime constant folding stops the writes
# altogether (joint-graph constant folding, which would read a mutated one-element buffer's build-time value
# into the code, is off for every build: BASE_INDUCTOR_CONFIG).
STATEFUL_INDUCTOR_CONFIG: dict[str, Any] = {
    "aot_inductor.use_runtime_constant_folding": False,
}


def compiler_march(cpu_isa: str) -> str | None:
    """The ``-march`` that the compiler wrapper must put in place of Inductor's ``-march=native`` for
    ``cpu_isa``, on a torch without ``cpp.march`` (before 2.13); None where Inductor sets it itself or the
    target is the build host (``native``). ``-march=native`` also tunes for the build host's CPU model, so
    without this the code would differ between hosts, and could use instructions the target lacks."""
    march = ISA_COMPILER_OPTIONS[cpu_isa].get("cpp.march", "native")
    if march == "native" or "cpp.march" in _available(ISA_COMPILER_OPTIONS[cpu_isa]):
        return None
    return march


def inductor_options(cpu_isa: str, cpu_threads: int, stateful: bool = False,
                     onednn_convs: bool = False) -> dict[str, Any]:
    """The Inductor config of a build for ``cpu_isa``, with CPU code planned for ``cpu_threads`` threads
    (and, for a ``stateful`` graph, ``STATEFUL_INDUCTOR_CONFIG``).

    Inductor decides how many loop levels of a kernel to parallelise from a thread count (by default
    torch.get_num_threads(), and baked into the code as ``num_threads(N)`` when it differs from the cores):
    a build under OMP_NUM_THREADS=1, as Ray and Dask workers set, would emit serial kernels. A fixed plan and
    dynamic OpenMP regions make the code independent of the build host's cores and thread settings, while
    it still uses every thread the serving process has.

    ``onednn_convs`` (CPU entries): float32 convolutions call oneDNN (``_convolutions_to_onednn``).
    """
    config = _available(BASE_INDUCTOR_CONFIG)
    config.update(_available(ISA_COMPILER_OPTIONS[cpu_isa]))
    config["cpp.threads"] = cpu_threads
    config["post_grad_custom_pre_pass"] = _graph_pass(_cpu_post_grad if onednn_convs else _complex_casts_to_aten)
    # Inductor writes its AOTI_* entries (device key, CPU ISA, platform) into this dict in place at every
    # compile: a fresh one per build keeps them out of the global config, where they would change the next
    # build's effective config (and so its build cache key).
    config["aot_inductor.metadata"] = {}
    if stateful:
        config.update(STATEFUL_INDUCTOR_CONFIG)
    return config


def export_strict(module: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any = None):
    """Dynamo bytecode capture of the whole forward (torch.export with strict=True: fullgraph enforced).

    On a data-dependent graph break, torch.export prints the partial graph to stderr before raising; that
    dump is dropped here (it stays on the exception as ``partial_fx_graph``) and anything else that was
    written to stderr is passed on.
    """
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer), no_real_value_copies():
            return torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes, strict=True)
    except Exception as e:
        partial = getattr(e, "partial_fx_graph", None)
        text = buffer.getvalue()
        buffer = io.StringIO(text.replace(f"{partial}\n", "") if partial else text)
        raise
    finally:
        sys.stderr.write(buffer.getvalue())


# The loggers torch.export writes its own account of a failed capture to (a constraint violation is about 60
# lines of "Error while creating guard" and stacks on stderr, before the exception says it again).
CAPTURE_LOGGERS = ("torch._dynamo", "torch._guards", "torch._export", "torch.export",
                   "torch.fx.experimental.symbolic_shapes")


@contextlib.contextmanager
def quiet_capture_logs() -> Iterator[None]:
    """Silence torch's capture loggers (``CAPTURE_LOGGERS`` and the loggers below them) for the duration:
    what they say of a failure is in the exception, which aotpack turns into one error."""
    names = [n for n in list(logging.root.manager.loggerDict)
             if any(n == p or n.startswith(p + ".") for p in CAPTURE_LOGGERS)]
    loggers = [logging.getLogger(n) for n in sorted(set(names) | set(CAPTURE_LOGGERS))]
    saved = [lg.disabled for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        yield
    finally:
        for lg, was in zip(loggers, saved):
            lg.disabled = was


@dataclass(frozen=True)
class DimSpec:
    """What one entry of a ``dynamic_shapes`` spec says about a dimension. ``kind``: ``"static"`` (None, or
    ``Dim.STATIC``), ``"size"`` (an int: exactly that size), ``"dim"`` (a named ``Dim``), ``"derived"`` (``dx +
    1``: ``name`` is the root's, ``fn`` maps the root's size to this one), ``"auto"`` (``Dim.AUTO``: dynamic
    where the model allows), ``"dynamic"`` (``Dim.DYNAMIC``: must be dynamic), or ``"unknown"``."""

    kind: str
    name: str | None = None
    low: int | None = None
    high: int | None = None  # None: no upper bound
    fn: Callable[[int], Any] | None = None
    text: str = ""


def dim_spec(d: Any) -> DimSpec:
    """Classify one value of a ``dynamic_shapes`` dimension mapping (torch.export's ``Dim`` objects, whose
    derived and hint classes are private)."""
    from torch.export import Dim
    from torch.utils._sympy.numbers import int_oo

    def bound(v: Any) -> int | None:
        return None if v is None or v is int_oo or v == int_oo or v == -int_oo else int(v)

    if d is None:
        return DimSpec("static")
    if isinstance(d, int) and not isinstance(d, bool):
        return DimSpec("size", low=d, high=d, text=str(d))
    hint = getattr(d, "type", None)
    if hint is not None and hint in (Dim.AUTO.type, Dim.DYNAMIC.type, Dim.STATIC.type):
        kind = "auto" if hint == Dim.AUTO.type else "dynamic" if hint == Dim.DYNAMIC.type else "static"
        return DimSpec(kind, low=bound(getattr(d, "min", None)), high=bound(getattr(d, "max", None)),
                       text=f"Dim.{kind.upper()}")
    if isinstance(d, Dim):
        root = getattr(d, "root", None)
        if root is not None and callable(getattr(d, "fn", None)):
            return DimSpec("derived", name=getattr(root, "__name__", None), low=bound(d.min), high=bound(d.max),
                           fn=d.fn, text=str(getattr(d, "__name__", d)))
        return DimSpec("dim", name=d.__name__, low=bound(d.min), high=bound(d.max), text=d.__name__)
    return DimSpec("unknown", text=repr(d))


@contextlib.contextmanager
def no_real_value_copies() -> Iterator[None]:
    """Dynamo without its copies of every weight while it exports.

    When it exports, Dynamo keeps a "real value" of every tensor it meets (``real_value_cache``, for the rare
    op it must run on real data), and makes each one a clone, twice: a build would hold three copies of the
    weights at once. ``torch.compile`` keeps the tensors themselves there; so does an export under this
    patch (``torch._dynamo.variables.builder._clone_input``, looked up by name at each call).
    """
    from torch._dynamo.variables import builder

    original = builder._clone_input

    def keep(value, fake_mode):
        return value

    builder._clone_input = keep
    try:
        yield
    finally:
        builder._clone_input = original


def graph_break_types() -> tuple[type, ...]:
    """Exception types Dynamo raises for a graph break or an unsupported construct."""
    from torch._dynamo import exc

    return tuple(t for t in (getattr(exc, "Unsupported", None), getattr(exc, "UserError", None),
                             getattr(exc, "TorchRuntimeError", None)) if t is not None)


def unsupported_details(err: BaseException) -> tuple[str | None, list]:
    """The graph-break type name and the user stack (FrameSummary list) Dynamo attaches to its errors."""
    gb_type = getattr(err, "gb_type", None)
    stack = list(getattr(err, "real_stack", None) or [])
    return gb_type, stack


@contextlib.contextmanager
def inductor_config(options: dict[str, Any]) -> Iterator[None]:
    from torch._inductor import config

    with config.patch(options):
        yield


# The vector ISA class Inductor uses for each CPU ISA a pack can target (None: scalar code).
_VEC_ISA_CLASSES = {"x86-64": None, "avx2": "VecAVX2", "avx512": "VecAVX512"}


@contextlib.contextmanager
def pinned_vec_isa(cpu_isa: str) -> Iterator[None]:
    """Make Inductor generate vector code for ``cpu_isa`` whatever CPU the build host has.

    Inductor picks its vector ISA from the ISAs it finds valid on the build host (it compiles and runs a
    test program for each), so two hosts with different CPUs could generate different code for the same
    target. aotpack checks the host against the target itself (BuildOptions.resolved); here the list of
    valid ISAs is exactly the target's. ``native`` keeps Inductor's own probing: it means this host.
    """
    if cpu_isa not in _VEC_ISA_CLASSES:
        yield
        return
    from torch._inductor import cpu_vec_isa

    name = _VEC_ISA_CLASSES[cpu_isa]
    pinned = [] if name is None else [getattr(cpu_vec_isa, name)()]
    saved = cpu_vec_isa.valid_vec_isa_list
    cpu_vec_isa.valid_vec_isa_list = lambda: list(pinned)
    try:
        yield
    finally:
        cpu_vec_isa.valid_vec_isa_list = saved


@contextlib.contextmanager
def serial_small_kernels() -> Iterator[None]:
    """Keep small CPU kernels serial under ``cpp.dynamic_threads``.

    With dynamic threads Inductor opens an OpenMP parallel region in every kernel, even a loop over 24
    elements, where the region costs more than the work (measured: a small model's call went from 34 to
    54 us on 2 cores). Here the parallel depth of each kernel is decided as without dynamic threads (for the
    planned thread count), while the regions that remain still take the thread count at run time.
    """
    from torch._inductor import config
    from torch._inductor.codegen.cpp import CppKernel

    original = CppKernel.decide_parallel_depth

    def decide_parallel_depth(self, max_parallel_depth, threads):
        with config.patch({"cpp.dynamic_threads": False}):
            return original(self, max_parallel_depth, threads)

    CppKernel.decide_parallel_depth = decide_parallel_depth
    try:
        yield
    finally:
        CppKernel.decide_parallel_depth = original


# The first torch series whose C++ wrapper keys its int-array cache by the writer's owner (see
# ``stable_int_arrays``).
INT_ARRAY_KEY_FIXED_IN = (2, 13)


@contextlib.contextmanager
def stable_int_arrays() -> Iterator[None]:
    """Make the C++ wrapper's reuse of size and stride arrays independent of memory addresses (torch < 2.13).

    The wrapper declares each size or stride list once (``static constexpr int64_t int_array_N[]``) and reuses
    the declaration through a cache keyed by ``id(writeline)``. Before torch 2.13 every caller passes
    ``self.wrapper_call.writeline``, a new bound method on each access, whose id is an address the previous
    one may or may not have freed: whether a declaration is reused, and so the generated C++ and the .so,
    followed the allocator, which the hash seed moves (``PYTHONHASHSEED`` 4 gave another pack than 1, 2 and 3
    under torch 2.11). Torch 2.13 keys by the bound method's owner instead, and 2.15 also keeps each owner
    alive; this does both for the older series."""
    if torch_version() >= INT_ARRAY_KEY_FIXED_IN:
        yield
        return
    from torch._inductor.codegen.cpp_wrapper_cpu import CppWrapperCpu

    original = CppWrapperCpu.codegen_int_array_var

    def codegen_int_array_var(self, int_array, writeline, known_statically=False, graph=None):
        owner = getattr(writeline, "__self__", writeline)
        key = (int_array, id(owner), known_statically, id(graph) if graph else None)
        cache = self.codegen_int_array_var_cache
        if key not in cache:
            # The owner is kept alive with the cache, so that its id cannot pass to another writer (torch 2.15
            # does the same).
            self.__dict__.setdefault("_aotpack_int_array_owners", []).append(owner)
            cache[key] = self._codegen_int_array_var_impl(int_array, writeline, known_statically)
        return cache[key]

    CppWrapperCpu.codegen_int_array_var = codegen_int_array_var
    try:
        yield
    finally:
        CppWrapperCpu.codegen_int_array_var = original


@contextlib.contextmanager
def precompiled_header_dir(folder: str) -> Iterator[None]:
    """Keep Inductor's precompiled headers in ``folder`` (its default is a fixed folder in /tmp, chosen at
    import and ignoring TORCHINDUCTOR_CACHE_DIR). Their names are hashes of the header's preprocessed text,
    the compile command and the compiler version, so builds with the same toolchain share them. Each header
    a compile uses gets its modification time set to now (``codecache._precompile_header`` returns its
    path), so that ``aotpack cache prune`` can tell the headers in use from the stale ones."""
    from torch._inductor import codecache

    saved = codecache._HEADER_DIR, codecache._HEADER_LOCK_DIR, codecache._precompile_header
    original = codecache._precompile_header

    def precompile_and_record(*args, **kwargs):
        path = original(*args, **kwargs)
        for used in (path + PRECOMPILED_SUFFIX, path):
            with contextlib.suppress(OSError):
                os.utime(used)
        return path

    codecache._HEADER_DIR, codecache._HEADER_LOCK_DIR = folder, os.path.join(folder, "locks")
    codecache._precompile_header = precompile_and_record
    try:
        yield
    finally:
        codecache._HEADER_DIR, codecache._HEADER_LOCK_DIR, codecache._precompile_header = saved


def object_build(builder) -> tuple[str, list[str], str] | None:
    """(command line, source files, object file) of one of Inductor's compiler calls that makes an object
    file, or None for any other call (precompiled header, preprocessing, link)."""
    if not builder._compile_only:
        return None
    return builder.get_command_line(), builder._sources_args.split(), builder.get_target_file_path()


@contextlib.contextmanager
def object_compiles(parallel: bool, around: Callable[[Callable[[], None], Any], None] | None = None) -> Iterator[None]:
    """How Inductor's compiler calls run during a compile: ``around(run, builder)``, if given, is called
    instead of each call (it may skip ``run``, e.g. to reuse an object file), and with ``parallel`` the
    AOTInductor wrapper's object file compiles while the kernels' object file does.

    Inductor (``AotCodeCompiler.compile``) compiles ``model.wrapper.cpp`` (-O1) and then ``model.kernel.cpp``
    (-O3), one after the other, before it links them. Here the wrapper's compile starts in a thread and the
    kernels' compile, the next build Inductor asks for, waits for it before it returns, so both objects exist
    before anything reads them. Each object is the same whichever finishes first: the pack does not change.
    """
    if not parallel and around is None:
        yield
        return
    import threading

    from torch._inductor.cpp_builder import CppBuilder

    original = CppBuilder.build
    pending: list[tuple[threading.Thread, list]] = []

    def one(builder) -> None:
        if around is None:
            original(builder)
        else:
            around(lambda: original(builder), builder)

    def run(builder, failure: list) -> None:
        try:
            one(builder)
        except BaseException as e:  # handed to the thread that waits for this one
            failure.append(e)

    def build(self) -> None:
        if parallel and self._compile_only and self._name == f"{GENERATED_NAME}.wrapper" and not pending:
            failure: list = []
            thread = threading.Thread(target=run, args=(self, failure), daemon=True)
            thread.start()
            pending.append((thread, failure))
            return
        try:
            one(self)
        finally:
            while pending:
                thread, failure = pending.pop()
                thread.join()
                if failure:
                    raise failure[0]

    CppBuilder.build = build
    try:
        yield
    finally:
        CppBuilder.build = original
        while pending:  # a compile that failed before the kernels' build: wait for the wrapper's
            pending.pop()[0].join()


def graph_text(exported) -> bytes:
    """The captured graph as torch.export's serialized JSON (nodes, tensor shapes and strides, dtypes, the
    signature, range constraints, module call graph), without each node's metadata: stack traces name host
    paths and the model file's module, and ``nn_module_stack``/``from_node`` hold object ids that change
    with every process. None of it reaches the code Inductor generates. Weights are not included."""
    import inspect

    from torch._export.serde.serialize import serialize

    # torch 2.11's serialize() always writes the weights too (apart from the program's JSON, which is all
    # that is read here).
    skip = ("serialize_state_dict", "serialize_constants", "serialize_example_inputs")
    params = inspect.signature(serialize).parameters
    artifact = serialize(exported, **{k: False for k in skip if k in params})
    program = json.loads(artifact.exported_program)
    for node in program["graph_module"]["graph"]["nodes"]:
        node["metadata"] = {}
    return json.dumps(program, sort_keys=True, separators=(",", ":")).encode()


# Inductor settings that hold host paths (the compiler wrapper's path); what they stand for is in the key
# as the compiler's identity.
_HOST_CONFIG_KEYS = ("cpp.cxx", "cuda.cuda_cxx")


def effective_config(options: dict[str, Any]) -> dict[str, Any]:
    """Every Inductor and AOT-autograd setting a compile with ``options`` would see (defaults, the
    TORCHINDUCTOR_* environment, then ``options``), as JSON-able values, less those Inductor itself leaves
    out of its cache keys (paths, custom passes, cache switches) and host paths."""
    from torch._functorch import config as functorch_config
    from torch._inductor import config

    with config.patch({k: v for k, v in options.items() if k not in _HOST_CONFIG_KEYS}):
        inductor = config.save_config_portable()
    out = {"inductor": {k: v for k, v in inductor.items() if k not in _HOST_CONFIG_KEYS},
           "functorch": functorch_config.save_config_portable()}
    return json.loads(json.dumps(out, sort_keys=True, default=repr))


def aoti_compile(exported, package_path: str, options: dict[str, Any]) -> str:
    """Compile an ExportedProgram to an AOTInductor package (a zip holding the .so and its sources)."""
    from torch._inductor import aoti_compile_and_package

    return aoti_compile_and_package(exported, package_path=package_path, inductor_configs=options)


def program_copy(exported):
    """An independent copy of an ExportedProgram: ``move_to_device_pass`` rewrites the program's graph and
    weight dicts in place, and the pack's weights are read from the original, which must stay on the CPU
    with its real values. (A save/load round trip, as for compile workers: ``copy.deepcopy`` renames a
    placeholder called ``input`` to ``input_1`` and the copy then fails validation.)"""
    buffer = io.BytesIO()
    torch.export.save(exported, buffer)
    buffer.seek(0)
    # Loading warns about each unbacked symbol (from .item()) the graph no longer names: nothing to act on.
    serde_log = logging.getLogger("torch._export.serde.serialize")
    level = serde_log.level
    serde_log.setLevel(logging.ERROR)
    try:
        return torch.export.load(buffer)
    finally:
        serde_log.setLevel(level)


def move_to_cuda(exported):
    """A copy of the exported program (captured on the CPU) with its graph, inputs and weights on the
    current GPU; the original is not changed."""
    from torch.export.passes import move_to_device_pass

    return move_to_device_pass(program_copy(exported), f"cuda:{torch.cuda.current_device()}")


def treespec_parts(spec) -> tuple[type | None, Any, list]:
    """(node type, context, children) of a pytree TreeSpec; type None for a leaf."""
    if spec.is_leaf():
        return None, None, []
    children = spec.children() if callable(getattr(spec, "children", None)) else spec.children_specs
    return spec.type, spec.context, list(children)


def tree_flatten(tree: Any):
    return pytree.tree_flatten(tree)


def fake_tensor_facts(val: Any) -> dict | None:
    """Sizes/strides (ints or SymInt expressions as strings), dtype and device of a placeholder's fake
    tensor, or None when the value is not a tensor."""
    if not isinstance(val, torch.Tensor):
        return None
    return {"sizes": list(val.shape), "strides": list(val.stride()), "dtype": val.dtype,
            "device": val.device, "requires_grad": val.requires_grad}


def custom_ops(exported) -> list[tuple[str, str]]:
    """(op name, stack trace) of each call in the graph to an operator outside aten/prims: a custom op
    whose implementation lives in a Python library, which compiled code can only reach through a proxy
    executor that a pack does not carry."""
    out = []
    for node in exported.graph.nodes:
        target = node.target
        if node.op == "call_function" and isinstance(target, torch._ops.OpOverload) \
                and target.namespace not in ("aten", "prims"):
            out.append((f"{target.namespace}.{target._opname}", node.meta.get("stack_trace") or ""))
    return out


def save_exported(exported, path: str) -> None:
    """Write an ExportedProgram to a file (for a compile worker process)."""
    torch.export.save(exported, path)


def load_exported(path: str):
    return torch.export.load(path)


def symbol_range(rng) -> tuple[int, int | None]:
    """(min, max) of a shape symbol's value range in ``ExportedProgram.range_constraints``; max None when the
    symbol has no upper bound (torch's ``int_oo``, whose ``is_finite`` is true: compare by identity)."""
    from torch.utils._sympy.numbers import int_oo

    lo = 0 if rng is None or rng.lower in (int_oo, -int_oo) else max(0, int(rng.lower))
    hi = None if rng is None or rng.upper is int_oo or rng.upper == int_oo else int(rng.upper)
    return lo, hi


def polynomial_terms(expr) -> dict[tuple[str, ...], int] | None:
    """A sympy size or stride expression as ``{sorted symbol names: integer coefficient}``, or None when it
    is not a polynomial with integer coefficients over symbols (e.g. a floor division)."""
    import sympy

    terms: dict[tuple[str, ...], int] = {}
    for term, coeff in sympy.expand(expr).as_coefficients_dict().items():
        if not getattr(coeff, "is_Integer", False):
            return None
        names: list[str] = []
        for factor in sympy.Mul.make_args(term):
            if factor == 1:
                continue
            base, exp = factor.as_base_exp()
            if not (getattr(base, "is_Symbol", False) and getattr(exp, "is_Integer", False) and int(exp) > 0):
                return None
            names += [str(base)] * int(exp)
        key = tuple(sorted(names))
        terms[key] = terms.get(key, 0) + int(coeff)
    return terms


def lift_constants_to_buffers(exported):
    """The program with every lifted tensor constant (a plain tensor attribute of the model: a table, a view
    of another tensor) turned into a buffer of the same name, and every parameter, buffer and constant that
    is not dense (non-contiguous, or a view with a storage offset) replaced by a dense copy of the same
    values. Constants that are not tensors stay constants.

    Inductor names a lifted constant ``_tensor_constantN`` and forgets where it came from; a buffer keeps its
    name, so the pack can store it as a weight. A dense copy is what the pack stores, and Inductor compiles
    for the strides it sees, so both must be the same tensor. The original program is not changed."""
    from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec

    sig = exported.graph_signature
    state = dict(exported.state_dict)
    constants = dict(exported.constants)
    specs = []
    for spec in sig.input_specs:
        if spec.kind == InputKind.CONSTANT_TENSOR and isinstance(constants.get(spec.target), torch.Tensor):
            state[spec.target] = constants.pop(spec.target)
            spec = InputSpec(InputKind.BUFFER, spec.arg, spec.target, persistent=True)
        specs.append(spec)
    dense: dict[int, torch.Tensor] = {}  # tied tensors stay tied

    def densify(t):
        if not isinstance(t, torch.Tensor) or (t.is_contiguous() and t.storage_offset() == 0):
            return t
        if id(t) not in dense:
            copy = t.detach().clone(memory_format=torch.contiguous_format)
            dense[id(t)] = torch.nn.Parameter(copy, requires_grad=t.requires_grad) \
                if isinstance(t, torch.nn.Parameter) else copy
        return dense[id(t)]

    state = {k: densify(v) for k, v in state.items()}
    constants = {k: densify(v) for k, v in constants.items()}
    signature = ExportGraphSignature(input_specs=specs, output_specs=list(sig.output_specs))
    return exported._update(exported.graph_module, signature, state_dict=state, constants=constants)


def outputs_for_inductor(exported):
    """The program with tensor outputs only, which is what AOTInductor compiles: a user output that is a
    constant (a number or string the model returns) is dropped, a Python number computed at run time (from a
    size, or read with ``.item()``) is returned as a 0-d tensor, and the output structure becomes a flat
    tuple. The compiled code then returns, in order, the user outputs that are not constants; the pack
    rebuilds the model's structure (see guards.derive).

    ``t.item()`` is returned as ``t`` (its ``.item()`` at run time is eager's number exactly); any other number
    becomes ``aten.scalar_tensor`` of int64, float64 or bool. The program is not changed: the result has a
    copy of its graph whose nodes share their fake values (which must stay in one fake mode). A program in
    this form can be saved with ``torch.export.save`` (which cannot write a bool output)."""
    from torch._guards import detect_fake_mode
    from torch.export.graph_signature import ExportGraphSignature, OutputKind, OutputSpec, TensorArgument

    dtypes = {torch.SymInt: torch.int64, torch.SymFloat: torch.float64, torch.SymBool: torch.bool}

    def changes(spec, node) -> bool:
        if spec.kind != OutputKind.USER_OUTPUT:
            return False
        val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        return type(spec.arg).__name__ == "ConstantArgument" or type(val) in dtypes

    if not any(changes(*pair) for pair in zip(exported.graph_signature.output_specs,
                                               exported.graph.output_node().args[0])):
        return exported
    sig = exported.graph_signature
    graph = torch.fx.Graph()
    copies: dict = {}
    for node in exported.graph.nodes:
        copies[node] = graph.node_copy(node, lambda n: copies[n])
    gm = torch.fx.GraphModule(exported.graph_module, graph)
    gm.meta.update(exported.graph_module.meta)
    out_node = graph.output_node()
    values = list(out_node.args[0])
    fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.nodes if "val" in n.meta])
    kept_values, kept_specs = [], []
    for spec, node in zip(sig.output_specs, values):
        if spec.kind == OutputKind.USER_OUTPUT and type(spec.arg).__name__ == "ConstantArgument":
            continue
        val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        if spec.kind == OutputKind.USER_OUTPUT and type(val) in dtypes:
            if node.target is torch.ops.aten.item.default:
                node = node.args[0]
            else:
                dtype = dtypes[type(val)]
                with graph.inserting_before(out_node):
                    new = graph.call_function(torch.ops.aten.scalar_tensor.default, (node,), {"dtype": dtype})
                with fake_mode:
                    new.meta["val"] = torch.ops.aten.scalar_tensor.default(val, dtype=dtype)
                node = new
            spec = OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(name=node.name), None)
        kept_values.append(node)
        kept_specs.append(spec)
    out_node.args = (tuple(kept_values),)
    gm.recompile()
    signature = ExportGraphSignature(input_specs=list(sig.input_specs), output_specs=kept_specs)
    program = exported._update(gm, signature)
    n_user = sum(1 for spec in kept_specs if spec.kind == OutputKind.USER_OUTPUT)
    program._module_call_graph[0].signature.out_spec = pytree.tree_flatten(tuple(range(n_user)))[1]
    return program


def op_name(target) -> str | None:
    """The name an ATen op has in AOTInductor's extern-kernel description (``aten::_unique2``,
    ``aten::median.dim``), or None for a graph node that is not an op overload."""
    return target.name() if isinstance(target, torch._ops.OpOverload) else None
