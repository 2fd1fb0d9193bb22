"""safetensors files, read and written with the standard library and torch (no ``safetensors`` package).

The format (https://huggingface.co/docs/safetensors): 8 bytes, the little-endian length ``N`` of a JSON
header; the header, an object of name -> ``{"dtype", "shape", "data_offsets": [begin, end]}`` and an
optional ``"__metadata__"`` object of strings; then the data, raw little-endian and C-contiguous, offsets
counted from its start, every byte of it in exactly one tensor.

``read`` checks the whole header before it hands out a tensor: the length, strict JSON (no duplicate
names), each dtype, shape and range against the file's size, that the ranges tile the data; a bad file is a
``WeightsError`` naming the file and the field, never a crash or an allocation sized by the file's claims.
Tensors are views of one private copy-on-write mapping of the file, made through the descriptor the header
was read from (a tensor whose offset does not suit its dtype's alignment is copied). ``write`` writes one
deterministically: names sorted by element size (largest first, so every tensor stays aligned), then name;
the header padded with spaces to a multiple of 8 bytes.

May not: import the ``safetensors`` package or the build side; change a file it reads.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from typing import Iterator, Mapping

import torch

from .archive import file_kind
from .errors import ArchiveError, WeightsError
from .format import DTYPES, canonical_json, parse_json
from .guards import DTYPE_BY_NAME

# safetensors' dtype names -> the format's (torch's) names
DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
               "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16",
               "U32": "uint32", "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
               "C64": "complex64"}
SAFETENSORS_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}
# The safetensors library refuses headers above 100 MB; so does this reader (the header is read whole).
MAX_HEADER_BYTES = 100_000_000
SUFFIX = ".safetensors"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class TensorInfo:
    """One tensor of a safetensors file: dtype (the format's name), shape, and its byte range in the data."""

    __slots__ = ("dtype", "shape", "begin", "end")

    def __init__(self, dtype: str, shape: tuple[int, ...], begin: int, end: int):
        self.dtype, self.shape, self.begin, self.end = dtype, shape, begin, end


class SafetensorsFile(Mapping):
    """A checked safetensors file: a mapping of name -> tensor (a view of the mapped file), with ``info``
    (dtype and shape, read from the header without touching the data) and ``metadata``."""

    def __init__(self, path: str, info: dict[str, TensorInfo], metadata: dict[str, str], fd: int,
                 data_start: int, size: int):
        self.path = path
        self.info = info
        self.metadata = metadata
        self._data_start = data_start
        self._map: mmap.mmap | None = None
        if size > data_start:
            self._map = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)

    def __getitem__(self, name: str) -> torch.Tensor:
        i = self.info[name]
        dtype = DTYPE_BY_NAME[i.dtype]
        if i.end == i.begin or self._map is None:
            return torch.empty(i.shape, dtype=dtype)
        start = self._data_start + i.begin
        raw = torch.frombuffer(self._map, dtype=torch.uint8, count=i.end - i.begin, offset=start)
        if start % DTYPES[i.dtype]:
            raw = raw.clone()  # torch views need elements aligned to their size
        return raw.view(dtype).reshape(i.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.info)

    def __len__(self) -> int:
        return len(self.info)


def _bad(path: str, reason: str) -> WeightsError:
    return WeightsError(f"not a valid safetensors file: {reason}", path=path)


