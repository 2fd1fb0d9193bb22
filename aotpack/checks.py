"""``verify`` and ``diff``: the checks CI runs on packs. Neither imports the build side's compiler stack.

May not: import the compiler stack (Dynamo, Inductor): verify and diff run on hosts without it."""
from __future__ import annotations

import difflib
import os
import tempfile
from typing import Any

from aotpack_runtime import loader, platform
from aotpack_runtime import signature as rt_signature
from aotpack_runtime import weights as _weights
from aotpack_runtime.archive import Archive, open_pack, whole_file_sha256
from aotpack_runtime.errors import AotpackError
from aotpack_runtime.format import DEVICES


def _check(checks: list, name: str, fn, describe=None) -> Any:
    """Run one check; record it as ok (with ``describe(value)`` or the returned text) or failed."""
    try:
        value = fn()
    except AotpackError as e:
        checks.append({"check": name, "ok": False, "detail": str(e)})
        return None
    text = describe(value) if describe else (value if isinstance(value, str) else "ok")
    checks.append({"check": name, "ok": True, "detail": text})
    return value


def verify(path: str, against: str | None = None, tolerance: float = 1e-4, *, signature: str | None = None,
           public_key: str | None = None, roots: tuple[str, ...] = ()) -> dict:
    """Check a pack: its signature (with ``public_key``, or ``roots`` for a certificate signature; the
    signature file defaults to ``PATH.sig``), format and version, every hash, whether this host can run it,
    and (``against``, a model file) its outputs against eager on the model file's example inputs.

    The pack is opened once: the signature is checked against the sha256 of that open file, and the format,
    the hashes and the load read the same file. A failed check stops every check that would use what it
    vouches for: after a failed signature nothing else is read, and the native code is loaded only from a
    pack whose hashes matched on a host that can run it."""
    checks: list[dict] = []
    try:
        fd, st = open_pack(path)
    except AotpackError as e:
        checks.append({"check": "format", "ok": False, "detail": str(e)})
        return {"path": path, "ok": False, "checks": checks}
    if public_key is not None or roots:
        try:
            file_sha = whole_file_sha256(fd, st.st_size, path)
        except AotpackError:
            file_sha = None
        signed = _check(checks, "signature", lambda: _check_signature(path, signature, public_key, roots, file_sha),
                        lambda s: s.describe())
        if signed is None:
            os.close(fd)
            return {"path": path, "ok": False, "checks": checks}
    archive = _check(checks, "format", lambda: Archive.from_fd(path, fd, os.fstat(fd)),
                     lambda a: f"format version {a.manifest.format_version}, {len(a.manifest.blobs)} blobs")
    if archive is None:
        return {"path": path, "ok": False, "checks": checks}
    hashed = _check(checks, "hashes", lambda: archive.verify() or "every blob matches its sha256")
    host = _check(checks, "host", lambda: _check_host(archive))
    pkg = None
    if hashed is not None and host is not None:
        pkg = _check(checks, "load", lambda: _load_checked(archive),
                     lambda p: f"loaded {len(p.entries)} entr{'y' if len(p.entries) == 1 else 'ies'} without a "
                               "compiler")
    if against is not None and pkg is not None:
        _check(checks, "numerics", lambda: _compare(pkg, against, tolerance))
    return {"path": path, "ok": all(c["ok"] for c in checks), "checks": checks}


def _check_signature(path: str, signature: str | None, public_key: str | None, roots: tuple[str, ...],
                     file_sha256: str | None):
    """The signature's check against ``file_sha256``, the hash of the file this verify reads."""
    if file_sha256 is None:
        raise AotpackError("cannot read the pack to hash it")
    if roots:
        from .signing import check_certificate

        signed = check_certificate(path, signature, roots, file_sha256=file_sha256)
        if public_key is not None:  # both: the certified key must also be the one named
            signed = rt_signature.check(path, signature, public_key, file_sha256=file_sha256)
        return signed
    return rt_signature.check(path, signature, public_key, file_sha256=file_sha256)


