"""Stage 3, compile: Inductor lowers each captured graph to native code: a C++ shared object for a CPU
entry; for a CUDA entry, a C++ wrapper library plus one Triton kernel binary (a fatbin: SASS for each
requested architecture and PTX for the lowest) per kernel.

Every compile runs in a new, private scratch folder (removed afterwards), so builds on one host run side by
side. The output does not depend on that folder, on where torch and Python are installed, on the build
host's CPU model or core count: Inductor's files get fixed names, the compiler maps every host path to a
fixed name (``-ffile-prefix-map``, through a small wrapper script Inductor calls as its compiler), the
vector ISA comes from the build options, and the code is planned for a fixed thread count with dynamic
OpenMP regions (see ``_torch.inductor_options``). A pack with several entries compiles them in parallel
worker processes (as many as there are cores), each from the entry's graph saved with
``torch.export.save``; the output does not depend on how many workers ran.

May not: decide the manifest: it returns native code and what it needs, and ``pipeline`` records it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Iterator

from aotpack_runtime import _torch as rt_torch
from aotpack_runtime.devices import EXTERN_KERNELS_FILE, LIBRARY_FILE
from aotpack_runtime.errors import AotpackError, BuildError, CaptureError
from aotpack_runtime.schema import FoldRecord, PackedWeightRecord

from . import _torch, _torch_text, buildcache, toolchain
from .capture import Captured
from .memory import peak_rss
from .options import BuildOptions

@dataclass(frozen=True)
class CompiledEntry:
    """The native code of one entry and what it needs."""

    library: bytes
    sources: dict  # file name -> bytes (generated C++, build paths replaced by placeholders)
    constants: dict  # the code's constant name -> the model's parameter/buffer name
    kernels: tuple[str, ...]
    device: str = "cpu"
    # CUDA entries: one record per kernel (name, file, archs, ptx, shared_mem, num_warps) and its bytes.
    cuda_kernels: tuple = ()
    binaries: dict = field(default_factory=dict)  # file name -> bytes
    # AOTInductor's description of the ATen calls its proxy executor makes (JSON), when the code makes any.
    extern_kernels: bytes | None = None
    peak_rss: int = 0  # bytes: the peak memory of the worker process that compiled it (0: compiled in process)
    # The code's constants it passes only to oneDNN's convolution as its weight -> what packing that weight for
    # oneDNN at load needs (``schema.PackedWeightRecord``): see ``onednn_packed_weights``.
    packed_weights: dict = field(default_factory=dict)
    # The code's constants folded from stored weights (a batch norm folded into a convolution) -> how the loader
    # computes each (``schema.FoldRecord``): see ``_torch._fold_into_convolutions``.
    folded_weights: dict = field(default_factory=dict)

    def weight_names(self) -> set[str]:
        """The model's weights and buffers the code reads: through its constants and its folds."""
        return {w for c, w in self.constants.items() if c not in self.folded_weights} | \
            {n for f in self.folded_weights.values() for n in f.weight_names}


