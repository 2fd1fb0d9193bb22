"""What is inside a pack, as data (for ``aotpack inspect`` and ``--json``) and as text.

May not: load native code or run anything: it reads the manifest and the archive's records."""
from __future__ import annotations

from typing import Any

from .archive import Archive
from .errors import ArchiveError
from .format import parse_json
from .schema import TensorGuard, ValueGuard


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
    for i, e in enumerate(m.entries):
        g = e.guards
        guards = []
        for leaf in g.leaves:
            if isinstance(leaf, TensorGuard):
                guards.append(f"{leaf.name} ({leaf.path}): {leaf.describe(g.symbols)}")
            elif isinstance(leaf, ValueGuard):
                guards.append(f"{leaf.name} ({leaf.path}) == {leaf.value!r}")
        library = m.blob(e.library)
        writes = [f"{leaf.name} ({leaf.path})" for leaf in g.leaves if isinstance(leaf, TensorGuard) and leaf.mutated]
        entry = {
            "index": i, "name": e.name, "device": e.device, "guards": guards,
            "symbols": {k: list(v) for k, v in g.symbols.items()}, "grad_mode_at_capture": g.grad_mode,
            "outputs": _structure(g.outputs), "kernels": list(e.kernels or ()),
            "library": {"blob": library.name, "size": library.size, "sha256": library.sha256},
            "constants": len(e.constants), "writes": writes,
            "extern_kernels": _extern_ops(archive, e.extern_kernels),
        }
        if e.packed_weights:
            entry["packed_weights"] = sorted(e.packed_weights)
        if e.folded_weights:
            entry["folded_weights"] = {c: list(f.weight_names) for c, f in sorted(e.folded_weights.items())}
        if e.cuda is not None:
            entry["cuda"] = e.cuda.to_json()
        entries.append(entry)
    info = {
        "path": archive.path, "file_size": archive.file_size, "format_version": m.format_version,
        "producer": m.producer, "target": m.target, "options": m.options, "frozen": m.frozen or {},
        "weights": {"count": len(m.weights), "bytes": sum(w.nbytes for w in m.weights),
                    "tensors": [{"name": w.name, "dtype": w.dtype, "shape": list(w.shape), "aliases": list(w.aliases),
                                 "state_dict": w.in_state_dict, **({"same_as": w.same_as} if w.same_as else {})}
                                for w in m.weights],
                    "unread": list(m.unread_weights),
                    "external": m.external_weights.to_json() if m.external_weights else None},
        "state": {"buffers": [r.to_json() for r in m.state], "bytes": sum(r.nbytes for r in m.state),
                  "positions": [p.to_json() for p in m.positions]} if m.state else None,
        "entries": entries,
        "blobs": [{"name": b.name, "size": b.size, "stored_size": b.stored_size, "compression": b.compression,
                   "sha256": b.sha256} for b in m.blobs],
    }
    if m.methods:
        info["methods"] = _methods(m)
        for method in info["methods"]:
            for i in method["entries"]:
                entries[i]["method"] = method["name"]
    return info


def _methods(m) -> list[dict]:
    """Per method: its entries, the weights its code reads (and which of them another method reads too), the
    state it writes and the state it only reads, its cache-position rules."""
    weight_names = {w.name for w in m.weights}
    state_names = {r.name for r in m.state}
    reads: list[set] = []
    for r in m.methods:
        names: set = set()
        for i in r.entries:
            names |= m.entries[i].weight_names()
        reads.append(names)
    out = []
    for k, r in enumerate(m.methods):
        others = set().union(*(reads[j] for j in range(len(reads)) if j != k))
        weights = sorted(reads[k] & weight_names)
        out.append({"name": r.name, "entries": list(r.entries), "weights": weights,
                    "shared_weights": [w for w in weights if w in others], "writes": list(r.writes),
                    "reads_state": sorted((reads[k] & state_names) - set(r.writes)),
                    "positions": [p.to_json() for p in r.positions], "example": r.example is not None})
    return out


