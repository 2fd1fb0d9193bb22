"""New weights for a built pack, without a compiler: export a pack's weights, write a pack with the same code
and other weights (``reweight``), merge a PEFT LoRA adapter into weights, and move a pack's weights into a
safetensors file beside it (``externalize``, for ``build --weights external``).

``reweight`` keeps every blob of the base pack but the weights, and the manifest but its blob table: the
pack it writes is, byte for byte, the pack a full build of the same model with those weights writes (the
code does not depend on the weights' values: every weight stays a constant the loader binds). It reads each
byte once where it can: a kept blob is read once, checked against its pinned sha256 and copied as stored; a
base weight that is replaced is never read; a new weight is hashed once. New weights are
checked by the runtime's own check (``aotpack_runtime.weights.fit``) before anything is written.

A reweighted pack goes into the build cache under the key a full build of the same model with the new weights
computes, when the base pack's build stored it there (``cache_reweighted``).

May not: capture or compile; change the base pack's code, guards, state or example.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import tempfile
import time
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, Callable

import torch

from aotpack_runtime import safetensors_file as stf
from aotpack_runtime.archive import Archive
from aotpack_runtime.errors import ArchiveError, BuildError, WeightsError
from aotpack_runtime.schema import BlobRecord, ExternalWeights, Manifest
from aotpack_runtime.signature import default_signature_path
from aotpack_runtime.weights import (external_path, file_name_of, fit, given, load_external, load_weights,
                                     tensor_from_bytes, tied_groups)

from . import buildcache, package
from .buildcache import BuildCache

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT names an adapter's tensors ``<prefix><module>.lora_A.weight``; the prefix is its wrapper's.
PEFT_PREFIX = "base_model.model."


def _level(m: Manifest) -> int:
    """The zstd level the pack was written with (its options record it): a rewrite compresses as its build did."""
    level = m.options.get("compression_level")
    if type(level) is not int or not 1 <= level <= 22:
        raise BuildError(f"the pack's options record no zstd level (compression_level: {level!r}); rebuild it "
                         "with this aotpack")
    return level


def _checked_archive(path: str | os.PathLike) -> Archive:
    archive = Archive.open(os.fspath(path))
    archive.check_blobs()
    return archive


def _pack_weights(archive: Archive) -> dict[str, torch.Tensor]:
    """Every stored weight of a checked pack, by record name: views of its blobs, or of its external weights
    file beside it (hash-checked)."""
    external = archive.manifest.external_weights
    if external is None:
        return load_weights(archive, checked=True)
    with tempfile.TemporaryDirectory(prefix="aotpack-weights-") as cache:
        return load_external(archive, external_path(archive, None), external.sha256, cache, "full")


def state_dict_of(archive: Archive) -> dict[str, torch.Tensor]:
    """The pack's weights under their ``state_dict`` names (each tied tensor once, under the first name the
    code reads it by that the ``state_dict`` has; tensors outside the ``state_dict`` left out), as views of the
    mapped, checked file."""
    weights = _pack_weights(archive)
    out = {}
    for group in tied_groups(archive.manifest):
        w = next((w for w in group if w.in_state_dict), None)
        if w is not None:
            out[w.name] = weights[w.name]
    return out


def export_weights(pack: str | os.PathLike, output: str | os.PathLike) -> tuple[int, int]:
    """Write the pack's weights (``state_dict_of``) to a safetensors file; return (tensors, file size)."""
    tensors = state_dict_of(_checked_archive(pack))
    return len(tensors), stf.write(output, tensors)


@dataclass
class ReweightReport:
    output: pathlib.Path
    seconds: float
    size: int
    weights: int
    changed: int
    merged: int = 0  # weights a LoRA adapter changed
    key: str = ""  # the build cache key it was stored under ("" when it was not: ``cache_note`` says why)
    cache_note: str = ""
    base_signature: str = ""  # the base pack's signature file, when it has one: the new pack is not signed

    def summary(self) -> str:
        lora = f", {self.merged} merged with the LoRA adapter" if self.merged else ""
        lines = [f"wrote {self.output} ({self.size / 1e6:.2f} MB): {self.weights} weights, {self.changed} of them "
                 f"new{lora}; same code as the base pack; in {self.seconds:.2f} s"]
        if self.cache_note:
            lines.append(f"      build cache: {self.cache_note}")
        if self.base_signature:
            lines.append(f"      the base pack is signed ({self.base_signature}); this pack is not: sign it with "
                         f"`aotpack sign {self.output} --key KEY`")
        return "\n".join(lines)


