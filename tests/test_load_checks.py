"""What a load checks, and when: the first load of a pack file hashes every blob (in parallel threads) and
records the check in the code cache; later loads of the same, unchanged file skip hashing the
weights; any change to the file means a full check again; ``verify="full"`` and ``aotpack verify`` always
hash everything; native code is hashed before it is loaded whatever the record says."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
import time

import pytest
import torch

import aotpack
from aotpack.checks import verify as run_verify
from aotpack_runtime import archive as archive_module
from aotpack_runtime import cache
from aotpack_runtime.archive import Archive
from archive_tools import blob_range, smallest_manifest, with_blob, with_manifest
from helpers import assert_facts, swap_link_during


@pytest.fixture
def settle_now(monkeypatch):
    """Records for files changed just now (the tests copy packs and load them at once)."""
    monkeypatch.setattr(cache, "SETTLE_SECONDS", 0.0)


def _copy(src, tmp_path, name="m.pack"):
    dst = tmp_path / name
    shutil.copyfile(src, dst)
    return dst


def _record_files(cache_dir) -> list[str]:
    folder = cache_dir / "checked"
    return sorted(os.listdir(folder)) if folder.exists() else []


def _corrupt(path, blob: str, keep_times: bool = True) -> None:
    """Flip one byte in the middle of a blob in place; with ``keep_times``, put the modification time back
    (the change time, which no user can set, still moves)."""
    data = path.read_bytes()
    start, end = blob_range(data, blob)
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek((start + end) // 2)
        f.write(bytes([data[(start + end) // 2] ^ 0x20]))
    if keep_times:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _forge_record(cache_dir, path) -> None:
    """A record claiming the file as it is now was checked (what a cache folder's owner could write)."""
    a = Archive.open(path)
    assert cache.save_check(str(cache_dir), a.identity, a.manifest_sha256, time.time() + 10, str(path))


def test_first_load_checks_every_blob_and_later_loads_use_the_record(mlp_pack, tmp_path, settle_now, monkeypatch):
    pack, c = _copy(mlp_pack.path, tmp_path), tmp_path / "cache"
    first = aotpack.load(pack, cache_dir=c)
    assert first.checked == "full"
    [name] = _record_files(c)
    record = json.loads((c / "checked" / name).read_text())
    st = os.stat(pack)
    assert record["identity"] == [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    assert record["manifest_sha256"] == Archive.open(pack).manifest_sha256
    assert record["checked"] == "every blob" and record["file_sha256"] is None

    hashed = []
    real = Archive.check_blobs
    monkeypatch.setattr(Archive, "check_blobs", lambda self, *a, **k: hashed.append(1) or real(self, *a, **k))
    later = aotpack.load(pack, cache_dir=c)
    assert later.checked == "record" and hashed == []
    with torch.no_grad():
        assert torch.equal(later(*mlp_pack.args), first(*mlp_pack.args))
    assert aotpack.load(pack, cache_dir=c, verify="full").checked == "full" and hashed == [1]


def test_a_file_changed_just_before_its_check_gets_no_record(mlp_pack, tmp_path):
    """File times tick coarsely: a write in the same tick as the one before the check would not show. A file
    changed less than SETTLE_SECONDS before its check is checked in full and not recorded."""
    pack, c = _copy(mlp_pack.path, tmp_path), tmp_path / "cache"
    assert aotpack.load(pack, cache_dir=c).checked == "full"
    assert aotpack.load(pack, cache_dir=c).checked == "full"
    assert _record_files(c) == []
    a = Archive.open(pack)
    st = os.stat(pack)
    assert not cache.save_check(str(c), a.identity, a.manifest_sha256, st.st_ctime_ns / 1e9 + 1.9, str(pack))
    assert cache.save_check(str(c), a.identity, a.manifest_sha256, st.st_ctime_ns / 1e9 + 2.0, str(pack))


@pytest.mark.parametrize("change", ["weight modified, mtime put back", "code modified, mtime put back",
                                    "touched", "another file renamed over it"])
def test_any_change_to_the_file_means_a_full_check(mlp_pack, tmp_path, settle_now, change):
    pack, c = _copy(mlp_pack.path, tmp_path), tmp_path / "cache"
    assert aotpack.load(pack, cache_dir=c).checked == "full"
    assert aotpack.load(pack, cache_dir=c).checked == "record"
    if change.startswith("weight"):
        _corrupt(pack, "weights/0")
    elif change.startswith("code"):
        _corrupt(pack, "code/0.so")
    elif change == "touched":
        os.utime(pack)
    else:
        _copy(mlp_pack.path, tmp_path, "new.pack").replace(pack)
    if "modified" in change:
        with pytest.raises(aotpack.ArchiveError) as info:
            aotpack.load(pack, cache_dir=c)
        blob = "weights/0" if change.startswith("weight") else "code/0.so"
        assert_facts(info.value.reason, "hash mismatch", f"blob {blob!r}", "corrupt or was modified")
    else:
        assert aotpack.load(pack, cache_dir=c).checked == "full"
        assert aotpack.load(pack, cache_dir=c).checked == "record"


def test_what_a_record_vouches_for_and_what_is_checked_anyway(mlp_pack, tmp_path):
    """A record stands for the weights' hashes only: with a record of a damaged file (forged here, as the
    owner of the cache folder could), an auto load maps the damaged weights, while verify="full", `aotpack
    verify` and the code's own hash check still catch the damage."""
    pack, c = _copy(mlp_pack.path, tmp_path), tmp_path / "cache"
    _corrupt(pack, "weights/0", keep_times=False)
    _forge_record(c, pack)
    assert aotpack.load(pack, cache_dir=c).checked == "record"
    with pytest.raises(aotpack.ArchiveError, match="hash mismatch in blob 'weights/0'"):
        aotpack.load(pack, cache_dir=c, verify="full")
    result = run_verify(str(pack))
    [hashes] = [r for r in result["checks"] if r["check"] == "hashes"]
    assert not result["ok"] and "hash mismatch in blob 'weights/0'" in hashes["detail"]

    code = _copy(mlp_pack.path, tmp_path, "code.pack")
    _corrupt(code, "code/0.so", keep_times=False)
    _forge_record(c, code)
    with pytest.raises(aotpack.ArchiveError) as info:  # nothing extracted yet: the blob is read and hashed
        aotpack.load(code, cache_dir=tmp_path / "empty-cache")
    assert_facts(info.value.reason, "hash mismatch", "blob 'code/0.so'", "corrupt or was modified")


def test_records_are_trusted_only_in_a_folder_no_one_else_can_write(mlp_pack, tmp_path, settle_now):
    pack, c = _copy(mlp_pack.path, tmp_path), tmp_path / "cache"
    aotpack.load(pack, cache_dir=c)
    assert (os.stat(c / "checked").st_mode & 0o777) == 0o700
    assert aotpack.load(pack, cache_dir=c).checked == "record"
    os.chmod(c / "checked", 0o777)
    assert aotpack.load(pack, cache_dir=c).checked == "full"
    os.chmod(c / "checked", 0o700)
    [name] = _record_files(c)
    os.chmod(c / "checked" / name, 0o666)
    assert aotpack.load(pack, cache_dir=c).checked == "full"


def test_a_damaged_or_foreign_record_means_a_full_check(mlp_pack, tmp_path, settle_now):
    pack, c = _copy(mlp_pack.path, tmp_path), tmp_path / "cache"
    aotpack.load(pack, cache_dir=c)
    [name] = _record_files(c)
    record = c / "checked" / name
    good = json.loads(record.read_text())
    for bad in ("{not json", json.dumps(dict(good, manifest_sha256="0" * 64)),
                json.dumps(dict(good, identity=good["identity"][:4] + [1])), json.dumps([good])):
        record.write_text(bad)
        assert aotpack.load(pack, cache_dir=c).checked == "full"  # and it writes a good record again


def test_a_pin_and_a_signature_use_the_recorded_file_hash(mlp_pack, tmp_path, settle_now, monkeypatch):
    pack, c = _copy(mlp_pack.path, tmp_path), tmp_path / "cache"
    sha = hashlib.sha256(pack.read_bytes()).hexdigest()
    assert aotpack.load(pack, cache_dir=c, expected_sha256=sha).checked == "full"
    [name] = _record_files(c)
    assert json.loads((c / "checked" / name).read_text())["file_sha256"] == sha

    real = archive_module.whole_file_sha256

    def no_hashing(fd, size, path):
        raise AssertionError("the whole pack was hashed again")

    monkeypatch.setattr(archive_module, "whole_file_sha256", no_hashing)
    assert aotpack.load(pack, cache_dir=c, expected_sha256=sha).checked == "record"
    with pytest.raises(aotpack.ArchiveError) as info:
        aotpack.load(pack, cache_dir=c, expected_sha256="0" * 64)
    assert_facts(info.value.reason, "sha256 mismatch", f"expected {'0' * 64}", f"actual {sha}", "pinned")
    monkeypatch.undo()
    monkeypatch.setattr(cache, "SETTLE_SECONDS", 0.0)
    os.utime(pack)  # the same bytes, but another identity: the file is hashed again
    hashed = []
    monkeypatch.setattr(archive_module, "whole_file_sha256", lambda fd, size, p: hashed.append(p) or real(fd, size, p))
    assert aotpack.load(pack, cache_dir=c, expected_sha256=sha).checked == "full" and str(pack) in hashed


def test_signature_check_takes_a_known_file_hash(mlp_pack, tmp_path):
    """runtime.signature.check compares the statement's digest with the hash it is given instead of hashing
    (the loader passes a recorded one); a wrong one is refused like a wrong file."""
    from aotpack_runtime import signature as rt_signature

    pytest.importorskip("cryptography")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pytest.importorskip("model_signing")
    from aotpack.signing import sign

    pack = _copy(mlp_pack.path, tmp_path)
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "k.priv").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    (tmp_path / "k.pub").write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                                   serialization.PublicFormat.SubjectPublicKeyInfo))
    sign(str(pack), str(tmp_path / "k.priv"))
    sha = hashlib.sha256(pack.read_bytes()).hexdigest()
    assert rt_signature.check(pack, None, tmp_path / "k.pub", file_sha256=sha).file_sha256 == sha
    with pytest.raises(aotpack.ArchiveError) as info:
        rt_signature.check(pack, None, tmp_path / "k.pub", file_sha256="1" * 64)
    assert_facts(str(info.value), "not for this file", f"sha256 {sha}", "1" * 64)


