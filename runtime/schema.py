"""The manifest schema: one typed record per part of a pack's manifest, and what makes it valid.

Every part of the manifest (``docs/FORMAT.md``) is a frozen record here: the blob table (``BlobRecord``), the
weights (``WeightRecord``, ``ExternalWeights``), the state (``StateRecord``, ``PositionRule``), the methods
(``MethodRecord``), the example inputs (``ExampleRecord``, ``ExampleLeaf``), the entries (``EntryRecord``)
with their guards (``Guards``: ``TensorGuard``, ``ValueGuard``, ``OutputLeaf``), CUDA records
(``CudaMeta``, ``CudaKernel``) and packed weights (``PackedWeightRecord``), and the whole (``Manifest``). The writer builds these records and writes
``Manifest.to_json()`` (through ``format.canonical_json``); the reader parses the JSON with each record's
``from_json``, which checks every field's presence, type and value and raises an ArchiveError naming where
(``manifest.entries[1].cuda.kernels[0].size``), what was expected and what was found. ``Manifest.from_json``
also checks what records say of each other (blob names, sizes, weight names, method entries): a record that
comes out of it is valid, and nothing else decides that. Input and output structures (``inputs``,
``outputs``) stay trees of plain JSON, checked by ``check_spec``.

May not: import torch or any aotpack module but ``errors``, ``format`` and ``symbolic``: the writer and the
reader both import it, and it checks data without running anything.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ArchiveError
from .format import (ALIGN, BLOB_NAME, BREADTH_FORMAT_VERSION, COMPRESSIONS, CUDA_FORMAT_VERSION, DEFAULT_METHOD,
                     DEVICES, DTYPES, MAX_BLOBS, MAX_ZSTD_FLOOR, MAX_ZSTD_RATIO, METHOD_NAME, STATE_FORMAT_VERSION,
                     V5_FORMAT_VERSION, V6_FORMAT_VERSION, V7_FORMAT_VERSION, _field, _items, field_of, nonneg_int,
                     one_of, v4_features, v6_features, v7_features, zstd_limit)
from .symbolic import Poly, monomial_from_json, poly_from_json

# ---------------------------------------------------------------------------------------------------
# Structures: the trees of ``inputs`` and ``outputs``

NODE_TYPES = ("leaf", "none", "tuple", "list", "dict")
# The Python types a value guard, an example's value leaf or an output constant may have, by the format's name.
VALUE_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "none": type(None)}
# Output leaves that are Python numbers in eager: the compiled code returns a 0-d tensor, made a number at run time.
SCALAR_TYPES = ("int", "float", "bool")


def check_spec(node: Any, where: str, depth: int = 0) -> int:
    """Check a structure tree read from a manifest; return its number of leaves."""
    if depth > 64:
        raise ArchiveError(f"{where} is nested deeper than 64 levels")
    kind = field_of(node, "type", str, where)
    if kind not in NODE_TYPES:
        raise ArchiveError(f"{where}.type is {kind!r}; this reader knows {', '.join(NODE_TYPES)}")
    if kind == "leaf":
        return 1
    if kind == "none":
        return 0
    children = field_of(node, "children", list, where)
    if kind == "dict":
        keys = field_of(node, "keys", list, where)
        if len(keys) != len(children) or not all(isinstance(k, str) for k in keys) or len(set(keys)) != len(keys):
            raise ArchiveError(f"{where}.keys must be distinct strings, one per child")
    return sum(check_spec(c, f"{where}.children[{i}]", depth + 1) for i, c in enumerate(children))


def _check_call_spec(inputs: dict, where: str, message: str) -> int:
    """Check an input structure: a tuple of (args tuple, kwargs dict); return its number of leaves."""
    n = check_spec(inputs, where)
    if inputs.get("type") != "tuple" or len(inputs["children"]) != 2 or \
            inputs["children"][0]["type"] != "tuple" or inputs["children"][1]["type"] != "dict":
        raise ArchiveError(message)
    return n


def describe_layout(sizes: tuple[int, ...], strides: tuple[int, ...]) -> str:
    """Name a layout for people: contiguous, channels_last, or the raw strides."""
    expected = []
    acc = 1
    for s in reversed(sizes):
        expected.append(acc)
        acc *= max(s, 1)
    if all(sz <= 1 or st == e for sz, st, e in zip(sizes, strides, reversed(expected))):
        return "contiguous"
    if len(sizes) == 4:
        n, c, h, w = sizes
        cl = (h * w * c, 1, w * c, c)
        if all(sz <= 1 or st == e for sz, st, e in zip(sizes, strides, cl)):
            return "channels_last"
    return f"strides {tuple(strides)}"


# ---------------------------------------------------------------------------------------------------
# Blobs

@dataclass(frozen=True)
class BlobRecord:
    """One blob: where it lies (``offset`` from the start of the blob region), how it is stored, its hash."""

    name: str
    offset: int
    stored_size: int
    size: int
    sha256: str
    compression: str

    def to_json(self) -> dict:
        return {"name": self.name, "offset": self.offset, "stored_size": self.stored_size,
                "size": self.size, "sha256": self.sha256, "compression": self.compression}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "BlobRecord":
        name = field_of(obj, "name", str, where)
        if not BLOB_NAME.match(name) or ".." in name.split("/") or len(name) > 256:
            raise ArchiveError(f"{where}.name {name!r} is not a valid blob name "
                               "(letters, digits, '._-' and '/' separators; no '..', no leading '/')")
        sha = field_of(obj, "sha256", str, where)
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise ArchiveError(f"{where}.sha256 is not 64 lowercase hex digits")
        rec = cls(name=name, offset=nonneg_int(obj, "offset", where),
                  stored_size=nonneg_int(obj, "stored_size", where), size=nonneg_int(obj, "size", where),
                  sha256=sha, compression=one_of(obj, "compression", COMPRESSIONS, where))
        if rec.compression == "none" and rec.stored_size != rec.size:
            raise ArchiveError(f"{where}: uncompressed blob {name!r} has stored_size {rec.stored_size} "
                               f"but size {rec.size}")
        if rec.compression == "zstd" and rec.size > zstd_limit(rec.stored_size):
            raise ArchiveError(f"{where}: zstd blob {name!r} declares {rec.size} bytes from {rec.stored_size} stored; "
                               f"a blob may expand at most {MAX_ZSTD_RATIO}-fold (or to {MAX_ZSTD_FLOOR} bytes)")
        if rec.offset % ALIGN:
            raise ArchiveError(f"{where}: blob {name!r} offset {rec.offset} is not {ALIGN}-byte aligned")
        return rec


def _blob_name(value: str) -> bool:
    return bool(BLOB_NAME.match(value)) and ".." not in value.split("/") and len(value) <= 256


def _known_blob(name: str, blob_sizes: dict[str, int] | None) -> None:
    """Refuse a blob name the blob table lacks (``blob_sizes``: blob name -> size; None checks nothing)."""
    if blob_sizes is not None and name not in blob_sizes:
        raise ArchiveError(f"manifest refers to blob {name!r}, which the blob table lacks")


# ---------------------------------------------------------------------------------------------------
# Weights and state

def _shape(obj: Any, where: str, key: str = "shape") -> tuple[int, ...]:
    shape = field_of(obj, key, list, where)
    if len(shape) > 64 or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**48 for d in shape):
        raise ArchiveError(f"{where}.{key} must be a list of at most 64 non-negative integers")
    return tuple(shape)


@dataclass(frozen=True)
class WeightRecord:
    """A parameter, buffer or constant tensor, stored once per pack and shared by every entry.

    ``name`` is its name in the model's ``state_dict``; ``aliases`` are its other names there (the very same
    tensor: an ``lm_head`` tied to the embedding). ``in_state_dict`` is False for a tensor the model's
    ``state_dict`` lacks (a lifted constant, a non-persistent buffer): new weights need not name it.
    ``same_as`` (a pack whose weights are beside it) names the record whose tensor of the weights file this
    record is: records that would share a blob in the pack share one tensor of the file."""

    name: str
    blob: str | None  # None: the weight is in the pack's external weights file, under ``file_name``
    dtype: str
    shape: tuple[int, ...]
    aliases: tuple[str, ...] = ()
    in_state_dict: bool = True
    same_as: str | None = None

    @property
    def file_name(self) -> str:
        """The name of its tensor in the pack's external weights file."""
        return self.same_as or self.name

    def to_json(self) -> dict:
        return {"name": self.name, **({} if self.blob is None else {"blob": self.blob}), "dtype": self.dtype,
                "shape": list(self.shape),
                **({"aliases": list(self.aliases)} if self.aliases else {}),
                **({} if self.in_state_dict else {"state_dict": False}),
                **({"same_as": self.same_as} if self.same_as is not None else {})}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "WeightRecord":
        if not isinstance(obj, dict):
            raise ArchiveError(f"{where} must be a JSON object, got {type(obj).__name__}")
        aliases: tuple[str, ...] = ()
        if "aliases" in obj:
            aliases = tuple(field_of(obj, "aliases", list, where))
            if not aliases or not all(isinstance(a, str) for a in aliases) or len(set(aliases)) != len(aliases):
                raise ArchiveError(f"{where}.aliases must be a non-empty list of distinct strings")
        in_state_dict = True
        if "state_dict" in obj:
            if field_of(obj, "state_dict", bool, where):
                raise ArchiveError(f"{where}.state_dict is true; it is written only as false (absent means true)")
            in_state_dict = False
            if aliases:
                raise ArchiveError(f"{where} has aliases but is not in the state_dict")
        blob = field_of(obj, "blob", str, where) if "blob" in obj else None
        same_as = field_of(obj, "same_as", str, where) if "same_as" in obj else None
        return cls(name=field_of(obj, "name", str, where), blob=blob,
                   dtype=one_of(obj, "dtype", DTYPES, where), shape=_shape(obj, where), aliases=aliases,
                   in_state_dict=in_state_dict, same_as=same_as)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype]


