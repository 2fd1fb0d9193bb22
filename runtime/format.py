"""The aotpack archive format: names, version constants, header layout and the manifest schema.

The runtime owns the format; the build side's writer imports these definitions. ``docs/FORMAT.md`` is the
written spec and its examples are tested against this module.

Changelog of ``FORMAT_VERSION`` (readers accept ``MIN_READ_VERSION..FORMAT_VERSION``):
  1 (2026-11): first version: header, JSON manifest, 64-byte aligned blobs, sha256 per blob.
  2 (2026-11): CUDA entries: entry.cuda with per-kernel blobs and architectures. A pack with no CUDA entry
               is still written as version 1 (``version_for``), so older readers keep loading CPU packs.
  3 (2026-12): state: buffers the model writes in place (an LLM's KV cache), recorded in ``state`` apart
               from the weights, with their initial values; entries' ``constants`` may name them. A pack
               is written as the oldest version that can describe it (``version_for``).
  4 (2026-12): models as torch.export gives them: symbols without an upper bound (``[min, null]``); sizes
               and strides that are polynomials over the symbols (derived dims ``2*d + 1``); tensor inputs the
               pack writes into (``"mutated": true``); outputs that are Python numbers (output leaves of kind
               ``scalar``); the extern-kernel description of ATen ops that run through AOTInductor's proxy
               executor (``entry.extern_kernels``, a blob); the dtypes complex32, uint16, uint32, uint64 and
               four float8 formats. A pack that uses none of these keeps the older version (``version_for``).
  5 (2026-12): several methods in one pack (``methods``: each names its entries of the one entry table, with
               its own example and cache-position rules; weights and state stay shared). A pack of one
               ``forward`` has no ``methods`` and keeps its older version.
               Weights apart from code: weights kept in a safetensors file beside the pack, pinned by its
               sha256 (``external_weights``; its weight records then name no blob, and those that would share
               one say ``same_as``). Weight records may also say
               what new weights are checked against, at any version (an older reader ignores these keys and
               loads the pack as before): a weight's other ``state_dict`` names (``aliases``: tied weights),
               stored tensors that are not in the model's ``state_dict`` (``"state_dict": false``: lifted
               constants, non-persistent buffers), and the ``state_dict`` names the code never reads
               (``unread_weights``).
               A CPU entry may say, at any version, which of its constants the loader binds to a weight
               packed for oneDNN on the serving host (``packed_weights``: an older reader binds the plain
               weight, which the code also takes, and computes the same outputs more slowly).

May not: import torch or any aotpack module but ``errors``: the writer and the reader both import it.
"""
from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any

from .errors import ArchiveError

MAGIC = b"AOTPACK\x00"
FORMAT_VERSION = 5
MIN_READ_VERSION = 1
# The first format version that may hold CUDA entries.
CUDA_FORMAT_VERSION = 2
# The first format version that may hold state.
STATE_FORMAT_VERSION = 3
# The first format version that may hold the features of version 4 (see the changelog and ``v4_features``).
BREADTH_FORMAT_VERSION = 4
# The first format version that may hold the features of version 5 (see the changelog and ``v5_features``).
V5_FORMAT_VERSION = 5
# A method's name: a Python identifier (``pkg.NAME(...)``), at most 128 characters.
METHOD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# The method a pack without ``methods`` has: all its entries.
DEFAULT_METHOD = "forward"
# magic, format version, flags, manifest length, manifest sha256
HEADER = struct.Struct("<8sIIQ32s")
HEADER_SIZE = HEADER.size  # 56
ALIGN = 64
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_BLOBS = 100_000
MAX_BLOB_BYTES = 1 << 40
# A zstd blob may expand to at most MAX_ZSTD_RATIO times its stored size (or to MAX_ZSTD_FLOOR bytes, if more):
# checking a blob costs time in proportion to what it declares, so a small file must not declare terabytes. No
# zstd writer gets near the ratio (a block of zeros, zstd's best case, is about 32,000-fold), so no pack that an
# earlier aotpack wrote is refused by it.
MAX_ZSTD_RATIO = 1 << 16
MAX_ZSTD_FLOOR = 64 << 20
# Longest integer literal a manifest may hold: 640 is the lowest limit Python lets a process set on
# int/str conversion (sys.set_int_max_str_digits), so reading one never trips the interpreter's own limit.
MAX_INT_DIGITS = 640
BLOB_NAME = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
COMPRESSIONS = ("none", "zstd")
DEVICES = ("cpu", "cuda")
CPU_ISAS = ("x86-64", "avx2", "avx512", "native")