def test_verify_mode_is_checked(mlp_pack):
    with pytest.raises(aotpack.ArchiveError) as info:
        aotpack.load(mlp_pack.path, verify="none")
    assert_facts(info.value.reason, "verify='none'", "not a verify mode", "'auto'", "'full'")


def test_parallel_check_reports_the_first_bad_blob_in_table_order(mlp_pack, tmp_path):
    pack = _copy(mlp_pack.path, tmp_path)
    a = Archive.open(pack)
    total = sum(b.size for b in a.manifest.blobs)
    assert a.check_blobs(threads=1) == total == a.check_blobs(threads=4)
    names = [b.name for b in a.manifest.blobs]
    _corrupt(pack, names[-1])
    _corrupt(pack, names[1])
    for threads in (1, 4):
        with pytest.raises(aotpack.ArchiveError) as info:
            Archive.open(pack).check_blobs(threads=threads)
        assert info.value.reason.startswith(f"hash mismatch in blob {names[1]!r}") or \
            info.value.reason.startswith(f"blob {names[1]!r}: zstd data is corrupt")


def test_holes_of_a_sparse_file_hash_as_zeros(tmp_path):
    """A blob of zeros written as a hole (the writer leaves one for each run of zeros) checks like the same
    bytes written out, and reads back as zeros."""
    from aotpack.package import WRITE_CHUNK, Blob, write_archive

    t = torch.zeros(3 * WRITE_CHUNK + 100, dtype=torch.uint8)
    t[WRITE_CHUNK + 5] = 7
    manifest = smallest_manifest("w")
    sparse = tmp_path / "sparse.pack"
    dense = tmp_path / "dense.pack"
    write_archive(sparse, manifest, [Blob("w", t, compressible=False), Blob("z", torch.zeros(10))], level=3)
    write_archive(dense, manifest, [Blob("w", bytes(t.tolist()), compressible=False),
                                    Blob("z", bytes(40), compressible=False)], level=3)
    assert sparse.read_bytes() == dense.read_bytes()
    assert os.stat(sparse).st_blocks * 512 < 2 * WRITE_CHUNK  # the zero chunks take no room on disk
    a = Archive.open(sparse)
    a.verify()
    assert bytes(a.map_blob("w", checked=True)) == bytes(t.tolist())


