"""docs/FORMAT.md matches the code: its constants, its header table, and its entry example parses."""
from __future__ import annotations

import json
import pathlib
import re

import pytest

from aotpack_runtime import format as fmt
from aotpack_runtime import schema
from aotpack_runtime.errors import ArchiveError
from aotpack_runtime.guards import EntryGuards

DOC = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md").read_text()


def test_version_and_range():
    assert f"# The aotpack archive format, version {fmt.FORMAT_VERSION}" in DOC
    assert f"(today `{fmt.MIN_READ_VERSION}..{fmt.FORMAT_VERSION}`)" in DOC


def test_header_table():
    assert fmt.MAGIC == b"AOTPACK\x00" and "magic `AOTPACK\\0`" in DOC
    assert fmt.HEADER_SIZE == 56 and "| 56 | M | manifest" in DOC
    assert fmt.ALIGN == 64 and "multiple of 64" in DOC
    assert fmt.MAX_MANIFEST_BYTES == 16 * 1024 * 1024 and "at most 16 MiB" in DOC
    assert fmt.MAX_BLOB_BYTES == 2**40 and "each offset and size at most 2^40, 1 TiB" in DOC


def _doc_entry() -> dict:
    """The example of "Entries"."""
    blocks = re.findall(r"```json\n(.*?)```", DOC, re.S)
    return json.loads(next(b for b in blocks if b.lstrip().startswith('{\n  "name"')))


def test_entry_example_is_valid():
    entry = _doc_entry()
    guards = EntryGuards.from_json(entry, "doc")
    assert guards.leaves[0].describe(guards.symbols) == "float32[4, 3, 32, 32] cpu contiguous"
    record = schema.EntryRecord.from_json(entry, "doc", {"code/0.so": 100})
    assert record.to_json() == entry and record.constants == {"head_weight": "head.weight"}
    with pytest.raises(ArchiveError, match="refers to blob 'code/0.so', which the blob table lacks"):
        schema.EntryRecord.from_json(entry, "doc", {})


def test_version_4_example_is_valid_and_needs_version_4():
    blocks = re.findall(r"```json\n(.*?)```", DOC, re.S)
    entry = json.loads(next(b for b in blocks if '"extern_kernels"' in b))
    guards = EntryGuards.from_json(entry, "doc")
    assert [g.describe(guards.symbols) for g in guards.leaves] == [
        "float32[n>=2, 3] cpu contiguous, written in place", "float32[n + 1, 3] cpu contiguous"]
    features = fmt.v4_features({"entries": [entry]})
    assert len(features) == 5 and fmt.version_for({"entries": [entry]}) == 4
    for word in ("without an upper bound", "polynomial", "writes into", "Python number", "proxy executor"):
        assert any(word in f for f in features), word
    listed = DOC.split("## Version 4", 1)[1].split("```json", 1)[0]
    assert all(d in listed for d in fmt.DTYPE_VERSIONS) and all(d in DOC for d in fmt.DTYPES)


def test_version_for_picks_the_oldest_version_that_describes_the_pack():
    """As the "Versions" paragraph says: 1 for CPU entries, 2 with a CUDA entry, 3 with state, 4 with any
    version-4 feature (a version-3 reader refuses such a pack by its version number)."""
    cpu, cuda = {"device": "cpu", "leaves": []}, {"device": "cuda", "leaves": []}
    count = {"name": "count", "dtype": "float32", "shape": [], "init": "zeros"}
    state = {"buffers": [count], "positions": []}
    assert fmt.version_for({"entries": [cpu]}) == 1
    assert fmt.version_for({"entries": [cpu, cuda]}) == 2
    assert fmt.version_for({"entries": [cuda], "state": state}) == fmt.STATE_FORMAT_VERSION == 3
    assert fmt.version_for({"entries": [dict(cpu, extern_kernels="code/0.json")]}) == 4
    assert fmt.version_for({"entries": [cpu], "state": {"buffers": [dict(count, dtype="complex32")]}}) == 4
    assert fmt.version_for({"entries": [cpu], "weights": [{"dtype": "uint16"}]}) == 4
    assert fmt.BREADTH_FORMAT_VERSION == 4
    assert "else 4 for a\npack that uses any version-4 feature, else 3 for a pack with state" in DOC


