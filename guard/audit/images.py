"""Retained images: the copies a policy keeps, in the image store (guard.imagestore), for a TTL.

A policy's `image_retention` (`none`, `flagged`, `all`) decides which images a trace retains;
the audit store saves them here before it seals the trace and sets each round image's
`image_ref` to the image's content address (`ab/abcdef...`, the sha256 of the bytes). The trace
keeps the sha256 in any case, so a purge never breaks the hash chain: the record says which image
it was, only the copy is gone. The image store is shared by every replica that shares it (the
`postgres` kind), so every replica's review pages show every retained image.

Audit options (both stores):
    images_dir       null = keep no images at all; a folder = the image store is that folder
                     (`image_store:` then names no kind). Unset: the image store of the
                     operators' config (by default following `audit:`, see guard.imagestore)
    image_ttl_days   how long a copy is kept after it was last retained (default 30; null = for
                     ever); an expired copy is no longer served, and `safeedit audit purge`
                     deletes it
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from guard.core.types import Trace
from guard.plugins import ImageStore, PurgeResult, build_image_store, resolve_image_store
from guard.support.errors import ConfigError

DEFAULT_TTL_DAYS = 30.0
_UNSET: Any = object()


class RetainedImages:
    def __init__(self, store: ImageStore, ttl_days: float | None = DEFAULT_TTL_DAYS, *,
                 owns_store: bool = False) -> None:
        self.store = store
        self.ttl_s = None if ttl_days is None else float(ttl_days) * 86400.0
        self._owns_store = owns_store

    @classmethod
    def from_options(cls, opts: dict[str, Any], store: ImageStore | None,
                     audit: Mapping[str, Any]) -> RetainedImages | None:
        """Pops `images_dir` and `image_ttl_days` from the audit options `opts`. `store` is the
        shared image store (None: one is built from `audit`, the full audit section)."""
        images_dir = opts.pop("images_dir", _UNSET)
        ttl = opts.pop("image_ttl_days", DEFAULT_TTL_DAYS)
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float)
                                or ttl <= 0):
            raise ConfigError("audit: image_ttl_days must be a positive number or null")
        if images_dir is None:
            return None
        if store is None:
            return cls(build_image_store(resolve_image_store(None, audit)), ttl, owns_store=True)
        return cls(store, ttl)

    @staticmethod
    def ref(sha256: str) -> str:
        return f"{sha256[:2]}/{sha256}"

    async def keep(self, *traces: Trace) -> None:
        """Save the traces' retained images and point their round images at them (before
        sealing, so the refs are part of the hashed record)."""
        for trace in traces:
            refs = {}
            for sha, image in trace.retained_images.items():
                await self.store.put(image.data, image.media_type, self.ttl_s)
                refs[sha] = self.ref(sha)
            for rnd in trace.rounds if refs else ():
                for judged in rnd.images:
                    if judged.image_sha256 in refs:
                        judged.image_ref = refs[judged.image_sha256]

    async def has(self, sha256: str) -> bool:
        """Whether a copy is kept and within its TTL."""
        return await self.store.has(sha256)

    async def get(self, sha256: str) -> tuple[bytes, str] | None:
        """(bytes, media type), or None when never kept, purged or past its TTL."""
        found = await self.store.get(sha256)
        return None if found is None else (found[1], found[0])

    async def purge(self, *, now: float | None = None, older_than_s: float | None = None,
                    dry_run: bool = False) -> PurgeResult:
        """Delete expired copies, and those retained longer ago than `older_than_s` when given
        (the TTL of copies kept before expiries were recorded). Traces are not touched."""
        now = now or time.time()
        age = older_than_s if older_than_s is not None else self.ttl_s
        return await self.store.purge(now, stored_before=None if age is None else now - age,
                                      dry_run=dry_run)

    async def aclose(self) -> None:
        if self._owns_store:
            await self.store.aclose()
