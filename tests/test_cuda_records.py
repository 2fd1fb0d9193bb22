"""An entry's `cuda` record and its kernels, checked on a host without a GPU: the kernel folder in the code
cache, and damaged `cuda` sections, each an ArchiveError that names the field, never another exception."""
from __future__ import annotations

import hashlib
import os
import stat
import warnings

import pytest

import aotpack
from aotpack_runtime import cache
from aotpack_runtime import format as fmt
from aotpack_runtime.errors import AotpackWarning
from archive_tools import join, split
from helpers import assert_facts
from cuda_packs import add_blobs, kernel0, make_cuda_pack


# ---------------------------------------------------------------------------------------------------
# The kernel folder in the code cache


def _files(contents: dict[str, bytes]) -> dict[str, str]:
    return {n: hashlib.sha256(d).hexdigest() for n, d in contents.items()}


def test_kernel_folder_is_content_addressed_and_rechecked(tmp_path):
    contents = {"a.cubin": b"A" * 100, "b.fatbin": b"B" * 7}
    files = _files(contents)
    assert cache.lookup_dir(str(tmp_path), files) is None
    path = cache.store_dir(str(tmp_path), files, contents)
    assert path == os.path.join(str(tmp_path), "kernels", cache.bundle_digest(files))
    assert sorted(os.listdir(path)) == ["a.cubin", "b.fatbin"]
    assert (tmp_path / "kernels" / os.path.basename(path) / "a.cubin").read_bytes() == contents["a.cubin"]
    assert not stat.S_IMODE(os.stat(os.path.join(path, "a.cubin")).st_mode) & 0o222  # read-only
    assert [n for n in os.listdir(tmp_path / "kernels") if n.endswith(".tmp")] == []
    assert cache.lookup_dir(str(tmp_path), files) == path
    # A damaged file is not trusted: the folder is not found, and storing it again replaces it.
    target = os.path.join(path, "b.fatbin")
    os.chmod(target, 0o644)
    with open(target, "wb") as f:
        f.write(b"evil!!!")
    assert cache.lookup_dir(str(tmp_path), files) is None
    assert cache.store_dir(str(tmp_path), files, contents) == path
    assert cache.lookup_dir(str(tmp_path), files) == path
    assert sorted(os.listdir(tmp_path / "kernels")) == [os.path.basename(path)]
    # Another set of files is another folder; an intact folder already there is reused.
    other = {"a.cubin": b"C"}
    assert cache.store_dir(str(tmp_path), _files(other), other) != path
    assert cache.store_dir(str(tmp_path), files, contents) == path


def test_kernel_folder_refuses_path_names(tmp_path):
    for name in ("../x", "a/b", "..", ""):
        with pytest.raises(aotpack.ArchiveError, match="not a plain file name"):
            cache.lookup_dir(str(tmp_path), {name: "0" * 64})


# ---------------------------------------------------------------------------------------------------
# Damaged cuda sections: ArchiveError naming the field, never another exception