def _check_host(archive) -> str:
    loader.check_host(archive)
    manifest = archive.manifest
    cuda = [e for e in manifest.entries if e.device == "cuda"]
    n_cpu = len(manifest.entries) - len(cuda)
    if not cuda:
        return "this host's CPU and torch can run the pack"
    reason = platform.cuda_unavailable_reason()
    if reason is not None:
        if n_cpu == 0:
            raise AotpackError(f"the pack has only CUDA entries and {reason}; verify it on a host with its GPU")
        return (f"this host's CPU and torch can run the pack's {n_cpu} CPU entr{'y' if n_cpu == 1 else 'ies'}; "
                f"its {len(cuda)} CUDA entr{'y' if len(cuda) == 1 else 'ies'} cannot run here ({reason})")
    import torch

    gpus = []
    for i in range(torch.cuda.device_count()):
        name, cap = torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i)
        for e in cuda:
            platform.check_cuda_device(e.cuda, i, name, cap, f"CUDA entry {e.name}")
        gpus.append(f"GPU {i} ({name}, sm_{cap[0]}{cap[1]})")
    return f"this host's CPU, torch and {', '.join(gpus)} can run the pack"


def _weight_sha(archive, w) -> str:
    """What tells a weight's value: its blob's sha256, or for a weight kept in a file beside the pack, that
    file's sha256 and the name of its tensor there."""
    if w.blob is None:
        return f"{archive.manifest.external_weights.sha256}:{w.file_name}"
    return archive.manifest.blob(w.blob).sha256


def _load_checked(archive):
    """The package of the archive this verify checked (its file, its checked hashes), loaded through a fresh
    code cache."""
    with tempfile.TemporaryDirectory(prefix="aotpack-verify-") as cache:
        external = archive.manifest.external_weights
        weights = None if external is None else _weights.load_external(
            archive, _weights.external_path(archive, None), external.sha256, os.path.join(cache, "c"), "full")
        return loader.serve(archive, os.path.join(cache, "c"), weights=weights)


def _compare(pkg, against: str, tolerance: float) -> str:
    import torch
    import torch.utils._pytree as pytree

    from .modelfile import load_model_file

    spec = load_model_file(against)
    kinds = {e.device for e in pkg.entries}
    devices = [d for d in DEVICES if d in kinds and (d == "cpu" or torch.cuda.is_available())]
    if not devices:
        raise AotpackError("no entry of the pack can run on this host, so its outputs cannot be compared")
    texts = []
    for device in devices:
        move = (lambda v: v.to(device) if isinstance(v, torch.Tensor) else v)
        model = spec.model.to(device) if isinstance(spec.model, torch.nn.Module) else spec.model
        if spec.methods is not None:
            # each method on its own example inputs, against the model's method
            from .methods import resolve

            for r in resolve(model, spec.methods):
                args, kwargs = pytree.tree_map(move, (r.example_inputs, r.example_kwargs))
                worst = _worst(getattr(pkg, r.name), r.call, args, kwargs, tolerance)
                texts.append(f"{device}, {r.name}: max relative error {worst:.2e}")
            continue
        args, kwargs = pytree.tree_map(move, (spec.example_inputs, spec.example_kwargs))
        texts.append(f"{device}: max relative error {_worst(pkg, model, args, kwargs, tolerance):.2e}")
    return f"matches eager on {against}'s example inputs ({'; '.join(texts)})"


