"""Signed packs: `aotpack sign` (OpenSSF model-signing), `aotpack verify --public-key`, and
`load(public_key=...)`, which refuses an unsigned, altered, foreign or other-pack signature before it reads
anything of the pack. The runtime checks bundles with `cryptography` alone; model-signing's own verifier and
ours must agree."""
from __future__ import annotations

import base64
import contextlib
import copy
import datetime
import hashlib
import json
import pathlib
import shutil
import subprocess
import sys
from unittest import mock

import pytest
import torch
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

import aotpack
from aotpack.signing import check_certificate, sign
from aotpack_cli.main import cli
from aotpack_runtime import _torch as rt_torch, cache, loader
from aotpack_runtime import format as fmt
from aotpack_runtime import signature as rt_signature
from aotpack_runtime.errors import ArchiveError, SigningError
from archive_tools import blob_range, with_manifest
from conftest import ROOT, run_python
from helpers import assert_facts, swap_link_during


def _write_key(folder: pathlib.Path, name: str, key) -> tuple[pathlib.Path, pathlib.Path]:
    priv, pub = folder / f"{name}.priv", folder / f"{name}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def key_id(pub: pathlib.Path) -> str:
    return hashlib.sha256(pub.read_bytes()).hexdigest()


def sha(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _usage(**on) -> x509.KeyUsage:
    flags = dict.fromkeys(["digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
                           "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"], False)
    return x509.KeyUsage(**{**flags, **on})


def _certificate(subject: str, key, issuer: str, issuer_key, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1)))
    if ca:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        b = b.add_extension(_usage(key_cert_sign=True, crl_sign=True), critical=True)
    else:
        b = b.add_extension(_usage(digital_signature=True), critical=True)
    return b.sign(issuer_key, hashes.SHA256())


class Keys:
    """Key pairs A and B (P-256), C (P-384), an RSA key, and a root CA that certified A ("release")."""

    def __init__(self, folder: pathlib.Path):
        self.a, self.a_pub = _write_key(folder, "a", ec.generate_private_key(ec.SECP256R1()))
        self.b, self.b_pub = _write_key(folder, "b", ec.generate_private_key(ec.SECP256R1()))
        self.c, self.c_pub = _write_key(folder, "c", ec.generate_private_key(ec.SECP384R1()))
        self.rsa, _ = _write_key(folder, "rsa", rsa.generate_private_key(public_exponent=65537, key_size=2048))
        a_key = serialization.load_pem_private_key(self.a.read_bytes(), None)
        root_key, other_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        self.root, self.other_root, self.a_cert = folder / "root.pem", folder / "other-root.pem", folder / "a.pem"
        self.root.write_bytes(_certificate("test root", root_key, "test root", root_key, True)
                              .public_bytes(serialization.Encoding.PEM))
        self.other_root.write_bytes(_certificate("other root", other_key, "other root", other_key, True)
                                    .public_bytes(serialization.Encoding.PEM))
        self.a_cert.write_bytes(_certificate("release", a_key, "test root", root_key, False)
                                .public_bytes(serialization.Encoding.PEM))


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Keys:
    return Keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def signed(mlp_pack, tmp_path_factory, keys) -> pathlib.Path:
    """A copy of the MLP pack, signed with key A at PACK.sig (through the API)."""
    pack = tmp_path_factory.mktemp("signed") / "mlp.pack"
    shutil.copyfile(mlp_pack.path, pack)
    assert aotpack.sign(pack, keys.a) == pathlib.Path(f"{pack}.sig")
    return pack


def _copy(signed: pathlib.Path, tmp_path: pathlib.Path, data: bytes | None = None,
          sig: bytes | None = None) -> pathlib.Path:
    """The signed pack (or ``data``) at tmp_path/m.pack with its signature (or ``sig``) at m.pack.sig."""
    pack = tmp_path / "m.pack"
    pack.write_bytes(signed.read_bytes() if data is None else data)
    pathlib.Path(f"{pack}.sig").write_bytes(pathlib.Path(f"{signed}.sig").read_bytes() if sig is None else sig)
    return pack


def _refuse(*args, **kwargs):
    raise AssertionError("the pack was parsed before its signature was checked")


