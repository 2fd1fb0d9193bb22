"""New weights for packs of several methods: ``load_weights`` reaches every method and keeps a session's state,
records of one blob (one tensor the code reads under two names) get one new tensor, ``aotpack weights``,
``reweight``, weights beside the pack, and signing."""
from __future__ import annotations

import copy
import hashlib
import shutil

import pytest
import torch

import aotpack
import programs
from aotpack_runtime import safetensors_file as stf
from aotpack_runtime.errors import WeightsError
from helpers import assert_facts

IDS = torch.arange(5).reshape(1, 5)
SRC = torch.arange(programs.SRC_LEN).reshape(1, programs.SRC_LEN)


def _cli(*args):
    from click.testing import CliRunner

    from cli.main import cli

    return CliRunner().invoke(cli, list(map(str, args)))


def shifted(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy of ``model`` with other values in every parameter (buffers, the state, unchanged)."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    return other


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_towers_equal(pkg, model) -> None:
    with torch.no_grad():
        torch.testing.assert_close(pkg.encode_text(IDS), model.encode_text(IDS))
        torch.testing.assert_close(pkg.encode_image(programs.PATCHES), model.encode_image(programs.PATCHES))


def test_two_towers_take_new_weights_for_both_methods_checked_by_state_dict_name(two_tower_pack):
    """The shared projection is one weight: new weights reach both methods; a missing and a misshapen weight
    are one error naming both, and then neither method changed."""
    pkg = aotpack.load(two_tower_pack.path)
    new = shifted(two_tower_pack.model, 1)
    bad = dict(params(new))
    del bad["projection.weight"]
    bad["text.bias"] = torch.zeros(3)
    with pytest.raises(WeightsError) as e:
        pkg.load_weights(bad)
    assert_facts(str(e.value), "missing 1: projection.weight", "text.bias (expected float32[16], actual float32[3])")
    assert_towers_equal(pkg, two_tower_pack.model)
    pkg.load_weights(new.state_dict())
    assert_towers_equal(pkg, new)


def test_seq2seq_takes_new_weights_and_its_session_keeps_the_state(seq2seq_pack):
    """``encode`` writes the cross-attention cache with the old weights; after the swap, ``decode`` reads that
    state with the new weights, as eager does when only the parameters are loaded; a fresh run gives eager's
    tokens with the new weights."""
    pkg = aotpack.load(seq2seq_pack.path)
    s = pkg.session()
    old = copy.deepcopy(seq2seq_pack.model)
    new = shifted(seq2seq_pack.model, 2)
    with torch.no_grad():
        s.encode(SRC)
        old.encode(SRC)
        pkg.load_weights(params(new))  # the state buffers' names are not needed
        old.load_state_dict(params(new), strict=False)
        for pos, token in enumerate([1, 7]):
            args = (torch.tensor([[token]]), torch.tensor([pos]))
            torch.testing.assert_close(s.decode(*args), old.decode(*args))
        fresh, eager = pkg.session(), copy.deepcopy(new)
        assert programs.greedy_seq2seq(fresh.encode, fresh.decode, SRC, 6) == \
            programs.greedy_seq2seq(eager.encode, eager.decode, SRC, 6)


def test_records_of_one_blob_get_one_new_tensor(shared_view_pack, tmp_path):
    """Two records of one blob (``lin.weight`` and the buffer ``view``, the same memory): new weights under
    the state_dict name reach both methods, as one tensor; given under both names they must agree; export
    writes the tensor once; reweight keeps the blob one and its outputs are eager's."""
    m = aotpack.load(shared_view_pack.path).manifest
    by_name = {w.name: w for w in m.weights}
    assert by_name["view"].blob == by_name["lin.weight"].blob and not by_name["view"].in_state_dict
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(4))
    new = programs.SharedView().eval()  # load_state_dict writes in place: ``view`` follows lin.weight
    new.load_state_dict(shifted(shared_view_pack.model, 3).state_dict())
    pkg = aotpack.load(shared_view_pack.path)
    pkg.load_weights(new.state_dict())
    assert pkg.weights["view"] is pkg.weights["lin.weight"]
    with torch.no_grad():
        torch.testing.assert_close(pkg.project(x), new.project(x))
        torch.testing.assert_close(pkg.score(x), new.score(x))
    with pytest.raises(WeightsError) as e:
        pkg.load_weights({**new.state_dict(), "view": torch.zeros(6, 6)})
    assert_facts(str(e.value), "view (expected equal to lin.weight", "other values")
    assert _cli("weights", shared_view_pack.path, "-o", tmp_path / "w.safetensors").exit_code == 0
    assert set(stf.read(tmp_path / "w.safetensors")) == {"lin.weight", "lin.bias"}
    stf.write(tmp_path / "new.safetensors", new.state_dict())
    r = _cli("reweight", shared_view_pack.path, tmp_path / "new.safetensors", "-o", tmp_path / "new.pack")
    assert r.exit_code == 0, r.output
    again = aotpack.load(tmp_path / "new.pack")
    blobs = {w.name: w.blob for w in again.manifest.weights}
    assert blobs["view"] == blobs["lin.weight"]
    with torch.no_grad():
        torch.testing.assert_close(again.score(x), new.score(x))
        torch.testing.assert_close(again.project(x), new.project(x))