@dataclass(frozen=True)
class ExternalWeights:
    """The safetensors file that holds a pack's weights (each under its record's ``file_name``): ``file``, a file
    name in the pack's folder (where a loader looks by default), and its ``sha256`` and ``size``."""

    file: str
    sha256: str
    size: int

    def to_json(self) -> dict:
        return {"file": self.file, "sha256": self.sha256, "size": self.size}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "ExternalWeights":
        file = field_of(obj, "file", str, where)
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,255}", file) or file in (".", ".."):
            raise ArchiveError(f"{where}.file {file!r} is not a file name (letters, digits, '._-'; no folder)")
        sha = field_of(obj, "sha256", str, where)
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise ArchiveError(f"{where}.sha256 is not 64 lowercase hex digits")
        return cls(file=file, sha256=sha, size=nonneg_int(obj, "size", where))


@dataclass(frozen=True)
class PositionRule:
    """Which input of a stateful pack holds cache positions, so that a call is refused, before any native
    code runs, when it would write outside the cache: every position ``p`` of the 1-D integer tensor input
    ``input`` must satisfy ``0 <= p < limit``, and ``p[0] + span <= limit``, where ``span`` is the number of
    positions one call writes: a constant, or the size of dimension ``dim`` of input ``span_input``."""

    input: str
    limit: int
    span: int | tuple[str, int]

    def to_json(self) -> dict:
        span = self.span if isinstance(self.span, int) else {"input": self.span[0], "dim": self.span[1]}
        return {"input": self.input, "limit": self.limit, "span": span}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "PositionRule":
        span_json = field_of(obj, "span", (int, dict), where)
        if isinstance(span_json, dict):
            span: int | tuple[str, int] = (field_of(span_json, "input", str, f"{where}.span"),
                                           nonneg_int(span_json, "dim", f"{where}.span", limit=63))
        else:
            span = nonneg_int(obj, "span", where, limit=2**48)
        return cls(input=field_of(obj, "input", str, where), limit=nonneg_int(obj, "limit", where, limit=2**48),
                   span=span)


