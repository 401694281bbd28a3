"""Tamper evidence for the audit log: the hash chain, signed checkpoints, and `verify`.

The chain
    Rows are numbered by `seq` = 1, 2, 3... without gaps, one chain per store. Each row keeps the
    trace's canonical JSON (`Trace.canonical_bytes`), the previous row's hash, and
    `hash = sha256(prev_hash + canonical JSON)` (`Trace.seal`). A chain-head row holds the last
    seq and hash; every writer appends under a lock on it, so concurrent writers never fork.
    Changing a row breaks its own hash; removing one leaves a gap in seq; reordering two puts a
    row after one it was not chained to; cutting the tail leaves the chain head pointing past it.

Signed checkpoints
    The chain alone does not stop someone with write access from rewriting a row and every row
    after it. So every `checkpoint_every` traces (audit option, default 1000) the store writes, in
    the same transaction as that trace, a checkpoint: HMAC-SHA256 over (seq, trace id, hash) with
    a key only the operators hold, read from the environment variable named by the audit option
    `checkpoint_key_env` (at least 16 bytes). A valid signature at seq c pins every row up to c,
    since each hash covers all before it. Not covered: rows after the last checkpoint, if the
    chain head is rewritten with them, and key rotation (checkpoints signed with an older key
    are reported as such).

`verify(store, signer)` walks the chain once, in batches (memory stays flat), and reports every
problem it finds, resynchronising after each; `report.first` is the earliest one.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import orjson

from guard.errors import ConfigError

MIN_KEY_BYTES = 16
DEFAULT_CHECKPOINT_EVERY = 1000


def link_hash(prev_hash: str | None, body: bytes) -> str:
    """The chain's hash of one row; the same computation as `Trace.seal`."""
    digest = hashlib.sha256()
    digest.update((prev_hash or "").encode())
    digest.update(body)
    return digest.hexdigest()


def index_columns(trace: Mapping[str, Any]) -> dict[str, Any]:
    """The queryable copies of a trace's fields that a store keeps beside its body. `verify`
    checks them against the hashed body, so that editing a column alone is caught too."""
    policy = trace.get("policy") or {}
    return {
        "id": trace["id"], "created_at": trace["created_at"], "tenant": trace.get("tenant"),
        "key_id": trace.get("key_id"), "decision": trace["decision"], "status": trace["status"],
        "categories": list(trace.get("categories") or ()), "policy_id": policy.get("id"),
        "policy_version": policy.get("version"), "model": trace.get("model"),
    }


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


@dataclass(frozen=True, slots=True)
class Checkpoint:
    seq: int
    trace_id: str
    hash: str
    created_at: float
    key_fingerprint: str
    signature: str


class Signer:
    """HMAC-SHA256 signatures for checkpoints."""

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ConfigError(f"the audit checkpoint key must be at least {MIN_KEY_BYTES} bytes")
        self._key = key
        self.fingerprint = hashlib.sha256(b"safeedit-checkpoint-key\0" + key).hexdigest()[:16]

    @classmethod
    def from_env(cls, env_name: str | None) -> Signer | None:
        """The signer for the key in `env_name`; None when no variable is named. A named but
        unset variable is a config error: checkpoints would silently stop otherwise."""
        if not env_name:
            return None
        value = os.environ.get(env_name)
        if not value:
            raise ConfigError(f"audit: checkpoint_key_env names {env_name}, which is not set")
        return cls(value.encode())

    @staticmethod
    def _message(seq: int, trace_id: str, hash_: str) -> bytes:
        return f"safeedit-checkpoint-v1\n{seq}\n{trace_id}\n{hash_}".encode()

    def sign(self, seq: int, trace_id: str, hash_: str) -> Checkpoint:
        sig = hmac.new(self._key, self._message(seq, trace_id, hash_), hashlib.sha256).hexdigest()
        return Checkpoint(seq, trace_id, hash_, time.time(), self.fingerprint, sig)

    def valid(self, cp: Checkpoint) -> bool:
        expected = hmac.new(self._key, self._message(cp.seq, cp.trace_id, cp.hash),
                            hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, cp.signature)


