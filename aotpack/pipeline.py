"""The build pipeline: capture → guards → compile → package, each stage timed and reported.

May not: do a stage's work itself: each stage is its module, tied here."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import platform as _platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from aotpack_runtime.errors import BuildError, CaptureError
from aotpack_runtime import format as fmt
from aotpack_runtime.format import DTYPES, canonical_json
from aotpack_runtime.guards import EntryGuards, dtype_name, stored_dtype
from aotpack_runtime.platform import KNOWN_FLAGS, host_cpu_flags, host_machine, torch_minor
from aotpack_runtime.schema import (CudaKernel, CudaMeta, EntryRecord, ExampleLeaf, ExampleRecord, Guards, Manifest,
                                    MethodRecord, TensorGuard, WeightRecord)

from . import __version__, _torch, buildcache, capture, compile, guards, package, sourcekey, state, toolchain
from . import methods as methods_mod
from .memory import peak_rss, reset_peak_rss
from .options import BuildOptions

ProgressFn = Callable[[str], None]


@dataclass
class BuildReport:
    """What a build did: per-stage seconds and the pack's vital figures."""

    output: pathlib.Path
    stages: dict = field(default_factory=dict)
    size: int = 0
    entries: int = 0
    weights: int = 0
    weight_bytes: int = 0
    kernels: int = 0
    key: str = ""  # the build cache key (empty when the build ran without a cache)
    cached: bool = False  # True when the pack was copied from the build cache instead of compiled
    source_key: str = ""  # the build's source key (empty when it has none: see ``sourcekey``)
    hit: str = ""  # which key found the pack in the build cache: "source" (no capture), "graph" or "" (a miss)
    peak_rss: int = 0  # bytes: this process's peak resident memory during the build
    worker_peak_rss: int = 0  # bytes: the largest peak of a compile worker process (0 when none ran)
    weights_file: pathlib.Path | None = None  # where the weights went with --weights external (None: in the pack)

    def summary(self) -> str:
        total = sum(self.stages.values())
        memory = f"peak memory {self.peak_rss / 1e9:.2f} GB"
        if self.worker_peak_rss:
            memory += f" (compile workers: {self.worker_peak_rss / 1e9:.2f} GB each at most)"
        return (f"wrote {self.output} ({self.size / 1e6:.2f} MB): {self.entries} entr"
                f"{'y' if self.entries == 1 else 'ies'}, {self.weights} weights ({self.weight_bytes / 1e6:.2f} MB), "
                f"{self.kernels} kernels, built in {total:.1f} s{', from the build cache' if self.cached else ''}, {memory}")


class _Stages:
    def __init__(self, progress: ProgressFn | None, report: BuildReport):
        self.progress = progress
        self.report = report
        self.n = 0
        self.total = 4

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        self.n += 1
        if self.progress:
            self.progress(f"[{self.n}/{self.total}] {name}{': ' + detail if detail else ''} ...")
        start = time.perf_counter()
        yield
        took = time.perf_counter() - start
        self.report.stages[name] = self.report.stages.get(name, 0.0) + took
        if self.progress:
            self.progress(f"[{self.n}/{self.total}] {name} done in {took:.1f} s")

    def say(self, line: str) -> None:
        if self.progress:
            self.progress(line)


def producer(compiler: str) -> dict:
    return {"aotpack": __version__, "torch": torch.__version__, "python": _platform.python_version(),
            "compiler": compiler, "platform": f"{sys.platform}-{host_machine()}"}


def target(options: BuildOptions) -> dict:
    t = {"machine": host_machine(), "cpu_isa": options.cpu_isa, "torch_series": torch_minor(torch.__version__)}
    if options.cpu_isa == "native":
        t["cpu_flags"] = sorted(f for f in host_cpu_flags() if f in KNOWN_FLAGS)
    return t


def _dtype(t: torch.Tensor, what: str) -> str:
    """The format's name of the tensor's dtype; a CaptureError for a dtype a pack cannot carry."""
    name = stored_dtype(t.dtype)
    if name is None:
        raise CaptureError(f"{what} is a tensor of dtype {dtype_name(t.dtype)}, which a pack cannot carry; packs "
                           f"take {', '.join(DTYPES)}", hint="convert it to one of these")
    return name


