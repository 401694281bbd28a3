"""SQLite audit store (WAL): the default, one file under ./var/.

Each write is its own committed transaction, taken with BEGIN IMMEDIATE so that the chain head is
read and the new row appended under one write lock, also across processes sharing the file: the
chain never forks. WAL keeps a committed trace across a killed process. Schema changes are
numbered migrations recorded in `PRAGMA user_version`. Labels (guard.audit.labels) are a second chain
in the same file, appended the same way (`labels`, `label_chain_head`, `label_checkpoints`).

Audit options (`audit:` in the operators' config, `kind: sqlite`):
    path                 the database file (default var/audit.db)
    images_dir           retained images (default: the image store, by default `images/` beside
                         the database), see guard.audit.images; image_ttl_days likewise
    checkpoint_every, checkpoint_key_env, checkpoint_keys_env, anchor, session_key_env
                         see guard.audit.common
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

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
    sample_point,
)
from guard.audit.twochain import TwoChainStore
from guard.core.types import Trace
from guard.plugins import ImageStore, TracePage, TraceQuery
from guard.support.errors import ConfigError, NotFound

__all__ = ["SQLiteStore", "encode_cursor", "decode_cursor"]

_MIGRATIONS = [
    """
    CREATE TABLE IF NOT EXISTS traces (
        seq            INTEGER PRIMARY KEY AUTOINCREMENT,
        id             TEXT NOT NULL UNIQUE,
        created_at     REAL NOT NULL,
        tenant         TEXT,
        key_id         TEXT,
        decision       TEXT NOT NULL,
        status         INTEGER NOT NULL,
        categories     TEXT NOT NULL,          -- ',a,b,' so that instr(',a,') finds one category
        policy_id      TEXT,
        policy_version INTEGER,
        model          TEXT,
        body           TEXT NOT NULL,          -- the trace as canonical JSON
        prev_hash      TEXT,
        hash           TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS traces_created ON traces(created_at);
    CREATE INDEX IF NOT EXISTS traces_tenant ON traces(tenant, created_at);
    CREATE INDEX IF NOT EXISTS traces_decision ON traces(decision, created_at);
    """,
    """
    CREATE INDEX traces_hash ON traces(hash);
    CREATE TABLE chain_head (
        id   INTEGER PRIMARY KEY CHECK (id = 1),
        seq  INTEGER NOT NULL,
        hash TEXT
    );
    INSERT INTO chain_head (id, seq, hash)
        SELECT 1, coalesce(max(seq), 0), (SELECT hash FROM traces ORDER BY seq DESC LIMIT 1)
        FROM traces;
    CREATE TABLE checkpoints (
        seq             INTEGER PRIMARY KEY,
        trace_id        TEXT NOT NULL,
        hash            TEXT NOT NULL,
        created_at      REAL NOT NULL,
        key_fingerprint TEXT NOT NULL,
        signature       TEXT NOT NULL
    );
    """,
    "ALTER TABLE checkpoints ADD COLUMN kid TEXT",  # NULL: signed before key ids
    """
    CREATE TABLE IF NOT EXISTS labels (
        seq        INTEGER PRIMARY KEY,
        id         TEXT NOT NULL UNIQUE,
        trace_id   TEXT NOT NULL,
        slot       INTEGER,                    -- NULL: the prompt
        round      INTEGER NOT NULL,
        verdict    TEXT NOT NULL,
        category   TEXT,
        key_id     TEXT,
        tenant     TEXT,
        created_at REAL NOT NULL,
        body       TEXT NOT NULL,              -- the label as canonical JSON
        prev_hash  TEXT,
        hash       TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS labels_item ON labels(trace_id, slot, round);
    CREATE INDEX IF NOT EXISTS labels_tenant ON labels(tenant, created_at);
    CREATE INDEX IF NOT EXISTS labels_hash ON labels(hash);
    CREATE TABLE IF NOT EXISTS label_chain_head (
        id   INTEGER PRIMARY KEY CHECK (id = 1),
        seq  INTEGER NOT NULL,
        hash TEXT
    );
    INSERT OR IGNORE INTO label_chain_head (id, seq, hash) VALUES (1, 0, NULL);
    CREATE TABLE IF NOT EXISTS label_checkpoints (
        seq             INTEGER PRIMARY KEY,
        label_id        TEXT NOT NULL,
        hash            TEXT NOT NULL,
        created_at      REAL NOT NULL,
        key_fingerprint TEXT NOT NULL,
        signature       TEXT NOT NULL,
        kid             TEXT
    );
    """,
]

_COLUMNS = ("seq, id, created_at, tenant, key_id, decision, status, categories, policy_id,"
            " policy_version, model, body, prev_hash, hash")
_CHECKPOINT_COLUMNS = "seq, trace_id, hash, created_at, key_fingerprint, signature, kid"


_TRACES = ChainTables("traces", "chain_head", "checkpoints", _COLUMNS,
                      _CHECKPOINT_COLUMNS, lambda row: _chain_row(row))


class SQLiteStore(TwoChainStore):
    traces_tables = _TRACES

    def __init__(self, path: str | Path, *, images: RetainedImages | None = None,
                 signer: Signer | None = None,
                 checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
                 anchorer: Anchorer | None = None,
                 label_anchorer: Anchorer | None = None) -> None:
        self.path = Path(path)
        self.images = images
        self.signer = signer
        self.checkpoint_every = checkpoint_every
        self.anchorer = anchorer
        self.label_anchorer = label_anchorer
        self.label_chain = TableChain(self, LABEL_TABLES)  # what verify_labels walks
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    @classmethod
    def from_config(cls, options: Mapping[str, Any], *,
                    images: ImageStore | None = None) -> SQLiteStore:
        """`images`: the shared image store, for retained images (None: per the options)."""
        opts = dict(options)
        path = Path(opts.pop("path", "var/audit.db"))
        labels_anchor = label_anchor_options(opts.get("anchor"))
        common = common_options(opts, {"kind": "sqlite", **options}, images)
        if opts:
            raise ConfigError(f"audit (sqlite): unknown options {sorted(opts)}")
        return cls(path, images=common.images, signer=common.signer,
                   checkpoint_every=common.checkpoint_every, anchorer=common.anchorer,
                   label_anchorer=Anchorer.from_options(labels_anchor, common.signer))

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                   timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA cache_size=-32768")  # 32 MiB: index pages of large logs
            conn.create_function("sample_point", 1, sample_point, deterministic=True)
            _migrate(conn)
            self._conn = conn
        return self._conn

    # --- blocking parts, run in a worker thread ---------------------------------------------

    def _write(self, traces: Sequence[Trace]) -> None:
        # The bodies are final now: serialise them before taking the write lock.
        bodies = [(trace.id, trace.canonical_bytes()) for trace in traces]

        def row(i: int, seq: int, prev: str | None, hash_: str) -> tuple[Any, ...]:
            trace = traces[i]
            trace.prev_hash, trace.hash = prev, hash_  # = Trace.seal
            c = index_columns(vars(trace))
            return (seq, c["id"], c["created_at"], c["tenant"], c["key_id"], c["decision"],
                    c["status"], "," + ",".join(c["categories"]) + ",", c["policy_id"],
                    c["policy_version"], c["model"], bodies[i][1].decode(), prev, hash_)

        self._append(_TRACES, bodies, row)
        if self.anchorer is not None:
            self.anchorer.note_write()

    def _write_label(self, label: Label) -> Label:
        body = label.canonical_bytes()
        sealed: list[Label] = []

        def row(i: int, seq: int, prev: str | None, hash_: str) -> tuple[Any, ...]:
            sealed.append(label.sealed(prev, body))
            return label_row(seq, sealed[0], body)

        self._append(LABEL_TABLES, [(label.id, body)], row)
        if self.label_anchorer is not None:
            self.label_anchorer.note_write()
        return sealed[0]

    def _append(self, chain: ChainTables, bodies: Sequence[tuple[str, bytes]],
                row: Callable[[int, int, str | None, str], tuple[Any, ...]]) -> None:
        """Append (id, canonical body) pairs to `chain` in one transaction: `row(i, seq,
        prev_hash, hash)` is the i-th row to insert; checkpoints as they fall due."""
        if not bodies:
            return
        with self._lock:
            conn = self._connect()
            conn.execute("BEGIN IMMEDIATE")
            try:
                seq, prev = conn.execute(f"SELECT seq, hash FROM {chain.head} WHERE id = 1"
                                         ).fetchone()
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
                marks = ",".join("?" * len(rows[0]))
                conn.executemany(f"INSERT INTO {chain.rows} ({chain.columns}) VALUES ({marks})",
                                 rows)
                conn.executemany(f"INSERT INTO {chain.checkpoints} ({chain.checkpoint_columns})"
                                 " VALUES (?,?,?,?,?,?,?)", checkpoints)
                conn.execute(f"UPDATE {chain.head} SET seq = ?, hash = ? WHERE id = 1",
                             (seq, prev))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def _fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            return self._connect().execute(sql, args).fetchall()

    def _get(self, trace_id: str) -> Trace | None:
        rows = self._fetch("SELECT body, prev_hash, hash FROM traces WHERE id = ?",
                           (column_text(trace_id),))
        return _load(rows[0]) if rows else None

    def _query(self, q: TraceQuery) -> TracePage:
        where, args = _where(q)
        if q.cursor:
            where.append("seq < ?")
            args.append(decode_cursor(q.cursor))
        sql = ("SELECT seq, body, prev_hash, hash FROM traces"
               + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY seq DESC LIMIT ?")
        rows = self._fetch(sql, [*args, q.limit + 1])
        more = len(rows) > q.limit
        rows = rows[: q.limit]
        items = [_load(r[1:]).summary() for r in rows]
        return TracePage(items, encode_cursor(rows[-1][0]) if more and rows else None)

    def _queue(self, q: QueueQuery) -> QueuePage:
        where, args = _where(TraceQuery(tenant=q.tenant, category=q.category,
                                        policy_id=q.policy_id, policy_version=q.policy_version))
        where += [UNLABELLED, "(decision IN ('refused', 'edited')"
                  " OR (decision = 'passed' AND sample_point(id) < ?))"]
        args.append(q.sample)
        sql = " FROM traces WHERE " + " AND ".join(where)
        rows = self._fetch(f"SELECT body, prev_hash, hash{sql} ORDER BY {QUEUE_ORDER} LIMIT ?",
                           [*args, q.limit])
        left = self._fetch(f"SELECT decision, count(*){sql} GROUP BY decision", args)
        return QueuePage([_load(r).summary() for r in rows], dict(left))

    # --- the AuditStore interface -------------------------------------------------------------

    async def write(self, trace: Trace) -> Trace:
        if self.images is not None:
            await self.images.keep(trace)
        await asyncio.to_thread(self._write, [trace])
        return trace

    async def write_many(self, traces: Sequence[Trace]) -> None:
        """Append several traces in one transaction, in order: the same sealing as `write`,
        for imports and bulk loads (one commit per batch instead of per trace)."""
        if self.images is not None:
            await self.images.keep(*traces)
        await asyncio.to_thread(self._write, list(traces))

    async def get(self, trace_id: str) -> Trace | None:
        return await asyncio.to_thread(self._get, trace_id)

    async def query(self, q: TraceQuery) -> TracePage:
        return await asyncio.to_thread(self._query, q)

    # --- labels (guard.audit.labels.LabelStore) -------------------------------------------------------

    async def add_label(self, label: Label) -> Label:
        trace = await self.get(label.trace_id)
        if trace is None:
            raise NotFound("No such trace.")
        return await asyncio.to_thread(self._write_label, bind_label(label, trace))

    async def labels(self, *, trace_id: str | None = None, tenant: str | None = None,
                     verdict: str | None = None, category: str | None = None,
                     since: float | None = None, until: float | None = None,
                     latest_only: bool = True, limit: int = 50,
                     cursor: str | None = None) -> LabelPage:
        sql, args = label_query(trace_id=trace_id, tenant=tenant, verdict=verdict,
                                category=category, since=since, until=until,
                                latest_only=latest_only, limit=limit, cursor=cursor)
        return label_page(await asyncio.to_thread(self._fetch, sql, args), limit)

    async def review_queue(self, q: QueueQuery) -> QueuePage:
        return await asyncio.to_thread(self._queue, q)

    async def ready(self) -> bool:
        try:
            await asyncio.to_thread(self._fetch, "SELECT 1")
        except sqlite3.Error:
            return False
        return True

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
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # --- the chain (guard.audit.chain.ChainSource) ----------------------------------------------

    async def chain_rows(self, *, since: float | None = None, until: float | None = None,
                         tenant: str | None = None, batch: int = 1000
                         ) -> AsyncIterator[ChainRow]:
        """Rows in chain order, optionally filtered, read in batches (memory stays flat)."""
        where, args = _where(TraceQuery(since=since, until=until, tenant=tenant))
        async for row in self.walk(_TRACES, where, args, batch):
            yield row

    async def walk(self, chain: ChainTables, where: Sequence[str] = (),
                   args: Sequence[Any] = (), batch: int = 1000) -> AsyncIterator[ChainRow]:
        """The rows of `chain` in chain order, optionally filtered (`where`, `args`)."""
        sql = (f"SELECT {chain.columns} FROM {chain.rows} WHERE seq > ?"
               + "".join(f" AND {w}" for w in where) + " ORDER BY seq LIMIT ?")
        last = 0
        while True:
            rows = await asyncio.to_thread(self._fetch, sql, [last, *args, batch])
            if not rows:
                return
            for row in rows:
                yield chain.load(row)
            last = rows[-1][0]

    async def checkpoints_of(self, chain: ChainTables) -> list[Checkpoint]:
        rows = await asyncio.to_thread(self._fetch, f"SELECT {chain.checkpoint_columns}"
                                                    f" FROM {chain.checkpoints} ORDER BY seq")
        return [Checkpoint(*row) for row in rows]

    async def head_of(self, chain: ChainTables) -> tuple[int, str | None]:
        rows = await asyncio.to_thread(self._fetch, f"SELECT seq, hash FROM {chain.head}")
        return (rows[0][0], rows[0][1]) if rows else (0, None)

    async def row_by_hash_of(self, chain: ChainTables, hash_: str) -> ChainRow | None:
        rows = await asyncio.to_thread(self._fetch, f"SELECT {chain.columns} FROM {chain.rows}"
                                                    " WHERE hash = ? LIMIT 1", (hash_,))
        return chain.load(rows[0]) if rows else None



def _migrate(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")  # one process migrates; the others wait, then see it done
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        for number, script in enumerate(_MIGRATIONS[version:], start=version + 1):
            for statement in script.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _chain_row(row: Sequence[Any]) -> ChainRow:
    (seq, id_, created_at, tenant, key_id, decision, status, categories, policy_id,
     policy_version, model, body, prev_hash, hash_) = row
    columns = {"id": id_, "created_at": created_at, "tenant": tenant, "key_id": key_id,
               "decision": decision, "status": status,
               "categories": [c for c in categories.split(",") if c],
               "policy_id": policy_id, "policy_version": policy_version, "model": model}
    return ChainRow(seq, body.encode(), prev_hash, hash_, columns)


def _load(row: Sequence[Any]) -> Trace:
    trace = Trace.model_validate(orjson.loads(row[0]))
    trace.prev_hash, trace.hash = row[1], row[2]
    return trace


def _where(q: TraceQuery) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    args: list[Any] = []
    for column, value in (("decision", q.decision), ("tenant", q.tenant), ("key_id", q.key_id),
                          ("policy_id", q.policy_id), ("policy_version", q.policy_version),
                          ("model", q.model)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(column_text(value))  # the columns hold escaped text; so must the filter
    if q.category:
        where.append("instr(categories, ?) > 0")
        args.append(f",{column_text(q.category)},")
    if q.since is not None:
        where.append("created_at >= ?")
        args.append(q.since)
    if q.until is not None:
        where.append("created_at < ?")
        args.append(q.until)
    return where, args