def _worst(pkg, model, args, kwargs, tolerance: float) -> float:
    """The max error of the pack's outputs, and of what it writes into its inputs, relative to eager's.

    Each side runs on its own copy of the inputs: a model that writes into its inputs must find them as they
    were, and what each wrote is compared too."""
    import copy

    import torch
    import torch.utils._pytree as pytree

    pack_inputs, eager_inputs = copy.deepcopy((args, kwargs)), copy.deepcopy((args, kwargs))
    with torch.inference_mode():
        out = pkg(*pack_inputs[0], **pack_inputs[1])
        ref = model(*eager_inputs[0], **eager_inputs[1])
    a, a_spec = pytree.tree_flatten((out, pack_inputs))
    r, r_spec = pytree.tree_flatten((ref, eager_inputs))
    if a_spec != r_spec:
        raise AotpackError(f"output structure differs from eager: pack {a_spec}, eager {r_spec}")
    worst = 0.0
    for x, y in zip(a, r):
        if isinstance(y, torch.Tensor):
            if not isinstance(x, torch.Tensor) or x.shape != y.shape or x.dtype != y.dtype:
                raise AotpackError(f"output {_what(x)} differs from eager {_what(y)}")
            if not (y.dtype.is_floating_point or y.dtype.is_complex):
                if not torch.equal(x, y):
                    raise AotpackError(f"output {_what(x)} holds other values than eager's")
            elif y.numel():
                wide = torch.complex128 if y.dtype.is_complex else torch.float64
                worst = max(worst, ((x.to(wide) - y.to(wide)).abs().max() / y.to(wide).abs().max().clamp(min=1e-6))
                            .item())
        elif type(x) is not type(y):
            raise AotpackError(f"output value {x!r} differs from eager {y!r} in type")
        elif isinstance(y, float):
            worst = max(worst, abs(x - y) / max(abs(y), 1e-6))
        elif x != y:
            raise AotpackError(f"output value {x!r} differs from eager {y!r}")
    if worst > tolerance:
        raise AotpackError(f"max error relative to the output scale is {worst:.2e}, above {tolerance:.0e}")
    return worst


def _what(v: Any) -> str:
    return f"{list(v.shape)} {v.dtype}" if hasattr(v, "shape") else repr(v)