class _KeptWeights(Mapping):
    """The base pack's weights by record name, each mapped and hashed only when first asked for: new weights
    that replace a weight never read its old bytes. ``hashes`` holds the checked sha256 of each weight read."""

    def __init__(self, archive: Archive):
        self._archive = archive
        self._records = {w.name: w for w in archive.manifest.weights}
        self._tensors: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._tensors:
            w = self._records[name]
            self._tensors[name] = tensor_from_bytes(self._archive.map_blob(w.blob), w.dtype, w.shape)  # hashes it
        return self._tensors[name]

    def __iter__(self):
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def read(self, name: str) -> bool:
        return name in self._tensors


def _verified_stored(archive: Archive, b: BlobRecord) -> package.StoredBlob:
    """The blob ``b`` of the base pack as stored, read once and checked against the sha256 the manifest pins
    (decompressed in memory, at most the size the manifest gives, to be hashed), to be written verbatim."""
    import zstandard

    stored = archive.read_stored(b.name)
    content = stored
    if b.compression == "zstd":
        try:
            content = zstandard.ZstdDecompressor().decompress(stored, max_output_size=b.size, allow_extra_data=False)
        except zstandard.ZstdError as e:
            raise ArchiveError(f"blob {b.name!r}: zstd data is corrupt ({e})", path=archive.path) from None
    if len(content) != b.size or hashlib.sha256(content).hexdigest() != b.sha256:
        raise ArchiveError(f"blob {b.name!r} does not match its sha256 in the manifest (expected {b.sha256}); the "
                           "base pack is damaged", path=archive.path)
    return package.StoredBlob(b.name, stored, b.compression, b.size, b.sha256)


def reweight(base: str | os.PathLike, weights: Any, output: str | os.PathLike, *, lora: str | os.PathLike | None = None,
             strict: bool = True, progress: Callable[[str], None] | None = None, cache: Any = True) -> ReweightReport:
    """Write ``output``: the pack ``base`` with new weights (a safetensors file, a checkpoint folder, or a
    ``state_dict``-like mapping; None keeps the base's, for ``lora`` alone), merged with the PEFT LoRA adapter
    in the folder ``lora`` if given. The new weights are checked as ``Package.load_weights`` checks them
    (``strict``) before anything is read or written. ``cache`` (as ``aotpack.build``'s: True, a folder, or
    False): where the base pack's build stored it, the pack written is stored too, under the key a full build
    of the model with the new weights computes (``cache_reweighted``).

    Each byte is read and hashed once where it can be: every blob of the base but its weights is read once,
    checked against the sha256 its manifest pins and copied as stored (not recompressed); a base weight is read
    (and hashed) only when it is kept; a new weight is hashed once, as the writer stores it. Whether a weight
    changed is told by its hash."""
    start = time.perf_counter()
    archive = Archive.open(os.fspath(base))
    m = archive.manifest
    if m.external_weights is not None:
        raise WeightsError(f"the pack keeps its weights in {m.external_weights.file}, beside it: serve other weights "
                           "with aotpack.load(pack, weights=FILE, weights_sha256=ITS_SHA256), or reweight the pack "
                           "it was built from", path=os.fspath(base))
    current = _KeptWeights(archive)
    new = dict(current) if weights is None else fit(m, weights, strict, current)
    merged = 0
    if lora is not None:
        new, merged = merge_lora(m, new, lora)
    weight_blobs: dict[str, str] = {}
    for w in m.weights:
        weight_blobs.setdefault(w.blob, w.name)  # records of one blob hold one tensor (``fit``, ``merge_lora``)
    blobs: list = []
    for b in m.blobs:
        if b.name not in weight_blobs:
            blobs.append(_verified_stored(archive, b))
            continue
        name = weight_blobs[b.name]
        kept = current.read(name) and new[name] is current[name]  # hashed as it was mapped
        blobs.append(package.Blob(b.name, new[name], compressible=False, sha256=b.sha256 if kept else None))
    size = package.write_archive(output, m, blobs, _level(m))
    out = Archive.open(os.fspath(output))
    try:
        written = {b.name: b.sha256 for b in out.manifest.blobs}
    finally:
        out.close()
    changed = sum(1 for w in m.weights if written[w.blob] != m.blob(w.blob).sha256)
    report = ReweightReport(pathlib.Path(output), time.perf_counter() - start, size, len(m.weights), changed, merged)
    store = BuildCache.open(cache)
    if store is not None:
        unread = given(weights, m.unread_weights) if weights is not None else {}
        report.key, report.cache_note = cache_reweighted(store, archive, output, written, unread)
        report.seconds = time.perf_counter() - start
    signature = default_signature_path(os.fspath(base))
    if os.path.exists(signature):
        report.base_signature = signature
    if progress:
        progress(report.summary())
    return report