def test_records_of_one_blob_beside_the_pack_are_one_tensor_of_the_file(shared_view_pack, tmp_path):
    """``--weights external`` on a pack whose two records share a blob: the file holds the tensor once, under
    its state_dict name, the other record says ``same_as``; both methods give eager's outputs, with the file
    beside the pack and with a fine-tune's; a manifest whose ``same_as`` names no fit weight is refused."""
    from aotpack.reweight import externalize
    from aotpack_runtime.schema import Manifest

    pack = tmp_path / "shared.pack"
    shutil.copyfile(shared_view_pack.path, pack)
    wfile = externalize(pack)
    assert set(stf.read(wfile)) == {"lin.weight", "lin.bias"}
    pkg = aotpack.load(pack)
    m = pkg.manifest
    assert {w.name: w.same_as for w in m.weights} == {"lin.bias": None, "lin.weight": None, "view": "lin.weight"}
    assert pkg.weights["view"] is pkg.weights["lin.weight"]
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(4))
    model = shared_view_pack.model
    with torch.no_grad():
        torch.testing.assert_close(pkg.project(x), model.project(x))
        torch.testing.assert_close(pkg.score(x), model.score(x))
    assert "the same tensor as lin.weight" in _cli("inspect", pack).output
    new = programs.SharedView().eval()
    new.load_state_dict(shifted(model, 6).state_dict())
    tune = tmp_path / "tune.safetensors"
    stf.write(tune, new.state_dict())  # a fine-tune's checkpoint: the state_dict, ``view`` not in it
    sha = hashlib.sha256(tune.read_bytes()).hexdigest()
    tuned = aotpack.load(pack, weights=tune, weights_sha256=sha)
    with torch.no_grad():
        torch.testing.assert_close(tuned.project(x), new.project(x))
        torch.testing.assert_close(tuned.score(x), new.score(x))
    pkg.load_weights(new.state_dict())  # new weights for an external pack reach both records
    assert pkg.weights["view"] is pkg.weights["lin.weight"]
    with torch.no_grad():
        torch.testing.assert_close(pkg.score(x), new.score(x))
    raw = m.raw
    # another name, another shape, a chain (lin.weight same_as view, which is same_as lin.weight)
    for name, same_as, fact in (("view", "nope", "no such weight"), ("view", "lin.bias", "found: float32[6])"),
                                ("lin.weight", "view", "found: float32[6, 6], same_as 'lin.weight'")):
        bad = dict(raw, weights=[dict(w, same_as=same_as) if w["name"] == name else w for w in raw["weights"]])
        with pytest.raises(aotpack.ArchiveError) as e:
            Manifest.from_json(bad)
        assert_facts(str(e.value), f"weight {name!r}", f"same_as {same_as!r}", fact)
    internal = aotpack.load(shared_view_pack.path).manifest.raw
    bad = dict(internal, weights=[dict(w, same_as="lin.weight") if w["name"] == "view" else w
                                  for w in internal["weights"]])
    with pytest.raises(aotpack.ArchiveError, match="only a pack that keeps its weights beside it"):
        Manifest.from_json(bad)


