"""SQLite audit store (WAL): the default, one file under ./var/.

Each write is its own committed transaction, taken with BEGIN IMMEDIATE so that the chain head is
read and the new row appended under one write lock, also across processes sharing the file: the
chain never forks. WAL keeps a committed trace across a killed process. Schema changes are
numbered migrations recorded in `PRAGMA user_version`. Labels (guard.core.labels) are a second
chain in the same file, appended the same way (`labels`, `label_chain_head`, `label_checkpoints`).
All but the SQLite dialect and the schema is guard.audit.sql's, shared with PostgreSQL.

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
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Unpack

import orjson

from guard.audit import policies, search
from guard.audit.labels import sample_point
from guard.audit.sql import Appending, ChainOptions, Row, SQLStore

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
    # The dashboard's figures of each trace (guard.audit.sql.trace_figures), filled for older
    # traces by the store on first use. The lists are JSON arrays, each flag 'action:category'.
    """
    CREATE TABLE IF NOT EXISTS trace_figures (
        seq            INTEGER PRIMARY KEY,
        created_at     REAL NOT NULL,
        tenant         TEXT,
        decision       TEXT NOT NULL,
        policy_id      TEXT,
        policy_version INTEGER,
        rounds         INTEGER NOT NULL,
        request_ms     REAL NOT NULL,
        judge_ms       TEXT NOT NULL,
        backend_ms     TEXT NOT NULL,
        flags          TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS trace_figures_created ON trace_figures(created_at);
    CREATE INDEX IF NOT EXISTS trace_figures_tenant ON trace_figures(tenant, created_at);
    """,
    search.SQLITE_MIGRATION,  # the `q` and `endpoint` filters' table (guard.audit.search)
    # The transparency log (guard.audit.tlog): row signatures, the Merkle tree, signed heads.
    # Rows written before it are legacy (unsigned); the bounds are fixed here, once.
    """
    CREATE TABLE IF NOT EXISTS entry_sigs (
        chain TEXT NOT NULL, seq INTEGER NOT NULL, kid TEXT NOT NULL, sig TEXT NOT NULL,
        PRIMARY KEY (chain, seq)
    );
    CREATE TABLE IF NOT EXISTS log_state (
        id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL, hash TEXT,
        trace_seq INTEGER NOT NULL, label_seq INTEGER NOT NULL,
        legacy_trace_seq INTEGER NOT NULL, legacy_label_seq INTEGER NOT NULL
    );
    INSERT OR IGNORE INTO log_state VALUES (1, 0, NULL, 0, 0,
        (SELECT coalesce(max(seq), 0) FROM traces), (SELECT coalesce(max(seq), 0) FROM labels));
    CREATE TABLE IF NOT EXISTS log_leaves (
        idx INTEGER PRIMARY KEY, kind TEXT NOT NULL, ref TEXT NOT NULL, seq INTEGER,
        data TEXT NOT NULL, leaf_hash TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS log_leaves_ref ON log_leaves(kind, ref);
    CREATE TABLE IF NOT EXISTS log_nodes (
        level INTEGER NOT NULL, idx INTEGER NOT NULL, hash TEXT NOT NULL,
        PRIMARY KEY (level, idx)
    );
    CREATE TABLE IF NOT EXISTS log_heads (
        n INTEGER PRIMARY KEY AUTOINCREMENT, tree_size INTEGER NOT NULL,
        root_hash TEXT NOT NULL, timestamp INTEGER NOT NULL, key_id TEXT NOT NULL,
        signature TEXT NOT NULL
    );
    """,
    policies.SQLITE_MIGRATION,  # the policy history (guard.audit.policies)
]


class SQLiteStore(SQLStore):
    kind = "sqlite"

    def __init__(self, path: str | Path, **options: Unpack[ChainOptions]) -> None:
        self.path = Path(path)
        super().__init__(SQLiteDialect(self.path), **options)

    @classmethod
    def log_defaults(cls, own: dict[str, Any]) -> tuple[Path | None, dict[str, Any]]:
        """A key made at first start in keys/ beside the file; heads in `<file>.anchors`
        (var/keys/ and var/audit.anchors with the embedded defaults)."""
        path = Path(own["path"])
        return path.parent / "keys", {"kind": "file", "path": str(path.with_suffix(".anchors"))}

    @classmethod
    def own_options(cls, opts: dict[str, Any]) -> dict[str, Any]:
        return {"path": Path(opts.pop("path", "var/audit.db"))}


class SQLiteDialect:
    """One connection to the file, opened on first use, used by one worker thread at a time."""

    has_category = "instr(categories, ?) > 0"
    prompt_match = search.sqlite_prompt_match()  # FTS5 where this SQLite has it, else LIKE
    sample_point = "sample_point(id)"  # guard.audit.labels.sample_point, defined on connecting
    bucket = "CAST(created_at / ? AS INTEGER)"  # created_at is never negative
    elements = "json_each({}) AS e"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    def categories_column(self, categories: Sequence[str]) -> str:
        return "," + ",".join(categories) + ","  # so that instr(',a,') finds one category

    def categories_of(self, column: str) -> list[str]:
        return [c for c in column.split(",") if c]

    def list_column(self, values: Sequence[Any]) -> str:
        return orjson.dumps(list(values)).decode()

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
            search.prepare_sqlite(conn)
            self._conn = conn
        return self._conn

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return await asyncio.to_thread(self._fetch, sql, args)

    def _fetch(self, sql: str, args: Sequence[Any]) -> list[Row]:
        with self._lock:
            return self._connect().execute(sql, args).fetchall()

    async def append(self, head: str, appending: Appending) -> None:
        await asyncio.to_thread(self._append, head, appending)

    def _append(self, head: str, appending: Appending) -> None:
        with self._lock:
            conn = self._connect()
            conn.execute("BEGIN IMMEDIATE")
            try:
                seq, hash_ = conn.execute(f"SELECT seq, hash FROM {head} WHERE id = 1").fetchone()
                for sql, rows in appending(seq, hash_):
                    conn.executemany(sql, rows)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    async def walk(self, select: str, where: Sequence[str], args: Sequence[Any],
                   batch: int) -> AsyncIterator[Row]:
        """Page by page, each after the last seq read (a writer may append between pages)."""
        sql = (f"{select} WHERE seq > ?" + "".join(f" AND {w}" for w in where)
               + " ORDER BY seq LIMIT ?")
        last = 0
        while True:
            rows = await self.fetch(sql, [last, *args, batch])
            if not rows:
                return
            for row in rows:
                yield row
            last = rows[-1][0]

    async def ready(self) -> bool:
        try:
            await self.fetch("SELECT 1")
        except sqlite3.Error:
            return False
        return True

    async def aclose(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


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
