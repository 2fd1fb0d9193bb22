"""Every wrong input raises GuardError with a message that names the input, the property, expected and
actual; nothing reaches native code."""
from __future__ import annotations

import pytest
import torch

import aotpack
from helpers import assert_facts


@pytest.fixture(scope="module")
def conv(convnet_pack):
    return aotpack.load(convnet_pack.path), convnet_pack.args[0]


@pytest.fixture(scope="module")
def multi(multi_io_pack):
    return aotpack.load(multi_io_pack.path), multi_io_pack


def _error(pkg, *args, **kwargs) -> str:
    with pytest.raises(aotpack.GuardError) as info:
        pkg(*args, **kwargs)
    return str(info.value)


def test_dtype(conv):
    pkg, x = conv
    assert_facts(_error(pkg, x.double()), "input 'x' (args[0])", "dtype", "expected float32", "actual float64")


def test_shape(conv):
    pkg, x = conv
    assert _error(pkg, torch.randn(4, 3, 32, 31)).startswith(
        "input 'x' (args[0]) size mismatch at dim 3: expected 32, actual 31")
    msg = _error(pkg, torch.randn(5, 3, 32, 32))
    assert msg.startswith("input 'x' (args[0]) size mismatch at dim 0: expected 4, actual 5")
    assert "--dynamic x:0=MIN..MAX" in msg and "dynamic_shapes=" in msg


def test_rank(conv):
    pkg, x = conv
    assert_facts(_error(pkg, x[0]), "input 'x' (args[0])", "rank", "expected 4 dims float32[4, 3, 32, 32]",
                 "actual 3 dims [3, 32, 32]")


def test_channels_last(conv):
    pkg, x = conv
    msg = _error(pkg, x.to(memory_format=torch.channels_last))
    assert msg.startswith("input 'x' (args[0]) stride mismatch at dim 1: expected 1024, actual 1 ")
    assert "expected layout contiguous, actual channels_last" in msg


def test_transposed_view(mlp_pack):
    pkg = aotpack.load(mlp_pack.path)
    x = mlp_pack.args[0]
    t = x.t().contiguous().t()  # same shape, column-major
    assert t.shape == x.shape
    msg = _error(pkg, t)
    assert msg.startswith("input 'x' (args[0]) stride mismatch at dim 0: expected 64, actual 1")


def test_overlapping_and_zero_strides(mlp_pack):
    pkg = aotpack.load(mlp_pack.path)
    expanded = torch.randn(1, 64).expand(8, 64)
    assert "stride mismatch at dim 0: expected 64, actual 0" in _error(pkg, expanded)


def test_device(conv):
    pkg, x = conv
    meta = torch.empty(x.shape, device="meta")
    assert_facts(_error(pkg, meta), "input 'x' (args[0])", "device", "expected cpu", "actual meta")


def test_number_of_arguments(conv):
    pkg, x = conv
    assert_facts(_error(pkg, x, x), "expected 1 positional argument (x)", "actual 2", "pkg(x)")
    assert_facts(_error(pkg), "expected 1 positional argument (x)", "actual 0", "pkg(x)")
    assert_facts(_error(pkg, x, x=x), "'x' (args[0])", "also given as a keyword argument", "pkg(x)")
    assert_facts(_error(pkg, y=x), "expected 1 positional argument (x)", "actual 0", "pkg(x)")


def test_positional_parameters_bind_by_name(conv, multi):
    """Arguments bind to the captured parameters as Python binds them: forward(self, x) takes pkg(x=t)."""
    pkg, x = conv
    with torch.no_grad():
        assert torch.equal(pkg(x=x), pkg(x))
    assert pkg.select(x=x) is pkg.entries[0]
    pkg, b = multi
    with torch.no_grad():
        by_name = pkg(tokens=b.args[0], **b.kwargs)
        torch.testing.assert_close(by_name, pkg(*b.args, **b.kwargs))
    msg = _error(pkg, tokens=b.args[0].double(), **b.kwargs)  # bound, then checked like any input
    assert msg.startswith("input 'tokens' (args[0]) dtype mismatch")


def test_missing_and_extra_keyword(multi):
    pkg, b = multi
    assert_facts(_error(pkg, *b.args, mask=b.kwargs["mask"]), "missing keyword argument 'temperature'",
                 "['mask', 'temperature']", "pkg(tokens, mask=..., temperature=...)")
    msg = _error(pkg, *b.args, **b.kwargs, bias=1.0)
    assert msg.startswith("unexpected keyword argument 'bias': the pack was built with keyword arguments")
    assert msg.endswith("call it as pkg(tokens, mask=..., temperature=...)")


def test_specialised_value(multi):
    pkg, b = multi
    msg = _error(pkg, *b.args, mask=b.kwargs["mask"], temperature=2.0)
    assert msg.startswith("input 'temperature' (kwargs['temperature']) value mismatch: expected 0.5, actual 2.0")


def test_value_type(multi):
    pkg, b = multi
    msg = _error(pkg, *b.args, mask=b.kwargs["mask"], temperature=1)
    assert_facts(msg, "input 'temperature' (kwargs['temperature'])", "type", "expected float 0.5", "actual int 1")


def test_not_a_tensor(multi):
    pkg, b = multi
    msg = _error(pkg, *b.args, mask=None, temperature=0.5)
    assert msg.startswith("input 'mask' (kwargs['mask']) type mismatch: expected a tensor bool[2, 12]")
    assert msg.endswith("actual None")


def test_bool_mask_dtype(multi):
    pkg, b = multi
    msg = _error(pkg, *b.args, mask=b.kwargs["mask"].int(), temperature=0.5)
    assert_facts(msg, "input 'mask' (kwargs['mask'])", "dtype", "expected bool", "actual int32")


