"""What the PostgreSQL parts (the audit store, the image store) share: the DSN from their
options, the schema name, and a connection pool opened on first use, after the part's schema
is created or brought up to date under one advisory lock per schema (replicas starting together,
and both parts in one schema, take turns)."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from guard.support.errors import ConfigError, GuardError, Unavailable

_IDENT = re.compile(r"[a-z_][a-z0-9_]{0,62}")

Migrate = Callable[[asyncpg.Connection], Awaitable[None]]


def dsn_from(options: dict[str, Any], section: str) -> str:
    """Pop `dsn` / `dsn_env` from a part's options: the DSN, or a ConfigError naming `section`."""
    dsn = options.pop("dsn", None)
    dsn_env = options.pop("dsn_env", None)
    if dsn_env:
        dsn = dsn or os.environ.get(dsn_env)
        if not dsn:
            raise ConfigError(f"{section}: dsn_env names {dsn_env}, which is not set")
    if not dsn:
        raise ConfigError(f"{section}: `dsn` (or `dsn_env`) is required")
    return str(dsn)


def plain_schema(schema: str, section: str) -> str:
    """`schema`, or a ConfigError: it is quoted into SQL, so a plain lower-case identifier."""
    if not _IDENT.fullmatch(schema):
        raise ConfigError(f"{section}: schema {schema!r} is not a plain identifier")
    return schema


class LazyPool:
    """An asyncpg pool for one schema, opened by the first `get` (a part is built before the
    event loop runs). `migrate` runs once per pool, in a transaction holding the schema's
    migration lock, with the schema created and on the search path."""

    def __init__(self, dsn: str, *, schema: str, section: str, code: str,
                 application_name: str, min_size: int, max_size: int, timeout_s: float,
                 migrate: Migrate) -> None:
        self.schema = plain_schema(schema, section)
        self._dsn = dsn
        self._section, self._code = section, code
        self._settings = {"search_path": schema, "application_name": application_name}
        self._sizes = (min_size, max_size)
        self._timeout = timeout_s
        self._migrate = migrate
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()

    async def get(self) -> asyncpg.Pool:
        if self._pool is None:
            async with self._opening:
                if self._pool is None:
                    self._pool = await self._open()
        return self._pool

    async def _open(self) -> asyncpg.Pool:
        try:
            pool = await asyncpg.create_pool(
                self._dsn, min_size=self._sizes[0], max_size=self._sizes[1],
                command_timeout=self._timeout, server_settings=self._settings)
        except (OSError, asyncpg.PostgresError) as exc:
            raise Unavailable(f"{self._section}: cannot connect: {exc}",
                             code=self._code) from exc
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))",
                                   f"safeedit-migrations:{self.schema}")
                await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
                await conn.execute(f'SET LOCAL search_path TO "{self.schema}"')
                await self._migrate(conn)
        except BaseException:
            await pool.close()
            raise
        return pool

    async def ready(self) -> bool:
        try:
            await (await self.get()).fetchval("SELECT 1")
        except (GuardError, OSError, asyncpg.PostgresError):
            return False
        return True

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()
