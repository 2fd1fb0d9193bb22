"""What models exported by torch.export need beyond plain tensors in and out (format version 4): unbounded and
derived dims, inputs written in place, Python numbers as outputs, ATen ops served by the proxy executor,
more dtypes; and that the writer can never write what its reader refuses. The models themselves are in the
corpus (tests/corpus.py, tests/test_corpus.py); these tests check the exact messages, records and checks."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import aotpack
import corpus
from aotpack import compile as compile_stage
from aotpack import package
from aotpack_runtime import format as fmt
from aotpack_runtime import schema
from aotpack_runtime.archive import Archive
from aotpack_runtime.describe import describe, render
from aotpack_runtime.errors import ArchiveError, BuildError
from aotpack_runtime.guards import DTYPE_BY_NAME, EntryGuards, dtype_name, stored_dtype
from helpers import assert_facts


def _entry(leaves: list, symbols: dict, names: list) -> EntryGuards:
    return EntryGuards.from_json({
        "inputs": {"type": "tuple", "children": [{"type": "tuple", "children": [{"type": "leaf"}] * len(leaves)},
                                                 {"type": "dict", "keys": [], "children": []}]},
        "leaves": [dict(leaf, kind="tensor", path=f"args[{i}]", name=n, dtype="float32", device="cpu",
                        requires_grad=False) for i, (leaf, n) in enumerate(zip(leaves, names))],
        "symbols": symbols, "param_names": names}, "test")


# -- guards: unbounded and derived dims (no build needed) ----------------------------------------------------

DERIVED = _entry([{"sizes": ["dx", 3], "strides": [3, 1]},
                  {"sizes": [[[1, "dx"], [1]], 3], "strides": [3, 1]},
                  {"sizes": [2, [[2, "dz"]]], "strides": [[[2, "dz"]], 1]}],
                 {"dx": [2, 40], "dz": [2, None]}, ["x", "y", "z"])


def test_derived_dims_bind_and_check():
    ok = (torch.rand(5, 3), torch.rand(6, 3), torch.rand(2, 14))
    assert DERIVED.match(ok, {}) is not None
    cases = [  # the input, then the facts of its error: where, what, actual, expected (and why), what to do
        ((torch.rand(5, 3), torch.rand(7, 3), torch.rand(2, 14)),
         ("input 'y' (args[1]) dim 0 (dx + 1)", "is 7", "expected 6", "dx is 5 in input 'x' (args[0]) dim 0")),
        ((torch.rand(5, 3), torch.rand(6, 3), torch.rand(2, 13)),
         ("input 'z' (args[2]) dim 1 (2*dz)", "is 13", "never 13 for an integer dz")),
        ((torch.rand(5, 3), torch.rand(6, 3), torch.rand(2, 2)),
         ("input 'z' (args[2]) dim 1 (2*dz)", "is 2", "dz would be 1", "below 2")),
        ((torch.rand(41, 3), torch.rand(42, 3), torch.rand(2, 14)),
         ("input 'x' (args[0]) dim 0 (dx)", "is 41", "above 40")),
        ((torch.rand(5, 3), torch.rand(6, 3), torch.rand(14, 2).t()),
         ("input 'z' (args[2]) stride mismatch at dim 1", "expected 1", "actual 2", "strides (1, 2)",
          ".contiguous()")),
        ((torch.rand(5, 3), torch.rand(6, 3), torch.rand(2, 15)[:, :14]),
         ("input 'z' (args[2]) stride mismatch at dim 0", "expected 14", "actual 15", "strides (15, 1)",
          ".contiguous()")),
    ]
    for args, facts in cases:
        assert DERIVED.match(args, {}) is None
        assert_facts(DERIVED.explain(args, {}), *facts)
    assert DERIVED.match((torch.rand(5, 3), torch.rand(6, 3), torch.rand(2, 2 * 10**6)), {}) is not None


def test_derived_size_before_its_symbol():
    """The derived size comes first in the inputs; the plain one binds the symbol, then the derived one checks."""
    g = _entry([{"sizes": [[[2, "n"], [-1]]], "strides": [1]}, {"sizes": ["n"], "strides": [1]}],
               {"n": [1, 10]}, ["a", "b"])
    assert g.match((torch.rand(7), torch.rand(4)), {}) is not None
    assert_facts(g.explain((torch.rand(8), torch.rand(4)), {}), "input 'a' (args[0]) dim 0 (2*n - 1)", "is 8",
                 "expected 7", "n is 4 in input 'b' (args[1]) dim 0")


def test_unbounded_symbol_is_checked_from_below_only():
    g = _entry([{"sizes": ["n", 6], "strides": [6, 1]}], {"n": [2, None]}, ["x"])
    assert g.match((torch.rand(10**6, 6),), {}) is not None
    assert_facts(g.explain((torch.rand(1, 6),), {}), "input 'x' (args[0]) dim 0 (n)", "is 1", "below 2")
    assert g.label() == "n >= 2"
    assert g.leaves[0].describe(g.symbols) == "float32[n>=2, 6] cpu contiguous"


def test_an_input_the_pack_writes_must_not_share_memory_with_another():
    g = _entry([{"sizes": [4], "strides": [1], "mutated": True}, {"sizes": [4], "strides": [1]}], {}, ["x", "out"])
    base = torch.rand(8)
    assert g.match((base[:4], base[4:].clone()), {}) is not None
    assert g.match((base[:4], base[4:]), {}) is not None  # one storage, separate bytes
    assert g.match((base[:4], base[2:6]), {}) is None
    assert_facts(g.explain((base[:4], base[2:6]), {}), "input 'x' (args[0])", "shares memory",
                 "input 'out' (args[1])", "writes into args[0]", ".clone()")


@pytest.mark.parametrize("bad,message", [
    ({"n": [2, 1]}, r"symbols\['n'\] must be \[min, max\] with 0 <= min <= max, or \[min, null\]"),
    ({"n": [None, 3]}, r"symbols\['n'\] must be"),
])
def test_symbol_ranges_are_checked(bad, message):
    with pytest.raises(ArchiveError, match=message):
        _entry([{"sizes": ["n"], "strides": [1]}], bad, ["x"])


@pytest.mark.parametrize("sizes,message", [
    ([[[1, "m"]]], r"monomial must be \[coefficient, symbol, \.\.\.\] over the entry's symbols"),
    ([[[2]]], "a polynomial size must name a symbol"),
    ([[[1, "n"], [1, "n"]]], "lists the monomial n twice"),
    ([[]], "a polynomial must be a list of at most 64 monomials"),
])
def test_polynomial_sizes_are_checked(sizes, message):
    with pytest.raises(ArchiveError, match=message):
        _entry([{"sizes": sizes, "strides": [1]}], {"n": [1, 4]}, ["x"])


# -- the dtype table: one for the writer and the reader -------------------------------------------------------

def test_every_torch_dtype_is_stored_exactly_or_refused():
    dtypes = [v for v in vars(torch).values() if isinstance(v, torch.dtype)]
    stored = {d: stored_dtype(d) for d in dtypes}
    assert set(fmt.DTYPES) == {n for n in stored.values() if n is not None}
    for d, name in stored.items():
        if name is not None:
            assert DTYPE_BY_NAME[name] is d and fmt.DTYPES[name] == torch.empty((), dtype=d).element_size()
            assert dtype_name(d) == name
    assert stored[torch.complex32] == "complex32" and stored[torch.float8_e8m0fnu] is None


def _manifest(**entry_changes) -> dict:
    entry = {"name": "0", "device": "cpu", "library": "code/0.so", "constants": {}, "kernels": [], "sources": [],
             "inputs": {"type": "tuple", "children": [{"type": "tuple", "children": [{"type": "leaf"}]},
                                                      {"type": "dict", "keys": [], "children": []}]},
             "leaves": [{"kind": "tensor", "path": "args[0]", "name": "x", "dtype": "float32", "device": "cpu",
                         "sizes": [2], "strides": [1], "requires_grad": False}],
             "symbols": {}, "param_names": ["x"], "grad_mode": False,
             "outputs": {"type": "leaf"}, "output_leaves": [{"kind": "tensor", "index": 0}]}
    entry.update(entry_changes)
    return {"producer": {"torch": torch.__version__}, "target": {}, "options": {}, "weights": [],
            "entries": [entry], "example": None, "frozen": {}}


def test_writer_refuses_what_its_reader_refuses(tmp_path):
    """The writer runs the reader's checks on every entry: a manifest the reader refuses is never written."""
    out = tmp_path / "bad.pack"
    bad = _manifest(output_leaves=[{"kind": "scalar", "index": 0, "type": "complex"}])
    with pytest.raises(BuildError) as info:
        package.write_archive(out, bad, [package.Blob("code/0.so", b"\x7fELF")], 3)
    assert_facts(str(info.value), "reader's check", "manifest.entries[0].output_leaves[0].type", "'complex'",
                 "int, float, bool", "a bug")
    assert not out.exists()
    with pytest.raises(BuildError, match="refers to blob 'code/0.json', which the blob table lacks"):
        package.write_archive(out, _manifest(extern_kernels="code/0.json"), [package.Blob("code/0.so", b"x")], 3)


