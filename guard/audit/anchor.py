"""Anchors: the chain head, signed, kept OUTSIDE the audit database (see guard.audit.chain).

An `Anchor` is (seq, hash, time) of the chain head, HMAC-signed under a key id with the
checkpoint keys. An `AnchorSink` keeps anchors where the database's admin cannot reach them:
- `file` (default): a local file opened in append mode, one JSON line per anchor
  `{"seq", "hash", "time", "kid", "sig"}`; ship it elsewhere or make it append-only (chattr +a);
- `sqlite`: a table in ANOTHER SQLite file;
- `postgres`: a table in another PostgreSQL database (or at least another role's schema).
A witness service (HTTP, syslog) is one more class with `append`, `read` and `aclose`.

The store's `Anchorer` writes off the request path: a background task reads the chain head every
`every_s` seconds and appends an anchor when it moved; the store's `aclose` appends a last one.
A failed append is logged, never raised into a request.

Audit option `anchor:` (absent = no anchors; needs checkpoint keys, see guard.audit.chain):
    kind       file (default) | sqlite | postgres
    path       file / sqlite: where (default var/audit.anchors)
    dsn, dsn_env, schema   postgres: the database (schema default `public`)
    every_s    seconds between anchors while the store is running (default 10)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import orjson

from guard.audit.chain import Signer
from guard.audit.heads import is_head_line
from guard.support.durable import append_durably, read_lines
from guard.support.errors import ConfigError
from guard.support.pg import dsn_from, plain_schema

log = logging.getLogger("safeedit.audit.anchor")
DEFAULT_ANCHOR_PATH = "var/audit.anchors"
DEFAULT_EVERY_S = 10.0
ChainHead = Callable[[], Awaitable[tuple[int, str | None]]]


@dataclass(frozen=True, slots=True)
class Anchor:
    seq: int
    hash: str | None
    time: float
    kid: str
    sig: str

    def message(self) -> bytes:
        return f"safeedit-anchor-v1\n{self.seq}\n{self.hash or ''}\n{self.time!r}\n{self.kid}" \
            .encode()

    @classmethod
    def signed(cls, signer: Signer, seq: int, hash_: str | None) -> Anchor:
        unsigned = cls(seq, hash_, time.time(), signer.kid, "")
        return replace(unsigned, sig=signer.mac(unsigned.message()))

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "hash": self.hash, "time": self.time, "kid": self.kid,
                "sig": self.sig}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Anchor:
        seq, hash_, t, kid, sig = d["seq"], d["hash"], d["time"], d["kid"], d["sig"]
        if not (isinstance(seq, int) and isinstance(t, int | float) and isinstance(kid, str)
                and isinstance(sig, str) and isinstance(hash_, str | None)):
            raise TypeError("an anchor field has the wrong type")
        return cls(seq, hash_, float(t), kid, sig)


class AnchorSink(Protocol):
    location: str  # for reports: where the anchors are

    async def append(self, anchor: Anchor) -> None: ...

    async def read(self) -> list[Anchor]: ...

    async def aclose(self) -> None: ...


class FileAnchorSink:
    """One JSON line per anchor, appended with O_APPEND and fsync'd."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.location = str(self.path)

    async def append(self, anchor: Anchor) -> None:
        await asyncio.to_thread(append_durably, self.path,
                                orjson.dumps(anchor.to_dict()) + b"\n")

    def _read(self) -> list[Anchor]:
        anchors = []
        for number, line in read_lines(self.path):
            try:
                record = orjson.loads(line)
                if isinstance(record, dict) and is_head_line(record):
                    continue  # a signed tree head sharing the file (guard.audit.heads)
                anchors.append(Anchor.from_dict(record))
            except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                raise ConfigError(f"anchors: {self.path} line {number} is not an anchor "
                                  f"({type(exc).__name__})") from exc
        return anchors

    async def read(self) -> list[Anchor]:
        return await asyncio.to_thread(self._read)

    async def aclose(self) -> None:
        return None


_SQLITE_TABLE = ("CREATE TABLE IF NOT EXISTS anchors (n INTEGER PRIMARY KEY AUTOINCREMENT,"
                 " seq INTEGER NOT NULL, hash TEXT, time REAL NOT NULL, kid TEXT NOT NULL,"
                 " sig TEXT NOT NULL)")


