"""Checkpoint and anchor keys, each under a key id (kid), and the checkpoints they sign.

The design (options, kids, rotation) is described in guard.audit.chain, "Keys and key ids".
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

from guard.support.errors import ConfigError
from guard.support.keyring import KID, keyring_from_env

MIN_KEY_BYTES = 16


@dataclass(frozen=True, slots=True)
class Checkpoint:
    seq: int
    trace_id: str
    hash: str
    created_at: float
    key_fingerprint: str
    signature: str
    kid: str | None = None  # None: written before key ids (matched by key_fingerprint)

    def message(self) -> bytes:
        return f"safeedit-checkpoint-v1\n{self.seq}\n{self.trace_id}\n{self.hash}".encode()


def key_fingerprint(key: bytes) -> str:
    return hashlib.sha256(b"safeedit-checkpoint-key\0" + key).hexdigest()[:16]


class Signer:
    """HMAC-SHA256 keys for checkpoints and anchors, each under a key id: the first key signs,
    every key verifies (see guard.audit.chain)."""

    def __init__(self, keys: Mapping[str, bytes]) -> None:
        if not keys:
            raise ConfigError("audit: no checkpoint key given")
        for kid, key in keys.items():
            if not KID.fullmatch(kid):
                raise ConfigError(f"audit: checkpoint key id {kid!r} is not 1-32 of "
                                  "[A-Za-z0-9._-]")
            if len(key) < MIN_KEY_BYTES:
                raise ConfigError(f"audit: the checkpoint key {kid!r} must be at least "
                                  f"{MIN_KEY_BYTES} bytes")
        self._keys = dict(keys)
        self.kid = next(iter(self._keys))
        self.fingerprint = key_fingerprint(self._keys[self.kid])
        self._kid_of_fingerprint = {key_fingerprint(k): kid for kid, k in self._keys.items()}

    @classmethod
    def single(cls, key: bytes) -> Signer:
        """One key, its kid derived from its fingerprint."""
        return cls({key_fingerprint(key)[:8]: key})

    @classmethod
    def from_options(cls, keys_env: str | None, key_env: str | None) -> Signer | None:
        """The keys in `keys_env` (`kid:secret,...`) or the one key in `key_env`; None when
        neither is named. A named but unset variable is a config error: checkpoints would
        silently stop otherwise."""
        keys = keyring_from_env("audit", keys_env=keys_env, key_env=key_env,
                                keys_option="checkpoint_keys_env",
                                key_option="checkpoint_key_env")
        if keys is None:
            return None
        return cls.single(keys[""]) if key_env else cls(keys)

    @classmethod
    def from_env(cls, env_name: str | None) -> Signer | None:
        return cls.from_options(None, env_name)

    @property
    def kids(self) -> list[str]:
        return list(self._keys)

    def mac(self, message: bytes) -> str:
        """The signature of `message` with the signing key (kid `self.kid`)."""
        return hmac.new(self._keys[self.kid], message, hashlib.sha256).hexdigest()

    def check(self, kid: str | None, message: bytes, signature: str,
              fingerprint: str | None = None) -> bool | None:
        """Whether `signature` is valid for `message` under the key `kid` (or, for records
        from before key ids, the key with `fingerprint`); None when no such key is configured."""
        if kid is None and fingerprint is not None:
            kid = self._kid_of_fingerprint.get(fingerprint)
        key = self._keys.get(kid) if kid is not None else None
        if key is None:
            return None
        expected = hmac.new(key, message, hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, signature)

    def sign(self, seq: int, trace_id: str, hash_: str) -> Checkpoint:
        unsigned = Checkpoint(seq, trace_id, hash_, time.time(), self.fingerprint, "", self.kid)
        return replace(unsigned, signature=self.mac(unsigned.message()))

    def valid(self, cp: Checkpoint) -> bool:
        return bool(self.check(cp.kid, cp.message(), cp.signature, cp.key_fingerprint))
