"""PostgreSQL audit store: the SQLite store's interface, for several proxy replicas.

asyncpg with a connection pool, opened on first use on the running event loop. Schema changes
are numbered migrations recorded in `safeedit_migrations`; each process applies the missing ones
at start under a transaction-scoped advisory lock, so replicas starting together apply each once.

One chain per store, however many processes write: every append locks the single `chain_head`
row (`SELECT ... FOR UPDATE`), takes its seq and hash, inserts the trace as seq + 1 and moves the
head, all in one transaction. Writers queue on that row lock and the seq has no gaps; the lock is
held only for the insert (bodies are serialised before it is taken). Labels (guard.core.labels)
are a second chain, appended the same way (`labels`, `label_chain_head`, `label_checkpoints`).
All but the PostgreSQL dialect and the schema is guard.audit.sql's, shared with SQLite.

Audit options (`audit:` in the operators' config, `kind: postgres`):
    dsn                  postgresql://user:password@host:5432/dbname
    dsn_env              or: the name of an environment variable holding the DSN (keeps the
                         password out of the file)
    schema               schema for the tables (default `public`; created if missing)
    pool_min_size        connections kept open (default 1)
    pool_max_size        most connections per process (default 10, at least 2)
    command_timeout_s    per statement (default 30)
    images_dir           retained images (default: the image store, by default PostgreSQL in this
                         schema, shared by the replicas), image_ttl_days: see guard.audit.images
    checkpoint_every, checkpoint_key_env, checkpoint_keys_env, anchor, session_key_env
                         see guard.audit.common
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Unpack

import asyncpg

from guard.audit import policies, search
from guard.audit.common import where_sql
from guard.audit.sql import Appending, ChainOptions, Row, SQLStore
from guard.support.errors import ConfigError
from guard.support.pg import LazyPool, dsn_from

MIGRATIONS: list[tuple[int, str, str]] = [
    (1, "traces, chain head, checkpoints", """
    CREATE TABLE traces (
        seq            bigint PRIMARY KEY,
        id             text NOT NULL UNIQUE,
        created_at     double precision NOT NULL,
        tenant         text,
        key_id         text,
        decision       text NOT NULL,
        status         integer NOT NULL,
        categories     text[] NOT NULL,
        policy_id      text,
        policy_version integer,
        model          text,
        body           text NOT NULL,     -- the trace as canonical JSON, byte for byte
        prev_hash      text,
        hash           text NOT NULL
    );
    CREATE INDEX traces_created ON traces (created_at);
    CREATE INDEX traces_tenant ON traces (tenant, created_at);
    CREATE INDEX traces_decision ON traces (decision, created_at);
    CREATE INDEX traces_categories ON traces USING gin (categories);
    CREATE INDEX traces_hash ON traces (hash);
    CREATE TABLE chain_head (
        id   smallint PRIMARY KEY CHECK (id = 1),
        seq  bigint NOT NULL,
        hash text
    );
    INSERT INTO chain_head (id, seq, hash) VALUES (1, 0, NULL);
    CREATE TABLE checkpoints (
        seq             bigint PRIMARY KEY,
        trace_id        text NOT NULL,
        hash            text NOT NULL,
        created_at      double precision NOT NULL,
        key_fingerprint text NOT NULL,
        signature       text NOT NULL
    );
    """),
    (2, "checkpoint key ids", "ALTER TABLE checkpoints ADD COLUMN IF NOT EXISTS kid text"),
    (3, "labels, their chain head and checkpoints", """
    CREATE TABLE labels (
        seq        bigint PRIMARY KEY,
        id         text NOT NULL UNIQUE,
        trace_id   text NOT NULL,
        slot       integer,               -- NULL: the prompt
        round      integer NOT NULL,
        verdict    text NOT NULL,
        category   text,
        key_id     text,
        tenant     text,
        created_at double precision NOT NULL,
        body       text NOT NULL,         -- the label as canonical JSON, byte for byte
        prev_hash  text,
        hash       text NOT NULL
    );
    CREATE INDEX labels_item ON labels (trace_id, slot, round);
    CREATE INDEX labels_tenant ON labels (tenant, created_at);
    CREATE INDEX labels_hash ON labels (hash);
    CREATE TABLE label_chain_head (
        id   smallint PRIMARY KEY CHECK (id = 1),
        seq  bigint NOT NULL,
        hash text
    );
    INSERT INTO label_chain_head (id, seq, hash) VALUES (1, 0, NULL);
    CREATE TABLE label_checkpoints (
        seq             bigint PRIMARY KEY,
        label_id        text NOT NULL,
        hash            text NOT NULL,
        created_at      double precision NOT NULL,
        key_fingerprint text NOT NULL,
        signature       text NOT NULL,
        kid             text
    );
    """),
    (4, "the dashboard's figures of each trace", """
    CREATE TABLE IF NOT EXISTS trace_figures (
        seq            bigint PRIMARY KEY,
        created_at     double precision NOT NULL,
        tenant         text,
        decision       text NOT NULL,
        policy_id      text,
        policy_version integer,
        rounds         integer NOT NULL,
        request_ms     double precision NOT NULL,
        judge_ms       double precision[] NOT NULL,
        backend_ms     double precision[] NOT NULL,
        flags          text[] NOT NULL    -- 'action:category'
    );
    CREATE INDEX IF NOT EXISTS trace_figures_created ON trace_figures (created_at);
    CREATE INDEX IF NOT EXISTS trace_figures_tenant ON trace_figures (tenant, created_at);
    """),
    (5, "the q and endpoint filters' table", search.POSTGRES_MIGRATION),
    (6, "the transparency log: row signatures, Merkle tree, signed heads", """
    CREATE TABLE IF NOT EXISTS entry_sigs (
        chain text NOT NULL, seq bigint NOT NULL, kid text NOT NULL, sig text NOT NULL,
        PRIMARY KEY (chain, seq)
    );
    CREATE TABLE IF NOT EXISTS log_state (
        id smallint PRIMARY KEY CHECK (id = 1), seq bigint NOT NULL, hash text,
        trace_seq bigint NOT NULL, label_seq bigint NOT NULL,
        legacy_trace_seq bigint NOT NULL, legacy_label_seq bigint NOT NULL
    );
    INSERT INTO log_state VALUES (1, 0, NULL, 0, 0,
        (SELECT coalesce(max(seq), 0) FROM traces), (SELECT coalesce(max(seq), 0) FROM labels))
        ON CONFLICT DO NOTHING;
    CREATE TABLE IF NOT EXISTS log_leaves (
        idx bigint PRIMARY KEY, kind text NOT NULL, ref text NOT NULL, seq bigint,
        data text NOT NULL, leaf_hash text NOT NULL
    );
    CREATE INDEX IF NOT EXISTS log_leaves_ref ON log_leaves (kind, ref);
    CREATE TABLE IF NOT EXISTS log_nodes (
        level integer NOT NULL, idx bigint NOT NULL, hash text NOT NULL,
        PRIMARY KEY (level, idx)
    );
    CREATE TABLE IF NOT EXISTS log_heads (
        n bigserial PRIMARY KEY, tree_size bigint NOT NULL, root_hash text NOT NULL,
        timestamp bigint NOT NULL, key_id text NOT NULL, signature text NOT NULL
    );
    """),
    (7, "the policy history", policies.POSTGRES_MIGRATION),
]


class PostgresStore(SQLStore):
    kind = "postgres"

    def __init__(self, dsn: str, *, schema: str = "public", pool_min_size: int = 1,
                 pool_max_size: int = 10, command_timeout_s: float = 30.0,
                 **options: Unpack[ChainOptions]) -> None:
        if pool_max_size < 2 or pool_min_size < 0 or pool_min_size > pool_max_size:
            # verify reads the chain on one connection and looks rows up on another
            raise ConfigError("audit (postgres): need 0 <= pool_min_size <= pool_max_size, "
                              "pool_max_size >= 2")
        pool = LazyPool(dsn, schema=schema, section="audit (postgres)", code="audit_unavailable",
                        application_name="safeedit-guard", min_size=pool_min_size,
                        max_size=pool_max_size, timeout_s=command_timeout_s, migrate=_migrate)
        self.schema = pool.schema
        super().__init__(PostgresDialect(pool), **options)

    @classmethod
    def own_options(cls, opts: dict[str, Any]) -> dict[str, Any]:
        dsn = dsn_from(opts, "audit (postgres)")
        return {"dsn": dsn, **{name: opts.pop(name) for name in
                               ("schema", "pool_min_size", "pool_max_size", "command_timeout_s")
                               if name in opts}}

    @classmethod
    def log_defaults(cls, own: dict[str, Any]) -> tuple[Path | None, dict[str, Any]]:
        """Replicas share the store, so a configured key; heads in a schema of their own."""
        return None, {"kind": "postgres", "dsn": own["dsn"],
                      "schema": f"{own.get('schema', 'public')}_heads"}

    async def migrations(self) -> list[tuple[int, str]]:
        """Applied migrations, oldest first."""
        rows = await self.dialect.fetch("SELECT version, name FROM safeedit_migrations"
                                        " ORDER BY version")
        return [(r[0], r[1]) for r in rows]


class PostgresDialect:
    """An asyncpg pool, opened on first use on the running event loop (guard.support.pg)."""

    has_category = "categories @> ?::text[]"
    prompt_match: search.PromptMatch | None = search.POSTGRES  # full-text search
    # As guard.audit.labels.sample_point: the first 32 bits of md5(id), in [0, 1).
    sample_point = "('x' || substr(md5(id), 1, 8))::bit(32)::bigint / 4294967296.0"
    bucket = "floor(created_at / ?)::bigint"
    elements = "unnest({}) AS e(value)"

    def __init__(self, pool: LazyPool) -> None:
        self.pool = pool

    def categories_column(self, categories: Sequence[str]) -> list[str]:
        return list(categories)

    def categories_of(self, column: Sequence[str]) -> list[str]:
        return list(column)

    def list_column(self, values: Sequence[Any]) -> list[Any]:
        return list(values)

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        pool = await self.pool.get()
        rows: list[Row] = await pool.fetch(numbered(sql), *args)
        return rows

    async def append(self, head: str, appending: Appending) -> None:
        pool = await self.pool.get()
        async with pool.acquire() as conn, conn.transaction():
            # Writers queue on this row lock: the seq has no gaps and the chain never forks.
            seq, hash_ = await conn.fetchrow(f"SELECT seq, hash FROM {head} WHERE id = 1"
                                             " FOR UPDATE")
            for sql, rows in appending(seq, hash_):
                await conn.executemany(numbered(sql), rows)

    async def walk(self, select: str, where: Sequence[str], args: Sequence[Any],
                   batch: int) -> AsyncIterator[Row]:
        """From one snapshot, through a server-side cursor: memory stays flat however long the
        chain."""
        pool = await self.pool.get()
        async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read",
                                                            readonly=True):
            async for row in conn.cursor(numbered(select + where_sql(where) + " ORDER BY seq"),
                                         *args, prefetch=batch):
                yield row

    async def ready(self) -> bool:
        return await self.pool.ready()

    async def aclose(self) -> None:
        await self.pool.close()


@functools.lru_cache(maxsize=1024)
def numbered(sql: str) -> str:
    """`sql` with its `?` placeholders numbered as PostgreSQL's `$1, $2...`."""
    number = itertools.count(1)
    return re.sub(r"\?", lambda _: f"${next(number)}", sql)


async def _migrate(conn: asyncpg.Connection) -> None:
    """The schema's migrations not yet applied, in order (guard.support.pg.LazyPool holds the lock)."""
    await conn.execute("CREATE TABLE IF NOT EXISTS safeedit_migrations ("
                       " version integer PRIMARY KEY, name text NOT NULL,"
                       " applied_at timestamptz NOT NULL DEFAULT now())")
    done = {r["version"] for r in await conn.fetch("SELECT version FROM safeedit_migrations")}
    for version, name, script in MIGRATIONS:
        if version not in done:
            await conn.execute(script)
            await conn.execute("INSERT INTO safeedit_migrations (version, name)"
                               " VALUES ($1, $2)", version, name)
