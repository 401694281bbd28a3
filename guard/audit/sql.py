"""The one SQL audit store: all that the SQLite and PostgreSQL stores do alike, over a dialect.

Both keep two hash chains (the traces; auditors' labels, guard.audit.labels) in tables of the same
shape, and `SQLStore._append` is the one place either chain is sealed, for both databases: in one
transaction holding the chain head's write lock, read the head's seq and hash, link each new row
to the one before (guard.core.hashchain.link_hash), sign a checkpoint where one falls due
(guard.audit.chain), insert the rows and the checkpoints, and move the head. Bodies are
serialised before the lock is taken, so that it is held only for the inserts.

The SQL is written here once, with `?` placeholders. A `Dialect` is what differs between the
databases: how a statement runs (on one sqlite3 connection in a worker thread; on an asyncpg
pool, with `?` numbered `$1, $2...`), how the chain head is locked (BEGIN IMMEDIATE; SELECT ...
FOR UPDATE), how a chain is walked (in pages by seq; through a server-side cursor in one
snapshot), how the categories column keeps a trace's categories (`,a,b,` text; text[]), and the
SQL of the review queue's sample point, and the few expressions the dashboard's figures need.
The dashboard's figures (guard.plugins.DashboardStore) are counted in the database from
`trace_figures`, a narrow table with a row per trace (what `trace_figures(trace)` says the
dashboard counts of it) written in the trace's transaction: a window of any length is counted
without reading one trace's body. The schemas and their migrations, and each store's own
options, are in guard.audit.sqlite and guard.audit.postgres.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol, Self, TypedDict

import orjson

from guard.audit import search
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
    verify,
)
from guard.audit.common import common_options, decode_cursor, encode_cursor, where_sql
from guard.audit.figures import count_window, trace_figures
from guard.audit.images import RetainedImages
from guard.audit.labels import (
    LABEL_TABLES,
    QUEUE_ORDER,
    UNLABELLED,
    label_columns,
    label_page,
    label_query,
    label_row,
)
from guard.audit.logcheck import verify_log
from guard.audit.spool import Spool
from guard.audit.tlog import LogSetup, TransparencyLog, log_setup
from guard.core.hashchain import VerifyReport, link_hash
from guard.core.labels import Label, LabelPage, QueuePage, QueueQuery, bind_label
from guard.core.types import Trace
from guard.plugins import ImageStore, TracePage, TraceQuery, WindowFigures
from guard.support.errors import ConfigError, NotFound

Row = Sequence[Any]  # a stored row, read by position: a sqlite3 tuple or an asyncpg Record
# SQL with `?` placeholders, and the rows of arguments it runs with (one run per row).
Statement = tuple[str, Sequence[Sequence[Any]]]
# An append's statements, made from the chain head's (seq, hash) as read under its lock.
Appending = Callable[[int, str | None], list[Statement]]
# The i-th new row of a chain, from (i, seq, prev_hash, hash).
RowMaker = Callable[[int, int, str | None, str], tuple[Any, ...]]

TRACE_COLUMNS = ("seq, id, created_at, tenant, key_id, decision, status, categories, policy_id,"
                 " policy_version, model, body, prev_hash, hash")
CHECKPOINT_COLUMNS = "seq, trace_id, hash, created_at, key_fingerprint, signature, kid"
# A trace's row of figures, its seq found by its id (written after the trace, or for a trace
# written before the table was).
FIGURES_INSERT = ("INSERT INTO trace_figures (seq, created_at, tenant, decision, policy_id,"
                  " policy_version, rounds, request_ms, judge_ms, backend_ms, flags)"
                  " VALUES ((SELECT seq FROM traces WHERE id = ?), ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                  " ON CONFLICT DO NOTHING")


class Dialect(Protocol):
    """What the SQL audit store needs of one database (its SQL has `?` placeholders)."""

    # A WHERE clause: the categories column holds the category in `?`, which is passed as
    # `categories_column([category])`.
    has_category: str
    prompt_match: search.PromptMatch | None  # how `q` finds prompts (guard.audit.search)
    # A trace's sample point in [0, 1) in SQL, as guard.audit.labels.sample_point(id).
    sample_point: str
    # created_at in buckets of `?` seconds, rounded down: a whole number.
    bucket: str
    # A FROM item of the elements of the list column `{}`, each as `e.value`.
    elements: str

    def list_column(self, values: Sequence[Any]) -> Any:
        """A list of numbers or strings as a `trace_figures` list column keeps it."""
        ...

    def categories_column(self, categories: Sequence[str]) -> Any:
        """A trace's categories as its `categories` column keeps them."""
        ...

    def categories_of(self, column: Any) -> list[str]:
        """The categories a `categories` column holds."""
        ...

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Row]: ...

    async def append(self, head: str, appending: Appending) -> None:
        """In one transaction that holds the write lock on the chain head table `head` (its one
        row, id 1): read the head's seq and hash, run the statements `appending` makes of them,
        and commit; roll back if anything fails."""
        ...

    def walk(self, select: str, where: Sequence[str], args: Sequence[Any],
             batch: int) -> AsyncIterator[Row]:
        """The rows of `select` (from a chain's rows table, seq first) that meet every clause of
        `where`, in chain order, read `batch` at a time."""
        ...

    async def ready(self) -> bool: ...

    async def aclose(self) -> None: ...


