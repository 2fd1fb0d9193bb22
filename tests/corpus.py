"""A corpus of small models after the patterns AOTInductor's own regression tests cover, written for aotpack.

Each :class:`Case` is a model, a function that makes its inputs (from a seed and, for a dynamic model, a size),
and what must happen: it builds and matches eager (``refused`` is None), or the build refuses it with a
``CaptureError`` whose message matches ``refused`` and names the line marked ``# refused here``.

The models that build are grouped into a few packs (``GROUPS``): each group is one wrapper module whose forward
takes a dict of every model's inputs and returns a dict of every model's outputs, captured and compiled as one
graph. A build costs 15-30 s here, a model in a group far less. tests/test_corpus.py builds the groups once per
test run, runs them in a fresh process on two input sets (and, for the dynamic group, at other sizes in each
range) and compares every model's outputs, and the inputs it writes into, with eager.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim


@dataclasses.dataclass
class Case:
    name: str
    what: str  # the pattern, for the table in docs/MODELS.md
    make: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator, int], tuple]  # (generator, size) -> args
    dynamic: Callable[[], tuple] | None = None  # a fresh dynamic_shapes entry (one spec per arg)
    sizes: tuple[int, ...] = (4,)  # the example's size first, then other sizes in the range
    refused: str | None = None  # a regex the CaptureError's message must match
    rel: float = 1e-4


CASES: list[Case] = []


def case(name: str, what: str, inputs: Callable, **kw) -> Callable:
    def register(cls: type) -> type:
        CASES.append(Case(name, what, cls, inputs, **kw))
        return cls
    return register


def rand(g: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(shape, generator=g).to(dtype)


def signed(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(shape, generator=g) * 2 - 1


def ints(g: torch.Generator, high: int, *shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=g).to(dtype)


# -- constants and views ----------------------------------------------------------------------------------

@case("attr_table", "plain tensor attributes (not parameters or buffers) lifted as constants",
      lambda g, n: (signed(g, n, 8),))
class AttrTable(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = torch.rand(8, 5)
        self.bias = torch.linspace(-1, 1, 5)

    def forward(self, x):
        return x @ self.table + self.bias


@case("attr_views", "attributes that are views: a storage offset, a transpose, a strided slice, an expand",
      lambda g, n: (signed(g, n, 4),))
class AttrViews(nn.Module):
    def __init__(self):
        super().__init__()
        base = torch.arange(48.0) / 48
        self.offset_view = base[8:24].view(4, 4)  # storage offset 8
        self.transposed = torch.rand(6, 4).t()  # non-contiguous
        self.strided = torch.rand(4, 12)[:, ::3]  # stride 3
        self.expanded = torch.rand(4).expand(3, 4)  # stride 0
        self.register_buffer("buffer_t", torch.rand(4, 4).t())  # a non-contiguous buffer

    def forward(self, x):
        return (x @ self.offset_view + x @ self.transposed[:, :4] + x @ self.strided
                + self.expanded.sum(0) + x @ self.buffer_t)


# -- aliasing outputs -------------------------------------------------------------------------------------

@case("alias_outputs", "outputs that alias the input and each other (views, the input itself, one tensor twice)",
      lambda g, n: (signed(g, n, 6),))
class AliasOutputs(nn.Module):
    def forward(self, x):
        y = x * 2
        return x, x.view(-1), x[1:], x.t(), y, y, y.view(3, -1)


# -- empty, zero-size and 0-d tensors ---------------------------------------------------------------------

@case("zero_size", "tensors with a zero-size dim: reductions, cat, matmul, new empty tensors",
      lambda g, n: (rand(g, 0, 4), signed(g, 3, 4)))
class ZeroSize(nn.Module):
    def forward(self, empty, x):
        return (empty.sum(0), empty.sum(), torch.cat([empty, x]) * 2, empty @ x.t(), x.new_zeros(0, 3),
                x[:0] + 1, torch.empty(0, dtype=torch.int64))


@case("zero_dim", "0-d tensors in and out, scalar arithmetic, torch.tensor constants",
      lambda g, n: (signed(g), signed(g, 5)))
class ZeroDim(nn.Module):
    def forward(self, s, x):
        return s * 3 + 1, x * s, (x.sum() / s).exp(), torch.tensor(2.5) * s, x.max()


# -- dtypes -----------------------------------------------------------------------------------------------

@case("bool_ops", "bool inputs and outputs: logic, where, any/all, masked_fill",
      lambda g, n: (rand(g, 4, 6) > 0.5, signed(g, 4, 6)))
class BoolOps(nn.Module):
    def forward(self, mask, x):
        return (mask & (x > 0), ~mask, mask.any(1), mask.all(), torch.where(mask, x, -x),
                x.masked_fill(mask, 0.0), mask.sum(1), mask.to(torch.float32).mean())


@case("int_ops", "int64, int32 and uint8 arithmetic: floor division, remainder, bitwise, shifts, cumsum",
      lambda g, n: (ints(g, 100, 5, 4), ints(g, 50, 5, 4, dtype=torch.int32) + 1,
                    ints(g, 255, 5, 4, dtype=torch.uint8)))
class IntOps(nn.Module):
    def forward(self, a, b, c):
        return (a // b, a % b, a & 0x2A, a ^ b.to(torch.int64), a << 2, c >> 1, c + 10, a.cumsum(0),
                (a * 7).to(torch.int32), b.max(0).values)


@case("complex_ops", "complex64 and complex128: arithmetic, abs, angle, conj, view_as_real",
      lambda g, n: (torch.complex(signed(g, 3, 4), signed(g, 3, 4)), signed(g, 3, 4).double()))
class ComplexOps(nn.Module):
    def forward(self, z, r):
        w = z * z.conj() + z * 2j
        return w, z.abs(), z.angle(), torch.view_as_real(z), (z.to(torch.complex128) * r), torch.polar(r, r)


@case("complex32", "complex32 inputs and outputs (conversions, copies)",
      lambda g, n: (torch.complex(signed(g, 3, 4), signed(g, 3, 4)).to(torch.complex32),))
class Complex32(nn.Module):
    def forward(self, z):
        return z.to(torch.complex64) * 2, z.clone(), torch.view_as_real(z.to(torch.complex64)), z.real.float()


@case("dtype_zoo", "float16, bfloat16, float64, int8, int16, uint16, uint32, uint64 and float8 inputs",
      lambda g, n: tuple((rand(g, 3, 4) * 10).to(d) for d in (
          torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int16, torch.uint16, torch.uint32,
          torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2)))
class DtypeZoo(nn.Module):
    def forward(self, *xs):
        return [x.to(torch.float64) * 2 for x in xs] + [xs[0] * xs[1].to(torch.float16), xs[2].sum(),
                                                         xs[8].clone()]


# -- control flow -----------------------------------------------------------------------------------------

@case("cond", "torch.cond on a data-dependent predicate, with parameters in both branches",
      lambda g, n: (signed(g, 4, 8),))
class Cond(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda t: self.a(t).relu(), lambda t: self.b(t).sigmoid(), (x,))


@case("loop", "a Python loop (unrolled at capture) over a recurrent cell", lambda g, n: (signed(g, 2, 5, 6),))
class Loop(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(6, 6)

    def forward(self, xs):
        h = torch.zeros(xs.shape[0], 6)
        outs = []
        for t in range(xs.shape[1]):
            h = self.cell(xs[:, t], h)
            outs.append(h)
        return torch.stack(outs, 1)


@case("while_loop", "torch.while_loop with a data-dependent trip count",
      lambda g, n: (ints(g, 5) + 1, signed(g, 3)))
class WhileLoop(nn.Module):
    def forward(self, n, x):
        def cond_fn(i, acc):
            return i < n

        def body_fn(i, acc):
            return i + 1, acc * 1.5 + 1

        return torch._higher_order_ops.while_loop(cond_fn, body_fn, (torch.zeros((), dtype=torch.int64), x))


# -- scatter, gather and index ops ------------------------------------------------------------------------

@case("scatter", "scatter, scatter_add, scatter_reduce, index_add, index_copy, index_put",
      lambda g, n: (signed(g, 5, 4), ints(g, 5, 3, 4), ints(g, 5, 3), signed(g, 3, 4)))
class Scatter(nn.Module):
    def forward(self, x, idx, rows, src):
        return (x.scatter(0, idx, src), x.scatter_add(0, idx, src), x.scatter_reduce(0, idx, src, "amax"),
                x.index_add(0, rows, src), x.index_copy(0, torch.arange(3) + 1, src),
                x.index_put((rows,), src, accumulate=True))


@case("gather", "gather, index_select, advanced indexing, take_along_dim",
      lambda g, n: (signed(g, 6, 5), ints(g, 5, 6, 3), ints(g, 6, 4)))
class Gather(nn.Module):
    def forward(self, x, idx, rows):
        return (x.gather(1, idx), x.index_select(0, rows), x[rows], x[rows, 2:], x[:, [0, 4]],
                torch.take_along_dim(x, idx, 1), x.flatten()[rows * 3])


@case("masked_select", "data-dependent output sizes: nonzero, masked_select, boolean indexing",
      lambda g, n: (signed(g, 5, 4),))
class MaskedSelect(nn.Module):
    def forward(self, x):
        return torch.nonzero(x > 0), torch.masked_select(x, x > 0.5), x[x < -0.5] * 2


# -- embeddings -------------------------------------------------------------------------------------------

@case("embedding_bag", "nn.EmbeddingBag (sum with per-sample weights, mean, max) with offsets",
      lambda g, n: (ints(g, 20, 10), torch.tensor([0, 3, 3, 7]), rand(g, 10)))
class EmbeddingBags(nn.Module):
    def __init__(self):
        super().__init__()
        self.sum = nn.EmbeddingBag(20, 6, mode="sum")
        self.mean = nn.EmbeddingBag(20, 6, mode="mean")
        self.max = nn.EmbeddingBag(20, 6, mode="max")

    def forward(self, ids, offsets, weights):
        return self.sum(ids, offsets, per_sample_weights=weights), self.mean(ids, offsets), self.max(ids, offsets)


@case("embedding", "nn.Embedding with padding_idx and max_norm left off, one-hot", lambda g, n: (ints(g, 30, 3, 7),))
class Embedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 8, padding_idx=0)

    def forward(self, ids):
        return self.emb(ids), F.one_hot(ids, 30).sum(1)


# -- attention --------------------------------------------------------------------------------------------

@case("sdpa", "scaled_dot_product_attention: causal, boolean mask, float mask",
      lambda g, n: (signed(g, 2, 3, 8, 16), signed(g, 2, 3, 8, 16), signed(g, 2, 3, 8, 16), rand(g, 8, 8) > 0.3))
class Sdpa(nn.Module):
    def forward(self, q, k, v, mask):
        mask = mask | torch.eye(8, dtype=torch.bool)
        return (F.scaled_dot_product_attention(q, k, v, is_causal=True),
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask.float() * -0.5))


@case("multihead_attention", "nn.MultiheadAttention and a transformer encoder layer",
      lambda g, n: (signed(g, 2, 7, 16),))
class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)
        self.layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)

    def forward(self, x):
        a, w = self.mha(x, x, x)
        return a, w, self.layer(x)


# -- convolutions and normalization -----------------------------------------------------------------------

@case("conv_bn", "Conv2d + BatchNorm2d (eval) + ReLU + max pool, a residual block",
      lambda g, n: (signed(g, 2, 3, 12, 12),))
class ConvBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        for bn in (self.bn1, self.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(y + self.bn2(self.conv2(y)))
        return F.max_pool2d(y, 2)


@case("convs", "Conv1d, Conv3d, ConvTranspose2d, grouped and dilated convolutions",
      lambda g, n: (signed(g, 2, 4, 16), signed(g, 1, 2, 4, 6, 6), signed(g, 2, 4, 5, 5)))
class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3, dilation=2)
        self.c3 = nn.Conv3d(2, 3, 3, padding=1)
        self.t2 = nn.ConvTranspose2d(4, 2, 3, stride=2)
        self.grouped = nn.Conv2d(4, 8, 3, groups=4)

    def forward(self, a, b, c):
        return self.c1(a), self.c3(b), self.t2(c), self.grouped(c)


@case("norms", "LayerNorm, GroupNorm, InstanceNorm, RMSNorm", lambda g, n: (signed(g, 2, 8, 5, 5),))
class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln, self.gn = nn.LayerNorm([5, 5]), nn.GroupNorm(2, 8)
        self.inorm, self.rms = nn.InstanceNorm2d(8, affine=True), nn.RMSNorm(5)

    def forward(self, x):
        return self.ln(x), self.gn(x), self.inorm(x), self.rms(x)


@case("pool_resize", "adaptive pooling, interpolate (bilinear, nearest), pixel shuffle, pad",
      lambda g, n: (signed(g, 1, 4, 6, 6),))
class PoolResize(nn.Module):
    def forward(self, x):
        return (F.adaptive_avg_pool2d(x, 3), F.interpolate(x, scale_factor=2, mode="bilinear"),
                F.interpolate(x, size=(4, 9), mode="nearest"), F.pixel_shuffle(x, 2), F.pad(x, (1, 2, 0, 1)),
                F.avg_pool2d(x, 3, stride=2, padding=1))


# -- recurrent and reductions -----------------------------------------------------------------------------

@case("rnn", "nn.GRU and nn.LSTM over a sequence, initial states as inputs",
      lambda g, n: (signed(g, 2, 6, 5), signed(g, 1, 2, 7)))
class Rnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(5, 7, batch_first=True)
        self.lstm = nn.LSTM(7, 4, batch_first=True)

    def forward(self, x, h0):
        y, h = self.gru(x, h0)
        z, (hn, cn) = self.lstm(y)
        return y, h, z, hn, cn


@case("reductions", "sort, topk, cumprod, logsumexp, var_mean, argmax, median, mode",
      lambda g, n: (signed(g, 5, 6),))
class Reductions(nn.Module):
    def forward(self, x):
        values, order = x.sort(1, descending=True)
        top = x.topk(2, 1)
        return (values, order, top.values, top.indices, x.cumprod(1), x.logsumexp(1), torch.var_mean(x, 0),
                x.argmax(1), x.median(0).values, x.norm(dim=1), x.amax((0, 1)))


# -- ATen ops without a C shim (proxy executor) -----------------------------------------------------------

@case("unique", "torch.unique with return_inverse and counts, unique_consecutive (proxy executor)",
      lambda g, n: (ints(g, 6, 12),))
class Unique(nn.Module):
    def forward(self, x):
        u, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
        return u * 2, inverse, counts, torch.unique_consecutive(x)


@case("linalg", "linalg and search ops served by libtorch: eigh, qr, svdvals, inv, det, searchsorted, histc",
      lambda g, n: (signed(g, 4, 4), rand(g, 6)))
class Linalg(nn.Module):
    def forward(self, a, b):
        spd = a @ a.t() + torch.eye(4)
        return (torch.linalg.eigh(spd).eigenvalues, torch.linalg.qr(a).R.abs(), torch.linalg.svdvals(a),
                torch.linalg.inv(spd), torch.linalg.det(spd), torch.searchsorted(b.sort().values, a.flatten()),
                torch.histc(b, bins=4, min=0, max=1))


# -- weights ----------------------------------------------------------------------------------------------

@case("tied_weights", "tied weights (embedding and output head share one tensor)", lambda g, n: (ints(g, 40, 2, 5),))
class TiedWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 12)
        self.head = nn.Linear(12, 40, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


@case("repeated_module", "one module called three times, and registered under two names",
      lambda g, n: (signed(g, 3, 10),))
class Repeated(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Linear(10, 10)
        self.same_block = self.block
        self.scale = nn.Parameter(torch.rand(10))

    def forward(self, x):
        for _ in range(3):
            x = torch.tanh(self.block(x)) * self.scale
        return self.same_block(x)


# -- many outputs and Python values -----------------------------------------------------------------------

@case("many_outputs", "24 outputs in nested dicts, lists and tuples, with None and constants among them",
      lambda g, n: (signed(g, 3, 4),))
class ManyOutputs(nn.Module):
    def forward(self, x):
        return {"powers": [x ** i for i in range(10)], "pairs": tuple((x + i, x - i) for i in range(6)),
                "stats": {"mean": x.mean(), "max": x.max(), "none": None, "label": "stats", "k": 3}}


@case("python_numbers", "outputs that are Python numbers in eager: .item(), a size, constants in a dict",
      lambda g, n: (signed(g, 3, 5),))
class PythonNumbers(nn.Module):
    def forward(self, x):
        return (x * 2, x.sum().item(), int(x.argmax().item()), x.abs().max().item() > 0.5, x.shape[1] * 2,
                {"scale": 1.5, "name": "numbers", "flag": True, "nothing": None})


# -- inputs written in place ------------------------------------------------------------------------------

@case("inplace_inputs", "forward writes into its inputs: clamp_, an out tensor filled with copy_, mul_ on a slice",
      lambda g, n: (signed(g, 4, 3), torch.zeros(4, 3), signed(g, 6)))
class InplaceInputs(nn.Module):
    def forward(self, x, out, v):
        x.clamp_(min=0)
        out.copy_(x * 2)
        v[1:3].mul_(10)
        return x + 1


# -- dynamic shapes of every kind -------------------------------------------------------------------------

@case("dyn_bounded", "Dim with min and max (batch 1..64)", lambda g, n: (signed(g, n, 8),),
      dynamic=lambda: ({0: Dim("batch", min=1, max=64)},), sizes=(4, 1, 17, 64))
class DynBounded(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return torch.softmax(self.fc(x), -1)


@case("dyn_unbounded", "Dim without max (torch.export's first example: unbounded)",
      lambda g, n: (signed(g, n, 6), signed(g, 6)),
      dynamic=lambda: ({0: Dim("n")}, None), sizes=(5, 0, 1, 300))
class DynUnbounded(nn.Module):
    def forward(self, x, w):
        return (x * w).cumsum(0), x.shape[0] + 1


@case("dyn_auto", "Dim.AUTO: dynamic where torch.export can keep it so", lambda g, n: (signed(g, 2, n, 4),),
      dynamic=lambda: ({1: Dim.AUTO},), sizes=(6, 3, 40))
class DynAuto(nn.Module):
    def forward(self, x):
        return x.softmax(1), x.mean(1)


@case("dyn_dynamic", "Dim.DYNAMIC on two dims", lambda g, n: (signed(g, n, n + 2),),
      dynamic=lambda: ({0: Dim.DYNAMIC, 1: Dim.DYNAMIC},), sizes=(4, 2, 25))
class DynDynamic(nn.Module):
    def forward(self, x):
        return x @ x.t(), x.sum(1)


@case("dyn_derived", "derived dims: y has dx + 1 rows, z has 2*dz columns (dz appears in no other input)",
      lambda g, n: (signed(g, n, 3), signed(g, n + 1, 3), signed(g, 2, 2 * n)),
      dynamic=lambda: (lambda dx, dz: ({0: dx}, {0: dx + 1}, {1: 2 * dz}))(Dim("dx", min=2, max=40), Dim("dz")),
      sizes=(4, 2, 40))
class DynDerived(nn.Module):
    def forward(self, x, y, z):
        half = z.shape[1] // 2
        return x + y[1:], y[:-1] - x, z[:, :half] * z[:, half:]


@case("dyn_shared", "one Dim shared by two inputs, and a second Dim",
      lambda g, n: (signed(g, n, 4), signed(g, n, 4), signed(g, 3, n + 1)),
      dynamic=lambda: (lambda n, m: ({0: n}, {0: n}, {1: m}))(Dim("rows", min=2, max=30), Dim("cols", min=2, max=31)),
      sizes=(5, 2, 30))
class DynShared(nn.Module):
    def forward(self, a, b, c):
        return a * b, (a - b).abs().sum(0), c.t() @ c


@case("dyn_transformer", "a transformer block, dynamic batch and sequence", lambda g, n: (signed(g, 2, n, 16),),
      dynamic=lambda: ({0: Dim("b", min=1, max=8), 1: Dim("seq", min=1, max=64)},), sizes=(7, 1, 64))
class DynTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)

    def forward(self, x):
        return self.layer(x)


@case("dyn_conv", "a conv net with dynamic height and width", lambda g, n: (signed(g, 1, 3, n, n + 3),),
      dynamic=lambda: ({2: Dim("h", min=4, max=64), 3: Dim("w", min=7, max=67)},), sizes=(8, 4, 33))
class DynConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x).relu()
        return y, F.adaptive_avg_pool2d(y, 1).flatten(1), y.shape[2] * y.shape[3]


@case("dyn_embedding_bag", "an embedding bag with a dynamic number of ids", lambda g, n: (ints(g, 20, n), rand(g, n)),
      dynamic=lambda: (lambda n: ({0: n}, {0: n}))(Dim("ids", min=2, max=100)), sizes=(9, 2, 100))
class DynEmbeddingBag(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(20, 5, mode="sum")

    def forward(self, ids, w):
        return self.bag(ids, torch.tensor([0, 1]), per_sample_weights=w)


# -- refused at build: what a pack cannot carry -----------------------------------------------------------

@case("data_dependent_branch", "Python `if` on a tensor's value", lambda g, n: (signed(g, 3),),
      refused=r"graph break: Data-dependent branching")
class DataDependentBranch(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # refused here
            return x * 2
        return x


@torch.library.custom_op("corpus::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _(x):
    return torch.empty_like(x)


@case("python_custom_op", "a custom operator implemented in Python (torch.library.custom_op)",
      lambda g, n: (signed(g, 3),), refused=r"custom operator corpus\.twice, whose implementation a pack cannot carry")
class PythonCustomOp(nn.Module):
    def forward(self, x):
        return torch.ops.corpus.twice(x) + 1  # refused here


@case("tolist", "reading tensor values into Python (.tolist()) and looping over them",
      lambda g, n: (ints(g, 4, 3),), refused=r"Could not guard on data-dependent expression")
class ToList(nn.Module):
    def forward(self, x):
        total = torch.zeros(())
        for v in x.tolist():
            total = total + torch.full((), float(v)) if v > 1 else total  # refused here
        return total


@case("unsupported_dtype", "an input of a dtype a pack cannot carry (float8_e8m0fnu)",
      lambda g, n: (rand(g, 3).to(torch.float8_e8m0fnu),), refused=r"dtype float8_e8m0fnu, which a pack cannot carry")
class UnsupportedDtype(nn.Module):
    def forward(self, x):
        return x.to(torch.float32)


# -- groups -----------------------------------------------------------------------------------------------

BY_NAME = {c.name: c for c in CASES}
REFUSED = [c for c in CASES if c.refused is not None]
GROUPS = {
    "static": [c.name for c in CASES if c.refused is None and c.dynamic is None],
    "dynamic": [c.name for c in CASES if c.refused is None and c.dynamic is not None],
}


def make_model(name: str) -> nn.Module:
    """The case's model with its own deterministic weights, in eval mode."""
    torch.manual_seed(sorted(BY_NAME).index(name))
    return BY_NAME[name].make().eval()


