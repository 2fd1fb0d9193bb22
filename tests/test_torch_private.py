"""One test per private torch API aotpack touches (aotpack/_torch.py and runtime/_torch.py): a torch upgrade
that moves one fails here, by name."""
from __future__ import annotations

from unittest import mock

import pytest
import torch

from aotpack import _torch as build_torch
from aotpack import _torch_text as torch_text
from aotpack import toolchain
from aotpack_runtime import _torch as rt_torch


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x, *, k: int = 2):
        return {"y": self.lin(x) * k}


def test_export_strict_lifts_parameters_and_specialises_values():
    ep = build_torch.export_strict(_Tiny(), (torch.randn(2, 4),), {"k": 3})
    kinds = [s.kind.name for s in ep.graph_signature.input_specs]
    assert kinds == ["PARAMETER", "PARAMETER", "USER_INPUT", "USER_INPUT"]
    assert type(ep.graph_signature.input_specs[-1].arg).__name__ == "ConstantArgument"
    assert "lin.weight" in ep.state_dict


def test_export_strict_keeps_no_copies_of_the_weights():
    """Dynamo's export clones every tensor it meets into its real-value cache (no_real_value_copies turns
    that off, by patching builder._clone_input): no clone of a weight is made while exporting."""
    from torch._dynamo.variables import builder
    from torch.utils._python_dispatch import TorchDispatchMode

    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 4))
    weight_bytes = {p.numel() * p.element_size() for p in model.parameters()}

    class Allocations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.copies = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.clone.default and type(out) is torch.Tensor and \
                    out.numel() * out.element_size() in weight_bytes:
                self.copies += 1
            return out

    original = builder._clone_input
    for patched in (False, True):
        spy = Allocations()
        with spy:
            if patched:
                ep = build_torch.export_strict(model, (torch.randn(2, 256),), {})
            else:
                ep = torch.export.export(model, (torch.randn(2, 256),), strict=True)
        assert (spy.copies == 0) == patched, spy.copies
    assert builder._clone_input is original
    assert ep.state_dict["0.weight"].data_ptr() == model[0].weight.data_ptr()


def test_graph_break_types_and_details():
    types = build_torch.graph_break_types()
    assert types and all(issubclass(t, Exception) for t in types)

    def bad(x):
        if x.sum() > 0:
            return x
        return -x

    try:
        from aotpack.capture import _FunctionModule

        build_torch.export_strict(_FunctionModule(bad), (torch.randn(2),), {})
    except types as e:
        gb_type, stack = build_torch.unsupported_details(e)
        assert gb_type == "Data-dependent branching"
        assert any(f.filename == __file__ for f in stack)
    else:
        raise AssertionError("no graph break")


def _has_config(key: str) -> bool:
    from torch._inductor import config

    obj = config
    for part in key.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def test_inductor_config_keys_exist():
    """Every option a build sets exists in this torch, except those ADDED_IN a later minor version, which
    must be absent here (and are then left out of the build's config)."""
    from torch._inductor import config

    keys = list(build_torch.BASE_INDUCTOR_CONFIG) + [k for o in build_torch.ISA_COMPILER_OPTIONS.values() for k in o] \
        + list(build_torch.CUDA_INDUCTOR_CONFIG) + list(build_torch.NO_GPU_INDUCTOR_CONFIG) \
        + list(build_torch.STATEFUL_INDUCTOR_CONFIG) + ["cuda.arch", "cpp.threads", "cpp.cxx", "cuda.cuda_cxx",
                                                                          "post_grad_custom_pre_pass"]
    for key in keys:
        since = build_torch.ADDED_IN.get(key, ((0, 0), ""))[0]
        assert _has_config(key) == (build_torch.torch_version() >= since), (key, since, torch.__version__)
    options = build_torch.inductor_options("avx2", 16, stateful=True)
    assert all(_has_config(k) for k in options), [k for k in options if not _has_config(k)]
    with build_torch.inductor_config({"aot_inductor.debug_compile": False}):
        assert config.aot_inductor.debug_compile is False


def test_without_cpp_march_the_compiler_wrapper_sets_the_target(tmp_path):
    """Before 2.13 Inductor compiles with -march=native (no cpp.march): the compiler wrapper replaces it with
    the target's level, so the code neither tunes for nor uses the build host's CPU. From 2.13 Inductor
    takes cpp.march and the wrapper leaves the flags alone."""
    import shutil
    import subprocess

    from torch._inductor import cpp_builder

    march = build_torch.compiler_march("avx2")
    assert build_torch.compiler_march("native") is None
    if build_torch.torch_version() >= (2, 13):
        assert march is None and build_torch.inductor_options("avx2", 16)["cpp.march"] == "x86-64-v3"
        return
    assert march == "x86-64-v3" and "cpp.march" not in build_torch.inductor_options("avx2", 16)
    flags, _ = cpp_builder._get_optimization_cflags("g++")  # the private function that adds -march=native
    assert "march=native" in flags
    wrapper = toolchain.compiler_wrapper(str(tmp_path / "bin"), shutil.which("g++"), march)
    out = subprocess.run([wrapper, "-march=native", "-Q", "--help=target", "-x", "c++", "/dev/null"],
                         capture_output=True, text=True, check=True).stdout
    picked = {line.split()[0]: line.split()[-1] for line in out.splitlines() if line.strip().startswith(("-march=",
                                                                                                         "-mtune="))}
    assert picked == {"-march=": "x86-64-v3", "-mtune=": "generic"}, picked


