"""The audit hash chain's pure parts, shared by the models it chains (traces, labels) and by
every store: the hash that links one row to the one before, and what `verify` reports.

The chain itself, its checkpoints and anchors, and `verify` are guard.audit.chain's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal


def link_hash(prev_hash: str | None, body: bytes) -> str:
    """The chain's hash of one row: sha256(prev_hash + canonical body), as `Trace.seal`."""
    digest = hashlib.sha256()
    digest.update((prev_hash or "").encode())
    digest.update(body)
    return digest.hexdigest()


ProblemKind = Literal[
    "changed", "removed", "reordered",
    "checkpoint",           # a checkpoint's signature is invalid (forged or altered)
    "checkpoint_missing",   # no checkpoint where one is due
    "unknown_key",          # signed under a key id with no key configured: cannot be verified
    "anchor_invalid",       # an anchor's signature is invalid
    "anchor_mismatch",      # the row at an anchored seq has another hash: rewritten or replaced
    "anchor_missing_rows",  # an anchored seq has no row: the log was cut or wiped
    # the transparency log (guard.audit.tlog)
    "signature",            # a row without a valid log signature: appended without the key
    "tree",                 # a leaf does not match the row it logs, or leaves are missing
    "fork",                 # a signed tree head's root differs from the log's: rewritten
    "behind",               # the log is smaller than a signed tree head: cut or wiped
    "head_sink",            # the tree-head sink is missing, empty or behind the database
    "head_invalid",         # a tree head's signature is invalid or its key unknown
]


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
    traces: int = 0  # rows walked: traces, or labels when noun is "label"
    last_seq: int = 0
    checkpoints_valid: int = 0
    checkpoints_unchecked: int = 0
    last_checkpoint_seq: int | None = None
    anchors: int | None = None  # None: no anchors were given to check against
    anchors_unchecked: int = 0  # signatures not checked: no keys configured
    last_anchor_seq: int | None = None
    problems: list[Problem] = field(default_factory=list)
    truncated: bool = False  # stopped collecting after max_problems
    elapsed_s: float = 0.0
    noun: str = "trace"
    labels: VerifyReport | None = None  # the label chain's report (a store that keeps labels)
    log: dict[str, Any] | None = None  # the transparency log's counts (None: no log)
    spooled: list[str] = field(default_factory=list)  # trace ids spooled, not yet in the store
    spool_path: str | None = None
    max_problems: int = 50

    @property
    def ok(self) -> bool:
        return not self.problems and (self.labels is None or self.labels.ok)

    def add(self, kind: ProblemKind, seq: int, row_id: str | None, message: str) -> None:
        if len(self.problems) < self.max_problems:
            self.problems.append(Problem(kind, seq, row_id, message))
        else:
            self.truncated = True

    @property
    def first(self) -> Problem | None:
        return min(self.problems, key=lambda p: p.seq) if self.problems else None

    @property
    def unanchored(self) -> int | None:
        """Rows written after the latest anchor (information, not a failure)."""
        if self.last_anchor_seq is None:
            return None if self.anchors is None else self.last_seq
        return max(0, self.last_seq - self.last_anchor_seq)

    def to_dict(self) -> dict[str, Any]:
        report = {
            "ok": self.ok, f"{self.noun}s": self.traces, "last_seq": self.last_seq,
            "checkpoints_valid": self.checkpoints_valid,
            "checkpoints_unchecked": self.checkpoints_unchecked,
            "last_checkpoint_seq": self.last_checkpoint_seq,
            "anchors": self.anchors, "anchors_unchecked": self.anchors_unchecked,
            "last_anchor_seq": self.last_anchor_seq, "unanchored_rows": self.unanchored,
            "first_problem": self._problem_dict(self.first) if self.first else None,
            "problems": [self._problem_dict(p)
                         for p in sorted(self.problems, key=lambda p: p.seq)],
            "truncated": self.truncated, "elapsed_s": round(self.elapsed_s, 3),
        }
        if self.labels is not None:
            report["label_chain"] = self.labels.to_dict()
        if self.log is not None:
            report["log"] = self.log
        if self.spool_path is not None:
            report["spool"] = {"path": self.spool_path, "traces": self.spooled}
        return report

    def _problem_dict(self, p: Problem) -> dict[str, Any]:
        return {"kind": p.kind, "seq": p.seq, f"{self.noun}_id": p.trace_id,
                "message": p.message}
