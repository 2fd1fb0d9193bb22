"""oneDNN convolutions (the build option ``onednn_convs``, on by default): a CPU entry's float32 convolutions call
oneDNN, a batch norm or other per-channel ops after a convolution are folded into its weight and bias (the
manifest's ``folded_weights`` says how, from the stored weights), the activation after it runs inside oneDNN's
convolution, the manifest's ``packed_weights`` says how to pack each convolution's weight, and the runtime
folds and packs at load on the serving host (and again for new weights). The pack itself holds only the plain
weights, so its bytes do not depend on the build host (tests/test_reproducible.py builds a conv net on a host
that hides its vector units)."""
from __future__ import annotations

import copy

import pytest
import torch

import aotpack
from aotpack.options import BuildOptions
from aotpack_runtime.errors import ArchiveError, BuildError
from archive_tools import with_manifest
from helpers import assert_close_to_eager, assert_facts

# examples/convnet.py at its example input (4, 3, 32, 32): three 3x3 convolutions, padding 1, two max pools, each
# followed by a batch norm (folded into the convolution's weight and bias: the code's constants below).
CONV_INPUTS = {"_aotpack_folded_0": [4, 3, 32, 32], "_aotpack_folded_2": [4, 16, 16, 16],
               "_aotpack_folded_4": [4, 32, 8, 8]}
CONV_BIASES = {"_aotpack_folded_1": 16, "_aotpack_folded_3": 32, "_aotpack_folded_5": 64}


def _eager(model, args):
    with torch.no_grad():
        return model(*args)


def _other_weights(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``model`` with other values in every float parameter and buffer."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in other.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5 if name.endswith("running_var")
                        else torch.randn(t.shape, generator=gen) * 0.2)
    return other


def test_convolutions_call_onednn_with_weights_packed_at_load(convnet_pack):
    pkg = aotpack.load(convnet_pack.path)
    entry = pkg.entries[0]
    records = {c: r.to_json() for c, r in entry.record.packed_weights.items()}
    assert {c: r["input_size"] for c, r in records.items()} == CONV_INPUTS
    assert all(r["kind"] == "onednn_conv" and r["padding"] == [1, 1] and r["stride"] == [1, 1]
               and r["dilation"] == [1, 1] and r["groups"] == 1 for r in records.values())
    assert pkg.manifest.raw["options"]["onednn_convs"] is True
    # The stored weights stay plain (the model's own); what the code is bound to is folded and packed for this host.
    bound = entry.weight_constants(pkg.weights)
    assert all(bound[c].layout == torch._mkldnn for c in records)
    assert all(t.layout == torch.strided for t in pkg.weights.values())
    assert set(entry.record.folded_weights) == set(CONV_INPUTS) | set(CONV_BIASES)
    assert {c: list(bound[c].shape) for c in CONV_BIASES} == {c: [n] for c, n in CONV_BIASES.items()}
    assert_close_to_eager(pkg(*convnet_pack.args), _eager(convnet_pack.model, convnet_pack.args))


def test_batch_norm_is_folded_into_the_convolution_at_load(convnet_pack):
    """The first convolution's folded weight and bias are what folding its batch norm by hand gives; the code
    reads no batch norm parameter and no convolution weight itself, and every one of them is still stored and
    read (through the folds), so none is listed as unread."""
    pkg = aotpack.load(convnet_pack.path)
    record = pkg.entries[0].record
    conv, bn = convnet_pack.model.features[0], convnet_pack.model.features[1]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bound = {c: t for c, t in pkg.entries[0].weight_constants(pkg.weights).items() if t.layout == torch.strided}
    torch.testing.assert_close(bound["_aotpack_folded_1"], (conv.bias - bn.running_mean) * scale + bn.bias)
    from aotpack_runtime.entries import fold_weight

    torch.testing.assert_close(fold_weight(record.folded_weights["_aotpack_folded_0"], pkg.weights),
                               conv.weight * scale.reshape(-1, 1, 1, 1))
    assert record.folded_weights["_aotpack_folded_1"].weight_names == (
        "features.0.bias", "features.1.running_mean", "features.1.running_var", "features.1.weight",
        "features.1.bias")
    read_directly = {w for c, w in record.constants.items() if c not in record.folded_weights}
    assert not any(n.startswith("features.") for n in read_directly)
    assert set(pkg.manifest.unread_weights) == {f"features.{i}.num_batches_tracked" for i in (1, 5, 9)}
    assert pkg.manifest.format_version == 6
    # The ReLU after each convolution is Inductor's kernel, not oneDNN's: oneDNN's ReLU turns a NaN into 0.
    from aotpack_runtime.archive import Archive

    a = Archive.open(convnet_pack.path)
    try:
        wrapper = bytes(a.read_blob(record.sources[[s.endswith("wrapper.cpp") for s in record.sources].index(True)]))
    finally:
        a.close()
    calls = [line for line in wrapper.decode().splitlines() if "mkldnn__convolution_pointwise(" in line]
    assert len(calls) == 3 and all('"none"' in line for line in calls), calls


