"""The local image store: content-addressed files in one folder.

    <root>/ab/abcdef…        the bytes, named by their sha256; mtime = when last stored
    <root>/ab/abcdef….json   {"media_type", "expires_at"} (expires_at null = until purged by age)
    <root>/link.key          the shared secret (32 random bytes, mode 0600), made on first use

Files are written to a temporary name and renamed, so a reader never sees half an image.
Several processes on one host may share the folder: the expiry is updated under an flock on the
image file, so a short-lived link's put cannot shorten a retained copy's expiry. Replicas on
several hosts need the `postgres` kind (or one shared volume).

Options (`image_store:` with `kind: local`):
    path     the folder (default var/images)
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import re
import secrets
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from guard.plugins import PurgeResult
from guard.support.errors import ConfigError

log = logging.getLogger("safeedit.imagestore")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
          (b"GIF8", "image/gif"))
_STALE_TMP_S = 3600.0


def sniff_media_type(data: bytes) -> str:
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


class LocalImageStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> LocalImageStore:
        opts = dict(options)
        path = opts.pop("path", "var/images")
        if opts:
            raise ConfigError(f"image_store (local): unknown options {sorted(opts)}")
        return cls(path)

    def __repr__(self) -> str:
        return f"the folder {self.root}"

    def _path(self, image_id: str) -> Path | None:
        if not _SHA256.fullmatch(image_id):  # `$` would pass a trailing newline
            return None
        return self.root / image_id[:2] / image_id

    # --- blocking parts, run in a worker thread -------------------------------------------------

    def _put(self, data: bytes, media_type: str, ttl_s: float | None) -> str:
        image_id = hashlib.sha256(data).hexdigest()
        path = self._path(image_id)
        assert path is not None
        now = time.time()
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomically(path, data)
        with open(path, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # one expiry update at a time, across processes
            meta = _read_meta(path)
            expires = None if ttl_s is None else now + ttl_s
            if meta is not None and expires is not None:  # the later expiry wins
                expires = None if meta["expires_at"] is None else max(expires, meta["expires_at"])
            _write_atomically(_meta_path(path), orjson.dumps(
                {"media_type": media_type, "expires_at": expires}))
            os.utime(path, (now, now))
        return image_id

    def _live(self, image_id: str, now: float | None) -> tuple[Path, dict[str, Any]] | None:
        path = self._path(image_id)
        if path is None:
            return None
        meta = _read_meta(path)
        if meta is None:  # kept before expiries were recorded: until purged by age
            meta = {"media_type": None, "expires_at": None}
        expires = meta["expires_at"]
        if expires is not None and expires <= (now or time.time()) or not path.is_file():
            return None
        return path, meta

    def _get(self, image_id: str, now: float | None) -> tuple[str, bytes] | None:
        live = self._live(image_id, now)
        if live is None:
            return None
        path, meta = live
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != image_id:
            log.error("image %s in %s does not match its sha256; not served", image_id, self.root)
            return None
        return meta["media_type"] or sniff_media_type(data), data

    def _purge(self, before: float, stored_before: float | None, dry_run: bool) -> PurgeResult:
        removed = freed = kept = 0
        if not self.root.is_dir():
            return PurgeResult(0, 0, 0)
        now = time.time()
        for sub in os.scandir(self.root):
            if not sub.is_dir() or len(sub.name) != 2:
                continue
            for entry in os.scandir(sub.path):
                if not entry.is_file() or entry.name.endswith(".json"):
                    continue
                st = entry.stat()
                if entry.name.startswith(".tmp-"):
                    if now - st.st_mtime > _STALE_TMP_S and not dry_run:
                        Path(entry.path).unlink(missing_ok=True)
                    continue
                if not _SHA256.fullmatch(entry.name):
                    continue
                meta = _read_meta(Path(entry.path))
                expires = meta["expires_at"] if meta is not None else None
                if ((expires is not None and expires < before)
                        or (stored_before is not None and st.st_mtime < stored_before)):
                    if not dry_run:
                        Path(entry.path).unlink(missing_ok=True)
                        _meta_path(Path(entry.path)).unlink(missing_ok=True)
                    removed += 1
                    freed += st.st_size
                else:
                    kept += 1
        return PurgeResult(removed, freed, kept)

    def _secret(self) -> bytes:
        path = self.root / "link.key"
        if not path.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
            try:
                os.write(fd, secrets.token_bytes(32))
                os.close(fd)
                os.link(tmp, path)  # fails if another process made one first: theirs is used
            except FileExistsError:
                pass
            finally:
                Path(tmp).unlink(missing_ok=True)
        return path.read_bytes()

    # --- the ImageStore interface ---------------------------------------------------------------

    async def put(self, data: bytes, media_type: str, ttl_s: float | None) -> str:
        return await asyncio.to_thread(self._put, data, media_type, ttl_s)

    async def get(self, image_id: str, now: float | None = None) -> tuple[str, bytes] | None:
        return await asyncio.to_thread(self._get, image_id, now)

    async def has(self, image_id: str, now: float | None = None) -> bool:
        return await asyncio.to_thread(self._live, image_id, now) is not None

    async def purge(self, before: float, *, stored_before: float | None = None,
                    dry_run: bool = False) -> PurgeResult:
        return await asyncio.to_thread(self._purge, before, stored_before, dry_run)

    async def shared_secret(self) -> bytes:
        return await asyncio.to_thread(self._secret)

    async def ready(self) -> bool:
        try:
            await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        except OSError:
            return False
        return os.access(self.root, os.W_OK)

    async def aclose(self) -> None:
        return None


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        meta = orjson.loads(_meta_path(path).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("expires_at"), int | float | None):
        return None
    return {"media_type": meta.get("media_type"), "expires_at": meta.get("expires_at")}


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
