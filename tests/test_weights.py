"""Weights apart from code: the manifest's weight records, ``Package.load_weights`` from a mapping, a
safetensors file or a checkpoint folder, and the checks that refuse weights that do not fit (nothing changes)."""
from __future__ import annotations

import json
import pathlib
import struct
import threading
import time

import pytest
import torch

import aotpack
from aotpack_runtime import format as fmt
from aotpack_runtime import safetensors_file as stf
from aotpack_runtime.errors import WeightsError
from aotpack_runtime.weights import SwapLock
from conftest import WeightsModel


def new_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """The state_dict of WeightsModel with other values in every float tensor (the tied pair stays tied)."""
    return WeightsModel.make(seed).state_dict()


def eager(state_dict: dict, args: tuple) -> torch.Tensor:
    model = WeightsModel.make()
    model.load_state_dict(state_dict)
    with torch.no_grad():
        return model(*args)


@pytest.fixture
def pkg(weights_pack):
    return aotpack.load(weights_pack.path)


def test_manifest_names_aliases_unread_and_tensors_outside_the_state_dict(weights_pack):
    m = aotpack.load(weights_pack.path).manifest
    assert m.format_version < fmt.V5_FORMAT_VERSION  # these records need no newer format version
    by_name = {w.name: w for w in m.weights}
    assert by_name["emb.weight"].aliases == ("head.weight",) and "head.weight" not in by_name
    assert not by_name["shift"].in_state_dict
    constants = [w.name for w in m.weights if w.name.startswith("lifted_tensor")]
    assert constants and not by_name[constants[0]].in_state_dict
    assert set(m.unread_weights) == {"bn.num_batches_tracked", "unused.weight", "unused.bias"}
    stored = {"emb.weight", "lin.weight", "lin.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
              "one", "scale", "gate", "norm"}
    assert {w.name for w in m.weights if w.in_state_dict} == stored
    assert stored | {"head.weight"} | set(m.unread_weights) == set(WeightsModel.make().state_dict())


def test_new_weights_give_eager_outputs(pkg, weights_pack):
    """Linear + bias, the one-element parameter, the scale buffer, the batch norm's statistics and the tied
    embedding / lm_head all reach the code."""
    args = weights_pack.args
    torch.testing.assert_close(pkg(*args), eager(WeightsModel.make().state_dict(), args))
    new = new_state_dict(1)
    pkg.load_weights(new)
    torch.testing.assert_close(pkg(*args), eager(new, args))
    # The caller's tensors were copied: changing them later does not reach the pack.
    before = pkg(*args)
    new["lin.bias"].add_(1.0)
    torch.testing.assert_close(pkg(*args), before)


def test_one_element_bias_and_scale_buffer_get_new_values(pkg, weights_pack):
    args = weights_pack.args
    sd = WeightsModel.make().state_dict()
    sd["one"] = torch.tensor([3.0])
    sd["scale"] = torch.tensor([-2.0])
    pkg.load_weights({"one": sd["one"], "scale": sd["scale"]}, strict=False)
    torch.testing.assert_close(pkg(*args), eager(sd, args))
    # weights whose elements were all equal at build and that the code reads through an op on them alone
    # (Inductor's joint-graph constant folding would have put exp(gate) and 1 + norm into the code as numbers)
    sd["gate"] = torch.tensor(-0.75)
    sd["norm"] = torch.linspace(-0.5, 0.5, 8)
    pkg.load_weights({"gate": sd["gate"], "norm": sd["norm"]}, strict=False)
    torch.testing.assert_close(pkg(*args), eager(sd, args))


def test_tied_weights_may_come_under_either_name_and_must_agree(pkg, weights_pack):
    args = weights_pack.args
    new = new_state_dict(2)
    only_head = {k: v for k, v in new.items() if k != "emb.weight"}
    pkg.load_weights(only_head)
    torch.testing.assert_close(pkg(*args), eager(new, args))
    untied = dict(new, **{"head.weight": new["emb.weight"] + 1})
    with pytest.raises(WeightsError) as e:
        pkg.load_weights(untied)
    assert e.value.mismatched == (("head.weight", "equal to emb.weight (tied to it in the model)", "other values"),)


