"""Tamper evidence for the audit log: the hash chain, signed checkpoints, anchors, and `verify`.

The chain
    Rows are numbered by `seq` = 1, 2, 3... without gaps, one chain per store. Each row keeps the
    trace's canonical JSON (`Trace.canonical_bytes`), the previous row's hash, and
    `hash = sha256(prev_hash + canonical JSON)` (guard.core.hashchain.link_hash, `Trace.seal`).
    A chain-head row holds the last seq and hash; every writer appends under a lock on it, so
    concurrent writers never fork (guard.audit.sql: the one append path of both stores).
    Changing a row breaks its own hash; removing one leaves a gap in seq; reordering two puts a
    row after one it was not chained to; cutting the tail leaves the chain head pointing past it.

Signed checkpoints
    The chain alone does not stop someone with write access from rewriting a row and every row
    after it. So every `checkpoint_every` traces (audit option, default 1000) the store writes, in
    the same transaction as that trace, a checkpoint: HMAC-SHA256 over (seq, trace id, hash) with
    a key only the operators hold. A valid signature at seq c pins every row up to c, since each
    hash covers all before it. Once keys are configured a checkpoint is due at every multiple of
    `checkpoint_every`: one that is missing fails `verify` (deleting checkpoints does not switch
    their protection off), so do checkpoints with an invalid signature or an unknown key.

Keys and key ids, rotation (guard.audit.keys)
    Every key has a key id (kid), recorded with each checkpoint and anchor so that `verify` picks
    the right key. Audit options, one of:
        checkpoint_keys_env   an environment variable holding `kid1:secret1,kid2:secret2`: the
                              first key signs, all verify. To rotate, put the new key first and
                              keep the old one after it for as long as its signatures must verify.
        checkpoint_key_env    an environment variable holding one key; its kid is the first 8 hex
                              of its fingerprint (sha256 over a fixed prefix and the key).
    Kids are 1-32 of [A-Za-z0-9._-]; secrets at least 16 bytes, without commas. A checkpoint or
    anchor whose kid has no key configured cannot be verified, and `verify` fails on it.
    Checkpoints written before kids existed are matched to a key by their key fingerprint.

Anchors (guard.audit.anchor)
    Checkpoints live in the database and cannot stop someone who deletes rows together with their
    checkpoints, wipes the log, or rewrites what came after the last checkpoint. So the store
    also writes anchors OUTSIDE the database: the chain head (seq, hash, time) signed with a key
    id, appended every few seconds and at shutdown to an `AnchorSink`. `verify` checks every
    anchor: a valid signature, and a row at the anchored seq with exactly the anchored hash. Rows
    after the latest anchor are reported as not yet anchored, which is not a failure. Not covered:
    rows after both the last anchor and the last checkpoint; an attacker who holds a key.

`verify(store, signer, anchors=...)` walks the chain once, in batches (memory stays flat), and
reports every problem it finds, resynchronising after each; `report.first` is the earliest one.

Labels (guard.core.labels; their SQL in guard.audit.labels)
    Auditors' labels are a second chain in the same store, built the same way: their own rows
    (`labels`), chain head, checkpoints (`label_checkpoints`) and anchors, in a sink beside the
    traces' (`label_anchor_options`). `verify(..., noun="label", columns=label_columns)` walks it;
    the trace report carries the label report in `labels`, and is not ok unless both are.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from guard.audit.keys import Checkpoint, Signer
from guard.core.hashchain import Problem, ProblemKind, VerifyReport, link_hash

if TYPE_CHECKING:
    from guard.audit.anchor import Anchor

DEFAULT_CHECKPOINT_EVERY = 1000


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def column_text(value: Any) -> Any:
    """`value` as a text column holds it: NUL (which PostgreSQL's text refuses) and lone
    surrogates (which UTF-8 cannot encode) written as their JSON escape, `\\u0000`; lists item by
    item; anything else unchanged. Only the columns are escaped, for filtering: the hashed body
    keeps every string exactly as sent (a value and its escaped spelling share a column value)."""
    if isinstance(value, str):
        return _UNSTORABLE.sub(lambda m: f"\\u{ord(m[0]):04x}", value)
    if isinstance(value, list):
        return [column_text(item) for item in value]
    return value


def index_columns(trace: Mapping[str, Any]) -> dict[str, Any]:
    """The queryable copies of a trace's fields that a store keeps beside its body, as text
    columns hold them (`column_text`). `verify` checks them against the hashed body, so that
    editing a column alone is caught too."""
    policy = trace.get("policy") or {}
    return {name: column_text(value) for name, value in {
        "id": trace["id"], "created_at": trace["created_at"], "tenant": trace.get("tenant"),
        "key_id": trace.get("key_id"), "decision": trace["decision"], "status": trace["status"],
        "categories": list(trace.get("categories") or ()), "policy_id": policy.get("id"),
        "policy_version": policy.get("version"), "model": trace.get("model"),
    }.items()}


@dataclass(frozen=True, slots=True)
class ChainRow:
    """One stored trace as the chain sees it: its position, exact body bytes and hashes, and the
    indexed columns (keys as in `index_columns`)."""

    seq: int
    body: bytes
    prev_hash: str | None
    hash: str
    columns: Mapping[str, Any]

    @property
    def id(self) -> str:
        return str(self.columns["id"])


class ChainSource(Protocol):
    """What `verify` and `export` read; both audit stores implement it."""

    def chain_rows(self, *, since: float | None = None, until: float | None = None,
                   tenant: str | None = None) -> AsyncIterator[ChainRow]: ...

    async def checkpoints(self) -> list[Checkpoint]: ...

    async def chain_head(self) -> tuple[int, str | None]: ...

    async def row_by_hash(self, hash_: str) -> ChainRow | None: ...


@dataclass(frozen=True, slots=True)
class ChainTables:
    """Where a store keeps one chain: its rows, chain head and checkpoints tables, the rows'
    columns (seq first), the checkpoints' columns, and how a stored row becomes a ChainRow."""

    rows: str
    head: str
    checkpoints: str
    columns: str
    checkpoint_columns: str
    load: Callable[[Any], ChainRow]


class TableChain:
    """One of a store's chains as `verify` reads it (a ChainSource), for a store that keeps
    several (traces and labels): `tables` names the chain's tables to the store's `walk`,
    `checkpoints_of`, `head_of` and `row_by_hash_of`."""

    def __init__(self, store: Any, tables: Any) -> None:
        self._store, self._tables = store, tables

    def chain_rows(self, *, since: float | None = None, until: float | None = None,
                   tenant: str | None = None) -> AsyncIterator[ChainRow]:
        return self._store.walk(self._tables)  # type: ignore[no-any-return]

    async def checkpoints(self) -> list[Checkpoint]:
        return await self._store.checkpoints_of(self._tables)  # type: ignore[no-any-return]

    async def chain_head(self) -> tuple[int, str | None]:
        return await self._store.head_of(self._tables)  # type: ignore[no-any-return]

    async def row_by_hash(self, hash_: str) -> ChainRow | None:
        return await self._store.row_by_hash_of(self._tables, hash_)  # type: ignore[no-any-return]


Columns = Callable[[Mapping[str, Any]], dict[str, Any]]


def _column_mismatch(row: ChainRow, columns: Columns, noun: str) -> str | None:
    try:
        stored = columns(orjson.loads(row.body))
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        return f"its record is not a readable {noun} ({type(exc).__name__})"
    for name, value in stored.items():
        # (column_text on the stored side too: rows written before columns were escaped)
        if column_text(row.columns.get(name)) != value:
            return (f"its indexed column {name}={row.columns.get(name)!r} differs from the "
                    f"hashed record ({value!r})")
    return None


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def verify(source: ChainSource, signer: Signer | None, *,
                 checkpoint_every: int | None = DEFAULT_CHECKPOINT_EVERY,
                 anchors: Sequence[Anchor] | None = None,
                 max_problems: int = 50, noun: str = "trace",
                 columns: Columns = index_columns) -> VerifyReport:
    """Walk the whole chain and report what was changed, removed or reordered, checking it
    against the signed checkpoints and, when given, the anchors kept outside the store.
    `noun` names a row in messages; `columns` gives a row's indexed columns from its body."""
    started = time.perf_counter()
    report = VerifyReport(noun=noun)

    def _name(row: ChainRow) -> str:
        return f"{noun} {row.id} (seq {row.seq})"

    def add(kind: ProblemKind, seq: int, trace_id: str | None, message: str) -> None:
        if len(report.problems) < max_problems:
            report.problems.append(Problem(kind, seq, trace_id, message))
        else:
            report.truncated = True

    # Checkpoints and head first: rows written while we walk only extend what they cover.
    checkpoints = {cp.seq: cp for cp in await source.checkpoints()}
    head_seq, head_hash = await source.chain_head()
    anchored = _trusted_anchors(anchors, signer, report, add)
    last_cp_ok = 0

    prev: ChainRow | None = None
    async for row in source.chain_rows():
        report.traces += 1
        intact = link_hash(row.prev_hash, row.body) == row.hash
        if not intact:
            add("changed", row.seq, row.id,
                f"{_name(row)} was changed: its content no longer matches its stored hash")
        elif (mismatch := _column_mismatch(row, columns, noun)) is not None:
            add("changed", row.seq, row.id, f"{_name(row)} was changed: {mismatch}")

        expected_seq = prev.seq + 1 if prev else 1
        expected_prev = prev.hash if prev else None
        if row.seq != expected_seq:
            missing = row.seq - expected_seq
            if missing > 0:
                what = (f"the {noun} at seq {expected_seq} was" if missing == 1 else
                        f"the {missing} {noun}s at seq {expected_seq}..{row.seq - 1} were")
                where = f"after {_name(prev)}" if prev else "at the start of the chain"
                add("removed", expected_seq, None,
                    f"{what} removed: {where}, {_name(row)} is chained to a missing record "
                    f"with hash {row.prev_hash}")
            else:
                add("reordered", row.seq, row.id, f"{_name(row)} repeats a position in the chain")
        elif row.prev_hash != expected_prev and intact:
            # (a row whose own hash fails was changed itself, its prev_hash maybe with it)
            await _explain_link(source, row, prev, add, _name, noun)

        cp = checkpoints.get(row.seq)
        if cp is not None:
            valid = (signer.check(cp.kid, cp.message(), cp.signature, cp.key_fingerprint)
                     if signer is not None else None)
            if signer is None:
                report.checkpoints_unchecked += 1
            elif valid is None:
                add("unknown_key", row.seq, row.id,
                    f"the checkpoint at {_name(row)} was signed with another key (kid "
                    f"{cp.kid or '-'}, fingerprint {cp.key_fingerprint}), which is not "
                    f"configured (kids {', '.join(signer.kids)}): it cannot be verified")
            elif not valid:
                add("checkpoint", row.seq, row.id,
                    f"the checkpoint at {_name(row)} has an invalid signature (forged or altered)")
            elif cp.hash != row.hash or cp.trace_id != row.id:
                add("changed", last_cp_ok + 1, row.id,
                    f"the chain was rewritten between seq {last_cp_ok + 1} and {row.seq}: the "
                    f"signed checkpoint at seq {row.seq} names {noun} {cp.trace_id} with hash "
                    f"{cp.hash}, the store has {row.id} with hash {row.hash}")
            else:
                report.checkpoints_valid += 1
                report.last_checkpoint_seq = row.seq
                last_cp_ok = row.seq
        elif signer is not None and checkpoint_every and row.seq % checkpoint_every == 0:
            add("checkpoint_missing", row.seq, row.id,
                f"the signed checkpoint at {_name(row)} is missing: one is due every "
                f"{checkpoint_every} {noun}s (deleted, or the row was written without the key)")
        for anchor in anchored.pop(row.seq, {}).values():
            if anchor.hash != row.hash:
                add("anchor_mismatch", row.seq, row.id,
                    f"{_name(row)} is not the {noun} anchored at seq {row.seq} on "
                    f"{_when(anchor.time)} (hash {anchor.hash}, the store has {row.hash}): the "
                    f"chain was rewritten or replaced at or before seq {row.seq}")
        if row.seq == head_seq and row.hash != head_hash:
            add("changed", row.seq, row.id,
                f"{_name(row)} does not match the chain head (hash {head_hash}): the last "
                f"{noun} was replaced")
        prev = row

    report.last_seq = prev.seq if prev else 0
    if head_seq > report.last_seq:
        add("removed", report.last_seq + 1, None,
            f"{head_seq - report.last_seq} {noun}(s) removed at the end of the chain (seq "
            f"{report.last_seq + 1}..{head_seq}; the last had hash {head_hash})")
    for seq in sorted(s for s in checkpoints if s > report.last_seq):
        add("removed", seq, checkpoints[seq].trace_id,
            f"{noun} {checkpoints[seq].trace_id} (seq {seq}) is gone: a signed checkpoint names "
            f"it but the chain ends at seq {report.last_seq}")
    _unmatched_anchors(anchored, report.last_seq, add, noun)
    report.elapsed_s = time.perf_counter() - started
    return report


def _trusted_anchors(anchors: Sequence[Anchor] | None, signer: Signer | None,
                     report: VerifyReport, add: Any) -> dict[int, dict[str | None, Anchor]]:
    """The anchors whose signatures hold (all of them without keys), by seq, then by hash."""
    if anchors is None:
        return {}
    report.anchors = len(anchors)
    trusted: dict[int, dict[str | None, Anchor]] = {}
    for anchor in anchors:
        if signer is None:
            report.anchors_unchecked += 1
        elif (valid := signer.check(anchor.kid, anchor.message(), anchor.sig)) is None:
            add("unknown_key", anchor.seq, None,
                f"the anchor of seq {anchor.seq} ({_when(anchor.time)}) was signed with key id "
                f"{anchor.kid}, which is not configured: it cannot be verified")
            continue
        elif not valid:
            add("anchor_invalid", anchor.seq, None,
                f"the anchor of seq {anchor.seq} ({_when(anchor.time)}) has an invalid "
                f"signature (forged or altered)")
            continue
        trusted.setdefault(anchor.seq, {})[anchor.hash] = anchor
        report.last_anchor_seq = max(report.last_anchor_seq or 0, anchor.seq)
    return trusted


def _unmatched_anchors(anchored: Mapping[int, Mapping[str | None, Anchor]], last_seq: int,
                       add: Any, noun: str) -> None:
    """Anchors the walk did not meet: their rows are gone."""
    for seq in sorted(s for s in anchored if s <= last_seq):  # (a gap: also reported removed)
        add("anchor_missing_rows", seq, None,
            f"the {noun} at seq {seq} is gone: an anchor records it with hash "
            f"{next(iter(anchored[seq]))}")
    beyond = [a for s in anchored if s > last_seq for a in anchored[s].values()]
    if beyond:
        latest = max(beyond, key=lambda a: a.seq)
        add("anchor_missing_rows", last_seq + 1, None,
            f"the chain ends at seq {last_seq}, but an anchor signed on {_when(latest.time)} "
            f"records seq {latest.seq} (hash {latest.hash}): {noun}s {last_seq + 1}.."
            f"{latest.seq} are missing, the log was cut or wiped")


async def _explain_link(source: ChainSource, row: ChainRow, prev: ChainRow | None,
                        add: Any, _name: Callable[[ChainRow], str], noun: str) -> None:
    """`row` is in its expected position but not chained to the row before it: find out why."""
    linked = await source.row_by_hash(row.prev_hash) if row.prev_hash else None
    if linked is not None and linked.seq != row.seq - 1:
        where = "later" if linked.seq > row.seq else "earlier"
        add("reordered", row.seq, row.id,
            f"{_name(row)} is out of order: it was written after {noun} {linked.id}, which "
            f"is stored {where} at seq {linked.seq}")
    elif prev is None:
        add("removed", row.seq, row.id,
            f"{_name(row)} starts the chain but is chained to a record with hash "
            f"{row.prev_hash}: the rows before it were removed")
    else:
        # The row before has a hash nobody links to: its content and hash were both rewritten.
        add("changed", prev.seq, prev.id,
            f"{_name(prev)} was changed and its hash recomputed: {_name(row)} is chained to a "
            f"record with hash {row.prev_hash}, not to {prev.hash}")


def label_anchor_options(options: Any) -> Any:
    """The label chain's `anchor` options, from the traces' (see "Labels" above): the same kind
    and cadence, in a sink of its own beside theirs, so that the two chain heads never mix: a
    file or SQLite path with `.labels` appended, a PostgreSQL schema with `_labels` appended.
    Anything but a mapping is returned as it is (None: no anchors; else the Anchorer refuses)."""
    if not isinstance(options, Mapping):
        return options
    from guard.audit.anchor import DEFAULT_ANCHOR_PATH

    opts = dict(options)
    kind = opts.get("kind", "file")
    if kind in ("file", "sqlite"):
        opts["path"] = f"{opts.get('path', DEFAULT_ANCHOR_PATH)}.labels"
    elif kind == "postgres":
        opts["schema"] = f"{opts.get('schema', 'public')}_labels"
    return opts