@dataclass(frozen=True)
class StateRecord:
    """A buffer the compiled code writes in place (an LLM's KV cache, a counter): the pack's state.

    Every session of a loaded pack gets its own copy, made from the initial value: ``init`` is ``"zeros"``
    or the name of a blob holding the value (raw little-endian bytes, contiguous). All entries share it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    init: str

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "init": self.init}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "StateRecord":
        init = field_of(obj, "init", str, where)
        if init != "zeros" and (not BLOB_NAME.match(init) or ".." in init.split("/")):
            raise ArchiveError(f"{where}.init must be \"zeros\" or a blob name, found {init!r}")
        return cls(name=field_of(obj, "name", str, where), dtype=one_of(obj, "dtype", DTYPES, where),
                   shape=_shape(obj, where), init=init)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype]


# ---------------------------------------------------------------------------------------------------
# Example inputs

@dataclass(frozen=True)
class ExampleLeaf:
    """One leaf of the example inputs: a tensor stored in ``blob`` (raw little-endian bytes, contiguous) with
    the ``shape`` and ``strides`` it had, or a Python ``value``."""

    kind: str  # "tensor" or "value"
    value: Any = None
    blob: str | None = None
    dtype: str | None = None
    shape: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()

    def to_json(self) -> dict:
        if self.kind == "value":
            return {"kind": "value", "value": self.value}
        return {"kind": "tensor", "blob": self.blob, "dtype": self.dtype, "shape": list(self.shape),
                "strides": list(self.strides)}

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype] if self.kind == "tensor" else 0

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "ExampleLeaf":
        if field_of(obj, "kind", str, where) == "value":
            return cls("value", value=obj.get("value"))
        dtype = one_of(obj, "dtype", tuple(DTYPES), where)
        shape = tuple(field_of(obj, "shape", list, where))
        strides = tuple(field_of(obj, "strides", list, where))
        if len(strides) != len(shape) or not all(type(s) is int and 0 <= s < 2**48 for s in shape + strides):
            raise ArchiveError(f"{where}: shape and strides must be non-negative integers, one per dim")
        blob = field_of(obj, "blob", str, where)
        span = 1 + sum((n - 1) * s for n, s in zip(shape, strides)) if math.prod(shape) else 0
        if span >= 2**48:
            raise ArchiveError(f"{where}.strides {list(strides)} span {span} elements")
        return cls("tensor", blob=blob, dtype=dtype, shape=shape, strides=strides)


@dataclass(frozen=True)
class ExampleRecord:
    """The example inputs a pack (or one method) was built with: the structure of ``(args, kwargs)`` and its
    leaves, in flattening order."""

    inputs: dict
    leaves: tuple[ExampleLeaf, ...]

    def to_json(self) -> dict:
        return {"inputs": self.inputs, "leaves": [leaf.to_json() for leaf in self.leaves]}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "ExampleRecord":
        inputs = field_of(obj, "inputs", dict, where)
        n = _check_call_spec(inputs, f"{where}.inputs", f"{where}.inputs must be a tuple of (args tuple, kwargs dict)")
        leaves_json = field_of(obj, "leaves", list, where)
        if len(leaves_json) != n:
            raise ArchiveError(f"{where} has a leaf count that does not match its structure")
        return cls(inputs, tuple(ExampleLeaf.from_json(leaf, f"{where}.leaves[{i}]")
                                 for i, leaf in enumerate(leaves_json)))


def _example(obj: Any, where: str) -> ExampleRecord | None:
    """An optional example record (absent or null: None)."""
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise ArchiveError(f"{where} must be a JSON object or absent, found {type(obj).__name__}")
    return ExampleRecord.from_json(obj, where)


# ---------------------------------------------------------------------------------------------------
# Guards (docs/FORMAT.md, "Guards")

@dataclass(frozen=True)
class TensorGuard:
    path: str
    name: str
    dtype: str
    device: str
    sizes: tuple  # int; str naming a symbol; or a Poly over the symbols (a derived dim: 2*d + 1)
    strides: tuple  # int; None where the dim's size is 0 or 1 (any stride is fine there); or a Poly
    requires_grad: bool
    mutated: bool = False  # the compiled code writes into this input, as the model's forward does

    def to_json(self) -> dict:
        out = {"kind": "tensor", "path": self.path, "name": self.name, "dtype": self.dtype,
               "device": self.device, "sizes": [s.to_json() if isinstance(s, Poly) else s for s in self.sizes],
               "strides": [s.to_json_stride() if isinstance(s, Poly) else s for s in self.strides],
               "requires_grad": self.requires_grad}
        if self.mutated:
            out["mutated"] = True
        return out

    def describe(self, symbols: dict) -> str:
        dims = []
        for s in self.sizes:
            if isinstance(s, str):
                lo, hi = symbols[s]
                dims.append(f"{s}={lo}..{hi}" if hi is not None else f"{s}>={lo}")
            elif isinstance(s, Poly):
                dims.append(s.text())
            else:
                dims.append(str(s))
        written = ", written in place" if self.mutated else ""
        return f"{self.dtype}[{', '.join(dims)}] {self.device} {self.layout()}{written}"

    def layout(self) -> str:
        """contiguous / channels_last / the strides, worked out on the symbols where sizes are symbolic."""
        if all(isinstance(s, int) for s in self.sizes) and not any(isinstance(s, Poly) for s in self.strides):
            return describe_layout(self.sizes, tuple(0 if s is None else s for s in self.strides))
        # Compare symbolically: a stride is contiguous if it is the product of the later sizes.
        later = [Poly.of(1)]
        for size in reversed(self.sizes[1:]):
            later.insert(0, later[0] * Poly.of(size))
        if all(st is None or Poly.of(st) == want for st, want in zip(self.strides, later)):
            return "contiguous"
        return "strides (" + ", ".join("any" if st is None else Poly.of(st).text() for st in self.strides) + ")"


@dataclass(frozen=True)
class ValueGuard:
    path: str
    name: str
    type: str
    value: Any

    def to_json(self) -> dict:
        return {"kind": "value", "path": self.path, "name": self.name, "type": self.type, "value": self.value}


# A guard's device: a device type, optionally with an index (``cpu``, ``cuda``, ``cuda:1``).
_DEVICE = re.compile(r"[a-z][a-z0-9_]*(:(0|[1-9][0-9]{0,8}))?")


def _size_from_json(s: Any, where: str, symbols: dict) -> int | str | Poly:
    if isinstance(s, str):
        if s not in symbols:
            raise ArchiveError(f"{where}: size symbol {s!r} is not declared in the entry's symbols")
        return s
    if isinstance(s, list):
        poly = poly_from_json(s, f"{where}.sizes", symbols)
        if not poly.symbols:
            raise ArchiveError(f"{where}.sizes: a polynomial size must name a symbol")
        return poly
    if not (type(s) is int and s >= 0):
        raise ArchiveError(f"{where}.sizes must hold non-negative integers, symbol names or polynomials")
    return s


def _stride_from_json(s: Any, where: str, symbols: dict) -> int | None | Poly:
    if isinstance(s, list):
        if s and isinstance(s[0], list):
            return poly_from_json(s, f"{where}.strides", symbols)
        syms, coeff = monomial_from_json(s, f"{where}.strides", symbols)
        if coeff < 0:
            raise ArchiveError(f"{where}.strides: a symbolic stride must be [coefficient, symbol, ...] with a "
                               "non-negative coefficient over the entry's symbols")
        return Poly({syms: coeff})
    if s is not None and not (type(s) is int and s >= 0):
        raise ArchiveError(f"{where}.strides must hold non-negative integers, null, monomials or polynomials")
    return s


def leaf_from_json(obj: Any, where: str, symbols: dict) -> TensorGuard | ValueGuard:
    """One input leaf's guard, checked against the entry's ``symbols``."""
    kind = field_of(obj, "kind", str, where)
    path = field_of(obj, "path", str, where)
    name = field_of(obj, "name", str, where)
    if kind == "value":
        vtype = field_of(obj, "type", str, where)
        if vtype not in VALUE_TYPES:
            raise ArchiveError(f"{where}.type is {vtype!r}; this reader knows {', '.join(VALUE_TYPES)}")
        value = obj.get("value")
        if isinstance(value, bool) and vtype in ("int", "float") or \
                not isinstance(value, VALUE_TYPES[vtype]) and not (vtype == "float" and type(value) is int):
            raise ArchiveError(f"{where}.value does not match its type {vtype}")
        if vtype == "float":
            try:
                value = float(value)
            except OverflowError:  # an integer literal beyond the range of a float (10**600)
                raise ArchiveError(f"{where}.value is an integer of {len(str(abs(value)))} digits, out of the "
                                   "range of a float") from None
        return ValueGuard(path, name, vtype, value)
    if kind != "tensor":
        raise ArchiveError(f"{where}.kind is {kind!r}; this reader knows tensor, value")
    sizes_json = field_of(obj, "sizes", list, where)
    strides_json = field_of(obj, "strides", list, where)
    if len(sizes_json) != len(strides_json) or len(sizes_json) > 64:
        raise ArchiveError(f"{where}: sizes and strides must have the same length (at most 64)")
    sizes = tuple(_size_from_json(s, where, symbols) for s in sizes_json)
    strides = tuple(_stride_from_json(s, where, symbols) for s in strides_json)
    for d, (size, stride) in enumerate(zip(sizes, strides)):
        # Any stride addresses the same elements only along a dim of size 0 or 1; elsewhere a null stride
        # would turn the layout guard off.
        if stride is None and not (type(size) is int and size <= 1):
            raise ArchiveError(f"{where}.strides[{d}] is null, but dim {d} has size {size!r}; null is allowed only "
                               "for a static dim of size 0 or 1")
    device = field_of(obj, "device", str, where)
    if not _DEVICE.fullmatch(device):
        raise ArchiveError(f"{where}.device {device!r} is not a device name")
    dtype = one_of(obj, "dtype", tuple(DTYPES), where)
    mutated = field_of(obj, "mutated", bool, where) if "mutated" in obj else False
    if "mutated" in obj and not mutated:
        raise ArchiveError(f"{where}.mutated is false; the field is written only as true")
    if field_of(obj, "requires_grad", bool, where):
        raise ArchiveError(f"{where}.requires_grad is true; a pack computes no gradients, so it is always false")
    return TensorGuard(path, name, dtype, device, sizes, strides, False, mutated)


@dataclass(frozen=True)
class InputGuards:
    """What a call's inputs must be for an entry: the structure of ``(args, kwargs)``, one guard per leaf in
    flattening order, the range of each size symbol (``(min, None)``: no upper bound), and the parameter
    names of the model's ``forward`` (a call may pass positional parameters by name)."""

    inputs: dict
    leaves: tuple[TensorGuard | ValueGuard, ...]
    symbols: dict  # name -> (min, max or None)
    param_names: tuple[str, ...]

    def to_json(self) -> dict:
        return {"inputs": self.inputs, "leaves": [g.to_json() for g in self.leaves],
                "symbols": {k: [lo, hi] for k, (lo, hi) in self.symbols.items()},
                "param_names": list(self.param_names)}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "InputGuards":
        inputs = field_of(obj, "inputs", dict, where)
        n_leaves = _check_call_spec(inputs, f"{where}.inputs",
                                    f"{where}.inputs must be a tuple of (args tuple, kwargs dict)")
        symbols_json = field_of(obj, "symbols", dict, where)
        symbols = {}
        for name, rng in symbols_json.items():
            if not (isinstance(rng, list) and len(rng) == 2 and type(rng[0]) is int and 0 <= rng[0]
                    and (rng[1] is None or (type(rng[1]) is int and rng[0] <= rng[1]))):
                raise ArchiveError(f"{where}.symbols[{name!r}] must be [min, max] with 0 <= min <= max, or "
                                   "[min, null] for no upper bound")
            symbols[name] = (rng[0], rng[1])
        leaves_json = field_of(obj, "leaves", list, where)
        if len(leaves_json) != n_leaves:
            raise ArchiveError(f"{where} has {len(leaves_json)} leaf guards for {n_leaves} input leaves")
        leaves = tuple(leaf_from_json(g, f"{where}.leaves[{i}]", symbols) for i, g in enumerate(leaves_json))
        params = field_of(obj, "param_names", list, where)
        if not all(isinstance(p, str) for p in params) or len(set(params)) != len(params):
            raise ArchiveError(f"{where}.param_names must be distinct strings, found {params!r:.120}")
        return cls(inputs, leaves, symbols, tuple(params))


@dataclass(frozen=True)
class OutputLeaf:
    """One output leaf: the ``index`` among the compiled code's outputs of a tensor or of a Python number
    (``kind`` ``scalar``, of ``type`` int, float or bool), or a constant ``value``."""

    kind: str  # "tensor", "scalar" or "value"
    index: int | None = None
    type: str | None = None
    value: Any = None

    def to_json(self) -> dict:
        if self.kind == "value":
            return {"kind": "value", "value": self.value}
        if self.kind == "scalar":
            return {"kind": "scalar", "index": self.index, "type": self.type}
        return {"kind": "tensor", "index": self.index}


def _output_leaves(obj: dict, where: str) -> tuple[dict, tuple[OutputLeaf, ...]]:
    """An entry's output structure and its leaves, checked: the compiled code returns its outputs in order."""
    outputs = field_of(obj, "outputs", dict, where)
    n_out = check_spec(outputs, f"{where}.outputs")
    output_leaves = field_of(obj, "output_leaves", list, where)
    if len(output_leaves) != n_out:
        raise ArchiveError(f"{where} has {len(output_leaves)} output leaves for {n_out} in its structure")
    n_returned = 0
    leaves = []
    for j, o in enumerate(output_leaves):
        ow = f"{where}.output_leaves[{j}]"
        kind = field_of(o, "kind", str, ow)
        if kind in ("tensor", "scalar"):
            # The compiled code returns its outputs in this order; anything else would pick the wrong one.
            if field_of(o, "index", int, ow) != n_returned:
                raise ArchiveError(f"{ow}.index is {o['index']}, expected {n_returned}")
            if kind == "scalar" and field_of(o, "type", str, ow) not in SCALAR_TYPES:
                raise ArchiveError(f"{ow}.type is {o['type']!r}; this reader knows {', '.join(SCALAR_TYPES)}")
            leaves.append(OutputLeaf(kind, index=n_returned, type=o["type"] if kind == "scalar" else None))
            n_returned += 1
        elif kind != "value" or "value" not in o:
            raise ArchiveError(f"{ow} must be a tensor or scalar index, or a value")
        else:
            leaves.append(OutputLeaf("value", value=o["value"]))
    return outputs, tuple(leaves)


@dataclass(frozen=True)
class Guards:
    """An entry's guard data (docs/FORMAT.md, "Guards"): what its inputs must be (``InputGuards``' fields),
    the grad mode at capture (None where an old manifest does not say), and its output structure."""

    inputs: dict
    leaves: tuple[TensorGuard | ValueGuard, ...]
    symbols: dict
    param_names: tuple[str, ...]
    grad_mode: bool | None
    outputs: dict
    output_leaves: tuple[OutputLeaf, ...]

    @property
    def input_guards(self) -> InputGuards:
        return InputGuards(self.inputs, self.leaves, self.symbols, self.param_names)

    def to_json(self) -> dict:
        return {**self.input_guards.to_json(), **({} if self.grad_mode is None else {"grad_mode": self.grad_mode}),
                "outputs": self.outputs, "output_leaves": [o.to_json() for o in self.output_leaves]}


