"""Dynamic shapes and several specializations in one pack, dispatched by guards."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

import aotpack
from aotpack_runtime.archive import Archive
from aotpack_runtime.describe import describe
from helpers import assert_close_to_eager, assert_facts


class Head(nn.Module):
    """LayerNorm + MLP + softmax over the last dim: batch-size independent, every row alike."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(24)
        self.fc1 = nn.Linear(24, 48)
        self.fc2 = nn.Linear(48, 6)

    def forward(self, x):
        return torch.softmax(self.fc2(F.gelu(self.fc1(self.norm(x)))), dim=-1)


class Block(nn.Module):
    """A pre-norm transformer block with causal self-attention."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


@pytest.fixture(scope="module")
def head_pack(session_dir):
    """Entry 0: batch 1..64; entries 1 and 2: batch 100 and 128 (static)."""
    torch.manual_seed(0)
    model = Head().eval()
    batch = Dim("batch", min=1, max=64)
    path = aotpack.build(model, (torch.randn(8, 24),), session_dir / "head.pack",
                         dynamic_shapes={"x": {0: batch}},
                         specializations=[(torch.randn(100, 24),), (torch.randn(30, 24),),
                                          (torch.randn(128, 24),)])
    return model, aotpack.load(path), path


@pytest.fixture(scope="module")
def block_pack(session_dir):
    torch.manual_seed(0)
    model = Block().eval()
    seq = Dim("seq", min=1, max=128)
    path = aotpack.build(model, (torch.randn(2, 16, 32),), session_dir / "block.pack",
                         dynamic_shapes={"x": {1: seq}})
    return model, aotpack.load(path)


@pytest.mark.parametrize("b", [1, 2, 7, 33, 63, 64])
def test_dynamic_batch_matches_eager_across_the_range(head_pack, b):
    model, pkg, _ = head_pack
    x = torch.randn(b, 24)
    assert pkg.select(x) is pkg.entries[0]
    with torch.no_grad():
        assert_close_to_eager(pkg(x), model(x))


def test_specializations_dispatch_to_their_entries(head_pack):
    model, pkg, _ = head_pack
    assert len(pkg.entries) == 3  # the batch-30 example was served by entry 0, so it made no entry
    for b, entry in [(100, 1), (128, 2), (40, 0)]:
        x = torch.randn(b, 24)
        assert pkg.select(x) is pkg.entries[entry]
        with torch.no_grad():
            assert_close_to_eager(pkg(x), model(x))


def test_guard_error_lists_every_entry(head_pack):
    _, pkg, _ = head_pack
    with pytest.raises(aotpack.GuardError) as info:
        pkg(torch.randn(65, 24))
    assert [name for name, _ in info.value.reasons] == ["0 (batch 1..64)", "1 (x [100, 24])", "2 (x [128, 24])"]
    text = str(info.value)
    assert text.startswith("no entry accepts this input: entry 0 (batch 1..64): input 'x' (args[0]) dim 0 (batch) "
                           "is 65, above 64; ")
    for entry, want in ((1, 100), (2, 128)):  # each static entry: what, where, expected, actual, what to do
        assert f"entry {entry} (x [{want}, 24]): input 'x' (args[0]) size mismatch at dim 0: expected {want}, " \
               "actual 65" in text
    assert text.count("--dynamic x:0=MIN..MAX") == 2
    with pytest.raises(aotpack.GuardError, match=r"dim 0 \(batch\) is 0, below 1"):
        pkg(torch.randn(0, 24))


def test_weights_are_stored_once(head_pack):
    model, pkg, path = head_pack
    m = Archive.open(path).manifest
    names = [w.name for w in m.weights]
    params = dict(model.named_parameters())
    assert len(names) == len(set(names)) and set(names) <= set(params)  # tiny ones may be folded into code
    used = [set(e.constants.values()) for e in m.entries]
    assert used[0] == used[1] == used[2] == set(names)  # all three entries share the same stored tensors
    weight_blobs = [b for b in m.blobs if b.name.startswith("weights/")]
    assert len(weight_blobs) == len(names)
    assert sum(b.size for b in weight_blobs) == sum(params[n].numel() * 4 for n in names)


def test_inspect_shows_ranges(head_pack):
    info = describe(Archive.open(head_pack[2]))
    assert info["entries"][0]["guards"] == ["x (args[0]): float32[batch=1..64, 24] cpu contiguous"]
    assert info["entries"][1]["guards"] == ["x (args[0]): float32[100, 24] cpu contiguous"]


@pytest.mark.parametrize("t", [1, 2, 5, 16, 127, 128])
def test_transformer_block_dynamic_sequence(block_pack, t):
    model, pkg = block_pack
    x = torch.randn(2, t, 32)
    with torch.no_grad():
        assert_close_to_eager(pkg(x), model(x))


def test_transformer_block_outside_range(block_pack):
    _, pkg = block_pack
    with pytest.raises(aotpack.GuardError, match=r"input 'x' \(args\[0\]\) dim 1 \(seq\) is 129, above 128"):
        pkg(torch.randn(2, 129, 32))
    with pytest.raises(aotpack.GuardError, match=r"size mismatch at dim 0: expected 2, actual 3"):
        pkg(torch.randn(3, 16, 32))


def test_dynamic_strides_are_checked(block_pack):
    _, pkg = block_pack
    x = torch.randn(2, 32, 10).transpose(1, 2)  # seq=10, but not contiguous
    with pytest.raises(aotpack.GuardError, match=r"stride mismatch at dim 1: expected 32, actual 1"):
        pkg(x)


def test_shared_symbol_must_agree(session_dir):
    """Two inputs that share a Dim: sizes must be equal at call time."""
    def fn(a, b):
        return a * 2 + b

    n = Dim("n", min=2, max=50)
    path = aotpack.build(fn, (torch.randn(5, 3), torch.randn(5, 3)), session_dir / "shared.pack",
                         dynamic_shapes={"a": {0: n}, "b": {0: n}})
    pkg = aotpack.load(path)
    a, b = torch.randn(9, 3), torch.randn(9, 3)
    assert_close_to_eager(pkg(a, b), fn(a, b))
    with pytest.raises(aotpack.GuardError) as info:
        pkg(a, torch.randn(8, 3))
    assert_facts(str(info.value), "input 'b' (args[1]) dim 0 (n) is 8", "n is 9 in input 'a' (args[0]) dim 0",
                 "must be equal")