def _example_record(captured: capture.Captured, blobs: list, method: str | None = None) -> ExampleRecord:
    flat, treespec = guards._torch.tree_flatten((captured.args, captured.kwargs))
    spec = capture.spec_to_json(treespec, "inputs")
    leaves = []
    for v in flat:
        if isinstance(v, torch.Tensor):
            name = fmt.example_blob(len(leaves), method)
            blobs.append(package.Blob(name, package.tensor_bytes(v)))
            leaves.append(ExampleLeaf("tensor", blob=name, dtype=_dtype(v, "an example input"), shape=tuple(v.shape),
                                      strides=tuple(v.contiguous().stride() if v.numel() == 0 else v.stride())))
        else:
            leaves.append(ExampleLeaf("value", value=v))
    return ExampleRecord(spec, tuple(leaves))


def _as_call(spec: Any, default_kwargs: dict, i: int) -> tuple[tuple, dict]:
    """A specialization given as an args tuple, or as (args tuple, kwargs dict)."""
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], tuple) and isinstance(spec[1], dict):
        return spec[0], spec[1]
    if isinstance(spec, tuple):
        return spec, default_kwargs
    raise BuildError(f"specializations[{i}] must be an args tuple or (args, kwargs), got {type(spec).__name__}")


def _check_accepts_own_example(g: Guards, args: tuple, kwargs: dict, i: int) -> None:
    """An entry's guards must accept the example it was captured from (derived sizes must be solvable)."""
    runtime_guards = EntryGuards.of(g, f"entry {i}")
    with torch.no_grad():
        if runtime_guards.match(args, kwargs) is None:
            raise BuildError(f"the guards of entry {i} refuse the example input it was captured from "
                             f"({runtime_guards.explain(args, kwargs) or 'no reason given'}); this is a bug in "
                             "aotpack: please report it with the model")


