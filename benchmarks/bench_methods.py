"""Packs of several methods against one-method packs, AOTInductor and eager.

- T5 (tests/programs.py: d_model 32, 2+2 layers, transformers' seq2seq export wrappers, cache 32): decode
  tokens per second through the pack's ``decode``, through two AOTInductor packages (``encode`` and
  ``decode``, each ``torch.export``-ed and compiled by ``aoti_compile_and_package``; the decoder's
  self-attention cache stays in its package as mutated buffers, the encoder output is passed by hand) and
  eager; the pack's size against an encode-only plus a decode-only pack (the embedding is read by both).
- Whisper (d_model 32, 2+2 layers, cache 16) as two programs: transformers' static-cache decoder wrapper (the
  encoder output goes to every decode step, which projects it into cross-attention keys and values again),
  and ``WhisperCrossCached``, whose ``encode`` writes those keys and values into the state once. Against two
  AOTInductor packages of each: the wrapper's as T5's; the cross-cached program's encode package returns the
  keys and values and its decode package takes them as inputs at every call (two packages share no buffers:
  the state is carried by hand), copying them into its own buffers. Also the wrapper pack's size against an
  encode-only plus a decode-only pack and against the two AOTInductor packages.
- The tiny Llama of examples/llm (hidden 64, 2 layers, cache 64): decode through the one-token ``decode``
  method of a prefill+decode pack, through today's single dynamic entry (examples/llm/llama.py) and eager;
  the size of the prefill+decode pack against a prefill-only plus a decode-only pack.
- For each pack with state: the time to open a session (lazy, and with its state allocated), the resident
  memory 100 held sessions add per session (allocated, then after one call of each method on its example
  inputs), the state's bytes; for AOTInductor, whose loaded package holds
  one state, the time and memory of a second load (a second state).

    .venv/bin/python benchmarks/bench_methods.py --threads 1 [--steps 200] [--models t5,whisper,llama]
        [--json benchmarks/results-methods.json] [--md benchmarks/results-methods.md]

Builds every pack and package into a temporary folder without the build cache: about 15 minutes on a
loaded 2-core host.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "llm"))


def _decode_rates(steps: dict, calls: dict, start: int, rounds: int = 7) -> dict:
    """Tokens per second of each ``step(ids, pos)`` (name -> function) for one token at a time: the median of
    ``rounds`` runs of ``calls[name]`` tokens, the contenders taking turns in each round (so that a busy
    moment of the host does not fall on one of them only)."""
    rates: dict = {name: [] for name in steps}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, step in steps.items():
                t0 = time.perf_counter()
                for i in range(calls[name]):
                    step(torch.tensor([[7]]), torch.tensor([start + i % (60 - start)]))
                rates[name].append(calls[name] / (time.perf_counter() - t0))
    return {name: statistics.median(r) for name, r in rates.items()}


def _rss() -> int:
    """This process's resident memory, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _sessions(path: pathlib.Path, held: int = 100) -> dict:
    """What a session of the pack at ``path`` costs: the time to open one (lazy: the state is made at its first
    call; allocated: ``session(device="cpu")`` makes it at once), medians; the resident memory ``held``
    allocated sessions add, per session; the bytes of its state."""
    import aotpack

    pkg = aotpack.load(path)
    lazy, allocated = [], []
    for _ in range(2000):
        t0 = time.perf_counter()
        pkg.session()
        lazy.append(time.perf_counter() - t0)
    for _ in range(200):
        t0 = time.perf_counter()
        pkg.session(device="cpu")
        allocated.append(time.perf_counter() - t0)
    before = _rss()
    kept = [pkg.session(device="cpu") for _ in range(held)]
    grown = (_rss() - before) / len(kept)
    calls = [(name, *pkg.example_inputs(name)) for name in pkg.methods]
    before = _rss()
    with torch.inference_mode():
        for s in kept:  # each method once on its example inputs: the state written where they write it
            for name, args, kwargs in calls:
                getattr(s, name)(*args, **kwargs)
    used = (_rss() - before) / len(kept)
    return {"open_lazy_us": round(1e6 * statistics.median(lazy), 1),
            "open_allocated_us": round(1e6 * statistics.median(allocated), 1),
            "rss_per_session_bytes": round(grown), "rss_per_used_session_bytes": round(used),
            "state_bytes": sum(r.nbytes for r in pkg.manifest.state)}