DAMAGE = [
    ("missing cuda", lambda m: m["entries"][1].pop("cuda"), "manifest.entries[1] lacks the field 'cuda'"),
    ("cuda not an object", lambda m: m["entries"][1].update(cuda=[]),
     "manifest.entries[1].cuda must be an object, found list"),
    ("archs not a list", lambda m: m["entries"][1]["cuda"].update(archs="sm_80"),
     "manifest.entries[1].cuda.archs must be a list, found str"),
    ("bad arch", lambda m: m["entries"][1]["cuda"].update(archs=["sm_80", "sm_9"]),
     "manifest.entries[1].cuda.archs[1] is 'sm_9', not a CUDA SASS architecture (sm_ followed by the compute "
     "capability's digits, e.g. sm_80, sm_90a, sm_100f)"),
    ("ptx in archs", lambda m: kernel0(m).update(archs=["compute_80"]),
     "manifest.entries[1].cuda.kernels[0].archs[0] is 'compute_80', not a CUDA SASS architecture (sm_ followed by "
     "the compute capability's digits, e.g. sm_80, sm_90a, sm_100f)"),
    ("bad ptx", lambda m: kernel0(m).update(ptx=["compute_8.0"]),
     "manifest.entries[1].cuda.kernels[0].ptx[0] is 'compute_8.0', not a CUDA PTX architecture (compute_ followed "
     "by the compute capability's digits, e.g. compute_80, compute_90a)"),
    ("flag not a bool", lambda m: m["entries"][1]["cuda"].update(built_without_gpu="yes"),
     "manifest.entries[1].cuda.built_without_gpu must be a boolean, found str"),
    ("build_gpu a number", lambda m: m["entries"][1]["cuda"].update(build_gpu=3),
     "manifest.entries[1].cuda.build_gpu must be a string or null, found int"),
    ("missing cuda_version", lambda m: m["entries"][1]["cuda"].pop("cuda_version"),
     "manifest.entries[1].cuda lacks the field 'cuda_version'"),
    ("kernels not a list", lambda m: m["entries"][1]["cuda"].update(kernels={}),
     "manifest.entries[1].cuda.kernels must be a list, found dict"),
    ("kernel not an object", lambda m: m["entries"][1]["cuda"]["kernels"].append("k"),
     "manifest.entries[1].cuda.kernels[2] must be a JSON object, found str"),
    ("file with a slash", lambda m: kernel0(m).update(file="kernels/1/czr733aa11.fatbin"),
     "manifest.entries[1].cuda.kernels[0].file 'kernels/1/czr733aa11.fatbin' must be a plain file name (letters, "
     "digits and '._-', no '/', at most 255 characters)"),
    ("file dot dot", lambda m: kernel0(m).update(file=".."),
     "manifest.entries[1].cuda.kernels[0].file '..' must be a plain file name (letters, digits and '._-', no '/', "
     "at most 255 characters)"),
    ("file not the blob's name", lambda m: kernel0(m).update(file="other.fatbin"),
     "manifest.entries[1].cuda.kernels[0].file is 'other.fatbin' but its blob 'kernels/1/czr733aa11.fatbin' ends "
     "in 'czr733aa11.fatbin'; they must be the same name"),
    ("missing blob", lambda m: kernel0(m).update(blob="kernels/1/nope.fatbin", file="nope.fatbin"),
     "manifest.entries[1].cuda.kernels[0].blob 'kernels/1/nope.fatbin' is not in the blob table"),
    ("blob traversal", lambda m: kernel0(m).update(blob="../x.fatbin", file="x.fatbin"),
     "manifest.entries[1].cuda.kernels[0].blob '../x.fatbin' is not a valid blob name"),
    ("size mismatch", lambda m: kernel0(m).update(size=5),
     "manifest.entries[1].cuda.kernels[0].size is 5 but blob 'kernels/1/czr733aa11.fatbin' holds 1004 bytes"),
    ("num_warps a bool", lambda m: kernel0(m).update(num_warps=True),
     "manifest.entries[1].cuda.kernels[0].num_warps must be an integer or null, found a boolean"),
    ("num_warps too many", lambda m: kernel0(m).update(num_warps=4096),
     "manifest.entries[1].cuda.kernels[0].num_warps is 4096, outside 0..1024"),
    ("negative shared_mem", lambda m: kernel0(m).update(shared_mem=-1),
     "manifest.entries[1].cuda.kernels[0].shared_mem is -1, outside 0..1099511627776"),
    ("kernel name missing", lambda m: kernel0(m).pop("name"),
     "manifest.entries[1].cuda.kernels[0] lacks the field 'name'"),
    ("cpu guard in a cuda entry", lambda m: m["entries"][1]["leaves"][0].update(device="cpu"),
     "manifest.entries[1].leaves[0].device is 'cpu', but the entry is a cuda entry (its tensor guards must say "
     "'cuda')"),
    ("cuda guard in a cpu entry", lambda m: m["entries"][0]["leaves"][0].update(device="cuda"),
     "manifest.entries[0].leaves[0].device is 'cuda', but the entry is a cpu entry (its tensor guards must say "
     "'cpu')"),
    ("indexed guard", lambda m: m["entries"][1]["leaves"][0].update(device="cuda:1"),
     "manifest.entries[1].leaves[0].device is 'cuda:1', but the entry is a cuda entry (its tensor guards must say "
     "'cuda')"),
    ("library missing", lambda m: m["entries"][1].update(library="code/9.so"),
     "manifest refers to blob 'code/9.so', which the blob table lacks"),
    ("version 1", lambda m: m.update(format_version=1),
     "manifest.entries[1] is a CUDA entry, which format version 2 introduced, but the manifest says format version "
     "1; the pack was written by a broken or modified writer"),
]