# -- one open, regular files only ------------------------------------------------------------------------------

@contextlib.contextmanager
def fifo(path):
    """A FIFO at ``path`` with a writer that opens it and closes it at once: a reader that opens the FIFO
    without O_NONBLOCK meets that writer and reads an empty file, never hangs; one that does not wait for a
    writer is refused before it reads. The writer is released at the end either way."""
    os.mkfifo(path)

    def writer():
        os.close(os.open(path, os.O_WRONLY))

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        release = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a writer still waiting for a reader goes on
        thread.join()
        os.close(release)


def test_only_a_regular_file_is_a_pack(tmp_path):
    """A FIFO would block a reader until a writer comes, a device may never end, a directory is no file:
    each is refused at once, by what it is, by load and by `aotpack verify`."""
    with fifo(tmp_path / "pipe.pack") as pipe:
        with pytest.raises(aotpack.ArchiveError) as info:
            aotpack.load(pipe, cache_dir=tmp_path / "cache")
        assert_facts(info.value.reason, "FIFO", "not a regular file")
        result = run_verify(str(pipe))
        assert not result["ok"] and result["checks"][0]["check"] == "format"
        assert_facts(result["checks"][0]["detail"], "FIFO", "not a regular file")
    with pytest.raises(aotpack.ArchiveError) as info:
        aotpack.load(os.devnull, cache_dir=tmp_path / "cache")
    assert_facts(info.value.reason, "character device", "not a regular file")
    with pytest.raises(aotpack.ArchiveError) as info:
        aotpack.load(tmp_path, cache_dir=tmp_path / "cache", expected_sha256="0" * 64)
    assert_facts(info.value.reason, "directory", "not a regular file")