# The one table of element types: the format's name of each dtype (torch's name, ``torch.<name>``) and its
# size in bytes. The reader, the writer and the build side's guards all use it; a dtype not here is refused at
# build time. ``DTYPE_VERSIONS`` names the format version that introduced a dtype (1 when absent).
DTYPES: dict[str, int] = {
    "float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "int8": 1, "int16": 2, "int32": 4, "int64": 8,
    "uint8": 1, "bool": 1, "complex64": 8, "complex128": 16,
    "complex32": 4, "uint16": 2, "uint32": 4, "uint64": 8,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1,
}
DTYPE_VERSIONS = {name: BREADTH_FORMAT_VERSION for name in (
    "complex32", "uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")}


def _items(value: Any) -> list:
    """``value`` when it is a JSON list, else no items: the version scan runs before the fields' own checks,
    so it reads what it finds without trusting its shape."""
    return value if isinstance(value, list) else []


def _field(obj: Any, key: str) -> Any:
    """``obj[key]`` when ``obj`` is a JSON object, else None."""
    return obj.get(key) if isinstance(obj, dict) else None


def v4_features(manifest: dict) -> list[str]:
    """What in ``manifest`` needs format version 4, in words (empty when nothing does). The writer picks the
    version from it and the reader refuses a manifest that uses a feature its version lacks."""
    found: list[str] = []

    def note(what: str) -> None:
        if what not in found:
            found.append(what)

    def dtype(d: Any) -> None:
        if isinstance(d, str) and d in DTYPE_VERSIONS:
            note(f"the dtype {d}")

    for w in _items(manifest.get("weights")) + _items(_field(manifest.get("state"), "buffers")):
        dtype(_field(w, "dtype"))
    for leaf in _items(_field(manifest.get("example"), "leaves")):
        dtype(_field(leaf, "dtype"))
    for e in _items(manifest.get("entries")):
        if not isinstance(e, dict):
            continue
        if "extern_kernels" in e:
            note("ATen ops run through the proxy executor (extern_kernels)")
        symbols = e.get("symbols")
        if isinstance(symbols, dict) and any(isinstance(r, list) and len(r) == 2 and r[1] is None
                                             for r in symbols.values()):
            note("a symbol without an upper bound")
        for leaf in _items(e.get("leaves")):
            if not isinstance(leaf, dict):
                continue
            dtype(leaf.get("dtype"))
            if leaf.get("mutated") is not None:
                note("an input the pack writes into (mutated)")
            if any(isinstance(s, list) for s in _items(leaf.get("sizes"))) or \
                    any(isinstance(s, list) and s and isinstance(s[0], list) for s in _items(leaf.get("strides"))):
                note("a size or stride that is a polynomial over the symbols")
        for out in _items(e.get("output_leaves")):
            if _field(out, "kind") == "scalar":
                note("an output that is a Python number (scalar)")
    return found


def v5_features(manifest: dict) -> list[str]:
    """What in ``manifest`` needs format version 5, in words (empty when nothing does), as ``v4_features``."""
    found: list[str] = []
    if "methods" in manifest:
        found.append("several methods (methods)")
    if "external_weights" in manifest:
        found.append("weights in a file beside the pack (external_weights)")
    return found


def version_for(manifest: dict) -> int:
    """The format version a pack with this manifest is written as: the oldest that can describe it, so a
    CPU-only pack without state that needs nothing newer stays readable by version-1 readers."""
    if v5_features(manifest):
        return V5_FORMAT_VERSION
    if v4_features(manifest):
        return BREADTH_FORMAT_VERSION
    if manifest.get("state"):
        return STATE_FORMAT_VERSION
    if any(_field(e, "device") == "cuda" for e in _items(manifest.get("entries"))):
        return CUDA_FORMAT_VERSION
    return MIN_READ_VERSION