def test_new_weights_are_packed_again(convnet_pack):
    pkg = aotpack.load(convnet_pack.path)
    other = _other_weights(convnet_pack.model, 3)
    pkg.load_weights(other.state_dict())
    out = pkg(*convnet_pack.args)
    assert_close_to_eager(out, _eager(other, convnet_pack.args))
    assert not torch.allclose(out, _eager(convnet_pack.model, convnet_pack.args), rtol=1e-2, atol=1e-3)
    pkg.load_weights(convnet_pack.model.state_dict())
    assert_close_to_eager(pkg(*convnet_pack.args), _eager(convnet_pack.model, convnet_pack.args))


def test_a_weight_that_entries_pack_alike_is_packed_once(convnet_pack):
    """Across the entries of one load (or one swap of weights), one packed tensor per weight and record."""
    from aotpack_runtime.entries import packed_constants

    pkg = aotpack.load(convnet_pack.path)
    entry = pkg.entries[0]
    shared: dict = {}
    first = entry.weight_constants(pkg.weights, shared)
    again = entry.weight_constants(pkg.weights, shared)
    assert all(again[c] is first[c] for c in entry.record.folded_weights)
    assert len(shared) == 2 * len(CONV_INPUTS) + len(CONV_BIASES)  # the folds, and the packings
    record = entry.packed_weights["_aotpack_folded_2"]
    w = pkg.weights["features.4.weight"]
    both = packed_constants({"a": w, "b": w}, {"a": record, "b": record})
    assert both["a"] is both["b"] and both["a"].layout == torch._mkldnn
    assert entry.weight_constants(pkg.weights)["_aotpack_folded_2"] is not first["_aotpack_folded_2"]


def test_a_reader_that_ignores_packed_weights_computes_the_same_outputs(convnet_pack, tmp_path):
    """An older reader binds the plain weights, which the oneDNN op also takes (reordering them per call)."""
    plain = tmp_path / "plain.pack"
    plain.write_bytes(with_manifest(convnet_pack.path.read_bytes(),
                                    lambda m: m["entries"][0].pop("packed_weights")))
    pkg = aotpack.load(plain)
    assert pkg.entries[0].packed_weights == {}
    assert_close_to_eager(pkg(*convnet_pack.args), _eager(convnet_pack.model, convnet_pack.args))


def _edit(record: dict):
    def edit(m):
        m["entries"][0]["packed_weights"]["_aotpack_folded_2"].update(record)
    return edit


@pytest.mark.parametrize("edit, facts", [
    (_edit({"kind": "winograd"}), ["packed_weights['_aotpack_folded_2'].kind", "'winograd'", "onednn_conv"]),
    (_edit({"input_size": [4, 3, 16, 16]}), ["_aotpack_folded_2", "[32, 16, 3, 3]", "1 groups", "[4, 3, 16, 16]"]),
    (_edit({"stride": [1]}), ["packed_weights['_aotpack_folded_2'].stride", "[1]", "2 integers"]),
    (_edit({"groups": "1"}), ["packed_weights['_aotpack_folded_2']", "groups"]),
    (lambda m: m["entries"][0]["packed_weights"].update(nope={"kind": "onednn_conv"}),
     ["packed_weights['nope']", "not one of the entry's weight constants"]),
    # well formed, but a convolution oneDNN cannot describe: refused before oneDNN sees it (torch 2.11's
    # oneDNN dies of a division by zero on this one), not a crash
    (_edit({"input_size": [4, 16, 2**40, 2**40]}), ["packed_weights", "[32, 16, 3, 3]", "[4, 16, 1099511627776,",
                                                   "below 2**31"]),
    (_edit({"input_size": [4, 16, 1, 1], "dilation": [2, 2]}), ["[4, 16, 1, 1]", "dilation [2, 2]",
                                                                "kernel that fits"]),
    (_edit({"padding": [0, 0], "input_size": [4, 16, 2, 2]}), ["[4, 16, 2, 2]", "padding [0, 0]", "kernel that fits"]),
    (_edit({"stride": [2**30, 1]}), ["stride [1073741824, 1]", "at most 2**20"]),
])
def test_bad_packed_weights_are_refused_at_load(convnet_pack, tmp_path, edit, facts):
    bad = tmp_path / "bad.pack"
    bad.write_bytes(with_manifest(convnet_pack.path.read_bytes(), edit))
    with pytest.raises(ArchiveError) as e:
        aotpack.load(bad)
    assert_facts(str(e.value), "manifest.entries[0]", *facts)


