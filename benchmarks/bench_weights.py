"""New weights without a rebuild: ``aotpack reweight`` against a full build, and ``Package.load_weights``
against the size of the weights, on the Llama-shaped models of bench_big.py.

Run from the repository root (it needs transformers, from the test extras)::

    .venv/bin/python benchmarks/bench_weights.py [--sizes 0.1GB,0.6GB,2.5GB] [--repeats 3]

For each size it builds the model (random weights, seed 0) in full, without the build cache, and writes
other weights of the same model to a safetensors file; then, each in a fresh process (medians of
``--repeats``):

1. the full build's time (once) and ``reweight``'s time for the same model with the other weights (the
   same bytes as a full build of them; it reads, hashes and writes the weights), both without the build
   cache, each writing a new file, each reweight after ``sync`` (the files written before are on disk);
2. ``load_weights(file)`` on a loaded pack: its time, and how much the process's peak RSS grew during it,
   next to the weights' size; then the first call's time (it reads the new weights' pages);
3. ``load_weights(state_dict)`` (a mapping, whose tensors are copied): its time and peak RSS growth;
4. a fine-tune's first output from a fresh process (from the process's start, ``import torch`` included):
   the base pack built with ``--weights external`` loaded with the other weights file
   (``load(pack, weights=FILE, weights_sha256=...)``), next to the base pack with its own weights.

Writes ``benchmarks/results-weights.md`` and ``results-weights.json``. Packs and files live in
``benchmarks/.work-weights/``, removed at the end.
"""
from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work-weights"
SIZES = ("0.1GB", "0.6GB", "2.5GB")
GB = 1e9


def _rss() -> tuple[int, int]:
    """(current, peak) resident memory of this process, bytes."""
    with open("/proc/self/status") as f:
        fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.startswith(("VmRSS", "VmHWM"))}
    return fields["VmRSS"], fields["VmHWM"]


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS to the current RSS (Linux)
        f.write("5")


# -- child modes: one measurement per fresh process ---------------------------------------------------

def child_prepare(size: str, base: str, new_weights: str, ref: str) -> dict:
    import torch

    import aotpack
    from _big_child import make_model
    from aotpack_runtime import safetensors_file as stf

    model, ids = make_model(size)
    start = time.perf_counter()
    aotpack.build(model, (ids,), base, cache=False)
    build_s = time.perf_counter() - start
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.02, 0.02, generator=gen)
        logits = model(ids)
    state = {k: v for k, v in model.state_dict().items() if "rotary_emb" not in k}
    stf.write(new_weights, state)
    torch.save({"ids": ids, "logits": logits}, ref)
    # The same build with its weights beside it, and the fine-tune's full weights file for it.
    from aotpack.reweight import externalize, reweight
    from aotpack_runtime.archive import Archive
    from aotpack_runtime.weights import load_weights

    folder = Path(base).parent
    reweight(base, new_weights, folder / "tune.pack", cache=False)
    stf.write(folder / "tune-full.safetensors", load_weights(Archive.open(str(folder / "tune.pack")), checked=False))
    shutil.copyfile(base, folder / "ext.pack")
    externalize(folder / "ext.pack")
    return {"build_s": build_s, "weight_bytes": sum(v.numel() * v.element_size() for v in state.values())}


def child_reweight(base: str, new_weights: str, out: str) -> dict:
    from aotpack.reweight import reweight

    start = time.perf_counter()
    reweight(base, new_weights, out, cache=False)  # as the full build: without the build cache
    return {"seconds": time.perf_counter() - start, "peak_rss": _rss()[1]}


def child_load_weights(base: str, source: str, ref: str) -> dict:
    import torch

    import aotpack

    data = torch.load(ref)
    pkg = aotpack.load(base)
    if source == "mapping":
        from aotpack_runtime import safetensors_file as stf

        given = {k: v.clone() for k, v in stf.read(Path(ref).with_name("new.safetensors")).items()}
    else:
        given = source
    rss, _ = _rss()
    _reset_peak()
    start = time.perf_counter()
    pkg.load_weights(given)
    seconds = time.perf_counter() - start
    grew = _rss()[1] - rss
    start = time.perf_counter()
    with torch.inference_mode():
        out = pkg(data["ids"])
    first = time.perf_counter() - start
    torch.testing.assert_close(out, data["logits"], rtol=1e-4, atol=1e-4)
    return {"seconds": seconds, "peak_growth": grew, "first_call_s": first}