def test_fatbin_config_adds_sass_for_each_arch_before_2_13(tmp_path):
    """torch 2.14 packs each kernel with SASS for every TORCH_CUDA_ARCH_LIST entry; before 2.13 Inductor runs
    `nvcc -fatbin` (found through cuda.cuda_cxx) for one architecture, and aotpack's nvcc adds the others."""
    fake_nvcc = tmp_path / "nvcc"
    fake_nvcc.write_text('#!/bin/sh\necho "$@"\n')
    fake_nvcc.chmod(0o755)
    config = toolchain.fatbin_config(str(tmp_path / "bin"), str(fake_nvcc), (80, 86, 90))
    assert toolchain.fatbin_config(str(tmp_path / "bin"), str(fake_nvcc), (90,)) == {}
    assert toolchain.fatbin_config(str(tmp_path / "bin"), str(fake_nvcc), (90, 100)) == {}  # sm_90a: no others
    if build_torch.torch_version() >= (2, 13):
        assert config == {}
        return
    import subprocess

    from torch._inductor.codegen.cuda import compile_utils

    with build_torch.inductor_config(config):
        nvcc = compile_utils._cuda_compiler()  # what Inductor runs as `nvcc -fatbin`
    assert nvcc == config["cuda.cuda_cxx"]
    fatbin = subprocess.run([nvcc, "-fatbin", "k.ptx", "-o", "k.fatbin"], capture_output=True, text=True).stdout
    assert fatbin.split() == ["-fatbin", "k.ptx", "-o", "k.fatbin", "-gencode", "arch=compute_86,code=sm_86",
                              "-gencode", "arch=compute_90,code=sm_90"]
    other = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    assert other.split() == ["--version"]


def test_move_to_cuda_pass_exists():
    """move_to_cuda (CUDA entries on a GPU host) and the GPU-less build use torch.export's device pass."""
    from torch.export.passes import move_to_device_pass

    assert callable(move_to_device_pass) and callable(build_torch.move_to_cuda)


def test_program_copy_is_independent_and_keeps_names():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4)).eval()  # its forward's argument is called `input`
    ep = torch.export.export(m, (torch.randn(2, 4),), strict=True)
    c = build_torch.program_copy(ep)
    assert [n.name for n in c.graph.nodes] == [n.name for n in ep.graph.nodes]
    assert "input" in [n.name for n in c.graph.nodes]
    c.state_dict["0.weight"].data.zero_()
    assert ep.state_dict["0.weight"].abs().sum() > 0
    assert c.graph is not ep.graph and c.state_dict is not ep.state_dict


def test_save_and_load_exported(tmp_path):
    """Compile workers receive their graph through torch.export.save / load."""
    ep = build_torch.export_strict(_Tiny(), (torch.randn(2, 4),), {"k": 3})
    build_torch.save_exported(ep, str(tmp_path / "g.pt2"))
    back = build_torch.load_exported(str(tmp_path / "g.pt2"))
    x = torch.randn(2, 4)
    torch.testing.assert_close(back.module()(x, k=3)["y"], ep.module()(x, k=3)["y"])


def test_custom_ops_finds_non_aten_calls():
    ep = build_torch.export_strict(_Tiny(), (torch.randn(2, 4),), {"k": 3})
    assert build_torch.custom_ops(ep) == []


def test_treespec_parts():
    _, spec = build_torch.tree_flatten(((1, [2]), {"a": None}))
    node, ctx, kids = build_torch.treespec_parts(spec)
    assert node is tuple and len(kids) == 2
    node, ctx, kids = build_torch.treespec_parts(kids[1])
    assert node is dict and list(ctx) == ["a"]


def test_fake_tensor_facts():
    facts = build_torch.fake_tensor_facts(torch.empty(2, 3).t())
    assert facts["sizes"] == [3, 2] and facts["strides"] == [1, 3]
    assert build_torch.fake_tensor_facts(3) is None


def test_aoti_compile_and_runner(convnet_pack):
    """aoti_compile_and_package (used by compile_exported to build every pack) and the C++ runner API."""
    import aotpack

    pkg = aotpack.load(convnet_pack.path)
    runner = pkg.entries[0]._runner
    fqns = rt_torch.constant_fqns(runner)
    folded = pkg.entries[0].record.folded_weights
    assert {w for c, w in fqns.items() if c not in folded} <= set(pkg.weights) and folded
    assert all(fqns[c] == c for c in folded)  # a folded constant's "original" name is its own
    out = rt_torch.run(runner, [convnet_pack.args[0]])
    assert isinstance(out, list) and out[0].shape == (4, 10)
    rt_torch.set_constants(runner, pkg.entries[0].weight_constants(pkg.weights))


@pytest.mark.skipif(torch.version.cuda is None,
                    reason=f"torch {torch.__version__} is a CPU build: torch._C._aoti has no "
                           "AOTIModelContainerRunnerCuda (runtime/_torch.cuda_runner needs the CUDA build)")
def test_aoti_cuda_runner_binding():
    """runtime/_torch.cuda_runner calls AOTIModelContainerRunnerCuda(model_so_path, num_models, device_str,
    cubin_dir), and cuda_run calls its run(inputs) with no stream (the current stream of the current device).
    Constructing one needs a GPU and a compiled library, so this checks the binding's shape only."""
    import re

    from torch._C import _aoti

    cls = _aoti.AOTIModelContainerRunnerCuda
    for name in ("run", "get_constant_names_to_original_fqns", "update_constant_buffer"):
        assert callable(getattr(cls, name, None)), name
    overloads = re.findall(r"__init__\(self: [^,]+((?:, \w+: [^,()]+)*)\) -> None", cls.__init__.__doc__)
    params = [[p.split(":")[1].strip() for p in o.split(", ")[1:]] for o in overloads]
    assert any(len(p) == 4 and p[0] == "str" and p[2] == "str" and p[3] == "str" for p in params), params
    assert re.search(r"run\(self: [^,]+, inputs: [^,]+, stream_handle: [^)]+ = None\)", cls.run.__doc__), \
        cls.run.__doc__


def test_pinned_vec_isa_decides_inductors_choice():
    """Inductor picks its vector ISA from cpu_vec_isa.valid_vec_isa_list (probed on the host); pinning
    replaces that list, for each target, without compiling a test program (cpp.vec_isa_ok)."""
    from torch._inductor import config, cpu_vec_isa

    for isa, simdlen, name in (("avx2", 256, "VecAVX2"), ("avx512", 512, "VecAVX512"), ("x86-64", 0, None)):
        with build_torch.pinned_vec_isa(isa), config.patch({"cpp.simdlen": simdlen, "cpp.vec_isa_ok": True}):
            picked = cpu_vec_isa.pick_vec_isa()
            assert (type(picked).__name__ if picked else None) == name, isa
    assert cpu_vec_isa.valid_vec_isa_list.__module__ == cpu_vec_isa.__name__  # restored