def test_every_problem_is_one_error_and_nothing_changes(pkg, weights_pack):
    args = weights_pack.args
    before = pkg(*args)
    bad = new_state_dict(3)
    del bad["lin.bias"]
    del bad["emb.weight"], bad["head.weight"]
    bad["lin.weight"] = bad["lin.weight"].half()
    bad["scale"] = torch.ones(2)
    bad["extra.weight"] = torch.ones(1)
    bad["one"] = [0.5]
    bad["bn.bias"] = torch.empty(8, device="meta")
    with pytest.raises(WeightsError) as e:
        pkg.load_weights(bad)
    err = e.value
    assert set(err.missing) == {"lin.bias", "emb.weight (or head.weight)"}
    assert err.unexpected == ("extra.weight",)
    assert set(err.mismatched) == {("lin.weight", "float32[8, 8]", "float16[8, 8]"),
                                   ("scale", "float32[1]", "float32[2]"), ("one", "float32[1]", "a list, not a tensor"),
                                   ("bn.bias", "float32[8]", "a tensor on the meta device (it holds no values)")}
    for fact in ("lin.bias", "extra.weight", "expected float32[8, 8], actual float16[8, 8]", "strict=False"):
        assert fact in str(err)
    torch.testing.assert_close(pkg(*args), before)
    # Not strict: what is missing keeps its value, what is unknown is ignored; mismatches still refuse.
    with pytest.raises(WeightsError) as e:
        pkg.load_weights(bad, strict=False)
    assert not e.value.missing and not e.value.unexpected and len(e.value.mismatched) == 4
    torch.testing.assert_close(pkg(*args), before)


def test_state_buffers_and_unread_names_are_ignored_and_sessions_keep_state(counter_pack):
    pkg = aotpack.load(counter_pack.path)
    x = torch.ones(3)
    s = pkg.session()
    first, _ = s(x)  # count = 1
    pkg.load_weights({"scale": torch.tensor(5.0), "count": torch.tensor(100.0), "history": torch.zeros(4)})
    second, hist = s(x)  # count = 2, the new scale; the state went on from the session's own
    torch.testing.assert_close(first, x * 1 * 2.0)
    torch.testing.assert_close(second, x * 2 * 5.0)
    torch.testing.assert_close(pkg.session()(x)[0], x * 1 * 5.0)


def test_safetensors_file_and_sharded_folder(pkg, weights_pack, tmp_path):
    args = weights_pack.args
    new = new_state_dict(4)
    one = {k: v for k, v in new.items() if k != "head.weight"}  # as Hugging Face saves a tied pair
    stf.write(tmp_path / "w.safetensors", one)
    pkg.load_weights(tmp_path / "w.safetensors")
    torch.testing.assert_close(pkg(*args), eager(new, args))
    # The weights are views of one mapping of the file, not copies: they lie as far apart as in the file.
    info = stf.read(tmp_path / "w.safetensors").info
    w = pkg.weights
    assert w["lin.bias"].data_ptr() - w["lin.weight"].data_ptr() == info["lin.bias"].begin - info["lin.weight"].begin
    folder = tmp_path / "ckpt"
    folder.mkdir()
    new = new_state_dict(5)
    names = sorted(new)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        stf.write(folder / file, {k: new[k] for k in keys})
    (folder / stf.INDEX_FILE).write_text(json.dumps({"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    pkg.load_weights(folder)
    torch.testing.assert_close(pkg(*args), eager(new, args))
    single = tmp_path / "single"
    single.mkdir()
    stf.write(single / stf.SINGLE_FILE, new_state_dict(6))
    pkg.load_weights(single)
    torch.testing.assert_close(pkg(*args), eager(new_state_dict(6), args))


def test_swap_lock_waits_for_calls_in_flight_and_holds_back_new_ones():
    lock = SwapLock()
    events = []
    lock.__enter__()  # a call in flight
    swapped = threading.Event()

    def swap():
        with lock.swap():
            events.append("swap")
        swapped.set()

    t = threading.Thread(target=swap)
    t.start()
    assert not swapped.wait(0.2)  # the swap waits for the call
    late = threading.Thread(target=lambda: (lock.__enter__(), events.append("late call"), lock.__exit__()))
    late.start()
    late.join(0.2)
    assert late.is_alive() and events == []  # a call that starts while a swap waits, waits for it
    events.append("call done")
    lock.__exit__()
    t.join(5)
    late.join(5)
    assert events == ["call done", "swap", "late call"]


def test_threaded_calls_see_old_or_new_weights_never_a_mix(pkg, weights_pack):
    args = weights_pack.args
    sets = [new_state_dict(10), new_state_dict(11)]
    want = [eager(sd, args) for sd in sets]
    pkg.load_weights(sets[0])
    stop = threading.Event()
    seen, problems = [0, 0], []

    def caller():
        while not stop.is_set():
            out = pkg(*args)
            match = [i for i, w in enumerate(want) if torch.allclose(out, w, rtol=1e-5, atol=1e-5)]
            if len(match) != 1:
                problems.append(out)
                return
            seen[match[0]] += 1

    threads = [threading.Thread(target=caller) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(20):
        current = (i + 1) % 2
        before = seen[current]
        pkg.load_weights(sets[current])
        torch.testing.assert_close(pkg(*args), want[current])  # a call after the swap sees the new weights
        deadline = time.monotonic() + 30  # let the callers run on these weights, however busy the host
        while seen[current] == before and not problems and time.monotonic() < deadline:
            time.sleep(0.001)
    stop.set()
    for t in threads:
        t.join()
    assert not problems and seen[0] and seen[1]


# ---------------------------------------------------------------------------------------------------
# The safetensors reader and writer (no safetensors package in the runtime)

def test_safetensors_round_trip_is_deterministic_and_matches_the_library(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64), "c": torch.tensor(True),
               "d": torch.randn(2, 2).to(torch.bfloat16), "e": torch.zeros(0, 3), "f": torch.randn(4, 3).t()}
    stf.write(tmp_path / "x.safetensors", tensors)
    stf.write(tmp_path / "y.safetensors", dict(reversed(list(tensors.items()))))
    assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "y.safetensors").read_bytes()
    back = stf.read(tmp_path / "x.safetensors")
    assert set(back) == set(tensors) and back.metadata == {"format": "pt"}
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)
    st = pytest.importorskip("safetensors.torch")
    theirs = st.load_file(str(tmp_path / "x.safetensors"))
    assert all(torch.equal(theirs[k], v) for k, v in tensors.items())
    st.save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "z.safetensors"))
    ours = stf.read(tmp_path / "z.safetensors")
    assert all(torch.equal(ours[k], v) for k, v in tensors.items())


