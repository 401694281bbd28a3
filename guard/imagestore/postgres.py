"""The PostgreSQL image store: images in chunks, shared by every replica using the database.

    stored_images          sha256, media type, size, chunk count, stored_at, expires_at
    stored_image_chunks    (sha256, n) -> bytea, `chunk_bytes` each; deleted with their image
    image_store_secrets    the shared secret (link signing), drawn once by whoever comes first

The tables are created if missing, in the audit store's schema by default, under the audit
store's advisory lock for that schema (replicas starting together create them once; the schema
itself is created by whichever comes first). A put inserts the image row and its chunks
in one transaction; a concurrent put of the same bytes waits on that row, then only moves its
expiry (never earlier) and its stored_at. A read takes the row and its chunks from one snapshot
and checks the sha256 of what it joined. Time is the writer's clock (Unix seconds); an expiry
of +infinity means "until purged by age".

Options (`image_store:` with `kind: postgres`; without them it follows `audit:`):
    dsn / dsn_env        as the audit store's
    schema               default `public` (following audit: the audit store's schema)
    chunk_bytes          default 1 MiB
    pool_max_size        most connections per process (default 4)
    command_timeout_s    per statement (default 30)
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import asyncpg

from guard.plugins import PurgeResult
from guard.support.errors import ConfigError, Unavailable
from guard.support.pg import LazyPool, dsn_from

log = logging.getLogger("safeedit.imagestore")
_SHA256 = re.compile(r"[0-9a-f]{64}")
CHUNK_BYTES = 1024 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS stored_images (
    sha256      text PRIMARY KEY,
    media_type  text NOT NULL,
    size        bigint NOT NULL,
    chunks      integer NOT NULL,
    stored_at   double precision NOT NULL,
    expires_at  double precision NOT NULL
);
CREATE INDEX IF NOT EXISTS stored_images_expires ON stored_images (expires_at);
CREATE INDEX IF NOT EXISTS stored_images_stored ON stored_images (stored_at);
CREATE TABLE IF NOT EXISTS stored_image_chunks (
    sha256  text NOT NULL REFERENCES stored_images (sha256) ON DELETE CASCADE,
    n       integer NOT NULL,
    data    bytea NOT NULL,
    PRIMARY KEY (sha256, n)
);
ALTER TABLE stored_image_chunks ALTER COLUMN data SET STORAGE EXTERNAL;
CREATE TABLE IF NOT EXISTS image_store_secrets (
    name    text PRIMARY KEY,
    secret  bytea NOT NULL
);
"""


