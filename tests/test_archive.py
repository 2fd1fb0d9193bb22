"""Malformed archives: each raises ArchiveError saying what is wrong; nothing crashes."""
from __future__ import annotations

import hashlib

import pytest

import aotpack
from aotpack_runtime import format as fmt
from aotpack_runtime.archive import Archive
from archive_tools import blob_range, join, smallest_manifest, split, with_manifest


@pytest.fixture(scope="module")
def good(mlp_pack) -> bytes:
    return mlp_pack.path.read_bytes()


def _load_error(tmp_path, data: bytes, name: str = "bad.pack") -> str:
    p = tmp_path / name
    p.write_bytes(data)
    with pytest.raises(aotpack.ArchiveError) as info:
        aotpack.load(p, cache_dir=tmp_path / "cache")
    return info.value.reason


def test_good_pack_verifies(mlp_pack):
    Archive.open(mlp_pack.path).verify()


@pytest.mark.parametrize("cut", [0, 5, 30, 60, 200])
def test_truncated_header_and_manifest(tmp_path, good, cut):
    reason = _load_error(tmp_path, good[:cut])
    assert reason.startswith("truncated at byte") or reason == "an empty file"


def test_truncated_in_a_blob(tmp_path, good):
    start, end = blob_range(good, "code/0.so")
    reason = _load_error(tmp_path, good[: (start + end) // 2])
    assert reason.startswith(f"truncated at byte {(start + end) // 2}: blob 'code/0.so' should end at byte")


def test_trailing_data(tmp_path, good):
    reason = _load_error(tmp_path, good + b"junk")
    assert reason == f"file is {len(good) + 4} bytes but its last blob ends at byte {len(good)} " \
                     "(trailing data, or a truncated copy)"


def test_manifest_bit_flip(tmp_path, good):
    data = bytearray(good)
    data[fmt.HEADER_SIZE + 10] ^= 0x01
    assert _load_error(tmp_path, bytes(data)) == \
        "hash mismatch in the manifest: the file is corrupt or was modified"


@pytest.mark.parametrize("blob", ["code/0.so", "weights/0"])
def test_blob_bit_flip(tmp_path, good, blob):
    start, end = blob_range(good, blob)
    data = bytearray(good)
    data[(start + end) // 2] ^= 0x10
    reason = _load_error(tmp_path, bytes(data))
    assert reason.startswith(f"hash mismatch in blob '{blob}'") or \
        reason.startswith(f"blob '{blob}': zstd data is corrupt")


@pytest.mark.parametrize("version", range(fmt.MIN_READ_VERSION - 1, fmt.FORMAT_VERSION + 2))
def test_version_range(tmp_path, good, version, mlp_pack):
    _, manifest, region = split(good)
    manifest["format_version"] = version
    data = join(version, fmt.canonical_json(manifest), region)
    if fmt.MIN_READ_VERSION <= version <= fmt.FORMAT_VERSION:
        p = tmp_path / "ok.pack"
        p.write_bytes(data)
        assert aotpack.load(p, cache_dir=tmp_path / "c")(*mlp_pack.args).shape == (8, 10)
        return
    reason = _load_error(tmp_path, data)
    assert reason.startswith(f"unsupported format version {version} (this reader: "
                             f"{fmt.MIN_READ_VERSION}..{fmt.FORMAT_VERSION})")
    assert ("upgrade aotpack" if version > fmt.FORMAT_VERSION else "rebuild the pack") in reason


def test_duplicate_json_keys(tmp_path, good):
    _, manifest, region = split(good)
    raw = fmt.canonical_json(manifest)
    raw = raw.replace(b'{"blobs":', b'{"blobs":[],"blobs":', 1)
    assert _load_error(tmp_path, join(1, raw, region)) == "manifest has a duplicate key 'blobs'"


def test_manifest_too_large(tmp_path, good):
    header = fmt.HEADER.pack(fmt.MAGIC, 1, 0, 1 << 40, b"\x00" * 32)
    reason = _load_error(tmp_path, header + good[fmt.HEADER_SIZE:])
    assert reason == f"manifest too large: header says {1 << 40} bytes, the limit is {fmt.MAX_MANIFEST_BYTES}"


def test_oversized_blob_length(tmp_path, good):
    def edit(m):
        m["blobs"][-1]["stored_size"] = 1 << 39
    assert "should end at byte" in _load_error(tmp_path, with_manifest(good, edit))


@pytest.mark.parametrize("name", ["../../etc/passwd", "/abs/path", "a/../b", "x\\y", ""])
def test_path_traversal_names(tmp_path, good, name):
    def edit(m):
        m["blobs"][0]["name"] = name
    reason = _load_error(tmp_path, with_manifest(good, edit))
    assert "is not a valid blob name" in reason


def test_swapped_blobs_fail_hash_or_size(tmp_path, good):
    def edit(m):
        a, b = m["blobs"][0], m["blobs"][1]
        a["sha256"], b["sha256"] = b["sha256"], a["sha256"]
    reason = _load_error(tmp_path, with_manifest(good, edit))
    assert reason.startswith("hash mismatch in blob 'weights/")


def test_not_an_archive(tmp_path):
    cases = {
        b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n": "a Git LFS pointer file",
        b"<!DOCTYPE html><html><body>404</body></html>": "an HTML or XML page",
        b"PK\x03\x04" + b"\x00" * 40: "a zip archive",
        b"\x7fELF\x02\x01\x01" + b"\x00" * 40: "an ELF binary",
        b"": "an empty file",
        b"hello world, this is just text": "not an aotpack archive",
    }
    for data, start in cases.items():
        assert _load_error(tmp_path, data).startswith(start)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(aotpack.ArchiveError, match="no such file"):
        aotpack.load(tmp_path / "absent.pack")
    with pytest.raises(aotpack.ArchiveError, match="is a directory"):
        aotpack.load(tmp_path)


def test_golden_bytes_of_a_tiny_archive(tmp_path):
    """The writer is deterministic and its layout is the one docs/FORMAT.md describes."""
    from aotpack.package import Blob, write_archive

    manifest = smallest_manifest("a")
    out = tmp_path / "tiny.pack"
    size = write_archive(out, manifest, [Blob("a", b"hello"), Blob("b/c", b"x" * 1000)], level=3)
    data = out.read_bytes()
    assert size == len(data)
    assert data[:8] == b"AOTPACK\x00"
    _, m, region = split(data)
    assert [(b["name"], b["offset"], b["compression"]) for b in m["blobs"]] == \
        [("a", 0, "none"), ("b/c", 64, "zstd")]
    assert region[:5] == b"hello" and region[5:64] == b"\x00" * 59
    assert hashlib.sha256(data).hexdigest() == GOLDEN_TINY
    Archive.open(out).verify()


GOLDEN_TINY = "5fd7ae569bb8e7d45675110f7c698ea4a1f9850455335fcecc9f4566091bee6a"