def _fold_edit(fn):
    def edit(m):
        fn(m["entries"][0]["folded_weights"]["_aotpack_folded_1"])
    return edit


def _steps(*steps):
    return _fold_edit(lambda r: r.update(steps=list(steps)))


@pytest.mark.parametrize("edit, facts", [
    (_steps({"op": "exec", "name": "x"}), ["folded_weights['_aotpack_folded_1'].steps[0].op", "'exec'", "sqrt"]),
    (_steps({"op": "sqrt", "in": [0]}), ["steps[0].in", "[0]", "earlier steps only"]),
    (_steps({"op": "weight", "name": "features.1.bias"}, {"op": "add", "in": [0, 0, 0]}),
     ["steps[1] (add)", "reads 3", "takes 2"]),
    (_steps({"op": "weight", "name": "no.such"}), ["steps[0]", "'no.such'", "no such weight"]),
    (_steps({"op": "weight", "name": "features.1.num_batches_tracked"}), ["'features.1.num_batches_tracked'"]),
    (_steps({"op": "weight", "name": "features.1.bias"}, {"op": "reshape", "in": [0], "shape": [3, 5]}),
     ["steps[1]", "reshapes [16] to [3, 5]"]),
    # a record cannot make the loader allocate more than the weights it reads: [16, 1] * [1, 16] is refused
    (_steps({"op": "weight", "name": "features.1.bias"}, {"op": "unsqueeze", "in": [0], "dim": 1},
            {"op": "unsqueeze", "in": [0], "dim": 0}, {"op": "mul", "in": [1, 2]}),
     ["steps[3]", "[16, 16]", "larger than the weights it reads", "[16]"]),
    (_steps({"op": "weight", "name": "features.0.weight"}), ["computes a [16, 3, 3, 3] tensor", "says [16]"]),
    (_steps({"op": "zeros", "shape": [2**40]}), ["steps[0]", "[1099511627776]", "larger than"]),
    (_steps(*[{"op": "weight", "name": "features.1.bias"}] * 300), ["300 steps", "1 to 256"]),
    (_steps({"op": "weight", "name": "features.1.bias"}, {"op": "add", "in": [0], "value": True}),
     ["steps[1].value", "a number", "boolean"]),
    (_fold_edit(lambda r: r.update(dtype="float16")), ["'float16'", "float32 weights only"]),
    (lambda m: m["entries"][0]["folded_weights"].update(nope=m["entries"][0]["folded_weights"]["_aotpack_folded_1"]),
     ["folded_weights['nope']", "a constant the entry's code does not have"]),
    (lambda m: m["entries"][0]["constants"].update(_aotpack_folded_1="features.1.bias"),
     ["folded_weights['_aotpack_folded_1']", "'features.1.bias'", "one or the other"]),
    (lambda m: m.update(format_version=5), ["folded_weights", "format version 6", "format version 5"]),
])
def test_bad_folded_weights_are_refused_at_load(convnet_pack, tmp_path, edit, facts):
    bad = tmp_path / "bad.pack"
    bad.write_bytes(with_manifest(convnet_pack.path.read_bytes(), edit))
    with pytest.raises(ArchiveError) as e:
        aotpack.load(bad)
    assert_facts(str(e.value), *facts)


