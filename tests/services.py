"""The local PostgreSQL and Redis the suite runs against. Without one, its tests skip with the
reason; with SAFEEDIT_REQUIRE_POSTGRES=1 / SAFEEDIT_REQUIRE_REDIS=1 (set by .ci/run) they fail,
so that CI never passes by skipping them."""

from __future__ import annotations

import asyncio
import os

import asyncpg
import pytest
import redis

PG_DSN = os.environ.get("SAFEEDIT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("SAFEEDIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def require(service: str, variable: str, problem: str | None) -> None:
    """Skip (or fail, with `variable`=1) the calling test when `problem` says `service` is
    unreachable."""
    if problem is None:
        return
    message = f"no {service} answers ({problem})"
    if os.environ.get(variable) == "1":
        pytest.fail(f"{message}; {variable}=1 makes this an error")
    pytest.skip(f"{message}; set {variable}=1 (as .ci/run does) to fail")


async def _postgres_problem(dsn: str) -> str | None:
    try:
        conn = await asyncpg.connect(dsn, timeout=3)
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        return f"{type(exc).__name__}: {exc}"
    await conn.close()
    return None


def require_postgres(dsn: str = PG_DSN) -> str:
    require(f"PostgreSQL server at {dsn}", "SAFEEDIT_REQUIRE_POSTGRES",
            asyncio.run(_postgres_problem(dsn)))
    return dsn


async def drop_schemas(dsn: str, *names: str) -> None:
    """Drop each schema and the ones the stores make beside it, named after it (`<name>_labels`
    for labels' anchors, `<name>_heads`, ...), so that a test leaves nothing in the database."""
    conn = await asyncpg.connect(dsn, timeout=3)
    try:
        found = await conn.fetch(
            "SELECT nspname FROM pg_namespace, unnest($1::text[]) AS given(name)"
            " WHERE nspname = name OR starts_with(nspname, name || '_')", list(names))
        for (schema,) in found:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def require_redis(url: str = REDIS_URL) -> str:
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2) as client:
            client.ping()
        problem = None
    except (redis.RedisError, OSError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    require(f"Redis at {url}", "SAFEEDIT_REQUIRE_REDIS", problem)
    return url
