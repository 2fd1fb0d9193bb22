"""Signing packs with OpenSSF model-signing, and checking certificate chains.

A signature is detached: ``sign`` writes the Sigstore bundle model-signing makes for one file (a DSSE
envelope holding an in-toto statement of the file's sha256) next to the pack, and the pack is unchanged.
Checking a signature against a public key needs only the runtime (``aotpack_runtime.signature``);
checking a signing certificate's chain up to a root needs model-signing, like signing does. model-signing
is imported only inside the functions that need it (``pip install aotpack[sign]``).

May not: be imported by the runtime: checking a signature needs only ``aotpack_runtime.signature``.
"""
from __future__ import annotations

import os
import pathlib
import secrets
from typing import Iterable

from aotpack_runtime import signature as rt_signature
from aotpack_runtime.archive import Archive
from aotpack_runtime.errors import ArchiveError, SigningError

INSTALL_HINT = "pip install 'aotpack[sign]' (model-signing 1.1.1 and pyopenssl)"


def _model_signing():
    try:
        from model_signing import hashing, signing, verifying
    except ImportError as e:
        raise SigningError(f"signing needs the model-signing package, which is not importable ({e}); "
                           f"{INSTALL_HINT}") from None
    return hashing, signing, verifying


def _check_key(key: str, certificate: str | None) -> None:
    """Refuse a key (or certificate) model-signing would fail on, with a message that says why."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        pem = pathlib.Path(key).read_bytes()
    except OSError as e:
        raise SigningError(f"cannot read the private key {key}: {e.strerror}") from None
    try:
        private = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise SigningError(f"the private key {key} is encrypted; aotpack sign takes an unencrypted PEM key "
                           "(keep it in the release job's secret store)") from None
    except ValueError:
        hint = " (that is a public key: sign with the private key)" if b"PUBLIC KEY" in pem else ""
        raise SigningError(f"{key} is not a PEM private key{hint}") from None
    if not isinstance(private, ec.EllipticCurvePrivateKey) or private.curve.name not in rt_signature._CURVES:
        kind = private.curve.name if isinstance(private, ec.EllipticCurvePrivateKey) else type(private).__name__
        raise SigningError(f"the private key {key} is {kind}; sign with an elliptic-curve key on P-256 (or "
                           "P-384, P-521), e.g. `openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 "
                           "-topk8 -nocrypt -out key.priv`")
    if certificate is not None:
        try:
            cert = x509.load_pem_x509_certificate(pathlib.Path(certificate).read_bytes())
        except OSError as e:
            raise SigningError(f"cannot read the certificate {certificate}: {e.strerror}") from None
        except ValueError:
            raise SigningError(f"{certificate} is not a PEM certificate") from None
        if cert.public_key() != private.public_key():
            raise SigningError(f"the certificate {certificate} is for another key than {key}: sign with the key "
                               "the certificate was issued for")


def sign(pack: str | os.PathLike, key: str | os.PathLike, output: str | os.PathLike | None = None, *,
         certificate: str | os.PathLike | None = None,
         chain: Iterable[str | os.PathLike] = ()) -> tuple[str, rt_signature.Signed]:
    """Sign ``pack`` with the EC private key ``key`` (PEM); write the signature to ``output`` (default
    ``PACK.sig``) and return its path and what it proves.

    With ``certificate`` (the PEM certificate issued for ``key``) and ``chain`` (the intermediate and root
    certificates), the signature carries the certificate chain instead of the key's id. The pack is checked
    (format and every hash) before it is signed, and the written signature is checked with the runtime's
    verifier before this returns.
    """
    pack, key = os.fspath(pack), os.fspath(key)
    output = rt_signature.default_signature_path(pack) if output is None else os.fspath(output)
    archive = Archive.open(pack)
    archive.verify()
    hashing, signing, _ = _model_signing()
    _check_key(key, None if certificate is None else os.fspath(certificate))
    config = signing.Config().set_hashing_config(hashing.Config().use_file_serialization(hashing_algorithm="sha256"))
    if certificate is None:
        config.use_elliptic_key_signer(private_key=key)
    else:
        config.use_certificate_signer(private_key=key, signing_certificate=os.fspath(certificate),
                                      certificate_chain=[os.fspath(c) for c in chain])
    folder = os.path.dirname(os.path.abspath(output))
    tmp = os.path.join(folder, f".{os.path.basename(output)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        config.sign(pack, tmp)
        public = certificate if certificate is not None else _public_pem(key)
        signed = rt_signature.check(pack, tmp, public)
        os.replace(tmp, output)
    except OSError as e:
        raise SigningError(f"cannot write the signature {output}: {e.strerror}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return output, signed


def _public_pem(key: str) -> bytes:
    from cryptography.hazmat.primitives import serialization

    private = serialization.load_pem_private_key(pathlib.Path(key).read_bytes(), password=None)
    return private.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)


def check_certificate(pack: str | os.PathLike, signature: str | os.PathLike | None,
                      roots: Iterable[str | os.PathLike], *, file_sha256: str | None = None) -> rt_signature.Signed:
    """Check a certificate signature of ``pack``: the signing certificate's chain up to one of ``roots``
    (PEM files) with model-signing, then the signature and statement with the runtime's verifier, using
    the key in the signing certificate. Raises ``ArchiveError`` when it does not check out.

    ``file_sha256`` is the sha256 of the pack as the caller reads it (through its one descriptor): the
    statement must cover that, whatever file model-signing's own check read at the path."""
    pack = os.fspath(pack)
    sig = rt_signature.default_signature_path(pack) if signature is None else os.fspath(signature)
    roots = [os.fspath(r) for r in roots]
    leaf = rt_signature.signing_certificate(pack, sig)
    if leaf is None:
        raise ArchiveError(f"signature {sig} carries no certificate (it was signed with a bare key): check it "
                           "with --public-key", path=pack)
    _, _, verifying = _model_signing()
    from OpenSSL.crypto import X509StoreContextError

    try:
        verifying.Config().use_certificate_verifier(certificate_chain=roots).verify(pack, sig)
    except X509StoreContextError as e:
        raise ArchiveError(f"signature {sig}: the signing certificate does not chain up to "
                           f"{', '.join(roots)} ({e}); check it with the root that issued it", path=pack) from None
    except ValueError as e:
        raise ArchiveError(f"signature {sig}: {e}", path=pack) from None
    return rt_signature.check(pack, sig, leaf, file_sha256=file_sha256)