def cache_reweighted(cache: BuildCache, base: Archive, output: str | os.PathLike, written: dict[str, str],
                     unread: Mapping[str, torch.Tensor]) -> tuple[str, str]:
    """Store the reweighted pack ``output`` (its blobs' sha256 ``written``) in ``cache`` under the key a full
    build of the base pack's model with its new weights computes; return (that key, what was done).

    The key is the hash of the base build's key material (its record in the cache) with each weight's sha256
    replaced by the new one: the graphs, guards, options, toolchain and example are the base build's, and
    the code does not depend on the weights' values (``reweight`` writes a full build's bytes). A weight's
    record in the material is found by its name and its aliases (the names the exported graph holds it
    under); ``unread`` gives the new values of names the code never reads (the others, and the state
    buffers' initial values, stay the base's, as in the pack written). Nothing is stored when the base pack
    is not in the cache (built without it, elsewhere, or pruned since): the key needs the base build's
    material, which only a capture gives."""
    found = cache.record_of(base.manifest_sha256)
    if found is None:
        return "", ("not stored: the base pack is not in the build cache (built without it, on another host, "
                    "or pruned since), and its key needs the base build's record; a full build with these weights "
                    "stores it")
    base_key, meta = found
    material = meta.get("material")
    records = material.get("weights") if isinstance(material, dict) else None
    if not isinstance(records, dict):
        return "", f"not stored: the base pack's cache record {base_key[:12]} holds no key material"
    m = base.manifest
    records = dict(records)
    for w in m.weights:
        old, new = m.blob(w.blob).sha256, written[w.blob]
        for name in (w.name, *w.aliases):
            r = records.get(name)
            if not isinstance(r, dict) or r.get("sha256") != old or r.get("dtype") != w.dtype \
                    or r.get("shape") != list(w.shape):
                return "", (f"not stored: the base pack's cache record {base_key[:12]} does not describe its "
                            f"weight {name}")
            records[name] = dict(r, sha256=new)
    for name, t in unread.items():
        r = records.get(name)
        if r is None:
            continue  # a name export does not hold: not in the key
        if not isinstance(t, torch.Tensor) or r.get("dtype") != str(t.dtype).removeprefix("torch.") \
                or r.get("shape") != list(t.shape):
            return "", (f"not stored: the new weights give {name}, which the code never reads, another dtype or "
                        f"shape than the base build's ({r.get('dtype')}{r.get('shape')})")
        records[name] = dict(r, sha256=package.tensor_digest(t))
    new_material = dict(material, weights=records)
    key = buildcache.key_of(new_material)
    if key == base_key:
        return key, f"the same pack as the base, cached under {key[:12]}"
    entry = cache.store(key, output, {"source": f"reweight of {meta.get('source', base_key[:12])}",
                                      "options": meta.get("options"), "producer": meta.get("producer"),
                                      "material": new_material})
    if entry is None:
        return "", "not stored: the cache folder could not be written"
    cache.remember_manifest(output, key)
    return key, f"stored {key[:12]} in {cache.folder}: a full build of the model with these weights finds it"


def external_file_for(pack: str | os.PathLike) -> pathlib.Path:
    """Where ``--weights external`` writes a pack's weights by default: beside it, ``NAME.safetensors``."""
    pack = pathlib.Path(pack)
    if pack.suffix == stf.SUFFIX:
        raise BuildError(f"the pack {pack} ends in {stf.SUFFIX}, the name its weights file would get; name the "
                         "pack NAME.pack")
    return pack.with_suffix(stf.SUFFIX)


