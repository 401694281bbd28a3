"""The image store: where the bytes of image links and retained images live, shared by replicas.

One small interface (`ImageStore`), content-addressed by sha256, each copy with an expiry:

    put(data, media_type, ttl_s)   store the bytes (once per content); the expiry only grows
    get(id) / has(id)              the bytes while unexpired, else None / False
    purge(before, stored_before)   delete expired copies (and, on request, older ones)
    shared_secret()                a random key every user of the store shares (link signing)
    ready() / aclose()

Kinds (registry `image_stores`, entry-point group `safeedit.image_stores`):
    local      a folder (guard.imagestore.local): one host; several processes may share it
    postgres   chunked rows in PostgreSQL (guard.imagestore.postgres): replicas share it
    s3         objects in an S3-compatible bucket (adapters.imagestore_s3, a vendor adapter that
               registers itself from `adapters` and by entry point): replicas share it

`image_store:` in the operators' config picks one; without `kind` it follows `audit:` (see
`resolve_options`): a PostgreSQL audit store keeps images in the same database and schema, any
other in a folder (`images/` beside a SQLite database, else var/images). The audit option
`images_dir` (a folder) chooses that folder for any audit store, and cannot be combined with an
`image_store:` kind. Link options (`link_ttl_s`, `link_key_env`) sit in the same section and are read
by guard.images.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from guard.errors import ConfigError
from guard.registry import Registry

LINK_OPTIONS = ("link_ttl_s", "link_key_env")


@dataclass(frozen=True, slots=True)
class PurgeResult:
    removed: int
    freed_bytes: int
    kept: int


@runtime_checkable
class ImageStore(Protocol):
    async def put(self, data: bytes, media_type: str, ttl_s: float | None) -> str:
        """Store `data` under its sha256 (the returned id). Storing it again restarts its age
        and keeps the later of the two expiries; `ttl_s` None = until purged by age."""
        ...

    async def get(self, image_id: str, now: float | None = None) -> tuple[str, bytes] | None:
        """(media type, bytes); None when unknown, purged or expired (or not an id at all)."""
        ...

    async def has(self, image_id: str, now: float | None = None) -> bool: ...

    async def purge(self, before: float, *, stored_before: float | None = None,
                    dry_run: bool = False) -> PurgeResult:
        """Delete copies that expire before `before`, and those last stored before
        `stored_before` when given."""
        ...

    async def shared_secret(self) -> bytes:
        """A random key kept in the store, the same for every process that uses it."""
        ...

    async def ready(self) -> bool: ...

    async def aclose(self) -> None: ...


image_stores: Registry[ImageStore] = Registry("image store", "safeedit.image_stores")
image_stores.register("local", "guard.imagestore.local:LocalImageStore.from_config")
image_stores.register("postgres", "guard.imagestore.postgres:PostgresImageStore.from_config")


def resolve_options(section: Mapping[str, Any] | None,
                    audit: Mapping[str, Any]) -> dict[str, Any]:
    """The `image_store:` section, its kind filled in from `audit:` when it names none."""
    options = dict(section or {})
    images_dir = audit.get("images_dir")
    if "kind" in options:
        if images_dir is not None:
            raise ConfigError("image_store names a kind and audit names an images_dir: both say "
                              "where images go; keep one")
        return options
    if audit.get("kind") == "postgres" and images_dir is None:
        follow = {name: audit[name] for name in ("dsn", "dsn_env", "schema") if name in audit}
        return {"kind": "postgres", **follow, **options}
    if images_dir is None:
        images_dir = (Path(audit.get("path", "var/audit.db")).parent / "images"
                      if audit.get("kind", "sqlite") == "sqlite" else Path("var/images"))
    return {"kind": "local", "path": str(images_dir), **options}


def build_image_store(options: Mapping[str, Any]) -> ImageStore:
    """The store a resolved section names (its link options are guard.images' to read)."""
    opts = {name: value for name, value in options.items() if name not in LINK_OPTIONS}
    return image_stores.create(opts.pop("kind", "local"), opts)
