"""Every private or experimental torch API the build side touches, in one place, each with a test
(tests/test_torch_private.py). A torch upgrade that moves one breaks here first, with a clear message.

The one exception is the experimental GPU-less CUDA build: its patches of torch and Triton internals live in
``_cuda_offline.py``, gated on exact versions and tested by tests/test_cuda_build.py."""
from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from typing import Any, Iterator

import torch
import torch.utils._pytree as pytree

# Inductor options every aotpack build uses (see docs/FORMAT.md, "Native code"):
#  - weights are not embedded in the .so: the pack stores them once and hands them to each entry;
#  - no debug line tables and no precompiled headers: both put build paths into the code;
#  - no FX graph cache and one compile thread, so a build starts from nothing (the scratch folder is
#    emptied before each build) and its output depends only on its inputs. (force_disable_caches is not
#    used: it compiles in a randomly named folder, whose name ends up in the code.)
BASE_INDUCTOR_CONFIG: dict[str, Any] = {
    "aot_inductor.package_constants_in_so": False,
    "aot_inductor.enable_line_tables": False,
    "aot_inductor.precompile_headers": False,
    "aot_inductor.debug_compile": False,
    "fx_graph_cache": False,
    "compile_threads": 1,
}

# Added for CUDA entries: one fatbin per kernel (SASS for each architecture in TORCH_CUDA_ARCH_LIST at or
# above ``cuda.arch``, PTX for ``cuda.arch``), no autotuning by benchmarks that would differ between runs.
CUDA_INDUCTOR_CONFIG: dict[str, Any] = {
    "aot_inductor.emit_multi_arch_kernel": True,
    "max_autotune": False,
    "max_autotune_gemm": False,
    "benchmark_fusion": False,
    "coordinate_descent_tuning": False,
}

# Added when there is no GPU: nothing may benchmark on one (pad_mm does), nothing may run a real op on one
# (the joint-graph constant folding evaluates pointwise ops, e.g. a masked_fill's -inf, on the graph's
# device; the kernels compute those values instead), and nothing may read a weight's value (Inductor inlines
# small weights, e.g. a bias of one element, into the code; the weights are fake here: they stay weights).
NO_GPU_INDUCTOR_CONFIG: dict[str, Any] = {
    "shape_padding": False,
    "benchmark_kernel": False,
    "joint_graph_constant_folding": False,
    "always_keep_tensor_constants": True,
}

# gcc -march level and Inductor vector width for each CPU ISA a pack can target.
ISA_COMPILER_OPTIONS: dict[str, dict[str, Any]] = {
    "x86-64": {"cpp.march": "x86-64", "cpp.simdlen": 0},
    "avx2": {"cpp.march": "x86-64-v3", "cpp.simdlen": 256},
    "avx512": {"cpp.march": "x86-64-v4", "cpp.simdlen": 512},
    "native": {"cpp.march": "native"},
}


def export_strict(module: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any = None):
    """Dynamo bytecode capture of the whole forward (torch.export with strict=True: fullgraph enforced).

    On a data-dependent graph break, torch.export prints the partial graph to stderr before raising; that
    dump is dropped here (it stays on the exception as ``partial_fx_graph``) and anything else that was
    written to stderr is passed on.
    """
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            return torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes, strict=True)
    except Exception as e:
        partial = getattr(e, "partial_fx_graph", None)
        text = buffer.getvalue()
        buffer = io.StringIO(text.replace(f"{partial}\n", "") if partial else text)
        raise
    finally:
        sys.stderr.write(buffer.getvalue())


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


@contextlib.contextmanager
def private_build_dirs(root: str) -> Iterator[None]:
    """Point Inductor's cache and every temporary file of the build at ``root`` for the duration."""
    saved = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TMPDIR")}
    saved_tempdir = tempfile.tempdir
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(root, "inductor")
    os.environ["TMPDIR"] = os.path.join(root, "tmp")
    os.makedirs(os.environ["TMPDIR"], exist_ok=True)
    tempfile.tempdir = os.environ["TMPDIR"]
    try:
        yield
    finally:
        tempfile.tempdir = saved_tempdir
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
    return torch.export.load(buffer)


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