@pytest.mark.parametrize("label,edit,reason", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_cuda_section(mlp_pack, tmp_path, label, edit, reason):
    data = make_cuda_pack(mlp_pack.path.read_bytes(), edit=edit)
    if label == "version 1":
        version, manifest, region = split(data)
        data = join(1, fmt.canonical_json(manifest), region)
    p = tmp_path / "bad.pack"
    p.write_bytes(data)
    with pytest.raises(aotpack.ArchiveError) as info:
        aotpack.load(p, cache_dir=tmp_path / "cache")
    assert info.value.reason == reason
    assert info.value.path == str(p)


def test_two_kernels_with_one_file_name(mlp_pack, tmp_path):
    """Two kernels whose blobs differ but whose file names are equal would overwrite each other."""
    data = make_cuda_pack(mlp_pack.path.read_bytes())
    _, manifest, region = split(data)
    k0 = manifest["entries"][1]["cuda"]["kernels"][0]
    region = add_blobs(manifest, region, {f"kernels/other/{k0['file']}": b"x" * k0["size"]})
    k1 = manifest["entries"][1]["cuda"]["kernels"][1]
    k1.update(blob=f"kernels/other/{k0['file']}", file=k0["file"], size=k0["size"])
    p = tmp_path / "dup.pack"
    p.write_bytes(join(2, fmt.canonical_json(manifest), region))
    with pytest.raises(aotpack.ArchiveError) as info:
        aotpack.load(p, cache_dir=tmp_path / "cache")
    assert_facts(info.value.reason, "manifest.entries[1].cuda.kernels[1].file 'czr733aa11.fatbin'",
                 "blob 'kernels/1/czr733aa11.fatbin'", "must differ")


# Wrong values of every JSON type for a field.
MUTATIONS = [None, True, -1, 2**70, 1.5, "", "sm_80", "../x", [], ["sm_80"], [1], {}, {"a": 1}]


def test_every_wrong_type_in_the_cuda_section_is_an_archive_error(mlp_pack, tmp_path):
    """A small fuzz: each field of the cuda object and of a kernel replaced by each wrong value. The load
    either raises ArchiveError or succeeds (a value that happens to be valid), and nothing else."""
    base = mlp_pack.path.read_bytes()
    cache_dir = tmp_path / "cache"
    n = 0
    for target in ("cuda", "kernel"):
        keys = ["archs", "ptx", "built_without_gpu", "autotuned", "build_gpu", "cuda_version", "kernels"] \
            if target == "cuda" else ["name", "blob", "file", "archs", "ptx", "size", "shared_mem", "num_warps"]
        for key in keys:
            for value in MUTATIONS:
                def edit(m, key=key, value=value, target=target):
                    obj = m["entries"][1]["cuda"] if target == "cuda" else kernel0(m)
                    obj[key] = value
                p = tmp_path / f"m{n}.pack"
                p.write_bytes(make_cuda_pack(base, edit=edit))
                n += 1
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", AotpackWarning)
                        aotpack.load(p, cache_dir=cache_dir)
                except aotpack.ArchiveError as e:
                    assert e.reason.startswith(("manifest.entries[1].cuda", "manifest refers to blob")), e.reason
    assert n > 150


