"""Tools to take a real pack apart and put it back together with one thing changed."""
from __future__ import annotations

import hashlib
import json

from aotpack_runtime import format as fmt


def split(data: bytes) -> tuple[int, dict, bytes]:
    """(header version, manifest object, blob region bytes) of an archive."""
    _, version, _, mlen, _ = fmt.HEADER.unpack(data[: fmt.HEADER_SIZE])
    manifest = json.loads(data[fmt.HEADER_SIZE: fmt.HEADER_SIZE + mlen])
    region = fmt.align(fmt.HEADER_SIZE + mlen)
    return version, manifest, data[region:]


def join(version: int, manifest_bytes: bytes, region: bytes, *, fix_hash: bool = True) -> bytes:
    """An archive from its parts; the header's manifest hash is recomputed unless ``fix_hash`` is False."""
    digest = hashlib.sha256(manifest_bytes).digest() if fix_hash else b"\x00" * 32
    header = fmt.HEADER.pack(fmt.MAGIC, version, 0, len(manifest_bytes), digest)
    pad = fmt.align(fmt.HEADER_SIZE + len(manifest_bytes)) - fmt.HEADER_SIZE - len(manifest_bytes)
    return header + manifest_bytes + b"\x00" * pad + region


def with_manifest(data: bytes, edit) -> bytes:
    """The archive with ``edit(manifest)`` applied (canonical JSON, hash recomputed)."""
    version, manifest, region = split(data)
    edit(manifest)
    return join(version, fmt.canonical_json(manifest), region)


def blob_range(data: bytes, name: str) -> tuple[int, int]:
    """Absolute [start, end) of a blob's stored bytes."""
    _, manifest, _ = split(data)
    _, _, _, mlen, _ = fmt.HEADER.unpack(data[: fmt.HEADER_SIZE])
    region = fmt.align(fmt.HEADER_SIZE + mlen)
    for b in manifest["blobs"]:
        if b["name"] == name:
            return region + b["offset"], region + b["offset"] + b["stored_size"]
    raise KeyError(name)


def smallest_manifest(library: str) -> dict:
    """The smallest manifest the writer (which runs the reader's checks) takes: one CPU entry of no inputs
    and no outputs whose library is the blob ``library``; for tests of the archive layer alone."""
    entry = {"name": "0", "device": "cpu", "library": library, "constants": {}, "param_names": [], "symbols": {},
             "inputs": {"type": "tuple", "children": [{"type": "tuple", "children": []},
                                                      {"type": "dict", "keys": [], "children": []}]},
             "leaves": [], "outputs": {"type": "none"}, "output_leaves": []}
    return {"producer": {"aotpack": "0"}, "target": {}, "options": {}, "weights": [], "entries": [entry],
            "example": None}


def zstd_frame(zeros: int, raw: bytes = b"", window_log: int = 20) -> bytes:
    """A valid zstd frame (not single-segment, window 2**window_log) holding ``raw`` as raw blocks, then
    ``zeros`` zero bytes as 128 KiB RLE blocks: a few bytes per 128 KiB it declares."""
    content = len(raw) + zeros
    frame = bytearray(b"\x28\xb5\x2f\xfd\xc0")  # magic; 8-byte content size, a window descriptor, no checksum
    frame += bytes([(window_log - 10) << 3]) + content.to_bytes(8, "little")
    block = 128 << 10
    for start in range(0, len(raw), block):
        piece = raw[start:start + block]
        last = not zeros and start + block >= len(raw)
        frame += (int(last) | (0 << 1) | (len(piece) << 3)).to_bytes(3, "little") + piece
    left = zeros
    while left:
        n = min(block, left)
        left -= n
        frame += (int(left == 0) | (1 << 1) | (n << 3)).to_bytes(3, "little") + b"\x00"
    return bytes(frame)


def with_blob(data: bytes, name: str, content: bytes) -> bytes:
    """The archive with blob ``name`` holding ``content`` (stored uncompressed, its sizes and sha256 fixed)."""
    version, manifest, region = split(data)
    out = bytearray()
    for b in manifest["blobs"]:
        stored = content if b["name"] == name else region[b["offset"]:b["offset"] + b["stored_size"]]
        if b["name"] == name:
            b.update(stored_size=len(content), size=len(content), sha256=hashlib.sha256(content).hexdigest(),
                     compression="none")
        out += b"\x00" * (fmt.align(len(out)) - len(out))
        b["offset"] = len(out)
        out += stored
    return join(version, fmt.canonical_json(manifest), bytes(out))
