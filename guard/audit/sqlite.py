"""SQLite audit store (WAL): the default, one file under ./var/.

Each write is its own committed transaction, taken with BEGIN IMMEDIATE so that the previous hash
is read and the new row appended under one write lock, also across processes sharing the file:
the chain never forks. WAL keeps a committed trace across a killed process.
"""

from __future__ import annotations

import asyncio
import base64
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson

from guard.audit import TracePage, TraceQuery
from guard.errors import ConfigError, RequestError
from guard.types import Trace

_SCHEMA = """
CREATE TABLE IF NOT EXISTS traces (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    id             TEXT NOT NULL UNIQUE,
    created_at     REAL NOT NULL,
    tenant         TEXT,
    key_id         TEXT,
    decision       TEXT NOT NULL,
    status         INTEGER NOT NULL,
    categories     TEXT NOT NULL,          -- ',a,b,' so that LIKE '%,a,%' finds one category
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
"""


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(str(seq).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        return int(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode())
    except (ValueError, UnicodeDecodeError):
        raise RequestError("Invalid 'cursor'.", param="cursor") from None


class SQLiteStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> SQLiteStore:
        opts = dict(options)
        path = opts.pop("path", "var/audit.db")
        opts.pop("images_dir", None)
        if opts:
            raise ConfigError(f"audit (sqlite): unknown options {sorted(opts)}")
        return cls(path)

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                   timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            self._conn = conn
        return self._conn

    # --- blocking parts, run in a worker thread ---------------------------------------------

    def _write(self, trace: Trace) -> Trace:
        with self._lock:
            conn = self._connect()
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute("SELECT hash FROM traces ORDER BY seq DESC LIMIT 1").fetchone()
                trace.seal(row[0] if row else None)
                conn.execute(
                    "INSERT INTO traces (id, created_at, tenant, key_id, decision, status,"
                    " categories, policy_id, policy_version, model, body, prev_hash, hash)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (trace.id, trace.created_at, trace.tenant, trace.key_id, trace.decision,
                     trace.status, "," + ",".join(trace.categories) + ",",
                     trace.policy.get("id"), trace.policy.get("version"), trace.model,
                     trace.canonical_bytes().decode(), trace.prev_hash, trace.hash))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return trace

    def _get(self, trace_id: str) -> Trace | None:
        with self._lock:
            row = self._connect().execute(
                "SELECT body, prev_hash, hash FROM traces WHERE id = ?", (trace_id,)).fetchone()
        return _load(row) if row else None

    def _query(self, q: TraceQuery) -> TracePage:
        where, args = _where(q)
        if q.cursor:
            where.append("seq < ?")
            args.append(decode_cursor(q.cursor))
        sql = ("SELECT seq, body, prev_hash, hash FROM traces"
               + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY seq DESC LIMIT ?")
        with self._lock:
            rows = self._connect().execute(sql, [*args, q.limit + 1]).fetchall()
        more = len(rows) > q.limit
        rows = rows[: q.limit]
        items = [_load(r[1:]).summary() for r in rows]
        return TracePage(items, encode_cursor(rows[-1][0]) if more and rows else None)

    def iter_rows(self, since: float | None = None, batch: int = 500
                  ) -> Iterator[tuple[int, str, str | None, str]]:
        """(seq, body, prev_hash, hash) in chain order, read in batches (for verify and export)."""
        last = 0
        while True:
            with self._lock:
                rows = self._connect().execute(
                    "SELECT seq, body, prev_hash, hash FROM traces WHERE seq > ?"
                    + (" AND created_at >= ?" if since is not None else "")
                    + " ORDER BY seq LIMIT ?",
                    (last, *([since] if since is not None else []), batch)).fetchall()
            if not rows:
                return
            yield from rows
            last = rows[-1][0]

    # --- the AuditStore interface -------------------------------------------------------------

    async def write(self, trace: Trace) -> Trace:
        return await asyncio.to_thread(self._write, trace)

    async def get(self, trace_id: str) -> Trace | None:
        return await asyncio.to_thread(self._get, trace_id)

    async def query(self, q: TraceQuery) -> TracePage:
        return await asyncio.to_thread(self._query, q)

    async def ready(self) -> bool:
        try:
            await asyncio.to_thread(lambda: self._connect().execute("SELECT 1").fetchone())
        except sqlite3.Error:
            return False
        return True

    async def aclose(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _load(row: tuple[str, str | None, str]) -> Trace:
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
            args.append(value)
    if q.category:
        where.append("categories LIKE ?")
        args.append(f"%,{q.category},%")
    if q.since is not None:
        where.append("created_at >= ?")
        args.append(q.since)
    if q.until is not None:
        where.append("created_at < ?")
        args.append(q.until)
    return where, args
