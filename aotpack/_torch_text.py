"""Readers of text that torch writes, in one place: the C++ and CUDA wrappers Inductor generates (kernel names,
the constants table, the kernels a CUDA wrapper loads) and the messages of Dynamo and torch.export that aotpack
turns into its own errors (constraint violations, ranges, a buffer assigned in forward, an output type it
cannot flatten). A torch release that changes one of these formats breaks here first; each reader has a test
on what the torch under test really writes (tests/test_torch_private.py). Imports no torch module: the
readers take text.

May not: import torch: every reader takes text.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from aotpack_runtime.errors import BuildError

# torch.export's text for a constraint violation (torch.fx.experimental.symbolic_shapes), as of 2.11 to 2.14:
#   Constraints violated (b)! For more information, run with TORCH_LOGS="+dynamic".
#     - You marked b as dynamic but your code specialized it to be a constant (32). If you're using ...
#   User stack:
#     File "model.py", line 6, in forward
#       return y.reshape(32, -1) * 2
#   Suggested fixes:
#     b = 32
# (the user stack only where a line fixed the size; other reasons: "Not all values of b ... satisfy the
# generated guard 17 <= L['x'].size()[0] ...", fixed by "b = Dim('b', min=17, max=64)"; "The values of c ...
# and b ... must always be equal", fixed by "c = b")
_VIOLATED = re.compile(r"Constraints violated \(([^)]*)\)!")
_BULLET = re.compile(r"^\s+- (.+)$", re.M)
_STACK_FRAME = re.compile(r'^\s+File "([^"]+)", line (\d+), in [^\n]*\n\s+([^\n]*)', re.M)
# An example size outside a Dim's range: "64 not in range [2, 8]".
_NOT_IN_RANGE = re.compile(r"^(-?\d+) not in range \[(-?\d+), (-?\d+|int_oo|inf)\]", re.M)


@dataclass(frozen=True)
class ConstraintViolation:
    """The useful part of torch's constraint violation text: the Dim names it is about, each reason (its
    first sentence: "You marked b as dynamic but your code specialized it to be a constant (32)"), the user
    stack, innermost frame last, as (file, line, code), and torch's suggested fixes ("b = 32")."""

    symbols: tuple[str, ...]
    reasons: tuple[str, ...]
    stack: tuple[tuple[str, int, str], ...]
    fixes: tuple[str, ...] = ()


def constraint_violation(text: str) -> ConstraintViolation | None:
    """Parse torch.export's constraint violation message, or None when ``text`` is not one."""
    m = _VIOLATED.search(text)
    if not m:
        return None
    symbols = tuple(s.strip() for s in m.group(1).split(",") if s.strip())
    reasons = tuple(re.split(r"(?<=[).])\s+If you're using", b.strip())[0].strip().rstrip(".")
                    for b in _BULLET.findall(text))
    stack_text = text.split("User stack:", 1)[1] if "User stack:" in text else ""
    stack = tuple((f, int(n), code.strip()) for f, n, code in _STACK_FRAME.findall(stack_text))
    fixes: list[str] = []
    if "Suggested fixes:" in text:
        for line in text.split("Suggested fixes:", 1)[1].splitlines()[1:]:
            if not line.strip():
                break
            fixes.append(line.strip())
    return ConstraintViolation(symbols=symbols, reasons=reasons, stack=stack, fixes=tuple(fixes))


def range_violation(text: str) -> tuple[int, int, int | None] | None:
    """(size, low, high) from torch.export's "64 not in range [2, 8]" (an example size outside a Dim's range,
    where the low end is the range torch traces with: 2 where the Dim says 0 or 1), or None."""
    m = _NOT_IN_RANGE.search(text)
    if not m:
        return None
    high = None if m.group(3) in ("int_oo", "inf") else int(m.group(3))
    return int(m.group(1)), int(m.group(2)), high


def kernel_symbols(kernel_source: str) -> tuple[str, ...]:
    """The kernels a generated CPU kernel file defines (its ``extern "C" void NAME(`` functions), sorted."""
    return tuple(sorted(set(re.findall(r'extern "C"\s+void\s+(\w+)\s*\(', kernel_source))))


@dataclass(frozen=True)
class ConstantInfo:
    """One row of the constants table an AOTInductor wrapper compiles in (``constants_info_[i]``)."""

    name: str  # the code's constant name
    fqn: str  # the model's parameter or buffer name
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


def wrapper_constants(wrapper_source: str) -> list[ConstantInfo]:
    """The constants table of a generated AOTInductor wrapper, in the wrapper's order. Fields the wrapper does
    not set take their defaults (no shape, offset 0); a constant without its parameter name is an error."""
    def table(pattern: str) -> dict[str, str]:
        return dict(re.findall(r"constants_info_\[(\d+)\]\." + pattern, wrapper_source))

    names, fqns = table(r'name = "([^"]*)";'), table(r'original_fqn = "([^"]*)";')
    shapes, strides = table(r"shape = \{([^}]*)\};"), table(r"stride = \{([^}]*)\};")
    offsets = table(r"offset = (\d+);")
    if set(names) != set(fqns):
        raise BuildError("the generated wrapper lists constants without their parameter names")

    def ints(text: str) -> tuple[int, ...]:
        return tuple(int(x) for x in text.replace(" ", "").split(",") if x)

    return [ConstantInfo(name=names[i], fqn=fqns[i], shape=ints(shapes.get(i, "")), stride=ints(strides.get(i, "")),
                         offset=int(offsets.get(i, "0"))) for i in sorted(names, key=int)]