@contextlib.contextmanager
def scratch_dir() -> Iterator[str]:
    """A new, private build folder under the temporary folder (``TMPDIR``), removed afterwards."""
    try:
        root = os.path.realpath(tempfile.mkdtemp(prefix="aotpack-build-"))
    except OSError as e:
        raise BuildError(f"cannot create a build folder in {tempfile.gettempdir()}: {e.strerror}; set TMPDIR to "
                         "a writable folder with room for the build (Inductor writes about 200 MB there)") from None
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def build_environment(root: str, options: BuildOptions, config: dict, parallel: bool = False,
                      objects: buildcache.BuildCache | None = None) -> Iterator[dict]:
    """Everything a compile in ``root`` needs to be private and reproducible: Inductor's caches and temporary
    files inside ``root``, the compiler wrapper that maps host paths away, the pinned vector ISA (and, with
    ``parallel``, the wrapper and kernels compiled at once; with ``objects``, object files reused from that
    cache). Yields the Inductor config to compile with."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise BuildError(f"no C++ compiler: {os.environ.get('CXX', 'g++')!r} is not on PATH; install g++ "
                         "(Debian/Ubuntu: apt-get install g++) or set CXX")
    toolchain_folder = toolchain.toolchain_dir()
    config = dict(config)
    config["cpp.cxx"] = (toolchain.compiler_wrapper(os.path.join(toolchain_folder, "bin"), compiler,
                                                    _torch.compiler_march(options.cpu_isa)),)
    with toolchain.private_build_dirs(root), _torch.precompiled_header_dir(os.path.join(toolchain_folder, "pch")), \
            _torch.pinned_vec_isa(options.cpu_isa), _torch.serial_small_kernels(), _torch.stable_int_arrays(), \
            _torch.object_compiles(parallel, None if objects is None else _reuse_objects(objects, root)):
        yield config


# The generated files whose object files are reused: C++ that holds everything it compiles to (the weights'
# object is small, and Inductor patches it after compiling).
_REUSED_SOURCES = (".wrapper.cpp", ".kernel.cpp")


def _reuse_objects(cache: buildcache.BuildCache, root: str) -> Callable:
    """Reuse the object files of a CPU entry's wrapper and kernels by a key of what the compiler reads: the
    command line and the source, with host paths replaced (the compiler wrapper maps them away, so the object
    does not hold them), aotpack's own files (the wrapper's flags) and the toolchain's versions (torch's
    headers, the compiler, the C library). A model whose weights change keeps its generated code, so only
    Inductor's code generation runs again."""
    versions = buildcache.toolchain(("cpu",))

    def around(run: Callable[[], None], builder) -> None:
        found = _torch.object_build(builder)
        if found is None or not all(s.endswith(_REUSED_SOURCES) for s in found[1]):
            return run()
        command, sources, target = found
        texts = []
        for source in sources:
            with open(source, encoding="utf-8", errors="surrogateescape") as f:
                texts.append(toolchain.normalize_source(f.read(), root))
        key = buildcache.key_of({"object": {"command": toolchain.normalize_source(command, root), "sources": texts},
                                 "toolchain": versions})
        if cache.fetch(key, target) is not None:
            return None
        run()
        cache.store(key, target, {"source": os.path.basename(target)})
        return None

    return around


def entry_config(options: BuildOptions, device: str, stateful: bool = False) -> dict:
    """The Inductor config aotpack compiles an entry for ``device`` with (before the compiler wrapper is
    added: see ``build_environment``); ``stateful``: the graph writes buffers in place."""
    config = _torch.inductor_options(options.cpu_isa, options.cpu_threads, stateful,
                                     onednn_convs=device == "cpu" and options.onednn_convs)
    if device == "cuda":
        config.update(_torch.CUDA_INDUCTOR_CONFIG)
        config["cuda.arch"] = str(min(options.cuda_archs))
        if options.without_gpu:
            config.update(_torch.NO_GPU_INDUCTOR_CONFIG)
    return config


def compile_entries(captured: list[Captured], options: BuildOptions,
                    progress: Callable[[str], None] | None = None,
                    devices: list[str] | None = None, threads: int | None = None,
                    stateful: bool = False, objects: buildcache.BuildCache | None = None) -> list[CompiledEntry]:
    """Compile every entry (``devices[i]`` is entry i's device, CPU by default) with at most ``threads``
    compiler processes at once (default: the cores this process may use). Several entries compile in
    parallel worker processes; an entry with two threads to itself compiles its wrapper and kernels at
    once; with ``objects``, object files are reused from that cache. None of this changes the output.
    ``stateful``: the graphs write buffers in place (see ``compile_exported``)."""
    devices = devices or ["cpu"] * len(captured)
    threads = threads or len(os.sched_getaffinity(0))
    if len(captured) == 1:
        start = time.perf_counter()
        entry = compile_exported(captured[0].exported, options, device=devices[0], parallel=threads >= 2,
                                 stateful=stateful, objects=objects)
        if progress:
            progress(f"      entry 1 of 1 ({devices[0]}): {len(entry.kernels)} kernels in "
                     f"{time.perf_counter() - start:.1f} s")
        return [entry]
    workers = max(1, min(len(captured), threads))
    parallel = threads >= 2 * workers
    with tempfile.TemporaryDirectory(prefix="aotpack-entries-") as tmp:
        jobs = []
        for i, c in enumerate(captured):
            folder = os.path.join(tmp, str(i))
            os.makedirs(folder)
            _torch.save_exported(for_inductor(c.exported), os.path.join(folder, "graph.pt2"))
            with open(os.path.join(folder, "job.json"), "w") as f:
                json.dump({"options": options.to_json(), "device": devices[i], "parallel": parallel,
                           "stateful": stateful,
                           "objects": None if objects is None else [str(objects.root), objects.folder.name]}, f)
            jobs.append(folder)
        results: list[CompiledEntry | None] = [None] * len(jobs)
        pending = list(enumerate(jobs))
        running: list[tuple[int, str, subprocess.Popen, float]] = []
        while pending or running:
            while pending and len(running) < workers:
                i, folder = pending.pop(0)
                cmd = [sys.executable, "-m", "aotpack.compile", folder]
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                running.append((i, folder, proc, time.perf_counter()))
            i, folder, proc, start = running.pop(0)
            _, err = proc.communicate()
            if proc.returncode != 0:
                for *_, other, _ in running:
                    other.kill()
                _raise_worker_error(folder)
                lines = [ln for ln in err.decode(errors="replace").splitlines() if ln.strip()]
                raise BuildError(f"compiling entry {i} failed in its worker process: "
                                 f"{lines[-1] if lines else f'exit {proc.returncode}'}")
            results[i] = _read_result(folder)
            if progress:
                progress(f"      entry {i + 1} of {len(jobs)} ({devices[i]}): {len(results[i].kernels)} kernels in "
                         f"{time.perf_counter() - start:.1f} s ({workers} worker process{'es' if workers > 1 else ''})")
    return [r for r in results if r is not None]


