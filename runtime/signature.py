"""Checking a pack's detached signature without the signing package.

A signature is the file OpenSSF ``model-signing`` writes (``aotpack sign`` uses it): a Sigstore bundle
(``application/vnd.dev.sigstore.bundle.v0.3+json``) holding a DSSE envelope whose payload is an in-toto
Statement v1 with the predicate type ``https://model_signing/signature/v1.0``. For one file, the statement's
one resource is the file's sha256. This module checks such a bundle against a public key with
``cryptography`` alone (imported here, when a signature is checked): the ECDSA signature over the DSSE
pre-authentication encoding, the statement's types, and that the statement covers exactly this file. The
per-blob hashes in the manifest then prove every byte the loader uses.

The signer's certificate chain (certificate signing) is not checked here: the key is. ``aotpack verify
--certificate-chain`` checks the chain on a host with the signing package.

May not: open the pack: the caller hands in the hash of the bytes it read; ``cryptography`` is imported only here.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass

from .archive import open_pack, open_regular, whole_file_sha256
from .errors import ArchiveError
from .format import parse_json

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
DSSE_PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
# A bundle is a few KB (a certificate chain included); anything far larger is not one.
MAX_SIGNATURE_BYTES = 1 << 20
# The curves model-signing signs with, and the hash it pairs with each.
_CURVES = {"secp256r1": ("P-256", "SHA256"), "secp384r1": ("P-384", "SHA384"), "secp521r1": ("P-521", "SHA512")}


@dataclass(frozen=True)
class Signed:
    """What a checked signature proves: the file with this sha256 was signed by the key with this id.

    ``key_id`` is the sha256 of the signer's public key in PEM (SubjectPublicKeyInfo), the value
    model-signing records as the bundle's key hint; ``curve`` is ``P-256``, ``P-384`` or ``P-521``;
    ``certificate`` is the signing certificate's subject when the bundle carries one.
    """

    file_sha256: str
    key_id: str
    curve: str
    certificate: str | None = None

    def describe(self) -> str:
        who = f"key {self.key_id[:16]} ({self.curve})"
        if self.certificate:
            who += f", certificate {self.certificate}"
        return f"signed by {who}; covers sha256 {self.file_sha256[:16]}, this file"


def default_signature_path(path: str | os.PathLike) -> str:
    """Where ``aotpack sign`` writes a pack's signature by default, and where ``load`` looks for it."""
    return os.fspath(path) + ".sig"


def check(path: str | os.PathLike, signature: str | os.PathLike | None,
          public_key: str | os.PathLike | bytes, *, file_sha256: str | None = None) -> Signed:
    """Check that ``signature`` (a bundle file; ``None`` means ``PATH.sig``) is a valid signature of the
    file at ``path`` by ``public_key`` (a PEM file, or PEM bytes, of an EC public key or of a certificate
    holding one). Raises ``ArchiveError`` saying what failed and what to do; returns what was proved.

    ``file_sha256`` is the sha256 of the file the caller will use, hashed through the descriptor it reads
    the pack from (``load`` does so), or recorded for that unchanged file; otherwise the file at ``path`` is
    opened once and hashed here."""
    path = os.fspath(path)
    sig_path = default_signature_path(path) if signature is None else os.fspath(signature)
    if file_sha256 is None:
        fd, st = open_pack(path)
        try:
            file_sha256 = whole_file_sha256(fd, st.st_size, path)
        finally:
            os.close(fd)
    try:
        from cryptography import exceptions, x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
    except ImportError:
        raise ArchiveError("cannot check the signature: the 'cryptography' package is not installed; "
                           "pip install cryptography (or aotpack[sign])", path=path) from None

    key, key_what = _public_key(path, public_key, serialization, x509, ec)
    key_id = _key_id(key, serialization)
    curve, hash_name = _CURVES[key.curve.name]
    bundle = _read_bundle(path, sig_path)
    envelope, cert, cert_subject = _parts(path, sig_path, bundle, x509, ec)
    cert_key = None if cert is None else cert.public_key()

    def fail(reason: str) -> ArchiveError:
        return ArchiveError(f"signature {sig_path}: {reason}", path=path)

    hint = bundle["verificationMaterial"].get("publicKey", {}).get("hint")
    if hint is not None and not isinstance(hint, str):
        raise fail("verificationMaterial.publicKey.hint is not a string")
    if hint and hint != key_id:
        raise fail(f"made by another key: it names key {str(hint)[:16]}, the public key {key_what} is key "
                   f"{key_id[:16]} (sha256 of the PEM public key); check it with the signer's public key")
    if cert_key is not None and _key_id(cert_key, serialization) != key_id:
        raise fail(f"made by another key: its certificate ({cert_subject}) holds key "
                   f"{_key_id(cert_key, serialization)[:16]}, the public key {key_what} is key {key_id[:16]}; "
                   "check it with the signer's public key")
    try:
        key.verify(envelope["sig"], _pae(envelope["payload"]), ec.ECDSA(getattr(hashes, hash_name)()))
    except exceptions.InvalidSignature:
        raise fail(f"does not verify with the public key {key_what}: the signature file was altered, or it "
                   "was made by another key; get the signature and public key from the release again") from None

    signed_sha = _statement_digest(path, sig_path, envelope["payload"])
    actual = file_sha256
    if actual != signed_sha:
        raise fail(f"is not for this file: it covers sha256 {signed_sha}, this file is {actual}; the pack was "
                   "modified after it was signed, or the signature belongs to another pack")
    return Signed(actual, key_id, curve, cert_subject)