def test_a_pin_checks_the_file_the_load_reads(mlp_pack, tmp_path, settle_now, monkeypatch):
    """The path names a modified pack and is swapped to the pinned pack while the pin is checked (a symlink an
    attacker controls, swapped deterministically inside the check): the pin is compared with the hash of the
    file the load reads, so the load is refused and nothing vouches for the modified file afterwards."""
    from aotpack_runtime import loader

    good = _copy(mlp_pack.path, tmp_path)
    bad = tmp_path / "bad.pack"
    bad.write_bytes(with_manifest(good.read_bytes(), lambda m: m["producer"].update(aotpack="modified")))
    link = tmp_path / "link.pack"
    link.symlink_to(bad)
    monkeypatch.setattr(loader, "_check_pin", swap_link_during(link, good, bad, loader._check_pin))
    pin = hashlib.sha256(good.read_bytes()).hexdigest()
    c = tmp_path / "cache"
    with pytest.raises(aotpack.ArchiveError) as info:
        aotpack.load(link, cache_dir=c, expected_sha256=pin)
    assert info.value.reason.startswith(f"sha256 mismatch: expected {pin}, actual "
                                        f"{hashlib.sha256(bad.read_bytes()).hexdigest()}")
    assert _record_files(c) == []


# -- the code cache ------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["lib writable by others", "lib a symbolic link", "root writable by others",
                                    "lib a file"])