def refused(pack: pathlib.Path, reason: str, untouched: bool = True, **kwargs) -> None:
    """``load(pack, **kwargs)`` raises exactly this ArchiveError; with ``untouched``, it neither parsed the
    archive (it only hashed the file) nor loaded native code first."""
    with contextlib.ExitStack() as stack:
        if untouched:
            stack.enter_context(mock.patch.object(loader.Archive, "from_fd", _refuse))
            stack.enter_context(mock.patch.object(rt_torch, "cpu_runner", _refuse))
        with pytest.raises(ArchiveError) as e:
            aotpack.load(pack, **kwargs)
    assert e.value.path == str(pack)
    assert e.value.reason == reason
    assert str(e.value) == f"{pack}: {reason}"


# -- round trips -------------------------------------------------------------------------------------

def test_signed_pack_loads_and_matches_the_unsigned_load(signed, keys, mlp_pack):
    pkg = aotpack.load(signed, public_key=keys.a_pub)
    assert pkg.manifest.target["cpu_isa"]
    with torch.no_grad():
        torch.testing.assert_close(pkg(*mlp_pack.args), aotpack.load(mlp_pack.path)(*mlp_pack.args), rtol=0, atol=0)
    aotpack.load(signed, signature=f"{signed}.sig", public_key=keys.a_pub.read_bytes())  # PEM bytes


def test_check_says_what_it_proved(signed, keys):
    s = rt_signature.check(signed, None, keys.a_pub)
    assert s == rt_signature.Signed(sha(signed), key_id(keys.a_pub), "P-256", None)
    assert s.describe() == (f"signed by key {key_id(keys.a_pub)[:16]} (P-256); covers sha256 {sha(signed)[:16]}, "
                            "this file")