class PostgresImageStore:
    def __init__(self, dsn: str, *, schema: str = "public", chunk_bytes: int = CHUNK_BYTES,
                 pool_max_size: int = 4, command_timeout_s: float = 30.0) -> None:
        if not isinstance(chunk_bytes, int) or chunk_bytes < 1024:
            raise ConfigError("image_store (postgres): chunk_bytes must be an integer >= 1024")
        if not isinstance(pool_max_size, int) or pool_max_size < 1:
            raise ConfigError("image_store (postgres): pool_max_size must be a positive integer")
        self._pg = LazyPool(dsn, schema=schema, section="image_store (postgres)",
                            code="image_store_unavailable",
                            application_name="safeedit-guard-images", min_size=0,
                            max_size=pool_max_size, timeout_s=command_timeout_s,
                            migrate=_migrate)
        self.schema = self._pg.schema
        self.chunk_bytes = chunk_bytes

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> PostgresImageStore:
        opts = dict(options)
        dsn = dsn_from(opts, "image_store (postgres)")
        kwargs = {name: opts.pop(name) for name in
                  ("schema", "chunk_bytes", "pool_max_size", "command_timeout_s") if name in opts}
        if opts:
            raise ConfigError(f"image_store (postgres): unknown options {sorted(opts)}")
        return cls(dsn, **kwargs)

    def __repr__(self) -> str:
        return f"PostgreSQL (schema {self.schema})"

    async def _get_pool(self) -> asyncpg.Pool:
        return await self._pg.get()

    @contextlib.asynccontextmanager
    async def _connection(self, transaction: bool = True, **options: Any
                          ) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection (in a transaction), the driver's failures translated."""
        try:
            async with (await self._get_pool()).acquire() as conn:
                if not transaction:
                    yield conn
                    return
                async with conn.transaction(**options):
                    yield conn
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise Unavailable(f"image store (postgres): {type(exc).__name__}: {exc}",
                             code="image_store_unavailable") from exc

    # --- the ImageStore interface ---------------------------------------------------------------

    async def put(self, data: bytes, media_type: str, ttl_s: float | None) -> str:
        image_id = hashlib.sha256(data).hexdigest()
        now = time.time()
        expires = math.inf if ttl_s is None else now + ttl_s
        chunks = [data[i:i + self.chunk_bytes] for i in range(0, len(data), self.chunk_bytes)]
        async with self._connection() as conn:
            # xmax = 0: this statement inserted the row (a conflicting put updated it instead,
            # after waiting for the inserting one to commit its chunks).
            inserted = await conn.fetchval(
                "INSERT INTO stored_images (sha256, media_type, size, chunks, stored_at,"
                " expires_at) VALUES ($1, $2, $3, $4, $5, $6)"
                " ON CONFLICT (sha256) DO UPDATE SET stored_at = excluded.stored_at,"
                " expires_at = greatest(stored_images.expires_at, excluded.expires_at)"
                " RETURNING xmax = 0", image_id, media_type, len(data), len(chunks), now, expires)
            if inserted:
                await conn.executemany(
                    "INSERT INTO stored_image_chunks (sha256, n, data) VALUES ($1, $2, $3)",
                    [(image_id, n, chunk) for n, chunk in enumerate(chunks)])
        return image_id

    async def get(self, image_id: str, now: float | None = None) -> tuple[str, bytes] | None:
        if not _SHA256.fullmatch(image_id):
            return None
        async with self._connection(isolation="repeatable_read", readonly=True) as conn:
            row = await conn.fetchrow("SELECT media_type, chunks FROM stored_images"
                                      " WHERE sha256 = $1 AND expires_at > $2",
                                      image_id, now or time.time())
            if row is None:
                return None
            parts = await conn.fetch("SELECT data FROM stored_image_chunks WHERE sha256 = $1"
                                     " ORDER BY n", image_id)
        data = b"".join(part["data"] for part in parts)
        if len(parts) != row["chunks"] or hashlib.sha256(data).hexdigest() != image_id:
            log.error("image %s in %r does not match its sha256; not served", image_id, self)
            return None
        return row["media_type"], data

    async def has(self, image_id: str, now: float | None = None) -> bool:
        if not _SHA256.fullmatch(image_id):
            return False
        async with self._connection(transaction=False) as conn:
            return bool(await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM stored_images WHERE sha256 = $1"
                " AND expires_at > $2)", image_id, now or time.time()))

    async def purge(self, before: float, *, stored_before: float | None = None,
                    dry_run: bool = False) -> PurgeResult:
        where = "expires_at < $1 OR stored_at < $2"
        args = (before, -math.inf if stored_before is None else stored_before)
        async with self._connection() as conn:
            if dry_run:
                removed, freed = await conn.fetchrow(
                    f"SELECT count(*), coalesce(sum(size), 0) FROM stored_images WHERE {where}",
                    *args)
            else:
                removed, freed = await conn.fetchrow(
                    f"WITH gone AS (DELETE FROM stored_images WHERE {where} RETURNING size)"
                    " SELECT count(*), coalesce(sum(size), 0) FROM gone", *args)
            total = await conn.fetchval("SELECT count(*) FROM stored_images")
        return PurgeResult(removed, int(freed), total - (removed if dry_run else 0))

    async def shared_secret(self) -> bytes:
        async with self._connection() as conn:
            await conn.execute("INSERT INTO image_store_secrets (name, secret) VALUES"
                               " ('links', $1) ON CONFLICT (name) DO NOTHING",
                               secrets.token_bytes(32))
            secret: bytes = await conn.fetchval(
                "SELECT secret FROM image_store_secrets WHERE name = 'links'")
        return secret

    async def ready(self) -> bool:
        return await self._pg.ready()

    async def aclose(self) -> None:
        await self._pg.close()


async def _migrate(conn: asyncpg.Connection) -> None:
    await conn.execute(_SCHEMA)