@pytest.mark.parametrize("change,feature", [
    ({"symbols": {"n": [1, None]}, "leaves": None}, "a symbol without an upper bound"),
    ({"output_leaves": [{"kind": "scalar", "index": 0, "type": "float"}]}, "an output that is a Python number"),
    ({"extern_kernels": "code/0.json"}, "ATen ops run through the proxy executor"),
    ({"leaves": [{"kind": "tensor", "path": "args[0]", "name": "x", "dtype": "complex32", "device": "cpu",
                  "sizes": [2], "strides": [1], "requires_grad": False}]}, "the dtype complex32"),
    ({"leaves": [{"kind": "tensor", "path": "args[0]", "name": "x", "dtype": "float32", "device": "cpu",
                  "sizes": [2], "strides": [1], "requires_grad": False, "mutated": True}]}, "an input the pack writes"),
    ({"leaves": [{"kind": "tensor", "path": "args[0]", "name": "x", "dtype": "float32", "device": "cpu",
                  "sizes": [[[2, "n"]]], "strides": [1], "requires_grad": False}]},
     "a size or stride that is a polynomial"),
])
def test_version_4_features_decide_the_version(change, feature):
    change = {k: v for k, v in change.items() if v is not None}
    manifest = _manifest(**change)
    assert fmt.v4_features(_manifest()) == [] and fmt.version_for(_manifest()) == 1
    assert any(f.startswith(feature) for f in fmt.v4_features(manifest))
    assert fmt.version_for(manifest) == 4
    assert fmt.version_for(dict(manifest, state={"buffers": [{"name": "s", "dtype": "float32", "shape": [],
                                                              "init": "zeros"}]})) == 4
    # A reader refuses a manifest that uses a version-4 feature but says it is older (state's version too).
    for older in (2, 3):
        body = dict(manifest, format="aotpack", format_version=older, blobs=[])
        with pytest.raises(ArchiveError, match=rf"which format version 4 introduced, but it says format version {older}"):
            schema.Manifest.from_json(body)


