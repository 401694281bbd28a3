"""Images the proxy serves by URL when a client asks for `response_format: url`.

Kept in memory (bounded, expiring) and addressed by signed links, so a link cannot be guessed,
altered or used after it expires.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections import OrderedDict

from guard.errors import RequestError
from guard.types import GeneratedImage

_EXPIRY = re.compile(r"[0-9]{1,12}")  # Unix seconds, ASCII digits only, well inside int64
_IMAGE_ID = re.compile(r"[0-9a-f]{32}")
_SIGNATURE = re.compile(r"[0-9a-f]{64}")


class ImageCache:
    def __init__(self, secret: bytes | None = None, ttl_s: float = 3600.0,
                 max_bytes: int = 512 * 1024 * 1024) -> None:
        self._secret = secret or secrets.token_bytes(32)
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[float, str, bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, image: GeneratedImage) -> tuple[str, int, str]:
        """Store an image; returns (id, expiry, signature) for its link."""
        image_id = image.sha256[:32]
        expires = int(time.time() + self.ttl_s)
        with self._lock:
            if image_id not in self._items:
                self._items[image_id] = (expires, image.media_type, image.data)
                self._bytes += len(image.data)
            else:
                _, media, data = self._items.pop(image_id)
                self._items[image_id] = (expires, media, data)
            while self._bytes > self.max_bytes and self._items:
                _, (_, _, old) = self._items.popitem(last=False)
                self._bytes -= len(old)
        return image_id, expires, self.sign(image_id, expires)

    def sign(self, image_id: str, expires: int) -> str:
        return hmac.new(self._secret, f"{image_id}.{expires}".encode(), hashlib.sha256).hexdigest()

    def get(self, image_id: str, exp: str, sig: str) -> tuple[str, bytes] | None:
        """The (media type, bytes) a link names: None when it is unknown, expired or its
        signature is wrong; a RequestError when `exp` is not a link's expiry at all."""
        if not _EXPIRY.fullmatch(exp):
            raise RequestError("Invalid 'exp': expected the expiry of an image link (Unix "
                               "seconds).", param="exp")
        expires = int(exp)
        # The signature is the client's to choose: anything but our hex digest is simply wrong,
        # and the digests compare as bytes (compare_digest raises on a non-ASCII str).
        if (expires < time.time() or not _IMAGE_ID.fullmatch(image_id)
                or not _SIGNATURE.fullmatch(sig)
                or not hmac.compare_digest(sig.encode(), self.sign(image_id, expires).encode())):
            return None
        with self._lock:
            item = self._items.get(image_id)
        return (item[1], item[2]) if item else None