def test_serial_small_kernels_patches_the_depth_decision():
    """Under dynamic threads Inductor forces a parallel region on every kernel; the patch decides the
    depth as without them. The method and its arguments must exist as the patch assumes."""
    import inspect as pyinspect

    from torch._inductor.codegen.cpp import CppKernel

    assert list(pyinspect.signature(CppKernel.decide_parallel_depth).parameters) == \
        ["self", "max_parallel_depth", "threads"]
    original = CppKernel.decide_parallel_depth
    with build_torch.serial_small_kernels():
        assert CppKernel.decide_parallel_depth is not original
    assert CppKernel.decide_parallel_depth is original


def test_precompiled_header_dir_is_a_module_global(tmp_path):
    """The folder is codecache's module global, and codecache._precompile_header (a module global its callers
    look up at each call) returns the header's path, whose precompiled file is the path plus ".gch": each
    use sets the header's modification time (its last use, for cache prune)."""
    import inspect
    import os

    from torch._inductor import codecache

    from aotpack.buildcache import PRECOMPILED_SUFFIX

    before = codecache._HEADER_DIR, codecache._HEADER_LOCK_DIR, codecache._precompile_header
    assert list(inspect.signature(codecache._precompile_header).parameters)[:2] == ["header", "hashable_cmd_line"]
    header = tmp_path / "c0ffee.h"
    header.write_text("#include <x.h>\n")
    (tmp_path / f"c0ffee.h{PRECOMPILED_SUFFIX}").write_bytes(b"precompiled")
    for p in tmp_path.iterdir():
        os.utime(p, (1000, 1000))
    codecache._precompile_header = lambda header, hashable_cmd_line, **kw: str(tmp_path / "c0ffee.h")
    try:
        with build_torch.precompiled_header_dir(str(tmp_path)):
            assert codecache._HEADER_DIR == str(tmp_path)
            assert codecache._HEADER_LOCK_DIR == str(tmp_path / "locks")
            assert codecache._precompile_header("x.h", "cmd") == str(header)
        assert all(p.stat().st_mtime > 1000 for p in tmp_path.iterdir())
        assert codecache._precompile_header("x.h", "cmd") == str(header)
    finally:
        codecache._precompile_header = before[2]
    assert (codecache._HEADER_DIR, codecache._HEADER_LOCK_DIR, codecache._precompile_header) == before


def test_graph_text_is_the_graph_without_metadata_or_weights():
    """The build cache key reads the graph through torch.export's serializer, with node metadata dropped
    (object ids and stack traces change with every process and folder)."""
    import json

    a = build_torch.graph_text(build_torch.export_strict(_Tiny(), (torch.randn(2, 4),), {"k": 3}))
    b = build_torch.graph_text(build_torch.export_strict(_Tiny(), (torch.randn(2, 4),), {"k": 3}))
    assert a == b  # another capture, other weights: the same text
    program = json.loads(a)
    nodes = program["graph_module"]["graph"]["nodes"]
    assert nodes and all(n["metadata"] == {} for n in nodes)
    assert "aten.linear" in a.decode() and "lin.weight" in a.decode()
    c = build_torch.graph_text(build_torch.export_strict(_Tiny(), (torch.randn(3, 4),), {"k": 3}))
    assert c != a  # the input's shape is in the graph


def test_each_build_gets_its_own_aoti_metadata_dict():
    """Inductor fills config.aot_inductor.metadata in place when it compiles: each build's options carry a
    fresh dict, so nothing a compile writes there reaches the global config (or the next build's key)."""
    from torch._inductor import config

    a = build_torch.inductor_options("avx2", 16)["aot_inductor.metadata"]
    b = build_torch.inductor_options("avx2", 16)["aot_inductor.metadata"]
    assert a == {} and a is not b and a is not config.aot_inductor.metadata
    with config.patch({"aot_inductor.metadata": a}):
        config.aot_inductor.metadata["AOTI_DEVICE_KEY"] = "cpu"  # as codecache.AotCodeCompiler.compile does
    assert "AOTI_DEVICE_KEY" not in config.aot_inductor.metadata and a == {"AOTI_DEVICE_KEY": "cpu"}


def test_effective_config_sees_patches_and_the_environment_but_no_host_paths():
    from torch._inductor import config

    options = build_torch.inductor_options("avx2", 16)
    options["cpp.cxx"] = ("/some/host/path/g++",)
    got = build_torch.effective_config(options)
    assert got["inductor"]["cpp.threads"] == 16 and got["inductor"]["cpp.dynamic_threads"] is True
    assert "cpp.cxx" not in got["inductor"] and "/some/host/path" not in str(got)
    assert "functorch" in got and config.cpp.threads == -1  # the patch is undone
    with config.patch({"max_fusion_size": 7}):  # as a TORCHINDUCTOR_* variable would set it
        assert build_torch.effective_config(options)["inductor"]["max_fusion_size"] == 7


def test_object_compiles_runs_the_wrapper_beside_the_kernels(tmp_path):
    """Inductor's CppBuilder: object_build reads a compile-only call; object_compiles starts the wrapper's
    compile in a thread and has the next compile wait for it, and routes each call through ``around``."""
    from torch._inductor.cpp_builder import CppBuilder, CppOptions

    for name in ("model.wrapper", "model.kernel"):
        (tmp_path / f"{name}.cpp").write_text(f"int f_{name.replace('.', '_')}() {{ return 1; }}\n")

    def builder(name):
        return CppBuilder(name=name, sources=str(tmp_path / f"{name}.cpp"), output_dir=str(tmp_path),
                          BuildOption=CppOptions(compile_only=True))

    command, sources, target = build_torch.object_build(builder("model.wrapper"))
    assert sources == [str(tmp_path / "model.wrapper.cpp")] and target == str(tmp_path / "model.wrapper.o")
    assert " -c " in f" {command} "
    seen = []

    def around(run, b):
        seen.append(b._name)
        run()

    with build_torch.object_compiles(True, around):
        builder("model.wrapper").build()  # returns at once: the compile runs in a thread
        builder("model.kernel").build()  # waits for the wrapper's before it returns
        assert (tmp_path / "model.wrapper.o").is_file() and (tmp_path / "model.kernel.o").is_file()
    assert sorted(seen) == ["model.kernel", "model.wrapper"]
    assert CppBuilder.build.__qualname__ == "CppBuilder.build"  # restored