def _file(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


@pytest.mark.parametrize("content, fact", [
    (b"\x01\x02", "shorter than the 8-byte header length"),
    (_file({}, length=1 << 62), "header length is 4611686018427387904 bytes (at most 100000000)"),
    (_file({}, length=50), "header length is 50 bytes but the file holds 2"),
    (_file(b"[1, 2]"), "the header is a JSON list"),
    (_file(b'{"a": 1, "a": 2}'), "duplicate key 'a'"),
    (_file({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, bytes(16)), "dtype 'F128'"),
    (_file({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4)), "shape [-1]"),
    (_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, bytes(4)),
     "float32[2] (8 bytes) but its data_offsets [0, 4] hold 4"),
    (_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 1 << 40]}}, bytes(4)), "outside the 4 data"),
    (_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, bytes(6)), "overlaps"),
    (_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8)), "leaves bytes 0..4 unused"),
    (_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(9)), "the file holds 9 data bytes"),
    (_file({"__metadata__": {"x": 1}}), "__metadata__ must be an object of strings"),
])
def test_malformed_safetensors_files_are_clear_errors(tmp_path, content, fact):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(WeightsError) as e:
        stf.read(path)
    assert fact in str(e.value) and str(path) in str(e.value)


def test_damaged_safetensors_files_are_refused_or_read_never_crash(tmp_path):
    """Random damage to a valid file (bytes changed anywhere in the length and header, the file cut short):
    each read is a WeightsError or a file whose tensors all read back, never another exception."""
    import random

    stf.write(tmp_path / "good.safetensors", {"a": torch.randn(4, 3), "b": torch.arange(6, dtype=torch.int16),
                                              "c": torch.ones(2, dtype=torch.bool)})
    good = (tmp_path / "good.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    rng = random.Random(0)
    outcomes = {"refused": 0, "read": 0}
    for i in range(400):
        data = bytearray(good)
        if i % 4 == 0:
            data = data[:rng.randrange(len(data))]
        else:
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(8 + n)] = rng.randrange(256)
        path = tmp_path / "damaged.safetensors"
        path.write_bytes(bytes(data))
        try:
            f = stf.read(path)
            for name in f:
                assert f[name].shape == f.info[name].shape
            outcomes["read"] += 1
        except WeightsError as e:
            assert str(path) in str(e)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 200 and outcomes["read"] > 0