def align(n: int) -> int:
    """Round ``n`` up to the blob alignment."""
    return (n + ALIGN - 1) // ALIGN * ALIGN


def canonical_json(obj: Any) -> bytes:
    """Serialize ``obj`` the one way the format allows: sorted keys, no whitespace, no NaN, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False,
                      ensure_ascii=False).encode("utf-8")


def parse_json(data: bytes, what: str = "manifest") -> Any:
    """Parse strict JSON: UTF-8, no duplicate keys, no NaN, Infinity or out-of-range numbers, integers of at
    most ``MAX_INT_DIGITS`` digits. Every failure is an ArchiveError naming ``what`` (the manifest, a
    signature)."""
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
        out: dict = {}
        for key, value in pairs:
            if key in out:
                raise ArchiveError(f"{what} has a duplicate key {key!r}")
            out[key] = value
        return out

    def no_constants(name: str) -> Any:
        raise ArchiveError(f"{what} holds the non-JSON number {name}")

    def finite_float(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):  # 1e999 parses to inf, which no JSON writer can write back
            raise ArchiveError(f"{what} holds the number {text[:40]}, which is out of range")
        return value

    def bounded_int(text: str) -> int:
        digits = len(text.lstrip("-"))
        if digits > MAX_INT_DIGITS:
            raise ArchiveError(f"{what} holds an integer of {digits} digits (at most {MAX_INT_DIGITS})")
        return int(text)

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ArchiveError(f"{what} is not UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constants,
                          parse_float=finite_float, parse_int=bounded_int)
    except json.JSONDecodeError as e:
        raise ArchiveError(f"{what} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise ArchiveError(f"{what} is nested too deeply") from None


# ---------------------------------------------------------------------------------------------------
# Checked access to parsed JSON: every field is checked for presence and type before use.

def field_of(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(obj, dict):
        raise ArchiveError(f"{where} must be a JSON object, found {type(obj).__name__}")
    if key not in obj:
        raise ArchiveError(f"{where} lacks the field {key!r}")
    value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int in Python; an int field must not accept true/false.
    if isinstance(value, bool) and bool not in kinds:
        raise ArchiveError(f"{where}.{key} must be {_names(kinds)}, found a boolean")
    if not isinstance(value, kinds):
        raise ArchiveError(f"{where}.{key} must be {_names(kinds)}, found {type(value).__name__}")
    return value


def _names(kinds: tuple[type, ...]) -> str:
    table = {dict: "an object", list: "a list", str: "a string", int: "an integer", bool: "a boolean",
             float: "a number", type(None): "null"}
    return " or ".join(table.get(k, k.__name__) for k in kinds)


def nonneg_int(obj: Any, key: str, where: str, limit: int = MAX_BLOB_BYTES) -> int:
    value = field_of(obj, key, int, where)
    if value < 0 or value > limit:
        raise ArchiveError(f"{where}.{key} is {value}, outside 0..{limit}")
    return value


def one_of(obj: Any, key: str, allowed: tuple[str, ...], where: str) -> str:
    value = field_of(obj, key, str, where)
    if value not in allowed:
        raise ArchiveError(f"{where}.{key} is {value!r}; this reader knows {', '.join(allowed)}")
    return value


# ---------------------------------------------------------------------------------------------------
# Manifest records

def zstd_limit(stored_size: int) -> int:
    """The most bytes a zstd blob of ``stored_size`` stored bytes may declare."""
    return max(MAX_ZSTD_FLOOR, stored_size * MAX_ZSTD_RATIO)


# Blob names (docs/FORMAT.md, "Blobs"): the writer names every blob through these; a reader takes any name
# BLOB_NAME allows and finds blobs through the manifest's records, never by building a name.
def weight_blob(i: int) -> str:
    return f"weights/{i}"


def state_blob(i: int) -> str:
    """The initial value of state buffer ``i`` (where it is not all zeros)."""
    return f"state/{i}"


def example_blob(i: int, method: str | None = None) -> str:
    """Example input ``i`` (of ``method``, in a pack of several methods)."""
    return f"example/{i}" if method is None else f"example/{method}/{i}"


def library_blob(entry: int) -> str:
    """Entry ``entry``'s shared object."""
    return f"code/{entry}.so"