def read(path: str | os.PathLike) -> SafetensorsFile:
    """Open and check a safetensors file (see the module docstring); raise ``WeightsError`` if it is not one."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise WeightsError(f"cannot open it: {e.strerror}", path=path) from None
    try:
        st = os.fstat(fd)
        if not (st.st_mode & 0o170000 == 0o100000):
            raise WeightsError(f"is {file_kind(st.st_mode)}, not a regular file", path=path)
        return read_fd(path, fd, st.st_size)
    finally:
        os.close(fd)  # the mapping holds its own reference to the file


def read_fd(path: str, fd: int, size: int) -> SafetensorsFile:
    """Check the safetensors file open at ``fd`` (``size`` bytes, from its fstat) and map it through that
    descriptor; the caller closes it."""
    head = os.pread(fd, 8, 0)
    if len(head) < 8:
        raise _bad(path, f"it is {size} bytes long, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES:
        raise _bad(path, f"its header length is {n} bytes (at most {MAX_HEADER_BYTES})")
    if 8 + n > size:
        raise _bad(path, f"its header length is {n} bytes but the file holds {size - 8} after the length")
    header_bytes = os.pread(fd, n, 8)
    if len(header_bytes) != n:
        raise _bad(path, "the file was shorter than its size when read")
    try:
        header = parse_json(header_bytes, "the header")
    except ArchiveError as e:
        raise _bad(path, e.reason) from None
    if not isinstance(header, dict):
        raise _bad(path, f"the header is a JSON {type(header).__name__}, not an object")
    info, metadata = _check_header(path, header, size - 8 - n)
    return SafetensorsFile(path, info, metadata, fd, 8 + n, size)


def _check_header(path: str, header: dict, data_len: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad(path, "__metadata__ must be an object of strings")
    info: dict[str, TensorInfo] = {}
    for name, rec in header.items():
        if name == "__metadata__":
            continue
        where = f"tensor {name!r}"
        if not isinstance(rec, dict):
            raise _bad(path, f"{where} is not a JSON object")
        dtype = rec.get("dtype")
        if dtype not in DTYPE_NAMES:
            raise _bad(path, f"{where} has dtype {dtype!r}; this reader knows {', '.join(DTYPE_NAMES)}")
        shape = rec.get("shape")
        if not isinstance(shape, list) or len(shape) > 64 or \
                not all(type(d) is int and 0 <= d < 2**48 for d in shape):
            raise _bad(path, f"{where} has shape {str(shape)[:80]}; expected a list of non-negative integers")
        offsets = rec.get("data_offsets")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
            raise _bad(path, f"{where} has data_offsets {str(offsets)[:80]}; expected [begin, end]")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise _bad(path, f"{where} has data_offsets [{begin}, {end}], outside the {data_len} data bytes")
        want = math.prod(shape) * DTYPES[DTYPE_NAMES[dtype]]
        if end - begin != want:
            raise _bad(path, f"{where} is {DTYPE_NAMES[dtype]}{shape} ({want} bytes) but its data_offsets "
                             f"[{begin}, {end}] hold {end - begin}")
        info[name] = TensorInfo(DTYPE_NAMES[dtype], tuple(shape), begin, end)
    at = 0
    for name, i in sorted(info.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if i.begin != at:
            what = "overlaps the tensor before it" if i.begin < at else f"leaves bytes {at}..{i.begin} unused"
            raise _bad(path, f"tensor {name!r} at data_offsets [{i.begin}, {i.end}] {what}")
        at = i.end
    if at != data_len:
        raise _bad(path, f"the tensors end at data byte {at} but the file holds {data_len} data bytes")
    return info, metadata


def _order(item: tuple[str, torch.Tensor]) -> tuple[int, str]:
    return (-item[1].element_size(), item[0])


def write(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Write ``tensors`` (any layout or device; written as contiguous CPU bytes) to ``path`` as a safetensors
    file, the same bytes for the same tensors; the file appears whole (written beside it, then renamed).
    Returns its size."""
    path = os.fspath(path)
    items = sorted(tensors.items(), key=_order)
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    at = 0
    for name, t in items:
        name_of = str(t.dtype).removeprefix("torch.")
        if name_of not in SAFETENSORS_DTYPES:
            raise WeightsError(f"the tensor {name!r} is {name_of}, which safetensors files cannot hold "
                               f"(they take {', '.join(SAFETENSORS_DTYPES)})", path=path)
        n = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[name_of], "shape": list(t.shape), "data_offsets": [at, at + n]}
        at += n
    body = canonical_json(header)
    body += b" " * (-len(body) % 8)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(body)))
            f.write(body)
            for _, t in items:
                t = t.detach().to("cpu").contiguous()
                if t.numel():
                    f.write(_bytes_of(t))
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise WeightsError(f"cannot write it: {e.strerror}", path=path) from None
    return 8 + len(body) + at


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A byte view of a dense, contiguous CPU tensor's memory (valid while ``t`` lives; no copy)."""
    import ctypes

    n = t.numel() * t.element_size()
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def checkpoint_files(folder: str) -> dict[str, str] | None:
    """A sharded Hugging Face checkpoint folder's ``{name: shard file}`` (``model.safetensors.index.json``'s
    ``weight_map``), or None for a folder with one ``model.safetensors``. Shard files must lie in the folder
    itself."""
    index = os.path.join(folder, INDEX_FILE)
    if os.path.exists(index):
        try:
            with open(index, "rb") as f:
                data = f.read(MAX_HEADER_BYTES + 1)
        except OSError as e:
            raise WeightsError(f"cannot read it: {e.strerror}", path=index) from None
        if len(data) > MAX_HEADER_BYTES:
            raise WeightsError(f"the index is larger than {MAX_HEADER_BYTES} bytes", path=index)
        try:
            obj = parse_json(data, "the index")
        except ArchiveError as e:
            raise WeightsError(e.reason, path=index) from None
        weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise WeightsError("the index lacks a weight_map object of name -> shard file", path=index)
        for name, shard in weight_map.items():
            if os.path.basename(shard) != shard or shard in ("", ".", ".."):
                raise WeightsError(f"the weight_map puts {name!r} in {shard!r}, which is not a file name in the "
                                   "checkpoint's folder", path=index)
        return {name: os.path.join(folder, shard) for name, shard in weight_map.items()}
    if os.path.exists(os.path.join(folder, SINGLE_FILE)):
        return None
    raise WeightsError(f"holds neither {INDEX_FILE} nor {SINGLE_FILE}: not a Hugging Face safetensors checkpoint",
                       path=folder)


def open_source(source: str | os.PathLike) -> dict[str, tuple[SafetensorsFile, str]]:
    """The tensors of a safetensors file or checkpoint folder: name -> (its file, the name in it). Every file
    is opened and checked once; a name the index puts in a shard that lacks it is a ``WeightsError``."""
    path = os.fspath(source)
    shards = checkpoint_files(path) if os.path.isdir(path) else None
    if shards is None:
        f = read(os.path.join(path, SINGLE_FILE) if os.path.isdir(path) else path)
        return {name: (f, name) for name in f.info}
    files: dict[str, SafetensorsFile] = {}
    out: dict[str, tuple[SafetensorsFile, str]] = {}
    for name, file in shards.items():
        if file not in files:
            files[file] = read(file)
        if name not in files[file].info:
            raise WeightsError(f"the index puts {name!r} in this shard, which lacks it", path=file)
        out[name] = (files[file], name)
    return out