def _accepting_entry(entries: list, args: tuple, kwargs: dict) -> int | None:
    """Index of the first entry whose guards accept this example (as the runtime would dispatch it)."""
    with torch.no_grad():
        for j, (_, g) in enumerate(entries):
            runtime_guards = EntryGuards.of(g, f"entry {j}")
            if runtime_guards.match(args, kwargs) is not None:
                return j
    return None


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are the very same tensor (the same object, or a view of the same memory with the
    same dtype, offset, shape and strides): tied weights."""
    return a is b or (_identity(a) is not None and _identity(a) == _identity(b))


def _weights(entries: list, compiled: list, state_names: tuple[str, ...] = (), by_identity: bool = False) \
        -> tuple[list[WeightRecord], list[package.Blob], dict[str, torch.Tensor], list[str]]:
    """Every constant any entry needs, stored once, by its name in the model; the state buffers among them
    are returned apart (name -> initial value), and the model's ``state_dict`` names the code never reads.
    ``by_identity`` (packs of several methods): weights of two names that the code reads and that are the
    same tensor (tied weights) share one blob.

    Each record says what new weights need: its other ``state_dict`` names that the code does not read
    (``aliases``: tied weights, the very same tensor), and ``"state_dict": false`` for a tensor the
    ``state_dict`` lacks (a lifted constant, a non-persistent buffer)."""
    tensors: dict[str, torch.Tensor] = {}
    state_dict: dict[str, Any] = {}
    for (captured, _), code in zip(entries, compiled):
        ep = captured.exported
        state_dict.update(ep.state_dict)
        state = {**dict(ep.state_dict), **dict(ep.constants)}
        for name in sorted(code.weight_names()):
            t = state.get(name)
            if not isinstance(t, torch.Tensor):
                raise BuildError(f"the compiled code needs the constant {name!r}, which the model does not have")
            if name in tensors and not torch.equal(tensors[name], t):
                raise BuildError(f"two entries see different values for {name!r}; the model changed during the build")
            tensors[name] = t
    missing = [n for n in state_names if n not in tensors]
    if missing:
        raise BuildError(f"the compiled code does not keep the state buffers {missing} as buffers it writes; a pack "
                         "would serve their build-time values. Report it with the model")
    state = {n: tensors.pop(n) for n in state_names}
    records, blobs = [], []
    named: set[str] = set(tensors) | set(state_names)
    seen: dict[tuple, str] = {}
    for name in sorted(tensors):
        t = tensors[name]
        identity = _identity(t) if by_identity else None
        blob = seen.get(identity) if identity is not None else None
        if blob is None:
            blob = fmt.weight_blob(len(blobs))
            # Weights stay uncompressed: the loader maps them from the file (shared, no copy, no decompression);
            # the writer streams them from the tensor's memory (no copy at build time either).
            blobs.append(package.Blob(blob, t, compressible=False))
            if identity is not None:
                seen[identity] = blob
        aliases: list[str] = []
        if name in state_dict:
            aliases = sorted(n for n, other in state_dict.items() if n not in named and isinstance(other, torch.Tensor)
                             and _same_tensor(other, t))
            named.update(aliases)
        records.append(WeightRecord(name=name, blob=blob, dtype=_dtype(t, f"the weight {name!r}"),
                                    shape=tuple(t.shape), aliases=tuple(aliases), in_state_dict=name in state_dict))
    unread = sorted(n for n in state_dict if n not in named)
    return records, blobs, state, unread


def _identity(t: torch.Tensor) -> tuple | None:
    """What makes two tensors the same tensor: the memory they view and how (None for a tensor without
    storage, which shares nothing)."""
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    if not ptr:
        return None
    return (t.device.type, ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _compile_detail(options: BuildOptions, n: int) -> str:
    parts = []
    if "cpu" in options.devices:
        parts.append(f"C++ for {options.cpu_isa}")
    if "cuda" in options.devices:
        archs = ", ".join(f"sm_{a}" for a in options.cuda_archs)
        parts.append(f"Triton for {archs}{' without a GPU' if options.without_gpu else ''}")
    return f"Inductor {' + '.join(parts)}, {n} entr{'y' if n == 1 else 'ies'}"


def _guards_on(g: Guards, device: str) -> Guards:
    """The entry's guards with every tensor input on ``device`` (a CUDA guard names no index: an entry
    serves inputs on any GPU, all on the same one)."""
    return dataclasses.replace(g, leaves=tuple(dataclasses.replace(leaf, device=device)
                                               if isinstance(leaf, TensorGuard) else leaf for leaf in g.leaves))


def _common(lists: list[list[str]]) -> list[str]:
    """The architectures every kernel carries, in order."""
    if not lists:
        return []
    common = set(lists[0]).intersection(*map(set, lists[1:]))
    return [a for a in lists[0] if a in common]


def _cuda_record(i: int, code: Any, options: BuildOptions, blobs: list) -> CudaMeta:
    """The manifest's record of a CUDA entry: its architectures, how it was built, and each kernel."""
    from . import cudabuild

    kernels = []
    for k in code.cuda_kernels:
        blob = fmt.kernel_blob(i, k["file"])
        data = code.binaries[k["file"]]
        blobs.append(package.Blob(blob, data))
        kernels.append(CudaKernel(name=k["name"], blob=blob, file=k["file"], archs=tuple(k["archs"]),
                                  ptx=tuple(k["ptx"]), size=len(data), shared_mem=k["shared_mem"],
                                  num_warps=k["num_warps"]))
    archs = _common([list(k.archs) for k in kernels]) if kernels else [f"sm_{a}" for a in options.cuda_archs]
    ptx = _common([list(k.ptx) for k in kernels]) if kernels else []
    return CudaMeta(archs=tuple(archs), ptx=tuple(ptx), built_without_gpu=options.without_gpu,
                    autotuned=not options.without_gpu,
                    build_gpu=None if options.without_gpu else cudabuild.gpu_description(),
                    cuda_version=torch.version.cuda, kernels=tuple(kernels))


def _cuda_summary(entries: list[EntryRecord], options: BuildOptions) -> str:
    lines = []
    for e in entries:
        if e.cuda is not None:
            c = e.cuda
            lines.append(f"      entry {e.name} (cuda): {len(c.kernels)} kernels, SASS "
                         f"{', '.join(c.archs) or '-'}, PTX {', '.join(c.ptx) or '-'}"
                         f"{', built without a GPU' if c.built_without_gpu else ', on ' + str(c.build_gpu)}")
    return "\n".join(lines)


