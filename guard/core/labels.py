"""Labels: what auditors say about the guard's decisions, kept beside the traces, never in them.

An auditor (or admin) labels one judged item of a trace: an image of a round (`slot`, `round`)
or the prompt (`slot` None, the prescreen round), with a verdict:
    correct          the guard decided right
    false_positive   flagged, but fine (`category`: the category wrongly flagged, optional)
    missed           passed, but unsafe (`category`: required, one of the trace's policy's)
and a free-text note. Labels are append-only records with the auditor's key id and time, in a
hash chain of their own in the audit store (guard.audit.chain, "Labels"), verified like traces.
A later label of the same item supersedes the earlier one in every view (`latest_only`); both
are kept, and `latest_only=False` lists the history.

This module is the model and the checks of a new label against its trace and policy. A store
that keeps labels implements guard.plugins.LabelStore (both built-in stores do; their SQL is
guard.audit.labels'). The review queue (`LabelStore.review_queue`) lists the traces nobody
labelled yet: refused, then edited, then a sample of the passed ones, so that misses can be
found. The sample is deterministic per trace id (guard.audit.labels.sample_point), so the queue
is the same from one page load to the next.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import orjson
from pydantic import BaseModel, ConfigDict, Field

from guard.core.auth import Principal
from guard.core.hashchain import link_hash
from guard.core.types import Trace
from guard.support.errors import RequestError

LabelVerdict = Literal["correct", "false_positive", "missed"]
VERDICTS: tuple[str, ...] = get_args(LabelVerdict)
MAX_NOTE = 4000
_MAX_INDEX = 2**31 - 1  # slots and rounds: what both databases' integer holds


class Label(BaseModel):
    """One auditor's label of one judged item; chained like a trace (`prev_hash`, `hash`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(default_factory=lambda: "lb_" + uuid.uuid4().hex)
    trace_id: str
    slot: int | None = Field(None, description="The image slot; null: the prompt (prescreen).")
    round: int = Field(description="The round the item was judged in (0: the prescreen).")
    verdict: LabelVerdict
    category: str | None = None
    note: str = Field("", max_length=MAX_NOTE)
    key_id: str
    tenant: str | None = None  # the trace's tenant
    created_at: float = Field(default_factory=time.time)
    prev_hash: str | None = None
    hash: str | None = None

    @property
    def item(self) -> tuple[str, int | None, int]:
        return self.trace_id, self.slot, self.round

    def canonical_bytes(self) -> bytes:
        """The label's content as hashed for its chain (everything but the hashes)."""
        body = self.model_dump(mode="json", exclude={"prev_hash", "hash"})
        return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)

    def sealed(self, prev_hash: str | None, body: bytes | None = None) -> Label:
        """This label chained after `prev_hash` (`body`: its canonical bytes, when at hand)."""
        body = self.canonical_bytes() if body is None else body
        return self.model_copy(update={"prev_hash": prev_hash,
                                       "hash": link_hash(prev_hash, body)})


@dataclass(frozen=True, slots=True)
class LabelPage:
    items: list[Label]  # newest first
    next_cursor: str | None
    superseded: frozenset[str] = frozenset()  # ids of the items a later label replaced


@dataclass(frozen=True, slots=True)
class QueueQuery:
    tenant: str | None = None
    category: str | None = None
    policy_id: str | None = None
    policy_version: int | None = None
    decision: str | None = None
    key_id: str | None = None
    model: str | None = None
    endpoint: str | None = None
    q: str | None = None  # words of the request's prompt, as TraceQuery.q
    sample: float = 0.1  # the share of passed traces in the queue, in [0, 1]
    limit: int = 50


@dataclass(frozen=True, slots=True)
class QueuePage:
    items: list[dict[str, Any]]  # trace summaries: refused, then edited, then passed; newest first
    left: dict[str, int] = field(default_factory=dict)  # what is left, per decision

    @property
    def total(self) -> int:
        return sum(self.left.values())


# --- a new label, checked against its trace ----------------------------------------------------

def judged_items(trace: Trace) -> dict[tuple[int | None, int], str]:
    """The items of `trace` a label may name, (slot, round) -> the prompt judged; slot None is
    the prompt, judged in the prescreen round."""
    items: dict[tuple[int | None, int], str] = {}
    for rnd in trace.rounds:
        for judged in rnd.images:
            items[(None if rnd.kind == "prescreen" else judged.slot, rnd.index)] = judged.prompt
    return items


def bind_label(label: Label, trace: Trace) -> Label:
    """`label` for an item judged in `trace`, with the trace's tenant; a RequestError naming
    `slot` or `round` when the trace has no such item."""
    items = judged_items(trace)
    if (label.slot, label.round) not in items:
        rounds = sorted(r for s, r in items if s == label.slot)
        what = "the prompt" if label.slot is None else f"image slot {label.slot}"
        if not rounds:
            raise RequestError(f"Trace {trace.id} has no judged {what}.", param="slot")
        raise RequestError(f"In trace {trace.id}, {what} was not judged in round {label.round}"
                           f" (it was in round {', '.join(map(str, rounds))}).", param="round")
    return label.model_copy(update={"trace_id": trace.id, "tenant": trace.tenant})


def trace_categories(trace: Trace, policies: Any) -> list[str]:
    """The categories a label of `trace` may name: its policy's (when loaded here, by id) and
    every category a judge scored in it."""
    names = {name for rnd in trace.rounds for j in rnd.images for name in j.scores}
    pid = trace.policy.get("id")
    if pid and pid in policies:
        names |= set(policies[pid].categories)
    return sorted(names)


_FIELDS = frozenset({"slot", "round", "verdict", "category", "note"})


def new_label(values: Mapping[str, Any], trace: Trace, principal: Principal,
              categories: Sequence[str]) -> Label:
    """A label of `trace` by `principal` from request `values` (JSON types, or a form's
    strings), every bad field a RequestError naming it. The item is checked by `bind_label`."""
    for name in values:
        if name not in _FIELDS:
            raise RequestError(f"Unknown field '{name}'.", param=name)
    verdict = values.get("verdict")
    if verdict not in VERDICTS:
        raise RequestError(f"Invalid 'verdict': one of {', '.join(VERDICTS)}.", param="verdict")
    category = values.get("category")
    if category in (None, ""):
        category = None
        if verdict == "missed":
            raise RequestError("A 'missed' label needs the 'category' that was missed.",
                               param="category")
    elif not isinstance(category, str) or category not in categories:
        raise RequestError(f"Invalid 'category': not a category of policy "
                           f"{trace.policy.get('id')!r} ({', '.join(categories)}).",
                           param="category")
    note = values.get("note") or ""
    if not isinstance(note, str) or len(note) > MAX_NOTE:
        raise RequestError(f"Invalid 'note': text of at most {MAX_NOTE} characters.",
                           param="note")
    slot = _index(values.get("slot"), "slot", optional=True)
    label = Label(trace_id=trace.id, slot=slot, round=_index(values.get("round"), "round"),
                  verdict=verdict, category=category, note=note, key_id=principal.key_id,
                  tenant=trace.tenant)
    return bind_label(label, trace)


def _index(value: Any, name: str, optional: bool = False) -> Any:
    if isinstance(value, str):  # a form's field
        value = value.strip()
        value = int(value) if value.isascii() and value.isdigit() and len(value) < 12 else \
            (None if value == "" else value)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_INDEX:
        raise RequestError(f"Invalid '{name}': a whole number from 0"
                           + (" (or null for the prompt)." if optional else "."), param=name)
    return value
