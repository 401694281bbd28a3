"""Signed tree heads, and the sinks that keep them outside the audit database.

A `TreeHead` is RFC 9162's signed tree head for the audit log's Merkle tree (guard.audit.tlog):
tree size, root hash, a timestamp (milliseconds) and an Ed25519 signature under a key id
(guard.audit.logkeys). Its signed message is fixed bytes, so any language can check it:
    b"safeedit-tree-head-v1\\n" + uint64 timestamp + uint64 tree_size + 32-byte root (big-endian)
Its JSON (`GET /v1/guard/log/sth`, and each line the sinks keep): tree_size, root_hash (base64),
timestamp, key_id, signature (base64).

The sinks are `audit.anchor`'s kinds (guard.audit.anchor): a file of JSON lines (the default:
var/audit.anchors with the embedded defaults, beside the database; older HMAC anchors may share
the file, each reader takes its own lines), a table `tree_heads` in another SQLite file, or one in
a PostgreSQL schema of its own. Besides heads a sink keeps `reset` records: written when an
operator accepted a log that no longer matches its heads (`safeedit serve --accept-log-reset`);
heads before the last reset are history, not a promise about the database.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import sqlite3
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson

from guard.support.durable import append_durably, read_lines
from guard.support.errors import ConfigError
from guard.support.pg import dsn_from, plain_schema

PREFIX = b"safeedit-tree-head-v1\n"


@dataclass(frozen=True, slots=True)
class TreeHead:
    tree_size: int
    root_hash: bytes
    timestamp: int  # milliseconds since the epoch
    key_id: str
    signature: str  # base64

    def message(self) -> bytes:
        return PREFIX + struct.pack(">QQ", self.timestamp, self.tree_size) + self.root_hash

    def to_dict(self) -> dict[str, Any]:
        return {"tree_size": self.tree_size,
                "root_hash": base64.b64encode(self.root_hash).decode(),
                "timestamp": self.timestamp, "key_id": self.key_id, "signature": self.signature}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TreeHead:
        try:
            size, root, ts = d["tree_size"], base64.b64decode(d["root_hash"], validate=True), \
                d["timestamp"]
            kid, sig = d["key_id"], d["signature"]
        except (KeyError, TypeError, binascii.Error, ValueError) as exc:
            raise ValueError(f"not a tree head ({type(exc).__name__})") from exc
        if not (isinstance(size, int) and size >= 0 and isinstance(ts, int) and len(root) == 32
                and isinstance(kid, str) and isinstance(sig, str)) or isinstance(size, bool):
            raise ValueError("a tree head field has the wrong type")
        return cls(size, root, ts, kid, sig)


def heads_after_reset(records: list[dict[str, Any]]) -> tuple[list[TreeHead], int]:
    """The heads a sink holds after its last reset record, and how many resets it holds."""
    heads: list[TreeHead] = []
    resets = 0
    for record in records:
        if "reset" in record:
            heads, resets = [], resets + 1
        elif "tree_size" in record:
            heads.append(TreeHead.from_dict(record))
    return heads, resets


class HeadSink(Protocol):
    location: str

    async def append(self, record: Mapping[str, Any]) -> None: ...

    async def read(self) -> list[dict[str, Any]]:
        """Every head and reset record, oldest first; [] when there is none."""
        ...

    async def exists(self) -> bool:
        """Whether the sink is there at all (a deleted file is not the same as an empty one)."""
        ...


def is_head_line(record: Mapping[str, Any]) -> bool:
    """A line of a shared anchors file that is this module's, not an HMAC anchor."""
    return "tree_size" in record or "reset" in record


class FileHeadSink:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.location = str(self.path)

    async def append(self, record: Mapping[str, Any]) -> None:
        await asyncio.to_thread(append_durably, self.path, orjson.dumps(dict(record)) + b"\n")

    def _read(self) -> list[dict[str, Any]]:
        out = []
        for number, line in read_lines(self.path):
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise ConfigError(f"tree heads: {self.path} line {number} is not JSON") from exc
            if isinstance(record, dict) and is_head_line(record):
                out.append(record)
        return out

    async def read(self) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self._read)

    async def exists(self) -> bool:
        return self.path.exists()