def test_symbol_range_and_polynomial_terms():
    """range_constraints hold torch's int_oo for a Dim without max (its is_finite is true: compared by
    identity); sizes and strides are sympy expressions over the shape symbols."""
    import sympy
    from torch.export import Dim

    class Two(torch.nn.Module):
        def forward(self, x, y):
            return x + y[1:]

    dx = Dim("dx", min=3)
    ep = build_torch.export_strict(Two(), (torch.randn(4, 2), torch.randn(5, 2)), {},
                                   {"x": {0: dx}, "y": {0: dx + 1}})
    (symbol, rng), = [(k, v) for k, v in ep.range_constraints.items() if k.is_Symbol]
    assert build_torch.symbol_range(rng) == (3, None)
    y = [n for n in ep.graph.nodes if n.op == "placeholder"][1].meta["val"]
    assert build_torch.polynomial_terms(y.shape[0].node.expr) == {(str(symbol),): 1, (): 1}
    s, t = sympy.symbols("s t", integer=True, positive=True)
    assert build_torch.polynomial_terms((s + 1) * t * 2) == {("s", "t"): 2, ("t",): 2}
    assert build_torch.polynomial_terms(sympy.floor(s / 2)) is None


class _Attrs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.table = torch.arange(12.0)[2:8].view(2, 3)  # a plain attribute: a view with a storage offset
        self.register_buffer("t", torch.rand(3, 2).t())  # a non-contiguous buffer

    def forward(self, x):
        return x @ self.table.t() + self.t.sum(), (x.sum() * 2).item(), x.shape[0] * 3, 1.5


def test_lift_constants_to_buffers():
    """torch.export lifts plain tensor attributes as CONSTANT_TENSOR inputs (kept in ``constants``); the
    program rebuilt with ExportedProgram._update has them as buffers, and every weight dense."""
    ep = build_torch.export_strict(_Attrs(), (torch.randn(4, 3),), {})
    kinds = {s.target: s.kind.name for s in ep.graph_signature.input_specs if s.target}
    assert kinds == {"t": "BUFFER", "table": "CONSTANT_TENSOR"}
    lifted = build_torch.lift_constants_to_buffers(ep)
    assert {s.target: s.kind.name for s in lifted.graph_signature.input_specs if s.target} == \
        {"t": "BUFFER", "table": "BUFFER"}
    assert not lifted.constants and set(lifted.state_dict) == {"t", "table"}
    original = {**ep.state_dict, **ep.constants}
    for name in ("t", "table"):
        w = lifted.state_dict[name]
        assert w.is_contiguous() and w.storage_offset() == 0 and torch.equal(w, original[name])
    assert ep.constants["table"].storage_offset() == 2  # the original is not changed
    x = torch.randn(4, 3)
    torch.testing.assert_close(lifted.module()(x)[0], ep.module()(x)[0])


def test_outputs_for_inductor():
    """Output specs say which outputs are constants (ConstantArgument) and numbers (Sym*Argument); the rebuilt
    program returns tensors only and its call spec (``_module_call_graph[0].signature.out_spec``) is flat."""
    ep = build_torch.export_strict(_Attrs(), (torch.randn(4, 3),), {})
    kinds = [type(s.arg).__name__ for s in ep.graph_signature.output_specs]
    assert kinds == ["TensorArgument", "SymFloatArgument", "ConstantArgument", "ConstantArgument"]
    out = build_torch.outputs_for_inductor(ep)
    assert [type(s.arg).__name__ for s in out.graph_signature.output_specs] == ["TensorArgument"] * 2
    assert out.call_spec.out_spec.num_leaves == 2 and ep.call_spec.out_spec.num_leaves == 4
    x = torch.randn(4, 3)
    t, total = out.module()(x)
    assert total.dim() == 0 and total.item() == pytest.approx((x.sum() * 2).item())
    assert len(list(ep.graph.output_node().args[0])) == 4  # the original is not changed
    assert build_torch.outputs_for_inductor(build_torch.export_strict(_Tiny(), (torch.randn(2, 4),), {})) \
        .graph_signature.output_specs[0].kind.name == "USER_OUTPUT"


def test_complex_casts_to_aten_pass():
    """Inductor's post-grad graph has prims.convert_element_type for a dtype conversion; the pass gives the
    complex ones to aten._to_copy (C++), and leaves the others to Inductor's own code."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    graph = torch.fx.Graph()
    z, r = graph.placeholder("z"), graph.placeholder("r")
    z.meta["val"], r.meta["val"] = torch.empty(2, dtype=torch.complex64), torch.empty(2)
    a = graph.call_function(torch.ops.prims.convert_element_type.default, (z, torch.complex128))
    b = graph.call_function(torch.ops.prims.convert_element_type.default, (r, torch.float64))
    a.meta["val"], b.meta["val"] = torch.empty(2, dtype=torch.complex128), torch.empty(2, dtype=torch.float64)
    graph.output((a, b))
    config_pass = build_torch.inductor_options("avx2", 16)["post_grad_custom_pre_pass"]
    assert isinstance(config_pass, CustomGraphPass) and config_pass.uuid()
    config_pass(graph)
    targets = [n.target for n in graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.aten._to_copy.default, torch.ops.prims.convert_element_type.default]


def test_op_name_is_the_extern_kernel_target():
    """AOTInductor's extern-kernel description names an op as OpOverload.name() does."""
    assert build_torch.op_name(torch.ops.aten._unique2.default) == "aten::_unique2"
    assert build_torch.op_name(torch.ops.aten.median.dim) == "aten::median.dim"
    assert build_torch.op_name("output") is None


