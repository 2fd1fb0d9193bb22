"""``aotpack``: build, inspect, sign, verify and run packs; export and replace their weights.

Exit codes: 0 success, 1 an aotpack error (the message says what and how to fix it; ``--debug`` adds the
traceback), 2 a usage error. The build side's compiler stack is imported only by ``build``, and the
signing package only by ``sign`` (and ``verify --certificate-chain``): ``inspect`` and ``run`` use the runtime
alone.

May not: build or check packs itself: ``build`` goes through ``aotpack.front`` (as ``aotpack.build`` does), the
other commands through the runtime and the build side's modules; this is where errors become exit codes.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
import traceback
from importlib import metadata

import click

import aotpack_runtime as rt
from aotpack_runtime.archive import Archive
from aotpack_runtime.describe import describe, render
from aotpack_runtime.errors import ModelFileError
from aotpack_runtime.format import CPU_ISAS, DEVICES


def _version_text() -> str:
    def v(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    return (f"aotpack {v('aotpack')}\ntorch {v('torch')}\ntriton {v('triton')}\n"
            f"python {platform.python_version()}")


class _Group(click.Group):
    """Turns aotpack errors into exit code 1 with a one-line message (traceback with --debug)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except rt.AotpackError as e:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            click.echo(f"error: {e}", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(message=_version_text(), version="", prog_name="aotpack")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Ahead-of-time export and packaging for PyTorch models: compile once, ship one file."""
    ctx.obj = {"debug": debug}
    _plain_warnings()


def _plain_warnings() -> None:
    """aotpack's own warnings as one line each (``warning: ...``), without a source line."""
    import warnings

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, rt.AotpackWarning):
            click.echo(f"warning: {message}", err=True)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


@cli.command()
@click.argument("target", metavar="FILE.py[:NAME]")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Path of the pack to write.")
@click.option("--cpu-isa", type=click.Choice(CPU_ISAS), default=None,
              help="Instruction set of the CPU code (default: avx2 where the host has it, else x86-64).")
@click.option("--dynamic", "dynamic", multiple=True, metavar="INPUT:DIM=[NAME:]MIN..[MAX]",
              help="Make a dimension dynamic, e.g. x:0=1..64, x:0=batch:1..64, or x:0=2.. for no upper bound (the "
                   "same NAME on several inputs means equal sizes). Repeatable; replaces the file's "
                   "dynamic_shapes.")
@click.option("--device", "devices", multiple=True, type=click.Choice(DEVICES),
              help="Kind of entries to build: cpu (default), cuda, or both (--device cpu --device cuda); "
                   "CUDA needs the CUDA build of torch.")
@click.option("--cuda-arch", "cuda_archs", multiple=True, metavar="ARCHS",
              help="Compute capabilities of the CUDA code, e.g. 80,90: SASS for each, PTX for the lowest "
                   "(default: the build GPU's).")
@click.option("--without-gpu", is_flag=True,
              help="Build the CUDA entries on a host with no GPU, for --cuda-arch (experimental: not "
                   "autotuned, never run at build time; tested only with torch 2.11.0 + triton 3.6.0 and "
                   "torch 2.14.1 + triton 3.8.0).")
@click.option("--cpu-threads", type=click.IntRange(1, 1024), default=16, show_default=True, metavar="N",
              help="Thread count the CPU code's parallel loops are planned for; the code runs on as many threads "
                   "as the serving process has. Not read from this host, so the pack is the same everywhere.")
@click.option("--onednn-convs/--no-onednn-convs", default=True, show_default=True,
              help="CPU code runs float32 convolutions and large linears through oneDNN, with the batch norm or "
                   "scale after each convolution folded into its weights and its activation fused, the runtime "
                   "folding and packing the weights into oneDNN's layout at load on the serving host; off, ATen "
                   "picks each convolution's kernel and MKL runs the linears.")