def build(model: Any, example_inputs: tuple, output: str | pathlib.Path, *, example_kwargs: dict | None = None,
          dynamic_shapes: Any = None, specializations: Sequence = (), options: BuildOptions | None = None,
          progress: ProgressFn | None = None, cache_positions: Any = None,
          cache: buildcache.BuildCache | None = None, source: str = "", threads: int | None = None,
          model_file: sourcekey.ModelFile | None = None, methods: Any = None) -> BuildReport:
    """Run the whole pipeline; return a :class:`BuildReport`. ``progress`` receives one line per event.

    The first entry is captured from ``example_inputs`` (with ``dynamic_shapes``, torch.export's format);
    each of ``specializations`` that no earlier entry accepts becomes its own static entry, in order.
    Buffers the model writes in place become the pack's state; ``cache_positions`` says which input holds
    cache positions (see ``state.position_rules``).
    With a ``cache``, a pack with the same key is copied from it instead of compiled, and a compiled pack
    is stored in it (``source`` names the model in the cache's records). ``threads`` caps the compiler
    processes the build runs at once (default: the cores this process may use); it never changes the pack.
    ``model_file`` (from ``sourcekey.load``) says the model came from a model file: with a cache, its source
    key is looked up first, and a hit copies the pack without capturing the model.
    ``methods`` (name -> ``methods.Method``) builds several methods of the model into one pack, each with its
    own example inputs, dynamic shapes, specializations and cache positions (the arguments above are then
    unused); ``forward`` alone is built exactly as without ``methods``.
    """
    with warnings.catch_warnings():
        # torch's own deep copies of pytree specs warn about a deprecation inside torch; not the user's to fix
        warnings.filterwarnings("ignore", message=r".*LeafSpec.* is deprecated", category=FutureWarning)
        return _build(model, example_inputs, output, example_kwargs=example_kwargs, dynamic_shapes=dynamic_shapes,
                      specializations=specializations, options=options, progress=progress,
                      cache_positions=cache_positions, cache=cache, source=source, threads=threads,
                      model_file=model_file, methods=methods)


def _tensor_records(entries: list) -> dict:
    """Every weight and constant any entry's graph holds: dtype, shape, strides and sha256, by name."""
    out: dict = {}
    for captured, _, _ in entries:
        ep = captured.exported
        for name, t in sorted({**dict(ep.state_dict), **dict(ep.constants)}.items()):
            if name in out:
                continue
            if isinstance(t, torch.Tensor):
                out[name] = buildcache.tensor_record(t, package.tensor_digest(t))
            else:
                out[name] = {"type": type(t).__name__}
    return out


def cache_key(entries: list, options: BuildOptions, example: ExampleRecord | None, example_blobs: list,
              compiler: str, state_names: tuple[str, ...] = (), positions: list | None = None,
              methods: list[MethodRecord] | None = None) -> str:
    """The build cache key of a build whose graphs are captured and guarded: see ``buildcache``. ``example`` is
    the example record of a pack of one forward (None with ``methods``, whose records hold theirs)."""
    return buildcache.key_of(cache_material(entries, options, example, example_blobs, compiler, state_names,
                                            positions, methods))


def cache_material(entries: list, options: BuildOptions, example: ExampleRecord | None, example_blobs: list,
                   compiler: str, state_names: tuple[str, ...] = (), positions: list | None = None,
                   methods: list[MethodRecord] | None = None) -> dict:
    """What the build cache key is the hash of (``buildcache.key_of``); its ``weights`` are every weight's
    record by name (``buildcache.tensor_record``), which ``reweight`` replaces to key a pack with new weights."""
    graphs: dict[int, str] = {}
    records = []
    for captured, g, device in entries:
        if id(captured) not in graphs:
            # The graph as Inductor compiles it (torch.export's serializer cannot write a bool output); what
            # became of each output (a number, a constant) is in the guards' record.
            graphs[id(captured)] = buildcache.digest(_torch.graph_text(compile.for_inductor(captured.exported)))
        records.append({"graph": graphs[id(captured)], "guards": g.to_json(), "device": device})
    method_json = None if methods is None else [m.to_json() for m in methods]
    example_json = {"methods": method_json} if methods is not None else example.to_json()
    example_digest = buildcache.digest(canonical_json(example_json) + b"".join(
        buildcache.digest(b.data).encode() for b in example_blobs))
    material = {"entries": records, "weights": _tensor_records(entries), "example": example_digest,
                "frozen": {"training": entries[0][0].training}, "options": options.to_json(),
                "inductor": _inductor_configs(options, bool(state_names)), **context_material(options, compiler),
                "state": {"buffers": list(state_names), "positions": [p.to_json() for p in positions or ()]}}
    if methods is not None:
        material["methods"] = method_json
    return material