def test_methods_example_is_valid_and_needs_version_5():
    """The "Methods (version 5)" example: a reader takes it (with entries and state buffers for its
    indices and names), and a manifest with methods is written as version 5."""
    block = next(b for b in re.findall(r"```json\n(.*?)```", DOC, re.S) if b.lstrip().startswith('"methods"'))
    methods = json.loads("{" + block + "}")["methods"]
    methods[0]["example"] = None
    state = {"buffers": [{"name": n, "dtype": "float32", "shape": [1], "init": "zeros"}
                         for n in ("cross_k_cache", "cross_v_cache", "self_k_cache", "self_v_cache")],
             "positions": []}
    obj = {"methods": methods, "state": state}
    assert fmt.v5_features(obj) == ["several methods (methods)"] and fmt.version_for(obj) == 5
    records = schema._methods(obj, 5, 3)
    assert [(r.name, r.entries) for r in records] == [("encode", (0,)), ("decode", (1, 2))]
    assert records[1].positions[0].limit == 8 and records[0].writes == ("cross_k_cache", "cross_v_cache")
    assert fmt.V5_FORMAT_VERSION == 5 and "## Methods (version 5)" in DOC


def test_new_weights_example_is_valid_at_any_version_and_external_weights_need_version_5():
    """The example of "New weights" is read at any version (an older reader ignores its fields), and
    round-trips; weights beside the pack need version 5, and a version-4 manifest that uses them is refused."""
    blocks = re.findall(r"```json\n(.*?)```", DOC, re.S)
    example = json.loads(next(b for b in blocks if '"unread_weights"' in b))
    cpu = {"device": "cpu", "leaves": []}
    assert fmt.v5_features(example) == [] and fmt.version_for(dict(example, entries=[cpu])) == 1
    blob = lambda n, size: {"name": n, "offset": 0, "stored_size": size, "size": size, "sha256": "0" * 64,
                            "compression": "none"}
    manifest = {"format": "aotpack", "format_version": 5, "producer": {}, "target": {}, "options": {},
                "entries": [dict(_doc_entry(), constants={})],
                "blobs": [blob("weights/0", 160), dict(blob("weights/1", 4), offset=192),
                          dict(blob("code/0.so", 8), offset=256)], **example}
    m = schema.Manifest.from_json(manifest)
    assert m.weights[0].aliases == ("head.weight",) and not m.weights[1].in_state_dict
    assert m.unread_weights == ("unused.bias", "unused.weight")
    out = m.to_json()
    assert (out["weights"], out["unread_weights"]) == (example["weights"], example["unread_weights"])
    assert schema.Manifest.from_json(dict(manifest, format_version=1)).weights[0].aliases == ("head.weight",)
    external = {"file": "model.safetensors", "sha256": "a" * 64, "size": 1000}
    apart = dict(manifest, blobs=manifest["blobs"][2:], external_weights=external,
                 weights=[{k: v for k, v in w.items() if k != "blob"} for w in example["weights"]])
    assert fmt.v5_features(apart) == ["weights in a file beside the pack (external_weights)"]
    m = schema.Manifest.from_json(apart)
    with pytest.raises(ArchiveError, match="version 5 introduced, but it says format version 4"):
        schema.Manifest.from_json(dict(apart, format_version=4))
    assert m.external_weights.to_json() == external and all(w.blob is None for w in m.weights)
    with pytest.raises(ArchiveError, match="names blob 'weights/0', but the pack keeps its weights in"):
        schema.Manifest.from_json(dict(apart, weights=example["weights"], blobs=manifest["blobs"]))
    with pytest.raises(ArchiveError, match="names no blob, and the pack has no external weights file"):
        schema.Manifest.from_json({k: v for k, v in apart.items() if k != "external_weights"})
    with pytest.raises(ArchiveError, match="is not a file name"):
        schema.Manifest.from_json(dict(apart, external_weights=dict(external, file="../w.safetensors")))
    assert "### Weights beside the pack" in DOC and '"file": NAME, "sha256": HEX, "size": N' in DOC
    with pytest.raises(ArchiveError, match="'unused.bias' twice"):
        schema.Manifest.from_json(dict(manifest, unread_weights=["unused.bias", "unused.bias"]))