def externalize(pack: str | os.PathLike, weights_file: str | os.PathLike | None = None) -> pathlib.Path:
    """Move a pack's weights into a safetensors file beside it, and rewrite the pack (atomically) with weight
    records that name no blob and the file's name, sha256 and size (``external_weights``). The file holds one
    tensor per blob, under its record's name (records of one blob, tied weights the code reads under several
    names: under the first of them in the ``state_dict``, and the others say ``same_as`` that name). Same
    pack, same bytes, for both files. Returns the weights file's path."""
    pack = pathlib.Path(pack)
    target = pathlib.Path(weights_file) if weights_file is not None else external_file_for(pack)
    if target.resolve().parent != pack.resolve().parent:
        raise BuildError(f"the weights file {target} must lie in the pack's folder {pack.resolve().parent} (the "
                         "pack names it by its file name)")
    archive = _checked_archive(pack)
    m = archive.manifest
    if m.external_weights is not None:
        raise BuildError(f"{pack} already keeps its weights in {m.external_weights.file}")
    stored = load_weights(archive, checked=True)
    same_as = {}
    tensors = {}
    for group in tied_groups(m):
        name = file_name_of(group)
        tensors[name] = stored[name]
        same_as.update((w.name, name) for w in group if w.name != name)
    stf.write(target, tensors)
    with open(target, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    weight_blobs = {w.blob for w in m.weights}
    blobs = [package.Blob(b.name, archive.read_blob(b.name)) for b in m.blobs if b.name not in weight_blobs]
    manifest = dataclasses.replace(m, weights=tuple(dataclasses.replace(w, blob=None, same_as=same_as.get(w.name))
                                                    for w in m.weights),
                                   external_weights=ExternalWeights(target.name, sha, target.stat().st_size))
    archive.close()
    package.write_archive(pack, manifest, blobs, _level(m))
    return target


# ---------------------------------------------------------------------------------------------------
# PEFT LoRA adapters

def _lora_config(folder: str) -> dict:
    path = os.path.join(folder, ADAPTER_CONFIG)
    try:
        with open(path, "rb") as f:
            config = json.loads(f.read(1 << 20))
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read the adapter's config: {e}", path=path) from None
    if not isinstance(config, dict):
        raise WeightsError("the adapter's config is not a JSON object", path=path)
    if config.get("peft_type", "LORA") != "LORA":
        raise WeightsError(f"the adapter is a {config.get('peft_type')} adapter; reweight merges LoRA adapters", path=path)
    r, alpha = config.get("r"), config.get("lora_alpha")
    if type(r) is not int or r <= 0 or not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise WeightsError(f"the adapter's config needs a positive integer r and a number lora_alpha (r={r!r}, "
                           f"lora_alpha={alpha!r})", path=path)
    for key in ("use_dora",):
        if config.get(key):
            raise WeightsError(f"the adapter uses {key}, which reweight does not merge; merge it with peft "
                               "(merge_and_unload) and pass the merged weights", path=path)
    if config.get("bias", "none") != "none":
        raise WeightsError(f"the adapter trains biases (bias={config.get('bias')!r}), which reweight does not "
                           "merge; merge it with peft (merge_and_unload) and pass the merged weights", path=path)
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise WeightsError(f"the adapter sets {key} (a rank or alpha per module), which reweight does not "
                               "merge; merge it with peft (merge_and_unload) and pass the merged weights", path=path)
    return config


def merge_lora(m: Manifest, weights: dict[str, torch.Tensor], folder: str | os.PathLike) \
        -> tuple[dict[str, torch.Tensor], int]:
    """``weights`` with the LoRA adapter in ``folder`` merged in: for each adapted module ``M``,
    ``M.weight += scale * (B @ A)`` (transposed where the config says ``fan_in_fan_out``), with
    ``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), computed in float32 and stored in
    the weight's dtype. Returns the new weights and how many were merged; every problem is a ``WeightsError``
    before anything is merged."""
    folder = os.fspath(folder)
    config = _lora_config(folder)
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    adapter = stf.read(os.path.join(folder, ADAPTER_WEIGHTS))
    names = {}
    for w in m.weights:
        for n in (w.name, *w.aliases):
            names[n] = w
    pairs: dict[str, dict[str, str]] = {}
    problems = []
    for key in adapter:
        module = key.removeprefix(PEFT_PREFIX)
        for part in ("lora_A", "lora_B"):
            for suffix in (f".{part}.weight", f".{part}.default.weight"):
                if module.endswith(suffix):
                    pairs.setdefault(module[:-len(suffix)], {})[part] = key
                    break
            else:
                continue
            break
        else:
            problems.append(f"{key}: not a lora_A or lora_B weight (reweight merges LoRA weights only)")
    plan = []
    for module, pair in sorted(pairs.items()):
        target = names.get(f"{module}.weight")
        if len(pair) != 2:
            problems.append(f"{module}: lacks {'lora_A' if 'lora_A' not in pair else 'lora_B'}")
            continue
        if target is None:
            problems.append(f"{module}: the pack has no weight {module}.weight")
            continue
        a, b = adapter.info[pair["lora_A"]], adapter.info[pair["lora_B"]]
        out_in = target.shape[::-1] if fan_in_fan_out else target.shape
        if len(target.shape) != 2 or a.shape != (r, out_in[1]) or b.shape != (out_in[0], r):
            problems.append(f"{module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not fit "
                            f"{target.name} {list(target.shape)} with r={r}")
            continue
        plan.append((target, pair))
    if problems:
        raise WeightsError(f"the LoRA adapter does not fit the pack, nothing was merged: {'; '.join(problems)}",
                           path=folder)
    out = dict(weights)
    group_of = {w.name: group for group in tied_groups(m) for w in group}
    for target, pair in plan:
        delta = adapter[pair["lora_B"]].float() @ adapter[pair["lora_A"]].float()
        if fan_in_fan_out:
            delta = delta.t()
        merged = (weights[target.name].float() + scale * delta).to(weights[target.name].dtype)
        for w in group_of[target.name]:  # every record of the tensor (one blob) gets the merged one
            out[w.name] = merged
    return out, len(plan)
