"""The aotpack archive format: names, version constants, header layout, the one JSON form, blob names.

The runtime owns the format; the build side's writer imports these definitions. The manifest's records and
what makes them valid are in ``schema``, which builds on the checked access to parsed JSON here
(``field_of``, ``one_of``, ``nonneg_int``). ``docs/FORMAT.md`` is the written spec and its examples are tested
against both modules.

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
  6 (2026-12): folded weights: a CPU entry's constant that no stored weight holds, computed at load from
               stored weights by a few per-channel steps (``folded_weights``: a batch norm folded into the
               convolution before it). A pack without them keeps its older version.
  7 (2026-12): packed linear weights: a ``packed_weights`` record of kind ``onednn_linear`` (a linear's weight
               packed for oneDNN at load, for the number of rows its input has), which a version-6 reader
               would refuse by its kind, and the fold step ``transpose`` (a linear's weight stored [in, out],
               as GPT-2's Conv1D stores it). A pack with neither keeps its older version.

May not: import torch or any aotpack module but ``errors``: the writer, the reader and ``schema`` import it.
"""
from __future__ import annotations

import json
import math
import re
import struct
from typing import Any

from .errors import ArchiveError

MAGIC = b"AOTPACK\x00"
FORMAT_VERSION = 7
MIN_READ_VERSION = 1
# The first format version that may hold CUDA entries.
CUDA_FORMAT_VERSION = 2
# The first format version that may hold state.
STATE_FORMAT_VERSION = 3
# The first format version that may hold the features of version 4 (see the changelog and ``v4_features``).
BREADTH_FORMAT_VERSION = 4
# The first format version that may hold the features of version 5 (see the changelog and ``v5_features``).
V5_FORMAT_VERSION = 5
# The first format version that may hold folded weights (``v6_features``).
V6_FORMAT_VERSION = 6
# The first format version that may hold packed linear weights (``v7_features``).
V7_FORMAT_VERSION = 7
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


def v6_features(manifest: dict) -> list[str]:
    """What in ``manifest`` needs format version 6, in words (empty when nothing does), as ``v4_features``."""
    if any(isinstance(e, dict) and "folded_weights" in e for e in _items(manifest.get("entries"))):
        return ["weights folded at load (folded_weights)"]
    return []


def v7_features(manifest: dict) -> list[str]:
    """What in ``manifest`` needs format version 7, in words (empty when nothing does), as ``v4_features``."""
    def records(e: Any, key: str) -> list:
        found = e.get(key) if isinstance(e, dict) else None
        return [r for r in found.values() if isinstance(r, dict)] if isinstance(found, dict) else []

    for e in _items(manifest.get("entries")):
        if any(r.get("kind") == "onednn_linear" for r in records(e, "packed_weights")):
            return ["linear weights packed at load (packed_weights of kind onednn_linear)"]
        if any(isinstance(s, dict) and s.get("op") == "transpose"
               for r in records(e, "folded_weights") for s in _items(r.get("steps"))):
            return ["a weight transposed at load (the fold step transpose)"]
    return []


def version_for(manifest: dict) -> int:
    """The format version a pack with this manifest is written as: the oldest that can describe it, so a
    CPU-only pack without state that needs nothing newer stays readable by version-1 readers."""
    if v7_features(manifest):
        return V7_FORMAT_VERSION
    if v6_features(manifest):
        return V6_FORMAT_VERSION
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
# Blobs

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
