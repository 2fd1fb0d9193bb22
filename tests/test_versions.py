"""The torch versions aotpack claims are the ones CI tests, and a pack built by one torch series is refused by
every other with a message that names both (a pack's native code links the libtorch it was built with).

The packs in benchmarks/gpu_check/packs were built without a GPU by torch 2.11 (the torch of the GPU machines);
every version lane loads them: the 2.11 lane runs them, every other lane must refuse them."""
from __future__ import annotations

import re
import warnings

import pytest
import torch

import aotpack
from aotpack_runtime.platform import TORCH_SERIES, torch_minor
from archive_tools import with_manifest
from conftest import EXAMPLES, ROOT
from helpers import assert_close_to_eager, assert_facts

SHIPPED = ROOT / "benchmarks" / "gpu_check" / "packs"
THIS = torch_minor(torch.__version__)


def _series(text: str) -> list[str]:
    """``torch>=2.11,<2.16`` -> ["2.11", ..., "2.15"]"""
    major, low, high_major, high = re.fullmatch(r"torch>=(\d+)\.(\d+),<(\d+)\.(\d+)", text).groups()
    assert major == high_major, text
    return [f"{major}.{m}" for m in range(int(low), int(high))]


def test_the_claimed_torch_series_are_the_tested_ones():
    """pyproject.toml's torch range, the runtime's list and the CI lanes name the same series."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    claimed = _series(re.search(r'"(torch>=[^"]+)"', pyproject).group(1))
    assert tuple(claimed) == TORCH_SERIES
    lanes = {}
    for pins in (ROOT / ".ci" / "lanes").glob("torch-*.txt"):
        version = re.search(r"^torch==(\S+)$", pins.read_text(), re.M).group(1)
        assert torch_minor(version) == pins.stem.removeprefix("torch-"), pins
        lanes[torch_minor(version)] = pins.name
    main = re.search(r'TORCH_SPEC:-torch==([\d.]+)', (ROOT / ".ci" / "setup").read_text()).group(1)
    cuda = re.search(r'CUDA_TORCH_SPEC:-torch==([\d.]+)', (ROOT / ".ci" / "setup-cuda").read_text()).group(1)
    lanes[torch_minor(main)] = ".ci/setup"
    lanes[torch_minor(cuda)] = ".ci/setup-cuda"
    assert sorted(lanes) == sorted(TORCH_SERIES), lanes
    run = (ROOT / ".ci" / "test").read_text()  # .ci/run runs .ci/test, which runs every lane
    assert re.search(r"^lanes=\((.*)\)$", run, re.M).group(1).split() == \
        sorted(set(lanes) - {torch_minor(main), torch_minor(cuda)})


def test_this_torch_is_a_claimed_series():
    assert THIS in TORCH_SERIES, f"torch {torch.__version__} is not in {TORCH_SERIES}"


@pytest.mark.parametrize("other", [s for s in TORCH_SERIES if s != THIS])
def test_a_pack_from_another_series_is_refused(mlp_pack, other, tmp_path):
    """One pack per other claimed series (the producer's torch rewritten): refused, naming both versions."""
    def built_with(m):
        m["producer"]["torch"] = f"{other}.0"
        m["target"]["torch_series"] = other

    path = tmp_path / f"from-{other}.pack"
    path.write_bytes(with_manifest(mlp_pack.path.read_bytes(), built_with))
    with pytest.raises(aotpack.ArchiveError) as e:
        aotpack.load(path, cache_dir=tmp_path / "cache")
    assert_facts(str(e.value), f"built with torch {other}.0", f"runs torch {torch.__version__}",
                 f"torch {other} series", f"torch=={other}.*", "rebuild the pack")


@pytest.mark.parametrize("name", ["mlp", "convnet", "multi_io"])
def test_packs_built_by_torch_2_11_without_a_gpu(name, tmp_path):
    """The packs gpu_check.sh ships: torch 2.11 serves their CPU entry (matching eager) and, with no GPU,
    refuses their CUDA entry clearly; every other series refuses the pack."""
    from aotpack.modelfile import load_model_file

    path = SHIPPED / f"{name}.pack"
    assert path.is_file(), f"{path} is missing: run bash benchmarks/gpu_check/build-packs.sh"
    if THIS != "2.11":
        with pytest.raises(aotpack.ArchiveError, match=re.escape(
                f"the pack was built with torch 2.11.0+cu130 and this process runs torch {torch.__version__}; "
                "native code is only loaded by the torch 2.11 series: install torch==2.11.*")):
            aotpack.load(path, cache_dir=tmp_path / "cache")
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pkg = aotpack.load(path, cache_dir=tmp_path / "cache")
    assert [e.device for e in pkg.entries] == ["cpu", "cuda"]
    assert pkg.manifest.entries[1].cuda.built_without_gpu is True
    spec = load_model_file(str(EXAMPLES / f"{name}.py"))
    with torch.no_grad():
        assert_close_to_eager(pkg(*spec.example_inputs, **spec.example_kwargs),
                              spec.model(*spec.example_inputs, **spec.example_kwargs))