# ---------------------------------------------------------------------------------------------------
# CUDA records (format version 2)

# ``sm_XY`` is SASS (machine code) for compute capability X.Y, where Y is the last digit (sm_86 is 8.6,
# sm_100 is 10.0, sm_120 is 12.0). Plain SASS runs on the same major version and an equal or higher minor;
# ``sm_XYa`` (architecture-specific features) only on exactly X.Y; ``sm_XYf`` (family-specific) on the same
# major and an equal or higher minor. ``compute_XY`` is PTX, which the driver compiles for the GPU at load,
# so it runs on X.Y and every later GPU; ``compute_XYa`` only on exactly X.Y, ``compute_XYf`` within the family.
_ARCH = re.compile(r"(sm|compute)_([1-9][0-9]{1,2})([af]?)")
_ARCH_EXAMPLES = {"sm": "sm_80, sm_90a, sm_100f", "compute": "compute_80, compute_90a"}


@dataclass(frozen=True)
class CudaArch:
    """One parsed architecture string: ``kind`` is ``sm`` (SASS) or ``compute`` (PTX)."""

    kind: str
    major: int
    minor: int
    suffix: str  # "", "a" (this exact GPU only) or "f" (this family)

    def runs_on(self, capability: tuple[int, int]) -> bool:
        major, minor = capability
        if self.suffix == "a":
            return (self.major, self.minor) == (major, minor)
        if self.suffix == "f" or self.kind == "sm":
            return self.major == major and self.minor <= minor
        return self.major * 10 + self.minor <= major * 10 + minor  # plain PTX: the driver JITs it forward


def parse_arch(text: Any, kind: str, where: str) -> CudaArch:
    """``sm_90`` -> CudaArch("sm", 9, 0, ""); anything else than a ``kind`` architecture is an ArchiveError."""
    m = _ARCH.fullmatch(text) if isinstance(text, str) else None
    if m is None or m.group(1) != kind:
        what = "SASS" if kind == "sm" else "PTX"
        raise ArchiveError(f"{where} is {text!r}, not a CUDA {what} architecture ({kind}_ followed by the compute "
                           f"capability's digits, e.g. {_ARCH_EXAMPLES[kind]})")
    digits = m.group(2)
    return CudaArch(kind, int(digits[:-1]), int(digits[-1]), m.group(3))


def _arch_list(obj: dict, key: str, kind: str, where: str) -> tuple[str, ...]:
    values = field_of(obj, key, list, where)
    if len(values) > 64:
        raise ArchiveError(f"{where}.{key} lists {len(values)} architectures; at most 64 are allowed")
    for i, v in enumerate(values):
        parse_arch(v, kind, f"{where}.{key}[{i}]")
    return tuple(values)


_FILE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,255}")


@dataclass(frozen=True)
class CudaKernel:
    """One compiled GPU kernel of a CUDA entry: its blob in the pack, and the file name under which the
    compiled code looks for it in its kernel folder (``cubin_dir``)."""

    name: str
    blob: str
    file: str
    archs: tuple[str, ...]  # the kernel's own list, or the entry's when the manifest gives none
    ptx: tuple[str, ...]
    size: int
    shared_mem: int
    num_warps: int | None  # None where the build could not read it from the generated code

    def to_json(self) -> dict:
        return {"name": self.name, "blob": self.blob, "file": self.file, "archs": list(self.archs),
                "ptx": list(self.ptx), "size": self.size, "shared_mem": self.shared_mem,
                "num_warps": self.num_warps}


@dataclass(frozen=True)
class CudaMeta:
    """The checked ``cuda`` object of a CUDA entry (docs/FORMAT.md, format version 2)."""

    archs: tuple[str, ...]  # SASS that every kernel carries
    ptx: tuple[str, ...]  # PTX that every kernel carries
    built_without_gpu: bool
    autotuned: bool
    build_gpu: str | None
    cuda_version: str
    kernels: tuple[CudaKernel, ...]

    def to_json(self) -> dict:
        return {"archs": list(self.archs), "ptx": list(self.ptx), "built_without_gpu": self.built_without_gpu,
                "autotuned": self.autotuned, "build_gpu": self.build_gpu, "cuda_version": self.cuda_version,
                "kernels": [k.to_json() for k in self.kernels]}

    @classmethod
    def from_json(cls, obj: Any, where: str, blob_sizes: dict[str, int] | None = None) -> "CudaMeta":
        """Check every field's type and value. ``blob_sizes`` (blob name -> size, from the blob table)
        also checks that each kernel's blob exists and holds ``size`` bytes."""
        if not isinstance(obj, dict):
            raise ArchiveError(f"{where} must be a JSON object, found {type(obj).__name__}")
        archs = _arch_list(obj, "archs", "sm", where)
        ptx = _arch_list(obj, "ptx", "compute", where)
        build_gpu = field_of(obj, "build_gpu", (str, type(None)), where)
        kernels_json = field_of(obj, "kernels", list, where)
        kernels = []
        files: dict[str, str] = {}
        for k, kobj in enumerate(kernels_json):
            kw = f"{where}.kernels[{k}]"
            if not isinstance(kobj, dict):
                raise ArchiveError(f"{kw} must be a JSON object, found {type(kobj).__name__}")
            blob = field_of(kobj, "blob", str, kw)
            if not _blob_name(blob):
                raise ArchiveError(f"{kw}.blob {blob!r} is not a valid blob name")
            file = field_of(kobj, "file", str, kw)
            if not _FILE_NAME.fullmatch(file) or file in (".", ".."):
                raise ArchiveError(f"{kw}.file {file!r} must be a plain file name (letters, digits and '._-', "
                                   "no '/', at most 255 characters)")
            if file != blob.rsplit("/", 1)[-1]:
                raise ArchiveError(f"{kw}.file is {file!r} but its blob {blob!r} ends in "
                                   f"{blob.rsplit('/', 1)[-1]!r}; they must be the same name")
            if files.setdefault(file, blob) != blob:
                raise ArchiveError(f"{kw}.file {file!r} is also the file of blob {files[file]!r}; the "
                                   "kernels of an entry share one folder, so their file names must differ")
            size = nonneg_int(kobj, "size", kw)
            if blob_sizes is not None:
                if blob not in blob_sizes:
                    raise ArchiveError(f"{kw}.blob {blob!r} is not in the blob table")
                if blob_sizes[blob] != size:
                    raise ArchiveError(f"{kw}.size is {size} but blob {blob!r} holds {blob_sizes[blob]} bytes")
            kernels.append(CudaKernel(
                name=field_of(kobj, "name", str, kw), blob=blob, file=file,
                archs=_arch_list(kobj, "archs", "sm", kw) if "archs" in kobj else archs,
                ptx=_arch_list(kobj, "ptx", "compute", kw) if "ptx" in kobj else ptx,
                size=size, shared_mem=nonneg_int(kobj, "shared_mem", kw),
                num_warps=_warps(kobj, kw)))
        return cls(archs=archs, ptx=ptx, built_without_gpu=field_of(obj, "built_without_gpu", bool, where),
                   autotuned=field_of(obj, "autotuned", bool, where), build_gpu=build_gpu,
                   cuda_version=field_of(obj, "cuda_version", str, where), kernels=tuple(kernels))


def _warps(kobj: dict, where: str) -> int | None:
    if field_of(kobj, "num_warps", (int, type(None)), where) is None:
        return None
    return nonneg_int(kobj, "num_warps", where, limit=1024)


# ---------------------------------------------------------------------------------------------------
# Entries

# The steps a ``folded_weights`` record may take, by how many tensors each reads: ``weight`` reads a stored
# weight by name, ``zeros`` makes a tensor of the record's shape, the others are the torch ops of that name.
FOLD_UNARY = ("sqrt", "rsqrt", "reciprocal", "neg")
FOLD_BINARY = ("add", "sub", "mul", "div")
FOLD_OPS = ("weight", "zeros", "unsqueeze", "reshape", "transpose") + FOLD_UNARY + FOLD_BINARY
# At most this many steps per record: a record is a few per-channel ops (a batch norm folded into a
# convolution takes about twenty).
MAX_FOLD_STEPS = 256