@click.option("--no-cache", is_flag=True, help="Compile even if the build cache holds this pack, and do not store it.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Build cache folder (default: $AOTPACK_BUILD_CACHE or ~/.cache/aotpack/build).")
@click.option("--weights", "weights_mode", type=click.Choice(["internal", "external"]), default="internal",
              show_default=True,
              help="external: keep the weights in a safetensors file beside the pack (OUTPUT with the suffix "
                   ".safetensors), which the pack pins by its sha256.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.option("--json", "as_json", is_flag=True, help="Print progress as JSON lines and a JSON summary.")
def build(target: str, output: str, cpu_isa: str | None, dynamic: tuple[str, ...], devices: tuple[str, ...],
          cuda_archs: tuple[str, ...], without_gpu: bool, cpu_threads: int, onednn_convs: bool, no_cache: bool,
          cache_dir: str | None, weights_mode: str, quiet: bool, as_json: bool) -> None:
    """Build a pack from a model file.

    FILE.py must define `model` and `example_inputs` (a tuple), or `model` and `methods` (name ->
    aotpack.Method: one pack of several methods sharing weights and state), and may define `example_kwargs`,
    `dynamic_shapes` (torch.export's format), `specializations` (a list of further example input
    tuples, each compiled as its own entry unless an earlier entry accepts it) and `cache_positions` (for a
    model with state: which input holds cache positions, e.g. {"input": "cache_position", "limit": 64,
    "span": ["input_ids", 1]}). FILE.py:NAME calls the
    function NAME, which returns (model, example_inputs), (model, example_inputs, example_kwargs), or a
    dict with those keys and optionally dynamic_shapes, specializations and cache_positions.

    A pack whose inputs (captured graph, weights, example inputs, options, toolchain) match one in the
    build cache is copied from there instead of compiled; the bytes are the same either way. When the model
    file, the sources it imports, the library versions, the weights, the examples and the options are those of
    an earlier build, the pack is found without capturing the model (see the README, "Build cache").
    """
    from aotpack import front

    dynamic_shapes = _parse_dynamic(dynamic) if dynamic else None
    start = time.perf_counter()
    options = front.options(cpu_isa=cpu_isa, devices=devices or ("cpu",), cuda_archs=cuda_archs,
                            without_gpu=without_gpu, cpu_threads=cpu_threads,
                            onednn_convs=onednn_convs)  # errors before the model runs

    def say(line: str) -> None:
        if as_json:
            click.echo(json.dumps({"event": "progress", "elapsed_s": round(time.perf_counter() - start, 3),
                                   "message": line.strip()}))
        elif not quiet:
            click.echo(line, err=True)

    report = front.build_file(target, output, options=options, cache=front.cache_setting(no_cache, cache_dir),
                              progress=say, dynamic_shapes=dynamic_shapes,
                              weights=weights_mode)
    weights_file = report.weights_file
    if as_json:
        click.echo(json.dumps({"event": "done", "output": str(report.output), "size": report.size,
                               "cached": report.cached, "cache_key": report.key, "source_key": report.source_key,
                               "cache_hit": report.hit or None,
                               "devices": list(options.devices), "cuda_archs": list(options.cuda_archs),
                               "entries": report.entries, "weights": report.weights,
                               "weight_bytes": report.weight_bytes, "kernels": report.kernels,
                               "stages_s": {k: round(v, 3) for k, v in report.stages.items()},
                               "weights_file": None if weights_file is None else str(weights_file)}))


@cli.command("build-many")
@click.argument("matrix", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for the packs (MODEL.TARGET.pack) and each task's log (logs/).")
@click.option("--ray", "ray", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Build on Ray: alone, on a local cluster started for the run (listeners on 127.0.0.1, "
                   "stopped at the end); with ADDRESS, on that cluster. Needs aotpack[ray].")
@click.option("--jobs", type=click.IntRange(1, 4096), default=None, metavar="N",
              help="Builds at once (default: half the cores; with --ray: as many as the cluster's CPUs allow).")
@click.option("--threads", type=click.IntRange(1, 1024), default=None, metavar="N",
              help="Threads (Ray: CPUs) each build gets (default: the cores divided among the jobs; with --ray: 2).")
@click.option("--no-cache", is_flag=True, help="Compile every task even if the build cache holds its pack.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Build cache folder for every worker, e.g. on shared storage (default: $AOTPACK_BUILD_CACHE "
                   "if set here, else each worker's own ~/.cache/aotpack/build).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
@click.pass_context
def build_many(ctx: click.Context, matrix: str, out_dir: str, ray: str | None, jobs: int | None,
               threads: int | None, no_cache: bool, cache_dir: str | None, as_json: bool) -> None:
    """Build every model of a matrix file for every target in it, each build in its own process.

    MATRIX is a TOML file of [[model]] tables (file = "FILE.py[:NAME]", relative to it; optional name and
    dynamic) and [[target]] tables (name, cpu_isa, devices, cuda_archs, without_gpu, cpu_threads, dynamic):
    see examples/matrix.toml. A failed build does not stop the others; the command ends with a table and
    exits 1 if any failed. Builds whose pack is in the build cache are copied from it.
    """
    from aotpack.many import build_many as run_many, summary_table

    start = time.perf_counter()

    def say(line: str) -> None:
        click.echo(line, err=True)

    if cache_dir is None and os.environ.get("AOTPACK_BUILD_CACHE"):
        cache_dir = os.environ["AOTPACK_BUILD_CACHE"]  # the workers use the folder this shell names
    results = run_many(matrix, out_dir, ray=ray is not None, address=ray or None, jobs=jobs, threads=threads,
                       cache_dir=cache_dir, no_cache=no_cache, progress=say)
    took = time.perf_counter() - start
    if as_json:
        click.echo(json.dumps({"seconds": round(took, 3), "tasks": [dict(r.to_json(), log=None) for r in results]},
                              indent=2))
    else:
        click.echo(summary_table(results, took))
    ctx.exit(1 if any(r.status == "failed" for r in results) else 0)


@cli.group()
def cache() -> None:
    """List or prune the build cache: packs kept by a key of everything that decides their bytes, the
    object files of their generated code, and the toolchain's precompiled headers."""


def _cache_option(f):
    return click.option("--cache-dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
                        help="Build cache folder (default: $AOTPACK_BUILD_CACHE or ~/.cache/aotpack/build).")(f)


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return "just now"


@cache.command("list")
@_cache_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def cache_list(cache_dir: str | None, as_json: bool) -> None:
    """Show each cached pack: key, size, last use, what it was built from and for."""
    from aotpack.buildcache import BuildCache

    store = BuildCache(cache_dir) if cache_dir else BuildCache.open(True)
    entries = store.entries()
    if as_json:
        click.echo(json.dumps({"folder": str(store.folder), "entries": [
            {"key": e.key, "size": e.size, "last_used": e.last_used, **e.meta} for e in entries]},
            indent=2, sort_keys=True))
        return
    now = time.time()
    objects = store.objects().entries()
    click.echo(f"{store.folder}: {len(entries)} pack{'s' if len(entries) != 1 else ''}, "
               f"{sum(e.size for e in entries) / 1e6:.1f} MB (beside it: {len(objects)} object files, "
               f"{sum(e.size for e in objects) / 1e6:.1f} MB; toolchain {store.toolchain_bytes() / 1e6:.0f} MB)")
    for e in entries:
        opts = e.meta.get("options")
        target = (f"  ({opts.get('cpu_isa')}, {'+'.join(opts.get('devices', []))}, {opts.get('cpu_threads')} "
                  "threads)") if isinstance(opts, dict) else ""
        click.echo(f"  {e.key[:12]}  {e.size / 1e6:7.2f} MB  used {_ago(now - e.last_used):>12}  "
                   f"{e.meta.get('source', '?')}{target}")


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12}
_AGES = {"s": 1, "min": 60, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _parse_amount(text: str, units: dict, param: str) -> float:
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in units:
        raise click.BadParameter(f"{text!r}: give a number and one of {', '.join(u for u in units if u)}",
                                 param_hint=param)
    return float(m.group(1)) * units[m.group(2).lower()]


@cache.command("prune")
@_cache_option
@click.option("--older-than", default=None, metavar="AGE",
              help="Remove packs, object files and precompiled headers not used for AGE (e.g. 30d, 12h).")
@click.option("--max-size", default=None, metavar="SIZE",
              help="Then remove the least recently used until the rest fit in SIZE (e.g. 10GB, 500MB).")
@click.option("--all", "everything", is_flag=True,
              help="Remove every cached pack, object file and precompiled header.")
def cache_prune(cache_dir: str | None, older_than: str | None, max_size: str | None, everything: bool) -> None:
    """Remove cached packs, object files and precompiled headers by age or total size, and say what was
    removed. The size limit applies to the packs, to the object files and to the precompiled headers
    separately. A build remakes a precompiled header it misses (a few seconds each); do not prune headers
    while a build runs on this cache."""
    from aotpack.buildcache import BuildCache

    if not (older_than or max_size or everything):
        raise click.UsageError("say what to remove: --older-than AGE, --max-size SIZE or --all")
    age = _parse_amount(older_than, _AGES, "--older-than") if older_than else None
    size = int(_parse_amount(max_size, _UNITS, "--max-size")) if max_size else None
    store = BuildCache(cache_dir) if cache_dir else BuildCache.open(True)
    removed = store.prune(older_than=age, max_bytes=size, everything=everything)
    objects = store.objects().prune(older_than=age, max_bytes=size, everything=everything)
    headers = store.prune_headers(older_than=age, max_bytes=size, everything=everything)
    now = time.time()
    for e in removed:
        click.echo(f"removed {e.key[:12]}  {e.size / 1e6:.2f} MB  used {_ago(now - e.last_used)}  "
                   f"{e.meta.get('source', '?')}")
    left = store.entries()
    click.echo(f"removed {len(removed)} pack{'s' if len(removed) != 1 else ''} "
               f"({sum(e.size for e in removed) / 1e6:.2f} MB); {len(left)} left "
               f"({sum(e.size for e in left) / 1e6:.2f} MB) in {store.folder}")
    if objects:
        click.echo(f"removed {len(objects)} object file{'s' if len(objects) != 1 else ''} "
                   f"({sum(e.size for e in objects) / 1e6:.2f} MB) from {store.objects().folder}")
    if headers:
        click.echo(f"removed {len(headers)} precompiled header{'s' if len(headers) != 1 else ''} "
                   f"({sum(h.size for h in headers) / 1e6:.2f} MB) from {headers[0].path.parent}")


def _parse_dynamic(specs: tuple[str, ...]) -> dict:
    """``--dynamic`` values into torch.export's dynamic_shapes dict (a bad one is a usage error)."""
    from aotpack.modelfile import parse_dynamic

    try:
        return parse_dynamic(specs)
    except ModelFileError as e:
        raise click.BadParameter(str(e), param_hint="--dynamic") from None


@cli.command()
@click.argument("pack", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def inspect(pack: str, as_json: bool) -> None:
    """Show what a pack holds: producer, target, entries and their guards, kernels, blobs."""
    info = describe(Archive.open(pack))
    click.echo(json.dumps(info, indent=2, sort_keys=True) if as_json else render(info))


@cli.command()
@click.argument("pack", type=click.Path(dir_okay=False))
@click.option("--against", metavar="FILE.py[:NAME]", default=None,
              help="Also run the pack on this model file's example inputs and compare with eager.")
@click.option("--signature", type=click.Path(dir_okay=False), default=None,
              help="The pack's detached signature (default with --public-key or --certificate-chain: PACK.sig).")
@click.option("--public-key", type=click.Path(dir_okay=False), default=None,
              help="Require a signature by this key: the signer's EC public key in PEM (or its certificate).")
@click.option("--certificate-chain", "roots", multiple=True, type=click.Path(dir_okay=False),
              help="Require a certificate signature whose certificate chains up to this PEM root "
                   "(repeatable; needs aotpack[sign]).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_context
def verify(ctx: click.Context, pack: str, against: str | None, signature: str | None, public_key: str | None,
           roots: tuple[str, ...], as_json: bool) -> None:
    """Check a pack: its signature (if asked), format and version, every hash, can this host run it
    (exit 0 ok, 1 not)."""
    from aotpack.checks import render_verify, verify as run_verify

    if signature is not None and public_key is None and not roots:
        raise click.UsageError("--signature needs --public-key (or --certificate-chain) to check it with")
    result = run_verify(pack, against, signature=signature, public_key=public_key, roots=roots)
    click.echo(json.dumps(result, indent=2, sort_keys=True) if as_json else render_verify(result))
    ctx.exit(0 if result["ok"] else 1)


@cli.command()
@click.argument("pack", type=click.Path(dir_okay=False))
@click.option("--key", required=True, type=click.Path(dir_okay=False),
              help="The signer's EC private key (P-256, unencrypted PEM).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Where to write the signature (default: PACK.sig).")
@click.option("--certificate", type=click.Path(dir_okay=False), default=None,
              help="Sign with this PEM certificate issued for --key (the signature then carries the chain).")
@click.option("--chain", multiple=True, type=click.Path(dir_okay=False),
              help="Intermediate and root certificates (PEM) to put in the signature with --certificate "
                   "(repeatable).")
def sign(pack: str, key: str, output: str | None, certificate: str | None, chain: tuple[str, ...]) -> None:
    """Sign a pack with OpenSSF model-signing: write a detached signature (a Sigstore bundle) next to it.

    The pack is checked first and left unchanged. Check the signature with `aotpack verify PACK
    --public-key KEY.pub` or `aotpack.load(PACK, public_key=...)`. Needs aotpack[sign]; works offline.
    """
    from aotpack.signing import sign as run_sign

    if chain and certificate is None:
        raise click.UsageError("--chain goes with --certificate")
    written, signed = run_sign(pack, key, output, certificate=certificate, chain=chain)
    click.echo(f"wrote {written}: {signed.describe()}")


@cli.command()
@click.argument("pack", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The safetensors file to write.")
def weights(pack: str, output: str) -> None:
    """Export a pack's weights to a safetensors file, under the model's state_dict names.

    Tied weights are written once (under the name the code reads, as Hugging Face saves them); tensors that
    are not in the model's state_dict (lifted constants, non-persistent buffers) are left out. The same pack
    gives the same bytes.
    """
    from aotpack.reweight import export_weights

    n, size = export_weights(pack, output)
    click.echo(f"wrote {output} ({size / 1e6:.2f} MB): {n} tensors")


@cli.command()
@click.argument("base", type=click.Path(dir_okay=False))
@click.argument("weights_source", metavar="[WEIGHTS]", required=False, type=click.Path(exists=True))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Path of the pack to write.")
@click.option("--lora", type=click.Path(file_okay=False, exists=True), default=None, metavar="ADAPTER_DIR",
              help="Merge this PEFT LoRA adapter (adapter_config.json, adapter_model.safetensors) into the weights.")
@click.option("--no-strict", "not_strict", is_flag=True,
              help="Keep the base's value of a weight WEIGHTS lacks and ignore names the pack does not know.")
@click.option("--no-cache", is_flag=True, help="Do not store the pack written in the build cache.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Build cache folder (default: $AOTPACK_BUILD_CACHE or ~/.cache/aotpack/build).")
def reweight(base: str, weights_source: str | None, output: str, lora: str | None, not_strict: bool,
             no_cache: bool, cache_dir: str | None) -> None:
    """Write a pack with the code of BASE and new weights, without a compiler.

    WEIGHTS is a safetensors file or a Hugging Face checkpoint folder (model.safetensors, or shards with
    model.safetensors.index.json), by the model's state_dict names (`aotpack inspect` lists them); it may be
    left out with --lora, to merge an adapter into the base's own weights. Every name, dtype and shape is
    checked first. The pack written is byte for byte the pack a full build of the model with these weights
    writes; when the build cache holds BASE's build, it stores the new pack under the key that full build
    computes (so the build finds it). The pack is not signed: sign it as any pack (`aotpack sign`).
    """
    from aotpack.front import cache_setting
    from aotpack.reweight import reweight as run

    if weights_source is None and lora is None:
        raise click.UsageError("give WEIGHTS, --lora ADAPTER_DIR, or both")
    run(base, weights_source, output, lora=lora, strict=not not_strict, progress=click.echo,
        cache=cache_setting(no_cache, cache_dir))


@cli.command()
@click.argument("pack_a", type=click.Path(dir_okay=False))
@click.argument("pack_b", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_context
def diff(ctx: click.Context, pack_a: str, pack_b: str, as_json: bool) -> None:
    """Explain how two packs differ: first the causes (what built them differently: aotpack, torch, Python
    or compiler version, platform, target ISA, build options), then manifest fields, weights, entries and
    guards, blobs, generated source (exit 0 equal, 1 different)."""
    from aotpack.checks import diff as run_diff, render_diff

    result = run_diff(pack_a, pack_b)
    click.echo(json.dumps(result, indent=2, sort_keys=True) if as_json else render_diff(result))
    ctx.exit(0 if result["equal"] else 1)


def _summary(value, depth: int = 0) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        flat = value.detach().reshape(-1)[:4].tolist()
        head = ", ".join(f"{x:.4g}" if isinstance(x, float) else str(x) for x in flat)
        return f"tensor {str(value.dtype).replace('torch.', '')}{list(value.shape)} [{head}{', ...' if value.numel() > 4 else ''}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_summary(v, depth + 1)}" for k, v in value.items()) + "}"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(_summary(v, depth + 1) for v in value)
        return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    return repr(value)


@cli.command()
@click.argument("pack", type=click.Path(dir_okay=False))
@click.option("--repeat", default=50, show_default=True, type=click.IntRange(1, 100000),
              help="Calls to time after the first.")
@click.option("--code-cache", "cache_dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Code cache: the folder native code is extracted to and completed checks are recorded in "
                   "(default: $AOTPACK_CACHE_DIR or ~/.cache/aotpack).")
@click.option("--cache-dir", "old_cache_dir", type=click.Path(file_okay=False), default=None, hidden=True)  # old name
@click.option("--verify", "verify_mode", type=click.Choice(["auto", "full"]), default="auto", show_default=True,
              help="auto: hash every blob unless the code cache records a check of this same, unchanged file; "
                   "full: always hash every blob.")
@click.option("--prefetch", is_flag=True, help="Read the weights into memory in the background while loading.")
@click.option("--device", default=None, metavar="DEVICE",
              help="Where to put the example inputs: cpu, cuda, cuda:1 ... (default: cpu if the pack has a CPU "
                   "entry, else cuda).")
@click.option("--signature", type=click.Path(dir_okay=False), default=None,
              help="The pack's detached signature (default with --public-key: PACK.sig).")
@click.option("--public-key", type=click.Path(dir_okay=False), default=None,
              help="Refuse to load the pack unless it is signed by this key (EC public key or certificate, PEM).")
@click.option("--method", default=None, metavar="NAME",
              help="The method to run, on its own example inputs (default: forward, or a pack's first method).")
@click.option("--weights", "weights_file", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help="For a pack that keeps its weights beside it: the safetensors file to serve (default: the one "
                   "its manifest names, in the pack's folder); another file (a fine-tune) needs --weights-sha256.")
@click.option("--weights-sha256", default=None, metavar="HEX",
              help="The sha256 of the --weights file, when it is not the file the pack pins (a fine-tune).")
def run(pack: str, repeat: int, cache_dir: str | None, old_cache_dir: str | None, verify_mode: str, prefetch: bool,
        device: str | None, signature: str | None, public_key: str | None, method: str | None,
        weights_file: str | None, weights_sha256: str | None) -> None:
    """Load a pack and run it on the example inputs stored inside it; print the result and timings.

    A pack with state runs in one session: the first call starts from the initial state, and each timed
    call continues it (with the same example inputs). A pack of several methods runs one, --method NAME. A pack
    that keeps its weights beside it runs with the file there, or with --weights PATH (as
    aotpack.load(pack, weights=PATH, weights_sha256=HEX))."""
    import torch
    import torch.utils._pytree as pytree

    if signature is not None and public_key is None:
        raise click.UsageError("--signature needs --public-key to check it with")
    t0 = time.perf_counter()
    if weights_sha256 is not None and weights_file is None:
        raise click.UsageError("--weights-sha256 pins the file of --weights PATH; give the file too")
    pkg = rt.load(pack, cache_dir=cache_dir or old_cache_dir, signature=signature, public_key=public_key,
                  verify=verify_mode, prefetch=prefetch, weights=weights_file, weights_sha256=weights_sha256)
    t1 = time.perf_counter()
    names = list(pkg.methods)
    if method is None:
        method = "forward" if "forward" in names else names[0]
    elif method not in names:
        raise click.BadParameter(f"{pack} has no method {method!r}; its methods: {', '.join(names)}",
                                 param_hint="--method")
    args, kwargs = pkg.example_inputs(method)
    if device is None:
        device = "cpu" if any(e.device == "cpu" for e in pkg.entries) else "cuda"
    try:
        target = torch.device(device)
    except RuntimeError:
        raise click.BadParameter(f"{device!r} is not a device (cpu, cuda, cuda:1, ...)", param_hint="--device")
    if target.type == "cuda" and not torch.cuda.is_available():
        raise rt.ArchiveError(f"--device {device}: this host has no usable CUDA device", path=pack)
    args, kwargs = pytree.tree_map(lambda v: v.to(target) if isinstance(v, torch.Tensor) else v, (args, kwargs))
    sync = torch.cuda.synchronize if target.type == "cuda" else (lambda: None)
    session = pkg.session(device=target) if pkg.stateful else None
    call = getattr(session, method) if session is not None else pkg.methods[method]
    with torch.inference_mode():
        t2 = time.perf_counter()
        out = call(*args, **kwargs)
        sync()
        t3 = time.perf_counter()
        times = []
        for _ in range(repeat):
            s = time.perf_counter()
            call(*args, **kwargs)
            sync()
            times.append(time.perf_counter() - s)
    if len(names) > 1:
        click.echo(f"method {method} (of {', '.join(names)})")
    if pkg.stateful:
        click.echo(f"session: {session!r}")
    click.echo(f"output: {_summary(out)}")
    checked = "every blob hashed" if pkg.checked == "full" else "the check recorded earlier"
    click.echo(f"load {1e3 * (t1 - t0):.1f} ms ({checked}), first call {1e3 * (t3 - t2):.2f} ms, "
               f"median call {1e6 * statistics.median(times):.1f} us over {repeat} calls")


def main() -> None:
    cli(prog_name="aotpack")


if __name__ == "__main__":
    main()
