"""The command line: build, inspect, run, exit codes, and the model file convention."""
from __future__ import annotations

import json
import textwrap

import pytest
from click.testing import CliRunner

import aotpack

from aotpack_cli.main import cli
from conftest import EXAMPLES, run_python


def _run(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


def test_version():
    r = _run("--version")
    assert r.exit_code == 0
    lines = r.output.splitlines()
    assert lines[0].startswith("aotpack ") and lines[1].startswith("torch ")
    assert lines[2].startswith("triton ") and lines[3].startswith("python ")


def test_build_from_function_target_prints_stages(tmp_path):
    out = tmp_path / "m.pack"
    r = CliRunner().invoke(cli, ["build", f"{EXAMPLES / 'multi_io.py'}:make", "-o", str(out)])
    assert r.exit_code == 0, r.output
    for stage in ("[1/4] capture", "[2/4] guards", "[3/4] compile", "[4/4] package"):
        assert f"{stage} done in" in r.output
    assert f"wrote {out}" in r.output
    info = json.loads(_run("inspect", out, "--json").output)
    assert info["entries"][0]["guards"][0] == "tokens (args[0]): float32[2, 12, 32] cpu contiguous"


def test_inspect_text(convnet_pack):
    r = _run("inspect", convnet_pack.path)
    assert r.exit_code == 0
    assert "producer: aotpack 0.1.0, torch " in r.output
    assert "guard  x (args[0]): float32[4, 3, 32, 32] cpu contiguous" in r.output
    assert "kernel cpp_fused" in r.output


def test_run_in_a_fresh_process(convnet_pack, session_dir):
    code = f"from aotpack_cli.main import main; import sys; sys.argv = ['aotpack', 'run', {str(convnet_pack.path)!r}, '--repeat', '5']; main()"
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert "output: tensor float32[4, 10]" in proc.stdout
    assert "median call" in proc.stdout


def test_run_says_what_its_load_checked(convnet_pack, tmp_path):
    r = _run("run", convnet_pack.path, "--repeat", "1", "--code-cache", tmp_path / "c", "--verify", "full",
             "--prefetch")
    assert r.exit_code == 0, r.output
    assert "ms (every blob hashed), first call" in r.output
    assert any((tmp_path / "c").iterdir())  # the native code went to the code cache named


def test_run_takes_the_old_name_of_the_code_cache_flag(convnet_pack, tmp_path):
    r = _run("run", convnet_pack.path, "--repeat", "1", "--cache-dir", tmp_path / "old")
    assert r.exit_code == 0, r.output
    assert any((tmp_path / "old").iterdir())
    assert "--code-cache" in _run("run", "--help").output and "--cache-dir" not in _run("run", "--help").output


def test_python_dash_m(convnet_pack):
    proc = run_python("import runpy, sys; sys.argv = ['aotpack', '--help']; runpy.run_module('aotpack', run_name='__main__')")
    assert proc.returncode == 0 and "build" in proc.stdout


def test_errors_exit_1_without_traceback(tmp_path):
    r = _run("inspect", tmp_path / "absent.pack")
    assert r.exit_code == 1
    assert "error: " in r.output and "no such file" in r.output and "Traceback" not in r.output


def test_usage_error_exits_2():
    assert _run("build").exit_code == 2
    assert _run("build", "x.py").exit_code == 2  # -o is required


@pytest.mark.parametrize("source,target_suffix,message", [
    ("import torch\nmodel = torch.nn.Linear(2, 2)\n", "", "defines no 'example_inputs'"),
    ("import torch\n", ":make", "has no function 'make'"),
    ("def make():\n    return 1\n", ":make", "must return (model, example_inputs) or (model, example_inputs, "
                                              "example_kwargs) or a dict; it returned int"),
    ("import torch\nmodel = torch.nn.Linear(2, 2)\nexample_inputs = torch.randn(2)\n", "",
     "example_inputs in"),
    ("raise ValueError('boom')\n", "", "failed (line 1: raise ValueError('boom')): ValueError: boom"),
])
def test_bad_model_files(tmp_path, source, target_suffix, message):
    f = tmp_path / "model.py"
    f.write_text(textwrap.dedent(source))
    r = _run("build", f"{f}{target_suffix}", "-o", tmp_path / "o.pack")
    assert r.exit_code == 1, r.output
    assert message in r.output
    assert not (tmp_path / "o.pack").exists()


def test_graph_break_via_cli(tmp_path):
    f = tmp_path / "breaks.py"
    f.write_text("import torch\n\nclass M(torch.nn.Module):\n    def forward(self, x):\n"
                 "        if x.sum() > 0:\n            return x\n        return -x\n\n"
                 "model = M()\nexample_inputs = (torch.randn(3),)\n")
    r = _run("build", f, "-o", tmp_path / "o.pack")
    assert r.exit_code == 1
    assert f"error: {f}:5: graph break: Data-dependent branching" in r.output
    assert "hint:" in r.output


def test_build_dynamic_with_json_progress(tmp_path):
    out = tmp_path / "dyn.pack"
    r = CliRunner().invoke(cli, ["build", str(EXAMPLES / "mlp.py"), "-o", str(out), "--dynamic", "x:0=batch:1..16",
                                 "--json"])
    assert r.exit_code == 0, r.output
    events = [json.loads(line) for line in r.output.splitlines()]
    assert events[-1]["event"] == "done" and events[-1]["entries"] == 1
    assert any("[3/4] compile done" in e.get("message", "") for e in events[:-1])
    info = json.loads(_run("inspect", out, "--json").output)
    assert info["entries"][0]["guards"] == ["x (args[0]): float32[batch=1..16, 64] cpu contiguous"]
    assert info["entries"][0]["symbols"] == {"batch": [1, 16]}


@pytest.mark.parametrize("spec,message", [("x0=1..4", "is not INPUT:DIM=MIN..MAX"),
                                          ("x:0=9..4", "the minimum 9 is above the maximum 4")])
def test_bad_dynamic_spec_is_a_usage_error(tmp_path, spec, message):
    r = _run("build", EXAMPLES / "mlp.py", "-o", tmp_path / "o.pack", "--dynamic", spec)
    assert r.exit_code == 2 and message in r.output


def test_dynamic_spec_without_upper_bound():
    from aotpack_cli.main import _parse_dynamic

    shapes = _parse_dynamic(("x:0=n:2..", "y:0=n:2..", "x:1=1..8"))
    n = shapes["x"][0]
    assert shapes["y"][0] is n and n.__name__ == "n" and n.min == 2 and n.max >= 2**62
    assert (shapes["x"][1].min, shapes["x"][1].max) == (1, 8)


def test_model_function_may_return_a_dict(tmp_path):
    from aotpack.modelfile import load_model_file

    f = tmp_path / "m.py"
    f.write_text("import torch\nfrom torch.export import Dim\n\ndef make():\n"
                 "    return {'model': torch.nn.Linear(3, 2), 'example_inputs': (torch.randn(4, 3),),\n"
                 "            'dynamic_shapes': {'input': {0: Dim('b', min=1, max=8)}},\n"
                 "            'specializations': [(torch.randn(20, 3),)]}\n")
    spec = load_model_file(f"{f}:make")
    assert spec.dynamic_shapes["input"][0].__name__ == "b" and len(spec.specializations) == 1
    f.write_text("def make():\n    return {'model': 1, 'inputs': ()}\n")
    with pytest.raises(aotpack.ModelFileError, match=r"unknown keys \['inputs'\]"):
        load_model_file(f"{f}:make")