class Group(nn.Module):
    """Several corpus models behind one forward: ``inputs`` maps each model's name to its args."""

    def __init__(self, names: list[str]):
        super().__init__()
        self.names = list(names)
        self.models = nn.ModuleDict({n: make_model(n) for n in names})

    def forward(self, inputs: dict):
        return {n: self.models[n](*inputs[n]) for n in self.names}


class Corpus(nn.Module):
    """Every group behind one forward, chosen by name: ``Corpus()("static", inputs)``. Built with one group as
    the example and the others as specializations, each group is an entry of one pack (the value of ``group``
    tells them apart), and the entries compile in parallel."""

    def __init__(self):
        super().__init__()
        self.groups = nn.ModuleDict({g: Group(names) for g, names in GROUPS.items()})

    def forward(self, group: str, inputs: dict):
        return self.groups[group](inputs)


def group_inputs(names: list[str], seed: int, size_index: int) -> dict:
    """One input set of a group: each model's inputs from ``seed``, at its ``size_index``-th size (its last
    size when it has fewer)."""
    out = {}
    for n in names:
        c = BY_NAME[n]
        g = torch.Generator().manual_seed(seed * 1000 + sorted(BY_NAME).index(n))
        out[n] = c.inputs(g, c.sizes[min(size_index, len(c.sizes) - 1)])
    return out