def test_a_bad_weights_file_changes_nothing(pkg, weights_pack, tmp_path):
    before = pkg(*weights_pack.args)
    (tmp_path / "bad.safetensors").write_bytes(_file({"lin.bias": {"dtype": "F32", "shape": [8],
                                                                    "data_offsets": [0, 4]}}, bytes(4)))
    with pytest.raises(WeightsError, match="data_offsets"):
        pkg.load_weights(tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError, match="neither model.safetensors.index.json nor model.safetensors"):
        pkg.load_weights(tmp_path)
    (tmp_path / stf.INDEX_FILE).write_text(json.dumps({"weight_map": {"lin.bias": "../x.safetensors"}}))
    with pytest.raises(WeightsError, match="not a file name in the checkpoint's folder"):
        pkg.load_weights(tmp_path)
    torch.testing.assert_close(pkg(*weights_pack.args), before)


# ---------------------------------------------------------------------------------------------------
# Out and in on the build side: `aotpack weights`, `aotpack reweight`, LoRA

def _cli(*args):
    from click.testing import CliRunner

    from cli.main import cli

    return CliRunner().invoke(cli, list(map(str, args)))


def test_inspect_lists_the_weights_and_export_writes_them_by_state_dict_name(weights_pack, tmp_path):
    r = _cli("inspect", weights_pack.path)
    assert r.exit_code == 0, r.output
    assert "weight emb.weight float32[16, 8] (also head.weight)" in r.output
    assert "weight shift float32[1] (not in the state_dict)" in r.output
    assert "not read by the code: bn.num_batches_tracked, unused.bias, unused.weight" in r.output
    info = json.loads(_cli("inspect", weights_pack.path, "--json").output)
    assert {"name": "one", "dtype": "float32", "shape": [1], "aliases": [], "state_dict": True} in \
        info["weights"]["tensors"]
    r = _cli("weights", weights_pack.path, "-o", tmp_path / "w.safetensors")
    assert r.exit_code == 0, r.output
    _cli("weights", weights_pack.path, "-o", tmp_path / "again.safetensors")
    assert (tmp_path / "w.safetensors").read_bytes() == (tmp_path / "again.safetensors").read_bytes()
    out = stf.read(tmp_path / "w.safetensors")
    sd = weights_pack.model.state_dict()
    read = {k for k in sd if k not in ("head.weight", "bn.num_batches_tracked", "unused.weight", "unused.bias")}
    assert set(out) == read and all(torch.equal(out[k], sd[k]) for k in read)


def test_reweight_writes_the_bytes_of_a_full_build(weights_pack, weights_pack_other, tmp_path):
    """The base pack (seed 0) with the weights of seed 1, from a safetensors file, is the full build of seed 1
    byte for byte; so is the same from the exported weights of that build."""
    other = {k: v for k, v in WeightsModel.make(seed=1).state_dict().items() if k != "head.weight"}
    stf.write(tmp_path / "w1.safetensors", other)
    r = _cli("reweight", weights_pack.path, tmp_path / "w1.safetensors", "-o", tmp_path / "re.pack")
    assert r.exit_code == 0, r.output
    # bn.weight, bn.bias, one, scale keep their values; gate and norm were uniform in the base (seed 0), so this
    # also shows that no weight's build-time value is in the code
    assert "13 weights, 7 of them new" in r.output
    assert (tmp_path / "re.pack").read_bytes() == weights_pack_other.path.read_bytes()
    _cli("weights", weights_pack_other.path, "-o", tmp_path / "exported.safetensors")
    _cli("reweight", weights_pack.path, tmp_path / "exported.safetensors", "-o", tmp_path / "re2.pack")
    assert (tmp_path / "re2.pack").read_bytes() == weights_pack_other.path.read_bytes()


def test_reweight_refuses_weights_that_do_not_fit_and_writes_nothing(weights_pack, tmp_path):
    stf.write(tmp_path / "bad.safetensors", {"lin.weight": torch.ones(2, 2), "nope": torch.ones(1)})
    r = _cli("reweight", weights_pack.path, tmp_path / "bad.safetensors", "-o", tmp_path / "new.pack")
    assert r.exit_code == 1
    for fact in ("missing", "lin.bias", "unexpected 1: nope", "lin.weight (expected float32[8, 8], actual float32[2, 2])"):
        assert fact in r.output
    assert not (tmp_path / "new.pack").exists() and list(tmp_path.iterdir()) == [tmp_path / "bad.safetensors"]


