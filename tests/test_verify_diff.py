"""`aotpack verify` and `aotpack diff`: what CI uses to check the pack it ships."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import aotpack
from aotpack.checks import diff, verify
from aotpack_cli.main import cli
from aotpack_runtime import format as fmt
from archive_tools import blob_range, join, split
from conftest import EXAMPLES


@pytest.fixture(scope="module")
def variants(mlp_pack, session_dir):
    """The MLP built for another ISA, and with one weight changed (same options)."""
    from aotpack.modelfile import load_model_file

    spec = load_model_file(str(EXAMPLES / "mlp.py"))
    isa = aotpack.build(spec.model, spec.example_inputs, session_dir / "mlp-x86-64.pack", cpu_isa="x86-64")
    with torch.no_grad():
        spec.model.net[0].weight[0, 0] += 1.0
    weight = aotpack.build(spec.model, spec.example_inputs, session_dir / "mlp-weight.pack")
    return isa, weight


def test_verify_ok_against_model_file(mlp_pack):
    r = CliRunner().invoke(cli, ["verify", str(mlp_pack.path), "--against", str(EXAMPLES / "mlp.py")])
    assert r.exit_code == 0, r.output
    assert "[ok] numerics: matches eager" in r.output


@pytest.mark.parametrize("blob", ["weights/0", "code/0.so", "source/0/wrapper.cpp", "example/0"])
def test_verify_catches_a_flipped_byte_in_each_blob_kind(mlp_pack, tmp_path, blob):
    data = bytearray(mlp_pack.path.read_bytes())
    start, end = blob_range(bytes(data), blob)
    data[(start + end) // 2] ^= 0x01
    bad = tmp_path / "bad.pack"
    bad.write_bytes(bytes(data))
    result = verify(str(bad))
    assert not result["ok"]
    failed = [c for c in result["checks"] if not c["ok"]]
    assert failed[0]["check"] == "hashes"
    assert blob in failed[0]["detail"]
    r = CliRunner().invoke(cli, ["verify", str(bad), "--json"])
    assert r.exit_code == 1 and json.loads(r.output)["ok"] is False


def test_verify_catches_a_wrong_format_version(mlp_pack, tmp_path):
    _, manifest, region = split(mlp_pack.path.read_bytes())
    manifest["format_version"] = fmt.FORMAT_VERSION + 1
    bad = tmp_path / "v.pack"
    bad.write_bytes(join(fmt.FORMAT_VERSION + 1, fmt.canonical_json(manifest), region))
    result = verify(str(bad))
    assert not result["ok"] and "unsupported format version" in result["checks"][0]["detail"]


def test_diff_equal(mlp_pack):
    r = CliRunner().invoke(cli, ["diff", str(mlp_pack.path), str(mlp_pack.path)])
    assert r.exit_code == 0 and "are identical" in r.output


def test_diff_names_a_changed_option(mlp_pack, variants):
    d = diff(str(mlp_pack.path), str(variants[0]))
    where = {f["where"] for f in d["fields"]}
    assert {"options.cpu_isa", "target.cpu_isa"} <= where
    assert any(s["blob"] == "source/0/kernel.cpp" and "-march=x86-64-v3" in s["diff"] for s in d["sources"])
    r = CliRunner().invoke(cli, ["diff", str(mlp_pack.path), str(variants[0])])
    assert r.exit_code == 1
    assert "manifest options.cpu_isa: 'avx2' -> 'x86-64'" in r.output


def test_diff_names_a_changed_weight(mlp_pack, variants):
    d = diff(str(mlp_pack.path), str(variants[1]))
    assert d["fields"] == [] and d["entries"] == []
    assert [w["weight"] for w in d["weights"]] == ["net.0.weight"]
    assert d["weights"][0]["change"].startswith("values differ")
    r = CliRunner().invoke(cli, ["diff", str(mlp_pack.path), str(variants[1]), "--json"])
    assert r.exit_code == 1 and json.loads(r.output)["weights"][0]["weight"] == "net.0.weight"


def test_baseline_isa_pack_runs(mlp_pack, variants):
    pkg = aotpack.load(variants[0])
    assert pkg.manifest.target["cpu_isa"] == "x86-64"
    with torch.no_grad():
        torch.testing.assert_close(pkg(*mlp_pack.args), aotpack.load(mlp_pack.path)(*mlp_pack.args),
                                   rtol=1e-5, atol=1e-5)
