"""Malformed archives: each raises ArchiveError saying what is wrong; nothing crashes."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

import aotpack
from aotpack_runtime import format as fmt
from aotpack_runtime import schema
from aotpack_runtime.archive import Archive
from archive_tools import blob_range, join, smallest_manifest, split, with_manifest, zstd_frame
from helpers import assert_facts


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
    assert_facts(reason, f"file is {len(good) + 4} bytes", f"last blob ends at byte {len(good)}", "trailing data",
                 "truncated copy")


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
    assert_facts(reason, "manifest too large", f"{1 << 40} bytes", f"limit is {fmt.MAX_MANIFEST_BYTES}")


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


# -- every field the spec defines is checked ----------------------------------------------------------------

def _entry_manifest() -> dict:
    """A manifest of one entry with a tensor input ``x`` and a specialised float ``t``, for schema tests."""
    import torch

    from aotpack_runtime import platform

    manifest = smallest_manifest("code/0.so")
    manifest.update(format="aotpack", format_version=fmt.FORMAT_VERSION, blobs=[
        {"name": "code/0.so", "offset": 0, "stored_size": 64, "size": 64, "sha256": "0" * 64, "compression": "none"}])
    manifest["producer"]["torch"] = torch.__version__
    manifest["target"] = {"machine": platform.host_machine(), "cpu_isa": "x86-64",
                          "torch_series": platform.torch_minor(torch.__version__)}
    entry = manifest["entries"][0]
    entry.update(
        param_names=["x", "t"], grad_mode=False, sources=[], kernels=[],
        inputs={"type": "tuple", "children": [{"type": "tuple", "children": [{"type": "leaf"}, {"type": "leaf"}]},
                                             {"type": "dict", "keys": [], "children": []}]},
        leaves=[{"kind": "tensor", "path": "args[0]", "name": "x", "dtype": "float32", "device": "cpu",
                 "sizes": [8, 1], "strides": [1, None], "requires_grad": False},
                {"kind": "value", "path": "args[1]", "name": "t", "type": "float", "value": 0.5}])
    return manifest


def _checked(manifest: dict) -> None:
    """What a load checks of a manifest before it loads any code."""
    from aotpack_runtime import platform

    m = schema.Manifest.from_json(manifest)
    platform.check_torch(m.producer["torch"])
    platform.check_target(m.target)


def _set(path: list, value):
    def edit(m):
        node = m
        for key in path[:-1]:
            node = node[key]
        if value is _DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return edit


_DELETE = object()
_E = ["entries", 0]
FIELD_CASES = {
    "float value out of range": (_E + ["leaves", 1, "value"], 10**600, "value is an integer of 601 digits"),
    "other torch series": (["target", "torch_series"], "2.99", "manifest.target.torch_series is '2.99'"),
    "native without flags": (["target", "cpu_isa"], "native", "cpu_isa is 'native' but manifest.target.cpu_flags "
                                                              "is absent"),
    "null stride on a long dim": (_E + ["leaves", 0, "strides"], [None, None], "strides[0] is null, but dim 0 has "
                                                                               "size 8"),
    "requires_grad not a boolean": (_E + ["leaves", 0, "requires_grad"], "no", "requires_grad must be a boolean"),
    "requires_grad true": (_E + ["leaves", 0, "requires_grad"], True, "requires_grad is true"),
    "grad_mode not a boolean": (_E + ["grad_mode"], "no", "grad_mode must be a boolean"),
    "entry name not a string": (_E + ["name"], 0, "manifest.entries[0].name must be a string"),
    "entry name absent": (_E + ["name"], _DELETE, "manifest.entries[0] lacks the field 'name'"),
    "parameter name not a string": (_E + ["param_names"], ["x", 1], "param_names must be distinct strings"),
    "leaf name not a string": (_E + ["leaves", 0, "name"], ["x"], "leaves[0].name must be a string"),
    "sources not strings": (_E + ["sources"], [1], "sources must be a list of strings"),
    "mutated false": (_E + ["leaves", 0, "mutated"], False, "mutated is false"),
}


def test_a_good_entry_manifest_passes():
    _checked(_entry_manifest())


@pytest.mark.parametrize("case", list(FIELD_CASES))
def test_every_field_the_spec_defines_is_checked(case):
    path, value, reason = FIELD_CASES[case]
    manifest = _entry_manifest()
    _set(path, value)(manifest)
    with pytest.raises(aotpack.ArchiveError) as info:
        _checked(manifest)
    assert reason in info.value.reason


def test_field_errors_reach_load_as_archive_errors(tmp_path):
    """Through the whole load (header, manifest, host, entries): an ArchiveError naming the field."""
    from aotpack.package import Blob, write_archive

    good = tmp_path / "good.pack"
    manifest = _entry_manifest()
    for key in ("format", "format_version", "blobs"):
        del manifest[key]
    write_archive(good, manifest, [Blob("code/0.so", b"\x7fELF" + bytes(60))], level=3)
    for case in ("float value out of range", "other torch series", "native without flags"):
        path, value, reason = FIELD_CASES[case]
        assert reason in _load_error(tmp_path, with_manifest(good.read_bytes(), _set(path, value)))


def test_any_json_in_an_entry_is_checked_or_refused():
    """Property: any JSON value anywhere in an entry (or the target) is accepted or refused with an
    ArchiveError by the reader's checks; never another exception."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from test_fuzz_archive import _places, json_values

    base = _entry_manifest()
    places = [p for p, _ in _places(base) if p and p[0] in ("entries", "target")]

    @settings(max_examples=300, derandomize=True, database=None, deadline=None)
    @given(where=st.sampled_from(places), value=json_values() | st.sampled_from([10**600, "native", None]))
    def check(where, value):
        manifest = json.loads(json.dumps(base))
        _set(list(where), value)(manifest)
        try:
            _checked(manifest)
        except aotpack.ArchiveError:
            pass

    check()