def test_reweight_checks_what_it_copies_and_reads_no_weight_it_replaces(weights_pack, tmp_path):
    """A damaged code blob of the base is refused (the bytes reweight would copy are the bytes it checked); a
    damaged weight that the new weights replace is never read, so the result is the right pack; one that is
    kept (strict=False) is refused; nothing is written on a refusal."""
    from aotpack.reweight import reweight
    from aotpack_runtime.archive import Archive
    from archive_tools import blob_range

    data = weights_pack.path.read_bytes()
    m = Archive.open(str(weights_pack.path)).manifest
    code = next(b.name for b in m.blobs if b.name.startswith("code/") or b.name.startswith("entries/"))
    lin = next(w.blob for w in m.weights if w.name == "lin.weight")

    def damaged(blob: str) -> pathlib.Path:
        start, end = blob_range(data, blob)
        at = (start + end) // 2
        out = tmp_path / f"{blob.replace('/', '-')}.pack"
        out.write_bytes(data[:at] + bytes([data[at] ^ 1]) + data[at + 1:])
        return out

    new = new_state_dict(1)
    with pytest.raises(aotpack.ArchiveError) as e:
        reweight(damaged(code), new, tmp_path / "x.pack")
    assert repr(code) in str(e.value) and "x.pack" not in str(e.value)
    assert not (tmp_path / "x.pack").exists()
    bad_weight = damaged(lin)
    report = reweight(bad_weight, new, tmp_path / "y.pack")
    assert report.changed == 7
    reference = tmp_path / "ref.pack"
    reweight(weights_pack.path, new, reference)
    assert (tmp_path / "y.pack").read_bytes() == reference.read_bytes()
    with pytest.raises(aotpack.ArchiveError) as e:
        reweight(bad_weight, {"lin.bias": new["lin.bias"]}, tmp_path / "z.pack", strict=False)
    assert repr(lin) in str(e.value) and not (tmp_path / "z.pack").exists()


def test_reweighted_pack_is_cached_under_the_key_of_a_full_build_and_signs(weights_pack, tmp_path):
    """``reweight`` stores its pack in the build cache under the key a full build of the model with those
    weights computes: that build (seed 3, which no fixture builds) finds it by its graph key and compiles
    nothing; a base pack the cache does not hold gives a pack and a reason, not an error. The base is signed:
    the summary says the new pack is not and how to sign it; signed, it loads with the public key."""
    import shutil

    from aotpack import front
    from aotpack.reweight import reweight
    from helpers import assert_facts
    from test_signing import Keys

    keys = Keys(tmp_path)
    base = tmp_path / "base.pack"
    shutil.copyfile(weights_pack.path, base)
    assert _cli("sign", base, "--key", keys.a).exit_code == 0
    new = WeightsModel.make(3)
    lines: list[str] = []
    report = reweight(base, new.state_dict(), tmp_path / "re.pack", progress=lines.append)
    assert len(report.key) == 64 and report.cache_note.startswith(f"stored {report.key[:12]}"), report.cache_note
    assert_facts(lines[0], f"the base pack is signed ({base}.sig)", f"aotpack sign {tmp_path / 're.pack'} --key KEY")
    full = front.build(new, WeightsModel.args(), tmp_path / "full.pack", options=front.options(), cache=True,
                       progress=None, source="test")
    assert (full.hit, full.key) == ("graph", report.key)
    r = _cli("sign", tmp_path / "re.pack", "--key", keys.a)
    assert r.exit_code == 0, r.output
    pkg = aotpack.load(tmp_path / "re.pack", public_key=keys.a_pub)
    torch.testing.assert_close(pkg(*weights_pack.args), eager(new.state_dict(), weights_pack.args))
    r = _cli("verify", tmp_path / "re.pack", "--public-key", keys.a_pub)
    assert r.exit_code == 0 and "[ok] signature" in r.output, r.output
    elsewhere = reweight(weights_pack.path, new.state_dict(), tmp_path / "x.pack", cache=tmp_path / "other-cache")
    assert elsewhere.key == "" and "the base pack is not in the build cache" in elsewhere.cache_note
    assert (tmp_path / "x.pack").read_bytes() == (tmp_path / "re.pack").read_bytes()
    stf.write(tmp_path / "w3.safetensors", {k: v for k, v in new.state_dict().items() if k != "head.weight"})
    r = _cli("reweight", weights_pack.path, tmp_path / "w3.safetensors", "-o", tmp_path / "y.pack", "--no-cache")
    assert r.exit_code == 0 and "build cache" not in r.output, r.output
    r = _cli("reweight", weights_pack.path, tmp_path / "w3.safetensors", "-o", tmp_path / "z.pack")
    assert r.exit_code == 0 and f"build cache: stored {report.key[:12]}" in r.output, r.output


