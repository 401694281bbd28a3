"""Retained images: content-addressed files on disk, kept for a TTL, removed by a purge.

A policy's `image_retention` (`none`, `flagged`, `all`) decides which images a trace retains;
the audit store saves them here before it writes the trace and sets each round image's
`image_ref` to the file's path relative to `images_dir` (`ab/abcdef...`, the sha256 of the bytes).
The trace keeps the sha256 in any case, so a purge never breaks the hash chain: the record says
which image it was, only the copy is gone.

Audit options (both stores):
    images_dir       where files go (sqlite: `images/` beside the database; postgres:
                     `var/images`; with several replicas, a volume they share); null = keep none
    image_ttl_days   how long a file is kept after it was last retained (default 30; null = for
                     ever); expired files are no longer served and `safeedit audit purge`
                     deletes them
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guard.errors import ConfigError
from guard.types import GeneratedImage, Trace

log = logging.getLogger("safeedit.audit.images")
DEFAULT_TTL_DAYS = 30.0
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
          (b"GIF8", "image/gif"))


def media_type(data: bytes) -> str:
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


@dataclass(frozen=True, slots=True)
class PurgeResult:
    removed: int
    freed_bytes: int
    kept: int


class ImageStore:
    def __init__(self, root: str | Path, ttl_days: float | None = DEFAULT_TTL_DAYS) -> None:
        self.root = Path(root)
        self.ttl_s = None if ttl_days is None else float(ttl_days) * 86400.0

    @classmethod
    def from_options(cls, opts: dict[str, Any], default_dir: str | Path) -> ImageStore | None:
        """Pops `images_dir` and `image_ttl_days` from the audit options."""
        root = opts.pop("images_dir", default_dir)
        ttl = opts.pop("image_ttl_days", DEFAULT_TTL_DAYS)
        if ttl is not None and (not isinstance(ttl, int | float) or ttl <= 0):
            raise ConfigError("audit: image_ttl_days must be a positive number or null")
        return None if root is None else cls(root, ttl)

    @staticmethod
    def ref(sha256: str) -> str:
        return f"{sha256[:2]}/{sha256}"

    def path(self, sha256: str) -> Path:
        if not _SHA256.fullmatch(sha256):  # `$` would pass a trailing newline
            raise ValueError("not a sha256 hex digest")
        return self.root / self.ref(sha256)

    def put(self, image: GeneratedImage) -> str:
        """Store the bytes under their sha256 (atomically; an existing copy is only touched, which
        restarts its TTL). Returns the ref."""
        path = self.path(image.sha256)
        if path.exists():
            os.utime(path)
            return self.ref(image.sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(image.data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self.ref(image.sha256)

    def keep(self, *traces: Trace) -> None:
        """Save the traces' retained images and point their round images at them (before
        sealing, so the refs are part of the hashed record)."""
        for trace in traces:
            refs = {sha: self.put(image) for sha, image in trace.retained_images.items()}
            for rnd in trace.rounds if refs else ():
                for judged in rnd.images:
                    if judged.image_sha256 in refs:
                        judged.image_ref = refs[judged.image_sha256]

    def has(self, sha256: str, now: float | None = None) -> bool:
        """Whether a copy is kept and within its TTL."""
        try:
            mtime = self.path(sha256).stat().st_mtime
        except (ValueError, OSError):
            return False
        return self.ttl_s is None or (now or time.time()) - mtime <= self.ttl_s

    def get(self, sha256: str, now: float | None = None) -> tuple[bytes, str] | None:
        """(bytes, media type), or None when never kept, purged or past its TTL."""
        try:
            path = self.path(sha256)
            if self.ttl_s is not None and (now or time.time()) - path.stat().st_mtime > self.ttl_s:
                return None
            data = path.read_bytes()
        except (ValueError, OSError):
            return None
        return data, media_type(data)

    def purge(self, *, now: float | None = None, older_than_s: float | None = None,
              dry_run: bool = False) -> PurgeResult:
        """Delete files older than the TTL (or `older_than_s`). Traces are not touched."""
        limit = older_than_s if older_than_s is not None else self.ttl_s
        now = now or time.time()
        removed = freed = kept = 0
        if not self.root.is_dir():
            return PurgeResult(0, 0, 0)
        for sub in os.scandir(self.root):
            if not sub.is_dir() or len(sub.name) != 2:
                continue
            for entry in os.scandir(sub.path):
                if not entry.is_file():
                    continue
                st = entry.stat()
                stale_tmp = entry.name.startswith(".tmp-") and now - st.st_mtime > 3600
                if stale_tmp or (limit is not None and now - st.st_mtime > limit):
                    if not dry_run:
                        Path(entry.path).unlink(missing_ok=True)
                    removed += 1
                    freed += st.st_size
                else:
                    kept += 1
        return PurgeResult(removed, freed, kept)