# A generated CPU wrapper's call of oneDNN's convolution (``mkldnn._convolution_pointwise``) on a constant weight:
#   aoti_torch_cpu_mkldnn__convolution_pointwise(buf0, stem_0_weight, nullptr, std::array<...
# or of the variant Inductor fuses a following add or sub (a residual connection) into, whose second argument
# is the other operand (``mkldnn._convolution_pointwise.binary`` and its in-place form):
#   aoti_torch_cpu_mkldnn__convolution_pointwise_binary(buf4, buf0, layer1_conv_weight, ...
_ONEDNN_BINARY = re.compile(r"\baoti_torch_cpu_mkldnn__convolution_pointwise_binary_?\(\s*\w+,\s*\w+,\s*(\w+)\s*,")
_ONEDNN_PLAIN = re.compile(r"\baoti_torch_cpu_mkldnn__convolution_pointwise\(\s*\w+,\s*(\w+)\s*,")
# A call of oneDNN's linear (``mkldnn._linear_pointwise``, and the variant with a fused add) on a constant weight,
# whose first argument may be an expression with parentheses of its own:
#   aoti_torch_cpu__linear_pointwise(wrap_with_raii_handle_if_needed(reinterpret_tensor_wrapper(buf4, 2, ...)),
#                                    layer_0_query_weight, ...
#   aoti_torch_cpu__linear_pointwise_binary(buf4, buf0, layer_0_output_weight, ...
_ARGUMENT = r"(?:[^(),]|\((?:[^()]|\((?:[^()]|\([^()]*\))*\))*\))+"
_LINEAR_PLAIN = re.compile(r"\baoti_torch_cpu__linear_pointwise\(\s*" + _ARGUMENT + r",\s*(\w+)\s*,")
_LINEAR_BINARY = re.compile(r"\baoti_torch_cpu__linear_pointwise_binary\(\s*" + _ARGUMENT + r",\s*" + _ARGUMENT
                            + r",\s*(\w+)\s*,")
# The wrapper binds each constant to a local name once: ``[[maybe_unused]] auto& NAME = constants_->at(3);``
_CONSTANT_BINDING = r"auto&\s+{name}\s*=\s*constants_->at\(\d+\);"


def onednn_weights(wrapper_source: str, names, linear: bool = False) -> set[str]:
    """Those of the constants ``names`` that a generated CPU wrapper passes to oneDNN's convolution (``linear``:
    to oneDNN's linear) as its weight and uses in no other way (outside the constants table and the constant's
    local binding): only these may be bound to a weight in oneDNN's packed layout, which nothing else can read."""
    text = re.sub(r'"[^"\n]*"', '""', wrapper_source)  # the constants table names them in strings
    as_weight: dict[str, int] = {}
    for pattern in ((_LINEAR_PLAIN, _LINEAR_BINARY) if linear else (_ONEDNN_PLAIN, _ONEDNN_BINARY)):
        for m in pattern.finditer(text):
            as_weight[m.group(1)] = as_weight.get(m.group(1), 0) + 1
    found = set()
    for name in names:
        if name not in as_weight:
            continue
        uses = len(re.findall(r"\b" + re.escape(name) + r"\b", text))
        bindings = len(re.findall(_CONSTANT_BINDING.format(name=re.escape(name)), text))
        if bindings == 1 and uses == bindings + as_weight[name]:
            found.add(name)
    return found


@dataclass(frozen=True)
class CudaKernel:
    """A kernel a generated CUDA wrapper loads: its name, binary file name, shared memory and warps."""

    name: str
    file: str
    shared_mem: int
    num_warps: int | None


_LOAD_KERNEL = re.compile(r'kernels_\.(\w+)\s*=\s*loadKernel\("([^"]+)",\s*"(\w+)",\s*(\d+)')
_LAUNCH_KERNEL = re.compile(r"launchKernel\(kernels_\.(\w+),\s*[^,]+,\s*[^,]+,\s*[^,]+,\s*(\d+),\s*(\d+),")


def wrapper_kernels(wrapper_source: str) -> list[CudaKernel]:
    """Each kernel the generated CUDA wrapper loads (``loadKernel``), with the warps of its first launch."""
    warps: dict[str, int] = {}
    for field, w, _ in _LAUNCH_KERNEL.findall(wrapper_source):
        warps.setdefault(field, int(w))
    out = {}
    for field, path, func, shmem in _LOAD_KERNEL.findall(wrapper_source):
        out[func] = CudaKernel(name=func, file=os.path.basename(path), shared_mem=int(shmem),
                               num_warps=warps.get(field))
    return [out[k] for k in sorted(out)]


# Dynamo's warning that a traced forward had side effects it could not put in the graph; a source naming a
# module's ``_buffers`` means an assignment to a buffer attribute, which the graph silently drops.
_SIDE_EFFECTS = "we found certain side effects happened in the model.forward"
_BUFFER_SOURCE = re.compile(r"L\['self'\]((?:\._modules\['[^']+'\])*)\._buffers")


def reassigned_buffer_owner(warning_text: str) -> list[str] | None:
    """The submodule path (``["layers", "0"]``; ``[]`` for the model itself) whose buffer a traced forward
    assigned, from Dynamo's side-effects warning; None for any other warning."""
    sources = _BUFFER_SOURCE.findall(warning_text) if _SIDE_EFFECTS in warning_text else []
    if not sources:
        return None
    return [p for p in re.findall(r"\['([^']+)'\]", sources[0]) if p != "_export_root"]


def unrecognized_output(message: str) -> tuple[str, int] | None:
    """(type name, output index) from torch.export's error for an output of a type it cannot flatten."""
    found = re.search(r"Encountered unrecognized type \w+\((\w+)\) at output (\d+)", message)
    return None if found is None else (found.group(1), int(found.group(2)))
