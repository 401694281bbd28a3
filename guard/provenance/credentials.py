"""The certificate chain and key C2PA manifests are signed with: the operator's (`provenance.c2pa`,
a file or an environment variable each), else a development chain made at first start.

The development chain is a CA and a signing certificate under it, with the extensions C2PA
requires of a signer (not a CA, digitalSignature, an extended key usage of emailProtection,
subject and authority key ids), made with `cryptography` and kept in `<keys dir>/c2pa-dev/`
(`key.pem` mode 0600, `chain.pem`, and `ca.pem` for `safeedit verify-image --trust`). Nobody
trusts its CA but whoever is handed `ca.pem`: readers report the signer untrusted, which is what
a development certificate should get.
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from c2pa import C2paSigningAlg
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from guard.core.config import C2paConfig
from guard.support.errors import ProvenanceFailed

DEV_FOLDER = "c2pa-dev"
DEV_ORGANIZATION = "SafeEdit Guard development (untrusted)"
_CURVES = {"secp256r1": C2paSigningAlg.ES256, "secp384r1": C2paSigningAlg.ES384,
           "secp521r1": C2paSigningAlg.ES512}


@dataclass(frozen=True, slots=True)
class Credentials:
    chain_pem: bytes  # the signer's certificate first, then intermediates
    key_pem: bytes
    alg: C2paSigningAlg
    signer: str  # the signing certificate's subject, for logs
    dev: bool  # the development chain: readers report it untrusted


def load_credentials(config: C2paConfig, keys_dir: Path = Path("var/keys")
                     ) -> tuple[Credentials, str]:
    """The configured chain and key, else the development chain (made now if absent) in
    `config.dev_dir` or `keys_dir`; with a line for the log saying which. ProvenanceFailed,
    without the key's bytes, on any problem."""
    if config.configured:
        chain = _read(config.cert_file, config.cert_env, "certificate")
        key = _read(config.key_file, config.key_env, "key")
        creds = _check(chain, key, dev=False)
        return creds, f"signing C2PA manifests as {creds.signer}"
    folder = Path(config.dev_dir or keys_dir) / DEV_FOLDER
    made = _make_dev_chain(folder) if not (folder / "key.pem").exists() else False
    creds = _check((folder / "chain.pem").read_bytes(), (folder / "key.pem").read_bytes(),
                   dev=True)
    return creds, (f"signing C2PA manifests with the development certificate "
                   f"{'made now in' if made else 'kept in'} {folder}: readers report it "
                   f"untrusted (give provenance.c2pa a certificate for production; "
                   f"{folder / 'ca.pem'} is its CA for `safeedit verify-image --trust`)")


def _read(path: str | None, env: str | None, what: str) -> bytes:
    if path:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ProvenanceFailed(
                f"provenance.c2pa: cannot read the {what} file {path}: {exc.strerror}") from None
    assert env
    value = os.environ.get(env)
    if not value:
        raise ProvenanceFailed(f"provenance.c2pa: the {what} variable {env} is not set")
    return value.encode()


def _check(chain_pem: bytes, key_pem: bytes, *, dev: bool) -> Credentials:
    """Parse both, pick the algorithm from the key, and refuse a key that is not the signer's."""
    try:
        certs = x509.load_pem_x509_certificates(chain_pem)
    except ValueError:
        raise ProvenanceFailed("provenance.c2pa: the certificate is not a PEM chain") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):  # the error may quote the key: never passed on
        raise ProvenanceFailed("provenance.c2pa: the key is not an unencrypted PEM private "
                               "key") from None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in _CURVES:
        alg = _CURVES[key.curve.name]
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        alg = C2paSigningAlg.ED25519
    elif isinstance(key, rsa.RSAPrivateKey):
        alg = C2paSigningAlg.PS256
    else:
        raise ProvenanceFailed("provenance.c2pa: the key's type cannot sign C2PA manifests "
                               "(use EC P-256/384/521, Ed25519 or RSA)")
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if (certs[0].public_key().public_bytes(serialization.Encoding.DER, public)
            != key.public_key().public_bytes(serialization.Encoding.DER, public)):
        raise ProvenanceFailed("provenance.c2pa: the key is not the first certificate's key")
    return Credentials(chain_pem=chain_pem, key_pem=key_pem, alg=alg,
                       signer=certs[0].subject.rfc4514_string(), dev=dev)


def _make_dev_chain(folder: Path) -> bool:
    """Make the chain in a new folder beside `folder` and rename it into place: two processes
    starting at once agree on whichever came first. False if another one won."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".c2pa-dev-", dir=folder.parent))
    try:
        ca_pem, chain_pem, key_pem = dev_chain()
        (staging / "ca.pem").write_bytes(ca_pem)
        (staging / "chain.pem").write_bytes(chain_pem)
        fd = os.open(staging / "key.pem", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key_pem)
        staging.chmod(0o755)
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / "key.pem").exists():
                raise
            return False
        return True
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def dev_chain(days: int = 3650) -> tuple[bytes, bytes, bytes]:
    """A new development CA and ES256 signer under it: (CA PEM, chain PEM, key PEM)."""
    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, DEV_ORGANIZATION)])

    def usage(*, sign: bool, ca: bool) -> x509.KeyUsage:
        return x509.KeyUsage(digital_signature=sign, content_commitment=False,
                             key_encipherment=False, data_encipherment=False,
                             key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                             encipher_only=False, decipher_only=False)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    key = ec.generate_private_key(ec.SECP256R1())
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days))
    ca = (x509.CertificateBuilder().subject_name(name("SafeEdit Guard development CA"))
          .issuer_name(name("SafeEdit Guard development CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(valid[0]).not_valid_after(valid[1])
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(usage(sign=False, ca=True), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(name("SafeEdit Guard development signer"))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid[0]).not_valid_after(valid[1])
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage(sign=True, ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    ca_pem = ca.public_bytes(pem)
    return (ca_pem, leaf.public_bytes(pem) + ca_pem,
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))