def test_export_and_reweight_of_two_towers_give_the_bytes_of_a_full_build(two_tower_pack, tmp_path):
    """``aotpack weights`` exports the state_dict; ``reweight`` with other weights writes the bytes a full build
    of the model with those weights writes (the build cache holds the fixture's code, so it compiles nothing),
    and its methods give eager's outputs."""
    r = _cli("weights", two_tower_pack.path, "-o", tmp_path / "w.safetensors")
    assert r.exit_code == 0, r.output
    exported = stf.read(tmp_path / "w.safetensors")
    assert set(exported) == set(two_tower_pack.model.state_dict())
    for name, t in two_tower_pack.model.state_dict().items():
        assert torch.equal(exported[name], t)
    new = shifted(two_tower_pack.model, 4)
    stf.write(tmp_path / "new.safetensors", new.state_dict())
    # --no-cache: the full build below must compile its pack, not find this one
    r = _cli("reweight", two_tower_pack.path, tmp_path / "new.safetensors", "-o", tmp_path / "re.pack", "--no-cache")
    assert r.exit_code == 0, r.output
    assert_towers_equal(aotpack.load(tmp_path / "re.pack"), new)
    aotpack.build(new, None, tmp_path / "full.pack", methods=programs.two_tower_methods(new))
    assert (tmp_path / "re.pack").read_bytes() == (tmp_path / "full.pack").read_bytes()


def test_two_towers_with_weights_beside_the_pack_and_a_fine_tune(two_tower_pack, tmp_path):
    """``--weights external`` on a pack of methods: the code pack and its safetensors file serve both methods;
    ``load(weights=..., weights_sha256=...)`` serves a fine-tune through the same code."""
    from aotpack.reweight import externalize

    pack = tmp_path / "towers.pack"
    shutil.copyfile(two_tower_pack.path, pack)
    wfile = externalize(pack)
    assert wfile == tmp_path / "towers.safetensors"
    assert_towers_equal(aotpack.load(pack), two_tower_pack.model)
    new = shifted(two_tower_pack.model, 5)
    tune = tmp_path / "tune.safetensors"
    stf.write(tune, new.state_dict())
    sha = hashlib.sha256(tune.read_bytes()).hexdigest()
    pkg = aotpack.load(pack, weights=tune, weights_sha256=sha)
    assert_towers_equal(pkg, new)
    # aotpack run takes the same: the file beside the pack, or another one with its own pin
    r = _cli("run", pack, "--method", "encode_image", "--repeat", "1")
    assert r.exit_code == 0 and "output: tensor float32[2, 8]" in r.output, r.output
    r = _cli("run", pack, "--weights", tune, "--weights-sha256", sha, "--repeat", "1")
    assert r.exit_code == 0 and "method encode_text" in r.output, r.output
    r = _cli("run", pack, "--weights", tune, "--repeat", "1")
    assert r.exit_code == 1 and f"actual {sha}" in r.output and str(tune) in r.output
    r = _cli("run", pack, "--weights-sha256", sha)
    assert r.exit_code == 2 and "give the file too" in r.output
    r = _cli("run", two_tower_pack.path, "--weights", tune, "--weights-sha256", sha)
    assert r.exit_code == 1 and "carries its own weights" in r.output


def test_a_signed_pack_of_methods_loads_with_the_public_key_and_verifies(two_tower_pack, tmp_path):
    from test_signing import Keys

    keys = Keys(tmp_path)
    pack = tmp_path / "towers.pack"
    shutil.copyfile(two_tower_pack.path, pack)
    r = _cli("sign", pack, "--key", keys.a)
    assert r.exit_code == 0, r.output
    assert_towers_equal(aotpack.load(pack, public_key=keys.a_pub), two_tower_pack.model)
    r = _cli("verify", pack, "--public-key", keys.a_pub)
    assert r.exit_code == 0 and "[ok] signature" in r.output, r.output
    r = _cli("verify", pack, "--public-key", keys.b_pub)
    assert r.exit_code == 1 and "made by another key" in r.output
    with pytest.raises(aotpack.ArchiveError, match="made by another key"):
        aotpack.load(pack, public_key=keys.b_pub)