# -- bounded memory while checking ------------------------------------------------------------------------------

_CHECK_MEMORY = """
import resource, sys
from aotpack_runtime.archive import Archive
from aotpack_runtime.errors import ArchiveError
archive = Archive.open(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    archive.check_blobs()
    print("checked")
except ArchiveError as e:
    print(e.reason)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def _pack_with_blob(path, stored: bytes, size: int, sha: str) -> None:
    from aotpack.package import Blob, write_archive

    write_archive(path, smallest_manifest("code/0.so"), [Blob("code/0.so", b"x" * 64, compressible=False),
                                                         Blob("z", b"\x00" * 1024, compressible=False)], level=3)
    version, manifest, region = split(path.read_bytes())
    offset = manifest["blobs"][1]["offset"]
    manifest["blobs"][1].update(stored_size=len(stored), size=size, sha256=sha, compression="zstd")
    path.write_bytes(join(version, fmt.canonical_json(manifest), region[:offset] + stored))


def test_the_expansion_limit_refuses_no_blob_a_writer_makes():
    """zstd's best case, a blob of zeros at the pack's level and above, stays within the expansion limit: a
    pack an earlier aotpack compressed that way still loads."""
    import zstandard

    for n in (1 << 20, 1 << 26):
        for level in (9, 22):
            assert n <= fmt.zstd_limit(len(zstandard.ZstdCompressor(level=level).compress(bytes(n)))), (n, level)


def test_a_blob_that_declares_1_gib_is_checked_in_bounded_memory(tmp_path):
    """A 1 MiB zstd blob that expands to 1 GiB (random bytes, then RLE blocks of zeros: within the expansion
    limit) with a wrong hash: the check streams it through fixed buffers and reports the mismatch, and the
    process's peak memory grows by far less than the blob declares. Run in a fresh process, whose peak is its
    own."""
    frame = zstd_frame(1 << 30, os.urandom(1 << 20))
    size = (1 << 30) + (1 << 20)
    assert size <= fmt.zstd_limit(len(frame))
    pack = tmp_path / "bomb.pack"
    _pack_with_blob(pack, frame, size, "0" * 64)
    (tmp_path / "check.py").write_text(_CHECK_MEMORY)
    proc = subprocess.run([sys.executable, str(tmp_path / "check.py"), str(pack)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reason, grown_mib = proc.stdout.strip().splitlines()
    assert_facts(reason, "hash mismatch", "blob 'z'", "corrupt or was modified")
    assert int(grown_mib) < 128, f"checking the blob grew the peak memory by {grown_mib} MiB"


@pytest.mark.parametrize("case", ["declares more than it holds", "holds more than it declares", "trailing bytes",
                                  "over the expansion limit", "window over the limit", "small, trailing bytes",
                                  "small, declares more than it holds"])
def test_malformed_zstd_blobs(tmp_path, case):
    """Streamed (a blob over 1 MiB) or decompressed in one go (a small one), a frame that is not exactly what
    the manifest says is an ArchiveError."""
    raw = os.urandom(4096)
    frame, size = zstd_frame(1 << 20, raw), (1 << 20) + 4096
    if case.startswith("small"):
        frame, size = zstd_frame(1000, raw), 5096
        case = case.split(", ", 1)[1]
    if case == "declares more than it holds":
        frame = frame[:6] + (size + 10).to_bytes(8, "little") + frame[14:]
        size += 10
        expected = "zstd data is corrupt"
    elif case == "holds more than it declares":
        frame = frame[:6] + (size - 10).to_bytes(8, "little") + frame[14:]
        size -= 10
        expected = "zstd data"
    elif case == "trailing bytes":
        frame += b"\x00" * 7
        expected = "7 bytes" if size < (1 << 20) else "7 bytes follow its zstd frame"
    elif case == "over the expansion limit":  # 49 stored bytes that claim 16 GiB
        frame, size = zstd_frame(1 << 20), 1 << 34
        expected = "a blob may expand at most 65536-fold"
    else:
        frame = zstd_frame(1 << 20, raw, window_log=31)
        expected = "zstd data is corrupt"
    pack = tmp_path / "z.pack"
    _pack_with_blob(pack, frame, size, "0" * 64)
    with pytest.raises(aotpack.ArchiveError) as info:
        Archive.open(pack).check_blobs()
    assert expected in info.value.reason
