"""The build pipeline: capture → guards → compile → package, each stage timed and reported."""
from __future__ import annotations

import contextlib
import pathlib
import platform as _platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from aotpack_runtime.errors import BuildError
from aotpack_runtime.guards import dtype_name
from aotpack_runtime.platform import KNOWN_FLAGS, host_cpu_flags, host_machine, torch_minor

from . import __version__, capture, compile, guards, package
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

    def summary(self) -> str:
        total = sum(self.stages.values())
        return (f"wrote {self.output} ({self.size / 1e6:.2f} MB): {self.entries} entr"
                f"{'y' if self.entries == 1 else 'ies'}, {self.weights} weights ({self.weight_bytes / 1e6:.2f} MB), "
                f"{self.kernels} kernels, built in {total:.1f} s")


class _Stages:
    def __init__(self, progress: ProgressFn | None, report: BuildReport):
        self.progress = progress
        self.report = report
        self.n = 0

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        self.n += 1
        if self.progress:
            self.progress(f"[{self.n}/4] {name}{': ' + detail if detail else ''} ...")
        start = time.perf_counter()
        yield
        took = time.perf_counter() - start
        self.report.stages[name] = self.report.stages.get(name, 0.0) + took
        if self.progress:
            self.progress(f"[{self.n}/4] {name} done in {took:.1f} s")


def producer(compiler: str) -> dict:
    return {"aotpack": __version__, "torch": torch.__version__, "python": _platform.python_version(),
            "compiler": compiler, "platform": f"{sys.platform}-{host_machine()}"}


def target(options: BuildOptions) -> dict:
    t = {"machine": host_machine(), "cpu_isa": options.cpu_isa, "torch_series": torch_minor(torch.__version__)}
    if options.cpu_isa == "native":
        t["cpu_flags"] = sorted(f for f in host_cpu_flags() if f in KNOWN_FLAGS)
    return t


def _example_record(captured: capture.Captured, blobs: list) -> dict:
    flat, treespec = guards._torch.tree_flatten((captured.args, captured.kwargs))
    spec = guards.spec_to_json(treespec, "inputs")
    leaves = []
    for v in flat:
        if isinstance(v, torch.Tensor):
            name = f"example/{len(leaves)}"
            blobs.append(package.Blob(name, package.tensor_bytes(v)))
            leaves.append({"kind": "tensor", "blob": name, "dtype": dtype_name(v.dtype), "shape": list(v.shape),
                           "strides": list(v.contiguous().stride() if v.numel() == 0 else v.stride())})
        else:
            leaves.append({"kind": "value", "value": v})
    return {"inputs": spec, "leaves": leaves}


def build(model: Any, example_inputs: tuple, output: str | pathlib.Path, *, example_kwargs: dict | None = None,
          options: BuildOptions | None = None, progress: ProgressFn | None = None) -> BuildReport:
    """Run the whole pipeline; return a :class:`BuildReport`. ``progress`` receives one line per event."""
    options = (options or BuildOptions()).resolved()
    report = BuildReport(output=pathlib.Path(output))
    stages = _Stages(progress, report)
    compiler = compile.compiler_version()
    with stages.stage("capture", "Dynamo, fullgraph"):
        captured = capture.capture(model, example_inputs, example_kwargs)
    with stages.stage("guards"):
        entry_guards = guards.derive(captured)
    with stages.stage("compile", f"Inductor C++ for {options.cpu_isa}"):
        compiled = compile.compile_entry(captured, options)
    with stages.stage("package"):
        ep = captured.exported
        state = {**{k: v for k, v in ep.state_dict.items()}, **{k: v for k, v in ep.constants.items()}}
        used = sorted(set(compiled.constants.values()))
        missing = [name for name in used if not isinstance(state.get(name), torch.Tensor)]
        if missing:
            raise BuildError(f"the compiled code needs constants the model does not have: {missing}")
        blobs: list[package.Blob] = []
        weights = []
        for i, name in enumerate(used):
            t = state[name]
            blob = f"weights/{i}"
            blobs.append(package.Blob(blob, package.tensor_bytes(t)))
            weights.append({"name": name, "blob": blob, "dtype": dtype_name(t.dtype), "shape": list(t.shape)})
        entry = {"name": "0", "device": "cpu", "library": "code/0.so", "constants": compiled.constants,
                 "kernels": list(compiled.kernels), **entry_guards.to_json(),
                 "sources": [f"source/0/{n}" for n in sorted(compiled.sources)]}
        blobs.append(package.Blob("code/0.so", compiled.library))
        for n in sorted(compiled.sources):
            blobs.append(package.Blob(f"source/0/{n}", compiled.sources[n]))
        example = _example_record(captured, blobs)
        manifest = {"producer": producer(compiler), "target": target(options), "options": options.to_json(),
                    "weights": weights, "entries": [entry], "example": example,
                    "frozen": {"training": captured.training}}
        report.size = package.write_archive(output, manifest, blobs, options.compression_level)
    report.entries = 1
    report.weights = len(weights)
    report.weight_bytes = sum(len(b.data) for b in blobs if b.name.startswith("weights/"))
    report.kernels = len(compiled.kernels)
    if progress:
        progress(report.summary())
    return report
