"""oneDNN convolutions (the build option ``onednn_convs``, on by default): a CPU entry's float32 convolutions call
oneDNN with the stored weight as a constant, the manifest's ``packed_weights`` says how to pack each such weight,
and the runtime packs it at load on the serving host (and again for new weights). The pack itself holds only
the plain weights, so its bytes do not depend on the build host (tests/test_reproducible.py builds a conv net
on a host that hides its vector units)."""
from __future__ import annotations

import copy

import pytest
import torch

import aotpack
from aotpack.options import BuildOptions
from aotpack_runtime.errors import ArchiveError, BuildError
from archive_tools import with_manifest
from helpers import assert_close_to_eager, assert_facts

# examples/convnet.py at its example input (4, 3, 32, 32): three 3x3 convolutions, padding 1, two max pools.
CONV_INPUTS = {"features_0_weight": [4, 3, 32, 32], "features_4_weight": [4, 16, 16, 16],
               "features_8_weight": [4, 32, 8, 8]}


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
    # The stored weights stay plain; what the code is bound to is packed for this host.
    bound = entry.weight_constants(pkg.weights)
    assert all(bound[c].layout == torch._mkldnn for c in records)
    assert all(pkg.weights[entry.record.constants[c]].layout == torch.strided for c in records)
    assert_close_to_eager(pkg(*convnet_pack.args), _eager(convnet_pack.model, convnet_pack.args))


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
    assert all(again[c] is first[c] for c in entry.packed_weights) and len(shared) == len(CONV_INPUTS)
    record = entry.packed_weights["features_4_weight"]
    w = pkg.weights["features.4.weight"]
    both = packed_constants({"a": w, "b": w}, {"a": record, "b": record})
    assert both["a"] is both["b"] and both["a"].layout == torch._mkldnn
    assert entry.weight_constants(pkg.weights)["features_4_weight"] is not first["features_4_weight"]


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
        m["entries"][0]["packed_weights"]["features_4_weight"].update(record)
    return edit


@pytest.mark.parametrize("edit, facts", [
    (_edit({"kind": "winograd"}), ["packed_weights['features_4_weight'].kind", "'winograd'", "onednn_conv"]),
    (_edit({"input_size": [4, 3, 16, 16]}), ["features.4.weight", "[32, 16, 3, 3]", "1 groups", "[4, 3, 16, 16]"]),
    (_edit({"stride": [1]}), ["packed_weights['features_4_weight'].stride", "[1]", "2 integers"]),
    (_edit({"groups": "1"}), ["packed_weights['features_4_weight']", "groups"]),
    (lambda m: m["entries"][0]["packed_weights"].update(nope={"kind": "onednn_conv"}),
     ["packed_weights['nope']", "not one of the entry's weight constants"]),
    # well formed, but a convolution oneDNN cannot describe: refused when it is packed, not a crash
    (_edit({"input_size": [4, 16, 2**40, 2**40]}), ["packed_weights", "[32, 16, 3, 3]", "cannot pack"]),
])
def test_bad_packed_weights_are_refused_at_load(convnet_pack, tmp_path, edit, facts):
    bad = tmp_path / "bad.pack"
    bad.write_bytes(with_manifest(convnet_pack.path.read_bytes(), edit))
    with pytest.raises(ArchiveError) as e:
        aotpack.load(bad)
    assert_facts(str(e.value), "manifest.entries[0]", *facts)


def test_the_option_must_be_a_bool():
    with pytest.raises(BuildError, match="onednn_convs must be True or False, got 'yes'"):
        BuildOptions(onednn_convs="yes").resolved()