def test_cli_sign_verify_run(mlp_pack, keys, tmp_path):
    pack = tmp_path / "m.pack"
    shutil.copyfile(mlp_pack.path, pack)
    sig = tmp_path / "release.sig"
    r = CliRunner().invoke(cli, ["sign", str(pack), "--key", str(keys.a), "-o", str(sig)])
    proof = f"signed by key {key_id(keys.a_pub)[:16]} (P-256); covers sha256 {sha(pack)[:16]}, this file"
    assert r.exit_code == 0, r.output
    assert r.output == f"wrote {sig}: {proof}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pack", "release.sig"]
    r = CliRunner().invoke(cli, ["verify", str(pack), "--signature", str(sig), "--public-key", str(keys.a_pub)])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[:2] == [f"{pack}: OK", f"  [ok] signature: {proof}"]
    r = CliRunner().invoke(cli, ["verify", str(pack), "--signature", str(sig), "--public-key", str(keys.a_pub),
                                 "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["checks"][0] == {"check": "signature", "ok": True, "detail": proof}
    r = CliRunner().invoke(cli, ["run", str(pack), "--signature", str(sig), "--public-key", str(keys.a_pub),
                                 "--repeat", "1"])
    assert r.exit_code == 0 and r.output.startswith("output: tensor float32[8, 10]"), r.output


def test_cli_refusals_exit_1_with_the_reason(signed, keys, tmp_path):
    pack = _copy(signed, tmp_path)
    reason = (f"signature {pack}.sig: made by another key: it names key {key_id(keys.a_pub)[:16]}, the public key "
              f"in {keys.b_pub} is key {key_id(keys.b_pub)[:16]} (sha256 of the PEM public key); check it with the "
              "signer's public key")
    r = CliRunner().invoke(cli, ["verify", str(pack), "--public-key", str(keys.b_pub)])
    assert r.exit_code == 1
    assert r.output.splitlines()[:2] == [f"{pack}: FAILED", f"  [FAIL] signature: {pack}: {reason}"]
    r = CliRunner().invoke(cli, ["run", str(pack), "--public-key", str(keys.b_pub)])
    assert r.exit_code == 1 and r.output == f"error: {pack}: {reason}\n"


def test_verify_stops_at_a_failed_signature(signed, keys, tmp_path, monkeypatch):
    """`aotpack verify` with a signature that does not check out reports it and reads nothing more: no format,
    hash or host check, and no native code loaded."""
    from aotpack.checks import verify as run_verify

    pack = _copy(signed, tmp_path)
    monkeypatch.setattr(rt_torch, "cpu_runner", _refuse)
    monkeypatch.setattr(loader.Archive, "from_fd", _refuse)
    result = run_verify(str(pack), public_key=str(keys.b_pub))
    assert not result["ok"] and [c["check"] for c in result["checks"]] == ["signature"]
    assert "made by another key" in result["checks"][0]["detail"]


def test_verify_checks_the_signature_of_the_file_it_reads(signed, keys, tmp_path, monkeypatch):
    """`aotpack verify` hashes the pack through the descriptor it then reads, checks and loads: a path swapped
    to the signed pack only while the signature is checked (deterministically, inside the check) fails the
    signature instead of passing it and loading the modified pack."""
    from aotpack import checks

    good = _copy(signed, tmp_path)
    bad = tmp_path / "bad.pack"
    bad.write_bytes(_tampered(signed))
    link = tmp_path / "link.pack"
    pathlib.Path(f"{link}.sig").write_bytes(pathlib.Path(f"{signed}.sig").read_bytes())
    link.symlink_to(bad)
    monkeypatch.setattr(checks.rt_signature, "check", swap_link_during(link, good, bad, rt_signature.check))
    monkeypatch.setattr(rt_torch, "cpu_runner", _refuse)
    result = checks.verify(str(link), public_key=str(keys.a_pub))
    assert not result["ok"] and [c["check"] for c in result["checks"]] == ["signature"]
    assert f"this file is {sha(bad)}" in result["checks"][0]["detail"]


def test_a_signature_or_key_that_is_not_a_regular_file_is_refused_at_once(signed, keys, tmp_path):
    """A FIFO given as the signature or the public key would block its reader until a writer comes: it is
    refused at once, as a directory is."""
    from test_load_checks import fifo

    pack = _copy(signed, tmp_path)
    with fifo(tmp_path / "sig.pipe") as pipe:
        refused(pack, f"the signature {pipe} is a FIFO (named pipe), not a regular file; pass the file itself",
                untouched=False, signature=pipe, public_key=keys.a_pub)
    with fifo(tmp_path / "key.pipe") as pipe:
        refused(pack, f"the public key {pipe} is a FIFO (named pipe), not a regular file; pass the file itself",
                untouched=False, public_key=pipe)
    refused(pack, f"the signature {tmp_path} is a directory, not a regular file; pass the file itself",
            untouched=False, signature=tmp_path, public_key=keys.a_pub)


@pytest.mark.parametrize("args, message", [
    (["verify", "P", "--signature", "S"], "--signature needs --public-key (or --certificate-chain) to check it with"),
    (["run", "P", "--signature", "S"], "--signature needs --public-key to check it with"),
    (["sign", "P", "--key", "K", "--chain", "C"], "--chain goes with --certificate"),
])
def test_cli_usage_errors_exit_2(args, message):
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2 and f"Error: {message}" in r.output


# -- refusals --------------------------------------------------------------------------------------------

def _flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x01
    return bytes(out)


@pytest.mark.parametrize("where", ["header", "manifest", "weights/0", "code/0.so", "source/0/kernel.cpp",
                                   "example/0", "last byte"])
def test_a_flipped_byte_anywhere_is_refused_before_the_pack_is_read(signed, keys, tmp_path, where):
    data = signed.read_bytes()
    if where == "header":
        offset = 30  # inside the manifest's sha256
    elif where == "manifest":
        offset = 56 + 100
    elif where == "last byte":
        offset = len(data) - 1
    else:
        start, end = blob_range(data, where)
        offset = (start + end) // 2
    pack = _copy(signed, tmp_path, _flip(data, offset))
    cache = tmp_path / "cache"
    refused(pack, f"signature {pack}.sig: is not for this file: it covers sha256 {sha(signed)}, this file is "
                  f"{sha(pack)}; the pack was modified after it was signed, or the signature belongs to another pack",
            public_key=keys.a_pub, cache_dir=cache)
    assert not cache.exists()


def test_a_signature_from_another_key(signed, keys, tmp_path):
    pack = _copy(signed, tmp_path)
    refused(pack, f"signature {pack}.sig: made by another key: it names key {key_id(keys.a_pub)[:16]}, the public "
                  f"key in {keys.b_pub} is key {key_id(keys.b_pub)[:16]} (sha256 of the PEM public key); check it "
                  "with the signer's public key", public_key=keys.b_pub)


def test_a_signature_from_another_key_without_a_key_hint(signed, keys, tmp_path):
    """Bundles from older signers carry no key hint: then the ECDSA check itself refuses the wrong key."""
    bundle = json.loads(pathlib.Path(f"{signed}.sig").read_text())
    del bundle["verificationMaterial"]["publicKey"]
    pack = _copy(signed, tmp_path, sig=json.dumps(bundle).encode())
    refused(pack, f"signature {pack}.sig: does not verify with the public key in {keys.b_pub}: the signature file "
                  "was altered, or it was made by another key; get the signature and public key from the release "
                  "again", public_key=keys.b_pub)
    assert rt_signature.check(pack, None, keys.a_pub).key_id == key_id(keys.a_pub)


def test_a_missing_signature_when_one_is_required(signed, keys, tmp_path):
    pack = tmp_path / "m.pack"
    shutil.copyfile(signed, pack)
    refused(pack, f"unsigned: no signature at {pack}.sig, and a public key was given, so one is required; ship the "
                  "signature `aotpack sign` wrote beside the pack, or name it (signature= / --signature)",
            public_key=keys.a_pub)
    refused(pack, f"unsigned: no signature at {tmp_path}/other.sig, and a public key was given, so one is required; "
                  "ship the signature `aotpack sign` wrote beside the pack, or name it (signature= / --signature)",
            signature=tmp_path / "other.sig", public_key=keys.a_pub)


def test_a_signature_without_a_key_is_an_error(signed, keys):
    refused(signed, "a signature was given but no public key to check it with: pass public_key= (the signer's PEM "
                    "public key)", signature=f"{signed}.sig")


def test_a_signature_of_another_pack(signed, keys, tmp_path):
    """Another valid pack (same model, one manifest field changed), properly signed by the same key: its
    signature does not cover this pack, and this pack's does not cover it."""
    other = tmp_path / "other.pack"
    other.write_bytes(with_manifest(signed.read_bytes(), lambda m: m["producer"].update(python="3.12.0")))
    sign(other, keys.a)
    pack = _copy(signed, tmp_path, sig=pathlib.Path(f"{other}.sig").read_bytes())
    refused(pack, f"signature {pack}.sig: is not for this file: it covers sha256 {sha(other)}, this file is "
                  f"{sha(pack)}; the pack was modified after it was signed, or the signature belongs to another pack",
            public_key=keys.a_pub)


def _tampered(signed: pathlib.Path) -> bytes:
    """The signed pack with its manifest changed and its hash fixed: a valid pack, not the signed one."""
    return with_manifest(signed.read_bytes(), lambda m: m["producer"].update(aotpack="tampered"))


def test_a_file_swapped_between_the_checks_is_never_the_one_loaded(signed, keys, tmp_path, monkeypatch):
    """The path names a tampered pack, and is swapped to the signed pack while the signature is checked and
    back afterwards (a symlink an attacker controls; made deterministic here by swapping inside the check).
    The check hashes the file the load reads, through its one descriptor: the load is refused, and no record
    vouches for the tampered file, so a later load without the attacker is refused too."""
    good = _copy(signed, tmp_path)
    bad = tmp_path / "bad.pack"
    bad.write_bytes(_tampered(signed))
    link = tmp_path / "link.pack"
    pathlib.Path(f"{link}.sig").write_bytes(pathlib.Path(f"{signed}.sig").read_bytes())
    link.symlink_to(bad)
    monkeypatch.setattr(rt_signature, "check", swap_link_during(link, good, bad, rt_signature.check))
    monkeypatch.setattr(cache, "SETTLE_SECONDS", 0.0)
    c = tmp_path / "cache"
    with pytest.raises(ArchiveError, match=f"is not for this file: it covers sha256 {sha(good)}, this file is "
                                           f"{sha(bad)}"):
        aotpack.load(link, cache_dir=c, public_key=keys.a_pub)
    monkeypatch.undo()
    with pytest.raises(ArchiveError, match="is not for this file"):
        aotpack.load(link, cache_dir=c, public_key=keys.a_pub)


def test_a_file_replaced_while_it_is_checked_is_refused(signed, keys, tmp_path, monkeypatch):
    """A file renamed over the pack while its signature is checked is never read (the load keeps the file it
    hashed), and the file it hashed changed meanwhile (its link count, so its change time): the load is
    refused, and nothing is recorded for either file."""
    pack = _copy(signed, tmp_path)
    real = rt_signature.check

    def check_then_replace(*args, **kwargs):
        result = real(*args, **kwargs)
        replacement = tmp_path / "new.pack"
        replacement.write_bytes(_tampered(signed))
        replacement.replace(pack)  # a deploy renaming another file over the pack, or an attacker
        return result

    monkeypatch.setattr(rt_signature, "check", check_then_replace)
    monkeypatch.setattr(cache, "SETTLE_SECONDS", 0.0)
    refused(pack, "the file was changed while its hash was being checked; load it again once it is in place",
            untouched=False, public_key=keys.a_pub, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "checked").exists()
    monkeypatch.undo()
    with pytest.raises(ArchiveError, match="is not for this file"):
        aotpack.load(pack, cache_dir=tmp_path / "cache", public_key=keys.a_pub)


# -- malformed signatures and keys ----------------------------------------------------------------------

def _bundle(signed: pathlib.Path) -> dict:
    return json.loads(pathlib.Path(f"{signed}.sig").read_text())


def _pae(payload: bytes) -> bytes:
    t = b"application/vnd.in-toto+json"
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def resign(bundle: dict, statement: dict | bytes, key: pathlib.Path) -> dict:
    """``bundle`` with its payload replaced by ``statement`` and signed by ``key`` (DSSE, ECDSA P-256)."""
    payload = statement if isinstance(statement, bytes) else json.dumps(statement).encode()
    private = serialization.load_pem_private_key(key.read_bytes(), None)
    out = json.loads(json.dumps(bundle))
    out["dsseEnvelope"]["payload"] = base64.b64encode(payload).decode()
    out["dsseEnvelope"]["signatures"] = [
        {"sig": base64.b64encode(private.sign(_pae(payload), ec.ECDSA(hashes.SHA256()))).decode(), "keyid": ""}]
    return out


def _statement(bundle: dict) -> dict:
    return json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))