def _broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape torch broadcasts ``a`` and ``b`` to, or None where they do not broadcast."""
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        x, y = a[-i] if i <= len(a) else 1, b[-i] if i <= len(b) else 1
        if x != y and 1 not in (x, y):
            return None
        out.append(y if x == 1 else x)
    return tuple(reversed(out))


@dataclass(frozen=True)
class FoldStep:
    """One step of a ``FoldRecord``: ``op`` on the tensors of earlier steps ``inputs`` (by index), with a
    number ``value`` as the second operand of a binary op that reads one tensor, a stored weight's ``name``
    (``weight``), a ``dim`` (``unsqueeze``) or a ``shape`` (``reshape``). ``transpose`` (format version 7) swaps
    the two dims of a 2-d tensor (a linear's weight stored ``[in, out]``)."""

    op: str
    inputs: tuple[int, ...] = ()
    value: float | int | None = None
    name: str | None = None
    dim: int | None = None
    shape: tuple[int, ...] | None = None

    def to_json(self) -> dict:
        out: dict = {"op": self.op}
        if self.inputs:
            out["in"] = list(self.inputs)
        for key in ("value", "name", "dim"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.shape is not None:
            out["shape"] = list(self.shape)
        return out

    @classmethod
    def from_json(cls, obj: Any, where: str, index: int) -> "FoldStep":
        op = one_of(obj, "op", FOLD_OPS, where)
        inputs = tuple(field_of(obj, "in", list, where)) if "in" in obj else ()
        if not all(type(i) is int and 0 <= i < index for i in inputs):
            raise ArchiveError(f"{where}.in is {list(inputs)}; a step reads earlier steps only (indices 0..{index - 1})")
        want = 0 if op in ("weight", "zeros") else 1 if op in FOLD_UNARY + ("unsqueeze", "reshape", "transpose") \
            else None
        value = None
        if op in FOLD_BINARY:
            value = field_of(obj, "value", (int, float), where) if "value" in obj else None
            want = 1 if value is not None else 2
        if len(inputs) != want:
            raise ArchiveError(f"{where} ({op}) reads {len(inputs)} earlier steps; it takes {want}")
        name = field_of(obj, "name", str, where) if op == "weight" else None
        dim = field_of(obj, "dim", int, where) if op == "unsqueeze" else None
        shape = None
        if op in ("reshape", "zeros"):
            shape = tuple(field_of(obj, "shape", list, where))
            if not all(type(d) is int and (d >= 0 or (d == -1 and op == "reshape")) for d in shape) \
                    or shape.count(-1) > 1:
                raise ArchiveError(f"{where}.shape is {list(shape)}; expected sizes of at least 0 (one may be -1 "
                                   "for reshape)")
        return cls(op=op, inputs=inputs, value=value, name=name, dim=dim, shape=shape)


@dataclass(frozen=True)
class FoldRecord:
    """How the loader computes a constant of a CPU entry's code that no stored weight holds: a float32 tensor of
    ``shape`` folded from stored weights by ``steps`` (each reads earlier steps; the last is the constant). A
    batch norm after a convolution is folded this way into the convolution's weight and bias. The steps are
    plain per-channel ops on the stored weights, so new weights reach the code through them."""

    shape: tuple[int, ...]
    steps: tuple[FoldStep, ...]

    def to_json(self) -> dict:
        return {"dtype": "float32", "shape": list(self.shape), "steps": [s.to_json() for s in self.steps]}

    @property
    def weight_names(self) -> tuple[str, ...]:
        """The stored weights it reads, in step order, each once."""
        return tuple(dict.fromkeys(s.name for s in self.steps if s.op == "weight"))

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "FoldRecord":
        if not isinstance(obj, dict):
            raise ArchiveError(f"{where} must be a JSON object")
        if field_of(obj, "dtype", str, where) != "float32":
            raise ArchiveError(f"{where}.dtype is {obj['dtype']!r}; this reader folds float32 weights only")
        shape = field_of(obj, "shape", list, where)
        if not all(type(d) is int and d >= 0 for d in shape):
            raise ArchiveError(f"{where}.shape is {shape!r}; expected sizes of at least 0")
        raw = field_of(obj, "steps", list, where)
        if not 1 <= len(raw) <= MAX_FOLD_STEPS:
            raise ArchiveError(f"{where}.steps has {len(raw)} steps; expected 1 to {MAX_FOLD_STEPS}")
        steps = tuple(FoldStep.from_json(s, f"{where}.steps[{i}]", i) for i, s in enumerate(raw))
        return cls(shape=tuple(shape), steps=steps)

    def check_shapes(self, weights: dict, where: str) -> None:
        """Follow the shapes through the steps (``weights``: the pack's float32 weight records by name): each
        weight must be a float32 weight of the pack, each op valid for its operands' shapes, no step larger
        than the largest weight it reads or the result (a record cannot make the loader allocate more than
        the pack's own tensors), and the last step of the record's ``shape``."""
        shapes: list[tuple[int, ...]] = []
        limit = math.prod(self.shape)
        for i, s in enumerate(self.steps):
            sw = f"{where}.steps[{i}]"
            ins = [shapes[j] for j in s.inputs]
            if s.op == "weight":
                w = weights.get(s.name)
                if w is None or w.dtype != "float32":
                    found = "no such weight" if w is None else w.dtype
                    raise ArchiveError(f"{sw} reads weight {s.name!r} ({found}); expected a float32 weight of the "
                                       "pack")
                out = tuple(w.shape)
                limit = max(limit, math.prod(out))
            elif s.op == "zeros":
                out = s.shape
            elif s.op == "unsqueeze":
                if not -len(ins[0]) - 1 <= s.dim <= len(ins[0]):
                    raise ArchiveError(f"{sw} unsqueezes dim {s.dim} of a {len(ins[0])}-d tensor")
                d = s.dim if s.dim >= 0 else s.dim + len(ins[0]) + 1
                out = ins[0][:d] + (1,) + ins[0][d:]
            elif s.op == "reshape":
                n, known = math.prod(ins[0]), math.prod(d for d in s.shape if d != -1)
                if -1 in s.shape:
                    if known == 0 or n % known:
                        raise ArchiveError(f"{sw} reshapes {list(ins[0])} to {list(s.shape)}")
                    out = tuple(n // known if d == -1 else d for d in s.shape)
                else:
                    out = s.shape
                if math.prod(out) != n:
                    raise ArchiveError(f"{sw} reshapes {list(ins[0])} to {list(s.shape)}")
            elif s.op == "transpose":
                if len(ins[0]) != 2:
                    raise ArchiveError(f"{sw} transposes a {len(ins[0])}-d tensor; it takes a 2-d one")
                out = ins[0][::-1]
            elif s.op in FOLD_UNARY or len(ins) == 1:
                out = ins[0]
            else:
                b = _broadcast(ins[0], ins[1])
                if b is None:
                    raise ArchiveError(f"{sw} ({s.op}) reads shapes {list(ins[0])} and {list(ins[1])}, which do "
                                       "not broadcast")
                out = b
            if math.prod(out) > limit:
                raise ArchiveError(f"{sw} makes a {list(out)} tensor, larger than the weights it reads and the "
                                   f"result {list(self.shape)}")
            shapes.append(out)
        if shapes[-1] != self.shape:
            raise ArchiveError(f"{where} computes a {list(shapes[-1])} tensor; its shape says {list(self.shape)}")


# The kinds of ``packed_weights`` records this reader computes.
PACKED_KINDS = ("onednn_conv", "onednn_linear")
# The largest size of a linear's weight or input a packed-weight record may name (a oneDNN dimension).
MAX_LINEAR_SIZE = 2**31 - 1


@dataclass(frozen=True)
class PackedWeightRecord:
    """How the loader computes, from the weight a constant of a CPU entry's code names, the tensor it binds that
    constant to, in oneDNN's layout for the serving host: a convolution weight (``kind`` ``onednn_conv``) for
    the convolution's ``padding``, ``stride``, ``dilation``, ``groups`` and ``input_size``, or a linear's weight
    [out, in] (``onednn_linear``, format version 7) for an input of ``rows`` rows. An older reader binds the
    plain weight, which the code also takes (same outputs, slower)."""

    kind: str
    padding: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    input_size: tuple[int, ...] = ()
    rows: int = 0

    def to_json(self) -> dict:
        if self.kind == "onednn_linear":
            return {"kind": self.kind, "rows": self.rows}
        return {"kind": self.kind, "padding": list(self.padding), "stride": list(self.stride),
                "dilation": list(self.dilation), "groups": self.groups, "input_size": list(self.input_size)}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "PackedWeightRecord":
        if not isinstance(obj, dict):
            raise ArchiveError(f"{where} must be a JSON object")
        kind = field_of(obj, "kind", str, where)
        if kind not in PACKED_KINDS:
            raise ArchiveError(f"{where}.kind is {kind!r}; this reader knows {', '.join(PACKED_KINDS)}")
        if kind == "onednn_linear":
            rows = field_of(obj, "rows", int, where)
            if not 1 <= rows <= MAX_LINEAR_SIZE:
                raise ArchiveError(f"{where}.rows is {rows}; expected 1 to {MAX_LINEAR_SIZE}")
            return cls(kind=kind, rows=rows)

        def ints(key: str, n: int, low: int) -> tuple[int, ...]:
            v = field_of(obj, key, list, where)
            if len(v) != n or not all(type(x) is int and x >= low for x in v):
                raise ArchiveError(f"{where}.{key} is {v!r}; expected {n} integers of at least {low}")
            return tuple(v)

        groups = field_of(obj, "groups", int, where)
        return cls(kind=kind, padding=ints("padding", 2, 0), stride=ints("stride", 2, 1),
                   dilation=ints("dilation", 2, 1), groups=groups, input_size=ints("input_size", 4, 1))

    def check_weight(self, weight: "WeightRecord | None", wname: str, where: str) -> None:
        """Check that ``weight`` (the record of the weight ``wname`` the constant names; None where it is no
        weight) is one this record can pack: a float32 convolution weight ``[out, in/groups, h, w]`` for it, or a
        float32 linear weight ``[out, in]`` of sizes oneDNN can describe."""
        shape = tuple(getattr(weight, "shape", ()) or ())
        dtype = getattr(weight, "dtype", None)
        if self.kind == "onednn_linear":
            if dtype != "float32" or len(shape) != 2 or not all(1 <= d <= MAX_LINEAR_SIZE for d in shape):
                raise ArchiveError(f"{where} packs weight {wname!r} ({dtype} {list(shape)}) for a linear; expected "
                                   f"a float32 weight [out, in] of sizes 1 to {MAX_LINEAR_SIZE}")
            return
        if dtype != "float32" or len(shape) != 4 or self.groups < 1 \
                or shape[0] % self.groups or shape[1] * self.groups != self.input_size[1]:
            raise ArchiveError(f"{where} packs weight {wname!r} ({dtype} {list(shape)}) for a convolution of "
                               f"{self.groups} groups on an input of {list(self.input_size)}; expected a float32 "
                               "weight [out, in/groups, h, w] that fits it")
        # Sizes oneDNN can describe (torch 2.11's oneDNN divides by zero on some larger ones instead of refusing
        # them), and a kernel that fits the padded input.
        fits = all(d < 2**31 for d in self.input_size) and math.prod(self.input_size) <= 2**40 \
            and all(v <= 2**20 for v in self.padding + self.stride + self.dilation) \
            and all(size + 2 * p >= d * (k - 1) + 1 for size, k, p, d in
                    zip(self.input_size[2:], shape[2:], self.padding, self.dilation))
        if not fits:
            raise ArchiveError(f"{where} packs weight {wname!r} ({list(shape)}) for an input of "
                               f"{list(self.input_size)} with padding {list(self.padding)}, stride "
                               f"{list(self.stride)} and dilation {list(self.dilation)}; expected input sizes below "
                               "2**31 (2**40 elements in all), at most 2**20 for the others, and a kernel that "
                               "fits the padded input")


def _cpu_constant_records(obj: dict, key: str, where: str, device: str, constants: dict, parse, what: str,
                          unknown: str) -> dict:
    """An entry's records under ``key`` (the code's constant name -> ``parse``d record; empty where it has
    none), checked on their own and against the entry's device (CPU entries only) and constants."""
    if key not in obj:
        return {}
    records = field_of(obj, key, dict, where)
    where = f"{where}.{key}"
    if device != "cpu":
        raise ArchiveError(f"{where} is on a {device} entry; only CPU entries have {what}")
    out = {}
    for cname, r in records.items():
        if cname not in constants:
            raise ArchiveError(f"{where}[{cname!r}] names {unknown}")
        out[cname] = parse(r, f"{where}[{cname!r}]")
    return out


def packed_weights_from_json(obj: dict, where: str, device: str, constants: dict) -> dict[str, PackedWeightRecord]:
    """An entry's ``packed_weights`` (see ``_cpu_constant_records``). That each names a weight (not a state
    buffer) it can pack, ``Manifest.from_json`` checks (``check_packed_weights``)."""
    return _cpu_constant_records(obj, "packed_weights", where, device, constants, PackedWeightRecord.from_json,
                                 "packed weights", "a constant that is not one of the entry's weight constants")


def folded_weights_from_json(obj: dict, where: str, device: str, constants: dict) -> dict[str, FoldRecord]:
    """An entry's ``folded_weights`` (see ``_cpu_constant_records``). That their steps read the pack's float32
    weights and give the shapes they say, ``Manifest.from_json`` checks (``check_folded_weights``)."""
    return _cpu_constant_records(obj, "folded_weights", where, device, constants, FoldRecord.from_json,
                                 "folded weights", "a constant the entry's code does not have")


def check_folded_weights(record: "EntryRecord", where: str, weights: dict, state_names: set) -> None:
    """Check an entry's folded weights against the pack: a folded constant names no weight or state buffer
    (the loader computes it), and each record reads float32 weights of the pack (no state) and gives its shape."""
    for cname, f in record.folded_weights.items():
        rw = f"{where}.folded_weights[{cname!r}]"
        wname = record.constants[cname]
        if wname in weights or wname in state_names:
            raise ArchiveError(f"{rw} is folded at load, but the entry's constants say it is {wname!r}, a stored "
                               "weight or state buffer; a constant is one or the other")
        f.check_shapes({n: w for n, w in weights.items() if n not in state_names}, rw)


def check_packed_weights(record: "EntryRecord", where: str, weights: dict, state_names: set) -> None:
    """Check an entry's packed weights against the pack: each constant names a weight (not a state buffer), or
    a folded constant, that its record can pack. ``weights``: the pack's weight records by name."""
    for cname, p in record.packed_weights.items():
        rw = f"{where}.packed_weights[{cname!r}]"
        wname = record.constants[cname]
        if wname in state_names:
            raise ArchiveError(f"{rw} names a constant that is not one of the entry's weight constants")
        folded = record.folded_weights.get(cname)
        target = WeightRecord(name=wname, blob=None, dtype="float32", shape=folded.shape) if folded is not None \
            else weights.get(wname)
        p.check_weight(target, wname, rw)


@dataclass(frozen=True)
class EntryRecord:
    """One entry: a compiled specialization's guards, its device, its native code (``library``, and the
    proxy executor's description ``extern_kernels`` where the code needs one), the weight or state buffer
    behind each of the code's constants, and for a CUDA entry its ``cuda`` record. ``kernels`` and
    ``sources`` (names of generated kernels and of source blobs) are None where an old manifest lacks them."""

    name: str
    device: str
    library: str
    constants: dict  # the code's constant name -> weight or state buffer name
    guards: Guards
    kernels: tuple[str, ...] | None = ()
    sources: tuple[str, ...] | None = ()
    extern_kernels: str | None = None
    cuda: CudaMeta | None = None
    # The code's constant name -> how the loader packs the weight it names (``PackedWeightRecord``; CPU only).
    packed_weights: dict = field(default_factory=dict)
    # The code's constant name -> how the loader folds it from stored weights (``FoldRecord``; CPU only). Its
    # ``constants`` entry names no weight: the code's own name for the folded tensor.
    folded_weights: dict = field(default_factory=dict)

    def weight_names(self) -> set[str]:
        """The stored weights and state buffers the entry reads: through its constants and its folds."""
        return {w for c, w in self.constants.items() if c not in self.folded_weights} | \
            {n for f in self.folded_weights.values() for n in f.weight_names}

    def to_json(self) -> dict:
        out = {"name": self.name, "device": self.device, "library": self.library, "constants": dict(self.constants),
               **({} if self.kernels is None else {"kernels": list(self.kernels)}),
               **({} if self.sources is None else {"sources": list(self.sources)}), **self.guards.to_json()}
        if self.extern_kernels is not None:
            out["extern_kernels"] = self.extern_kernels
        if self.cuda is not None:
            out["cuda"] = self.cuda.to_json()
        if self.packed_weights:
            out["packed_weights"] = {c: p.to_json() for c, p in self.packed_weights.items()}
        if self.folded_weights:
            out["folded_weights"] = {c: f.to_json() for c, f in self.folded_weights.items()}
        return out

    @classmethod
    def from_json(cls, obj: Any, where: str, blob_sizes: dict[str, int] | None = None) -> "EntryRecord":
        """Check the entry's record. ``blob_sizes`` (blob name -> size) also checks the blobs it names."""
        if not isinstance(obj, dict):
            raise ArchiveError(f"{where} must be a JSON object")
        name = field_of(obj, "name", str, where)
        inputs = InputGuards.from_json(obj, where)
        grad_mode = field_of(obj, "grad_mode", bool, where) if "grad_mode" in obj else None
        lists = {}
        for key in ("sources", "kernels"):
            lists[key] = None
            if key in obj:
                values = field_of(obj, key, list, where)
                if not all(isinstance(v, str) for v in values):
                    raise ArchiveError(f"{where}.{key} must be a list of strings")
                lists[key] = tuple(values)
        device = field_of(obj, "device", str, where)
        if device not in DEVICES:
            raise ArchiveError(f"{where} is a {device} entry; this runtime serves {', '.join(DEVICES)}")
        for j, leaf in enumerate(inputs.leaves):
            # The native code reads its inputs on the entry's device: a guard that admits another device
            # would hand it pointers it cannot use.
            if isinstance(leaf, TensorGuard) and leaf.device != device:
                raise ArchiveError(f"{where}.leaves[{j}].device is {leaf.device!r}, but the entry is a {device} "
                                   f"entry (its tensor guards must say {device!r})")
        outputs, output_leaves = _output_leaves(obj, where)
        constants = field_of(obj, "constants", dict, where)
        for cname, wname in constants.items():
            if not isinstance(wname, str):
                raise ArchiveError(f"{where} constant {cname!r} refers to weight {wname!r}, which the pack lacks")
        library = field_of(obj, "library", str, where)
        _known_blob(library, blob_sizes)
        extern = field_of(obj, "extern_kernels", str, where) if "extern_kernels" in obj else None
        if extern is not None:
            _known_blob(extern, blob_sizes)
        cuda = CudaMeta.from_json(field_of(obj, "cuda", dict, where), f"{where}.cuda", blob_sizes) \
            if device == "cuda" else None
        packed = packed_weights_from_json(obj, where, device, constants)
        folded = folded_weights_from_json(obj, where, device, constants)
        guards = Guards(inputs.inputs, inputs.leaves, inputs.symbols, inputs.param_names, grad_mode, outputs,
                        output_leaves)
        return cls(name=name, device=device, library=library, constants=dict(constants), guards=guards,
                   kernels=lists["kernels"], sources=lists["sources"], extern_kernels=extern, cuda=cuda,
                   packed_weights=packed, folded_weights=folded)


# ---------------------------------------------------------------------------------------------------
# Methods

@dataclass(frozen=True)
class MethodRecord:
    """One method of a pack (``pkg.NAME(...)``): the entries of the one entry table that serve it, tried in
    this order, its example inputs and its cache-position rules. Weights and state are the pack's, shared by
    every method; ``writes`` names the state buffers the method's code writes (the others it may read). A
    pack without ``methods`` has one method, ``forward``: every entry, the manifest's ``example`` and
    ``state.positions``, writing every state buffer."""

    name: str
    entries: tuple[int, ...]
    example: ExampleRecord | None = None
    positions: tuple[PositionRule, ...] = ()
    writes: tuple[str, ...] = ()

    def to_json(self) -> dict:
        out: dict = {"name": self.name, "entries": list(self.entries),
                     "positions": [p.to_json() for p in self.positions], "writes": list(self.writes)}
        if self.example is not None:
            out["example"] = self.example.to_json()
        return out

    @classmethod
    def from_json(cls, obj: Any, where: str, n_entries: int) -> "MethodRecord":
        name = field_of(obj, "name", str, where)
        if not METHOD_NAME.match(name):
            raise ArchiveError(f"{where}.name is {name!r}; expected a Python identifier of at most 128 characters")
        entries = field_of(obj, "entries", list, where)
        if not entries:
            raise ArchiveError(f"{where}.entries is empty; expected the indices of at least one entry")
        for k, i in enumerate(entries):
            if type(i) is not int or not 0 <= i < n_entries:
                raise ArchiveError(f"{where}.entries[{k}] is {i!r}; expected an index into manifest.entries "
                                   f"(0..{n_entries - 1})")
        example = _example(obj.get("example"), f"{where}.example")
        positions = tuple(PositionRule.from_json(r, f"{where}.positions[{k}]")
                          for k, r in enumerate(field_of(obj, "positions", list, where)))
        writes = field_of(obj, "writes", list, where)
        for k, w in enumerate(writes):
            if not isinstance(w, str):
                raise ArchiveError(f"{where}.writes[{k}] must be a string (a state buffer's name), found "
                                   f"{type(w).__name__}")
        return cls(name=name, entries=tuple(entries), example=example, positions=positions, writes=tuple(writes))


def _methods(obj: dict, version: int, n_entries: int) -> tuple[MethodRecord, ...]:
    """The manifest's ``methods``, checked: a version-5 feature; each entry serves exactly one method; the
    example and cache-position rules live in the methods, not at the top level."""
    if "methods" not in obj:
        return ()
    if version < V5_FORMAT_VERSION:
        raise ArchiveError(f"manifest.methods is several methods, which format version {V5_FORMAT_VERSION} "
                           f"introduced, but the manifest says format version {version}; the pack was written by "
                           "a broken or modified writer")
    methods_json = field_of(obj, "methods", list, "manifest")
    if not methods_json:
        raise ArchiveError("manifest.methods is empty; a pack of one forward has no methods field")
    methods = tuple(MethodRecord.from_json(r, f"manifest.methods[{k}]", n_entries) for k, r in enumerate(methods_json))
    owner: dict[int, str] = {}
    names: set[str] = set()
    for k, m in enumerate(methods):
        if m.name in names:
            raise ArchiveError(f"manifest.methods[{k}].name {m.name!r} is also the name of an earlier method; "
                               "method names must be unique")
        names.add(m.name)
        for i in m.entries:
            if i in owner:
                raise ArchiveError(f"manifest.methods[{k}] ({m.name!r}) lists entry {i}, which method {owner[i]!r} "
                                   "also lists; each entry serves exactly one method")
            owner[i] = m.name
    unused = [i for i in range(n_entries) if i not in owner]
    if unused:
        raise ArchiveError(f"manifest.entries {unused} belong to no method; expected every entry in exactly one of "
                           f"manifest.methods ({', '.join(m.name for m in methods)})")
    if obj.get("example") is not None:
        raise ArchiveError("manifest.example is present in a pack with methods; expected each method's example in "
                           "manifest.methods[k].example, none at the top level")
    state = obj.get("state")
    if isinstance(state, dict) and state.get("positions"):
        raise ArchiveError("manifest.state.positions is not empty in a pack with methods; expected each method's "
                           "cache-position rules in manifest.methods[k].positions")
    buffers = state.get("buffers") if isinstance(state, dict) else None
    state_names = {_field(b, "name") for b in _items(buffers)}
    for k, m in enumerate(methods):
        if m.positions and "state" not in obj:
            raise ArchiveError(f"manifest.methods[{k}].positions is not empty in a pack without state; "
                               "expected no cache-position rules where there is no cache")
        unknown = [w for w in m.writes if w not in state_names]
        if unknown:
            raise ArchiveError(f"manifest.methods[{k}].writes names {unknown[0]!r}, which is not a state buffer; "
                               f"expected names from manifest.state.buffers ({len(state_names)} buffers)")
    return methods


# ---------------------------------------------------------------------------------------------------
# The manifest

@dataclass(frozen=True)
class Manifest:
    """The parsed, checked manifest.

    The writer builds one with ``format_version=0`` and no ``blobs``; ``package.write_archive`` fills both in
    (``with_blobs``) and writes ``to_json()``. ``producer``, ``target`` and ``options`` are the build's records
    (``target``'s fields that host checks read are checked); ``frozen`` says how the model was captured (None
    where an old manifest lacks it)."""

    format_version: int
    producer: dict
    target: dict
    options: dict
    weights: tuple[WeightRecord, ...]
    entries: tuple[EntryRecord, ...]
    example: ExampleRecord | None
    blobs: tuple[BlobRecord, ...]
    state: tuple[StateRecord, ...] = ()
    positions: tuple[PositionRule, ...] = ()
    # The manifest's ``methods`` (empty for a pack without them: see ``method_table``).
    methods: tuple[MethodRecord, ...] = ()
    unread_weights: tuple[str, ...] = ()
    external_weights: ExternalWeights | None = None
    frozen: dict | None = None
    # The JSON the manifest was parsed from ({} for one the writer built): what ``aotpack diff`` compares.
    raw: dict = field(repr=False, compare=False, default_factory=dict)
    # name -> record: a table may list up to MAX_BLOBS blobs, and every weight looks its blob up.
    _by_name: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {b.name: b for b in self.blobs})

    def method_table(self) -> tuple[MethodRecord, ...]:
        """The pack's methods: those it records, or the one ``forward`` of a pack without ``methods``."""
        if self.methods:
            return self.methods
        return (MethodRecord(name=DEFAULT_METHOD, entries=tuple(range(len(self.entries))), example=self.example,
                             positions=self.positions, writes=tuple(r.name for r in self.state)),)

    def example_where(self, k: int) -> str:
        """Where method ``k``'s example record lies in the manifest, for messages."""
        return f"manifest.methods[{k}].example" if self.methods else "manifest.example"

    def blob(self, name: str) -> BlobRecord:
        try:
            return self._by_name[name]
        except (KeyError, TypeError):  # TypeError: a name from the manifest that is not a string
            raise ArchiveError(f"manifest refers to blob {name!r}, which the blob table lacks") from None

    def with_blobs(self, blobs: tuple[BlobRecord, ...], format_version: int) -> "Manifest":
        """This manifest with its blob table and format version (the writer's last step)."""
        return dataclasses.replace(self, blobs=tuple(blobs), format_version=format_version)

    @classmethod
    def from_json(cls, obj: Any) -> "Manifest":
        where = "manifest"
        if not isinstance(obj, dict):
            raise ArchiveError("manifest must be a JSON object")
        if obj.get("format") != "aotpack":
            raise ArchiveError("manifest field 'format' is not 'aotpack'")
        version = field_of(obj, "format_version", int, where)
        blobs_json = field_of(obj, "blobs", list, where)
        if len(blobs_json) > MAX_BLOBS:
            raise ArchiveError(f"manifest lists {len(blobs_json)} blobs; at most {MAX_BLOBS} are allowed")
        blobs = tuple(BlobRecord.from_json(b, f"manifest.blobs[{i}]") for i, b in enumerate(blobs_json))
        names: set[str] = set()
        for b in blobs:
            if b.name in names:
                raise ArchiveError(f"manifest lists blob {b.name!r} twice")
            names.add(b.name)
        weights = tuple(WeightRecord.from_json(w, f"manifest.weights[{i}]")
                        for i, w in enumerate(field_of(obj, "weights", list, where)))
        entries = field_of(obj, "entries", list, where)
        if not entries:
            raise ArchiveError("manifest lists no entries")
        for i, e in enumerate(entries):
            if not isinstance(e, dict):
                raise ArchiveError(f"manifest.entries[{i}] must be a JSON object")
            if e.get("device") == "cuda" and version < CUDA_FORMAT_VERSION:
                raise ArchiveError(f"manifest.entries[{i}] is a CUDA entry, which format version "
                                   f"{CUDA_FORMAT_VERSION} introduced, but the manifest says format version "
                                   f"{version}; the pack was written by a broken or modified writer")
        newer = v4_features(obj)
        if newer and version < BREADTH_FORMAT_VERSION:
            raise ArchiveError(f"the manifest uses {newer[0]}, which format version {BREADTH_FORMAT_VERSION} "
                               f"introduced, but it says format version {version}; the pack was written by a "
                               "broken or modified writer")
        for features, first in ((v6_features, V6_FORMAT_VERSION), (v7_features, V7_FORMAT_VERSION)):
            newer = features(obj)
            if newer and version < first:
                raise ArchiveError(f"the manifest uses {newer[0]}, which format version {first} introduced, but it "
                                   f"says format version {version}; the pack was written by a broken or modified "
                                   "writer")
        if "external_weights" in obj and version < V5_FORMAT_VERSION:
            raise ArchiveError(f"the manifest keeps its weights beside the pack (external_weights), which format "
                               f"version {V5_FORMAT_VERSION} introduced, but it says format version {version}; the "
                               "pack was written by a broken or modified writer")
        methods = _methods(obj, version, len(entries))
        unread: tuple[str, ...] = ()
        if "unread_weights" in obj:
            unread = tuple(field_of(obj, "unread_weights", list, where))
            if not unread or not all(isinstance(n, str) for n in unread):
                raise ArchiveError("manifest.unread_weights must be a non-empty list of strings")
        external = ExternalWeights.from_json(obj["external_weights"], "manifest.external_weights") \
            if "external_weights" in obj else None
        example_json = obj.get("example")
        if example_json is not None and not isinstance(example_json, dict):
            raise ArchiveError("manifest.example must be a JSON object or absent")
        example = _example(example_json, "manifest.example")
        frozen = field_of(obj, "frozen", dict, where) if "frozen" in obj else None
        state, positions = (), ()
        if "state" in obj:
            if version < STATE_FORMAT_VERSION:
                raise ArchiveError(f"manifest.state is state, which format version {STATE_FORMAT_VERSION} "
                                   f"introduced, but the manifest says format version {version}; the pack was "
                                   "written by a broken or modified writer")
            state_json = field_of(obj, "state", dict, where)
            state = tuple(StateRecord.from_json(r, f"manifest.state.buffers[{i}]")
                          for i, r in enumerate(field_of(state_json, "buffers", list, "manifest.state")))
            positions = tuple(PositionRule.from_json(r, f"manifest.state.positions[{i}]")
                              for i, r in enumerate(field_of(state_json, "positions", list, "manifest.state")))
            if not state:
                raise ArchiveError("manifest.state lists no buffers; a pack without state has no state field")
        blob_sizes = {b.name: b.size for b in blobs}
        m = cls(format_version=version, producer=field_of(obj, "producer", dict, where),
                target=_target(field_of(obj, "target", dict, where)), options=field_of(obj, "options", dict, where),
                weights=weights, entries=(), example=example, blobs=blobs, state=state,
                positions=positions, methods=methods, unread_weights=unread,
                external_weights=external, frozen=frozen, raw=obj)
        by_name = {w.name: w for w in weights}
        for w in weights:
            if w.same_as is not None:
                target = by_name.get(w.same_as)
                if external is None:
                    raise ArchiveError(f"weight {w.name!r} says same_as {w.same_as!r}, which only a pack that keeps "
                                       "its weights beside it writes (records of one blob are one tensor)")
                if target is None or target is w or target.same_as is not None \
                        or (target.dtype, target.shape) != (w.dtype, w.shape):
                    found = "no such weight" if target is None else f"{target.dtype}{list(target.shape)}" + (
                        f", same_as {target.same_as!r}" if target.same_as else "")
                    raise ArchiveError(f"weight {w.name!r} ({w.dtype}{list(w.shape)}) says same_as {w.same_as!r}, "
                                       "which must be another weight of its dtype and shape that says no same_as "
                                       f"(found: {found})")
            if external is not None:
                if w.blob is not None:
                    raise ArchiveError(f"weight {w.name!r} names blob {w.blob!r}, but the pack keeps its weights in "
                                       f"{external.file!r}; a weight is in one place")
                continue
            if w.blob is None:
                raise ArchiveError(f"weight {w.name!r} names no blob, and the pack has no external weights file")
            if w.blob not in names:
                raise ArchiveError(f"weight {w.name!r} refers to blob {w.blob!r}, which the blob table lacks")
            if m.blob(w.blob).size != w.nbytes:
                raise ArchiveError(f"weight {w.name!r} is {w.dtype}{list(w.shape)} ({w.nbytes} bytes) but its "
                                   f"blob holds {m.blob(w.blob).size} bytes")
        seen = {w.name for w in weights}
        for r in state:
            if r.name in seen:
                raise ArchiveError(f"manifest.state names {r.name!r}, which is also a weight or another state "
                                   "buffer; names must be unique")
            seen.add(r.name)
            if r.init != "zeros" and m.blob(r.init).size != r.nbytes:
                raise ArchiveError(f"state {r.name!r} is {r.dtype}{list(r.shape)} ({r.nbytes} bytes) but its "
                                   f"initial value {r.init!r} holds {m.blob(r.init).size} bytes")
        # Every name new weights may carry means one thing: a weight, its alias, a state buffer or unread.
        for other in [a for w in weights for a in w.aliases] + list(unread):
            if other in seen:
                raise ArchiveError(f"manifest names {other!r} twice (as a weight, an alias, a state buffer or an "
                                   "unread weight); names must be unique")
            seen.add(other)
        # The entries and the examples, each against the pack: what ``load`` relies on before it loads anything.
        weight_names = {w.name for w in weights}
        state_names = {r.name for r in state}
        records = []
        for i, e in enumerate(entries):
            ew = f"manifest.entries[{i}]"
            record = EntryRecord.from_json(e, ew, blob_sizes)
            check_folded_weights(record, ew, by_name, state_names)
            for cname, wname in record.constants.items():
                if cname not in record.folded_weights and wname not in weight_names and wname not in state_names:
                    raise ArchiveError(f"{ew} constant {cname!r} refers to weight {wname!r}, which the pack lacks")
            check_packed_weights(record, ew, by_name, state_names)
            records.append(record)
        m = dataclasses.replace(m, entries=tuple(records))
        for k, method in enumerate(m.method_table()):
            for i, leaf in enumerate(method.example.leaves if method.example is not None else ()):
                if leaf.kind == "tensor" and m.blob(leaf.blob).size != leaf.nbytes:
                    raise ArchiveError(f"{m.example_where(k)}.leaves[{i}] is {leaf.dtype}{list(leaf.shape)} but its "
                                       f"blob holds {m.blob(leaf.blob).size} bytes")
        return m

    def to_json(self) -> dict:
        """The manifest as the format writes it (``format.canonical_json`` of this is the manifest's bytes)."""
        out = {"format": "aotpack", "format_version": self.format_version, "producer": self.producer,
               "target": self.target, "options": self.options,
               "weights": [w.to_json() for w in self.weights], "entries": [e.to_json() for e in self.entries],
               "blobs": [b.to_json() for b in self.blobs]}
        if not self.methods:
            out["example"] = None if self.example is None else self.example.to_json()
        if self.frozen is not None:
            out["frozen"] = self.frozen
        if self.unread_weights:
            out["unread_weights"] = list(self.unread_weights)
        if self.external_weights is not None:
            out["external_weights"] = self.external_weights.to_json()
        if self.state:
            out["state"] = {"buffers": [r.to_json() for r in self.state],
                            "positions": [p.to_json() for p in self.positions]}
        if self.methods:
            out["methods"] = [m.to_json() for m in self.methods]
        return out


def _target(target: dict) -> dict:
    """Check the types of the documented target fields, which host checks read (each may be absent)."""
    for key in ("machine", "cpu_isa", "torch_series"):
        if key in target:
            field_of(target, key, str, "manifest.target")
    if "cpu_flags" in target and not all(isinstance(f, str) for f in field_of(target, "cpu_flags", list,
                                                                             "manifest.target")):
        raise ArchiveError("manifest.target.cpu_flags must be a list of strings")
    if target.get("cpu_isa") == "native" and "cpu_flags" not in target:
        # Without the build host's flags no CPU could be checked: the code might use any instruction.
        raise ArchiveError("manifest.target.cpu_isa is 'native' but manifest.target.cpu_flags is absent; a native "
                           "build records the CPU flags of its build host (rebuild the pack)")
    return target
