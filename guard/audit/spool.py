"""The trace spool: no image leaves without a durable, signed record of its trace.

When the audit store cannot take a trace (PostgreSQL restarting, a full disk), the exchange
(guard.pipeline.exchange) hands it to the store's `Spool`: one JSON line appended to a local file
with O_APPEND and fsync'd before the reply leaves, signed with the log's key (guard.audit.logkeys)
over the trace's canonical content, so that the line is as much evidence as a row. A background
task replays the spool into the store, in order, once the store is back; each replayed trace is
sealed into the chain and becomes a leaf of the log like any other. `safeedit audit verify` lists
what is spooled and not yet logged, and checks each line's signature.

Audit options:
    spool            {path, max_mb}: where (default `<database>.spool` beside SQLite,
                     var/audit.spool for PostgreSQL) and how large it may grow (default 512 MB;
                     a full spool refuses, with a 503, like `refuse`)
    on_unavailable   spool (default) | refuse: refuse = the request fails with a 503 and its trace
                     is lost when the store is down (the behaviour before the spool)
Not kept: retained images of a spooled trace (their sha256 is in the trace; the copies are kept
only when the image store could take them).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import orjson

from guard.audit.logkeys import LogKeys
from guard.core.types import Trace
from guard.support.durable import append_durably, read_lines, replace_durably
from guard.support.errors import ConfigError

log = logging.getLogger("safeedit.audit.spool")
PREFIX = "safeedit-spool-v1"
DEFAULT_MAX_MB = 512
REPLAY_EVERY_S = 2.0


def spool_message(trace_id: str, content_sha256: str) -> bytes:
    return f"{PREFIX}\n{trace_id}\n{content_sha256}".encode()


class TraceSink(Protocol):
    async def write_many(self, traces: list[Trace]) -> None: ...

    async def get(self, trace_id: str) -> Trace | None: ...


class Spool:
    def __init__(self, path: str | Path, keys: LogKeys | None,
                 max_bytes: int = DEFAULT_MAX_MB << 20) -> None:
        self.path = Path(path)
        self.keys = keys
        self.max_bytes = max_bytes
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.replayed = 0

    @classmethod
    def from_options(cls, opts: dict[str, Any], default_path: Path,
                     keys: LogKeys | None) -> Spool | None:
        """Pops `spool` and `on_unavailable` from a store's options."""
        mode = opts.pop("on_unavailable", "spool")
        options = opts.pop("spool", None) or {}
        if mode not in ("spool", "refuse"):
            raise ConfigError("audit: on_unavailable must be spool or refuse")
        if not isinstance(options, Mapping) or set(options) - {"path", "max_mb"}:
            raise ConfigError("audit: spool takes {path, max_mb}")
        max_mb = options.get("max_mb", DEFAULT_MAX_MB)
        if not isinstance(max_mb, int | float) or isinstance(max_mb, bool) or max_mb <= 0:
            raise ConfigError("audit: spool max_mb must be a positive number")
        if mode == "refuse":
            return None
        return cls(options.get("path", default_path), keys, int(max_mb * (1 << 20)))

    # --- keeping ---------------------------------------------------------------------------------

    def _line(self, trace: Trace) -> bytes:
        body = trace.canonical_bytes()
        digest = hashlib.sha256(body).hexdigest()
        record: dict[str, Any] = {"trace": orjson.loads(body), "sha256": digest}
        if self.keys is not None:
            record |= {"kid": self.keys.kid,
                       "sig": self.keys.sign(spool_message(trace.id, digest))}
        return orjson.dumps(record) + b"\n"

    def _append(self, line: bytes) -> None:
        size = self.path.stat().st_size if self.path.exists() else 0
        if size + len(line) > self.max_bytes:
            raise OSError(f"the spool {self.path} is full ({size} bytes)")
        append_durably(self.path, line, 0o600)

    async def keep(self, trace: Trace) -> bool:
        """Spool `trace` durably; False when that failed too (full, unwritable)."""
        line = self._line(trace)
        async with self._lock:
            try:
                await asyncio.to_thread(self._append, line)
            except OSError as exc:
                log.error("spooling trace %s failed: %s", trace.id, exc)
                return False
        log.warning("audit store unavailable: trace %s spooled to %s", trace.id, self.path)
        return True

    # --- reading and replaying -------------------------------------------------------------------

    def _lines(self) -> list[bytes]:
        return [line for _, line in read_lines(self.path)]

    def pending(self) -> dict[str, int]:
        """What waits: traces and bytes (for /readyz and /metrics)."""
        lines = self._lines()
        return {"traces": len(lines), "bytes": sum(len(x) + 1 for x in lines)}

    def records(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self._lines()]

    def check(self, record: Mapping[str, Any]) -> str | None:
        """Why a spooled line is not trustworthy, or None."""
        body = orjson.dumps(record.get("trace"), option=orjson.OPT_SORT_KEYS)
        digest = hashlib.sha256(body).hexdigest()
        trace_id = str((record.get("trace") or {}).get("id"))
        if digest != record.get("sha256"):
            return f"spooled trace {trace_id} was changed after it was spooled"
        if self.keys is None:
            return None
        valid = self.keys.check(record.get("kid"), spool_message(trace_id, digest),
                                str(record.get("sig") or ""))
        return None if valid else f"spooled trace {trace_id} has no valid log signature"

    async def replay(self, store: TraceSink, batch: int = 100) -> int:
        """Write what is spooled into `store`, oldest first; the lines written leave the file.
        Stops at the first failure (the store is still down): the order is kept."""
        done = 0
        while lines := await asyncio.to_thread(self._lines):
            chunk = lines[:batch]
            traces = []
            for line in chunk:
                record = orjson.loads(line)
                if (problem := self.check(record)) is not None:
                    raise ValueError(problem)
                traces.append(Trace.model_validate(record["trace"]))
            # A write can commit while its connection dies (a server shutting down): the trace
            # is stored and spooled both. What the store holds already is not written twice.
            stored = {t.id for t in traces if await store.get(t.id) is not None}
            if stored:
                log.warning("%d spooled trace(s) were stored already (committed as the "
                            "connection failed): not written again", len(stored))
            await store.write_many([t for t in traces if t.id not in stored])
            async with self._lock:
                await asyncio.to_thread(self._drop, len(chunk))
            done += len(chunk)
            self.replayed += len(chunk)
        if done:
            log.info("replayed %d spooled traces into the audit store", done)
        return done

    def _drop(self, count: int) -> None:
        """Remove the first `count` lines (lines appended meanwhile are kept)."""
        rest = self._lines()[count:]
        if not rest:
            self.path.unlink(missing_ok=True)
            return
        replace_durably(self.path, b"".join(line + b"\n" for line in rest))

    def start(self, store: TraceSink) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(store), name="safeedit-spool-replay")

    async def _run(self, store: TraceSink) -> None:
        while True:
            try:
                if self.path.exists():
                    await self.replay(store)
            except Exception as exc:  # noqa: BLE001 - still down: the next tick retries
                log.warning("the audit store does not take the spool yet (%s: %s)",
                            type(exc).__name__, str(exc)[:200])
            await asyncio.sleep(REPLAY_EVERY_S)

    async def aclose(self, store: TraceSink) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(Exception):  # a last try; what stays is replayed at next start
            await self.replay(store)