# -- the corpus pack: records and messages of a real build ----------------------------------------------------

def test_inspect_shows_written_inputs_ranges_and_aten_ops(corpus_pack):
    info = describe(Archive.open(corpus_pack.path))
    dynamic, static = info["entries"]
    guards = {g.split(" (")[1].split(")")[0]: g.split(": ", 1)[1] for g in dynamic["guards"] if "==" not in g}
    assert guards["args[1]['dyn_unbounded'][0]"] == "float32[n>=0, 6] cpu contiguous"
    assert guards["args[1]['dyn_derived'][1]"] == "float32[dx + 1, 3] cpu contiguous"
    assert guards["args[1]['dyn_derived'][2]"] == "float32[2, 2*dz] cpu contiguous"
    assert guards["args[1]['dyn_auto'][0]"].startswith("float32[2, d")
    assert dynamic["symbols"]["dz"] == [2, None] and dynamic["symbols"]["dx"] == [2, 40]
    text = render(info)
    assert "    writes inputs (args[1]['inplace_inputs'][1]): the pack writes into this input" in text
    assert "    aten   aten::_unique2 (run by libtorch through the proxy executor)" in text
    assert "written in place" in "\n".join(static["guards"])


def test_plain_attributes_are_weights_under_their_names(corpus_pack):
    names = {w.name for w in Archive.open(corpus_pack.path).manifest.weights}
    for attr in ("table", "offset_view", "transposed", "strided", "buffer_t"):
        assert any(n.endswith(f".{attr}") for n in names), attr


