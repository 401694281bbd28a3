"""The label chain's SQL, one for both stores: columns, rows, the listing query and its page, the
review queue's order and sample. The label model and its checks are guard.core.labels'; the
contract, guard.plugins.LabelStore; the store, guard.audit.sql.SQLStore.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from guard.audit.chain import ChainRow, ChainTables, column_text
from guard.audit.common import decode_cursor, encode_cursor, where_sql
from guard.core.labels import Label, LabelPage

LABEL_COLUMNS = ("seq, id, trace_id, slot, round, verdict, category, key_id, tenant, created_at,"
                 " body, prev_hash, hash")
# The queue's order: refused, then edited, then passed; newest first within each.
QUEUE_ORDER = ("CASE decision WHEN 'refused' THEN 0 WHEN 'edited' THEN 1 ELSE 2 END,"
               " seq DESC")
UNLABELLED = "NOT EXISTS (SELECT 1 FROM labels WHERE labels.trace_id = traces.id)"


def label_columns(label: Mapping[str, Any]) -> dict[str, Any]:
    """The indexed columns of a label, as text columns hold them (`verify` checks them
    against the hashed body)."""
    return {name: column_text(label.get(name)) for name in (
        "id", "trace_id", "slot", "round", "verdict", "category", "key_id", "tenant",
        "created_at")}


def label_row(seq: int, label: Label, body: bytes) -> tuple[Any, ...]:
    c = label_columns(vars(label))
    return (seq, c["id"], c["trace_id"], c["slot"], c["round"], c["verdict"], c["category"],
            c["key_id"], c["tenant"], c["created_at"], body.decode(), label.prev_hash,
            label.hash)


def label_chain_row(row: Sequence[Any]) -> ChainRow:
    """A stored label row (in LABEL_COLUMNS order) as the chain sees it."""
    names = ("id", "trace_id", "slot", "round", "verdict", "category", "key_id", "tenant",
             "created_at")
    return ChainRow(row[0], row[10].encode(), row[11], row[12], dict(zip(names, row[1:10],
                                                                        strict=True)))


# Where both stores keep the label chain.
LABEL_TABLES = ChainTables(
    "labels", "label_chain_head", "label_checkpoints", LABEL_COLUMNS,
    "seq, label_id, hash, created_at, key_fingerprint, signature, kid", label_chain_row)


def load_label(row: Sequence[Any]) -> Label:
    return Label(**orjson.loads(row[10]), prev_hash=row[11], hash=row[12])


def label_query(*, trace_id: str | None = None, tenant: str | None = None,
                verdict: str | None = None, category: str | None = None,
                since: float | None = None, until: float | None = None,
                latest_only: bool = True, limit: int = 50,
                cursor: str | None = None) -> tuple[str, list[Any]]:
    """The SELECT behind `LabelStore.labels` (LABEL_COLUMNS, then whether the row is its
    item's latest label), one row more than `limit` to tell whether a page follows."""
    scope, scope_args = [], []
    for column, value in (("trace_id", trace_id), ("tenant", tenant)):
        if value is not None:  # item-level filters: they may narrow the supersede subquery
            scope.append(f"{column} = ?")
            scope_args.append(column_text(value))
    latest = ("seq IN (SELECT max(seq) FROM labels" + where_sql(scope)
              + " GROUP BY trace_id, slot, round)")
    where, args = list(scope), list(scope_args)
    if latest_only:
        where.append(latest)
        args += scope_args
    conditions: list[tuple[str, Any]] = [
        ("verdict = ?", verdict), ("category = ?", column_text(category)),
        ("created_at >= ?", since), ("created_at < ?", until),
        ("seq < ?", decode_cursor(cursor) if cursor else None)]
    for clause, value in conditions:
        if value is not None:
            where.append(clause)
            args.append(value)
    sql = (f"SELECT {LABEL_COLUMNS}, {latest} AS is_current FROM labels{where_sql(where)}"
           " ORDER BY seq DESC LIMIT ?")
    return sql, [*scope_args, *args, limit + 1]


def label_page(rows: Sequence[Sequence[Any]], limit: int) -> LabelPage:
    more = len(rows) > limit
    rows = rows[:limit]
    return LabelPage([load_label(r) for r in rows],
                     encode_cursor(rows[-1][0]) if more and rows else None,
                     frozenset(r[1] for r in rows if not r[13]))


def sample_point(trace_id: str) -> float:
    """Where a trace falls in [0, 1) for the queue's sample of passed traces: the first 32 bits
    of md5(id) (PostgreSQL computes the same in SQL; not a security use)."""
    digest = hashlib.md5(trace_id.encode(), usedforsecurity=False).hexdigest()
    return int(digest[:8], 16) / 2**32