class SQLiteAnchorSink:
    """A table `anchors` in an SQLite file that is not the audit database."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.location = f"sqlite:{self.path}"

    def _run(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(sqlite3.connect(self.path, timeout=30)) as conn, conn:
            conn.execute(_SQLITE_TABLE)
            return conn.execute(sql, args).fetchall()

    async def append(self, anchor: Anchor) -> None:
        await asyncio.to_thread(self._run, "INSERT INTO anchors (seq, hash, time, kid, sig)"
                                " VALUES (?, ?, ?, ?, ?)",
                                (anchor.seq, anchor.hash, anchor.time, anchor.kid, anchor.sig))

    async def read(self) -> list[Anchor]:
        rows = await asyncio.to_thread(self._run, "SELECT seq, hash, time, kid, sig FROM anchors"
                                       " ORDER BY n")
        return [Anchor(*row) for row in rows]

    async def aclose(self) -> None:
        return None


class PostgresAnchorSink:
    """A table `anchors` in a PostgreSQL database that is not the audit store's; one short
    connection per anchor (a few a minute)."""

    def __init__(self, dsn: str, schema: str = "public") -> None:
        self._dsn = dsn
        self.schema = plain_schema(schema, "anchor (postgres)")
        self.location = f"postgres schema {schema}"

    async def _run(self, sql: str, *args: Any) -> list[Any]:
        import asyncpg

        conn = await asyncpg.connect(self._dsn, timeout=10)
        try:
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}";'
                               f' CREATE TABLE IF NOT EXISTS "{self.schema}".anchors ('
                               " n bigserial PRIMARY KEY, seq bigint NOT NULL, hash text,"
                               " time double precision NOT NULL, kid text NOT NULL,"
                               " sig text NOT NULL)")
            return list(await conn.fetch(sql.format(table=f'"{self.schema}".anchors'), *args))
        finally:
            await conn.close()

    async def append(self, anchor: Anchor) -> None:
        await self._run("INSERT INTO {table} (seq, hash, time, kid, sig)"
                        " VALUES ($1, $2, $3, $4, $5)",
                        anchor.seq, anchor.hash, anchor.time, anchor.kid, anchor.sig)

    async def read(self) -> list[Anchor]:
        rows = await self._run("SELECT seq, hash, time, kid, sig FROM {table} ORDER BY n")
        return [Anchor(r["seq"], r["hash"], r["time"], r["kid"], r["sig"]) for r in rows]

    async def aclose(self) -> None:
        return None


def build_sink(options: Mapping[str, Any]) -> AnchorSink:
    opts = dict(options)
    kind = opts.pop("kind", "file")
    sink: AnchorSink
    if kind in ("file", "sqlite"):
        path = opts.pop("path", DEFAULT_ANCHOR_PATH)
        sink = FileAnchorSink(path) if kind == "file" else SQLiteAnchorSink(path)
    elif kind == "postgres":
        sink = PostgresAnchorSink(dsn_from(opts, "anchor (postgres)"),
                                  opts.pop("schema", "public"))
    else:
        raise ConfigError(f"audit: anchor kind {kind!r} is not file, sqlite or postgres")
    if opts:
        raise ConfigError(f"audit: unknown anchor options {sorted(opts)}")
    return sink


class Anchorer:
    """Appends the signed chain head to a sink: every `every_s` seconds while started (when the
    head moved) and once more at `aclose` (when this process wrote or was started)."""

    def __init__(self, sink: AnchorSink, signer: Signer, every_s: float = DEFAULT_EVERY_S) -> None:
        self.sink = sink
        self.signer = signer
        self.every_s = every_s
        self._last: tuple[int, str | None] | None = None
        self._wrote = False
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None,
                     signer: Signer | None) -> Anchorer | None:
        if options is None:
            return None
        if not isinstance(options, Mapping):
            raise ConfigError("audit: `anchor` must be a mapping (e.g. {path: ..., every_s: 10})")
        if signer is None:
            raise ConfigError("audit: anchors are signed: set checkpoint_keys_env or "
                              "checkpoint_key_env too")
        opts = dict(options)
        every_s = opts.pop("every_s", DEFAULT_EVERY_S)
        if not isinstance(every_s, int | float) or isinstance(every_s, bool) or every_s <= 0:
            raise ConfigError("audit: anchor every_s must be a positive number")
        return cls(build_sink(opts), signer, float(every_s))

    def note_write(self) -> None:
        self._wrote = True

    def start(self, head: ChainHead) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(head), name="safeedit-anchorer")

    async def anchor(self, head: ChainHead) -> Anchor | None:
        """Append an anchor of the current head unless it is empty or anchored already."""
        seq, hash_ = await head()
        if seq == 0 or (seq, hash_) == self._last:
            return None
        anchor = Anchor.signed(self.signer, seq, hash_)
        await self.sink.append(anchor)
        self._last = (seq, hash_)
        return anchor

    async def _run(self, head: ChainHead) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            try:
                await self.anchor(head)
            except Exception:  # noqa: BLE001 - the next tick retries; requests go on
                log.warning("anchoring the audit chain to %s failed", self.sink.location,
                            exc_info=True)

    async def aclose(self, head: ChainHead) -> None:
        started, self._task = self._task, None
        if started is not None:
            started.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await started
        try:
            if started is not None or self._wrote:
                self._wrote = False
                await self.anchor(head)
        except Exception:  # noqa: BLE001 - closing must go on; verify reports it unanchored
            log.warning("the last anchor of the audit chain to %s failed", self.sink.location,
                        exc_info=True)
        finally:
            await self.sink.aclose()
