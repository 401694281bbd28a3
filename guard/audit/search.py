"""Finding traces by what was asked: the `q` (prompt words) and `endpoint` filters of the trace
list and the review queue, and which calls the dashboard leaves out, for both SQL stores (their
hooks are in guard.audit.sql; the schema in each store's migrations).

`trace_search` has a row per trace (seq, endpoint, the request's prompt as a text column holds
it, and `caller_refused`), written in the trace's own transaction like `trace_figures`; rows for
traces written before the table existed (or by an older version beside this one) are added on
the first search of each store (`backlog`). It is not part of the hash chain: like the figures,
it only finds traces, whose sealed bodies are what the pages and the API show.

`q` is matched word by word: every word of it (letters and digits; case and, with FTS5, accents
ignored) must begin a word of the prompt: `nud beach` finds "a nude figure on the beach".
    PostgreSQL   full-text search: `to_tsvector('simple', prompt) @@ 'nud:* & beach:*'`, on a GIN
                 index of that expression
    SQLite       FTS5 (`trace_search_fts`, kept by a trigger) where this build of SQLite has it;
                 else each word a LIKE pattern (escaped), which also finds it inside a word
Whether SQLite has FTS5 is checked once per process; a database file opened by a build without
it drops the FTS table and its trigger (writes must not fail there) and one with it rebuilds them.

An auditor's or admin's own call of the images API that their key's role may not make
(`caller_refused`: 403 before the request was read) is traced for the tenant like any call, but
is not the tenant's traffic: the dashboard does not count it (`NOT_REFUSED_CALLER`).
"""

from __future__ import annotations

import functools
import logging
import re
import sqlite3
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from guard.audit.chain import column_text
from guard.core.labels import QueueQuery
from guard.core.types import Trace
from guard.plugins import TraceQuery
from guard.support.errors import RequestError

log = logging.getLogger("safeedit.audit")

ENDPOINTS = ("/v1/images/generations", "/v1/images/edits")
MAX_QUERY_CHARS = 500
MAX_WORDS = 16
_WORD = re.compile(r"[^\W_]+")


def words(q: str) -> list[str]:
    """The words of a `q` filter, lower-cased; a RequestError naming `q` when it has none."""
    found = _WORD.findall(q.lower()) if len(q) <= MAX_QUERY_CHARS else []
    if not found or len(found) > MAX_WORDS:
        raise RequestError(f"Invalid 'q': 1 to {MAX_WORDS} words (letters or digits), at most "
                           f"{MAX_QUERY_CHARS} characters.", param="q")
    return found


def endpoint(value: str) -> str:
    """An `endpoint` filter: the path, or its last part (`generations`, `edits`)."""
    for path in ENDPOINTS:
        if value in (path, path.rsplit("/", 1)[1]):
            return path
    raise RequestError(f"Invalid 'endpoint': one of {', '.join(ENDPOINTS)} (or generations, "
                       "edits).", param="endpoint")


def prompt_of(trace: Trace | Mapping[str, Any]) -> str:
    request = trace.request if isinstance(trace, Trace) else trace.get("request") or {}
    prompt = request.get("prompt") if isinstance(request, Mapping) else None
    return prompt if isinstance(prompt, str) else ""


def caller_refused(trace: Trace) -> bool:
    """Refused for its key's role before its request was read (an auditor trying the images
    API): traced, not counted as the tenant's traffic."""
    return (trace.status == 403 and not trace.request and trace.error is not None
            and trace.error.code == "insufficient_permissions")


def matches(trace: Trace, q: TraceQuery) -> bool:
    """The `q` and `endpoint` filters for a trace in memory (guard.testing's store): as the
    LIKE fallback matches."""
    prompt = prompt_of(trace).lower()
    return ((q.endpoint is None or trace.endpoint == q.endpoint)
            and (q.q is None or all(w in prompt for w in words(q.q))))


def trace_query(q: QueueQuery) -> TraceQuery:
    """The trace filters of a review-queue query."""
    return TraceQuery(tenant=q.tenant, category=q.category, policy_id=q.policy_id,
                      policy_version=q.policy_version, decision=q.decision, key_id=q.key_id,
                      model=q.model, endpoint=q.endpoint, q=q.q)


# --- SQL ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PromptMatch:
    """How a database matches `q`'s words: one WHERE clause on `trace_search` and its argument."""

    clause: str
    argument: Any  # words -> the argument of `clause`'s `?`

    def where(self, found: Sequence[str]) -> tuple[str, Any]:
        return self.clause, self.argument(found)


def _like(w: str) -> str:
    return "%" + w.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


POSTGRES = PromptMatch(
    "seq IN (SELECT seq FROM trace_search WHERE to_tsvector('simple', prompt)"
    " @@ to_tsquery('simple', ?))", lambda found: " & ".join(f"{w}:*" for w in found))
SQLITE_FTS5 = PromptMatch(
    "seq IN (SELECT rowid FROM trace_search_fts WHERE trace_search_fts MATCH ?)",
    lambda found: " AND ".join(f'"{w}"*' for w in found))


def sqlite_like(count: int) -> PromptMatch:
    likes = " AND ".join(["prompt LIKE ? ESCAPE '\\'"] * count)
    return PromptMatch(f"seq IN (SELECT seq FROM trace_search WHERE {likes})",
                       lambda found: [_like(w) for w in found])