def _write_result(entry: CompiledEntry, folder: str) -> None:
    with open(os.path.join(folder, "library.so"), "wb") as f:
        f.write(entry.library)
    if entry.extern_kernels is not None:
        with open(os.path.join(folder, "extern.json"), "wb") as f:
            f.write(entry.extern_kernels)
    for prefix, files in (("source-", entry.sources), ("binary-", entry.binaries)):
        for name, data in files.items():
            with open(os.path.join(folder, prefix + name), "wb") as f:
                f.write(data)
    with open(os.path.join(folder, "result.json"), "w") as f:
        json.dump({"constants": entry.constants, "kernels": list(entry.kernels), "device": entry.device,
                   "sources": sorted(entry.sources), "binaries": sorted(entry.binaries),
                   "cuda_kernels": list(entry.cuda_kernels), "peak_rss": peak_rss(),
                   "packed_weights": {c: r.to_json() for c, r in entry.packed_weights.items()},
                   "folded_weights": {c: r.to_json() for c, r in entry.folded_weights.items()}}, f)


def _read_result(folder: str) -> CompiledEntry:
    with open(os.path.join(folder, "result.json")) as f:
        meta = json.load(f)
    with open(os.path.join(folder, "library.so"), "rb") as f:
        library = f.read()
    extern = None
    if os.path.exists(os.path.join(folder, "extern.json")):
        with open(os.path.join(folder, "extern.json"), "rb") as f:
            extern = f.read()
    files: dict[str, dict] = {"source-": {}, "binary-": {}}
    for prefix, key in (("source-", "sources"), ("binary-", "binaries")):
        for name in meta[key]:
            with open(os.path.join(folder, prefix + name), "rb") as f:
                files[prefix][name] = f.read()
    return CompiledEntry(library=library, sources=files["source-"], constants=meta["constants"],
                         kernels=tuple(meta["kernels"]), device=meta["device"], binaries=files["binary-"],
                         cuda_kernels=tuple(meta["cuda_kernels"]), extern_kernels=extern,
                         peak_rss=meta["peak_rss"],
                         packed_weights={c: PackedWeightRecord.from_json(r, f"packed_weights[{c!r}]")
                                         for c, r in meta["packed_weights"].items()},
                         folded_weights={c: FoldRecord.from_json(r, f"folded_weights[{c!r}]")
                                         for c, r in meta.get("folded_weights", {}).items()})