def _extern_ops(archive: Archive, blob: Any) -> list[str]:
    """The ATen ops the entry's code runs through the proxy executor, in call order, each once."""
    if not isinstance(blob, str):
        return []
    try:
        nodes = parse_json(archive.read_blob(blob), "the extern-kernel description")["nodes"]
        return list(dict.fromkeys(str(n["node"]["target"]) for n in nodes))
    except (KeyError, TypeError):
        raise ArchiveError(f"blob {blob!r} is not an extern-kernel description", path=archive.path) from None


def _per_device(entries: list[dict]) -> str:
    """': 1 cpu + 1 cuda' for a pack with more than one kind of entry, else nothing."""
    counts: dict[str, int] = {}
    for e in entries:
        counts[str(e.get("device"))] = counts.get(str(e.get("device")), 0) + 1
    return f": {' + '.join(f'{n} {d}' for d, n in counts.items())}" if len(counts) > 1 else ""


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
        "shared by all entries), by their state_dict names:",
    ]
    for w in info["weights"].get("tensors", ()):
        notes = ([f"also {', '.join(w['aliases'])}"] if w["aliases"] else []) + \
            ([] if w["state_dict"] else ["not in the state_dict"]) + \
            ([f"the same tensor as {w['same_as']}"] if w.get("same_as") else [])
        lines.append(f"  weight {w['name']} {w['dtype']}{w['shape']}{' (' + '; '.join(notes) + ')' if notes else ''}")
    if info["weights"].get("external"):
        ext = info["weights"]["external"]
        lines.append(f"  kept beside the pack in {ext['file']} ({ext['size']:,} bytes, sha256 {ext['sha256'][:16]}); "
                     "load(pack, weights=PATH) names another place")
    if info["weights"].get("unread"):
        lines.append(f"  not read by the code: {', '.join(info['weights']['unread'])}")
    if info.get("state"):
        lines.extend(_state_lines(info["state"]))
    if info.get("methods"):
        lines.extend(_method_lines(info["methods"]))
    lines.append(f"entries:  {len(info['entries'])}{_per_device(info['entries'])} (tried in this order; the first whose "
                 "guards pass runs)")
    for e in info["entries"]:
        of = f" of {e['method']}" if "method" in e else ""
        lines.append(f"  entry {e['name']} [{e['device']}]{of}: library {e['library']['size']:,} bytes, "
                     f"{len(e['kernels'])} kernels, {e['constants']} constants")
        if "cuda" in e:
            lines.extend(_cuda_lines(e["cuda"]))
        for g in e["guards"]:
            lines.append(f"    guard  {g}")
        for w in e["writes"]:
            lines.append(f"    writes {w}: the pack writes into this input, as the model's forward does")
        if e["grad_mode_at_capture"] is not None:
            lines.append("    guard  inputs must not require grad under grad mode (a pack computes no gradients)")
        lines.append(f"    output {e['outputs']}")
        if "cuda" in e:
            lines.extend(_kernel_table(e["cuda"], e["kernels"]))
        else:
            for k in e["kernels"]:
                lines.append(f"    kernel {k}")
        for op in e["extern_kernels"]:
            lines.append(f"    aten   {op} (run by libtorch through the proxy executor)")
        for c, reads in e.get("folded_weights", {}).items():
            lines.append(f"    folded {c}: computed at load from {', '.join(reads)}")
        if e.get("packed_weights"):
            lines.append(f"    packed {len(e['packed_weights'])} weights into oneDNN's layout at load: "
                         f"{', '.join(e['packed_weights'])}")
    lines.append("blobs:")
    for b in info["blobs"]:
        stored = f"{b['stored_size']:>10,} stored ({b['compression']})" if b["compression"] != "none" \
            else f"{'':>10} stored as is"
        lines.append(f"  {b['name']:<28} {b['size']:>10,} bytes {stored}  sha256 {b['sha256'][:16]}")
    return "\n".join(lines)


