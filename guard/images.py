"""Images the proxy serves by URL when a client asks for `response_format: url`.

Kept in memory (bounded, expiring) and addressed by signed links, so a link cannot be guessed,
altered or used after it expires.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict

from guard.types import GeneratedImage


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

    def get(self, image_id: str, expires: int, signature: str) -> tuple[str, bytes] | None:
        # Bytes, not str: compare_digest raises on a non-ASCII str, and the signature is the
        # client's to choose.
        if expires < time.time() or not hmac.compare_digest(
                signature.encode(errors="replace"), self.sign(image_id, expires).encode()):
            return None
        with self._lock:
            item = self._items.get(image_id)
        return (item[1], item[2]) if item else None