def test_a_cache_folder_others_could_write_is_refused(mlp_pack, tmp_path, damage):
    """Whoever can write the folder native code is loaded from runs code in this process: a cache folder that
    is not this user's private folder is an ArchiveError naming it, before any code is loaded from it."""
    c = tmp_path / "cache"
    aotpack.load(mlp_pack.path, cache_dir=c)
    lib = c / "lib"
    if damage == "lib writable by others":
        os.chmod(lib, 0o777)
        folder, problem = lib, "writable by other users (mode 0777)"
    elif damage == "lib a symbolic link":
        lib.rename(tmp_path / "elsewhere")
        lib.symlink_to(tmp_path / "elsewhere")
        folder, problem = lib, "a symbolic link"
    elif damage == "root writable by others":
        os.chmod(c, 0o777)
        folder, problem = c, "writable by other users (mode 0777)"
    else:
        shutil.rmtree(lib)
        lib.write_bytes(b"")
        with pytest.raises(aotpack.ArchiveError) as info:
            aotpack.load(mlp_pack.path, cache_dir=c)
        assert info.value.reason.startswith(f"cannot create the code cache folder {lib}")
        return
    with pytest.raises(aotpack.ArchiveError) as info:
        aotpack.load(mlp_pack.path, cache_dir=c)
    assert str(info.value).startswith(f"the code cache folder {folder} is {problem}")
    assert "chmod 700" in str(info.value)


_SWAP = """
import os, sys, torch, aotpack_runtime
from aotpack_runtime import _torch as rt
pack, cache_dir, sha, mode = sys.argv[1:]
lib = os.path.join(cache_dir, "lib", sha + ".so")
if mode == "fifo":  # a FIFO where the library would be: never opened for reading as a library
    os.makedirs(os.path.dirname(lib), mode=0o700, exist_ok=True)
    os.mkfifo(lib)
real = rt.cpu_runner

def swap_then_load(path, n):  # another file renamed over the cached library between its check and its load
    if mode == "swap":
        with open(lib + ".new", "wb") as f:
            f.write(open(sys.executable, "rb").read(4096))
        os.replace(lib + ".new", lib)
    return real(path, n)

rt.cpu_runner = swap_then_load
pkg = aotpack_runtime.load(pack, cache_dir=cache_dir)
args, kwargs = pkg.example_inputs()
with torch.no_grad():
    print(pkg(*args, **kwargs).shape)
"""


@pytest.mark.parametrize("mode", ["swap", "fifo"])
def test_the_library_loaded_is_the_one_hashed(mlp_pack, tmp_path, mode):
    """The cached library is hashed through a descriptor and loaded through it: a file renamed over its name
    after the check (here inside the load, deterministically) is not what runs; a FIFO at its name is no
    cached library. In fresh processes, first with an empty cache, then with the library cached."""
    import subprocess
    import sys

    sha = Archive.open(mlp_pack.path).manifest.blob("code/0.so").sha256
    script = tmp_path / "swap.py"
    script.write_text(_SWAP)
    for run in range(2):
        c = tmp_path / f"cache-{mode}-{run}" if mode == "fifo" else tmp_path / "cache"
        proc = subprocess.run([sys.executable, str(script), str(mlp_pack.path), str(c), sha, mode],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip() == "torch.Size([8, 10])"


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.95, 100])
def test_a_truncated_library_with_its_hashes_fixed_is_refused(mlp_pack, tmp_path, cut):
    """The dynamic loader maps what the program headers say: segments past the end of a truncated library
    are a SIGBUS inside it. The ELF headers are checked first. In a fresh process, so that a crash is a
    failed test."""
    from conftest import run_python

    data = mlp_pack.path.read_bytes()
    library = Archive.open(mlp_pack.path).read_blob("code/0.so")
    keep = int(len(library) * cut) if cut < 1 else cut
    pack = tmp_path / "cut.pack"
    pack.write_bytes(with_blob(data, "code/0.so", bytes(library[:keep])))
    proc = run_python(f"""
import aotpack_runtime
try:
    aotpack_runtime.load({str(pack)!r}, cache_dir={str(tmp_path / 'cache')!r})
    print("LOADED")
except aotpack_runtime.ArchiveError as e:
    print(e.reason)
""")
    assert proc.returncode == 0, f"the process died ({proc.returncode}): {proc.stderr[-2000:]}"
    assert proc.stdout.startswith("blob 'code/0.so' is not a loadable shared object: "), proc.stdout
