"""Capture errors name the user's file and line, the reason, and what to change."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import aotpack
from aotpack.capture import capture


class DataDependentIf(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # the line the error must name
            return x * 2
        return x


class MutatesInput(nn.Module):
    def forward(self, x):
        x.add_(1)
        return x * 2


def _line_of(fn_source_marker: str) -> int:
    with open(__file__) as f:
        for i, line in enumerate(f, 1):
            if fn_source_marker in line:
                return i
    raise AssertionError(fn_source_marker)


def test_graph_break_names_file_line_reason_and_hint():
    with pytest.raises(aotpack.CaptureError) as info:
        capture(DataDependentIf(), (torch.randn(3),))
    e = info.value
    assert e.filename == __file__
    assert e.lineno == _line_of("# the line the error must name")
    assert "Data-dependent branching" in e.reason
    assert "torch.where" in e.hint and "torch.cond" in e.hint
    assert str(e).startswith(f"{__file__}:{e.lineno}: graph break: Data-dependent branching")
    assert "if x.sum() > 0:" in str(e)


def test_build_raises_capture_error_before_compiling(session_dir):
    with pytest.raises(aotpack.CaptureError):
        aotpack.build(DataDependentIf(), (torch.randn(3),), session_dir / "never.pack")
    assert not (session_dir / "never.pack").exists()


def test_input_mutation_is_recorded():
    """A forward that writes into an input is captured; the pack writes into that input too (test_corpus)."""
    assert capture(MutatesInput(), (torch.randn(3),)).mutated_inputs == (0,)
    assert capture(nn.Linear(3, 3), (torch.randn(3),)).mutated_inputs == ()


def test_training_mode_batch_norm_is_refused_with_hint():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    with pytest.raises(aotpack.CaptureError) as info:
        capture(model, (torch.randn(2, 3, 8, 8),))
    assert "forward updates the batch-norm statistics ['1.num_batches_tracked', '1.running_mean', " \
        "'1.running_var'] (the model is in training mode)" in str(info.value)
    assert info.value.hint == "call model.eval() before building"


def test_unsupported_input_type():
    with pytest.raises(aotpack.CaptureError, match=r"example input args\[1\] is a set"):
        capture(lambda x, s: x, (torch.randn(2), {1, 2}))


def test_example_inputs_must_be_a_tuple():
    with pytest.raises(aotpack.CaptureError, match="example_inputs must be a tuple, got Tensor"):
        capture(nn.Linear(2, 2), torch.randn(2))


def test_not_a_model():
    with pytest.raises(aotpack.CaptureError, match="model must be a torch.nn.Module or a function, got int"):
        capture(3, (torch.randn(2),))


class _Terminal:
    """A stderr that says it is a terminal, and keeps what is written to it."""

    def __init__(self):
        self.text = ""

    def isatty(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass


def test_python_build_shows_progress_on_a_terminal_unless_told_not_to(session_dir, monkeypatch):
    """aotpack.build printed nothing for the tens of seconds a build takes, where the CLI shows each stage.
    (The capture fails here, after the first stage line: nothing is compiled.)"""
    import sys

    for progress, shown in ((None, True), (False, False), (True, True)):
        terminal = _Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        with pytest.raises(aotpack.CaptureError):
            aotpack.build(DataDependentIf(), (torch.randn(3),), session_dir / "never.pack", progress=progress,
                          cache=False)
        assert ("[1/4] capture: Dynamo, fullgraph; 1 example input(s) ..." in terminal.text) is shown, progress
    monkeypatch.setattr(sys, "stderr", type("Pipe", (_Terminal,), {"isatty": lambda self: False})())
    with pytest.raises(aotpack.CaptureError):
        aotpack.build(DataDependentIf(), (torch.randn(3),), session_dir / "never.pack", cache=False)
    assert sys.stderr.text == ""  # not a terminal: silent by default
    lines = []
    with pytest.raises(aotpack.CaptureError):
        aotpack.build(DataDependentIf(), (torch.randn(3),), session_dir / "never.pack", progress=lines.append)
    assert lines == ["[1/4] capture: Dynamo, fullgraph; 1 example input(s) ..."]
    with pytest.raises(aotpack.BuildError, match="progress must be None, True, False or a function .* got str"):
        aotpack.build(DataDependentIf(), (torch.randn(3),), session_dir / "never.pack", progress="yes")


_GLOBAL_LINEAR = nn.Linear(4, 3)


def _uses_a_global_module(x):
    return torch.relu(_GLOBAL_LINEAR(x)) * 2


def test_a_function_reading_modules_from_globals_helpers_and_its_closure_captures_their_weights():
    scale = nn.Linear(3, 3, bias=False)

    def model(x):
        return scale(_uses_a_global_module(x)) + (lambda y: scale(y))(x[:, :3])

    x = torch.randn(2, 4)
    captured = capture(model, (x,))
    names = set(captured.exported.state_dict)
    assert {"_GLOBAL_LINEAR.weight", "_GLOBAL_LINEAR.bias", "scale.weight"} <= names
    with torch.no_grad():
        torch.testing.assert_close(captured.exported.module()(x), model(x))


def test_a_module_under_a_name_nn_module_uses_is_a_capture_error():
    train = nn.Linear(2, 2)

    def model(x):
        return train(x)

    with pytest.raises(aotpack.CaptureError) as e:
        capture(model, (torch.randn(1, 2),))
    assert "'train'" in str(e.value) and "rename" in str(e.value)


class _LibraryCache:
    """A library's own output object, registered with torch's pytree (as transformers registers its
    DynamicCache once its export helpers are used)."""

    def __init__(self, k, v):
        self.k, self.v = k, v


def test_an_output_of_a_class_registered_with_pytree_is_a_capture_error():
    import torch.utils._pytree as pytree

    pytree.register_pytree_node(_LibraryCache, lambda c: ([c.k, c.v], None), lambda xs, _: _LibraryCache(*xs))
    try:
        with pytest.raises(aotpack.CaptureError) as e:
            capture(lambda x: (x + 1, _LibraryCache(x * 2, x * 3)), (torch.randn(2),))
    finally:
        pytree._deregister_pytree_node(_LibraryCache)
    assert "the model's output" in e.value.reason and "_LibraryCache" in e.value.reason
    assert "use_cache=False" in e.value.hint