def _inductor_configs(options: BuildOptions, stateful: bool) -> dict:
    """A digest of the whole Inductor config each device's compile sees."""
    return {d: buildcache.digest(canonical_json(_torch.effective_config(compile.entry_config(options, d, stateful))))
            for d in options.devices}


def context_material(options: BuildOptions, compiler: str) -> dict:
    """What a build cache key takes from outside the model: the pack's producer and target, the toolchain,
    and the build GPU of CUDA entries (both keys use it: ``cache_key`` and the source key)."""
    material = {"producer": producer(compiler), "target": target(options),
                "toolchain": buildcache.toolchain(options.devices)}
    if "cuda" in options.devices and not options.without_gpu:
        from . import cudabuild

        material["build_gpu"] = cudabuild.gpu_description()
    return material


def source_key(model_file: sourcekey.ModelFile, model: Any, calls: dict, options: BuildOptions, compiler: str,
               cache: buildcache.BuildCache) -> str | None:
    """The source key of a build from a model file (see ``sourcekey``); None when it has none.

    The Inductor config a compile would see is made of torch's defaults (torch's version and commit are in
    the toolchain record), aotpack's settings (its source digest), the options, the environment torch's
    config modules read, and whatever code changed after import. Its value needs ``torch._inductor``, whose
    import alone takes longer than the rest of the key; so it is in the key only when the model file
    imported that package (and could have changed the config), and the environment always is."""
    inductor: dict = {"environment": sourcekey.config_environment()}
    if "torch._inductor.config" in sys.modules:
        inductor.update(stateless=_inductor_configs(options, False), stateful=_inductor_configs(options, True))
    context = dict(context_material(options, compiler), inductor=inductor)
    return sourcekey.key(model_file, model, calls, options.to_json(), context,
                         sourcekey.FileDigests(cache.file_index()))


def _cached_report(report: BuildReport, entry: buildcache.CacheEntry) -> None:
    """Fill the report's figures from the manifest of the pack copied from the cache."""
    from aotpack_runtime.archive import Archive

    manifest = Archive.open(report.output).manifest
    report.size = entry.size
    report.entries = len(manifest.entries)
    report.weights = len(manifest.weights)
    report.weight_bytes = sum(w.nbytes for w in manifest.weights)
    report.kernels = sum(len(e.kernels or ()) for e in manifest.entries)


def _copied(report: BuildReport, hit: buildcache.CacheEntry, stages: _Stages,
            progress: ProgressFn | None) -> BuildReport:
    """The last stage of a build whose pack the build cache held: the report of the copy."""
    with stages.stage("package", "copied from the build cache"):
        report.cached = True
        _cached_report(report, hit)
        report.peak_rss = peak_rss()
    if progress:
        progress(report.summary())
    return report


def _guarded_entries(calls: list, captures: list, stages: _Stages, method: str | None = None) -> list:
    """Stage 2 for one method's example calls and their captures: an entry (captured, guards) for each
    example that no earlier entry accepts, checked to accept its own example."""
    entries: list[tuple[capture.Captured, Guards]] = []
    who, its = (f"{method} example", "its entry") if method else ("example", "entry")
    for i, ((args, kwargs, _), captured) in enumerate(zip(calls, captures)):
        served_by = _accepting_entry(entries, args, kwargs)
        if served_by is not None:
            stages.say(f"      {who} {i}: served by {its} {served_by}, no new entry")
            continue
        entries.append((captured, guards.derive(captured)))
        _check_accepts_own_example(entries[-1][1], args, kwargs, len(entries) - 1)
        label = EntryGuards.of(entries[-1][1], f"entry {len(entries) - 1}").label()
        stages.say(f"      {who} {i}: {its} {len(entries) - 1} ({label})")
    return entries