def test_lora_merge_matches_peft_merge_and_unload(weights_pack, tmp_path):
    peft = pytest.importorskip("peft")
    model = WeightsModel.make()
    config = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["lin"], use_rslora=True)
    wrapped = peft.get_peft_model(model, config)
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.normal_()
    wrapped.save_pretrained(tmp_path / "adapter")
    merged = wrapped.merge_and_unload().eval()
    r = _cli("reweight", weights_pack.path, "--lora", tmp_path / "adapter", "-o", tmp_path / "lora.pack")
    assert r.exit_code == 0, r.output
    assert "1 merged with the LoRA adapter" in r.output
    pkg = aotpack.load(tmp_path / "lora.pack")
    torch.testing.assert_close(pkg.weights["lin.weight"], merged.state_dict()["lin.weight"])
    with torch.no_grad():
        torch.testing.assert_close(pkg(*weights_pack.args), merged(*weights_pack.args))


def test_lora_fan_in_fan_out_by_the_formula_and_bad_adapters(weights_pack, tmp_path):
    from aotpack.reweight import merge_lora

    m = aotpack.load(weights_pack.path)
    a, b = torch.randn(3, 8), torch.randn(8, 3)
    folder = tmp_path / "a"
    folder.mkdir()
    stf.write(folder / "adapter_model.safetensors", {"base_model.model.lin.lora_A.weight": a,
                                                     "base_model.model.lin.lora_B.weight": b})
    (folder / "adapter_config.json").write_text(json.dumps({"r": 3, "lora_alpha": 6, "fan_in_fan_out": True}))
    new, n = merge_lora(m.manifest, m.weights, folder)
    assert n == 1
    torch.testing.assert_close(new["lin.weight"], m.weights["lin.weight"] + 2.0 * (b @ a).t())
    assert all(new[k] is v for k, v in m.weights.items() if k != "lin.weight")
    stf.write(folder / "adapter_model.safetensors", {"base_model.model.lin.lora_A.weight": a,
                                                     "base_model.model.gone.lora_A.weight": a,
                                                     "base_model.model.gone.lora_B.weight": b,
                                                     "base_model.model.x.bias": b})
    with pytest.raises(WeightsError) as e:
        merge_lora(m.manifest, m.weights, folder)
    for fact in ("lin: lacks lora_B", "gone: the pack has no weight gone.weight", "x.bias: not a lora_A or lora_B"):
        assert fact in str(e.value)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 0, "lora_alpha": 6}))
    with pytest.raises(WeightsError, match="positive integer r"):
        merge_lora(m.manifest, m.weights, folder)


# ---------------------------------------------------------------------------------------------------
# Packs that carry no weights: `build --weights external`, `load(pack, weights=...)`

@pytest.fixture
def external_pack(weights_pack, tmp_path):
    import shutil

    from aotpack.reweight import externalize

    pack = tmp_path / "ext.pack"
    shutil.copyfile(weights_pack.path, pack)
    return pack, externalize(pack)