class ChainSource(Protocol):
    """What `verify` and `export` read; both audit stores implement it."""

    def chain_rows(self, *, since: float | None = None, until: float | None = None,
                   tenant: str | None = None) -> AsyncIterator[ChainRow]: ...

    async def checkpoints(self) -> list[Checkpoint]: ...

    async def chain_head(self) -> tuple[int, str | None]: ...

    async def row_by_hash(self, hash_: str) -> ChainRow | None: ...


ProblemKind = Literal["changed", "removed", "reordered", "checkpoint"]


@dataclass(frozen=True, slots=True)
class Problem:
    kind: ProblemKind
    seq: int
    trace_id: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


@dataclass
class VerifyReport:
    traces: int = 0
    last_seq: int = 0
    checkpoints_valid: int = 0
    checkpoints_unchecked: int = 0
    last_checkpoint_seq: int | None = None
    problems: list[Problem] = field(default_factory=list)
    truncated: bool = False  # stopped collecting after max_problems
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first(self) -> Problem | None:
        return min(self.problems, key=lambda p: p.seq) if self.problems else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "traces": self.traces, "last_seq": self.last_seq,
            "checkpoints_valid": self.checkpoints_valid,
            "checkpoints_unchecked": self.checkpoints_unchecked,
            "last_checkpoint_seq": self.last_checkpoint_seq,
            "first_problem": _problem_dict(self.first) if self.first else None,
            "problems": [_problem_dict(p) for p in sorted(self.problems, key=lambda p: p.seq)],
            "truncated": self.truncated, "elapsed_s": round(self.elapsed_s, 3),
        }


def _problem_dict(p: Problem) -> dict[str, Any]:
    return {"kind": p.kind, "seq": p.seq, "trace_id": p.trace_id, "message": p.message}


def _name(row: ChainRow) -> str:
    return f"trace {row.id} (seq {row.seq})"


def _column_mismatch(row: ChainRow) -> str | None:
    try:
        stored = index_columns(orjson.loads(row.body))
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        return f"its record is not a readable trace ({type(exc).__name__})"
    for name, value in stored.items():
        if row.columns.get(name) != value:
            return (f"its indexed column {name}={row.columns.get(name)!r} differs from the "
                    f"hashed record ({value!r})")
    return None


