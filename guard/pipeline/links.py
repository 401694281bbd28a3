"""Links to images the proxy serves when a client asks for `response_format: url`.

The bytes go to the image store (guard.imagestore), so any replica sharing it serves the link;
the link is signed (HMAC-SHA256 over the image id and the expiry), so it cannot be guessed,
altered or used after it expires. The signing key is the environment variable named by the
`image_store:` option `link_key_env` when set, else a random key kept in the image store itself
(drawn by the first process to ask): whoever can read that key can read the images anyway.

A link's copy stays in the store for the link's lifetime only (unless a policy also retained it):
every SWEEP_EVERY_S, the next link minted starts a purge of expired copies in the background, so
images the policy did not retain do not outlive their links on disk or in the database.

Options (in the `image_store:` section):
    link_ttl_s     how long a link works (default 3600 seconds)
    link_key_env   name of the environment variable holding the signing key (named but unset =
                   a config error)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import re
import time
from collections.abc import Mapping
from typing import Any

from guard.core.types import GeneratedImage
from guard.plugins import ImageStore
from guard.support.errors import ConfigError, RequestError

log = logging.getLogger("safeedit.images")
DEFAULT_LINK_TTL_S = 3600.0
SWEEP_EVERY_S = 600.0
_EXPIRY = re.compile(r"[0-9]{1,12}")  # Unix seconds, ASCII digits only, well inside int64
_IMAGE_ID = re.compile(r"[0-9a-f]{64}")
_SIGNATURE = re.compile(r"[0-9a-f]{64}")


class ImageLinks:
    def __init__(self, store: ImageStore, *, ttl_s: float = DEFAULT_LINK_TTL_S,
                 key: bytes | None = None) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self._key = key
        self._key_lock = asyncio.Lock()
        self._next_sweep = 0.0
        self._sweep: asyncio.Task[None] | None = None

    @classmethod
    def from_options(cls, store: ImageStore, options: Mapping[str, Any]) -> ImageLinks:
        """Reads `link_ttl_s` and `link_key_env` from the `image_store:` section."""
        ttl = options.get("link_ttl_s", DEFAULT_LINK_TTL_S)
        if not isinstance(ttl, int | float) or isinstance(ttl, bool) or ttl <= 0:
            raise ConfigError("image_store: link_ttl_s must be a positive number")
        env = options.get("link_key_env")
        key = None
        if env:
            value = os.environ.get(env)
            if not value:
                raise ConfigError(f"image_store: link_key_env names {env}, which is not set")
            key = value.encode()
        return cls(store, ttl_s=float(ttl), key=key)

    async def _signing_key(self) -> bytes:
        if self._key is None:
            async with self._key_lock:
                if self._key is None:
                    self._key = await self.store.shared_secret()
        return self._key

    async def mint(self, image: GeneratedImage) -> str:
        """Store the image; the path and query of its link (`/v1/guard/images/...`)."""
        image_id = await self.store.put(image.data, image.media_type, self.ttl_s)
        expires = int(time.time() + self.ttl_s)
        sig = _sign(await self._signing_key(), image_id, expires)
        if time.monotonic() >= self._next_sweep and (self._sweep is None or self._sweep.done()):
            self._next_sweep = time.monotonic() + SWEEP_EVERY_S
            self._sweep = asyncio.create_task(self._purge_expired(), name="image-link-sweep")
        return f"/v1/guard/images/{image_id}?exp={expires}&sig={sig}"

    async def _purge_expired(self) -> None:
        try:
            result = await self.store.purge(time.time())
        except Exception:  # noqa: BLE001 - the next sweep tries again; links keep working
            log.warning("purging expired images from %r failed", self.store, exc_info=True)
            return
        if result.removed:
            log.info("purged %d expired images (%.1f MB) from %r", result.removed,
                     result.freed_bytes / 1e6, self.store)

    async def open(self, image_id: str, exp: str, sig: str) -> tuple[str, bytes] | None:
        """The (media type, bytes) a link names: None when it is unknown, expired or its
        signature is wrong; a RequestError when `exp` is not a link's expiry at all."""
        if not _EXPIRY.fullmatch(exp):
            raise RequestError("Invalid 'exp': expected the expiry of an image link (Unix "
                               "seconds).", param="exp")
        expires = int(exp)
        # The signature is the client's to choose: anything but our hex digest is simply wrong,
        # and the digests compare as bytes (compare_digest raises on a non-ASCII str).
        if (expires < time.time() or not _IMAGE_ID.fullmatch(image_id)
                or not _SIGNATURE.fullmatch(sig)):
            return None
        expected = _sign(await self._signing_key(), image_id, expires)
        if not hmac.compare_digest(sig.encode(), expected.encode()):
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


def _sign(key: bytes, image_id: str, expires: int) -> str:
    return hmac.new(key, f"{image_id}.{expires}".encode(), hashlib.sha256).hexdigest()