class _Call(torch.nn.Module):
    """``fn(program, *args)`` as a module's ``forward``: what torch.export exports for one method."""

    def __init__(self, program: torch.nn.Module, fn):
        super().__init__()
        self.program, self.fn = program, fn

    def forward(self, *args):
        return self.fn(self.program, *args)


def _aoti(packages: dict, work: pathlib.Path, prefix: str) -> dict:
    """Each of ``packages`` (name -> (module, example args)) exported and compiled into its own AOTInductor
    package; name -> (the loaded package, its path, build seconds). Joint-graph constant folding is off, as in
    a pack's build: it folds a one-element buffer that is read and then written (a static cache's length) to
    its build-time value (pytorch/pytorch#165444)."""
    import torch._inductor.config as inductor_config
    from torch._inductor import aoti_compile_and_package, aoti_load_package

    out = {}
    for name, (module, args) in packages.items():
        path = work / f"{prefix}-{name}.pt2"
        t0 = time.perf_counter()
        with torch.no_grad():
            # strict: non-strict export lifts a static cache's length as a constant it then cannot write
            exported = torch.export.export(module, args, strict=True)
        with inductor_config.patch(joint_graph_constant_folding=False):
            aoti_compile_and_package(exported, package_path=str(path))
        seconds = time.perf_counter() - t0
        out[name] = (aoti_load_package(str(path)), path, seconds)
    return out


def _aoti_state_cost(path: pathlib.Path, loads: int = 3) -> dict:
    """An AOTInductor package holds one state (its mutated buffers are constants of the loaded model): a
    second, independent state is a second load. Its time (median) and the resident memory each adds."""
    from torch._inductor import aoti_load_package

    times, kept = [], []
    before = _rss()
    for _ in range(loads):
        t0 = time.perf_counter()
        kept.append(aoti_load_package(str(path)))
        times.append(time.perf_counter() - t0)
    return {"load_us": round(1e6 * statistics.median(times), 1), "rss_per_load_bytes": round((_rss() - before) / loads)}


