"""dynamic_shapes checked against the example inputs before capture: a dim the input does not have, an example
size its range rules out, a name that is no input, a dim the model fixes; each error names the input, the dim
and the range, in one message (no torch log on stderr). Nothing here compiles."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.export import Dim

import aotpack
from aotpack.capture import capture
from aotpack.modelfile import parse_dynamic
from aotpack_cli.main import cli
from conftest import EXAMPLES
from helpers import assert_facts


class FixesBatch(nn.Module):
    def forward(self, x):
        y = x + 1
        return y.reshape(32, -1) * 2  # fixes dim 0


class Pair(nn.Module):
    def forward(self, x, y):
        return x.sum() + y.sum()


def _line_of(marker: str) -> int:
    with open(__file__) as f:
        return next(i for i, line in enumerate(f, 1) if marker in line)


@pytest.mark.parametrize("dynamic_shapes", [parse_dynamic(["x:2=1..64"]), {"x": {2: Dim("b", min=1, max=64)}},
                                            {"x": {-1: Dim("b", min=1, max=64)}}])
def test_a_dim_past_the_rank_is_refused_before_anything_is_built(tmp_path, dynamic_shapes):
    """torch.export ignores such a dim: the pack came out static (byte-identical to the static build)."""
    with pytest.raises(aotpack.CaptureError) as info:
        aotpack.build(nn.Linear(4, 3), (torch.randn(8, 4),), tmp_path / "m.pack", dynamic_shapes={
            "input": dynamic_shapes["x"]}, cache=False)
    text = str(info.value)
    assert "input 'input' (args[0])" in text and "float32[8, 4]" in text and "dims 0 to 1" in text
    assert "1..64" in text
    assert not (tmp_path / "m.pack").exists()


def test_cli_dynamic_dim_past_the_rank_names_input_dim_and_range(tmp_path):
    r = CliRunner().invoke(cli, ["build", str(EXAMPLES / "mlp.py"), "-o", str(tmp_path / "o.pack"),
                                 "--dynamic", "x:1=1..64", "--dynamic", "x:2=4..8"])
    assert r.exit_code == 1
    assert "error: dynamic_shapes makes dim 2 of input 'x' (args[0]) dynamic (x_2, 4..8)" in r.output
    assert "float32[8, 64]" in r.output


def test_a_name_that_is_no_input():
    with pytest.raises(aotpack.CaptureError) as info:
        capture(nn.Linear(4, 3), (torch.randn(8, 4),), dynamic_shapes=parse_dynamic(["x:0=1..8"]))
    assert "'x'" in info.value.reason and "its inputs are 'input'" in info.value.reason

    def f(x, mask=None):
        return x

    with pytest.raises(aotpack.CaptureError, match=r"parameter 'mask', but the example call does not pass it"):
        capture(f, (torch.randn(8, 4),), dynamic_shapes={"mask": {0: Dim("b")}})


@pytest.mark.parametrize("size,low,high", [(64, 1, 8), (3, 4, 8), (2, 4, None)])
def test_an_example_size_outside_the_range_names_input_dim_and_the_range_given(size, low, high):
    spec = f"input:0=batch:{low}..{high if high is not None else ''}"
    with pytest.raises(aotpack.CaptureError) as info:
        capture(nn.Linear(4, 3), (torch.randn(size, 4),), dynamic_shapes=parse_dynamic([spec]))
    e = info.value
    given = f"{low}..{high}" if high is not None else f">= {low}"
    assert_facts(e.reason, "input 'input' (args[0]) dim 0", f"size is {size}", f"(batch, {given})")
    assert "rewrite" not in e.hint  # not the hint for Dynamo code
    if low <= 1:  # why torch's own message would have said [2, 8]
        assert "sizes 0 and 1 as constants" in e.hint and f"2..{high}" in e.hint


@pytest.mark.parametrize("size", [0, 1])
@pytest.mark.parametrize("dim", [Dim("batch", min=0, max=8), Dim.DYNAMIC])
def test_an_example_size_of_0_or_1_for_a_dynamic_dim_says_why(size, dim):
    with pytest.raises(aotpack.CaptureError) as info:
        capture(nn.Linear(4, 3), (torch.randn(size, 4),), dynamic_shapes={"input": {0: dim}})
    assert f"input 'input' (args[0]) dim 0: the example's size is {size}" in info.value.reason
    assert "sizes 0 and 1 as constants" in info.value.hint


def test_inputs_sharing_a_dim_and_derived_dims_must_agree_with_the_examples():
    n = Dim("n", min=1, max=8)
    with pytest.raises(aotpack.CaptureError, match=r"input 'x' \(args\[0\]\) dim 0 and input 'y' \(args\[1\]\) dim "
                                                   r"0 share the Dim 'n', but the example sizes differ: 4 and 5"):
        capture(Pair(), (torch.randn(4, 2), torch.randn(5, 2)), dynamic_shapes={"x": {0: n}, "y": {0: n}})
    dx = Dim("dx", min=2, max=32)
    with pytest.raises(aotpack.CaptureError, match=r"input 'y' \(args\[1\]\) dim 0 is dx \+ 1, 5 for the example"):
        capture(Pair(), (torch.randn(4, 2), torch.randn(7, 2)), dynamic_shapes={"x": {0: dx}, "y": {0: dx + 1}})


def test_valid_specs_pass_the_check():
    dx = Dim("dx", min=2, max=32)
    captured = capture(Pair(), (torch.randn(4, 2), torch.randn(5, 2)),
                       dynamic_shapes={"x": {0: dx}, "y": (dx + 1, None)})
    assert len(captured.exported.range_constraints) == 2  # dx and dx + 1
    capture(nn.Linear(4, 3), (torch.randn(1, 4),), dynamic_shapes={"input": {0: Dim.AUTO}})


def test_a_dim_the_model_fixes_is_one_error_with_the_reason_and_the_line(capfd):
    """torch logs about 60 lines before raising, and its one useful line ("specialized it to be a constant
    (32)") was dropped: the error now carries it with the model's line, and nothing else is printed."""
    with pytest.raises(aotpack.CaptureError) as info:
        capture(FixesBatch(), (torch.randn(32, 4),), dynamic_shapes=parse_dynamic(["x:0=batch:2..64"]))
    e = info.value
    assert e.filename == __file__ and e.lineno == _line_of("# fixes dim 0")
    assert e.reason.startswith("input 'x' (args[0]) dim 0 (batch, 2..64): the model does not take it as "
                               "dynamic_shapes gives it")
    assert "specialized it to be a constant (32)" in e.reason
    assert "reshape(32, -1)" in str(e)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    import logging

    assert not logging.getLogger("torch._guards").disabled  # silenced for the capture only


class Branches(nn.Module):
    def forward(self, x):
        if x.shape[0] > 16:
            return x * 2
        return x


def test_a_range_the_model_narrows_or_dims_it_makes_equal_carry_torchs_suggested_fix():
    with pytest.raises(aotpack.CaptureError) as info:
        capture(Branches(), (torch.randn(32, 4),), dynamic_shapes=parse_dynamic(["x:0=2..64"]))
    assert info.value.reason.startswith("input 'x' (args[0]) dim 0 (x_0, 2..64): the model does not take it")
    assert "x_0 = Dim('x_0', min=17, max=64)" in info.value.hint
    with pytest.raises(aotpack.CaptureError) as info:
        capture(lambda x, y: x + y, (torch.randn(4, 3), torch.randn(4, 3)),
                dynamic_shapes=parse_dynamic(["x:0=2..64", "y:0=2..64"]))
    assert info.value.reason.startswith("input 'y' (args[1]) dim 0 (y_0, 2..64)") and "must always be equal" in \
        info.value.reason
    assert "y_0 = x_0" in info.value.hint