class ChainOptions(TypedDict, total=False):
    """A store's options besides its database's: see guard.audit.common."""

    images: RetainedImages | None
    signer: Signer | None
    checkpoint_every: int
    anchorer: Anchorer | None
    label_anchorer: Anchorer | None
    log: LogSetup | None
    spool: Spool | None


class SQLStore(ABC):
    """An audit store over a `Dialect`: an AuditStore and a LabelStore (guard.plugins), a
    ChainedStore and an ImageKeepingStore (guard.audit)."""

    kind: str  # the `kind:` that configures it

    def __init__(self, dialect: Dialect, *, images: RetainedImages | None = None,
                 signer: Signer | None = None,
                 checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
                 anchorer: Anchorer | None = None,
                 label_anchorer: Anchorer | None = None, log: LogSetup | None = None,
                 spool: Spool | None = None) -> None:
        self.dialect = dialect
        self.spool = spool  # where traces wait while the database is down (guard.audit.spool)
        # The transparency log (guard.audit.tlog): rows signed at write, a Merkle tree, heads.
        self.log = TransparencyLog(dialect, log.keys, log.sink, log.every_s, log.public) \
            if log else None
        self.accept_log_reset = log.accept_reset if log else False
        self.images = images
        self.signer = signer
        self.checkpoint_every = checkpoint_every
        self.anchorer = anchorer
        self.label_anchorer = label_anchorer
        self.traces_tables = ChainTables("traces", "chain_head", "checkpoints", TRACE_COLUMNS,
                                         CHECKPOINT_COLUMNS, self._trace_chain_row)
        self.label_chain = TableChain(self, LABEL_TABLES)  # what verify_labels walks
        self._figures_complete = False  # see _figures_backlog

    @classmethod
    def from_config(cls, options: Mapping[str, Any], *,
                    images: ImageStore | None = None) -> Self:
        """`images`: the shared image store, for retained images (None: per the options)."""
        opts = dict(options)
        own = cls.own_options(opts)
        labels_anchor = label_anchor_options(opts.get("anchor"))
        common = common_options(opts, {"kind": cls.kind, **options}, images)
        log = log_setup(opts, options.get("anchor"), *cls.log_defaults(own))
        spool = Spool.from_options(opts, Path(own["path"]).with_suffix(".spool") if "path" in own
                                   else Path("var/audit.spool"), log.keys)
        if opts:
            raise ConfigError(f"audit ({cls.kind}): unknown options {sorted(opts)}")
        return cls(**own, images=common.images, signer=common.signer,
                   checkpoint_every=common.checkpoint_every, anchorer=common.anchorer,
                   label_anchorer=Anchorer.from_options(labels_anchor, common.signer)
                   if common.anchorer else None, log=log, spool=spool)

    @classmethod
    @abstractmethod
    def own_options(cls, opts: dict[str, Any]) -> dict[str, Any]:
        """Pops the store's own options from `opts`: its constructor's other arguments."""

    @classmethod
    @abstractmethod
    def log_defaults(cls, own: dict[str, Any]) -> tuple[Path | None, dict[str, Any]]:
        """Where this store keeps a log key it makes itself (None: it needs a configured one),
        and its default tree-head sink (guard.audit.heads.build_head_sink)."""

    # --- sealing: the one append path of both chains ------------------------------------------

    async def _append(self, chain: ChainTables, bodies: Sequence[tuple[str, bytes]],
                      row: RowMaker, also: Sequence[Statement] = ()) -> None:
        """Append (id, canonical body) pairs to `chain` in one transaction: `row(i, seq,
        prev_hash, hash)` is the i-th row to insert; checkpoints as they fall due; then the
        statements `also`."""
        if not bodies:
            return

        def statements(seq: int, prev: str | None) -> list[Statement]:
            rows, checkpoints, sigs = [], [], []
            for i, (id_, body) in enumerate(bodies):
                seq += 1
                hash_ = link_hash(prev, body)
                rows.append(row(i, seq, prev, hash_))
                prev = hash_
                if self.log is not None:
                    sigs.append(self.log.entry_signature(chain.rows, seq, hash_))
                if self.signer is not None and seq % self.checkpoint_every == 0:
                    cp = self.signer.sign(seq, id_, hash_)
                    checkpoints.append((cp.seq, cp.trace_id, cp.hash, cp.created_at,
                                        cp.key_fingerprint, cp.signature, cp.kid))
            marks = ", ".join("?" * len(rows[0]))
            out: list[Statement] = [
                (f"INSERT INTO {chain.rows} ({chain.columns}) VALUES ({marks})", rows)]
            if sigs:
                out.append(("INSERT INTO entry_sigs (chain, seq, kid, sig) VALUES (?, ?, ?, ?)",
                            sigs))
            if checkpoints:
                out.append((f"INSERT INTO {chain.checkpoints} ({chain.checkpoint_columns})"
                            " VALUES (?, ?, ?, ?, ?, ?, ?)", checkpoints))
            out.append((f"UPDATE {chain.head} SET seq = ?, hash = ? WHERE id = 1", [(seq, prev)]))
            return [*out, *also]

        await self.dialect.append(chain.head, statements)

    # --- the AuditStore interface -------------------------------------------------------------

    async def write(self, trace: Trace) -> Trace:
        await self.write_many([trace])
        return trace

    async def write_many(self, traces: Sequence[Trace]) -> None:
        """Append several traces in one transaction, in order: the same sealing as `write`,
        for imports and bulk loads (one commit per batch instead of per trace)."""
        if self.images is not None:
            await self.images.keep(*traces)
        # The bodies are final now: serialise them before the write lock is taken.
        bodies = [(trace.id, trace.canonical_bytes()) for trace in traces]

        def row(i: int, seq: int, prev: str | None, hash_: str) -> tuple[Any, ...]:
            trace = traces[i]
            trace.prev_hash, trace.hash = prev, hash_  # = Trace.seal
            c = index_columns(vars(trace))
            return (seq, c["id"], c["created_at"], c["tenant"], c["key_id"], c["decision"],
                    c["status"], self.dialect.categories_column(c["categories"]),
                    c["policy_id"], c["policy_version"], c["model"], bodies[i][1].decode(),
                    prev, hash_)

        await self._append(self.traces_tables, bodies, row,
                           [(FIGURES_INSERT, [self._figures_row(t) for t in traces]),
                            search.insert(traces)])
        if self.anchorer is not None:
            self.anchorer.note_write()

    async def get(self, trace_id: str) -> Trace | None:
        rows = await self.dialect.fetch("SELECT body, prev_hash, hash FROM traces WHERE id = ?",
                                        (column_text(trace_id),))
        return _load(rows[0]) if rows else None

    async def query(self, q: TraceQuery) -> TracePage:
        await search.backlog(self)
        where, args = self._where(q)
        if q.cursor:
            where.append("seq < ?")
            args.append(decode_cursor(q.cursor))
        rows = await self.dialect.fetch(f"SELECT body, prev_hash, hash, seq FROM traces"
                                        f"{where_sql(where)} ORDER BY seq DESC LIMIT ?",
                                        [*args, q.limit + 1])
        more = len(rows) > q.limit
        rows = rows[: q.limit]
        return TracePage([_load(r).summary() for r in rows],
                         encode_cursor(rows[-1][3]) if more and rows else None)

    async def ready(self) -> bool:
        return await self.dialect.ready()

    async def start(self) -> None:
        """Sign tree heads and anchor chain heads off the request path (the app checks the
        log against its last head first: `TransparencyLog.check_start`)."""
        if self.log is not None:
            self.log.start()
        if self.spool is not None:
            self.spool.start(self)
        if self.anchorer is not None:
            self.anchorer.start(self.chain_head)
        if self.label_anchorer is not None:
            self.label_anchorer.start(self.label_chain.chain_head)

    async def aclose(self) -> None:
        if self.spool is not None:
            await self.spool.aclose(self)
        if self.log is not None:
            await self.log.aclose()
        if self.anchorer is not None:
            await self.anchorer.aclose(self.chain_head)
        if self.label_anchorer is not None:
            await self.label_anchorer.aclose(self.label_chain.chain_head)
        if self.images is not None:
            await self.images.aclose()
        await self.dialect.aclose()

    # --- labels (guard.plugins.LabelStore) ----------------------------------------------------

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
        return label_page(await self.dialect.fetch(sql, args), limit)

    async def review_queue(self, q: QueueQuery) -> QueuePage:
        await search.backlog(self)
        where, args = self._where(search.trace_query(q))
        where += [UNLABELLED, "(decision IN ('refused', 'edited')"
                  f" OR (decision = 'passed' AND {self.dialect.sample_point} < ?))"]
        args.append(q.sample)
        sql = " FROM traces" + where_sql(where)
        rows = await self.dialect.fetch(f"SELECT body, prev_hash, hash{sql}"
                                        f" ORDER BY {QUEUE_ORDER} LIMIT ?", [*args, q.limit])
        left = await self.dialect.fetch(f"SELECT decision, count(*){sql} GROUP BY decision",
                                        args)
        return QueuePage([_load(r).summary() for r in rows], {r[0]: r[1] for r in left})

    # --- the dashboard's figures (guard.plugins.DashboardStore) -------------------------------

    async def figures(self, q: TraceQuery, bucket_s: int,
                      percentiles: Sequence[int] = (50, 90, 99)) -> WindowFigures:
        await self._figures_backlog()
        where, args = self._where(replace(q, key_id=None, model=None, category=None))
        other, other_args = self._where(TraceQuery(key_id=q.key_id, model=q.model,
                                                   category=q.category))
        if other:  # filters on columns only the traces table has
            where.append(f"seq IN (SELECT seq FROM traces{where_sql(other)})")
            args += other_args
        await search.backlog(self)
        where.append(search.NOT_REFUSED_CALLER)
        return await count_window(self.dialect, where, args, bucket_s, percentiles)

    def _figures_row(self, trace: Trace) -> tuple[Any, ...]:
        c, f = index_columns(vars(trace)), trace_figures(trace)
        return (c["id"], c["created_at"], c["tenant"], c["decision"], c["policy_id"],
                c["policy_version"], f.rounds, f.request_ms, self.dialect.list_column(f.judge_ms),
                self.dialect.list_column(f.backend_ms), self.dialect.list_column(
                    [f"{action}:{column_text(category)}" for category, action in f.flags]))

    async def _figures_backlog(self) -> None:
        """Figures for the traces written before `trace_figures` was (once per store: every
        trace written since writes its own; the seq has no gaps, so a count tells)."""
        if self._figures_complete:
            return
        figured = (await self.dialect.fetch("SELECT count(*) FROM trace_figures"))[0][0]
        missing = ("SELECT body, prev_hash, hash FROM traces WHERE seq NOT IN"
                   " (SELECT seq FROM trace_figures) ORDER BY seq LIMIT 1000")

        def inserting(figures: list[tuple[Any, ...]]) -> Appending:
            return lambda seq, hash_: [(FIGURES_INSERT, figures)]

        while figured < (await self.chain_head())[0] and (
                rows := await self.dialect.fetch(missing)):
            # Under the chain head's lock, as a write: one transaction for the page.
            await self.dialect.append(self.traces_tables.head,
                                      inserting([self._figures_row(_load(r)) for r in rows]))
            figured += len(rows)
        self._figures_complete = True

    # --- the chains (guard.audit.chain.ChainSource, and TableChain for the labels) --------------

    async def chain_rows(self, *, since: float | None = None, until: float | None = None,
                         tenant: str | None = None, batch: int = 1000
                         ) -> AsyncIterator[ChainRow]:
        """Rows in chain order, optionally filtered, read in batches (memory stays flat)."""
        where, args = self._where(TraceQuery(since=since, until=until, tenant=tenant))
        async for row in self.walk(self.traces_tables, where, args, batch):
            yield row

    async def walk(self, chain: ChainTables, where: Sequence[str] = (),
                   args: Sequence[Any] = (), batch: int = 1000) -> AsyncIterator[ChainRow]:
        """The rows of `chain` in chain order, optionally filtered (`where`, `args`)."""
        async for row in self.dialect.walk(f"SELECT {chain.columns} FROM {chain.rows}", where,
                                           args, batch):
            yield chain.load(row)

    async def checkpoints_of(self, chain: ChainTables) -> list[Checkpoint]:
        rows = await self.dialect.fetch(f"SELECT {chain.checkpoint_columns}"
                                        f" FROM {chain.checkpoints} ORDER BY seq")
        return [Checkpoint(*row) for row in rows]

    async def head_of(self, chain: ChainTables) -> tuple[int, str | None]:
        rows = await self.dialect.fetch(f"SELECT seq, hash FROM {chain.head} WHERE id = 1")
        return (rows[0][0], rows[0][1]) if rows else (0, None)

    async def row_by_hash_of(self, chain: ChainTables, hash_: str) -> ChainRow | None:
        rows = await self.dialect.fetch(f"SELECT {chain.columns} FROM {chain.rows}"
                                        " WHERE hash = ? LIMIT 1", (hash_,))
        return chain.load(rows[0]) if rows else None

    async def checkpoints(self) -> list[Checkpoint]:
        return await self.checkpoints_of(self.traces_tables)

    async def chain_head(self) -> tuple[int, str | None]:
        return await self.head_of(self.traces_tables)

    async def row_by_hash(self, hash_: str) -> ChainRow | None:
        return await self.row_by_hash_of(self.traces_tables, hash_)

    async def verify_labels(self) -> VerifyReport:
        anchors = (await self.label_anchorer.sink.read() if self.label_anchorer is not None
                   else None)
        return await verify(self.label_chain, self.signer, anchors=anchors, noun="label",
                            checkpoint_every=self.checkpoint_every, columns=label_columns)

    async def verify(self) -> VerifyReport:
        """Walk both chains; check them against their checkpoints and their anchorers'
        anchors (the label chain's report in `labels`)."""
        anchors = await self.anchorer.sink.read() if self.anchorer is not None else None
        report = await verify(self, self.signer, checkpoint_every=self.checkpoint_every,
                              anchors=anchors)
        report.labels = await self.verify_labels()
        if self.log is not None:
            await verify_log(self.log, report)
        return report

    # --- rows -----------------------------------------------------------------------------------

    def _where(self, q: TraceQuery) -> tuple[list[str], list[Any]]:
        """The WHERE clauses of a query's filters (not its cursor), and their arguments."""
        where: list[str] = []
        args: list[Any] = []
        for column, value in (("decision", q.decision), ("tenant", q.tenant),
                              ("key_id", q.key_id), ("policy_id", q.policy_id),
                              ("policy_version", q.policy_version), ("model", q.model)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(column_text(value))  # the columns hold escaped text; so must the filter
        if q.category:
            where.append(self.dialect.has_category)
            args.append(self.dialect.categories_column([column_text(q.category)]))
        where, args = search.clauses(self.dialect, q, where, args)  # q, endpoint
        if q.since is not None:
            where.append("created_at >= ?")
            args.append(q.since)
        if q.until is not None:
            where.append("created_at < ?")
            args.append(q.until)
        return where, args

    def _trace_chain_row(self, row: Row) -> ChainRow:
        (seq, id_, created_at, tenant, key_id, decision, status, categories, policy_id,
         policy_version, model, body, prev_hash, hash_) = row
        columns = {"id": id_, "created_at": created_at, "tenant": tenant, "key_id": key_id,
                   "decision": decision, "status": status,
                   "categories": self.dialect.categories_of(categories),
                   "policy_id": policy_id, "policy_version": policy_version, "model": model}
        return ChainRow(seq, body.encode(), prev_hash, hash_, columns)


def _load(row: Row) -> Trace:
    """A trace from its stored (body, prev_hash, hash, ...)."""
    trace = Trace.model_validate(orjson.loads(row[0]))
    trace.prev_hash, trace.hash = row[1], row[2]
    return trace