def extern_kernels_blob(entry: int) -> str:
    """Entry ``entry``'s description of the ATen calls its proxy executor makes (JSON)."""
    return f"code/{entry}.json"


def source_blob(entry: int, name: str) -> str:
    """A generated source file of entry ``entry`` (``wrapper.cpp``, ``kernel.cpp``)."""
    return f"source/{entry}/{name}"


def kernel_blob(entry: int, file: str) -> str:
    """One Triton kernel binary of CUDA entry ``entry``."""
    return f"kernels/{entry}/{file}"


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


def _shape(obj: Any, where: str) -> tuple[int, ...]:
    shape = field_of(obj, "shape", list, where)
    if len(shape) > 64 or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**48 for d in shape):
        raise ArchiveError(f"{where}.shape must be a list of at most 64 non-negative integers")
    return tuple(shape)


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


@dataclass(frozen=True)
class MethodRecord:
    """One method of a pack (``pkg.NAME(...)``): the entries of the one entry table that serve it, tried in
    this order, its example inputs and its cache-position rules. Weights and state are the pack's, shared by
    every method; ``writes`` names the state buffers the method's code writes (the others it may read). A
    pack without ``methods`` has one method, ``forward``: every entry, the manifest's ``example`` and
    ``state.positions``, writing every state buffer."""

    name: str
    entries: tuple[int, ...]
    example: dict | None = None
    positions: tuple[PositionRule, ...] = ()
    writes: tuple[str, ...] = ()

    def to_json(self) -> dict:
        out: dict = {"name": self.name, "entries": list(self.entries),
                     "positions": [p.to_json() for p in self.positions], "writes": list(self.writes)}
        if self.example is not None:
            out["example"] = self.example
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
        example = obj.get("example")
        if example is not None and not isinstance(example, dict):
            raise ArchiveError(f"{where}.example must be a JSON object or absent, found {type(example).__name__}")
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


@dataclass(frozen=True)
class Manifest:
    """The parsed, checked manifest. ``entries`` and ``example`` are kept as checked JSON: the guards
    module parses them into its own records."""

    format_version: int
    producer: dict
    target: dict
    options: dict
    weights: tuple[WeightRecord, ...]
    entries: tuple[dict, ...]
    example: dict | None
    blobs: tuple[BlobRecord, ...]
    state: tuple[StateRecord, ...] = ()
    positions: tuple[PositionRule, ...] = ()
    # The manifest's ``methods`` (empty for a pack without them: see ``method_table``).
    methods: tuple[MethodRecord, ...] = ()
    unread_weights: tuple[str, ...] = ()
    external_weights: "ExternalWeights | None" = None
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

    def blob(self, name: str) -> BlobRecord:
        try:
            return self._by_name[name]
        except (KeyError, TypeError):  # TypeError: a name from the manifest that is not a string
            raise ArchiveError(f"manifest refers to blob {name!r}, which the blob table lacks") from None

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
        example = obj.get("example")
        if example is not None and not isinstance(example, dict):
            raise ArchiveError("manifest.example must be a JSON object or absent")
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
        m = cls(format_version=version, producer=field_of(obj, "producer", dict, where),
                target=_target(field_of(obj, "target", dict, where)), options=field_of(obj, "options", dict, where),
                weights=weights, entries=tuple(entries), example=example, blobs=blobs, state=state,
                positions=positions, methods=methods, unread_weights=unread,
                external_weights=external, raw=obj)
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
        return m

    def to_json(self) -> dict:
        return {"format": "aotpack", "format_version": self.format_version, "producer": self.producer,
                "target": self.target, "options": self.options,
                "weights": [w.to_json() for w in self.weights], "entries": list(self.entries),
                "example": self.example, "blobs": [b.to_json() for b in self.blobs],
                **({"unread_weights": list(self.unread_weights)} if self.unread_weights else {}),
                **({"external_weights": self.external_weights.to_json()} if self.external_weights else {}),
                **({"state": {"buffers": [r.to_json() for r in self.state],
                              "positions": [p.to_json() for p in self.positions]}} if self.state else {}),
                **({"methods": [m.to_json() for m in self.methods]} if self.methods else {})}


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