class SQLiteHeadSink:
    """A table `tree_heads` in an SQLite file that is not the audit database."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.location = f"sqlite:{self.path}"

    def _run(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(sqlite3.connect(self.path, timeout=30)) as conn, conn:
            conn.execute("CREATE TABLE IF NOT EXISTS tree_heads (n INTEGER PRIMARY KEY "
                         "AUTOINCREMENT, record TEXT NOT NULL)")
            return conn.execute(sql, args).fetchall()

    async def append(self, record: Mapping[str, Any]) -> None:
        await asyncio.to_thread(self._run, "INSERT INTO tree_heads (record) VALUES (?)",
                                (orjson.dumps(dict(record)).decode(),))

    async def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        rows = await asyncio.to_thread(self._run, "SELECT record FROM tree_heads ORDER BY n")
        return [orjson.loads(r[0]) for r in rows]

    async def exists(self) -> bool:
        return self.path.exists()


class PostgresHeadSink:
    """A table `tree_heads` in a PostgreSQL schema of its own; one short connection per head."""

    def __init__(self, dsn: str, schema: str) -> None:
        self._dsn = dsn
        self.schema = plain_schema(schema, "anchor (postgres)")
        self.location = f"postgres schema {schema}"

    async def _run(self, sql: str, *args: Any, create: bool = True) -> list[Any]:
        import asyncpg

        conn = await asyncpg.connect(self._dsn, timeout=10)
        try:
            if create:
                await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}";'
                                   f' CREATE TABLE IF NOT EXISTS "{self.schema}".tree_heads ('
                                   " n bigserial PRIMARY KEY, record text NOT NULL)")
            return list(await conn.fetch(sql.format(table=f'"{self.schema}".tree_heads'), *args))
        finally:
            await conn.close()

    async def append(self, record: Mapping[str, Any]) -> None:
        await self._run("INSERT INTO {table} (record) VALUES ($1)",
                        orjson.dumps(dict(record)).decode())

    async def read(self) -> list[dict[str, Any]]:
        if not await self.exists():
            return []
        return [orjson.loads(r["record"]) for r in
                await self._run("SELECT record FROM {table} ORDER BY n", create=False)]

    async def exists(self) -> bool:
        rows = await self._run("SELECT to_regclass($1) IS NOT NULL AS present",
                               f'"{self.schema}".tree_heads', create=False)
        return bool(rows[0]["present"])


def build_head_sink(options: Mapping[str, Any], default: Mapping[str, Any]) -> HeadSink:
    """The sink `audit.anchor` names (its kind, path / dsn, schema; `every_s` is the log's),
    with `default` for what it leaves out (the store's: a file beside SQLite, a schema beside
    PostgreSQL's)."""
    opts = {**default, **{k: v for k, v in options.items() if k != "every_s"}}
    kind = opts.pop("kind", "file")
    if kind in ("file", "sqlite"):
        path = opts.pop("path")
        opts.pop("dsn", None), opts.pop("dsn_env", None), opts.pop("schema", None)
        if opts:
            raise ConfigError(f"audit: unknown anchor options {sorted(opts)}")
        return FileHeadSink(path) if kind == "file" else SQLiteHeadSink(path)
    if kind == "postgres":
        opts.pop("path", None)
        schema = opts.pop("schema", "safeedit_heads")
        dsn = dsn_from(opts, "anchor (postgres)")
        if opts:
            raise ConfigError(f"audit: unknown anchor options {sorted(opts)}")
        return PostgresHeadSink(dsn, schema)
    raise ConfigError(f"audit: anchor kind {kind!r} is not file, sqlite or postgres")