def _race(contenders: dict, steps: int, limit: int, rounds: int = 7) -> dict:
    """Decode tokens per second of each ``step(ids, pos)``, one token per call at positions 0..limit-1 in turn:
    the median of ``rounds`` rounds, the contenders taking turns in each; eager runs fewer calls per round."""
    rates: dict = {name: [] for name in contenders}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, step in contenders.items():
                calls = max(20, steps // 5) if name.startswith("eager") else steps
                t0 = time.perf_counter()
                for i in range(calls):
                    step(torch.tensor([[7]]), torch.tensor([i % limit]))
                rates[name].append(calls / (time.perf_counter() - t0))
    return {name: round(statistics.median(r), 1) for name, r in rates.items()}


def _whisper(work: pathlib.Path, steps: int) -> dict:
    """The two Whisper programs: decode tokens per second through the pack, through two AOTInductor packages
    (``encode`` and ``decode``, state carried by hand where it can be) and eager; session costs; the wrapper
    pack's size against an encode-only and a decode-only pack, and against the two AOTInductor packages."""
    import aotpack

    sys.path.insert(0, str(ROOT / "tests"))
    import programs

    def wrapper_program():
        return programs.whisper_program()

    def cross_program():
        return programs.WhisperCrossCached(programs.whisper_model()).eval()

    features = programs.WHISPER_FEATURES
    paths = {"wrapper": work / "whisper.pack", "cross": work / "whisper-cross.pack",
             "encode only": work / "whisper-encode.pack", "decode only": work / "whisper-decode.pack"}
    build_s = {}
    for name, make in (("wrapper", wrapper_program), ("cross", cross_program)):
        program = make()
        t0 = time.perf_counter()
        aotpack.build(program, None, paths[name], methods=programs.whisper_methods(program, name == "cross"),
                      cache=False)
        build_s[name] = round(time.perf_counter() - t0, 1)
    for name in ("encode", "decode"):
        program = wrapper_program()
        aotpack.build(program, None, paths[f"{name} only"], methods={name: programs.whisper_methods(program)[name]},
                      cache=False)

    # AOTInductor: the wrapper program's decode keeps its self-attention cache as mutated buffers of the loaded
    # package (one state per load) and takes the encoder output as an input, as the pack's does. The
    # cross-cached program's two packages cannot share buffers: its encode returns the cross-attention keys
    # and values, and its decode takes them as inputs and copies them into its own buffers at every call.
    wrapper = wrapper_program()
    with torch.no_grad():
        hidden = wrapper.encode(features)
    cross = cross_program()
    n_layers = len(cross.model.decoder.layers)
    cross_names = [f"cross_{kind}_{i}" for i in range(n_layers) for kind in ("key", "value")]

    def cross_encode(p, f):
        h = p.encode(f)
        return (h, *[getattr(p, name).clone() for name in cross_names])

    def cross_decode(p, ids, pos, *kv):
        for name, t in zip(cross_names, kv):
            getattr(p, name).copy_(t)
        return p.decode(ids, pos)

    with torch.no_grad():
        encoded = cross_encode(cross_program(), features)
    aoti = _aoti({"encode": (_Call(wrapper_program(), lambda p, f: p.encode(f)), (features,)),
                  "decode": (_Call(wrapper_program(), lambda p, i, h, c: p.decode(i, h, c)),
                             (torch.tensor([[1]]), hidden, torch.tensor([0])))}, work, "whisper")
    aoti_cross = _aoti({"encode": (_Call(cross_program(), cross_encode), (features,)),
                        "decode": (_Call(cross_program(), cross_decode),
                                   (torch.tensor([[1]]), torch.tensor([0]), *encoded[1:]))}, work, "whisper-cross")

    s_wrapper, s_cross = aotpack.load(paths["wrapper"]).session(), aotpack.load(paths["cross"]).session()
    eager_wrapper, eager_cross = wrapper_program(), cross_program()
    with torch.inference_mode():
        pack_hidden = s_wrapper.encode(features)
        s_cross.encode(features)
        eager_hidden = eager_wrapper.encode(features)
        eager_cross.encode(features)
        aoti_hidden = aoti["encode"][0](features)
        kv = aoti_cross["encode"][0](features)[1:]
    check = _check_aoti_tokens(programs, aoti, aoti_cross, features)
    limit = programs.WHISPER_CACHE
    rates = _race({
        "pack, wrapper": lambda i, c: s_wrapper.decode(i, pack_hidden, c),
        "pack, cross-attention cache written by encode": lambda i, c: s_cross.decode(i, c),
        "AOTInductor, wrapper": lambda i, c: aoti["decode"][0](i, aoti_hidden, c),
        "AOTInductor, cross-attention keys and values by hand": lambda i, c: aoti_cross["decode"][0](i, c, *kv),
        "eager, wrapper": lambda i, c: eager_wrapper.decode(i, eager_hidden, c),
        "eager, cross-attention cache written by encode": lambda i, c: eager_cross.decode(i, c)}, steps, limit)
    sessions = {"wrapper": _sessions(paths["wrapper"]), "cross": _sessions(paths["cross"]),
                "AOTInductor decode, wrapper": _aoti_state_cost(aoti["decode"][1])}
    sizes = {name: os.path.getsize(path) for name, path in paths.items()}
    sizes.update({f"AOTInductor {name}": os.path.getsize(entry[1]) for name, entry in aoti.items()})
    sizes.update({f"AOTInductor cross {name}": os.path.getsize(entry[1]) for name, entry in aoti_cross.items()})
    build_s.update({f"AOTInductor {name}": round(entry[2], 1) for name, entry in aoti.items()})
    build_s.update({f"AOTInductor cross {name}": round(entry[2], 1) for name, entry in aoti_cross.items()})
    for path in [*paths.values(), *(e[1] for e in aoti.values()), *(e[1] for e in aoti_cross.values())]:
        path.unlink()
    return {"decode_tokens_per_s": rates, "aoti_tokens_equal_eager": check, "sessions": sessions,
            "pack_bytes": sizes, "build_s": build_s}


def _check_aoti_tokens(programs, aoti: dict, aoti_cross: dict, features: torch.Tensor) -> dict:
    """Whether 8 greedy tokens through each pair of AOTInductor packages equal eager's (a fresh program each)."""
    with torch.inference_mode():
        want = programs.greedy_whisper(*_methods(programs.whisper_program()), 8)[0]
        got = programs.greedy_whisper(aoti["encode"][0], aoti["decode"][0], 8)[0]
        kv: list = []

        def encode(f):
            out = aoti_cross["encode"][0](f)
            kv[:] = out[1:]
            return out[0]

        got_cross = programs.greedy_whisper(encode, lambda i, c: aoti_cross["decode"][0](i, c, *kv), 8,
                                            cross_cached=True)[0]
    return {"wrapper": got == want, "cross": got_cross == want}


def _methods(program) -> tuple:
    return program.encode, program.decode


def _t5(work: pathlib.Path, steps: int) -> dict:
    """T5 through transformers' seq2seq wrappers: decode tokens per second through the pack, two AOTInductor
    packages (the decoder's self-attention cache kept in its package, the encoder output by hand) and eager;
    a session's cost."""
    import aotpack

    sys.path.insert(0, str(ROOT / "tests"))
    import programs

    path = work / "t5.pack"
    program = programs.t5_program()
    t0 = time.perf_counter()
    aotpack.build(program, None, path, methods=programs.t5_methods(program), cache=False)
    build_s = {"pack": round(time.perf_counter() - t0, 1)}
    apart = {name: work / f"t5-{name}.pack" for name in ("encode", "decode")}
    for name, one in apart.items():
        program = programs.t5_program()
        aotpack.build(program, None, one, methods={name: programs.t5_methods(program)[name]}, cache=False)
    source = programs.T5_SOURCE
    with torch.no_grad():
        hidden = programs.t5_program().encode(source)
    aoti = _aoti({"encode": (_Call(programs.t5_program(), lambda p, x: p.encode(x)), (source,)),
                  "decode": (_Call(programs.t5_program(), lambda p, i, h, c: p.decode(i, h, c)),
                             (torch.tensor([[0]]), hidden, torch.tensor([0])))}, work, "t5")
    with torch.inference_mode():
        want = programs.greedy_t5(*_methods(programs.t5_program()), 8)[0]
        got = programs.greedy_t5(aoti["encode"][0], aoti["decode"][0], 8)[0]
    s, eager = aotpack.load(path).session(), programs.t5_program()
    with torch.inference_mode():
        pack_hidden, eager_hidden, aoti_hidden = s.encode(source), eager.encode(source), aoti["encode"][0](source)
    rates = _race({"pack": lambda i, c: s.decode(i, pack_hidden, c),
                   "AOTInductor": lambda i, c: aoti["decode"][0](i, aoti_hidden, c),
                   "eager": lambda i, c: eager.decode(i, eager_hidden, c)}, steps, 32)
    sizes = {"pack": os.path.getsize(path), **{f"{n} only": os.path.getsize(p) for n, p in apart.items()},
             **{f"AOTInductor {n}": os.path.getsize(e[1]) for n, e in aoti.items()}}
    build_s.update({f"AOTInductor {n}": round(e[2], 1) for n, e in aoti.items()})
    sessions = {"pack": _sessions(path), "AOTInductor decode": _aoti_state_cost(aoti["decode"][1])}
    for p in [path, *apart.values(), *(e[1] for e in aoti.values())]:
        p.unlink()
    return {"decode_tokens_per_s": rates, "aoti_tokens_equal_eager": got == want, "sessions": sessions,
            "pack_bytes": sizes, "build_s": build_s}


MODELS = ("t5", "whisper", "llama")  # in the order they run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--json", default=None, help="write the results here (after each model)")
    p.add_argument("--md", default=None, help="write the tables here (after each model)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--models", default=",".join(MODELS), help=f"which to measure, comma-separated: {', '.join(MODELS)}")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = set(args.models.split(","))
    if not models or models - set(MODELS):
        p.error(f"--models takes {', '.join(MODELS)}, got {args.models!r}")
    work = pathlib.Path(tempfile.mkdtemp(prefix="aotpack-bench-methods-"))
    started = time.perf_counter()
    result: dict = {"host": {"cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                             "load_average_before": os.getloadavg(),
                             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}}
    runs = {"t5": _t5, "whisper": _whisper, "llama": _llama}
    for name in MODELS:
        if name not in models:
            continue
        result[name] = runs[name](work, args.steps)
        result["host"]["load_average_after"] = os.getloadavg()
        result["host"]["minutes"] = round((time.perf_counter() - started) / 60, 1)
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        if args.md:
            pathlib.Path(args.md).write_text(markdown(result))
    print(json.dumps(result, indent=2))
    os.rmdir(work)
    return 0


def markdown(result: dict) -> str:
    """The results as the tables of benchmarks/results-methods.md."""
    h = result["host"]
    before, after = h["load_average_before"][0], h.get("load_average_after", h["load_average_before"])[0]
    lines = ["# Packs of several methods", "",
             f"{h['cores']} cores, torch {h['torch']}, {h['threads']} thread(s), {h['date']}; whole run "
             f"{h.get('minutes', '?')} min; load average {before:.1f} at the start, {after:.1f} at the end (other "
             "work on this machine). Decode: one token per call, the median of 7 rounds in which the contenders "
             "take turns. `benchmarks/bench_methods.py`, results in `results-methods.json`.", "",
             "| model | contender | decode tokens/s | vs eager |", "|---|---|---|---|"]
    for model in MODELS:
        if model not in result:
            continue
        rates = result[model]["decode_tokens_per_s"]
        eager = {k: v for k, v in rates.items() if k.startswith("eager")}
        for name, rate in rates.items():
            # the eager run of the same program (the cross-attention cache one, or the other)
            twin = next(v for k, v in eager.items() if ("cross" in k) == ("cross" in name))
            lines.append(f"| {model} | {name} | {rate:.0f} | {rate / twin:.1f}x |")
    lines += ["", "| model | program | open a session (us, lazy / allocated) | memory per session (RSS, 100 held: "
              "allocated / after one call of each method) | state |", "|---|---|---|---|---|"]
    # A session's state starts as zeros, pages the OS maps only when written: held unwritten, it adds nearly
    # nothing to the resident memory, whatever the state's size.
    for model in MODELS:
        for name, c in result.get(model, {}).get("sessions", {}).items():
            if "load_us" in c:
                lines.append(f"| {model} | {name}: a second state is a second load | {c['load_us'] / 1000:.0f} ms "
                             f"(load) | {c['rss_per_load_bytes'] / 1e6:.2f} MB per load | in the package |")
            else:
                used = c.get("rss_per_used_session_bytes")
                lines.append(f"| {model} | {name} | {c['open_lazy_us']:.1f} / {c['open_allocated_us']:.1f} | "
                             f"{c['rss_per_session_bytes'] / 1e3:.1f} KB / "
                             f"{'-' if used is None else f'{used / 1e3:.1f} KB'} | {c['state_bytes'] / 1e3:.1f} KB |")
    lines += ["", "| model | file | bytes | build (s) |", "|---|---|---|---|"]
    for model in MODELS:
        r = result.get(model, {})
        for name, size in r.get("pack_bytes", {}).items():
            lines.append(f"| {model} | {name} | {size:,} | {r.get('build_s', {}).get(name, '')} |")
    lines += ["", "A state of zeros is memory the OS maps when first written: 100 sessions held unwritten add "
              "near nothing; after one call of each method, what those calls wrote (one position of a cache) and "
              "what the calls allocate and keep. The state column is a session's whole state.", ""]
    for model in MODELS:
        r = result.get(model, {})
        sizes = r.get("pack_bytes", {})
        for whole, parts in (("methods", ("prefill", "decode")), ("wrapper", ("encode only", "decode only")),
                             ("wrapper", ("AOTInductor encode", "AOTInductor decode")),
                             ("pack", ("encode only", "decode only")), ("pack", ("AOTInductor encode", "AOTInductor decode"))):
            if whole in sizes and all(p in sizes for p in parts):
                apart = sum(sizes[p] for p in parts)
                lines.append(f"- {model}: the {'' if whole == 'pack' else whole + ' '}pack is {sizes[whole] / apart:.2f}x the sum of {' + '.join(parts)} "
                             f"({sizes[whole]:,} against {apart:,} bytes).")
        if "aoti_tokens_equal_eager" in r:
            lines.append(f"- {model}: greedy tokens through the AOTInductor packages equal eager's: "
                         f"{r['aoti_tokens_equal_eager']}.")
    return "\n".join(lines) + "\n"


def _llama(work: pathlib.Path, steps: int) -> dict:
    """Decode tokens per second through the prefill+decode pack's one-token method, through one dynamic entry
    and eager; the pack's size against a prefill-only and a decode-only pack."""
    import aotpack
    import llama_methods
    from decoders import model_file, wrapped

    packs = {name: work / f"{name}.pack" for name in ("methods", "single", "prefill", "decode")}
    build_s = {}
    t0 = time.perf_counter()
    aotpack.build(llama_methods.model, None, packs["methods"], methods=llama_methods.methods, cache=False)
    build_s["methods"] = time.perf_counter() - t0
    wrapper, inputs, kwargs, dynamic = model_file("llama")
    t0 = time.perf_counter()
    aotpack.build(wrapper, inputs, packs["single"], example_kwargs=kwargs, dynamic_shapes=dynamic, cache=False)
    build_s["single"] = time.perf_counter() - t0
    for name in ("prefill", "decode"):
        aotpack.build(llama_methods.model, None, packs[name], methods={name: llama_methods.methods[name]},
                      cache=False)
    prompt = torch.tensor([[5, 17, 42, 8]])
    pkg = aotpack.load(packs["methods"])
    s = pkg.session()
    single = aotpack.load(packs["single"]).session()
    _, eager = wrapped("llama")
    with torch.inference_mode():
        s.prefill(input_ids=prompt, cache_position=torch.tensor([0]))
        single(input_ids=prompt, cache_position=torch.tensor([0]))
        eager(input_ids=prompt, cache_position=torch.tensor([0]))
    sessions = {"prefill+decode pack": _sessions(packs["methods"])}
    rates = _decode_rates({"pack, decode method": lambda i, c: s.decode(input_ids=i, cache_position=c),
                           "pack, one dynamic entry": lambda i, c: single(input_ids=i, cache_position=c),
                           "eager": lambda i, c: eager(input_ids=i, cache_position=c)},
                          {"pack, decode method": steps, "pack, one dynamic entry": steps,
                           "eager": max(20, steps // 10)}, 4)
    sizes = {name: os.path.getsize(path) for name, path in packs.items()}
    for path in packs.values():
        path.unlink(missing_ok=True)
    apart = sizes["prefill"] + sizes["decode"]
    print(f"prefill+decode pack {sizes['methods']:,} bytes; prefill-only + decode-only {apart:,} bytes "
          f"({sizes['methods'] / apart:.2f}x)")
    return {"decode_tokens_per_s": {k: round(v, 1) for k, v in rates.items()}, "sessions": sessions,
            "pack_bytes": sizes, "build_s": {k: round(v, 1) for k, v in build_s.items()}}


if __name__ == "__main__":
    sys.exit(main())