def test_the_schema_needs_no_torch():
    """The writer and the reader share the schema; it checks data and needs nothing but the format module."""
    from conftest import run_python

    proc = run_python("import sys; sys.modules['torch'] = None\n"
                      "from aotpack_runtime import schema\n"
                      "print(' '.join(sorted(m for m in sys.modules if m.startswith('aotpack'))))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["aotpack_runtime", "aotpack_runtime.errors", "aotpack_runtime.format",
                                   "aotpack_runtime.schema", "aotpack_runtime.symbolic"]


def test_packed_weights_example_is_read_at_any_version():
    """The example of "Packed weights" is what the loader checks and packs by (a record for a weight of the
    shape the convolution needs), in a manifest of any version."""
    blocks = re.findall(r"```json\n(.*?)```", DOC, re.S)
    example = json.loads(next(b for b in blocks if '"packed_weights"' in b))
    weight = schema.WeightRecord(name="features.4.weight", blob="weights/0", dtype="float32", shape=(32, 16, 3, 3))
    constants = {"features_4_weight": "features.4.weight"}
    packed = schema.packed_weights_from_json(example, "doc", "cpu", constants)
    assert packed == {"features_4_weight": schema.PackedWeightRecord("onednn_conv", (1, 1), (1, 1), (1, 1), 1,
                                                                     (4, 16, 16, 16))}
    packed["features_4_weight"].check_weight(weight, weight.name, "doc")  # the weight fits: no error
    assert {c: p.to_json() for c, p in packed.items()} == example["packed_weights"]
    assert fmt.v4_features({"entries": [example]}) == [] and fmt.v5_features({"entries": [example]}) == []
    with pytest.raises(ArchiveError, match="only CPU entries have packed weights"):
        schema.packed_weights_from_json(example, "doc", "cuda", constants)


def test_packed_linear_example_is_read_and_needs_version_7():
    """The second example of "Packed weights": a linear's weight packed for oneDNN, checked against the weight
    it names, and written as version 7 (a version-6 reader would refuse its kind)."""
    blocks = re.findall(r"```json\n(.*?)```", DOC, re.S)
    example = json.loads(next(b for b in blocks if '"onednn_linear"' in b))
    constants = {"encoder_0_query_weight": "encoder.0.query.weight"}
    packed = schema.packed_weights_from_json(example, "doc", "cpu", constants)
    assert packed == {"encoder_0_query_weight": schema.PackedWeightRecord("onednn_linear", rows=64)}
    assert {c: p.to_json() for c, p in packed.items()} == example["packed_weights"]
    weight = schema.WeightRecord(name="encoder.0.query.weight", blob="weights/0", dtype="float32", shape=(256, 256))
    packed["encoder_0_query_weight"].check_weight(weight, weight.name, "doc")  # fits: no error
    for bad in (schema.WeightRecord(name="w", blob="b", dtype="float32", shape=(256, 256, 1)),
                schema.WeightRecord(name="w", blob="b", dtype="float16", shape=(256, 256))):
        with pytest.raises(ArchiveError, match="for a linear; expected a float32 weight"):
            packed["encoder_0_query_weight"].check_weight(bad, "w", "doc")
    for rows in (0, 2**31, "64"):
        with pytest.raises(ArchiveError, match="rows"):
            schema.PackedWeightRecord.from_json({"kind": "onednn_linear", "rows": rows}, "doc")
    assert fmt.v7_features({"entries": [example]}) == [
        "linear weights packed at load (packed_weights of kind onednn_linear)"]
    assert fmt.version_for({"entries": [example]}) == fmt.V7_FORMAT_VERSION == fmt.FORMAT_VERSION == 7


