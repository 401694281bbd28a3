"""PostgreSQL audit store: the SQLite store's interface, for several proxy replicas.

asyncpg with a connection pool, opened on first use on the running event loop. Schema changes
are numbered migrations recorded in `safeedit_migrations`; each process applies the missing ones
at start under a transaction-scoped advisory lock, so replicas starting together apply each once.

One chain per store, however many processes write: every append locks the single `chain_head`
row (`SELECT ... FOR UPDATE`), takes its seq and hash, inserts the trace as seq + 1 and moves the
head, all in one transaction. Writers queue on that row lock and the seq has no gaps; the lock is
held only for the insert (bodies are serialised before it is taken). Labels (guard.audit.labels) are a
second chain, appended the same way (`labels`, `label_chain_head`, `label_checkpoints`).

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

import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import asyncpg
import orjson

from guard.audit.anchor import Anchorer
from guard.audit.chain import (
    DEFAULT_CHECKPOINT_EVERY,
    ChainRow,
    ChainTables,
    Checkpoint,
    Signer,
    TableChain,
    column_text,
    index_columns,
    label_anchor_options,
    link_hash,
)
from guard.audit.common import common_options, decode_cursor, encode_cursor
from guard.audit.images import RetainedImages
from guard.audit.labels import (
    LABEL_TABLES,
    QUEUE_ORDER,
    UNLABELLED,
    Label,
    LabelPage,
    QueuePage,
    QueueQuery,
    bind_label,
    label_page,
    label_query,
    label_row,
)
from guard.audit.twochain import TwoChainStore
from guard.core.types import Trace
from guard.plugins import ImageStore, TracePage, TraceQuery
from guard.support.errors import ConfigError, NotFound
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
]

_COLUMNS = ("seq, id, created_at, tenant, key_id, decision, status, categories, policy_id,"
            " policy_version, model, body, prev_hash, hash")
_CHECKPOINT_COLUMNS = "seq, trace_id, hash, created_at, key_fingerprint, signature, kid"
# The queue's sample point of a trace id, as guard.audit.labels.sample_point computes it.
_SAMPLE_POINT = "('x' || substr(md5(id), 1, 8))::bit(32)::bigint / 4294967296.0"


_TRACES = ChainTables("traces", "chain_head", "checkpoints", _COLUMNS,
                      _CHECKPOINT_COLUMNS, lambda row: _chain_row(row))


class PostgresStore(TwoChainStore):
    traces_tables = _TRACES

    def __init__(self, dsn: str, *, schema: str = "public", pool_min_size: int = 1,
                 pool_max_size: int = 10, command_timeout_s: float = 30.0,
                 images: RetainedImages | None = None, signer: Signer | None = None,
                 checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
                 anchorer: Anchorer | None = None,
                 label_anchorer: Anchorer | None = None) -> None:
        if pool_max_size < 2 or pool_min_size < 0 or pool_min_size > pool_max_size:
            # verify reads the chain on one connection and looks rows up on another
            raise ConfigError("audit (postgres): need 0 <= pool_min_size <= pool_max_size, "
                              "pool_max_size >= 2")
        self._pg = LazyPool(dsn, schema=schema, section="audit (postgres)",
                            code="audit_unavailable", application_name="safeedit-guard",
                            min_size=pool_min_size, max_size=pool_max_size,
                            timeout_s=command_timeout_s, migrate=_migrate)
        self.schema = self._pg.schema
        self.images = images
        self.signer = signer
        self.checkpoint_every = checkpoint_every
        self.anchorer = anchorer
        self.label_anchorer = label_anchorer
        self.label_chain = TableChain(self, LABEL_TABLES)  # what verify_labels walks

    @classmethod
    def from_config(cls, options: Mapping[str, Any], *,
                    images: ImageStore | None = None) -> PostgresStore:
        """`images`: the shared image store, for retained images (None: per the options)."""
        opts = dict(options)
        dsn = dsn_from(opts, "audit (postgres)")
        kwargs = {name: opts.pop(name) for name in
                  ("schema", "pool_min_size", "pool_max_size", "command_timeout_s")
                  if name in opts}
        labels_anchor = label_anchor_options(opts.get("anchor"))
        common = common_options(opts, {"kind": "postgres", **options}, images)
        if opts:
            raise ConfigError(f"audit (postgres): unknown options {sorted(opts)}")
        return cls(dsn, images=common.images, signer=common.signer,
                   checkpoint_every=common.checkpoint_every, anchorer=common.anchorer,
                   label_anchorer=Anchorer.from_options(labels_anchor, common.signer), **kwargs)

    async def _get_pool(self) -> asyncpg.Pool:
        return await self._pg.get()

    async def migrations(self) -> list[tuple[int, str]]:
        """Applied migrations, oldest first."""
        pool = await self._get_pool()
        rows = await pool.fetch("SELECT version, name FROM safeedit_migrations ORDER BY version")
        return [(r["version"], r["name"]) for r in rows]

    # --- the AuditStore interface -------------------------------------------------------------

    async def write(self, trace: Trace) -> Trace:
        await self.write_many([trace])
        return trace

    async def write_many(self, traces: Sequence[Trace]) -> None:
        """Append several traces in one transaction, in order (the same sealing as `write`)."""
        if self.images is not None:
            await self.images.keep(*traces)
        bodies = [(t.id, t.canonical_bytes()) for t in traces]

        def row(i: int, seq: int, prev: str | None, hash_: str) -> tuple[Any, ...]:
            trace = traces[i]
            trace.prev_hash, trace.hash = prev, hash_  # = Trace.seal
            c = index_columns(vars(trace))
            return (seq, c["id"], c["created_at"], c["tenant"], c["key_id"], c["decision"],
                    c["status"], c["categories"], c["policy_id"], c["policy_version"],
                    c["model"], bodies[i][1].decode(), prev, hash_)

        await self._append(_TRACES, bodies, row)
        if self.anchorer is not None:
            self.anchorer.note_write()

    async def _append(self, chain: ChainTables, bodies: Sequence[tuple[str, bytes]],
                      row: Callable[[int, int, str | None, str], tuple[Any, ...]]) -> None:
        """Append (id, canonical body) pairs to `chain` in one transaction: `row(i, seq,
        prev_hash, hash)` is the i-th row to insert; checkpoints as they fall due."""
        if not bodies:
            return
        pool = await self._get_pool()
        async with pool.acquire() as conn, conn.transaction():
            head = await conn.fetchrow(f"SELECT seq, hash FROM {chain.head} WHERE id = 1"
                                       " FOR UPDATE")
            seq, prev = head["seq"], head["hash"]
            rows, checkpoints = [], []
            for i, (id_, body) in enumerate(bodies):
                seq += 1
                hash_ = link_hash(prev, body)
                rows.append(row(i, seq, prev, hash_))
                prev = hash_
                if self.signer is not None and seq % self.checkpoint_every == 0:
                    cp = self.signer.sign(seq, id_, hash_)
                    checkpoints.append((cp.seq, cp.trace_id, cp.hash, cp.created_at,
                                        cp.key_fingerprint, cp.signature, cp.kid))
            marks = ", ".join(f"${n}" for n in range(1, len(rows[0]) + 1))
            await conn.executemany(f"INSERT INTO {chain.rows} ({chain.columns})"
                                   f" VALUES ({marks})", rows)
            if checkpoints:
                await conn.executemany(f"INSERT INTO {chain.checkpoints}"
                                       f" ({chain.checkpoint_columns})"
                                       " VALUES ($1, $2, $3, $4, $5, $6, $7)", checkpoints)
            await conn.execute(f"UPDATE {chain.head} SET seq = $1, hash = $2 WHERE id = 1",
                               seq, prev)

    async def get(self, trace_id: str) -> Trace | None:
        pool = await self._get_pool()
        row = await pool.fetchrow("SELECT body, prev_hash, hash FROM traces WHERE id = $1",
                                  column_text(trace_id))
        return _load(row) if row is not None else None

    async def query(self, q: TraceQuery) -> TracePage:
        where, args = _where(q)
        if q.cursor:
            args.append(decode_cursor(q.cursor))
            where.append(f"seq < ${len(args)}")
        args.append(q.limit + 1)
        sql = ("SELECT seq, body, prev_hash, hash FROM traces"
               + (" WHERE " + " AND ".join(where) if where else "")
               + f" ORDER BY seq DESC LIMIT ${len(args)}")
        pool = await self._get_pool()
        rows = await pool.fetch(sql, *args)
        more = len(rows) > q.limit
        rows = rows[: q.limit]
        items = [_load(r).summary() for r in rows]
        return TracePage(items, encode_cursor(rows[-1]["seq"]) if more and rows else None)

    # --- labels (guard.audit.labels.LabelStore) -------------------------------------------------------

    async def add_label(self, label: Label) -> Label:
        trace = await self.get(label.trace_id)
        if trace is None:
            raise NotFound("No such trace.")
        label = bind_label(label, trace)
        body = label.canonical_bytes()
        sealed: list[Label] = []

        def row(i: int, seq: int, prev: str | None, hash_: str) -> tuple[Any, ...]:
            sealed.append(label.sealed(prev, body))
            return label_row(seq, sealed[0], body)

        await self._append(LABEL_TABLES, [(label.id, body)], row)
        if self.label_anchorer is not None:
            self.label_anchorer.note_write()
        return sealed[0]

    async def labels(self, *, trace_id: str | None = None, tenant: str | None = None,
                     verdict: str | None = None, category: str | None = None,
                     since: float | None = None, until: float | None = None,
                     latest_only: bool = True, limit: int = 50,
                     cursor: str | None = None) -> LabelPage:
        sql, args = label_query(trace_id=trace_id, tenant=tenant, verdict=verdict,
                                category=category, since=since, until=until,
                                latest_only=latest_only, limit=limit, cursor=cursor)
        numbers = iter(range(1, len(args) + 1))
        pool = await self._get_pool()
        rows = await pool.fetch(re.sub(r"\?", lambda _: f"${next(numbers)}", sql), *args)
        return label_page(rows, limit)

    async def review_queue(self, q: QueueQuery) -> QueuePage:
        where, args = _where(TraceQuery(tenant=q.tenant, category=q.category,
                                        policy_id=q.policy_id, policy_version=q.policy_version))
        args.append(q.sample)
        where += [UNLABELLED, "(decision IN ('refused', 'edited')"
                  f" OR (decision = 'passed' AND {_SAMPLE_POINT} < ${len(args)}))"]
        sql = " FROM traces WHERE " + " AND ".join(where)
        pool = await self._get_pool()
        rows = await pool.fetch(f"SELECT body, prev_hash, hash{sql} ORDER BY {QUEUE_ORDER}"
                                f" LIMIT ${len(args) + 1}", *args, q.limit)
        left = await pool.fetch(f"SELECT decision, count(*){sql} GROUP BY decision", *args)
        return QueuePage([_load(r).summary() for r in rows], {r[0]: r[1] for r in left})

    async def ready(self) -> bool:
        return await self._pg.ready()

    async def start(self) -> None:
        """Start anchoring the chain head (when configured), off the request path."""
        if self.anchorer is not None:
            self.anchorer.start(self.chain_head)
        if self.label_anchorer is not None:
            self.label_anchorer.start(self.label_chain.chain_head)

    async def aclose(self) -> None:
        if self.anchorer is not None:
            await self.anchorer.aclose(self.chain_head)
        if self.label_anchorer is not None:
            await self.label_anchorer.aclose(self.label_chain.chain_head)
        if self.images is not None:
            await self.images.aclose()
        await self._pg.close()

    # --- the chain (guard.audit.chain.ChainSource) ----------------------------------------------

    async def chain_rows(self, *, since: float | None = None, until: float | None = None,
                         tenant: str | None = None, batch: int = 1000
                         ) -> AsyncIterator[ChainRow]:
        """Rows in chain order from one snapshot, through a server-side cursor: memory stays flat
        however long the chain."""
        where, args = _where(TraceQuery(since=since, until=until, tenant=tenant))
        async for row in self.walk(_TRACES, where, args, batch):
            yield row

    async def walk(self, chain: ChainTables, where: Sequence[str] = (),
                   args: Sequence[Any] = (), batch: int = 1000) -> AsyncIterator[ChainRow]:
        """The rows of `chain` in chain order, optionally filtered (`where`, `args`)."""
        sql = (f"SELECT {chain.columns} FROM {chain.rows}"
               + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY seq")
        pool = await self._get_pool()
        async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read",
                                                            readonly=True):
            async for row in conn.cursor(sql, *args, prefetch=batch):
                yield chain.load(row)

    async def checkpoints_of(self, chain: ChainTables) -> list[Checkpoint]:
        pool = await self._get_pool()
        rows = await pool.fetch(f"SELECT {chain.checkpoint_columns} FROM {chain.checkpoints}"
                                " ORDER BY seq")
        return [Checkpoint(*row) for row in rows]

    async def head_of(self, chain: ChainTables) -> tuple[int, str | None]:
        pool = await self._get_pool()
        row = await pool.fetchrow(f"SELECT seq, hash FROM {chain.head} WHERE id = 1")
        return (row["seq"], row["hash"]) if row else (0, None)

    async def row_by_hash_of(self, chain: ChainTables, hash_: str) -> ChainRow | None:
        pool = await self._get_pool()
        row = await pool.fetchrow(f"SELECT {chain.columns} FROM {chain.rows} WHERE hash = $1"
                                  " LIMIT 1", hash_)
        return chain.load(row) if row else None



def _load(row: asyncpg.Record) -> Trace:
    trace = Trace.model_validate(orjson.loads(row["body"]))
    trace.prev_hash, trace.hash = row["prev_hash"], row["hash"]
    return trace


def _chain_row(row: asyncpg.Record) -> ChainRow:
    columns = {name: row[name] for name in ("id", "created_at", "tenant", "key_id", "decision",
                                            "status", "policy_id", "policy_version", "model")}
    columns["categories"] = list(row["categories"])
    return ChainRow(row["seq"], row["body"].encode(), row["prev_hash"], row["hash"], columns)


def _where(q: TraceQuery) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    args: list[Any] = []

    def add(clause: str, value: Any) -> None:
        args.append(column_text(value))  # the columns hold escaped text; so must the filter
        where.append(clause.format(f"${len(args)}"))

    for column, value in (("decision", q.decision), ("tenant", q.tenant), ("key_id", q.key_id),
                          ("policy_id", q.policy_id), ("policy_version", q.policy_version),
                          ("model", q.model)):
        if value is not None:
            add(f"{column} = {{}}", value)
    if q.category:
        add("categories @> ARRAY[{}]::text[]", q.category)
    if q.since is not None:
        add("created_at >= {}", q.since)
    if q.until is not None:
        add("created_at < {}", q.until)
    return where, args


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
