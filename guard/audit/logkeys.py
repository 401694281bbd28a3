"""The transparency log's signing keys: Ed25519, public keys anyone can check with.

HMAC checkpoints (guard.audit.keys) need the secret that could forge them to be verified; the
log's row signatures and tree heads (guard.audit.tlog) are Ed25519 signatures (`cryptography`),
so an auditor or a witness verifies them with public keys alone (`GET /v1/guard/log/keys`).

Where the keys come from (audit options), the first key signs and every key verifies, so a key is
rotated by putting the new one first and keeping the old one after it:
    signing_key_file    a PEM file of one or more Ed25519 private keys (PKCS#8)
    signing_keys_env    an environment variable holding `kid:base64-seed,...` (32-byte seeds);
                        default SAFEEDIT_LOG_SIGNING_KEYS when that variable is set
    verify_key_files    PEM files of retired public keys that old rows and heads were signed with
Without any: a store on a local SQLite file creates one key at first start in `keys/` beside the
database (var/keys/ with the embedded defaults; mode 0600) and logs its fingerprint; a store that
several replicas share (PostgreSQL) refuses to start, since each replica would sign with its own.

A key's id is the first 16 hex digits of sha256 over its raw public key, unless the environment
names one; the log's id is the whole sha256 (hex) of the signing public key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from guard.support.errors import ConfigError
from guard.support.keyring import KID

log = logging.getLogger("safeedit.audit.log")
DEFAULT_KEYS_ENV = "SAFEEDIT_LOG_SIGNING_KEYS"
KEY_FILE_NAME = "log-ed25519.pem"


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id_of(key: Ed25519PublicKey) -> str:
    return hashlib.sha256(raw_public(key)).hexdigest()[:16]


@dataclass
class LogKeys:
    """`signing` signs under `kid`; `public` holds every key id that verifies."""

    kid: str
    signing: Ed25519PrivateKey
    public: dict[str, Ed25519PublicKey] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        self.public.setdefault(self.kid, self.signing.public_key())

    @property
    def log_id(self) -> str:
        """sha256 (hex) of the signing public key: names this log in C2PA manifests."""
        return hashlib.sha256(raw_public(self.signing.public_key())).hexdigest()

    def sign(self, message: bytes) -> str:
        return base64.b64encode(self.signing.sign(message)).decode()

    def check(self, kid: str | None, message: bytes, signature: str) -> bool | None:
        """True / False, or None when no key of that id is known."""
        return check_signature(self.public, kid, message, signature)

    def published(self) -> dict[str, Any]:
        """`GET /v1/guard/log/keys`: every public key, the signing one first."""
        order = [self.kid, *(k for k in self.public if k != self.kid)]
        return {"log_id": self.log_id, "keys": [public_entry(k, self.public[k]) for k in order]}


def public_entry(kid: str, key: Ed25519PublicKey) -> dict[str, str]:
    return {"key_id": kid, "algorithm": "Ed25519",
            "public_key": base64.b64encode(raw_public(key)).decode(),
            "pem": key.public_bytes(serialization.Encoding.PEM,
                                    serialization.PublicFormat.SubjectPublicKeyInfo).decode()}


def check_signature(keys: Mapping[str, Ed25519PublicKey], kid: str | None, message: bytes,
                    signature: str) -> bool | None:
    key = keys.get(kid or "")
    if key is None:
        return None
    try:
        key.verify(base64.b64decode(signature, validate=True), message)
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


def public_keys_from(document: Any) -> dict[str, Ed25519PublicKey]:
    """Public keys from a `GET /v1/guard/log/keys` answer, or from PEM text (one or more keys)."""
    if isinstance(document, str | bytes):
        text = document.decode() if isinstance(document, bytes) else document
        keys = {}
        for block in _pem_blocks(text):
            key = serialization.load_pem_public_key(block.encode())
            if not isinstance(key, Ed25519PublicKey):
                raise ConfigError("a log key is not an Ed25519 public key")
            keys[key_id_of(key)] = key
        return keys
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise ConfigError("the log's keys document has no `keys` list")
    out = {}
    for entry in document["keys"]:
        try:
            out[str(entry["key_id"])] = Ed25519PublicKey.from_public_bytes(
                base64.b64decode(entry["public_key"], validate=True))
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise ConfigError(f"the log's keys document has a bad key ({type(exc).__name__})"
                              ) from exc
    return out


def _pem_blocks(text: str) -> list[str]:
    blocks, current = [], []
    for line in text.splitlines():
        if line.startswith("-----BEGIN"):
            current = [line]
        elif current:
            current.append(line)
            if line.startswith("-----END"):
                blocks.append("\n".join(current) + "\n")
                current = []
    return blocks


def _keys_from_env(name: str) -> list[tuple[str, Ed25519PrivateKey]]:
    value = os.environ.get(name, "")
    if not value:
        raise ConfigError(f"audit: signing_keys_env names {name}, which is not set")
    keys = []
    for entry in value.split(","):
        kid, sep, seed = entry.strip().partition(":")
        if not sep or not KID.fullmatch(kid):
            raise ConfigError(f"audit: {name} must hold kid:base64-seed pairs (kid 1-32 of "
                              "[A-Za-z0-9._-]) separated by commas")
        try:
            raw = base64.b64decode(seed, validate=True)
            keys.append((kid, Ed25519PrivateKey.from_private_bytes(raw)))
        except (binascii.Error, ValueError) as exc:
            raise ConfigError(f"audit: key {kid!r} in {name} is not a base64 32-byte Ed25519 "
                              "seed") from exc
    if len({k for k, _ in keys}) != len(keys):
        raise ConfigError(f"audit: {name} names a key id twice")
    return keys


def _keys_from_file(path: Path) -> list[tuple[str, Ed25519PrivateKey]]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"audit: cannot read signing_key_file {path} "
                          f"({exc.strerror or type(exc).__name__})") from exc
    keys = []
    for block in _pem_blocks(text):
        try:
            key = serialization.load_pem_private_key(block.encode(), password=None)
        except ValueError as exc:
            raise ConfigError(f"audit: {path} holds a PEM block that is not a private key"
                              ) from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"audit: {path} holds a key that is not Ed25519")
        keys.append((key_id_of(key.public_key()), key))
    if not keys:
        raise ConfigError(f"audit: signing_key_file {path} holds no private key")
    return keys


def create_key_file(path: Path) -> Ed25519PrivateKey:
    """A new Ed25519 key in `path` (mode 0600; never overwrites one that exists)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return key