class _Unique(torch.nn.Module):
    def forward(self, x):
        values, inverse = torch.unique(x, return_inverse=True)  # aten::_unique2: no C shim
        return values * 2, inverse


def test_runner_finds_the_proxy_executor_description(tmp_path):
    """libtorch's runner creates its proxy executor from FILE.json beside FILE.so (runtime/devices.py names
    them model.so and model.json); without it, a call through the proxy executor fails."""
    import aotpack
    from aotpack_runtime.archive import Archive

    x = torch.tensor([3, 1, 3, 2])
    path = tmp_path / "unique.pack"
    aotpack.build(_Unique(), (x,), path, cache=False)
    archive = Archive.open(path)
    entry = archive.manifest.entries[0].to_json()
    assert "aten::_unique2" in archive.read_blob(entry["extern_kernels"]).decode()
    pkg = aotpack.load(path)
    values, inverse = pkg(x)  # the pack's own entry found its description
    assert torch.equal(values, torch.tensor([2, 4, 6])) and torch.equal(inverse, torch.tensor([2, 0, 2, 1]))
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "model.so").write_bytes(archive.read_blob(entry["library"]))
    runner = rt_torch.cpu_runner(str(tmp_path / "alone" / "model.so"), 1)
    # torch 2.13 and later say why; 2.11 and 2.12 only that the call failed
    with pytest.raises(RuntimeError, match=r"Unable to find a proxy executor|run_func_\(.*API call failed"):
        rt_torch.run(runner, [x])


def test_stable_int_arrays_keys_the_cache_by_the_writer():
    """The C++ wrapper reuses an int array's declaration through ``codegen_int_array_var``'s cache: with the
    patch (or torch 2.13's own key) two bound methods of one buffer are one writer, whatever their
    addresses. The bound methods are kept alive so that each has another address."""
    import itertools

    from torch._inductor.codegen.cpp_wrapper_cpu import CppWrapperCpu
    from torch._inductor.utils import IndentedBuffer

    class Wrapper:  # the attributes the method reads, as the real wrapper has them
        def __init__(self):
            self.codegen_int_array_var_cache = {}
            self._int_array_writeline_targets = []  # torch 2.15 keeps each writer's owner alive here
            self.ids = itertools.count()

        def _codegen_int_array_var_impl(self, int_array, writeline, known_statically):
            var = f"int_array_{next(self.ids)}"
            writeline(f"static constexpr int64_t {var}[] = {int_array};")
            return var

    wrapper, buf, writers = Wrapper(), IndentedBuffer(), []
    with build_torch.stable_int_arrays():
        for _ in range(20):
            writers.append(buf.writeline)
            assert CppWrapperCpu.codegen_int_array_var(wrapper, "{2L, 12L, 1L}", writers[-1]) == "int_array_0"
    assert buf.getvalue().count("int_array_") == 1
    if build_torch.torch_version() < build_torch.INT_ARRAY_KEY_FIXED_IN:
        assert CppWrapperCpu.codegen_int_array_var.__module__ == CppWrapperCpu.__module__  # restored


def _export_error(model, args, dynamic_shapes) -> str:
    with build_torch.quiet_capture_logs():
        try:
            build_torch.export_strict(model, args, {}, dynamic_shapes)
        except Exception as e:  # torch.export's own error, whose text aotpack reads
            return str(e)
    raise AssertionError("the export did not fail")


class _FixesRows(torch.nn.Module):
    def forward(self, x):
        return x.reshape(32, -1)  # fixes the rows


def test_constraint_violation_text_gives_symbol_reason_and_user_stack():
    from torch.export import Dim

    text = _export_error(_FixesRows(), (torch.randn(32, 4),), {"x": {0: Dim("rows", min=2, max=64)}})
    v = torch_text.constraint_violation(text)
    assert v.symbols == ("rows",)
    assert v.reasons == ("You marked rows as dynamic but your code specialized it to be a constant (32)",)
    assert v.stack[-1] == (__file__, next(i for i, line in enumerate(open(__file__), 1) if "# fixes the rows" in line),
                           "return x.reshape(32, -1)  # fixes the rows")
    assert v.fixes == ("rows = 32",)
    assert torch_text.constraint_violation("64 not in range [2, 8]") is None


def test_range_violation_text():
    from torch.export import Dim

    text = _export_error(torch.nn.Linear(4, 3), (torch.randn(64, 4),), {"input": {0: Dim("b", min=1, max=8)}})
    assert torch_text.range_violation(text) == (64, 2, 8)  # torch reports 2 where the Dim says 1
    text = _export_error(torch.nn.Linear(4, 3), (torch.randn(3, 4),), {"input": {0: Dim("b", min=4)}})
    assert torch_text.range_violation(text) == (3, 4, None)


def test_quiet_capture_logs_silences_the_capture_loggers_and_restores_them(capfd):
    import logging

    from torch.export import Dim

    assert all(not logging.getLogger(n).disabled for n in build_torch.CAPTURE_LOGGERS)
    _export_error(_FixesRows(), (torch.randn(32, 4),), {"x": {0: Dim("rows", min=2, max=64)}})
    assert capfd.readouterr().err == ""
    assert all(not logging.getLogger(n).disabled for n in build_torch.CAPTURE_LOGGERS)


def test_dim_spec_reads_every_kind_of_dim():
    from torch.export import Dim

    dx = Dim("dx", min=2, max=32)
    assert build_torch.dim_spec(dx) == build_torch.DimSpec("dim", name="dx", low=2, high=32, text="dx")
    derived = build_torch.dim_spec(dx + 1)
    assert (derived.kind, derived.name, derived.low, derived.high, derived.fn(4), derived.text) == \
        ("derived", "dx", 3, 33, 5, "dx + 1")
    assert build_torch.dim_spec(Dim("n")).high is None
    assert [build_torch.dim_spec(d).kind for d in (Dim.AUTO, Dim.DYNAMIC, Dim.STATIC, None, 8)] == \
        ["auto", "dynamic", "static", "static", "size"]