def test_external_weights_live_beside_the_pack_pinned_by_their_hash(weights_pack, external_pack, tmp_path):
    import hashlib
    import shutil

    from aotpack.reweight import externalize
    from aotpack_runtime.archive import Archive

    pack, wfile = external_pack
    assert wfile == tmp_path / "ext.safetensors"
    m = Archive.open(str(pack)).manifest
    assert m.format_version == 5 and all(w.blob is None for w in m.weights)
    assert not any(b.name.startswith("weights/") for b in m.blobs)
    assert m.external_weights.sha256 == hashlib.sha256(wfile.read_bytes()).hexdigest()
    assert set(stf.read(wfile)) == {w.name for w in m.weights}
    internal = aotpack.load(weights_pack.path)
    pkg = aotpack.load(pack)
    torch.testing.assert_close(pkg(*weights_pack.args), internal(*weights_pack.args))
    # same pack, same bytes
    (tmp_path / "again").mkdir()
    shutil.copyfile(weights_pack.path, tmp_path / "again" / "ext.pack")
    externalize(tmp_path / "again" / "ext.pack")
    assert (tmp_path / "again" / "ext.pack").read_bytes() == pack.read_bytes()
    assert (tmp_path / "again" / "ext.safetensors").read_bytes() == wfile.read_bytes()
    # a second load of the same file in this process shares its mapping (and hashes nothing)
    again = aotpack.load(pack)
    assert again.weights["lin.weight"].data_ptr() == pkg.weights["lin.weight"].data_ptr()
    pkg.load_weights(new_state_dict(1))
    torch.testing.assert_close(pkg(*weights_pack.args), eager(new_state_dict(1), weights_pack.args))


def test_another_weights_file_needs_its_own_pin(weights_pack, weights_pack_other, external_pack, tmp_path):
    import hashlib

    from aotpack_runtime.archive import Archive
    from aotpack_runtime.weights import load_weights as stored

    pack, wfile = external_pack
    tune = tmp_path / "tune.safetensors"
    stf.write(tune, stored(Archive.open(str(weights_pack_other.path)), checked=False))
    sha = hashlib.sha256(tune.read_bytes()).hexdigest()
    with pytest.raises(aotpack.ArchiveError) as e:
        aotpack.load(pack, weights=tune)
    pin = Archive.open(str(pack)).manifest.external_weights.sha256
    assert f"expected {pin}, actual {sha}" in str(e.value) and str(tune) in str(e.value)
    pkg = aotpack.load(pack, weights=tune, weights_sha256=sha)
    torch.testing.assert_close(pkg(*weights_pack.args), eager(new_state_dict(1), weights_pack.args))
    # a checkpoint that keeps the tied pair under its other name (lm_head's) serves it too
    tensors = stored(Archive.open(str(weights_pack_other.path)), checked=False)
    tensors["head.weight"] = tensors.pop("emb.weight")
    stf.write(tune, tensors)
    sha = hashlib.sha256(tune.read_bytes()).hexdigest()
    pkg = aotpack.load(pack, weights=tune, weights_sha256=sha)
    torch.testing.assert_close(pkg(*weights_pack.args), eager(new_state_dict(1), weights_pack.args))
    del tensors["head.weight"]
    stf.write(tune, tensors)
    sha = hashlib.sha256(tune.read_bytes()).hexdigest()
    with pytest.raises(aotpack.ArchiveError, match=r"emb.weight \(missing; nor under head.weight\)"):
        aotpack.load(pack, weights=tune, weights_sha256=sha)
    stf.write(tune, {"lin.weight": torch.ones(8, 8)})
    sha = hashlib.sha256(tune.read_bytes()).hexdigest()
    with pytest.raises(aotpack.ArchiveError, match=r"lin.bias \(missing\)"):
        aotpack.load(pack, weights=tune, weights_sha256=sha)
    wfile.unlink()
    with pytest.raises(aotpack.ArchiveError, match=r"cannot open the pack's weights file.*weights=PATH"):
        aotpack.load(pack)
    with pytest.raises(aotpack.ArchiveError, match="carries its own weights"):
        aotpack.load(weights_pack.path, weights=tune)


def test_cli_build_with_external_weights_verify_and_export(mlp_pack, tmp_path):
    from conftest import EXAMPLES

    out = tmp_path / "mlp.pack"
    r = _cli("build", EXAMPLES / "mlp.py", "-o", out, "--weights", "external")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "mlp.safetensors").exists()
    pkg = aotpack.load(out)
    torch.testing.assert_close(pkg(*mlp_pack.args), aotpack.load(mlp_pack.path)(*mlp_pack.args))
    r = _cli("verify", out)
    assert r.exit_code == 0, r.output
    r = _cli("inspect", out)
    assert "kept beside the pack in mlp.safetensors" in r.output
    r = _cli("weights", out, "-o", tmp_path / "w.safetensors")
    assert r.exit_code == 0, r.output
    assert set(stf.read(tmp_path / "w.safetensors")) == set(mlp_pack.model.state_dict())
    r = _cli("reweight", out, tmp_path / "w.safetensors", "-o", tmp_path / "x.pack")
    assert r.exit_code == 1 and "weights_sha256" in r.output