def test_a_fold_record_is_checked_before_anything_is_computed():
    """The shape walk refuses a record by the shapes alone (no tensor is made), and the evaluation refuses a
    result whose shape the record misstates."""
    from aotpack_runtime.entries import fold_weight
    from aotpack_runtime.schema import FoldRecord, WeightRecord

    record = FoldRecord.from_json({"dtype": "float32", "shape": [4], "steps": [
        {"op": "weight", "name": "g"}, {"op": "weight", "name": "v"}, {"op": "add", "in": [1], "value": 1e-5},
        {"op": "rsqrt", "in": [2]}, {"op": "mul", "in": [0, 3]}, {"op": "neg", "in": [4]},
        {"op": "sub", "in": [5], "value": 2}, {"op": "div", "in": [6, 0]}]}, "r")
    weights = {n: WeightRecord(name=n, blob="b", dtype="float32", shape=(4,)) for n in ("g", "v")}
    record.check_shapes(weights, "r")
    g, v = torch.rand(4) + 0.5, torch.rand(4) + 0.5
    torch.testing.assert_close(fold_weight(record, {"g": g, "v": v}), (-(g * torch.rsqrt(v + 1e-5)) - 2) / g)
    with pytest.raises(ArchiveError) as e:
        record.check_shapes(dict(weights, v=WeightRecord(name="v", blob="b", dtype="float32", shape=(3,))), "r")
    assert_facts(str(e.value), "r.steps[4] (mul)", "[4] and [3]", "do not broadcast")
    with pytest.raises(ArchiveError) as e:
        fold_weight(FoldRecord(shape=(5,), steps=record.steps), {"g": g, "v": v})
    assert_facts(str(e.value), "computes torch.float32 [4]", "float32 [5]")


def test_a_weight_onednn_refuses_to_pack_is_an_archive_error(convnet_pack, monkeypatch):
    from aotpack_runtime import _torch as rt_torch

    def refuse(*args):
        raise RuntimeError("could not create a primitive descriptor")

    monkeypatch.setattr(rt_torch, "onednn_conv_weight", refuse)
    with pytest.raises(ArchiveError) as e:
        aotpack.load(convnet_pack.path)
    assert_facts(str(e.value), "manifest.entries[0]", "packed weight record", "cannot pack it on this host",
                 "could not create a primitive descriptor")


def test_the_option_must_be_a_bool():
    with pytest.raises(BuildError, match="onednn_convs must be True or False, got 'yes'"):
        BuildOptions(onednn_convs="yes").resolved()