def child_first_output(pack: str, weights: str, ref: str, sha: str = "") -> dict:
    import torch

    import aotpack

    data = torch.load(ref)
    if weights == "-":
        pkg = aotpack.load(pack)
    else:  # the fine-tune's hash, as its publisher pins it
        pkg = aotpack.load(pack, weights=weights, weights_sha256=sha)
    with torch.inference_mode():
        out = pkg(data["ids"])
    seconds = time.perf_counter() - T0
    torch.testing.assert_close(out, data["logits"], rtol=1e-4, atol=1e-4)
    return {"seconds": seconds}


def _child(mode: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, *args], capture_output=True, text=True,
                         cwd=str(HERE))
    if out.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(size: str, repeats: int) -> dict:
    folder = WORK / size
    folder.mkdir(parents=True, exist_ok=True)
    base, new, ref = folder / "base.pack", folder / "new.safetensors", folder / "ref.pt"
    prep = _child("prepare", size, str(base), str(new), str(ref))
    rew = []
    for _ in range(repeats):  # each run writes a new file, as the full build did (replacing one frees its pages)
        (folder / "re.pack").unlink(missing_ok=True)
        os.sync()  # and starts with no write of an earlier step pending, as the full build did
        rew.append(_child("reweight", str(base), str(new), str(folder / "re.pack")))
    from_file = [_child("load_weights", str(base), str(new), str(ref)) for _ in range(repeats)]
    from_map = [_child("load_weights", str(base), "mapping", str(ref)) for _ in range(repeats)]
    # One load first (records the checks), then the fresh processes measured.
    tune = str(folder / "tune-full.safetensors")
    import hashlib

    with open(tune, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    _child("first_output", str(folder / "ext.pack"), tune, str(ref), sha)
    _child("first_output", str(folder / "tune.pack"), "-", str(ref))
    first_ext = [_child("first_output", str(folder / "ext.pack"), tune, str(ref), sha) for _ in range(repeats)]
    first_own = [_child("first_output", str(folder / "tune.pack"), "-", str(ref)) for _ in range(repeats)]
    med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
    return {"size": size, "weight_bytes": prep["weight_bytes"], "build_s": prep["build_s"],
            "reweight_s": med(rew, "seconds"), "reweight_peak_rss": med(rew, "peak_rss"),
            "load_file_s": med(from_file, "seconds"), "load_file_growth": med(from_file, "peak_growth"),
            "first_call_after_file_s": med(from_file, "first_call_s"),
            "load_mapping_s": med(from_map, "seconds"), "load_mapping_growth": med(from_map, "peak_growth"),
            "first_output_external_s": med(first_ext, "seconds"), "first_output_own_s": med(first_own, "seconds")}


def table(rows: list[dict]) -> str:
    lines = ["| model | weights (GB) | full build (s) | reweight (s, % of build) | load_weights(file) (s) | "
             "its peak RSS growth (GB) | first call after (s) | load_weights(state_dict) (s) | its peak RSS growth (GB) | "
             "fine-tune's first output, fresh process: external weights / reweighted pack (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| Llama {r['size']} | {r['weight_bytes'] / GB:.2f} | {r['build_s']:.1f} | {r['reweight_s']:.2f} "
                     f"({100 * r['reweight_s'] / r['build_s']:.1f}%) | {r['load_file_s']:.3f} | "
                     f"{r['load_file_growth'] / GB:.3f} | {r['first_call_after_file_s']:.3f} | "
                     f"{r['load_mapping_s']:.3f} | {r['load_mapping_growth'] / GB:.3f} | "
                     f"{r['first_output_external_s']:.2f} / {r['first_output_own_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sys.path.insert(0, str(HERE))
        mode, args = sys.argv[2], sys.argv[3:]
        print(json.dumps({"prepare": child_prepare, "reweight": child_reweight, "load_weights": child_load_weights,
                          "first_output": child_first_output}[mode](*args)))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args()
    os.environ.setdefault("AOTPACK_CACHE_DIR", str(WORK / "cache"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(WORK / "inductor"))
    try:
        rows = [measure(size, opts.repeats) for size in opts.sizes.split(",")]
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = (f"New weights without a rebuild ({stamp}; {platform.machine()}, {os.cpu_count()} cores, load "
            f"{os.getloadavg()[0]:.1f}; medians of {opts.repeats} fresh processes)\n\n")
    (HERE / "results-weights.md").write_text(head + table(rows))
    (HERE / "results-weights.json").write_text(json.dumps({"when": stamp, "load": os.getloadavg()[0],
                                                           "rows": rows}, indent=2) + "\n")
    print(head + table(rows))


if __name__ == "__main__":
    main()