def _state_lines(state: dict) -> list[str]:
    """The buffers a stateful pack's code writes between calls, and its cache-position checks."""
    lines = [f"state:    {len(state['buffers'])} buffers, {state['bytes']:,} bytes per session (each session of a "
             "loaded pack has its own copy; call through pkg.session())"]
    for r in state["buffers"]:
        init = "zeros" if r["init"] == "zeros" else f"initial value in {r['init']}"
        lines.append(f"  state  {r['name']}: {r['dtype']}{r['shape']}, starts as {init}")
    lines += ["  " + _position_line(p) for p in state["positions"]]
    return lines


def _position_line(p: dict) -> str:
    """A cache-position rule as ``inspect`` shows it."""
    span = p["span"] if isinstance(p["span"], int) else f"dim {p['span']['dim']} of {p['span']['input']!r}"
    return (f"cache positions in {p['input']!r}: each in 0..{p['limit'] - 1}, and the first + {span} "
            f"<= {p['limit']} (checked before every call)")


def _method_lines(methods: list[dict]) -> list[str]:
    """Each method: its entries, the weights it reads (those another method reads too are stored once and
    shared), the state it writes and reads, its cache-position checks."""
    lines = [f"methods:  {len(methods)} ({', '.join(m['name'] for m in methods)}; pkg.NAME(...), or s.NAME(...) "
             "in a session; all share the weights and the state)"]
    for m in methods:
        shared = m["shared_weights"]
        parts = [f"entries {', '.join(map(str, m['entries']))}",
                 f"reads {len(m['weights'])} weights"
                 + (f" ({len(shared)} shared: {', '.join(shared[:6])}{' ...' if len(shared) > 6 else ''})"
                    if shared else "")]
        if m["reads_state"]:
            parts.append(f"reads state {', '.join(m['reads_state'])}")
        if m["writes"]:
            parts.append(f"writes state {', '.join(m['writes'])}")
        lines.append(f"  method {m['name']}: {'; '.join(parts)}")
        lines += ["    " + _position_line(p) for p in m["positions"]]
    return lines


def _cuda_lines(cuda: dict) -> list[str]:
    """What a CUDA entry's code targets and how it was built."""
    targets = f"SASS {', '.join(cuda['archs'])}" if cuda["archs"] else "no SASS"
    targets += f", PTX {', '.join(cuda['ptx'])}" if cuda["ptx"] else ", no PTX"
    lines = [f"    cuda   {targets} (in every kernel); CUDA {cuda['cuda_version']}"]
    if cuda["built_without_gpu"]:
        lines.append("    cuda   built without a GPU: not autotuned, never run; smoke-test on the target")
    else:
        lines.append(f"    cuda   built on {cuda['build_gpu'] or 'a GPU'}, "
                     f"{'autotuned' if cuda['autotuned'] else 'not autotuned'}")
    return lines


def _kernel_table(cuda: dict, kernel_names: list) -> list[str]:
    """One row per GPU kernel, one column per architecture it may carry ('x': code for it, '-': none)."""
    kernels = cuda["kernels"]
    if not kernels:
        return ["    kernels: none (the entry's GPU work is library calls)"]
    columns: list[str] = []
    for key in ("archs", "ptx"):
        for k in kernels:
            columns.extend(a for a in k[key] if a not in columns)
    width = max(len("kernel"), *(len(k["name"]) for k in kernels))
    head = f"      {'kernel':<{width}}  " + "  ".join(columns) + f"  {'bytes':>10}  {'smem':>6}  warps"
    lines = ["    kernels per arch:", head.rstrip()]
    for k in kernels:
        have = set(k["archs"]) | set(k["ptx"])
        cells = "  ".join(f"{'x' if c in have else '-':<{len(c)}}" for c in columns)
        warps = "-" if k["num_warps"] is None else k["num_warps"]
        lines.append(f"      {k['name']:<{width}}  {cells}  {k['size']:>10,}  {k['shared_mem']:>6,}  {warps:>5}")
    listed = {k["name"] for k in kernels}
    lines.extend(f"    kernel {name}" for name in kernel_names if name not in listed)
    return lines
