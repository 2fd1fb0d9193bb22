"""One measurement in a fresh process, run by bench.py: ``python _child.py MODE RESULT_JSON ARGS...``.

Timed modes (``import_torch``, ``eager``, ``aotpack``, ``compile``, ``aoti``) measure from the first line of
this file, before ``import torch``, to the first output, and write ``{"ms", "maxrss_mb"}``. ``build`` writes
the pack, the AOTInductor package and the example inputs; ``latency`` times repeated calls in one process.
"""
import time

T0 = time.perf_counter()

import importlib.util  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402


def load_example(path):
    """Import an example file as a module; return (model, args, kwargs)."""
    spec = importlib.util.spec_from_file_location("bench_example", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Dynamo looks a function's globals up through sys.modules
    spec.loader.exec_module(module)
    return module.model, module.example_inputs, getattr(module, "example_kwargs", None) or {}


def first_call(fn, args, kwargs):
    import torch

    with torch.inference_mode():
        fn(*args, **kwargs)


# -- timed modes: everything up to the first output counts ---------------------------------------

def run_import_torch():
    import torch  # noqa: F401


def run_eager(example):
    model, args, kwargs = load_example(example)
    first_call(model, args, kwargs)


def run_aotpack(pack):
    import aotpack

    pkg = aotpack.load(pack)
    args, kwargs = pkg.example_inputs()
    first_call(pkg, args, kwargs)


def run_compile(example):
    import torch

    model, args, kwargs = load_example(example)
    first_call(torch.compile(model), args, kwargs)


def run_aoti(pt2, inputs):
    import torch
    import torch._inductor

    compiled = torch._inductor.aoti_load_package(pt2)
    args, kwargs = torch.load(inputs, weights_only=True)
    first_call(compiled, args, kwargs)


TIMED = {"import_torch": run_import_torch, "eager": run_eager, "aotpack": run_aotpack,
         "compile": run_compile, "aoti": run_aoti}


# -- build: the pack, the AOTInductor package and the inputs the AOTInductor child loads ----------

def attempt(fn):
    """``{"seconds": ...}`` if ``fn()`` succeeds, else ``{"error": ...}``."""
    start = time.perf_counter()
    try:
        fn()
    except Exception as e:
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"}
    return {"seconds": time.perf_counter() - start}


def run_build(example, pack, pt2, inputs):
    import torch
    import torch._inductor

    import aotpack

    model, args, kwargs = load_example(example)
    torch.save((args, kwargs), inputs)

    def aoti():
        exported = torch.export.export(model, args, kwargs)
        torch._inductor.aoti_compile_and_package(exported, package_path=pt2)

    return {"aotpack": attempt(lambda: aotpack.build(model, args, pack, example_kwargs=kwargs)),
            "aoti": attempt(aoti)}


# -- latency: per-call medians in one process ---------------------------------------------------

def max_abs_diff(out, ref):
    import torch.utils._pytree as pytree

    pairs = zip(pytree.tree_leaves(out), pytree.tree_leaves(ref))
    return max(((a - b).abs().max().item() for a, b in pairs if hasattr(b, "abs")), default=0.0)


def latency_variants(example, pack, pt2, errors):
    """Zero-argument callables to time, by name; a variant that cannot be set up goes to ``errors``."""
    import torch
    import torch._inductor

    import aotpack

    model, args, kwargs = load_example(example)
    variants = {"eager": lambda: model(*args, **kwargs)}

    def add(name, make):
        try:
            fn = make()
            fn()  # first call: compiles (torch.compile) or fails here rather than inside the timing loop
            variants[name] = fn
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {e}"

    def compiled():
        fn = torch.compile(model)
        return lambda: fn(*args, **kwargs)

    def aoti():
        fn = torch._inductor.aoti_load_package(pt2)
        return lambda: fn(*args, **kwargs)

    pkg = None

    def package():
        nonlocal pkg
        pkg = aotpack.load(pack)
        return lambda: pkg(*args, **kwargs)

    def entry_run():
        entry = pkg.entries[0]
        tensors = entry.guards.match(args, kwargs)
        if tensors is None:
            raise RuntimeError("the pack's guards reject the example inputs")
        return lambda: entry.run(tensors)

    def guard_match():
        entry = pkg.entries[0]
        return lambda: entry.guards.match(args, kwargs)

    add("torch_compile", compiled)
    add("aoti", aoti)
    add("aotpack", package)
    if pkg is None:
        errors.update(aotpack_entry_run="the pack did not load", aotpack_guard_match="the pack did not load")
    else:
        add("aotpack_entry_run", entry_run)
        add("aotpack_guard_match", guard_match)
    return variants


def run_latency(example, pack, pt2, calls, warmup, rounds=5):
    """Median µs per call; variants take turns in ``rounds`` so that machine noise hits them alike."""
    import torch

    errors = {}
    with torch.inference_mode():
        variants = latency_variants(example, pack, pt2, errors)
        samples = {name: [] for name in variants}
        for fn in variants.values():
            for _ in range(warmup):
                fn()
        for _ in range(rounds):
            for name, fn in variants.items():
                for _ in range(max(1, calls // rounds)):
                    start = time.perf_counter()
                    fn()
                    samples[name].append(time.perf_counter() - start)
        ref = variants["eager"]()
        result = {name: {"median_us": 1e6 * statistics.median(s), "calls": len(s)} for name, s in samples.items()}
        for name in ("torch_compile", "aoti", "aotpack", "aotpack_entry_run"):
            if name in variants:
                result[name]["max_abs_diff_vs_eager"] = max_abs_diff(variants[name](), ref)
    result.update({name: {"error": err} for name, err in errors.items()})
    return result


def main(mode, result_path, *argv):
    if mode in TIMED:
        TIMED[mode](*argv)
        ms = 1e3 * (time.perf_counter() - T0)
        result = {"ms": ms, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    elif mode == "build":
        result = run_build(*argv)
    elif mode == "latency":
        example, pack, pt2, calls, warmup = argv
        result = run_latency(example, pack, pt2, int(calls), int(warmup))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
