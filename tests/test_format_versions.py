"""Packs made by older code keep loading: one pack of each format version (tests/data/formats/, made by
build-packs.sh there), loaded by this checkout and checked against eager, and read into the schema's
records, which write its manifest back byte for byte. A pack's native code loads only in the torch series
that built it, so each pack runs in the lane of its torch and skips in the others."""
from __future__ import annotations

import importlib.util
import json
import warnings

import pytest
import torch

import aotpack
from aotpack_runtime import format as fmt
from aotpack_runtime.errors import AotpackWarning
from aotpack_runtime.platform import cuda_unavailable_reason, torch_minor
from conftest import ROOT
from helpers import assert_close_to_eager

DATA = ROOT / "tests" / "data" / "formats"
# version -> (pack, function of models.py it was built from, the kinds of its entries)
PACKS = {1: ("v1.pack", "plain", ["cpu"]), 2: ("v2.pack", "plain", ["cpu", "cuda"]),
         3: ("v3.pack", "stateful", ["cpu"]), 4: ("v4.pack", "unbounded", ["cpu"])}


def _models():
    spec = importlib.util.spec_from_file_location("format_models", DATA / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _header_and_manifest(path) -> tuple[int, dict]:
    data = path.read_bytes()
    magic, version, _, size, _ = fmt.HEADER.unpack_from(data)
    assert magic == fmt.MAGIC
    return version, json.loads(data[fmt.HEADER_SIZE:fmt.HEADER_SIZE + size])


def _load(version: int, tmp_path):
    name, function, devices = PACKS[version]
    path = DATA / name
    written, manifest = _header_and_manifest(path)
    assert written == version, f"{name} is format version {written}, not {version}: rebuild it with older code"
    assert [e["device"] for e in manifest["entries"]] == devices
    built = manifest["producer"]["torch"]
    if torch_minor(built) != torch_minor(torch.__version__):
        pytest.skip(f"{name} was built with torch {built}; its native code loads only in that series, and this "
                    f"is torch {torch.__version__}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AotpackWarning)  # a pack built without a GPU says so at load
        pkg = aotpack.load(path, cache_dir=tmp_path / "code-cache")
    spec = getattr(_models(), function)()
    model, example = (spec["model"], spec["example_inputs"]) if isinstance(spec, dict) else spec
    return pkg, model, example


@pytest.mark.parametrize("version", [1, 2, 4])
def test_a_pack_of_each_stateless_version_matches_eager(version, tmp_path):
    pkg, model, example = _load(version, tmp_path)
    stored, _ = pkg.example_inputs()
    torch.testing.assert_close(stored[0], example[0], rtol=0, atol=0)
    rows = [example[0].shape[0]] + ([2, 7, 1000] if version == 4 else [])  # v4: no upper bound on dim 0
    with torch.no_grad():
        for n in rows:
            x = torch.linspace(-3, 3, n * 4).reshape(n, 4)
            assert_close_to_eager(pkg(x), model(x))
    if version == 4:
        with pytest.raises(aotpack.GuardError) as info:
            pkg(torch.randn(1, 4))
        assert "below 2" in str(info.value)


def test_the_cuda_entry_of_a_version_2_pack_runs_where_a_gpu_can(tmp_path):
    pkg, model, example = _load(2, tmp_path)
    if cuda_unavailable_reason() is not None:
        pytest.skip(f"no usable CUDA device: {cuda_unavailable_reason()}")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 0):
        pytest.skip(f"the pack's CUDA code is for sm_80 and newer; this GPU is sm_{major}{minor}")
    x = example[0].cuda()
    with torch.no_grad():
        assert pkg.select(x) is pkg.entries[1]
        assert_close_to_eager(pkg(x).cpu(), model(example[0]))


def test_a_version_3_pack_with_state_matches_eager_call_after_call(tmp_path):
    pkg, model, example = _load(3, tmp_path)
    session = pkg.session()
    with torch.no_grad():
        for _ in range(3):
            assert_close_to_eager(session(*example), model(*example))
        session.reset()
        assert_close_to_eager(session(*example), _models().stateful()[0](*example))


@pytest.mark.parametrize("version", sorted(PACKS))
def test_the_records_of_each_version_write_its_manifest_back_byte_for_byte(version):
    """The schema's records hold every field older code wrote: read into records and written back through
    their ``to_json``, the manifest of a pack of each version is the same bytes (the writer writes records)."""
    from aotpack_runtime import schema

    data = (DATA / PACKS[version][0]).read_bytes()
    _, _, size, _ = fmt.HEADER.unpack_from(data)[1:]
    manifest = data[fmt.HEADER_SIZE:fmt.HEADER_SIZE + size]
    records = schema.Manifest.from_json(fmt.parse_json(manifest))
    assert records.format_version == version
    assert fmt.canonical_json(records.to_json()) == manifest
