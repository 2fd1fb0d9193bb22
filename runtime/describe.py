"""What is inside a pack, as data (for ``aotpack inspect`` and ``--json``) and as text."""
from __future__ import annotations

from typing import Any

from .archive import Archive
from .guards import EntryGuards, TensorGuard, ValueGuard


def _structure(node: dict) -> str:
    kind = node["type"]
    if kind == "leaf":
        return "*"
    if kind == "none":
        return "None"
    if kind == "dict":
        inner = ", ".join(f"{k!r}: {_structure(c)}" for k, c in zip(node["keys"], node["children"]))
        return "{" + inner + "}"
    inner = ", ".join(_structure(c) for c in node["children"])
    return f"({inner}{',' if len(node['children']) == 1 else ''})" if kind == "tuple" else f"[{inner}]"


def describe(archive: Archive) -> dict:
    """A JSON-ready description of the archive: producer, target, entries with readable guards, blobs."""
    m = archive.manifest
    entries = []
    for i, meta in enumerate(m.entries):
        g = EntryGuards.from_json(meta, f"manifest.entries[{i}]")
        guards = []
        for leaf in g.leaves:
            if isinstance(leaf, TensorGuard):
                guards.append(f"{leaf.name} ({leaf.path}): {leaf.describe(g.symbols)}")
            elif isinstance(leaf, ValueGuard):
                guards.append(f"{leaf.name} ({leaf.path}) == {leaf.value!r}")
        library = m.blob(meta["library"])
        entries.append({
            "index": i, "name": meta.get("name"), "device": meta.get("device"), "guards": guards,
            "symbols": {k: list(v) for k, v in g.symbols.items()}, "grad_mode_at_capture": meta.get("grad_mode"),
            "outputs": _structure(meta["outputs"]), "kernels": list(meta.get("kernels", [])),
            "library": {"blob": library.name, "size": library.size, "sha256": library.sha256},
            "constants": len(meta.get("constants", {})),
        })
    return {
        "path": archive.path, "file_size": archive.file_size, "format_version": m.format_version,
        "producer": m.producer, "target": m.target, "options": m.options, "frozen": m.raw.get("frozen", {}),
        "weights": {"count": len(m.weights), "bytes": sum(w.nbytes for w in m.weights)},
        "entries": entries,
        "blobs": [{"name": b.name, "size": b.size, "stored_size": b.stored_size, "compression": b.compression,
                   "sha256": b.sha256} for b in m.blobs],
    }


def render(info: dict[str, Any]) -> str:
    """``describe``'s data as text for people."""
    p = info["producer"]
    t = info["target"]
    lines = [
        f"{info['path']}: aotpack format {info['format_version']}, {info['file_size']:,} bytes",
        f"producer: aotpack {p.get('aotpack')}, torch {p.get('torch')}, python {p.get('python')}, "
        f"{p.get('compiler')}, {p.get('platform')}",
        f"target:   {t.get('machine')} cpu_isa={t.get('cpu_isa')} torch {t.get('torch_series')}.x",
        f"weights:  {info['weights']['count']} tensors, {info['weights']['bytes']:,} bytes (stored once, "
        "shared by all entries)",
        f"entries:  {len(info['entries'])} (tried in this order; the first whose guards pass runs)",
    ]
    for e in info["entries"]:
        lines.append(f"  entry {e['name']} [{e['device']}]: library {e['library']['size']:,} bytes, "
                     f"{len(e['kernels'])} kernels, {e['constants']} constants")
        for g in e["guards"]:
            lines.append(f"    guard  {g}")
        if e["grad_mode_at_capture"] is not None:
            lines.append("    guard  inputs must not require grad under grad mode (a pack computes no gradients)")
        lines.append(f"    output {e['outputs']}")
        for k in e["kernels"]:
            lines.append(f"    kernel {k}")
    lines.append("blobs:")
    for b in info["blobs"]:
        stored = f"{b['stored_size']:>10,} stored ({b['compression']})" if b["compression"] != "none" \
            else f"{'':>10} stored as is"
        lines.append(f"  {b['name']:<28} {b['size']:>10,} bytes {stored}  sha256 {b['sha256'][:16]}")
    return "\n".join(lines)