def test_wrapper_kernels_parses_loads_and_launches():
    src = ('    kernels_.triton_poi_0 = loadKernel("/x/y/abc.fatbin", "triton_poi_0", 1024, cubin_dir_, &m);\n'
           '    launchKernel(kernels_.triton_poi_0, grid_0, grid_1, grid_2, 8, 1024, kernel_args_, stream_);\n'
           '    kernels_.triton_red_1 = loadKernel("/x/y/def.fatbin", "triton_red_1", 0, cubin_dir_, &m);\n'
           '    launchKernel(kernels_.triton_red_1, grid_0, 1, 1, 4, 0, kernel_args_, stream_);\n')
    ks = torch_text.wrapper_kernels(src)
    assert [(k.name, k.file, k.shared_mem, k.num_warps) for k in ks] == [
        ("triton_poi_0", "abc.fatbin", 1024, 8), ("triton_red_1", "def.fatbin", 0, 4)]


def test_generated_cpu_code_readers(convnet_pack):
    """The kernel names and the constants table read from the C++ a real build generated (stored in the pack)
    are what the pack recorded from the loaded library."""
    from aotpack_runtime.archive import Archive

    a = Archive.open(convnet_pack.path)
    try:
        wrapper = bytes(a.read_blob("source/0/wrapper.cpp")).decode()
        kernel = bytes(a.read_blob("source/0/kernel.cpp")).decode()
        entry = a.manifest.entries[0].to_json()
        weights = {w.name: w for w in a.manifest.weights}
    finally:
        a.close()
    assert torch_text.kernel_symbols(kernel) == tuple(entry["kernels"]) and entry["kernels"]
    table = torch_text.wrapper_constants(wrapper)
    assert {c.name: c.fqn for c in table} == entry["constants"] and table
    folded = entry["folded_weights"]
    for c in table:
        shape = folded[c.name]["shape"] if c.name in folded else list(weights[c.fqn].shape)
        assert c.offset == 0 and list(c.shape) == shape, c


def test_dynamo_message_readers():
    """A buffer assigned in forward, named in Dynamo's side-effects warning; an output type torch.export
    cannot flatten, named in its error. Both read from what this torch really says."""
    import warnings

    class Inner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("count", torch.zeros(()))

        def forward(self, x):
            self.count = self.count + 1
            return x + self.count

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()

        def forward(self, x):
            return self.inner(x)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_torch.export_strict(Outer(), (torch.randn(2),), {})
    owners = [torch_text.reassigned_buffer_owner(str(w.message)) for w in caught]
    assert ["inner"] in owners, [str(w.message)[:200] for w in caught]
    assert torch_text.reassigned_buffer_owner("some other warning") is None

    class Odd:
        pass

    class Returns(torch.nn.Module):
        def forward(self, x):
            return x + 1, Odd()

    with pytest.raises(Exception) as e:
        build_torch.export_strict(Returns(), (torch.randn(2),), {})
    found = torch_text.unrecognized_output(str(e.value))
    assert found is not None and found[0] == "Odd", str(e.value)[:500]
    assert torch_text.unrecognized_output("another error") is None