def _capture_and_guard(model: Any, example_inputs: tuple, example_kwargs: dict | None, dynamic_shapes: Any,
                       specializations: Sequence, options: BuildOptions, stages: _Stages,
                       cache_positions: Any) -> tuple[list, tuple[str, ...], list]:
    """Stages 1 and 2: capture each example call, keep those no earlier entry accepts; return one
    (captured, guards, device) per entry and device, the state buffers and the cache-position rules."""
    example_kwargs = dict(example_kwargs or {})
    calls = [(example_inputs, example_kwargs, dynamic_shapes)]
    calls += [(*_as_call(sp, example_kwargs, i), None) for i, sp in enumerate(specializations)]
    with stages.stage("capture", f"Dynamo, fullgraph; {len(calls)} example input(s)"):
        captures = [capture.capture(model, args, kwargs, dynamic_shapes=dyn) for args, kwargs, dyn in calls]
    with stages.stage("guards"):
        entries = _guarded_entries(calls, captures, stages)
        state_names = tuple(sorted(set().union(*(c.state for c, _ in entries))))
        positions = []
        if state_names:
            positions = state.position_rules(model, cache_positions, example_kwargs, example_inputs,
                                             captures[0].param_names)
            stages.say(f"      state: {len(state_names)} buffer(s) the model writes in place"
                       + (f"; cache positions in {', '.join(repr(p.input) for p in positions)}" if positions
                          else "; no cache-position input"))
        elif cache_positions is not None:
            raise BuildError("cache_positions was given, but the model writes no buffer in place: a pack without "
                             "state has no cache")
    # One entry per captured graph and device, graph by graph: [g0 cpu, g0 cuda, g1 cpu, ...].
    return [(c, g, d) for c, g in entries for d in options.devices], state_names, positions


@dataclass
class _Plan:
    """What stages 1 and 2 found: one (captured, guards, device) per entry, the state buffers, and for a pack
    of several methods each method's record (its entries, cache-position rules, the state it writes) and
    its first capture (for its example record); ``methods`` is None for a pack of one forward."""

    entries: list
    state_names: tuple[str, ...]
    positions: list
    methods: list | None = None  # [(Resolved, MethodRecord without its example, Captured)]


def _capture_methods(model: Any, resolved: list, options: BuildOptions, stages: _Stages) -> _Plan:
    """Stages 1 and 2 for several methods: each method's example calls captured as the model's forward (names
    stay the model's), entries kept per method as for one forward; the state is every buffer any method
    writes, shared by all."""
    calls_per_method = []
    for r in resolved:
        calls = [(r.example_inputs, r.example_kwargs, r.dynamic_shapes)]
        calls += [(*_as_call(sp, r.example_kwargs, i), None) for i, sp in enumerate(r.specializations)]
        calls_per_method.append(calls)
    n_calls = sum(len(c) for c in calls_per_method)
    with stages.stage("capture", f"Dynamo, fullgraph; {len(resolved)} methods, {n_calls} example input(s)"):
        captures = []
        for r, calls in zip(resolved, calls_per_method):
            with methods_mod.as_forward(model, r):
                captures.append([capture.capture(model, args, kwargs, dynamic_shapes=dyn)
                                 for args, kwargs, dyn in calls])
    per_method: list[list] = []
    with stages.stage("guards"):
        for r, calls, caps in zip(resolved, calls_per_method, captures):
            per_method.append(_guarded_entries(calls, caps, stages, method=r.name))
        state_names = tuple(sorted(set().union(*(c.state for entries in per_method for c, _ in entries))))
        flat: list = []
        records = []
        for r, entries, caps in zip(resolved, per_method, captures):
            indices = []
            for c, g in entries:
                for d in options.devices:
                    indices.append(len(flat))
                    flat.append((c, g, d))
            positions = []
            if state_names:
                with methods_mod.as_forward(model, r):
                    positions = state.position_rules(model, r.cache_positions, r.example_kwargs, r.example_inputs,
                                                     caps[0].param_names)
            elif r.cache_positions is not None:
                raise BuildError(f"methods[{r.name!r}].cache_positions was given, but no method writes a buffer in "
                                 "place: a pack without state has no cache")
            writes = sorted(set().union(*(c.state for c, _ in entries)))
            records.append((r, MethodRecord(name=r.name, entries=tuple(indices), positions=tuple(positions),
                                            writes=tuple(writes)), caps[0]))
            stages.say(f"      method {r.name}: entries {', '.join(map(str, indices))}"
                       + (f"; writes {len(writes)} state buffer(s)" if writes else "")
                       + (f"; cache positions in {', '.join(repr(p.input) for p in positions)}" if positions
                          else ""))
        if state_names:
            stages.say(f"      state: {len(state_names)} buffer(s) written in place, one copy shared by every method")
    return _Plan(flat, state_names, [], records)


