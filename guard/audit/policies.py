"""The policy history: every policy version a proxy has served, kept in the audit store beside
the traces that name it, and every start and reload that put one in force.

    policy_versions   one row per effective policy (its sha256, as traces record it): id,
                      version, the effective content as canonical YAML, when and where first seen
    policy_events     one row per policy per start or reload: when, which replica, what changed
                      (loaded, added, updated, removed, stale: a file changed under a version
                      already served, which keeps serving the old content)

Both stores create the tables in a migration (guard.audit.sqlite, guard.audit.postgres); the
SQL here is the same for both (`?` placeholders, numbered by the PostgreSQL dialect). A store
that is not an SQL store keeps no history (`PolicyHistory.of` answers None).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from guard.audit.sql import Dialect, SQLStore

SQLITE_MIGRATION = """
CREATE TABLE IF NOT EXISTS policy_versions (
    sha256 TEXT PRIMARY KEY, policy_id TEXT NOT NULL, version INTEGER NOT NULL,
    content TEXT NOT NULL, first_at REAL NOT NULL, first_by TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS policy_events (
    n INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, replica TEXT NOT NULL,
    event TEXT NOT NULL, change TEXT NOT NULL, policy_id TEXT NOT NULL, version INTEGER,
    sha256 TEXT, detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS policy_events_policy ON policy_events(policy_id, at)
"""

POSTGRES_MIGRATION = """
CREATE TABLE IF NOT EXISTS policy_versions (
    sha256 text PRIMARY KEY, policy_id text NOT NULL, version integer NOT NULL,
    content text NOT NULL, first_at double precision NOT NULL, first_by text NOT NULL
);
CREATE TABLE IF NOT EXISTS policy_events (
    n bigserial PRIMARY KEY, at double precision NOT NULL, replica text NOT NULL,
    event text NOT NULL, change text NOT NULL, policy_id text NOT NULL, version integer,
    sha256 text, detail text NOT NULL
);
CREATE INDEX IF NOT EXISTS policy_events_policy ON policy_events (policy_id, at);
"""


@dataclass(frozen=True, slots=True)
class Served:
    """One policy as a start or reload found it: what changed, and its effective content
    (None when it was removed)."""

    policy_id: str
    change: str  # loaded | added | updated | removed | stale
    version: int | None = None
    sha256: str | None = None
    content: str | None = None  # canonical YAML of the effective policy
    detail: str = ""


class PolicyHistory:
    """The policy history of one SQL audit store."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect

    @classmethod
    def of(cls, store: object) -> PolicyHistory | None:
        return cls(store.dialect) if isinstance(store, SQLStore) else None

    async def record(self, event: str, replica: str, served: Sequence[Served],
                     at: float | None = None) -> None:
        """Keep each new version's content (the first time it is served) and one event per
        policy. `event`: start or reload."""
        at = time.time() if at is None else at
        for s in served:
            if s.sha256 and s.content is not None and s.version is not None:
                await self.dialect.fetch(
                    "INSERT INTO policy_versions (sha256, policy_id, version, content, first_at,"
                    " first_by) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (sha256) DO NOTHING",
                    [s.sha256, s.policy_id, s.version, s.content, at, f"{event} on {replica}"])
            await self.dialect.fetch(
                "INSERT INTO policy_events (at, replica, event, change, policy_id, version,"
                " sha256, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [at, replica, event, s.change, s.policy_id, s.version, s.sha256, s.detail])

    async def versions(self, policy_id: str | None = None) -> list[dict[str, Any]]:
        """Every version kept, newest first, with the starts and reloads that served it."""
        where, args = (" WHERE policy_id = ?", [policy_id]) if policy_id else ("", [])
        rows = await self.dialect.fetch(
            "SELECT sha256, policy_id, version, first_at, first_by FROM policy_versions"
            f"{where} ORDER BY first_at DESC, policy_id", args)
        served: dict[str, list[dict[str, Any]]] = {}
        for event in await self.events(policy_id):
            if event["sha256"] and event["change"] != "removed":
                served.setdefault(event["sha256"], []).append(event)
        return [{"sha256": r[0], "policy_id": r[1], "version": r[2], "first_at": r[3],
                 "first_by": r[4], "served": served.get(r[0], [])} for r in rows]

    async def events(self, policy_id: str | None = None, limit: int = 1000
                     ) -> list[dict[str, Any]]:
        """Starts and reloads, newest first."""
        where, args = (" WHERE policy_id = ?", [policy_id]) if policy_id else ("", [])
        rows = await self.dialect.fetch(
            "SELECT n, at, replica, event, change, policy_id, version, sha256, detail"
            f" FROM policy_events{where} ORDER BY n DESC LIMIT ?", [*args, limit])
        keys = ("n", "at", "replica", "event", "change", "policy_id", "version", "sha256",
                "detail")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    async def content(self, sha256: str) -> tuple[str, int, str] | None:
        """(policy id, version, canonical YAML) of a version kept, or None."""
        rows = await self.dialect.fetch(
            "SELECT policy_id, version, content FROM policy_versions WHERE sha256 = ?",
            [sha256])
        return (rows[0][0], rows[0][1], rows[0][2]) if rows else None