def test_convolutions_to_onednn_pass_and_the_weight_packing_it_relies_on():
    """The CPU post-grad pass with onednn_convs gives a float32 convolution whose weight is a stored weight read
    by nothing else to mkldnn._convolution_pointwise and records it; a weight also read elsewhere stays with
    aten.convolution. The op takes the weight as runtime/_torch.onednn_conv_weight packs it, and plain."""
    conv = torch.ops.aten.convolution.default
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    w, v = graph.get_attr("c.weight"), graph.get_attr("d.weight")
    x.meta["val"] = torch.empty(1, 4, 8, 8)
    w.meta["val"], v.meta["val"] = torch.empty(6, 4, 3, 3), torch.empty(4, 4, 1, 1)
    a = graph.call_function(conv, (x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1))
    b = graph.call_function(conv, (x, v, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1))
    c = graph.call_function(torch.ops.aten.mul.Tensor, (v, 2.0))
    a.meta["val"], b.meta["val"] = torch.empty(1, 6, 8, 8), torch.empty(1, 4, 8, 8)
    graph.output((a, b, c))
    config_pass = build_torch.inductor_options("avx2", 16, onednn_convs=True)["post_grad_custom_pre_pass"]
    with build_torch.conv_records() as records:
        config_pass(graph)
    targets = [n.target for n in graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.mkldnn._convolution_pointwise.default, conv, torch.ops.aten.mul.Tensor]
    assert records.onednn == {"c.weight": {"padding": [1, 1], "stride": [1, 1], "dilation": [1, 1], "groups": 1,
                                           "input_size": [1, 4, 8, 8]}}
    assert records.folded == {}  # a graph without a module to hold new constants folds nothing
    assert build_torch.inductor_options("avx2", 16)["post_grad_custom_pre_pass"].uuid() != config_pass.uuid()

    gen = torch.Generator().manual_seed(0)
    xs, ws = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(6, 4, 3, 3, generator=gen)
    packed = rt_torch.onednn_conv_weight(ws, [1, 1], [1, 1], [1, 1], 1, [1, 4, 8, 8])
    assert packed.layout == torch._mkldnn
    expected = torch.nn.functional.conv2d(xs, ws, padding=1)
    for weight in (packed, ws):
        out = torch.ops.mkldnn._convolution_pointwise(xs, weight, None, [1, 1], [1, 1], [1, 1], 1, "none", [], "")
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_linears_to_onednn_pass_and_the_weight_packing_it_relies_on():
    """The CPU post-grad pass with onednn_convs gives a large float32 linear (``addmm(b, x, w.T)``, ``mm(x, w.T)``)
    whose weight is a stored weight read by nothing else to mkldnn._linear_pointwise and records its rows; a
    linear an activation reads, a small one and one whose weight is read elsewhere stay with ATen. The op takes
    the weight as runtime/_torch.onednn_linear_weight packs it, and plain."""
    aten = torch.ops.aten
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(64, 256)
    nodes = {}
    for name, shape in (("a.weight", (256, 256)), ("a.bias", (256,)), ("b.weight", (256, 256)),
                        ("c.weight", (256, 256)), ("d.weight", (4, 256)), ("e.weight", (256, 256))):
        nodes[name] = graph.get_attr(name)
        nodes[name].meta["val"] = torch.empty(shape)

    def linear(weight, bias=None):
        t = graph.call_function(aten.permute.default, (nodes[weight], [1, 0]))
        t.meta["val"] = torch.empty(nodes[weight].meta["val"].shape[::-1])
        out = graph.call_function(aten.addmm.default, (nodes[bias], x, t)) if bias \
            else graph.call_function(aten.mm.default, (x, t))
        out.meta["val"] = torch.empty(64, t.meta["val"].shape[1])
        return out
    a, b, c, d, e = linear("a.weight", "a.bias"), linear("b.weight"), linear("c.weight"), linear("d.weight"), \
        linear("e.weight")
    r = graph.call_function(aten.relu.default, (c,))
    s = graph.call_function(aten.mul.Tensor, (b, 0.5))
    other = graph.call_function(aten.neg.default, (nodes["e.weight"],))
    graph.output((a, s, r, d, e, other))
    config_pass = build_torch.inductor_options("avx2", 16, onednn_convs=True)["post_grad_custom_pre_pass"]
    with build_torch.conv_records() as records:
        config_pass(graph)
    calls = [n for n in graph.nodes if n.op == "call_function" and n.target is not aten.permute.default]
    assert [n.target for n in calls] == [torch.ops.mkldnn._linear_pointwise.default, aten.mm.default,
                                         aten.mm.default, aten.mm.default, aten.mm.default, aten.relu.default,
                                         aten.mul.Tensor, aten.neg.default]
    assert calls[0].args[1] is nodes["a.weight"] and calls[0].args[2] is nodes["a.bias"]
    assert records.linear == {"a.weight": 64}

    # Linears holding more weight than the budget of packed weights all stay with ATen (a large model's weights
    # stay shared between processes); the budget is part of the pass's identity for Inductor's caches.
    graph2 = torch.fx.Graph()
    x2 = graph2.placeholder("x")
    x2.meta["val"] = torch.empty(64, 256)
    w2 = graph2.get_attr("a.weight")
    w2.meta["val"] = torch.empty(256, 256)
    t2 = graph2.call_function(aten.permute.default, (w2, [1, 0]))
    t2.meta["val"] = torch.empty(256, 256)
    mm2 = graph2.call_function(aten.mm.default, (x2, t2))
    mm2.meta["val"] = torch.empty(64, 256)
    graph2.output((mm2,))
    before = config_pass.uuid()
    with mock.patch.object(build_torch, "ONEDNN_LINEAR_MAX_BYTES", 256 * 256 * 4 - 1):
        assert config_pass.uuid() != before
        with build_torch.conv_records() as records:
            config_pass(graph2)
    assert records.linear == {} and mm2 in graph2.nodes

    gen = torch.Generator().manual_seed(0)
    xs, ws, bs = torch.randn(64, 256, generator=gen), torch.randn(128, 256, generator=gen), torch.randn(128)
    packed = rt_torch.onednn_linear_weight(ws, 64)
    assert packed.layout == torch._mkldnn
    for weight in (packed, ws):
        out = torch.ops.mkldnn._linear_pointwise(xs, weight, bs, "none", [], "")
        torch.testing.assert_close(out, torch.nn.functional.linear(xs, ws, bs), rtol=1e-4, atol=1e-4)


def test_fold_into_convolutions_pass_on_a_graph_module():
    """The fold pass uses a post-grad GraphModule as Inductor hands it over: it registers the folded constants as
    buffers of ``graph.owning_module``, gives their get_attr nodes fake-free metadata made with ``new_empty``,
    reads ops' ``_schema.is_mutable``; the ReLU after the folded convolution becomes a ``clamp_min`` (the form
    Inductor's mkldnn fusion patterns do not fuse into oneDNN's convolution, whose ReLU loses NaN)."""
    aten = torch.ops.aten
    module = torch.nn.Module()
    gen = torch.Generator().manual_seed(0)
    module.register_buffer("w", torch.randn(6, 4, 3, 3, generator=gen))
    module.register_buffer("gamma", torch.rand(6, generator=gen) + 0.5)
    module.register_buffer("var", torch.rand(6, generator=gen) + 0.5)
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    w, gamma, var = graph.get_attr("w"), graph.get_attr("gamma"), graph.get_attr("var")
    y = graph.call_function(aten.convolution.default, (x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1))
    inv = graph.call_function(aten.rsqrt.default, (graph.call_function(aten.add.Tensor, (var, 1e-5)),))
    scale = graph.call_function(aten.unsqueeze.default, (graph.call_function(
        aten.unsqueeze.default, (graph.call_function(aten.mul.Tensor, (inv, gamma)), -1)), -1))
    z = graph.call_function(aten.mul.Tensor, (y, scale))
    out = graph.call_function(aten.relu.default, (graph.call_function(aten.add.Tensor, (z, 0.5)),))
    graph.output((out,))
    gm = torch.fx.GraphModule(module, graph)
    xs = torch.randn(1, 4, 8, 8, generator=gen)
    expected = gm(xs)[0]
    for node in gm.graph.nodes:  # the metadata Inductor's graphs carry
        if node.op == "get_attr":
            node.meta["val"] = getattr(gm, node.target)
    x.meta["val"], y.meta["val"] = xs, torch.empty(1, 6, 8, 8)
    for node in (z, out):
        node.meta["val"] = torch.empty(1, 6, 8, 8)
    scale.meta["val"] = torch.empty(6, 1, 1)
    with build_torch.conv_records() as records:
        build_torch.inductor_options("avx2", 16, onednn_convs=True)["post_grad_custom_pre_pass"](gm.graph)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.mkldnn._convolution_pointwise.default, aten.clamp_min.default]
    call = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert call.args[1].target == "_aotpack_folded_0" and call.args[2].target == "_aotpack_folded_1"
    assert call.args[7] == "none"
    assert sorted(records.folded) == ["_aotpack_folded_0", "_aotpack_folded_1"]
    assert records.folded["_aotpack_folded_0"].weight_names == ("w", "var", "gamma")
    assert set(records.onednn) == {"_aotpack_folded_0"}
    gm.recompile()
    torch.testing.assert_close(gm(xs)[0], expected, rtol=1e-5, atol=1e-5)