def build_key(model: Any, example_inputs: tuple, *, example_kwargs: dict | None = None, dynamic_shapes: Any = None,
              specializations: Sequence = (), options: BuildOptions | None = None, cache_positions: Any = None) -> str:
    """The build cache key a build with these arguments would have (capture and guards only, no compile)."""
    options = (options or BuildOptions()).resolved()
    stages = _Stages(None, BuildReport(output=pathlib.Path(".")))
    entries, state_names, positions = _capture_and_guard(model, example_inputs, example_kwargs, dynamic_shapes,
                                                         specializations, options, stages, cache_positions)
    example_blobs: list[package.Blob] = []
    example = _example_record(entries[0][0], example_blobs)
    return cache_key(entries, options, example, example_blobs, toolchain.compiler_version(), state_names, positions)


def _build(model: Any, example_inputs: tuple, output: str | pathlib.Path, *, example_kwargs: dict | None,
           dynamic_shapes: Any, specializations: Sequence, options: BuildOptions | None,
           progress: ProgressFn | None, cache_positions: Any, cache: buildcache.BuildCache | None, source: str,
           threads: int | None, model_file: sourcekey.ModelFile | None, methods: Any = None) -> BuildReport:
    reset_peak_rss()
    options = (options or BuildOptions()).resolved()
    resolved = methods_mod.resolve(model, methods) if methods is not None else None
    if resolved is not None and (example_inputs is not None or example_kwargs or dynamic_shapes is not None
                                 or specializations or cache_positions is not None):
        raise BuildError("with methods, each method gives its own example inputs, example_kwargs, dynamic_shapes "
                         "(--dynamic), specializations and cache_positions (aotpack.Method); none may be given "
                         "for the whole build")
    if resolved is not None and len(resolved) == 1 and resolved[0].name == fmt.DEFAULT_METHOD \
            and resolved[0].is_forward:
        # forward alone: the pack of one forward, as if built without methods
        r = resolved[0]
        example_inputs, example_kwargs, dynamic_shapes = r.example_inputs, r.example_kwargs, r.dynamic_shapes
        specializations, cache_positions, resolved = r.specializations, r.cache_positions, None
    example_kwargs = dict(example_kwargs or {})
    report = BuildReport(output=pathlib.Path(output))
    stages = _Stages(progress, report)
    compiler = toolchain.compiler_version()
    if cache is not None and model_file is not None:
        calls = {"example_inputs": example_inputs, "example_kwargs": example_kwargs, "dynamic_shapes": dynamic_shapes,
                 "specializations": list(specializations), "cache_positions": cache_positions}
        if resolved is not None:
            calls = {"methods": [r.describe() for r in resolved]}
        start = time.perf_counter()
        report.source_key = source_key(model_file, model, calls, options, compiler, cache) or ""
        known = cache.recall(report.source_key) if report.source_key else None
        hit = cache.fetch(known, output) if known else None
        took = time.perf_counter() - start
        report.stages["source key"] = took
        if hit is not None:
            report.key, report.hit = known, "source"
            stages.say(f"      build cache: hit {known[:12]} by the source key {report.source_key[:12]} "
                       f"(key in {took:.2f} s, the model not captured), in {cache.folder}")
            stages.n = 3
            stages.say(f"[1-3/{stages.total}] capture, guards, compile: skipped, the build cache holds this pack")
            return _copied(report, hit, stages, progress)
        if report.source_key:
            stages.say(f"      build cache: source key {report.source_key[:12]} not found (key in {took:.2f} s); "
                       "capturing for the graph key")
        else:
            stages.say(f"      build cache: no source key ({', '.join(sourcekey.unseen(model_file)[:3])} loaded "
                       "before the model file by this process: its imports are unseen); capturing for the graph key")
    if resolved is None:
        plan = _Plan(*_capture_and_guard(model, example_inputs, example_kwargs, dynamic_shapes, specializations,
                                         options, stages, cache_positions))
    else:
        plan = _capture_methods(model, resolved, options, stages)
    entries, state_names, positions = plan.entries, plan.state_names, plan.positions
    example_blobs: list[package.Blob] = []
    method_records = None
    example = None
    if plan.methods is None:
        example = _example_record(entries[0][0], example_blobs)
    else:
        method_records = [dataclasses.replace(record, example=_example_record(first, example_blobs, r.name))
                          for r, record, first in plan.methods]
    if cache is not None:
        start = time.perf_counter()
        material = cache_material(entries, options, example, example_blobs, compiler, state_names, positions,
                                  methods=method_records)
        report.key = buildcache.key_of(material)
        took = time.perf_counter() - start
        hit = cache.fetch(report.key, output)
        if hit is not None:
            report.hit = "graph"
            stages.say(f"      build cache: hit {report.key[:12]} (key in {took:.2f} s), in {cache.folder}")
            if report.source_key:
                cache.remember(report.source_key, report.key)
            stages.n += 1
            stages.say(f"[{stages.n}/{stages.total}] compile: skipped, the build cache holds this pack")
            return _copied(report, hit, stages, progress)
        stages.say(f"      build cache: miss {report.key[:12]} (key in {took:.2f} s)")
    with stages.stage("compile", _compile_detail(options, len(entries))):
        compiled = compile.compile_entries([c for c, _, _ in entries], options, progress=stages.say,
                                           devices=[d for _, _, d in entries], threads=threads,
                                           stateful=bool(state_names),
                                           objects=None if cache is None else cache.objects())
    with stages.stage("package"):
        weights, blobs, state_values, unread = _weights([(c, g) for c, g, _ in entries], compiled, state_names,
                                                        by_identity=method_records is not None)
        manifest_entries = []
        for i, ((_, g, device), code) in enumerate(zip(entries, compiled)):
            library = fmt.library_blob(i)
            blobs.append(package.Blob(library, code.library))
            sources = [fmt.source_blob(i, n) for n in sorted(code.sources)]
            blobs += [package.Blob(name, code.sources[n]) for name, n in zip(sources, sorted(code.sources))]
            extern = None
            if code.extern_kernels is not None:
                extern = fmt.extern_kernels_blob(i)
                blobs.append(package.Blob(extern, code.extern_kernels))
            cuda = _cuda_record(i, code, options, blobs) if device == "cuda" else None
            manifest_entries.append(EntryRecord(name=str(i), device=device, library=library,
                                                constants=dict(code.constants), guards=_guards_on(g, device),
                                                kernels=tuple(code.kernels), sources=tuple(sources),
                                                extern_kernels=extern, cuda=cuda,
                                                packed_weights=dict(code.packed_weights),
                                                folded_weights=dict(code.folded_weights)))
        blobs += example_blobs
        if any(d == "cuda" for _, _, d in entries):
            stages.say(_cuda_summary(manifest_entries, options))
        buffers = []
        if state_names:
            buffers, state_blobs = state.state_records(state_values)
            blobs += state_blobs
        # each method's example and cache positions are its own (none at the top level)
        manifest = Manifest(format_version=0, producer=producer(compiler), target=target(options),
                            options=options.to_json(), weights=tuple(weights), entries=tuple(manifest_entries),
                            example=example, blobs=(), state=tuple(buffers), positions=tuple(positions),
                            methods=tuple(method_records or ()), unread_weights=tuple(unread),
                            frozen={"training": entries[0][0].training})
        staging = report.output.with_name(f".{report.output.name}.{os.getpid()}.building")
        try:
            report.size = package.write_archive(staging, manifest, blobs, options.compression_level)
            if state_names and "cpu" in options.devices:
                sequence = None
                if plan.methods is not None:
                    sequence = state.crossing_sequence([(r.name, r.call, r.example_inputs, r.example_kwargs)
                                                        for r, _, _ in plan.methods])
                state.check_against_eager(model, str(staging), example_inputs, example_kwargs, state_names,
                                          stages.say, sequence=sequence)
            elif state_names:
                stages.say("      state: not checked against eager here (the pack has no CPU entry); run it "
                           "against eager on its GPU before serving it")
            os.replace(staging, report.output)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staging)
    report.entries = len(entries)
    report.weights = len(weights)
    report.weight_bytes = sum(b.size for b in blobs if b.name.startswith("weights/"))
    report.kernels = sum(len(c.kernels) for c in compiled)
    report.peak_rss = peak_rss()
    report.worker_peak_rss = max((c.peak_rss for c in compiled), default=0)
    if cache is not None and cache.store(report.key, output, {"source": source, "options": options.to_json(),
                                                              "producer": producer(compiler),
                                                              "material": material}) is not None:
        stages.say(f"      build cache: stored {report.key[:12]} in {cache.folder}")
        cache.remember_manifest(output, report.key)
        if report.source_key:
            cache.remember(report.source_key, report.key)
    if options.without_gpu and progress:
        progress("note: CUDA entries built without a GPU are not autotuned and were never run; smoke-test the "
                 "pack on the target GPU before trusting it")
    if progress:
        progress(report.summary())
    return report