def test_requires_grad_under_grad_mode(conv):
    pkg, x = conv
    leaf = x.clone().requires_grad_()
    assert "requires_grad mismatch" in _error(pkg, leaf)
    with torch.no_grad():
        assert pkg(leaf).shape == (4, 10)


def test_tensor_subclass_is_refused(conv):
    pkg, x = conv

    class Mine(torch.Tensor):
        pass

    msg = _error(pkg, x.as_subclass(Mine))
    assert_facts(msg, "input 'x' (args[0])", "type", "plain torch.Tensor", "subclass Mine")


def test_storage_offset_and_size_one_dims_are_accepted(mlp_pack):
    """A view with an offset into a bigger buffer is fine: the guard checks sizes and strides."""
    pkg = aotpack.load(mlp_pack.path)
    x = mlp_pack.args[0]
    big = torch.cat([torch.randn(3, 64), x])
    view = big[3:]
    assert view.storage_offset() == 192
    with torch.no_grad():
        torch.testing.assert_close(pkg(view), mlp_pack.model(x))


def test_select_says_which_entry(conv):
    pkg, x = conv
    assert pkg.select(x) is pkg.entries[0]
    assert pkg.select(x.double()) is None


# -- inputs whose data is not where their sizes and strides say ---------------------------------------------

_UNREADABLE = """
import sys, torch, aotpack_runtime
pkg = aotpack_runtime.load({pack!r})
x = torch.rand(8, 64)
def freed():
    t = x.clone()
    t.untyped_storage().resize_(0)
    return t
def short():
    t = x.clone()
    t.untyped_storage().resize_(t.untyped_storage().nbytes() - 4)
    return t
for what, make in [("freed", freed), ("zero-tensor", lambda: torch._efficientzerotensor((8, 64))),
                   ("short", short)]:
    try:
        with torch.no_grad():
            pkg(make())
        print(what, "RAN")
    except aotpack_runtime.GuardError as e:
        print(what, "GuardError", e)
    except Exception as e:
        print(what, "OTHER", type(e).__name__, e)
"""


def test_tensors_whose_storage_cannot_hold_them_are_refused(mlp_pack):
    """A storage resized to zero (or short of the last element) and a ZeroTensor (no memory at all) pass every
    size and stride guard; the code would read unmapped memory. Each is a GuardError naming the input; the
    check runs in a fresh process so that a crash shows as a failure, not a dead test run."""
    from conftest import run_python

    proc = run_python(_UNREADABLE.format(pack=str(mlp_pack.path)))
    assert proc.returncode == 0, f"the process died ({proc.returncode}): {proc.stderr[-2000:]}"
    lines = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
    assert lines["freed"].startswith("GuardError input 'x' (args[0]) addresses 2048 bytes of its storage")
    assert "its storage holds 0 bytes" in lines["freed"]
    assert lines["short"].startswith("GuardError input 'x' (args[0]) addresses 2048 bytes")
    assert "holds 2044 bytes" in lines["short"]
    assert lines["zero-tensor"].startswith("GuardError input 'x' (args[0]) is a ZeroTensor")


def _guards(*leaves: dict, kwargs: tuple = ()):
    from aotpack_runtime.guards import EntryGuards

    entry = {"inputs": {"type": "tuple", "children": [
        {"type": "tuple", "children": [{"type": "leaf"} for _ in leaves[:len(leaves) - len(kwargs)]]},
        {"type": "dict", "keys": list(kwargs), "children": [{"type": "leaf"} for _ in kwargs]}]},
        "leaves": list(leaves), "symbols": {"n": [1, None]},
        "param_names": [f"p{i}" for i in range(len(leaves) - len(kwargs))]}
    return EntryGuards.from_json(entry, "entry")


def _leaf(i: int, sizes: list, strides: list, mutated: bool = False) -> dict:
    leaf = {"kind": "tensor", "path": f"args[{i}]", "name": f"p{i}", "dtype": "float32", "device": "cpu",
            "sizes": sizes, "strides": strides, "requires_grad": False}
    return dict(leaf, mutated=True) if mutated else leaf


def test_a_written_input_must_not_overlap_another_in_memory():
    """The overlap check compares memory ranges: two views of one numpy array at different offsets are two
    storages over the same bytes, and two halves of one tensor are one storage over different bytes."""
    np = pytest.importorskip("numpy")
    g = _guards(_leaf(0, [4], [1], mutated=True), _leaf(1, [4], [1]))
    base = np.arange(8, dtype=np.float32)
    a, b = torch.from_numpy(base[0:4]), torch.from_numpy(base[2:6])
    assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    assert g.match((a, b), {}) is None
    assert g.explain((a, b), {}).startswith("input 'p0' (args[0]) shares memory with input 'p1' (args[1])")
    whole = torch.arange(8.0)
    assert g.match((whole[:4], whole[4:]), {}) is not None  # same storage, separate bytes
    assert g.match((whole[:4], whole[3:7]), {}) is None
    assert g.match((torch.from_numpy(base[4:8]), a), {}) is not None


def test_storage_checks_on_symbolic_sizes():
    g = _guards(_leaf(0, ["n", 3], [3, 1]))
    t = torch.rand(5, 3)
    assert g.match((t,), {}) is not None
    t.untyped_storage().resize_(40)
    assert g.match((t,), {}) is None
    assert "addresses 60 bytes" in g.explain((t,), {}) and "holds 40 bytes" in g.explain((t,), {})
    assert g.match((torch._efficientzerotensor((5, 3)),), {}) is None
    assert g.match((torch.rand(0, 3),), {}) is None  # below the symbol's minimum, not a storage problem
    empty = _guards(_leaf(0, ["n", 0], [1, None]))
    assert empty.match((torch._efficientzerotensor((4, 0)),), {}) is not None  # no element to read