def _walk_diff(a: Any, b: Any, where: str, out: list) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            _walk_diff(a.get(k, _ABSENT), b.get(k, _ABSENT), f"{where}.{k}" if where else k, out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _walk_diff(x, y, f"{where}[{i}]", out)
    elif a != b:
        out.append({"where": where, "a": a, "b": b})


_ABSENT = "<absent>"
# How diff words a difference in what built a pack (producer fields read "built with NAME A vs B"), and the
# order it names them in.
_TOOLS = {"aotpack": "aotpack", "torch": "torch", "triton": "triton", "python": "Python"}
_ORDER = [*_TOOLS, "compiler", "platform"]


def _text(value: Any) -> str:
    if value == _ABSENT:
        return "(not recorded)"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    return str(value)


def _versions(name: str, a: Any, b: Any) -> str:
    """``built with g++ 12.2.0 vs 13.1.0``: the tool's name once when both sides name the same tool."""
    ta, tb = _text(a), _text(b)
    ha, _, ra = ta.partition(" ")
    hb, _, rb = tb.partition(" ")
    if not name and ha == hb and ra and rb:
        return f"built with {ha} {ra} vs {rb}"
    return f"built with {name + ' ' if name else ''}{ta} vs {tb}"


def _cause(section: str, key: str, a: Any, b: Any) -> str:
    """The plain words for a difference in one field of what built a pack."""
    if section == "producer":
        if key == "compiler":
            return _versions("", a, b)
        if key == "platform":
            return f"built on {_text(a)} vs {_text(b)}"
        return _versions(_TOOLS.get(key, key), a, b)
    if section == "target":
        if key == "cpu_isa":
            return f"built for CPU instruction set {_text(a)} vs {_text(b)}"
        if key == "cpu_flags" and isinstance(a, list) and isinstance(b, list):
            only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
            return (f"built for another native CPU (CPU flags only in a: {_text(only_a)}; "
                    f"only in b: {_text(only_b)})")
        return f"built for {key.replace('_', ' ')} {_text(a)} vs {_text(b)}"
    if key == "without_gpu":
        return "CUDA code built " + " vs ".join("without a GPU" if v is True else "on a GPU" if v is False
                                                else _text(v) for v in (a, b))
    words = {"devices": "devices", "cuda_archs": "CUDA architectures", "compression_level": "compression level"}
    return f"built with {words.get(key, 'option ' + key)} {_text(a)} vs {_text(b)}"


def causes(ma: dict, mb: dict) -> list[dict]:
    """What built two packs differently, in plain words, from their manifests: toolchain versions, platform,
    target, build options, format version, CUDA toolkit and build GPU. Each cause is ``{"where", "a", "b",
    "text"}``; a difference that only follows from another one (the torch series from the torch version,
    the requested ISA from the target ISA) is left out."""
    out: list[dict] = []

    def add(where: str, a: Any, b: Any, text: str) -> None:
        if all(c["text"] != text for c in out):
            out.append({"where": where, "a": a, "b": b, "text": text})

    for section in ("producer", "target", "options"):
        sa, sb = ma.get(section), mb.get(section)
        sa, sb = (sa if isinstance(sa, dict) else {}), (sb if isinstance(sb, dict) else {})
        for key in sorted(set(sa) | set(sb), key=lambda k: (_ORDER.index(k) if k in _ORDER else len(_ORDER), k)):
            a, b = sa.get(key, _ABSENT), sb.get(key, _ABSENT)
            if a == b:
                continue
            if (section, key) == ("target", "torch_series") and ma.get("producer", {}).get("torch") != \
                    mb.get("producer", {}).get("torch"):
                continue
            if (section, key) == ("options", "cpu_isa") and sa.get(key) == ma.get("target", {}).get("cpu_isa") \
                    and sb.get(key) == mb.get("target", {}).get("cpu_isa"):
                continue
            add(f"{section}.{key}", a, b, _cause(section, key, a, b))
    if ma.get("format_version") != mb.get("format_version"):
        add("format_version", ma.get("format_version"), mb.get("format_version"),
            f"written as format version {_text(ma.get('format_version'))} vs {_text(mb.get('format_version'))}")
    ea, eb = ma.get("entries") or [], mb.get("entries") or []
    for i, (x, y) in enumerate(zip(ea, eb)):
        cx = x.get("cuda") if isinstance(x, dict) and isinstance(x.get("cuda"), dict) else {}
        cy = y.get("cuda") if isinstance(y, dict) and isinstance(y.get("cuda"), dict) else {}
        for key, words in (("cuda_version", "built with CUDA"), ("build_gpu", "built on GPU")):
            # A CPU entry against a CUDA one is said by the devices; no build GPU by --without-gpu.
            if cx.get(key) is not None and cy.get(key) is not None and cx[key] != cy[key]:
                add(f"entries[{i}].cuda.{key}", cx.get(key), cy.get(key),
                    f"{words} {_text(cx.get(key))} vs {_text(cy.get(key))}")
    return out


def diff(path_a: str, path_b: str, context: int = 3) -> dict:
    """Explain how two packs differ: first the causes (what built them differently: toolchain, platform,
    target, options), then manifest fields, weights, entries and guards, blobs, and a unified diff of
    generated source. ``equal`` is True when the files are byte-identical."""
    a, b = Archive.open(path_a), Archive.open(path_b)
    with open(path_a, "rb") as fa, open(path_b, "rb") as fb:
        identical = fa.read() == fb.read()
    fields: list[dict] = []
    ma, mb = a.manifest.raw, b.manifest.raw
    known = ("format_version", "producer", "target", "options", "frozen")
    # then every other section but those compared below (methods, state, example, unread_weights...)
    others = sorted((set(ma) | set(mb)) - set(known) - {"weights", "entries", "blobs"})
    for section in (*known, *others):
        _walk_diff(ma.get(section), mb.get(section), section, fields)
    wa = {w.name: (w, _weight_sha(a, w)) for w in a.manifest.weights}
    wb = {w.name: (w, _weight_sha(b, w)) for w in b.manifest.weights}
    weights = []
    for name in sorted(set(wa) | set(wb)):
        if name not in wa or name not in wb:
            weights.append({"weight": name, "change": "only in " + ("b" if name in wb else "a")})
        elif wa[name][0].dtype != wb[name][0].dtype or wa[name][0].shape != wb[name][0].shape:
            weights.append({"weight": name, "change": f"{wa[name][0].dtype}{list(wa[name][0].shape)} -> "
                                                      f"{wb[name][0].dtype}{list(wb[name][0].shape)}"})
        elif wa[name][1] != wb[name][1]:
            weights.append({"weight": name, "change": "values differ (sha256 "
                                                      f"{wa[name][1][:12]} -> {wb[name][1][:12]})"})
        elif wa[name][0].aliases != wb[name][0].aliases or wa[name][0].in_state_dict != wb[name][0].in_state_dict:
            weights.append({"weight": name, "change": f"aliases {list(wa[name][0].aliases)} -> "
                                                      f"{list(wb[name][0].aliases)}, in the state_dict "
                                                      f"{wa[name][0].in_state_dict} -> {wb[name][0].in_state_dict}"})
    entries: list[dict] = []
    for i in range(max(len(ma["entries"]), len(mb["entries"]))):
        ea = ma["entries"][i] if i < len(ma["entries"]) else {}
        eb = mb["entries"][i] if i < len(mb["entries"]) else {}
        _walk_diff({k: v for k, v in ea.items() if k not in ("library", "sources")},
                   {k: v for k, v in eb.items() if k not in ("library", "sources")}, f"entries[{i}]", entries)
    ba = {x.name: x for x in a.manifest.blobs}
    bb = {x.name: x for x in b.manifest.blobs}
    blobs = []
    sources = []
    for name in sorted(set(ba) | set(bb)):
        x, y = ba.get(name), bb.get(name)
        if x is None or y is None:
            blobs.append({"blob": name, "change": "only in " + ("b" if x is None else "a")})
        elif x.sha256 != y.sha256:
            blobs.append({"blob": name, "change": f"{x.size} -> {y.size} bytes, sha256 {x.sha256[:12]} -> "
                                                  f"{y.sha256[:12]}"})
            if name.startswith("source/"):
                text = difflib.unified_diff(a.read_blob(name).decode(errors="replace").splitlines(),
                                            b.read_blob(name).decode(errors="replace").splitlines(),
                                            f"a/{name}", f"b/{name}", lineterm="", n=context)
                sources.append({"blob": name, "diff": "\n".join(text)})
    differs = bool(fields or weights or entries or blobs) or not identical
    return {"a": path_a, "b": path_b, "equal": not differs, "byte_identical": identical,
            "causes": causes(ma, mb), "fields": fields, "weights": weights, "entries": entries,
            "blobs": blobs, "sources": sources}


def render_diff(d: dict) -> str:
    if d["equal"]:
        return f"{d['a']} and {d['b']} are identical"
    lines = [f"{d['a']} and {d['b']} differ:"]
    for c in d["causes"]:
        lines.append(f"  cause: {c['text']}")
    if not d["causes"] and not (d["weights"] or d["entries"]):
        lines.append("  cause: none recorded (same aotpack, torch, Python, compiler, platform, target and options, "
                     "same weights and guards): the model's code, or a build input the pack does not record, differs")
    for f in d["fields"]:
        lines.append(f"  manifest {f['where']}: {f['a']!r} -> {f['b']!r}")
    for w in d["weights"]:
        lines.append(f"  weight {w['weight']}: {w['change']}")
    for e in d["entries"]:
        lines.append(f"  {e['where']}: {e['a']!r} -> {e['b']!r}")
    for b in d["blobs"]:
        lines.append(f"  blob {b['blob']}: {b['change']}")
    if not (d["fields"] or d["weights"] or d["entries"] or d["blobs"]):
        lines.append("  same manifest content, but the bytes differ (padding or compression)")
    for s in d["sources"]:
        lines.append(s["diff"])
    return "\n".join(lines)


def render_verify(v: dict) -> str:
    lines = [f"{v['path']}: {'OK' if v['ok'] else 'FAILED'}"]
    for c in v["checks"]:
        lines.append(f"  [{'ok' if c['ok'] else 'FAIL'}] {c['check']}: {c['detail']}")
    return "\n".join(lines)