async def verify(source: ChainSource, signer: Signer | None, *,
                 checkpoint_every: int | None = DEFAULT_CHECKPOINT_EVERY,
                 max_problems: int = 50) -> VerifyReport:
    """Walk the whole chain and report what was changed, removed or reordered."""
    started = time.perf_counter()
    report = VerifyReport()
    # Checkpoints and head first: rows written while we walk only extend what they cover.
    checkpoints = {cp.seq: cp for cp in await source.checkpoints()}
    head_seq, head_hash = await source.chain_head()
    first_cp = min(checkpoints, default=None)
    last_cp_ok = 0

    def add(kind: ProblemKind, seq: int, trace_id: str | None, message: str) -> None:
        if len(report.problems) < max_problems:
            report.problems.append(Problem(kind, seq, trace_id, message))
        else:
            report.truncated = True

    prev: ChainRow | None = None
    async for row in source.chain_rows():
        report.traces += 1
        intact = link_hash(row.prev_hash, row.body) == row.hash
        if not intact:
            add("changed", row.seq, row.id,
                f"{_name(row)} was changed: its content no longer matches its stored hash")
        elif (mismatch := _column_mismatch(row)) is not None:
            add("changed", row.seq, row.id, f"{_name(row)} was changed: {mismatch}")

        expected_seq = prev.seq + 1 if prev else 1
        expected_prev = prev.hash if prev else None
        if row.seq != expected_seq:
            missing = row.seq - expected_seq
            if missing > 0:
                what = (f"the trace at seq {expected_seq} was" if missing == 1 else
                        f"the {missing} traces at seq {expected_seq}..{row.seq - 1} were")
                where = f"after {_name(prev)}" if prev else "at the start of the chain"
                add("removed", expected_seq, None,
                    f"{what} removed: {where}, {_name(row)} is chained to a missing record "
                    f"with hash {row.prev_hash}")
            else:
                add("reordered", row.seq, row.id, f"{_name(row)} repeats a position in the chain")
        elif row.prev_hash != expected_prev and intact:
            # (a row whose own hash fails was changed itself, its prev_hash maybe with it)
            await _explain_link(source, row, prev, add)

        cp = checkpoints.get(row.seq)
        if cp is not None:
            if signer is None:
                report.checkpoints_unchecked += 1
            elif cp.key_fingerprint != signer.fingerprint:
                add("checkpoint", row.seq, row.id,
                    f"the checkpoint at {_name(row)} was signed with another key "
                    f"(fingerprint {cp.key_fingerprint}, ours {signer.fingerprint})")
            elif not signer.valid(cp):
                add("checkpoint", row.seq, row.id,
                    f"the checkpoint at {_name(row)} has an invalid signature (forged or altered)")
            elif cp.hash != row.hash or cp.trace_id != row.id:
                add("changed", last_cp_ok + 1, row.id,
                    f"the chain was rewritten between seq {last_cp_ok + 1} and {row.seq}: the "
                    f"signed checkpoint at seq {row.seq} names trace {cp.trace_id} with hash "
                    f"{cp.hash}, the store has {row.id} with hash {row.hash}")
            else:
                report.checkpoints_valid += 1
                report.last_checkpoint_seq = row.seq
                last_cp_ok = row.seq
        elif (signer is not None and checkpoint_every and first_cp is not None
              and row.seq > first_cp and row.seq % checkpoint_every == 0):
            add("checkpoint", row.seq, row.id, f"the signed checkpoint at {_name(row)} is missing")
        if row.seq == head_seq and row.hash != head_hash:
            add("changed", row.seq, row.id,
                f"{_name(row)} does not match the chain head (hash {head_hash}): the last "
                f"trace was replaced")
        prev = row

    report.last_seq = prev.seq if prev else 0
    if head_seq > report.last_seq:
        add("removed", report.last_seq + 1, None,
            f"{head_seq - report.last_seq} trace(s) removed at the end of the chain (seq "
            f"{report.last_seq + 1}..{head_seq}; the last had hash {head_hash})")
    for seq in sorted(s for s in checkpoints if s > report.last_seq):
        add("removed", seq, checkpoints[seq].trace_id,
            f"trace {checkpoints[seq].trace_id} (seq {seq}) is gone: a signed checkpoint names "
            f"it but the chain ends at seq {report.last_seq}")
    report.elapsed_s = time.perf_counter() - started
    return report


async def _explain_link(source: ChainSource, row: ChainRow, prev: ChainRow | None,
                        add: Any) -> None:
    """`row` is in its expected position but not chained to the row before it: find out why."""
    linked = await source.row_by_hash(row.prev_hash) if row.prev_hash else None
    if linked is not None and linked.seq != row.seq - 1:
        where = "later" if linked.seq > row.seq else "earlier"
        add("reordered", row.seq, row.id,
            f"{_name(row)} is out of order: it was written after trace {linked.id}, which is "
            f"stored {where} at seq {linked.seq}")
    elif prev is None:
        add("removed", row.seq, row.id,
            f"{_name(row)} starts the chain but is chained to a record with hash "
            f"{row.prev_hash}: the traces before it were removed")
    else:
        # The row before has a hash nobody links to: its content and hash were both rewritten.
        add("changed", prev.seq, prev.id,
            f"{_name(prev)} was changed and its hash recomputed: {_name(row)} is chained to a "
            f"record with hash {row.prev_hash}, not to {prev.hash}")