def _edit(bundle: dict, fn) -> dict:
    out = json.loads(json.dumps(bundle))
    fn(out)
    return out


def _edit_statement(fn):
    def edit(bundle, keys):
        st = _statement(bundle)
        fn(st)
        return resign(bundle, st, keys.a)
    return edit


SIG = "signature {sig}"
MALFORMED = {
    "garbage": (lambda b, k: b"\x00\xffnot json", SIG + " is not UTF-8 (byte 1)"),
    "empty": (lambda b, k: b"", SIG + " is not valid JSON: Expecting value at line 1 column 1"),
    "a huge number": (lambda b, k: b'{"n": ' + b"9" * 1000 + b"}",
                      SIG + f" holds an integer of 1000 digits (at most {fmt.MAX_INT_DIGITS})"),
    "a JSON list": (lambda b, k: b"[]", SIG + " is not a Sigstore bundle (a JSON object); expected the file "
                                              "`aotpack sign` writes"),
    "duplicate keys": (lambda b, k: b'{"mediaType": "x", "mediaType": "y"}', SIG + " has a duplicate key 'mediaType'"),
    "too large": (lambda b, k: b" " * (rt_signature.MAX_SIGNATURE_BYTES + 1),
                  SIG + f" is over {rt_signature.MAX_SIGNATURE_BYTES} bytes; a signature bundle is a few KB: this is "
                        "not one"),
    "media type": (lambda b, k: _edit(b, lambda x: x.update(mediaType="application/json")),
                   SIG + " has media type 'application/json', expected "
                         "'application/vnd.dev.sigstore.bundle.v0.3+json' (the Sigstore bundle `aotpack sign` and "
                         "model-signing write)"),
    "no envelope": (lambda b, k: _edit(b, lambda x: x.pop("dsseEnvelope")),
                    SIG + " lacks dsseEnvelope: expected a bundle holding a DSSE envelope, as model-signing writes"),
    "payload type": (lambda b, k: _edit(b, lambda x: x["dsseEnvelope"].update(payloadType="text/plain")),
                     SIG + ": the envelope's payload type is 'text/plain', expected 'application/vnd.in-toto+json'"),
    "two signatures": (lambda b, k: _edit(b, lambda x: x["dsseEnvelope"]["signatures"].append(
        x["dsseEnvelope"]["signatures"][0])), SIG + ": the envelope has 2 signatures, expected one"),
    "bad base64": (lambda b, k: _edit(b, lambda x: x["dsseEnvelope"].update(payload="!!")),
                   SIG + ": the envelope's payload is not valid base64"),
    "altered signature": (lambda b, k: _edit(b, lambda x: x["dsseEnvelope"]["signatures"][0].update(
        sig=base64.b64encode(b"\x30\x06\x02\x01\x01\x02\x01\x01").decode())),
        SIG + ": does not verify with the public key in {pub}: the signature file was altered, or it was made by "
              "another key; get the signature and public key from the release again"),
    "altered statement": (lambda b, k: _edit(b, lambda x: x["dsseEnvelope"].update(payload=base64.b64encode(
        base64.b64decode(x["dsseEnvelope"]["payload"]).replace(b"sha256", b"sha257")).decode())),
        SIG + ": does not verify with the public key in {pub}: the signature file was altered, or it was made by "
              "another key; get the signature and public key from the release again"),
    "not a statement": (_edit_statement(lambda s: s.update(_type="https://example.com/Other")),
                        SIG + ": the signed statement has type 'https://example.com/Other', expected "
                              "'https://in-toto.io/Statement/v1'"),
    "other predicate": (_edit_statement(lambda s: s.update(predicateType="https://slsa.dev/provenance/v1")),
                        SIG + ": the signed statement has predicate type 'https://slsa.dev/provenance/v1', expected "
                              "'https://model_signing/signature/v1.0' (model-signing)"),
    "shard hashes": (_edit_statement(lambda s: s["predicate"]["serialization"].update(method="shards")),
                     SIG + ": the signed statement hashes with method 'shards' and 'sha256', expected 'files' and "
                           "'sha256' (sign the pack with `aotpack sign`)"),
    "a folder": (_edit_statement(lambda s: s["predicate"]["resources"].append(dict(s["predicate"]["resources"][0],
                                                                                   name="other"))),
                 SIG + ": the signed statement covers 2 files, expected one: sign the pack file itself "
                       "(`aotpack sign PACK`), not a folder"),
    "short digest": (_edit_statement(lambda s: s["predicate"]["resources"][0].update(digest="abc")),
                     SIG + ": the signed statement has a resource that is not a sha256 digest (64 lowercase hex "
                           "digits)"),
    "subject mismatch": (_edit_statement(lambda s: s["subject"][0]["digest"].update(sha256="0" * 64)),
                         SIG + ": the signed statement has a subject that does not match its resources (expected "
                               "one subject with sha256 {root})"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_signature_is_refused(signed, keys, tmp_path, case):
    make, template = MALFORMED[case]
    sig = make(_bundle(signed), keys)
    pack = _copy(signed, tmp_path, sig=sig if isinstance(sig, bytes) else json.dumps(sig).encode())
    root = hashlib.sha256(bytes.fromhex(sha(signed))).hexdigest()
    refused(pack, template.format(sig=f"{pack}.sig", pub=keys.a_pub, root=root), public_key=keys.a_pub)


def test_bad_public_keys(signed, keys, tmp_path):
    refused(signed, f"the public key in {keys.a} is a private key: pass the signer's public key (key.pub), and "
                    "keep the private key where the packs are signed", public_key=keys.a)
    refused(signed, "the public key given is not a PEM public key or certificate: pass the signer's public key "
                    "(key.pub)", public_key=b"not a key")
    rsa_pub = tmp_path / "rsa.pub"
    rsa_pub.write_bytes(serialization.load_pem_private_key(keys.rsa.read_bytes(), None).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    refused(signed, f"the public key in {rsa_pub} is RSAPublicKey; signatures are checked with an elliptic-curve "
                    "key on P-256, P-384, P-521", public_key=rsa_pub)
    refused(signed, f"cannot read the public key {tmp_path}/none.pub: No such file or directory",
            public_key=tmp_path / "none.pub")


def test_checking_without_cryptography_says_what_to_install(signed, keys, monkeypatch):
    monkeypatch.setitem(sys.modules, "cryptography", None)  # import cryptography now raises ImportError
    refused(signed, "cannot check the signature: the 'cryptography' package is not installed; pip install "
                    "cryptography (or aotpack[sign])", public_key=keys.a_pub)


def test_a_p384_key_signs_and_verifies(signed, keys, tmp_path):
    pack = tmp_path / "m.pack"
    shutil.copyfile(signed, pack)
    _, proof = sign(pack, keys.c)
    assert proof.curve == "P-384" and proof.key_id == key_id(keys.c_pub)
    aotpack.load(pack, public_key=keys.c_pub)


# -- signing side -------------------------------------------------------------------------------------------

def test_sign_refuses_unusable_keys(signed, keys, tmp_path):
    pack = _copy(signed, tmp_path)
    encrypted = tmp_path / "enc.priv"
    encrypted.write_bytes(serialization.load_pem_private_key(keys.a.read_bytes(), None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    cases = [
        (keys.a_pub, f"{keys.a_pub} is not a PEM private key (that is a public key: sign with the private key)"),
        (keys.rsa, f"the private key {keys.rsa} is RSAPrivateKey; sign with an elliptic-curve key on P-256 (or "
                   "P-384, P-521), e.g. `openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 "
                   "-nocrypt -out key.priv`"),
        (encrypted, f"the private key {encrypted} is encrypted; aotpack sign takes an unencrypted PEM key (keep it "
                    "in the release job's secret store)"),
        (tmp_path / "none.priv", f"cannot read the private key {tmp_path}/none.priv: No such file or directory"),
    ]
    for key, message in cases:
        with pytest.raises(SigningError) as e:
            sign(pack, key, tmp_path / "out.sig")
        assert str(e.value) == message
        assert not (tmp_path / "out.sig").exists()


def test_sign_refuses_a_damaged_pack(signed, keys, tmp_path):
    data = signed.read_bytes()
    start, end = blob_range(data, "weights/0")
    pack = _copy(signed, tmp_path, _flip(data, start + 10))
    with pytest.raises(ArchiveError) as e:
        sign(pack, keys.a, tmp_path / "out.sig")
    assert_facts(str(e.value), str(pack), "hash mismatch", "blob 'weights/0'", "corrupt or was modified")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pack", "m.pack.sig"]


def test_sign_without_model_signing_says_how_to_install_it(signed, keys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "model_signing", None)  # import model_signing now raises ImportError
    pack = _copy(signed, tmp_path)
    r = CliRunner().invoke(cli, ["sign", str(pack), "--key", str(keys.a), "-o", str(tmp_path / "out.sig")])
    assert r.exit_code == 1
    assert r.output.startswith("error: signing needs the model-signing package, which is not importable (")
    assert r.output.endswith("); pip install 'aotpack[sign]' (model-signing 1.1.1 and pyopenssl)\n")
    assert not (tmp_path / "out.sig").exists()
    assert rt_signature.check(pack, None, keys.a_pub)  # checking needs no model-signing


# -- model-signing interoperability ----------------------------------------------------------------------------

def test_model_signing_and_the_runtime_agree(signed, keys, tmp_path):
    """A bundle model-signing writes through its own API verifies with the runtime; a bundle `aotpack sign`
    wrote, and one made here from the DSSE spec with cryptography alone, verify with model-signing; both
    verifiers refuse an altered pack."""
    from model_signing import signing, verifying

    pack = _copy(signed, tmp_path)
    own = tmp_path / "own.sig"
    signing.Config().use_elliptic_key_signer(private_key=keys.b).sign(pack, own)
    assert rt_signature.check(pack, own, keys.b_pub).key_id == key_id(keys.b_pub)

    verifier = verifying.Config().use_elliptic_key_verifier(public_key=keys.a_pub)
    verifier.verify(pack, f"{pack}.sig")
    handmade = tmp_path / "handmade.sig"
    handmade.write_text(json.dumps(resign(_bundle(signed), _statement(_bundle(signed)), keys.a)))
    verifier.verify(pack, handmade)
    assert rt_signature.check(pack, handmade, keys.a_pub).file_sha256 == sha(pack)

    altered = tmp_path / "altered.pack"
    altered.write_bytes(_flip(pack.read_bytes(), 100))
    with pytest.raises(ValueError, match="Signature mismatch"):
        verifier.verify(altered, f"{pack}.sig")
    with pytest.raises(ArchiveError, match="is not for this file"):
        rt_signature.check(altered, f"{pack}.sig", keys.a_pub)


# -- certificates -------------------------------------------------------------------------------------------

def test_certificate_signature(signed, keys, tmp_path):
    pack = _copy(signed, tmp_path)
    sig = tmp_path / "cert.sig"
    r = CliRunner().invoke(cli, ["sign", str(pack), "--key", str(keys.a), "--certificate", str(keys.a_cert),
                                 "--chain", str(keys.root), "-o", str(sig)])
    assert r.exit_code == 0, r.output
    proof = (f"signed by key {key_id(keys.a_pub)[:16]} (P-256), certificate CN=release; covers sha256 "
             f"{sha(pack)[:16]}, this file")
    assert r.output == f"wrote {sig}: {proof}\n"
    r = CliRunner().invoke(cli, ["verify", str(pack), "--signature", str(sig), "--certificate-chain", str(keys.root)])
    assert r.exit_code == 0 and f"  [ok] signature: {proof}" in r.output.splitlines(), r.output
    # The runtime checks the key (given as the key or as the certificate), not the chain.
    aotpack.load(pack, signature=sig, public_key=keys.a_pub)
    aotpack.load(pack, signature=sig, public_key=keys.a_cert)
    with pytest.raises(ArchiveError) as e:
        aotpack.load(pack, signature=sig, public_key=keys.b_pub)
    assert_facts(e.value.reason, f"signature {sig}", "another key", "certificate (CN=release)",
                 key_id(keys.a_pub)[:16], str(keys.b_pub), key_id(keys.b_pub)[:16], "signer's public key")


def test_certificate_chain_refusals(signed, keys, tmp_path):
    pack = _copy(signed, tmp_path)
    sig = tmp_path / "cert.sig"
    sign(pack, keys.a, sig, certificate=keys.a_cert, chain=[keys.root])
    with pytest.raises(ArchiveError) as e:
        check_certificate(pack, sig, [keys.other_root])
    assert e.value.reason.startswith(f"signature {sig}: the signing certificate does not chain up to "
                                     f"{keys.other_root} (")
    assert e.value.reason.endswith("); check it with the root that issued it")
    with pytest.raises(ArchiveError) as e:
        check_certificate(pack, None, [keys.root])  # PACK.sig: a bare-key signature
    assert_facts(e.value.reason, f"signature {pack}.sig", "no certificate", "bare key", "--public-key")
    with pytest.raises(SigningError) as e:
        sign(pack, keys.b, tmp_path / "x.sig", certificate=keys.a_cert, chain=[keys.root])
    assert_facts(str(e.value), f"certificate {keys.a_cert}", f"another key than {keys.b}", "sign with the key")


def test_the_example_server_refuses_a_pack_signed_by_another_key(signed, keys):
    pytest.importorskip("fastapi", reason="the serving example needs its extra: pip install -e '.[serve]'")
    server = [sys.executable, str(ROOT / "examples" / "serve" / "app.py"), str(signed), "--port", "0"]
    proc = subprocess.run(server + ["--public-key", str(keys.b_pub)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: {signed}: ") and len(proc.stderr.splitlines()) == 1
    assert_facts(proc.stderr, f"signature {signed}.sig", "another key", key_id(keys.a_pub)[:16], str(keys.b_pub),
                 key_id(keys.b_pub)[:16], "signer's public key")
    proc = subprocess.run(server + ["--signature", f"{signed}.sig"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--signature needs --public-key to check it with" in proc.stderr


# -- the runtime stays thin -----------------------------------------------------------------------------------

def test_a_serving_process_checks_signatures_without_the_signing_package(signed, keys, session_dir):
    code = f"""
import sys, json
import aotpack_runtime
before = "cryptography" in sys.modules
pkg = aotpack_runtime.load({str(signed)!r}, public_key={str(keys.a_pub)!r})
heavy = [m for m in ("model_signing", "sigstore", "OpenSSL", "aotpack", "aotpack.signing", "click", "triton",
                     "torch._dynamo", "torch._inductor") if m in sys.modules]
print(json.dumps([before, "cryptography" in sys.modules, heavy]))
"""
    proc = run_python(code, env={"AOTPACK_CACHE_DIR": str(session_dir / "signed-fresh-cache")})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [False, True, []]
    proc = run_python(f"import sys, aotpack\naotpack.load({str(signed)!r})\n"
                      "print([m for m in ('model_signing', 'cryptography') if m in sys.modules])")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_a_reweighted_pack_is_signed_as_any_pack(signed, keys, mlp_pack, tmp_path):
    """reweight writes a new pack: the base's signature does not cover it, its own does."""
    from aotpack.reweight import reweight

    new = {k: torch.randn_like(v) for k, v in mlp_pack.model.state_dict().items()}
    out = tmp_path / "re.pack"
    reweight(signed, new, out)
    pathlib.Path(f"{out}.sig").write_bytes(pathlib.Path(f"{signed}.sig").read_bytes())
    with pytest.raises(ArchiveError, match="sha256"):
        aotpack.load(out, public_key=keys.a_pub)
    aotpack.sign(out, keys.a)
    pkg = aotpack.load(out, public_key=keys.a_pub)
    reference = copy.deepcopy(mlp_pack.model)
    reference.load_state_dict(new)
    with torch.no_grad():
        torch.testing.assert_close(pkg(*mlp_pack.args), reference(*mlp_pack.args), rtol=1e-4, atol=1e-3)