class _Dialect(Protocol):
    prompt_match: PromptMatch | None  # None: SQLite without FTS5 (LIKE)

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Any]: ...


def clauses(dialect: _Dialect, q: TraceQuery, where: Sequence[str], args: Sequence[Any]
            ) -> tuple[list[str], list[Any]]:
    """`where` and `args` with the clauses (on any table with the traces' `seq`) of `q`'s `q`
    and `endpoint` added."""
    where, args = list(where), list(args)
    if q.endpoint is not None:
        where.append("seq IN (SELECT seq FROM trace_search WHERE endpoint = ?)")
        args.append(q.endpoint)
    if q.q is not None:
        found = words(q.q)
        match = dialect.prompt_match or sqlite_like(len(found))
        clause, argument = match.where(found)
        where.append(clause)
        args += argument if isinstance(argument, list) else [argument]
    return where, args


# The dashboard's figures leave out callers refused for their role (partial index: cheap).
NOT_REFUSED_CALLER = "seq NOT IN (SELECT seq FROM trace_search WHERE caller_refused)"

INSERT = ("INSERT INTO trace_search (seq, endpoint, prompt, caller_refused)"
          " VALUES ((SELECT seq FROM traces WHERE id = ?), ?, ?, ?) ON CONFLICT DO NOTHING")


def insert(traces: Sequence[Trace]) -> tuple[str, list[tuple[Any, ...]]]:
    """The statement writing the traces' `trace_search` rows (after the traces' own)."""
    return INSERT, [(column_text(t.id), t.endpoint, column_text(prompt_of(t)),
                     caller_refused(t)) for t in traces]


SQLITE_MIGRATION = """
    CREATE TABLE IF NOT EXISTS trace_search (
        seq            INTEGER PRIMARY KEY,
        endpoint       TEXT NOT NULL,
        prompt         TEXT NOT NULL,
        caller_refused INTEGER NOT NULL
    );
    CREATE INDEX IF NOT EXISTS trace_search_endpoint ON trace_search(endpoint, seq);
    CREATE INDEX IF NOT EXISTS trace_search_refused ON trace_search(seq) WHERE caller_refused
"""

POSTGRES_MIGRATION = """
    CREATE TABLE IF NOT EXISTS trace_search (
        seq            bigint PRIMARY KEY,
        endpoint       text NOT NULL,
        prompt         text NOT NULL,
        caller_refused boolean NOT NULL
    );
    CREATE INDEX IF NOT EXISTS trace_search_endpoint ON trace_search (endpoint, seq);
    CREATE INDEX IF NOT EXISTS trace_search_prompt
        ON trace_search USING gin (to_tsvector('simple', prompt));
    CREATE INDEX IF NOT EXISTS trace_search_refused ON trace_search (seq) WHERE caller_refused;
"""


@functools.cache
def sqlite_has_fts5() -> bool:
    try:
        sqlite3.connect(":memory:").execute("CREATE VIRTUAL TABLE t USING fts5(x)")
    except sqlite3.OperationalError:
        return False
    return True


def sqlite_prompt_match() -> PromptMatch | None:
    return SQLITE_FTS5 if sqlite_has_fts5() else None


def prepare_sqlite(conn: sqlite3.Connection) -> None:
    """After the migrations, on connecting: FTS5 over `trace_search` where this SQLite has it
    (built from the table the first time), none where it has not."""
    exists = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'trace_search_fts'"
                          ).fetchone() is not None
    if exists == sqlite_has_fts5():
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        if exists:
            log.warning("this SQLite has no FTS5: prompt search falls back to LIKE")
            conn.execute("DROP TRIGGER IF EXISTS trace_search_fts_insert")
            conn.execute("DROP TABLE IF EXISTS trace_search_fts")
        else:
            conn.execute("CREATE VIRTUAL TABLE IF NOT EXISTS trace_search_fts USING fts5("
                         "prompt, content='trace_search', content_rowid='seq')")
            conn.execute("CREATE TRIGGER IF NOT EXISTS trace_search_fts_insert AFTER INSERT"
                         " ON trace_search BEGIN INSERT INTO trace_search_fts (rowid, prompt)"
                         " VALUES (new.seq, new.prompt); END")
            conn.execute("INSERT INTO trace_search_fts (trace_search_fts) VALUES ('rebuild')")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


_complete: weakref.WeakSet[Any] = weakref.WeakSet()


async def backlog(store: Any) -> None:
    """`trace_search` rows for the traces that have none (once per store: every trace written
    since writes its own; the seq has no gaps, so a count tells)."""
    if store in _complete:
        return
    fetch = store.dialect.fetch
    have = (await fetch("SELECT count(*) FROM trace_search"))[0][0]
    missing = ("SELECT body FROM traces WHERE seq NOT IN (SELECT seq FROM trace_search)"
               " ORDER BY seq LIMIT 1000")
    while have < (await store.chain_head())[0] and (rows := await fetch(missing)):
        statement = insert([Trace.model_validate(orjson.loads(r[0])) for r in rows])
        # Under the chain head's lock, as a write: one transaction for the page.
        await store.dialect.append(store.traces_tables.head,
                                   lambda seq, hash_, s=statement: [s])
        have += len(rows)
    _complete.add(store)