def test_guard_errors_name_the_users_dims(corpus_pack):
    pkg = aotpack.load(corpus_pack.path)
    inputs = corpus.group_inputs(corpus.GROUPS["dynamic"], 0, 0)
    x, y, z = inputs["dyn_derived"]
    inputs["dyn_derived"] = (x, torch.rand(x.shape[0] + 2, 3), z)
    reason = pkg.entries[0].guards.explain(("dynamic", inputs), {})
    assert_facts(reason, "input 'inputs' (args[1]['dyn_derived'][1]) dim 0 (dx + 1)", f"is {x.shape[0] + 2}",
                 f"expected {x.shape[0] + 1}",
                 f"dx is {x.shape[0]} in input 'inputs' (args[1]['dyn_derived'][0]) dim 0")
    with pytest.raises(aotpack.GuardError, match=r"entry 0 \(.*dx 2\.\.40, dz >= 2.*\): input 'inputs'"):
        pkg("dynamic", inputs)


def test_a_refused_call_writes_nothing(corpus_pack):
    pkg = aotpack.load(corpus_pack.path)
    inputs = corpus.group_inputs(corpus.GROUPS["static"], 0, 0)
    x, out, v = inputs["inplace_inputs"]
    inputs["inplace_inputs"] = (x, out, v.double())  # v's dtype is wrong: no entry accepts the call
    before = copy.deepcopy(inputs["inplace_inputs"])
    with pytest.raises(aotpack.GuardError):
        pkg("static", inputs)
    assert all(torch.equal(a, b) for a, b in zip(inputs["inplace_inputs"], before))


# -- the proxy executor: what it cannot run is refused at build --------------------------------------------

def test_an_aten_call_the_proxy_executor_refuses_is_a_capture_error(corpus_pack, tmp_path):
    """libtorch's runner checks every call of the extern-kernel description against the op's schema when it
    loads the code; the build loads it the same way and names the op and the user's line."""
    from aotpack_runtime import _torch as rt_torch
    from aotpack.capture import capture

    archive = Archive.open(corpus_pack.path)
    static = archive.manifest.entries[1].to_json()
    description = json.loads(archive.read_blob(static["extern_kernels"]))
    node = next(n["node"] for n in description["nodes"] if n["node"]["target"] == "aten::_unique2")
    node["inputs"][1]["arg"] = {"as_int": 1}  # `sorted` is a bool: the proxy executor cannot call this
    (tmp_path / "model.so").write_bytes(archive.read_blob(static["library"]))
    broken = json.dumps(description).encode()
    (tmp_path / "model.json").write_bytes(broken)
    with pytest.raises(RuntimeError) as refused:
        rt_torch.cpu_runner(str(tmp_path / "model.so"), 1)
    exported = capture(corpus.make_model("unique"), corpus.BY_NAME["unique"].inputs(torch.Generator(), 4)).exported
    error = compile_stage.extern_kernel_error(str(refused.value), broken, exported)
    assert isinstance(error, aotpack.CaptureError)
    assert error.reason.startswith("forward calls aten::_unique2, which has no C shim in AOTInductor and which its "
                                   "proxy executor cannot run (")
    assert error.filename == corpus.__file__ and "torch.unique(x, return_inverse=True" in error.code
    python_op = json.dumps({"nodes": [{"name": "buf0", "node": {"target": "prims::convert_element_type"}}]})
    with pytest.raises(aotpack.CaptureError) as info:
        compile_stage.check_extern_kernels(python_op.encode(), exported)
    assert_facts(str(info.value), "prims::convert_element_type", "Python", "ATen ops only")


