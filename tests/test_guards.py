"""Every wrong input raises GuardError with a message that names the input, the property, expected and
actual; nothing reaches native code."""
from __future__ import annotations

import pytest
import torch

import aotpack


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
    assert _error(pkg, x.double()) == "input 'x' (args[0]) dtype mismatch: expected float32, actual float64"


def test_shape(conv):
    pkg, x = conv
    assert _error(pkg, torch.randn(4, 3, 32, 31)) == \
        "input 'x' (args[0]) size mismatch at dim 3: expected 32, actual 31"
    assert _error(pkg, torch.randn(5, 3, 32, 32)) == \
        "input 'x' (args[0]) size mismatch at dim 0: expected 4, actual 5"


def test_rank(conv):
    pkg, x = conv
    assert _error(pkg, x[0]) == ("input 'x' (args[0]) rank mismatch: expected 4 dims "
                                 "float32[4, 3, 32, 32] cpu contiguous, actual 3 dims [3, 32, 32]")


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
    assert _error(pkg, meta) == "input 'x' (args[0]) device mismatch: expected cpu, actual meta"


def test_number_of_arguments(conv):
    pkg, x = conv
    assert _error(pkg, x, x) == "expected 1 positional argument (x), actual 2"
    assert _error(pkg) == "expected 1 positional argument (x), actual 0"


def test_missing_and_extra_keyword(multi):
    pkg, b = multi
    assert _error(pkg, *b.args, mask=b.kwargs["mask"]) == \
        "missing keyword argument 'temperature' (the pack was built with keyword arguments ['mask', 'temperature'])"
    msg = _error(pkg, *b.args, **b.kwargs, bias=1.0)
    assert msg.startswith("unexpected keyword argument 'bias': the pack was built with keyword arguments")


def test_specialised_value(multi):
    pkg, b = multi
    msg = _error(pkg, *b.args, mask=b.kwargs["mask"], temperature=2.0)
    assert msg.startswith("input 'temperature' (kwargs['temperature']) value mismatch: expected 0.5, actual 2.0")


def test_value_type(multi):
    pkg, b = multi
    msg = _error(pkg, *b.args, mask=b.kwargs["mask"], temperature=1)
    assert msg == "input 'temperature' (kwargs['temperature']) type mismatch: expected float 0.5, actual int 1"


def test_not_a_tensor(multi):
    pkg, b = multi
    msg = _error(pkg, *b.args, mask=None, temperature=0.5)
    assert msg.startswith("input 'mask' (kwargs['mask']) type mismatch: expected a tensor bool[2, 12]")
    assert msg.endswith("actual None")


def test_bool_mask_dtype(multi):
    pkg, b = multi
    msg = _error(pkg, *b.args, mask=b.kwargs["mask"].int(), temperature=0.5)
    assert msg == "input 'mask' (kwargs['mask']) dtype mismatch: expected bool, actual int32"


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
    assert msg == "input 'x' (args[0]) type mismatch: expected a plain torch.Tensor, actual the subclass Mine"


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
