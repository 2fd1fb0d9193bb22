"""One test per private torch API aotpack touches (aotpack/_torch.py and runtime/_torch.py): a torch upgrade
that moves one fails here, by name."""
from __future__ import annotations

import torch

from aotpack import _torch as build_torch
from aotpack_runtime import _torch as rt_torch


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x, *, k: int = 2):
        return {"y": self.lin(x) * k}


def test_export_strict_lifts_parameters_and_specialises_values():
    ep = build_torch.export_strict(_Tiny(), (torch.randn(2, 4),), {"k": 3})
    kinds = [s.kind.name for s in ep.graph_signature.input_specs]
    assert kinds == ["PARAMETER", "PARAMETER", "USER_INPUT", "USER_INPUT"]
    assert type(ep.graph_signature.input_specs[-1].arg).__name__ == "ConstantArgument"
    assert "lin.weight" in ep.state_dict


def test_graph_break_types_and_details():
    types = build_torch.graph_break_types()
    assert types and all(issubclass(t, Exception) for t in types)

    def bad(x):
        if x.sum() > 0:
            return x
        return -x

    try:
        from aotpack.capture import _FunctionModule

        build_torch.export_strict(_FunctionModule(bad), (torch.randn(2),), {})
    except types as e:
        gb_type, stack = build_torch.unsupported_details(e)
        assert gb_type == "Data-dependent branching"
        assert any(f.filename == __file__ for f in stack)
    else:
        raise AssertionError("no graph break")


def test_inductor_config_keys_exist():
    from torch._inductor import config

    for key in list(build_torch.BASE_INDUCTOR_CONFIG) + [k for o in build_torch.ISA_COMPILER_OPTIONS.values()
                                                          for k in o]:
        obj = config
        for part in key.split("."):
            assert hasattr(obj, part), key
            obj = getattr(obj, part)
    with build_torch.inductor_config({"aot_inductor.enable_line_tables": False}):
        assert config.aot_inductor.enable_line_tables is False


def test_private_build_dirs_restores_environment(tmp_path, monkeypatch):
    import os
    import tempfile

    monkeypatch.setenv("TMPDIR", "/somewhere")
    with build_torch.private_build_dirs(str(tmp_path)):
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
        assert tempfile.gettempdir() == str(tmp_path / "tmp")
    assert os.environ["TMPDIR"] == "/somewhere"


def test_save_and_load_exported(tmp_path):
    """Compile workers receive their graph through torch.export.save / load."""
    ep = build_torch.export_strict(_Tiny(), (torch.randn(2, 4),), {"k": 3})
    build_torch.save_exported(ep, str(tmp_path / "g.pt2"))
    back = build_torch.load_exported(str(tmp_path / "g.pt2"))
    x = torch.randn(2, 4)
    torch.testing.assert_close(back.module()(x, k=3)["y"], ep.module()(x, k=3)["y"])


def test_custom_ops_finds_non_aten_calls():
    ep = build_torch.export_strict(_Tiny(), (torch.randn(2, 4),), {"k": 3})
    assert build_torch.custom_ops(ep) == []


def test_treespec_parts():
    _, spec = build_torch.tree_flatten(((1, [2]), {"a": None}))
    node, ctx, kids = build_torch.treespec_parts(spec)
    assert node is tuple and len(kids) == 2
    node, ctx, kids = build_torch.treespec_parts(kids[1])
    assert node is dict and list(ctx) == ["a"]


def test_fake_tensor_facts():
    facts = build_torch.fake_tensor_facts(torch.empty(2, 3).t())
    assert facts["sizes"] == [3, 2] and facts["strides"] == [1, 3]
    assert build_torch.fake_tensor_facts(3) is None


def test_aoti_compile_and_runner(convnet_pack):
    """aoti_compile_and_package (used by compile_exported to build every pack) and the C++ runner API."""
    import aotpack

    pkg = aotpack.load(convnet_pack.path)
    runner = pkg.entries[0]._runner
    fqns = rt_torch.constant_fqns(runner)
    assert set(fqns.values()) <= set(pkg.weights)
    out = rt_torch.run(runner, [convnet_pack.args[0]])
    assert isinstance(out, list) and out[0].shape == (4, 10)
    rt_torch.set_constants(runner, {c: pkg.weights[w] for c, w in fqns.items()})