def load_log_keys(opts: dict[str, Any], *, default_dir: Path | None) -> LogKeys:
    """Pops the key options from a store's options. `default_dir`: where a local store keeps a
    key it creates itself (None: a shared store, which needs a configured key)."""
    key_file = opts.pop("signing_key_file", None)
    env = opts.pop("signing_keys_env", None)
    retired = opts.pop("verify_key_files", None) or []
    if key_file and env:
        raise ConfigError("audit: give signing_key_file or signing_keys_env, not both")
    if not isinstance(retired, Sequence) or isinstance(retired, str):
        raise ConfigError("audit: verify_key_files must be a list of PEM files")
    if key_file:
        keys, source = _keys_from_file(Path(key_file)), f"file {key_file}"
    elif env or os.environ.get(DEFAULT_KEYS_ENV):
        name = env or DEFAULT_KEYS_ENV
        keys, source = _keys_from_env(name), f"environment {name}"
    elif default_dir is not None:
        path = default_dir / KEY_FILE_NAME
        if path.exists():
            keys = _keys_from_file(path)
        else:
            keys = [(key_id_of((k := create_key_file(path)).public_key()), k)]
            log.warning("created the audit log's signing key %s (Ed25519, key id %s): back it "
                        "up; auditors verify with its public key (GET /v1/guard/log/keys)",
                        path, keys[0][0])
        source = f"file {path}"
    else:
        raise ConfigError(
            "audit: the transparency log needs a signing key shared by every replica: set "
            f"signing_key_file (a PEM file, e.g. a mounted Kubernetes Secret) or "
            f"signing_keys_env (default {DEFAULT_KEYS_ENV}: kid:base64-seed)")
    (kid, signing), *older = keys
    public = {k: key.public_key() for k, key in keys}
    for file in retired:
        try:
            public.update(public_keys_from(Path(file).read_text()))
        except OSError as exc:
            raise ConfigError(f"audit: cannot read verify_key_files entry {file}") from exc
    log.info("audit log signing key %s (%s), fingerprint %s", kid, source,
             hashlib.sha256(raw_public(signing.public_key())).hexdigest())
    return LogKeys(kid, signing, public, source)


def new_seed() -> str:
    """A fresh key for `signing_keys_env`: base64 of 32 random bytes (`kid:` + this)."""
    return base64.b64encode(os.urandom(32)).decode()
