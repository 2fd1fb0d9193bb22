"""`aotpack verify` and `aotpack diff`: what CI uses to check the pack it ships."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import aotpack
from aotpack.checks import causes, diff, render_diff, verify
from aotpack_cli.main import cli
from aotpack_runtime import format as fmt
from archive_tools import blob_range, join, split, with_manifest
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
    assert d["causes"] == [{"where": "target.cpu_isa", "a": "avx2", "b": "x86-64",
                            "text": "built for CPU instruction set avx2 vs x86-64"}]
    r = CliRunner().invoke(cli, ["diff", str(mlp_pack.path), str(variants[0])])
    assert r.exit_code == 1
    assert r.output.splitlines()[1] == "  cause: built for CPU instruction set avx2 vs x86-64"
    assert "manifest options.cpu_isa: 'avx2' -> 'x86-64'" in r.output


def test_diff_names_a_changed_weight(mlp_pack, variants):
    d = diff(str(mlp_pack.path), str(variants[1]))
    assert d["fields"] == [] and d["entries"] == [] and d["causes"] == []
    assert "cause:" not in render_diff(d)  # the weights say it
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


def test_diff_names_what_built_the_packs_differently_before_the_bytes(mlp_pack, tmp_path):
    """A copy of the pack as another toolchain would have recorded it (manifest edited, hash recomputed)."""
    def rebuilt_elsewhere(m):
        m["producer"].update(aotpack="0.2.0", torch="2.14.1", python="3.12.1", compiler="g++ 13.1.0",
                             platform="linux-aarch64")
        m["target"]["torch_series"] = "2.14"
        m["options"]["compression_level"] = 3

    other = tmp_path / "other.pack"
    other.write_bytes(with_manifest(mlp_pack.path.read_bytes(), rebuilt_elsewhere))
    producer = aotpack.load(mlp_pack.path).manifest.producer
    texts = [f"built with aotpack {producer['aotpack']} vs 0.2.0",
             f"built with torch {producer['torch']} vs 2.14.1",
             f"built with Python {producer['python']} vs 3.12.1",
             f"built with {producer['compiler']} vs 13.1.0",
             f"built on {producer['platform']} vs linux-aarch64",
             "built with compression level 9 vs 3"]
    d = diff(str(mlp_pack.path), str(other))
    assert [c["text"] for c in d["causes"]] == texts  # the torch series follows from the torch version
    assert d["causes"][1] == {"where": "producer.torch", "a": producer["torch"], "b": "2.14.1", "text": texts[1]}
    r = CliRunner().invoke(cli, ["diff", str(mlp_pack.path), str(other)])
    assert r.exit_code == 1
    lines = r.output.splitlines()
    assert lines[0] == f"{mlp_pack.path} and {other} differ:"
    assert lines[1:7] == [f"  cause: {t}" for t in texts]
    assert lines[7].startswith("  manifest ")
    r = CliRunner().invoke(cli, ["diff", str(mlp_pack.path), str(other), "--json"])
    assert [c["text"] for c in json.loads(r.output)["causes"]] == texts


def test_diff_says_when_no_recorded_cause_explains_a_difference(mlp_pack, tmp_path):
    other = tmp_path / "other.pack"
    other.write_bytes(with_manifest(mlp_pack.path.read_bytes(), lambda m: m["frozen"].update(training=True)))
    d = diff(str(mlp_pack.path), str(other))
    assert d["causes"] == [] and [f["where"] for f in d["fields"]] == ["frozen.training"]
    assert render_diff(d).splitlines()[1] == (
        "  cause: none recorded (same aotpack, torch, Python, compiler, platform, target and options, same weights "
        "and guards): the model's code, or a build input the pack does not record, differs")


def test_causes_of_cuda_and_option_differences():
    a = {"format_version": 1, "producer": {"torch": "2.14.1"}, "target": {"cpu_isa": "native", "cpu_flags": ["avx2"]},
         "options": {"devices": ["cpu"], "cuda_archs": [], "without_gpu": False, "cpu_isa": "native"},
         "entries": [{"device": "cpu"}]}
    b = {"format_version": 2, "producer": {"torch": "2.14.1", "triton": "3.8.0"},
         "target": {"cpu_isa": "native", "cpu_flags": ["avx2", "avx512f"]},
         "options": {"devices": ["cuda"], "cuda_archs": [80, 90], "without_gpu": True, "cpu_isa": "native"},
         "entries": [{"device": "cuda", "cuda": {"cuda_version": "13.0", "build_gpu": None}}]}
    assert [c["text"] for c in causes(a, b)] == [
        "built with triton (not recorded) vs 3.8.0",
        "built for another native CPU (CPU flags only in a: none; only in b: avx512f)",
        "built with CUDA architectures none vs 80, 90",
        "built with devices cpu vs cuda",
        "CUDA code built on a GPU vs without a GPU",
        "written as format version 1 vs 2",
    ]
    gpu = {**b, "options": {**b["options"], "without_gpu": False},
           "entries": [{"device": "cuda", "cuda": {"cuda_version": "12.8", "build_gpu": "NVIDIA H100 (sm_90)"}}]}
    gpu2 = {**gpu, "entries": [{"device": "cuda",
                                "cuda": {"cuda_version": "12.8", "build_gpu": "NVIDIA A100 (sm_80)"}}]}
    assert [c["text"] for c in causes(b, gpu)] == ["CUDA code built without a GPU vs on a GPU",
                                                    "built with CUDA 13.0 vs 12.8"]
    assert [c["text"] for c in causes(gpu, gpu2)] == ["built on GPU NVIDIA H100 (sm_90) vs NVIDIA A100 (sm_80)"]


def test_diff_names_a_section_it_has_no_rule_for(mlp_pack, tmp_path):
    """A manifest section diff does not compare one by one (here the state_dict names the code never reads)
    is still named, so that "same manifest content" is never said of two manifests that differ."""
    other = tmp_path / "other.pack"
    other.write_bytes(with_manifest(mlp_pack.path.read_bytes(), lambda m: m.update(unread_weights=["extra.bias"])))
    d = diff(str(mlp_pack.path), str(other))
    assert any(f["where"].startswith("unread_weights") for f in d["fields"])
    assert "same manifest content" not in render_diff(d)
