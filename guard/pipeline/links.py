"""Links to images the proxy serves when a client asks for `response_format: url`.

The bytes go to the image store (guard.imagestore), so any replica sharing it serves the link;
the link is signed (HMAC-SHA256 over the image id and the expiry), so it cannot be guessed,
altered or used after it expires. Each link names the key that signed it (`kid=`), so keys rotate
without killing links: `link_keys_env` names a variable holding `kid:secret,kid:secret` (the first
signs new links, every one opens the links it signed), as the audit log's `checkpoint_keys_env`
does; `link_key_env` names one key (its kid derived from its fingerprint); with neither, a random
key kept in the image store itself (drawn by the first process to ask, kid `store`): whoever can
read that key can read the images anyway. A link minted before key ids opens with any key.

A link's copy stays in the store for the link's lifetime only (unless a policy also retained it):
every SWEEP_EVERY_S, the next link minted starts a purge of expired copies in the background, so
images the policy did not retain do not outlive their links on disk or in the database.

Options (in the `image_store:` section):
    link_ttl_s     how long a link works (default 3600 seconds)
    link_keys_env  name of the environment variable holding `kid:secret,...` (first signs)
    link_key_env   name of the environment variable holding one signing key
                   (either named but unset = a config error; not both)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import time
from collections.abc import Mapping
from typing import Any

from guard.core.types import GeneratedImage
from guard.plugins import ImageStore
from guard.support.errors import ConfigError, RequestError
from guard.support.keyring import keyring_from_env

log = logging.getLogger("safeedit.images")
DEFAULT_LINK_TTL_S = 3600.0
SWEEP_EVERY_S = 600.0
_EXPIRY = re.compile(r"[0-9]{1,12}")  # Unix seconds, ASCII digits only, well inside int64
_IMAGE_ID = re.compile(r"[0-9a-f]{64}")
_SIGNATURE = re.compile(r"[0-9a-f]{64}")
STORE_KID = "store"


class ImageLinks:
    def __init__(self, store: ImageStore, *, ttl_s: float = DEFAULT_LINK_TTL_S,
                 keys: Mapping[str, bytes] | None = None) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self._keys = dict(keys) if keys else None  # kid -> key, the first signs
        self._key_lock = asyncio.Lock()
        self._next_sweep = 0.0
        self._sweep: asyncio.Task[None] | None = None

    @classmethod
    def from_options(cls, store: ImageStore, options: Mapping[str, Any]) -> ImageLinks:
        """Reads `link_ttl_s` and `link_key_env` from the `image_store:` section."""
        ttl = options.get("link_ttl_s", DEFAULT_LINK_TTL_S)
        if not isinstance(ttl, int | float) or isinstance(ttl, bool) or ttl <= 0:
            raise ConfigError("image_store: link_ttl_s must be a positive number")
        keys = keyring_from_env("image_store", keys_env=options.get("link_keys_env"),
                                key_env=options.get("link_key_env"),
                                keys_option="link_keys_env", key_option="link_key_env")
        if keys is not None and "" in keys:
            keys = {_kid_of(keys[""]): keys[""]}
        return cls(store, ttl_s=float(ttl), keys=keys)

    async def _keyring(self) -> dict[str, bytes]:
        if self._keys is None:
            async with self._key_lock:
                if self._keys is None:
                    self._keys = {STORE_KID: await self.store.shared_secret()}
        return self._keys

    async def mint(self, image: GeneratedImage) -> str:
        """Store the image; the path and query of its link (`/v1/guard/images/...`)."""
        image_id = await self.store.put(image.data, image.media_type, self.ttl_s)
        expires = int(time.time() + self.ttl_s)
        kid, key = next(iter((await self._keyring()).items()))
        sig = _sign(key, image_id, expires)
        if time.monotonic() >= self._next_sweep and (self._sweep is None or self._sweep.done()):
            self._next_sweep = time.monotonic() + SWEEP_EVERY_S
            self._sweep = asyncio.create_task(self._purge_expired(), name="image-link-sweep")
        return f"/v1/guard/images/{image_id}?exp={expires}&kid={kid}&sig={sig}"

    async def _purge_expired(self) -> None:
        try:
            result = await self.store.purge(time.time())
        except Exception:  # noqa: BLE001 - the next sweep tries again; links keep working
            log.warning("purging expired images from %r failed", self.store, exc_info=True)
            return
        if result.removed:
            log.info("purged %d expired images (%.1f MB) from %r", result.removed,
                     result.freed_bytes / 1e6, self.store)

    async def open(self, image_id: str, exp: str, sig: str,
                   kid: str | None = None) -> tuple[str, bytes] | None:
        """The (media type, bytes) a link names: None when it is unknown, expired, signed by a
        key no longer configured, or its signature is wrong; a RequestError when `exp` is not a
        link's expiry at all. A link without `kid` (minted before key ids) opens with any key."""
        if not _EXPIRY.fullmatch(exp):
            raise RequestError("Invalid 'exp': expected the expiry of an image link (Unix "
                               "seconds).", param="exp")
        expires = int(exp)
        # The signature is the client's to choose: anything but our hex digest is simply wrong,
        # and the digests compare as bytes (compare_digest raises on a non-ASCII str).
        if (expires < time.time() or not _IMAGE_ID.fullmatch(image_id)
                or not _SIGNATURE.fullmatch(sig)):
            return None
        keyring = await self._keyring()
        keys = keyring.values() if kid is None else [keyring[kid]] if kid in keyring else []
        if not any(hmac.compare_digest(sig.encode(), _sign(key, image_id, expires).encode())
                   for key in keys):
            return None
        return await self.store.get(image_id)

    async def ready(self) -> bool:
        return await self.store.ready()

    async def aclose(self) -> None:
        """Stop a running sweep and close the store."""
        if self._sweep is not None:
            self._sweep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweep
        await self.store.aclose()


def _kid_of(key: bytes) -> str:
    return hashlib.sha256(b"safeedit-link-key\0" + key).hexdigest()[:8]


def _sign(key: bytes, image_id: str, expires: int) -> str:
    return hmac.new(key, f"{image_id}.{expires}".encode(), hashlib.sha256).hexdigest()