def test_verify_compares_outputs_and_written_inputs(corpus_pack):
    """`aotpack verify --against` runs pack and eager each on its own copy of the inputs and compares what
    came back (bool and int tensors exactly, Python numbers by type and value) and what each wrote."""
    from aotpack.checks import _worst

    pkg = aotpack.load(corpus_pack.path)
    model = corpus.Corpus().eval()
    for group, names in corpus.GROUPS.items():
        assert _worst(pkg, model, (group, corpus.group_inputs(names, 1, 0)), {}, 1e-4) < 1e-4


# -- the seven classes, each by its corpus models: served (matches eager in a fresh process) or refused ----

CLASSES = {
    "1 unbounded dims, Dim.AUTO, Dim.DYNAMIC": ["dyn_unbounded", "dyn_auto", "dyn_dynamic"],
    "2 plain tensor attributes and their views": ["attr_table", "attr_views"],
    "3 ATen ops without a C shim (proxy executor)": ["unique", "linalg", "python_custom_op"],
    "4 Python numbers as outputs": ["python_numbers"],
    "5 derived dims": ["dyn_derived"],
    "6 complex32": ["complex32"],
    "7 inputs written in place": ["inplace_inputs"],
}


@pytest.mark.parametrize("cls", list(CLASSES))
def test_each_class_is_served_or_refused_at_build(cls, corpus_run):
    """Every model of the class matches eager in a fresh process on every input set (two, and more sizes
    when dynamic), with eager's output types; or it is one the corpus expects refused (test_corpus checks the
    CaptureError and the line)."""
    for name in CLASSES[cls]:
        case = corpus.BY_NAME[name]
        if case.refused is not None:
            assert name in {c.name for c in corpus.REFUSED}
            continue
        result = corpus_run[name]
        assert result["failure"] is None, (name, result["failure"])
        assert result["error"] <= case.rel and len(result["sets"]) >= 2, (name, result)


def test_python_numbers_keep_eagers_types(corpus_pack):
    """Class 4: .item() of a float tensor is a float, a size an int, a comparison a bool, constants as they were."""
    pkg = aotpack.load(corpus_pack.path)
    inputs = corpus.group_inputs(corpus.GROUPS["static"], 0, 0)
    out = pkg("static", inputs)["python_numbers"]
    with torch.no_grad():
        expected = corpus.Corpus().eval()("static", copy.deepcopy(inputs))["python_numbers"]
    kinds = torch.utils._pytree.tree_map(lambda v: type(v).__name__, out)
    assert kinds == torch.utils._pytree.tree_map(lambda v: type(v).__name__, expected)
    assert {"float", "int"} <= set(torch.utils._pytree.tree_leaves(kinds))


def test_inputs_written_in_place_reach_the_callers_tensors(corpus_pack):
    """Class 7: the pack writes into the very tensors the caller passed (same storage), as eager does."""
    pkg = aotpack.load(corpus_pack.path)
    inputs = corpus.group_inputs(corpus.GROUPS["static"], 0, 0)
    eager_inputs = copy.deepcopy(inputs)
    pointers = [t.data_ptr() for t in inputs["inplace_inputs"]]
    pkg("static", inputs)
    with torch.no_grad():
        corpus.Corpus().eval()("static", eager_inputs)
    assert [t.data_ptr() for t in inputs["inplace_inputs"]] == pointers
    for got, want in zip(inputs["inplace_inputs"], eager_inputs["inplace_inputs"]):
        torch.testing.assert_close(got, want)
    assert any(not torch.equal(a, b) for a, b in zip(inputs["inplace_inputs"],
                                                     corpus.group_inputs(corpus.GROUPS["static"], 0, 0)["inplace_inputs"]))


def test_writing_inputs_and_buffers_together_is_refused():
    """A forward that writes into an input and into a buffer (state) is refused at capture, by name."""
    from aotpack.capture import capture

    class Both(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("count", torch.zeros(()))

        def forward(self, x):
            self.count.add_(1)
            x.mul_(2)
            return x + self.count

    with pytest.raises(aotpack.CaptureError) as info:
        capture(Both().eval(), (torch.ones(3),))
    assert_facts(str(info.value), "writes into its inputs ['x']", "buffers ['count']", "not both")