def signing_certificate(path: str | os.PathLike, signature: str | os.PathLike | None) -> bytes | None:
    """The signing certificate (PEM) a signature bundle carries, unchecked, or None for a key signature."""
    path = os.fspath(path)
    sig_path = default_signature_path(path) if signature is None else os.fspath(signature)
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    _, cert, _ = _parts(path, sig_path, _read_bundle(path, sig_path), x509, ec)
    return None if cert is None else cert.public_bytes(serialization.Encoding.PEM)


def _key_id(key, serialization) -> str:
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def _public_key(path: str, public_key, serialization, x509, ec):
    """The EC public key from a PEM file or PEM bytes (a public key or a certificate), and how to name it."""
    if isinstance(public_key, (bytes, bytearray)):
        pem, what = bytes(public_key), "given"
    else:
        key_path = os.fspath(public_key)
        what = f"in {key_path}"
        try:
            pem = _read_small(key_path, f"the public key {key_path}", path)
        except FileNotFoundError as e:
            raise ArchiveError(f"cannot read the public key {key_path}: {e.strerror}", path=path) from None
    if b"PRIVATE KEY-----" in pem:
        raise ArchiveError(f"the public key {what} is a private key: pass the signer's public key (key.pub), and "
                           "keep the private key where the packs are signed", path=path)
    try:
        if b"-----BEGIN CERTIFICATE-----" in pem:
            key = x509.load_pem_x509_certificate(pem).public_key()
        else:
            key = serialization.load_pem_public_key(pem)
    except ValueError:
        raise ArchiveError(f"the public key {what} is not a PEM public key or certificate: pass the signer's "
                           "public key (key.pub)", path=path) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in _CURVES:
        kind = key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else type(key).__name__
        raise ArchiveError(f"the public key {what} is {kind}; signatures are checked with an elliptic-curve "
                           f"key on {', '.join(c for c, _ in _CURVES.values())}", path=path)
    return key, what


def _strict_json(data: bytes, what: str, path: str):
    """``data`` parsed by the format's one strict JSON parser; its errors name ``what`` and the pack."""
    try:
        return parse_json(data, what)
    except ArchiveError as e:
        raise ArchiveError(e.reason, path=path) from None