def test_eager_activations_rewrites_relu_and_relu6_after_a_convolution_only():
    """``relu(conv)`` -> ``clamp_min(conv, 0)``, ``clamp_max(clamp_min(conv + y, 0), 6)`` -> ``clamp_min(clamp_max(
    conv + y, 6), 0)``; a ReLU of anything else stays. Same values, NaN included."""
    aten = torch.ops.aten
    graph = torch.fx.Graph()
    x, w, y = graph.placeholder("x"), graph.placeholder("w"), graph.placeholder("y")
    c = graph.call_function(aten.convolution.default, (x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1))
    r = graph.call_function(aten.relu.default, (c,))
    six = graph.call_function(aten.clamp_max.default, (graph.call_function(
        aten.clamp_min.default, (graph.call_function(aten.add.Tensor, (c, y)), 0)), 6))
    other = graph.call_function(aten.relu.default, (y,))
    graph.output((r, six, other))
    build_torch._eager_activations(graph)
    ops = [(n.target, n.args[1:]) for n in graph.nodes if n.op == "call_function"]
    assert ops == [(aten.convolution.default, (w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1)),
                   (aten.clamp_min.default, (0.0,)), (aten.add.Tensor, (y,)), (aten.clamp_max.default, (6,)),
                   (aten.clamp_min.default, (0,)), (aten.relu.default, ())]
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    xs, ws, ys = torch.randn(1, 2, 4, 4) * 4, torch.randn(3, 2, 1, 1), torch.randn(1, 3, 4, 4)
    xs[0, 0, 1, 1] = float("nan")
    conv = torch.nn.functional.conv2d(xs, ws)
    for out, ref in zip(gm(xs, ws, ys), (torch.relu(conv), torch.nn.functional.relu6(conv + ys), torch.relu(ys))):
        torch.testing.assert_close(out, ref, equal_nan=True)


def _wrapper_and_constants(path) -> tuple[str, dict]:
    """The generated wrapper of a pack's first entry, and that entry's constants."""
    from aotpack_runtime.archive import Archive

    a = Archive.open(path)
    try:
        return bytes(a.read_blob("source/0/wrapper.cpp")).decode(), a.manifest.entries[0].constants
    finally:
        a.close()


def test_onednn_weights_reads_the_generated_wrapper(convnet_pack):
    """The constants a real build's wrapper passes only to oneDNN's convolution as its weight; a constant the
    wrapper also reads another way is not one of them."""
    wrapper, constants = _wrapper_and_constants(convnet_pack.path)
    convs = {"_aotpack_folded_0", "_aotpack_folded_2", "_aotpack_folded_4"}
    assert torch_text.onednn_weights(wrapper, constants) == convs
    elsewhere = wrapper + "\n    cpp_fused_extra((const float*)(_aotpack_folded_2.data_ptr()));\n"
    assert torch_text.onednn_weights(elsewhere, constants) == convs - {"_aotpack_folded_2"}
    binary = "aoti_torch_cpu_mkldnn__convolution_pointwise_binary(buf4, buf0, layer_weight, nullptr, ...);\n" \
             "[[maybe_unused]] auto& layer_weight = constants_->at(9);\n"
    assert torch_text.onednn_weights(binary, {"layer_weight"}) == {"layer_weight"}


def test_onednn_weights_finds_linear_weights_in_the_generated_wrapper(linearnet_pack):
    """The constants a real build's wrapper passes only to oneDNN's linear as its weight (its first argument an
    expression with parentheses of its own), and the form with a fused add."""
    wrapper, constants = _wrapper_and_constants(linearnet_pack[2])
    linears = {"down_weight", "proj_weight", "_aotpack_folded_0"}
    assert torch_text.onednn_weights(wrapper, constants, linear=True) == linears
    assert torch_text.onednn_weights(wrapper, constants) == set()
    elsewhere = wrapper + "\n    cpp_fused_extra((const float*)(proj_weight.data_ptr()));\n"
    assert torch_text.onednn_weights(elsewhere, constants, linear=True) == linears - {"proj_weight"}
    binary = "aoti_torch_cpu__linear_pointwise_binary(wrap(reinterpret(buf4, 2, a, b, 0L)), buf0, out_weight, " \
             "nullptr, \"add\");\n[[maybe_unused]] auto& out_weight = constants_->at(9);\n"
    assert torch_text.onednn_weights(binary, {"out_weight"}, linear=True) == {"out_weight"}


def test_fake_val_computes_a_new_nodes_metadata_in_the_graphs_fake_mode():
    """``_fake_val`` finds the fake mode of a node's inputs (torch._guards.detect_fake_mode) and runs the op
    there under the Python dispatcher, as Inductor's FakeTensorUpdater does; without fake inputs it leaves
    the node as it is."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    mode = FakeTensorMode()
    graph = torch.fx.Graph()
    x, w = graph.placeholder("x"), graph.placeholder("w")
    with mode:
        x.meta["val"], w.meta["val"] = torch.empty(1, 4, 8, 8), torch.empty(6, 4, 3, 3)
    node = graph.call_function(torch.ops.mkldnn._convolution_pointwise.default,
                               (x, w, None, [1, 1], [1, 1], [1, 1], 1, "relu", [], ""))
    build_torch._fake_val(node)
    val = node.meta["val"]
    assert isinstance(val, FakeTensor) and val.fake_mode is mode and tuple(val.shape) == (1, 6, 8, 8)
    plain = torch.fx.Graph()
    y = plain.placeholder("y")
    y.meta["val"] = torch.empty(2)
    neg = plain.call_function(torch.ops.aten.neg.default, (y,))
    build_torch._fake_val(neg)
    assert "val" not in neg.meta
