"""The corpus (tests/corpus.py): every model builds and matches eager in a fresh process, or is refused at build
with a CaptureError naming the user's line. One pack holds every group of models (one entry per group, compiled
in parallel), built once per test run (``corpus_pack`` in conftest.py)."""
from __future__ import annotations

import copy
import os
import pathlib

import pytest
import torch

import aotpack
import corpus
from conftest import run_python

# Run in a fresh process: load the pack (the runtime only), call every group on every input set, and save what
# came back and what the inputs hold afterwards (a pack writes into the inputs its model writes into).
_FRESH = """
import sys, torch
import torch.utils._pytree as pytree
import aotpack_runtime
pkg = aotpack_runtime.load({pack!r})
calls = torch.load({calls!r})
results = []
for group, label, inputs in calls:
    out = pkg(group, inputs)
    # copies: outputs may view one storage as several dtypes (view_as_real), which torch.save refuses
    results.append(pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, (out, inputs)))
torch.save({{"results": results,
            "build_side": sorted(m for m in sys.modules
                                 if m.startswith(("torch._dynamo", "torch._inductor", "aotpack.")))}},
           {out!r})
"""


@pytest.fixture(scope="session")
def corpus_run(corpus_pack, session_dir) -> dict:
    """Per model: (max error over every input set, the input sets it was checked on); or the failure."""
    model = corpus.Corpus().eval()
    calls = [(g, label, inputs) for g in corpus.GROUPS for label, inputs in corpus.input_sets(g)]
    calls_file, out_file = session_dir / "corpus-calls.pt", session_dir / "corpus-results.pt"
    torch.save(calls, calls_file)
    proc = run_python(_FRESH.format(pack=str(corpus_pack), calls=str(calls_file), out=str(out_file)), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = torch.load(out_file)
    assert fresh["build_side"] == [], f"the fresh process imported {fresh['build_side']}"
    report: dict = {}
    for (group, label, inputs), (out, inputs_after) in zip(calls, fresh["results"]):
        eager_inputs = copy.deepcopy(inputs)
        with torch.no_grad():
            expected = model(group, eager_inputs)
        for name in corpus.GROUPS[group]:
            entry = report.setdefault(name, {"error": 0.0, "sets": [], "failure": None})
            if entry["failure"]:
                continue
            try:
                err = max(corpus.max_error(out[name], expected[name]),
                          corpus.max_error(inputs_after[name], eager_inputs[name]))  # what it wrote into
            except AssertionError as e:
                entry["failure"] = f"{label}: {e}"
                continue
            entry["error"] = max(entry["error"], err)
            entry["sets"].append(label)
    if os.environ.get("AOTPACK_CORPUS_TABLE"):
        _write_table(report, pathlib.Path(os.environ["AOTPACK_CORPUS_TABLE"]))
    return report


def _write_table(report: dict, path: pathlib.Path) -> None:
    """The corpus table of docs/MODELS.md, from this run."""
    rows = ["| model | pattern | outcome | max error |", "|---|---|---|---|"]
    for c in corpus.CASES:
        if c.refused:
            rows.append(f"| `{c.name}` | {c.what} | refused at build (`CaptureError`) | - |")
        else:
            r = report[c.name]
            outcome = "matches eager" if r["failure"] is None and r["error"] <= c.rel else f"FAILS: {r['failure']}"
            sets = len(r["sets"])
            rows.append(f"| `{c.name}` | {c.what} | {outcome} ({sets} input sets) | {r['error']:.0e} |")
    path.write_text("\n".join(rows) + "\n")


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
    info = describe(Archive.open(corpus_pack))
    assert info["format_version"] == 3
    assert [e["guards"][0].split(" == ")[1] for e in info["entries"]] == ["'dynamic'", "'static'"]
    static = info["entries"][1]
    assert "aten::_unique2" in static["extern_kernels"]
    assert static["writes"] == ["inputs (args[1]['inplace_inputs'][0])", "inputs (args[1]['inplace_inputs'][1])",
                                "inputs (args[1]['inplace_inputs'][2])"]
