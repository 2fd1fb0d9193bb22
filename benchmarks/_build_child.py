"""One timed build in a fresh process, run by bench_build.py: ``python _build_child.py MODE MODEL OUT RESULT``.

``aotpack``: the build pipeline with the build cache in ``AOTPACK_BENCH_CACHE`` (``AOTPACK_BENCH_NO_CACHE=1``:
without one; ``AOTPACK_BENCH_THREADS``: the compiler processes at once). ``aoti``: ``torch.export.export``
then ``aoti_compile_and_package`` with Inductor's defaults. Writes ``{"seconds", "phases"}``: seconds from the model file's import to the written
file, and for aotpack the stages and each compiler call.
"""
import importlib.util
import json
import os
import sys
import time


def load(path):
    spec = importlib.util.spec_from_file_location("bench_model", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.model, module.example_inputs, getattr(module, "example_kwargs", None) or {}


def timed_compiler(phases):
    """Record each compiler call Inductor makes (by the file it builds) and the precompiled-header step."""
    from torch._inductor import codecache, cpp_builder

    build = cpp_builder.CppBuilder.build
    names = {".wrapper": "g++ wrapper -O1", ".kernel": "g++ kernels -O3", ".weights": "g++ weights"}

    def timed_build(self):
        start = time.perf_counter()
        build(self)
        kind = "g++ link" if not self._compile_only else next(
            (v for k, v in names.items() if self._name.endswith(k)), "g++ other")
        if self._precompiling or self._preprocessing:
            return
        phases[kind] = phases.get(kind, 0.0) + time.perf_counter() - start

    header = codecache._precompile_header

    def timed_header(*args, **kwargs):
        start = time.perf_counter()
        try:
            return header(*args, **kwargs)
        finally:
            phases["precompiled headers"] = phases.get("precompiled headers", 0.0) + time.perf_counter() - start

    cpp_builder.CppBuilder.build = timed_build
    codecache._precompile_header = timed_header


def main():
    mode, model_file, out, result = sys.argv[1:5]
    import torch

    phases = {}
    start = time.perf_counter()
    model, args, kwargs = load(model_file)
    if mode == "aotpack":
        timed_compiler(phases)
        from aotpack.buildcache import BuildCache
        from aotpack.options import BuildOptions
        from aotpack.pipeline import build

        threads = os.environ.get("AOTPACK_BENCH_THREADS")
        lines = []
        cache = None if os.environ.get("AOTPACK_BENCH_NO_CACHE") else BuildCache.open(os.environ["AOTPACK_BENCH_CACHE"])
        report = build(model, args, out, example_kwargs=kwargs, options=BuildOptions(), cache=cache,
                       threads=int(threads) if threads else None, progress=lines.append)
        phases.update(report.stages)
        for line in lines:
            if "build cache:" in line and "key in" in line:
                phases["key"] = float(line.split("key in ")[1].split(" s")[0])
        if "compile" in phases:
            compilers = sum(v for k, v in phases.items() if k.startswith("g++") or k == "precompiled headers")
            phases["Inductor codegen"] = phases["compile"] - compilers  # exact when the compiles do not overlap
    else:
        from torch._inductor import aoti_compile_and_package

        with torch.no_grad():
            ep = torch.export.export(model, args, kwargs)
            aoti_compile_and_package(ep, package_path=out + ".pt2")  # AOTInductor wants the .pt2 suffix
    seconds = time.perf_counter() - start
    with open(result, "w") as f:
        json.dump({"seconds": seconds, "phases": phases}, f)


if __name__ == "__main__":
    main()
