"""The corpus (tests/corpus.py): every model builds and matches eager in a fresh process, or is refused at build
with a CaptureError naming the user's line. One pack holds every group of models (one entry per group, compiled
in parallel), built and run in a fresh process once per test run (``corpus_pack`` and ``corpus_run`` in
conftest.py)."""
from __future__ import annotations

import pytest
import torch

import aotpack
import corpus

@pytest.mark.parametrize("name", [c.name for c in corpus.CASES if c.refused is None])
def test_matches_eager_in_a_fresh_process(corpus_run, name):
    case = corpus.BY_NAME[name]
    result = corpus_run[name]
    assert result["failure"] is None, result["failure"]
    assert result["error"] <= case.rel, f"max relative error {result['error']:.2e} above {case.rel}"
    expected_sets = 2 + max(len(corpus.BY_NAME[n].sizes) for n in corpus.GROUPS[_group_of(name)]) - 1
    assert len(result["sets"]) == expected_sets


def _group_of(name: str) -> str:
    return next(g for g, names in corpus.GROUPS.items() if name in names)


def _refused_line(case: corpus.Case) -> int:
    import inspect

    lines, start = inspect.getsourcelines(case.make)
    return start + next(i for i, line in enumerate(lines) if "# refused here" in line)


@pytest.mark.parametrize("name", [c.name for c in corpus.REFUSED])
def test_refused_at_build_with_the_users_line(session_dir, name):
    case = corpus.BY_NAME[name]
    model = corpus.make_model(name)
    args = case.inputs(torch.Generator().manual_seed(0), case.sizes[0])
    out = session_dir / f"refused-{name}.pack"
    with pytest.raises(aotpack.CaptureError, match=case.refused) as info:
        aotpack.build(model, args, out)
    assert not out.exists()
    if any("# refused here" in line for line in __import__("inspect").getsourcelines(case.make)[0]):
        assert (info.value.filename, info.value.lineno) == (corpus.__file__, _refused_line(case))


def test_the_corpus_covers_the_issue(corpus_pack):
    """At least 40 models; both groups in one pack, one entry each; the pack uses the format's newer features."""
    from aotpack_runtime.archive import Archive
    from aotpack_runtime.describe import describe

    assert len(corpus.CASES) >= 40
    info = describe(Archive.open(corpus_pack.path))
    assert info["format_version"] == 4  # tied weights and unread batch-norm counters need no newer version
    assert [e["guards"][0].split(" == ")[1] for e in info["entries"]] == ["'dynamic'", "'static'"]
    static = info["entries"][1]
    assert "aten::_unique2" in static["extern_kernels"]
    assert static["writes"] == ["inputs (args[1]['inplace_inputs'][0])", "inputs (args[1]['inplace_inputs'][1])",
                                "inputs (args[1]['inplace_inputs'][2])"]