def _read_small(file: str, what: str, path: str) -> bytes:
    """Up to ``MAX_SIGNATURE_BYTES + 1`` bytes of a regular file (a FIFO or a device is refused at once, never
    waited on); FileNotFoundError propagates."""
    try:
        fd, _ = open_regular(file)
    except ArchiveError as e:
        raise ArchiveError(f"{what} {e.reason}; pass the file itself", path=path) from None
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ArchiveError(f"cannot read {what}: {e.strerror}", path=path) from None
    try:
        chunks, got = [], 0
        while got <= MAX_SIGNATURE_BYTES:
            chunk = os.read(fd, MAX_SIGNATURE_BYTES + 1 - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise ArchiveError(f"cannot read {what}: {e.strerror}", path=path) from None
    finally:
        os.close(fd)


def _read_bundle(path: str, sig_path: str) -> dict:
    try:
        data = _read_small(sig_path, f"the signature {sig_path}", path)
    except FileNotFoundError:
        raise ArchiveError(f"unsigned: no signature at {sig_path}, and a public key was given, so one is "
                           "required; ship the signature `aotpack sign` wrote beside the pack, or name it "
                           "(signature= / --signature)", path=path) from None
    if len(data) > MAX_SIGNATURE_BYTES:
        raise ArchiveError(f"signature {sig_path} is over {MAX_SIGNATURE_BYTES} bytes; a signature bundle is a "
                           "few KB: this is not one", path=path)
    what = f"signature {sig_path}"
    bundle = _strict_json(data, what, path)
    if not isinstance(bundle, dict):
        raise ArchiveError(f"{what} is not a Sigstore bundle (a JSON object); expected the file `aotpack sign` "
                           "writes", path=path)
    media = bundle.get("mediaType")
    if media != BUNDLE_MEDIA_TYPE:
        raise ArchiveError(f"{what} has media type {media!r}, expected {BUNDLE_MEDIA_TYPE!r} (the Sigstore "
                           "bundle `aotpack sign` and model-signing write)", path=path)
    return bundle


def _b64(value, what: str, path: str) -> bytes:
    if not isinstance(value, str):
        raise ArchiveError(f"{what} is not a base64 string", path=path)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ArchiveError(f"{what} is not valid base64", path=path) from None


def _parts(path: str, sig_path: str, bundle: dict, x509, ec):
    """The envelope's payload and signature bytes, and the signing certificate and its subject if any."""
    what = f"signature {sig_path}"
    material = bundle.get("verificationMaterial")
    envelope = bundle.get("dsseEnvelope")
    if not isinstance(material, dict) or not isinstance(envelope, dict):
        raise ArchiveError(f"{what} lacks {'dsseEnvelope' if isinstance(material, dict) else 'verificationMaterial'}"
                           ": expected a bundle holding a DSSE envelope, as model-signing writes", path=path)
    if not isinstance(material.get("publicKey", {}), dict):
        raise ArchiveError(f"{what}: verificationMaterial.publicKey is not an object", path=path)
    if envelope.get("payloadType") != DSSE_PAYLOAD_TYPE:
        raise ArchiveError(f"{what}: the envelope's payload type is {envelope.get('payloadType')!r}, expected "
                           f"{DSSE_PAYLOAD_TYPE!r}", path=path)
    sigs = envelope.get("signatures")
    if not isinstance(sigs, list) or len(sigs) != 1 or not isinstance(sigs[0], dict):
        n = len(sigs) if isinstance(sigs, list) else "no"
        raise ArchiveError(f"{what}: the envelope has {n} signatures, expected one", path=path)
    payload = _b64(envelope.get("payload"), f"{what}: the envelope's payload", path)
    sig = _b64(sigs[0].get("sig"), f"{what}: the envelope's signature", path)
    cert = None
    chain = material.get("x509CertificateChain")
    single = material.get("certificate")
    raw = None
    if isinstance(chain, dict) and isinstance(chain.get("certificates"), list) and chain["certificates"]:
        raw = chain["certificates"][0].get("rawBytes") if isinstance(chain["certificates"][0], dict) else None
    elif isinstance(single, dict):
        raw = single.get("rawBytes")
    if raw is not None:
        try:
            cert = x509.load_der_x509_certificate(_b64(raw, f"{what}: the signing certificate", path))
        except ValueError:
            raise ArchiveError(f"{what}: the signing certificate is not a DER certificate", path=path) from None
        if not isinstance(cert.public_key(), ec.EllipticCurvePublicKey):
            raise ArchiveError(f"{what}: the signing certificate holds a {type(cert.public_key()).__name__}, not "
                               "an elliptic-curve key", path=path)
    return {"payload": payload, "sig": sig}, cert, (cert.subject.rfc4514_string() if cert is not None else None)


def _pae(payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what the signature covers."""
    kind = DSSE_PAYLOAD_TYPE.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def _statement_digest(path: str, sig_path: str, payload: bytes) -> str:
    """The sha256 of the one file an in-toto statement from model-signing covers, after checking it."""
    what = f"signature {sig_path}"
    st = _strict_json(payload, f"{what}: the signed statement", path)

    def bad(reason: str) -> ArchiveError:
        return ArchiveError(f"{what}: the signed statement {reason}", path=path)

    if not isinstance(st, dict):
        raise bad("is not a JSON object")
    if st.get("_type") != STATEMENT_TYPE:
        raise bad(f"has type {st.get('_type')!r}, expected {STATEMENT_TYPE!r}")
    if st.get("predicateType") != PREDICATE_TYPE:
        raise bad(f"has predicate type {st.get('predicateType')!r}, expected {PREDICATE_TYPE!r} (model-signing)")
    predicate = st.get("predicate")
    if not isinstance(predicate, dict) or not isinstance(predicate.get("serialization"), dict):
        raise bad("lacks predicate.serialization")
    ser = predicate["serialization"]
    if ser.get("method") != "files" or ser.get("hash_type") != "sha256":
        raise bad(f"hashes with method {ser.get('method')!r} and {ser.get('hash_type')!r}, expected 'files' and "
                  "'sha256' (sign the pack with `aotpack sign`)")
    resources = predicate.get("resources")
    if not isinstance(resources, list) or len(resources) != 1:
        n = len(resources) if isinstance(resources, list) else "no"
        raise bad(f"covers {n} files, expected one: sign the pack file itself (`aotpack sign PACK`), not a folder")
    res = resources[0]
    digest = res.get("digest") if isinstance(res, dict) else None
    if not isinstance(res, dict) or res.get("algorithm") != "sha256" or not isinstance(digest, str) \
            or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise bad("has a resource that is not a sha256 digest (64 lowercase hex digits)")
    # model-signing's subject digest is the sha256 over the resources' digests: a statement whose two
    # disagree was not written by it.
    subjects = st.get("subject")
    root = hashlib.sha256(bytes.fromhex(digest)).hexdigest()
    if not isinstance(subjects, list) or len(subjects) != 1 or not isinstance(subjects[0], dict) \
            or not isinstance(subjects[0].get("digest"), dict) or subjects[0]["digest"].get("sha256") != root:
        raise bad(f"has a subject that does not match its resources (expected one subject with sha256 {root})")
    return digest