class FoldNet(torch.nn.Module):
    """What folding meets in vision models: a convolution without bias followed by batch norm and ReLU6
    (MobileNet), a depthwise one, a per-channel scale and shift held as parameters ([1, C, 1, 1] and [C, 1, 1])
    and numbers, a batch norm whose output two ops read, a convolution followed by an op on the input, which
    stays as it is, and hardsigmoid and erf-GELU after a convolution."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.a_bn = torch.nn.BatchNorm2d(8)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.dw_bn = torch.nn.BatchNorm2d(8)
        self.b = torch.nn.Conv2d(8, 6, 1)
        self.scale = torch.nn.Parameter(torch.rand(1, 6, 1, 1) + 0.5)
        self.shift = torch.nn.Parameter(torch.randn(6, 1, 1))
        self.c = torch.nn.Conv2d(6, 6, 3, padding=1)
        self.c_bn = torch.nn.BatchNorm2d(6)
        self.d = torch.nn.Conv2d(6, 6, 1)
        self.e = torch.nn.Conv2d(6, 6, 1)
        self.f = torch.nn.Conv2d(6, 6, 1)

    def forward(self, x):
        y = torch.nn.functional.relu6(self.a_bn(self.a(x)))
        y = torch.nn.functional.relu6(self.dw_bn(self.dw(y)))
        y = torch.sigmoid((self.b(y) * self.scale - self.shift) / 2.0 + 1)
        z = self.c_bn(self.c(y))
        return (torch.relu(z) + z.mean(), self.d(z) - z, torch.nn.functional.hardsigmoid(self.e(z)),
                torch.nn.functional.gelu(self.f(z)))


def _foldnet() -> torch.nn.Module:
    torch.manual_seed(0)
    model = FoldNet()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def foldnet_pack(session_dir):
    model, args = _foldnet(), (torch.rand(2, 3, 12, 12) * 2 - 1,)
    out = session_dir / "foldnet.pack"
    aotpack.build(model, args, out)
    return model, args, out


def test_what_vision_models_put_after_a_convolution_is_folded(foldnet_pack):
    from aotpack_runtime.archive import Archive

    model, args, path = foldnet_pack
    pkg = aotpack.load(path)
    assert_close_to_eager(pkg(*args), _eager(model, args))
    record = pkg.entries[0].record
    reads = sorted(sorted(f.weight_names) for f in record.folded_weights.values())
    # a: weight and a bias from zeros; dw: the same; b: weight and bias through the parameters and the
    # numbers; c: weight and bias through its batch norm; e: its bias through hardsigmoid's "+ 3". d's and f's
    # convolutions are followed by nothing per-channel.
    assert reads == sorted([
        ["a.weight", "a_bn.running_var", "a_bn.weight"],
        ["a_bn.bias", "a_bn.running_mean", "a_bn.running_var", "a_bn.weight"],
        ["dw.weight", "dw_bn.running_var", "dw_bn.weight"],
        ["dw_bn.bias", "dw_bn.running_mean", "dw_bn.running_var", "dw_bn.weight"],
        ["b.weight", "scale"], ["b.bias", "scale", "shift"],
        ["c.weight", "c_bn.running_var", "c_bn.weight"],
        ["c.bias", "c_bn.bias", "c_bn.running_mean", "c_bn.running_var", "c_bn.weight"], ["e.bias"]])
    a = Archive.open(path)
    try:
        wrapper = bytes(a.read_blob(next(s for s in record.sources if s.endswith("wrapper.cpp")))).decode()
    finally:
        a.close()
    calls = [line for line in wrapper.splitlines() if "aoti_torch_cpu_mkldnn__convolution_pointwise" in line]
    attrs = [next(a for a in ('"sigmoid"', '"sub"', '"none"') if a in line) for line in calls]
    # Only the sigmoid runs inside oneDNN's convolution: oneDNN's ReLU6 (a clip), hardsigmoid and erf-GELU differ
    # from eager on NaN or infinities, so they stay Inductor's kernels (f's convolution, whose GELU Inductor
    # would fuse, stays with ATen). Inductor fuses d's subtraction of z into its convolution (``_binary``).
    assert attrs == ['"none"', '"none"', '"sigmoid"', '"none"', '"sub"', '"none"'], calls
    assert any("aoti_torch_cpu_convolution(" in line for line in wrapper.splitlines())
    # Every oneDNN convolution's weight is packed at load, the fused one's too.
    assert sorted(record.packed_weights) == ["_aotpack_folded_0", "_aotpack_folded_2", "_aotpack_folded_4",
                                             "_aotpack_folded_6", "d_weight", "e_weight"]
    # Special values pass through as in eager: a NaN and infinities in the input.
    special = args[0].clone()
    special[0, 0, 3, 3], special[0, 1, 5, 6], special[1, 2, 0, 0] = float("nan"), float("inf"), -float("inf")
    for out, ref in zip(pkg(special), _eager(model, (special,))):
        assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
        torch.testing.assert_close(out, ref, equal_nan=True, rtol=1e-4, atol=1e-5)
    other = _foldnet()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.rand(p.shape) * 0.3)
        for m in other.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.add_(0.25)
                m.running_var.mul_(1.5)
    pkg.load_weights(other.state_dict())
    assert_close_to_eager(pkg(*args), _eager(other, args))


def test_packed_weights_follow_the_calling_thread_count(convnet_pack):
    """oneDNN packs a weight for the thread count the packing runs with, and reorders it on every call at
    another count; a call at another count repacks (once per count and weights), and new weights packed at one
    count are repacked for another, never served stale."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        pkg = aotpack.load(convnet_pack.path)
        packing = pkg.entries[0].packing
        assert packing is not None and packing.threads == 2
        at_two = pkg.entries[0].weight_constants(pkg.weights)
        torch.set_num_threads(1)
        assert_close_to_eager(pkg(*convnet_pack.args), _eager(convnet_pack.model, convnet_pack.args))
        assert packing.threads == 1 and set(packing._bound) == {1}
        one = packing._bound[1][0]
        assert all(one[c].layout == torch._mkldnn for c in CONV_INPUTS) and one.keys() == at_two.keys()
        torch.set_num_threads(2)
        pkg(*convnet_pack.args)
        torch.set_num_threads(1)
        pkg(*convnet_pack.args)
        assert packing.threads == 1 and packing._bound[1][0] is one  # kept: rebound, not packed again
        torch.set_num_threads(2)
        other = _other_weights(convnet_pack.model, 5)
        pkg.load_weights(other.state_dict())
        assert packing.threads == 2 and set(packing._bound) == {2}
        torch.set_num_threads(1)
        assert_close_to_eager(pkg(*convnet_pack.args), _eager(other, convnet_pack.args))
        assert packing.threads == 1 and packing._bound[1][0] is not one
    finally:
        torch.set_num_threads(before)