def test_the_transpose_fold_step_needs_version_7_and_a_2d_input():
    """``transpose`` (version 7): a linear's weight stored [in, out] folded into the [out, in] constant."""
    import torch

    from aotpack_runtime.entries import fold_weight

    assert "`transpose` (version 7) swaps the two dims of a 2-d input" in DOC
    entry = {"folded_weights": {"_aotpack_folded_0": {"dtype": "float32", "shape": [512, 128], "steps": [
        {"op": "weight", "name": "c.weight"}, {"op": "transpose", "in": [0]}]}}}
    folded = schema.folded_weights_from_json(entry, "doc", "cpu", {"_aotpack_folded_0": "_aotpack_folded_0"})
    record = folded["_aotpack_folded_0"]
    record.check_shapes({"c.weight": schema.WeightRecord(name="c.weight", blob="b", dtype="float32",
                                                         shape=(128, 512))}, "doc")
    w = torch.randn(128, 512)
    out = fold_weight(record, {"c.weight": w})
    assert torch.equal(out, w.t()) and out.is_contiguous()
    with pytest.raises(ArchiveError, match="transposes a 3-d tensor; it takes a 2-d one"):
        record.check_shapes({"c.weight": schema.WeightRecord(name="c.weight", blob="b", dtype="float32",
                                                             shape=(4, 128, 512))}, "doc")
    assert fmt.v7_features({"entries": [entry]}) == ["a weight transposed at load (the fold step transpose)"]
    assert fmt.version_for({"entries": [entry]}) == 7


def test_folded_weights_example_is_what_the_loader_computes_and_needs_version_6():
    """The example of "Folded weights (version 6)": a batch norm's scale folded into a convolution's weight,
    checked against the weights it reads, computed as folding by hand computes it, and written as version 6."""
    import torch

    from aotpack_runtime.entries import fold_weight

    blocks = re.findall(r"```json\n(.*?)```", DOC, re.S)
    example = json.loads(next(b for b in blocks if '"folded_weights"' in b))
    folded = schema.folded_weights_from_json(example, "doc", "cpu", {"_aotpack_folded_0": "_aotpack_folded_0"})
    record = folded["_aotpack_folded_0"]
    weights = {"features.0.weight": (16, 3, 3, 3), "features.1.running_var": (16,), "features.1.weight": (16,)}
    record.check_shapes({n: schema.WeightRecord(name=n, blob="b", dtype="float32", shape=s)
                         for n, s in weights.items()}, "doc")
    assert record.weight_names == tuple(weights) and record.to_json() == example["folded_weights"]["_aotpack_folded_0"]
    tensors = {n: torch.rand(s) + 0.5 for n, s in weights.items()}
    scale = tensors["features.1.weight"] / torch.sqrt(tensors["features.1.running_var"] + 1e-05)
    torch.testing.assert_close(fold_weight(record, tensors), tensors["features.0.weight"] * scale.reshape(-1, 1, 1, 1))
    assert fmt.v6_features({"entries": [example]}) == ["weights folded at load (folded_weights)"]
    assert fmt.version_for({"entries": [example]}) == fmt.V6_FORMAT_VERSION == 6
    assert "## Entries" in DOC and "### Folded weights (version 6)" in DOC
    with pytest.raises(ArchiveError, match="only CPU entries have folded weights"):
        schema.folded_weights_from_json(example, "doc", "cuda", {"_aotpack_folded_0": "_aotpack_folded_0"})