def compile_exported(exported, options: BuildOptions, device: str = "cpu", parallel: bool = False,
                     stateful: bool = False, objects: buildcache.BuildCache | None = None) -> CompiledEntry:
    """Compile one exported graph for ``device`` in a private scratch folder; ``parallel`` compiles the
    wrapper's and the kernels' object files at once (two compiler processes), ``objects`` reuses a CPU
    entry's object files from that cache.

    A ``stateful`` graph writes buffers in place (the pack's state); Inductor's joint-graph constant folding
    would read such a buffer's build-time value into the code (a counter that returns 1, 1, 1 instead of
    1, 2, 3), so it is off for them."""
    if device == "cuda":
        return compile_cuda(exported, options, parallel, stateful)
    exported = for_inductor(exported)
    with scratch_dir() as root, build_environment(root, options, entry_config(options, "cpu", stateful),
                                                  parallel, objects) as config:
        package = os.path.join(root, "entry.pt2")
        try:
            with _torch.conv_records() as conv_records:
                _torch.aoti_compile(exported, package, config)
        except Exception as e:  # a compiler failure, or a lowering Inductor does not support
            raise BuildError(f"Inductor could not compile the graph: {type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
        library, sources, binaries, extern = _unpack(package, root)
        if binaries:
            raise BuildError("Inductor produced GPU kernels for a CPU entry")
        check_extern_kernels(extern, exported)
        # Loaded as the runtime loads it (with the proxy executor's description beside it, which libtorch
        # checks against each op's schema); dlopen returns an already-loaded library for a path it has seen:
        # name the folder by the content.
        folder = os.path.join(root, hashlib.sha256(library + (extern or b"")).hexdigest())
        os.makedirs(folder)
        so_path = os.path.join(folder, LIBRARY_FILE)
        with open(so_path, "wb") as f:
            f.write(library)
        if extern is not None:
            with open(os.path.join(folder, EXTERN_KERNELS_FILE), "wb") as f:
                f.write(extern)
        try:
            runner = rt_torch.cpu_runner(so_path, 1)
        except RuntimeError as e:
            raise extern_kernel_error(str(e), extern, exported) from None
        constants = rt_torch.constant_fqns(runner)
    check_constant_layouts(sources.get("wrapper.cpp", b"").decode())
    kernels = _torch_text.kernel_symbols(sources.get("kernel.cpp", b"").decode())
    folded = {c: conv_records.folded[w] for c, w in constants.items() if w in conv_records.folded}
    packed = onednn_packed_weights(conv_records.onednn, conv_records.linear, constants,
                                   sources.get("wrapper.cpp", b"").decode())
    return CompiledEntry(library=library, sources=sources, constants=constants, kernels=kernels,
                         extern_kernels=extern, packed_weights=packed, folded_weights=folded)


def onednn_packed_weights(records: dict[str, dict], linear: dict[str, int], constants: dict[str, str],
                          wrapper: str) -> dict[str, PackedWeightRecord]:
    """The manifest's ``packed_weights`` of a CPU entry: for each of the code's constants that it passes only to
    oneDNN's convolution or linear (``_torch._convolutions_to_onednn`` / ``_linears_to_onednn`` routed it there
    and recorded it under its weight's name: ``records``, ``linear``, and the generated wrapper uses it in no
    other way), the record the runtime packs it by, sorted by constant name. A constant that is not both stays
    bound to the stored weight, which the op also takes (slower, same outputs)."""
    by_weight: dict[str, list[str]] = {}
    for cname, wname in constants.items():
        by_weight.setdefault(wname, []).append(cname)

    def wanted(recorded: dict) -> dict:
        return {names[0]: recorded[w] for w, names in by_weight.items() if w in recorded and len(names) == 1}

    convs, linears = wanted(records), wanted(linear)
    packed = {c: PackedWeightRecord(kind="onednn_conv", padding=tuple(convs[c]["padding"]),
                                    stride=tuple(convs[c]["stride"]), dilation=tuple(convs[c]["dilation"]),
                                    groups=convs[c]["groups"], input_size=tuple(convs[c]["input_size"]))
              for c in _torch_text.onednn_weights(wrapper, convs)}
    packed.update({c: PackedWeightRecord(kind="onednn_linear", rows=linears[c])
                   for c in _torch_text.onednn_weights(wrapper, linears, linear=True)})
    return dict(sorted(packed.items()))


def for_inductor(exported):
    """The captured program as AOTInductor compiles it and a pack serves it: tensor outputs only
    (constants dropped, numbers as 0-d tensors), the model's plain tensor attributes as named buffers, and
    every weight dense (see ``_torch.lift_constants_to_buffers`` and ``_torch.outputs_for_inductor``). The
    captured program, which the guards and weights are read from, is not changed."""
    return _torch.outputs_for_inductor(_torch.lift_constants_to_buffers(exported))


def compile_cuda(exported, options: BuildOptions, parallel: bool = False, stateful: bool = False) -> CompiledEntry:
    """Compile one exported graph for CUDA: on this host's GPU, or (``without_gpu``) for named archs with none.

    The graph was captured on the CPU; it is moved to CUDA here (with fake weights when there is no GPU:
    the real ones stay in the pack, beside the code). Every kernel binary is then read back with cuobjdump
    and must carry SASS for each requested architecture.
    """
    from . import cudabuild

    exported = for_inductor(exported)
    archs = options.cuda_archs
    # No object reuse for CUDA entries: their objects depend on the CUDA toolkit's headers and on kernel
    # binaries their source only names.
    with scratch_dir() as root, build_environment(root, options, entry_config(options, "cuda", stateful),
                                                  parallel) as config:
        home = cudabuild.cuda_home()
        if home:
            config.update(toolchain.fatbin_config(os.path.join(toolchain.toolchain_dir(), "bin"), os.path.join(home, "bin", "nvcc"),
                                               archs))
        stub = cudabuild.libcuda_stub(os.path.join(root, "libcuda-stub"), home) if options.without_gpu else None
        package = os.path.join(root, "entry.pt2")
        with cudabuild.build_environment(archs, stub, home):
            try:
                if options.without_gpu:
                    from . import _cuda_offline

                    program = _cuda_offline.fake_cuda_program(exported)
                    with _cuda_offline.offline_cuda(min(archs)):
                        _torch.aoti_compile(program, package, config)
                else:
                    _torch.aoti_compile(_torch.move_to_cuda(exported), package, config)
            except Exception as e:
                raise BuildError(f"Inductor could not compile the graph for CUDA: {type(e).__name__}: "
                                 f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
        library, sources, binaries, extern = _unpack(package, root)
        check_extern_kernels(extern, exported)
        wrapper = sources.get("wrapper.cpp", b"").decode()
        records = []
        listed = _torch_text.wrapper_kernels(wrapper)
        if sorted(k.file for k in listed) != sorted(binaries):
            raise BuildError(f"the generated code loads kernels {sorted(k.file for k in listed)} but Inductor wrote "
                             f"{sorted(binaries)}; this torch's CUDA packaging is not supported")
        for k in listed:
            path = os.path.join(root, "check-" + k.file)
            with open(path, "wb") as f:
                f.write(binaries[k.file])
            sass, ptx = cudabuild.binary_archs(path)
            missing = cudabuild.missing_archs(sass, archs)
            if missing:
                raise BuildError(f"kernel {k.name} carries SASS for {', '.join(sass) or 'nothing'} but not for "
                                 f"{', '.join(missing)}, which the build asked for; this torch cannot compile "
                                 "for an architecture other than the build GPU's: build on that GPU")
            records.append({"name": k.name, "file": k.file, "archs": sass, "ptx": ptx,
                            "shared_mem": k.shared_mem, "num_warps": k.num_warps})
    constants = {c.name: c.fqn for c in _torch_text.wrapper_constants(wrapper)}
    check_constant_layouts(wrapper)
    missing = sorted(set(_used_weights(exported)) - set(constants.values()))
    if missing:
        raise BuildError(f"the CUDA code does not use the weights {missing}, which the graph reads; refusing a "
                         "pack that would compute with the wrong weights")
    return CompiledEntry(library=library, sources=sources, constants=constants,
                         kernels=tuple(r["name"] for r in records), device="cuda",
                         cuda_kernels=tuple(records), binaries=binaries, extern_kernels=extern)


def _used_weights(exported) -> list[str]:
    """Parameter and buffer names that some node of the graph reads."""
    sig = exported.graph_signature
    by_input = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    return [by_input[n.name] for n in exported.graph.nodes
            if n.op == "placeholder" and n.name in by_input and n.users]


def _unpack(package: str, root: str) -> tuple[bytes, dict, dict, bytes | None]:
    """The shared object, the generated sources (paths normalized), the kernel binaries and the extern-kernel
    description (the ATen calls made through the proxy executor; None when there are none) of a package."""
    library = extern = None
    sources = {}
    binaries = {}
    with zipfile.ZipFile(package) as z:
        for info in z.infolist():
            name = info.filename.rsplit("/", 1)[-1]
            if name.endswith((".fatbin", ".cubin")):
                binaries[name] = z.read(info)
            elif name.endswith(".so"):
                if library is not None:
                    raise BuildError("Inductor produced more than one shared object for one graph")
                library = z.read(info)
            elif name.endswith(".wrapper.cpp"):
                sources["wrapper.cpp"] = toolchain.normalize_source(z.read(info).decode(), root).encode()
            elif name.endswith(".kernel.cpp"):
                sources["kernel.cpp"] = toolchain.normalize_source(z.read(info).decode(), root).encode()
            elif name.endswith(".wrapper.json"):
                extern = z.read(info)
    if library is None:
        raise BuildError("Inductor produced no shared object")
    return library, sources, binaries, extern


def _extern_nodes(extern: bytes | None) -> list[str]:
    """The op of each call in an extern-kernel description (``aten::_unique2``), in order."""
    if extern is None:
        return []
    try:
        return [n["node"]["target"] for n in json.loads(extern)["nodes"]]
    except (ValueError, KeyError, TypeError) as e:
        raise BuildError(f"Inductor wrote an extern-kernel description this aotpack cannot read ({e}); this "
                         "torch's AOTInductor packaging is not supported") from None


def _op_line(op: str, exported) -> tuple[str | None, int | None, str | None]:
    """The user's file, line and code of the first graph node that calls ``op``."""
    from .capture import user_line

    for node in exported.graph.nodes:
        if node.op == "call_function" and _torch.op_name(node.target) == op:
            return user_line(node.meta.get("stack_trace") or "")
    return None, None, None


def check_extern_kernels(extern: bytes | None, exported) -> None:
    """Refuse code that calls, through the proxy executor, an op whose implementation is not in libtorch: the
    runtime's proxy executor runs ATen ops (C++), never Python code (custom ops, or prims, which are Python)."""
    for op in _extern_nodes(extern):
        if not op.startswith("aten::"):
            filename, lineno, code = _op_line(op, exported)
            raise CaptureError(f"forward calls {op}, which the compiled code would run through AOTInductor's "
                               "proxy executor; its implementation is Python, and a pack runs ATen ops only",
                               filename=filename, lineno=lineno, code=code,
                               hint="rewrite this call with other torch operations")


def extern_kernel_error(message: str, extern: bytes | None, exported) -> AotpackError:
    """The error for a library that libtorch refused to load: a CaptureError naming the op and the user's line
    when its proxy executor cannot run one of the code's ATen calls, else a BuildError."""
    first = message.strip().splitlines()[0] if message.strip() else "no message"
    for op in _extern_nodes(extern):
        if re.search(re.escape(op) + r"(?![\w.])", message):
            filename, lineno, code = _op_line(op, exported)
            return CaptureError(f"forward calls {op}, which has no C shim in AOTInductor and which its proxy "
                                f"executor cannot run ({first})", filename=filename, lineno=lineno, code=code,
                                hint="rewrite this call with other torch operations")
    return BuildError(f"the compiled code cannot be loaded: {first}")


def check_constant_layouts(wrapper: str) -> None:
    """Every constant the code reads must be dense and start at its storage (the pack stores weights as dense
    bytes and hands them to the code as they are); ``lift_constants_to_buffers`` made them so."""
    for c in _torch_text.wrapper_constants(wrapper):
        dense, acc = [], 1
        for n in reversed(c.shape):
            dense.insert(0, acc)
            acc *= max(n, 1)
        if any(n > 1 and a != b for n, a, b in zip(c.shape, c.stride, dense)) or c.offset:
            raise BuildError(f"the compiled code reads the weight {c.fqn!r} with strides {list(c.stride)} at offset "
                             f"{c.offset}, but the pack stores it dense; this torch's AOTInductor is not supported")


def _worker(folder: str) -> None:
    """Worker process: compile the graph saved in ``folder`` and write the result beside it (or the aotpack
    error it raised, for the parent to raise again)."""
    with open(os.path.join(folder, "job.json")) as f:
        job = json.load(f)
    options = BuildOptions.from_json(job["options"])
    exported = _torch.load_exported(os.path.join(folder, "graph.pt2"))
    objects = None if job["objects"] is None else buildcache.BuildCache(*job["objects"])
    try:
        _write_result(compile_exported(exported, options, device=job["device"], parallel=job["parallel"],
                                       stateful=job["stateful"], objects=objects), folder)
    except (CaptureError, BuildError) as e:
        fields = {"reason": e.reason, "filename": e.filename, "lineno": e.lineno, "hint": e.hint, "code": e.code} \
            if isinstance(e, CaptureError) else {"message": str(e)}
        with open(os.path.join(folder, "error.json"), "w") as f:
            json.dump({"type": type(e).__name__, **fields}, f)
        raise


def _raise_worker_error(folder: str) -> None:
    """Raise the CaptureError or BuildError a worker process wrote, if it wrote one."""
    path = os.path.join(folder, "error.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        err = json.load(f)
    if err.pop("type") == "CaptureError":
        reason = err.pop("reason")
        raise CaptureError(reason, **err)
    raise BuildError(err["message"])


if __name__ == "__main__":
    _worker(sys.argv[1])