def test_reweight_and_external_weights_keep_the_folds_working(convnet_pack, tmp_path):
    """A pack rewritten with new weights (``reweight``), or with its weights beside it (``--weights external``),
    keeps its code and its fold records; the loader folds the new or external weights."""
    import shutil

    from aotpack.reweight import externalize, reweight

    other = _other_weights(convnet_pack.model, 7)
    out = tmp_path / "other.pack"
    reweight(convnet_pack.path, other.state_dict(), out, cache=False)
    pkg = aotpack.load(out)
    assert pkg.entries[0].record.folded_weights == aotpack.load(convnet_pack.path).entries[0].record.folded_weights
    assert_close_to_eager(pkg(*convnet_pack.args), _eager(other, convnet_pack.args))
    apart = tmp_path / "apart.pack"
    shutil.copy(convnet_pack.path, apart)
    externalize(apart)
    pkg = aotpack.load(apart)
    assert pkg.manifest.external_weights is not None and pkg.entries[0].record.folded_weights
    assert_close_to_eager(pkg(*convnet_pack.args), _eager(convnet_pack.model, convnet_pack.args))


def test_large_linears_call_onednn_with_weights_packed_at_load(linearnet_pack):
    from aotpack._torch import ONEDNN_LINEAR_MIN_MACS

    model, args, path = linearnet_pack
    pkg = aotpack.load(path)
    entry = pkg.entries[0]
    packed = {entry.record.constants[c]: r.to_json() for c, r in entry.record.packed_weights.items()}
    # down (64x512x128), proj (64x128x512, no bias) and the [in, out] weight, transposed at load into a folded
    # constant; not up (GELU reads it), gate (ReLU), head (too small)
    assert packed == {"down.weight": {"kind": "onednn_linear", "rows": 64},
                      "proj.weight": {"kind": "onednn_linear", "rows": 64},
                      "_aotpack_folded_0": {"kind": "onednn_linear", "rows": 64}}
    assert entry.record.folded_weights["_aotpack_folded_0"].to_json() == {
        "dtype": "float32", "shape": [512, 128], "steps": [{"op": "weight", "name": "c1d_weight"},
                                                          {"op": "transpose", "in": [0]}]}
    assert 64 * 512 * 4 < ONEDNN_LINEAR_MIN_MACS <= 64 * 128 * 512
    assert pkg.manifest.format_version == 7
    bound = entry.weight_constants(pkg.weights)
    assert all(bound[c].layout == torch._mkldnn for c in entry.record.packed_weights)
    assert all(t.layout == torch.strided for t in pkg.weights.values())
    assert_close_to_eager(pkg(*args), _eager(model, args))
    # NaN and infinities come out where eager has them (no activation runs inside oneDNN's op)
    x = args[0].clone()
    x[3, 5], x[7, :4], x[9, 1] = float("nan"), float("inf"), -float("inf")
    out, ref = pkg(x), _eager(model, (x,))
    assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().any()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4, equal_nan=True)


def test_packed_linears_take_new_weights_and_other_thread_counts(linearnet_pack):
    model, args, path = linearnet_pack
    pkg = aotpack.load(path)
    other = _other_weights(model, 5)
    pkg.load_weights(other.state_dict())
    assert_close_to_eager(pkg(*args), _eager(other, args))
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            assert_close_to_eager(pkg(*args), _eager(other, args))
    finally:
        torch.set_num_threads(threads)


def test_a_reader_that_ignores_packed_linears_computes_the_same_outputs(linearnet_pack, tmp_path):
    """The code also takes the plain weight: without the records, the same outputs."""
    model, args, path = linearnet_pack
    plain = tmp_path / "plain.pack"
    plain.write_bytes(with_manifest(path.read_bytes(), lambda m: m["entries"][0].pop("packed_weights")))
    pkg = aotpack.load(plain)
    assert not pkg.entries[0].record.packed_weights
    assert_close_to_eager(pkg(*args), _eager(model, args))


@pytest.mark.parametrize("edit, facts", [
    (lambda m: next(iter(m["entries"][0]["packed_weights"].values())).update(rows=0), ["rows is 0", "1 to"]),
    (lambda m: m.update(format_version=6), ["onednn_linear", "format version 7", "format version 6"]),
    (lambda m: next(iter(m["entries"][0]["packed_weights"].values())).update(kind="onednn_conv"),
     ["packed_weights['_aotpack_folded_0']", "lacks the field"]),
])
def test_bad_packed_linear_records_are_refused_at_load(linearnet_pack, tmp_path, edit, facts):
    _, _, path = linearnet_pack
    bad = tmp_path / "bad.pack"
    bad.write_bytes(with_manifest(path.read_bytes(), edit))
    with pytest.raises(ArchiveError) as e:
        aotpack.load(bad)
    assert_facts(str(e.value), *facts)