def group_dynamic_shapes(names: list[str]) -> dict | None:
    shapes = {n: BY_NAME[n].dynamic() for n in names if BY_NAME[n].dynamic is not None}
    if not shapes:
        return None
    return {"inputs": {n: shapes.get(n, tuple(None for _ in BY_NAME[n].inputs(torch.Generator(), 4)))
                       for n in names}}


def input_sets(group: str) -> list[tuple[str, dict]]:
    """The input sets a group is checked on: two seeds at the example's sizes, then each other size."""
    names = GROUPS[group]
    sets = [("example", group_inputs(names, 0, 0)), ("second input set", group_inputs(names, 1, 0))]
    most = max(len(BY_NAME[n].sizes) for n in names)
    sets += [(f"sizes #{k}", group_inputs(names, 2 + k, k)) for k in range(1, most)]
    return sets


def max_error(actual: Any, expected: Any) -> float:
    """Max |actual - expected| / max |expected| over every tensor and number (structure and types must match:
    raises AssertionError otherwise)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"expected a tensor, got {type(actual).__name__}"
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, \
            f"expected {expected.dtype}{list(expected.shape)}, got {actual.dtype}{list(actual.shape)}"
        if expected.numel() == 0:
            return 0.0
        if not (expected.dtype.is_floating_point or expected.dtype.is_complex):
            assert torch.equal(actual, expected), "integer or bool values differ"
            return 0.0
        a, e = actual.to(torch.complex128 if expected.dtype.is_complex else torch.float64), \
            expected.to(torch.complex128 if expected.dtype.is_complex else torch.float64)
        return ((a - e).abs().max() / e.abs().max().clamp(min=1e-6)).item()
    if isinstance(expected, (tuple, list)):
        assert type(actual) is type(expected) and len(actual) == len(expected), \
            f"expected a {type(expected).__name__} of {len(expected)}, got {type(actual).__name__}"
        return max([max_error(a, e) for a, e in zip(actual, expected)], default=0.0)
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected), "dict keys differ"
        return max([max_error(actual[k], expected[k]) for k in expected], default=0.0)
    assert type(actual) is type(expected), f"expected a {type(expected).__name__}, got {type(actual).__name__}"
    if isinstance(expected, float):
        return abs(actual - expected) / max(abs(expected), 1e-6) if math.isfinite(expected) else 0.0
    assert actual == expected, f"expected {expected!r}, got {actual!r}"
    return 0.0

