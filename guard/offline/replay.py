"""Replay: re-decide stored traces from their recorded scores under a candidate policy.

Judges produce scores and only the policy turns them into decisions, so a change of threshold,
action, rounds or failure handling can be tried on past traffic without generating or judging
anything. The replay walks each trace the way the engine did (prescreen, then rounds per image):

    a step whose inputs were recorded    -> decided again with the candidate's Policy.decide
    a step the candidate would take but the trace never did (one more round, a prompt refined
    differently)                         -> not recorded: the outcome is a set of possibilities

The candidate's prompts follow the engine's rules: a refined prompt already made for that image
is never made again (the next refiner in line is asked, else the image is out of rounds), and
`prescreen: concurrent` replays as `true` (it changes when the prompt is judged, not what); under
a candidate that hedges, a recorded hedge image judged safe serves its slot.

Scores are as recorded: changes to the builtin judge's term lists do not show here (use
`safeedit eval` for those).
"""

from __future__ import annotations

import csv
import io
import itertools
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from guard.core.policy import Decision, Policy
from guard.core.refiner import next_refinement, normalise
from guard.core.types import JudgedImage, RoundRecord, Trace, worst
from guard.plugins import AuditStore, TraceQuery

_JUDGE_FAILED = "judge error"
_ORDER = ("passed", "edited", "refused", "failed")
_SLOT_UNKNOWN = ("edited", "refused")  # a slot that needs an unrecorded round ends one of these


@dataclass(frozen=True, slots=True)
class Replayed:
    """One trace: its recorded decision and what the candidate would have decided."""

    trace_id: str
    created_at: float
    tenant: str | None
    key_id: str | None
    model: str | None
    policy: Mapping[str, Any]
    prompt: str
    old: str
    new: tuple[str, ...]  # one decision when exact; the possibilities when a step was unrecorded
    reason: str
    unknown: str = ""  # when not exact: the step the candidate needs that was never recorded

    @property
    def exact(self) -> bool:
        return len(self.new) == 1

    @property
    def changed(self) -> str:
        """'yes', 'no' or 'not known' (the recorded decision is one of the possibilities: a
        step the candidate needs was never recorded)."""
        if self.old not in self.new:
            return "yes"
        return "no" if self.exact else "not known"

    @property
    def new_text(self) -> str:
        """The new decision, or the possible ones: "edited or refused"."""
        return " or ".join(self.new)

    @property
    def outcome(self) -> str:
        """The new decision in words, saying why when it cannot be known."""
        if self.exact:
            return self.new[0]
        return f"not known, {self.new_text}: {self.unknown}"


@dataclass
class ReplayReport:
    candidate: Mapping[str, Any]
    rows: list[Replayed] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    truncated: bool = False
    policy_id: str | None = None  # the recorded policy replayed (None: any)
    # When no trace matched the policy id: the ids the store's matching traces ran under.
    others: Counter[str] = field(default_factory=Counter)

    @property
    def changed(self) -> list[Replayed]:
        return [r for r in self.rows if r.changed != "no"]

    def transitions(self) -> Counter[str]:
        return Counter(f"{r.old} -> {r.outcome}" for r in self.changed)


class NotReplayable(Exception):
    """The trace never reached the guard (bad key, bad request, guard off)."""


# --- one trace --------------------------------------------------------------------------------

def redecide(trace: Trace, policy: Policy) -> Replayed:
    """What `policy` would have decided for this trace, from the trace's recorded scores."""
    if not trace.guard_enabled:
        raise NotReplayable("guard was off")
    if not trace.policy or not trace.rounds:
        raise NotReplayable(f"not judged ({trace.error.code if trace.error else trace.status})")
    return _Walk(trace, policy).run()


class _Refused(Exception):
    pass


class _Failed(Exception):
    pass


class _Walk:
    def __init__(self, trace: Trace, policy: Policy) -> None:
        self.trace, self.policy = trace, policy
        self.original = str(trace.request.get("prompt", ""))
        self.n = int(trace.request.get("n") or 1)
        self.reasons: list[str] = []
        self.unknown = ""  # the first step the candidate needs that the trace never took
        self.rounds = _by_round(trace.rounds)

    def run(self) -> Replayed:
        try:
            outcomes = self._slots()
            new = tuple(sorted({worst(list(c)) for c in itertools.product(*outcomes.values())},
                               key=_ORDER.index))
        except _Refused:
            new = ("refused",)
        except _Failed:
            new = ("failed",)
        t = self.trace
        if not self.reasons and t.decision not in new:
            self.reasons.append("decided differently")
        return Replayed(t.id, t.created_at, t.tenant, t.key_id, t.model, dict(t.policy),
                        self.original, t.decision, new, "; ".join(self.reasons),
                        "" if len(new) == 1 else self.unknown)

    def _not_recorded(self, why: str) -> None:
        self.reasons.append(why)
        self.unknown = self.unknown or why

    def _slots(self) -> dict[int, tuple[str, ...]]:
        policy = self.policy
        first = self.original
        hedged = False  # the candidate would make the refined prompt beside the original
        if policy.prescreen:
            screened = self.rounds.get(0)
            if screened is None:
                self._not_recorded("the candidate prescreens the prompt, which was not "
                                   "prescreened when recorded: its verdict is not known")
                return {s: _ORDER[:3] for s in range(self.n)}
            if _judge_failed(screened):
                self._judge_failed("prescreen")
            else:
                prompt_seen = screened.images[0]
                decision = self._decide("prescreen", prompt_seen)
                if decision.action == "refuse":
                    raise _Refused
                if decision.action == "edit":
                    first = self._refined(prompt_seen, self.original, decision)
                hedged = decision.action == "pass" and policy.in_hedge_band(prompt_seen.scores)
        hedges = {i.slot: i for r in self.trace.rounds if r.hedge and r.cancelled is None
                  for i in r.images} if hedged else {}
        if hedged and not hedges:
            self.reasons.append("the candidate hedges the prompt; no hedge was made when "
                                "recorded")

        prompts = dict.fromkeys(range(self.n), first)
        tried: dict[int, set[str]] = {s: set() for s in range(self.n)}
        outcome: dict[int, tuple[str, ...]] = {}
        pending = list(range(self.n))
        for k in range(1, policy.rounds.max + 1):
            record = self.rounds.get(k)
            if record is not None and _judge_failed(record):
                self._judge_failed(f"round {k}")
                for slot in pending:
                    outcome[slot] = (self._made(prompts[slot]),)
                return outcome
            if record is not None and not record.images and record.error:
                self.reasons.append(f"round {k}: the backend failed when recorded")
                raise _Failed
            seen_by_slot = {i.slot: i for i in record.images} if record else {}
            still: list[int] = []
            for slot in pending:
                seen = seen_by_slot.get(slot)
                if k == 1 and self._served_by_hedge(slot, seen, prompts[slot], hedges):
                    outcome[slot] = ("edited",)
                    continue
                if seen is None or seen.prompt != prompts[slot]:
                    made = ("was never generated" if seen is None else
                            f"was generated from {_cut(seen.prompt, 60)!r}")
                    self._not_recorded(
                        f"image {slot} of round {k} would be generated from "
                        f"{_cut(prompts[slot], 60)!r}; when recorded it {made}, so its "
                        "verdict is not known")
                    outcome[slot] = _SLOT_UNKNOWN if k > 1 or first != self.original \
                        else _ORDER[:3]
                    continue
                decision = self._decide(f"round {k} image {slot}", seen)
                tried[slot].add(normalise(prompts[slot]))
                if decision.action == "pass":
                    outcome[slot] = (self._made(prompts[slot]),)
                elif decision.action == "refuse":
                    raise _Refused
                elif k < policy.rounds.max:
                    found = next_refinement(prompts[slot], seen.refined_prompt,
                                            decision.flagged, policy, tried[slot])
                    if found is None and seen.action == decision.action:
                        self._stuck(slot, k, outcome)  # the judge's suggestion was recorded
                        continue
                    # Else what the judge would have suggested is unknown: the next round
                    # was never made, and says so.
                    prompts[slot] = found[0] if found is not None else prompts[slot]
                    still.append(slot)
                else:
                    still.append(slot)
            pending = still
            if not pending:
                return outcome
        if policy.rounds.on_exhausted == "refuse" or (len(pending) == self.n):
            self.reasons.append(f"still unsafe after {policy.rounds.max} round(s)")
            raise _Refused
        for slot in pending:
            outcome[slot] = ("refused",)  # dropped
        return outcome

    def _decide(self, where: str, seen: JudgedImage) -> Decision:
        decision = self.policy.decide(seen.scores)
        if decision.action != seen.action and not self.reasons:
            self.reasons.append(f"{where}: {self._why(decision, seen)}")
        return decision

    def _why(self, decision: Decision, seen: JudgedImage) -> str:
        cats = self.policy.categories
        if decision.flagged:
            crossed = ", ".join(f"{c} {_num(seen.scores.get(c, 0.0))} >= "
                                f"{_num(cats[c].threshold)}" for c in decision.flagged)
            return f"{crossed} -> {decision.action} (was {seen.action})"
        below = ", ".join(f"{c} {_num(seen.scores.get(c, 0.0))} < "
                          + (_num(cats[c].threshold) if c in cats else "(no category)")
                          for c in seen.flagged)
        return f"{below or 'nothing crosses'} -> pass (was {seen.action})"

    def _judge_failed(self, where: str) -> None:
        if self.policy.on_judge_error == "refuse":
            self.reasons.append(f"{where}: the judge failed and the candidate fails closed")
            raise _Failed
        if self.trace.error is not None and self.trace.error.code == "judge_unavailable":
            self.reasons.append(f"{where}: the judge failed and the candidate allows it")

    def _refined(self, seen: JudgedImage, prompt: str, decision: Decision) -> str:
        found = next_refinement(prompt, seen.refined_prompt, decision.flagged, self.policy, ())
        if found is None:  # nothing benign left to make: the engine refuses, whatever on_exhausted
            self.reasons.append("prescreen: nothing benign is left to make")
            raise _Refused
        return found[0]

    def _served_by_hedge(self, slot: int, seen: JudgedImage | None, prompt: str,
                         hedges: Mapping[int, JudgedImage]) -> bool:
        """Round 1 of a hedged slot: its own image unless that one is unsafe (or was never
        judged, the hedge's having come first), else its hedge's image, if safe."""
        hedge = hedges.get(slot)
        if hedge is None:
            return False
        own_safe = (seen is not None and seen.prompt == prompt
                    and self.policy.decide(seen.scores).action == "pass")
        return not own_safe and self._decide(f"image {slot}'s hedge", hedge).action == "pass"

    def _stuck(self, slot: int, k: int, outcome: dict[int, tuple[str, ...]]) -> None:
        """Nothing new left to try for `slot` after round `k`: as `on_exhausted` says."""
        self.reasons.append(f"image {slot}: nothing new to try after round {k}")
        if self.policy.rounds.on_exhausted == "refuse":
            raise _Refused
        outcome[slot] = ("refused",)

    def _made(self, prompt: str) -> str:
        return "passed" if prompt == self.original else "edited"



def _by_round(records: Sequence[RoundRecord]) -> dict[int, RoundRecord]:
    """One record per round index. Slots go their own way, so a round may have several calls
    (records); a cancelled call made no image that counts."""
    out: dict[int, RoundRecord] = {}
    for record in records:
        if record.cancelled is not None or record.hedge:  # hedges are read beside round 1
            continue
        merged = out.get(record.index)
        out[record.index] = record if merged is None else merged.model_copy(update={
            "images": [*merged.images, *record.images], "error": merged.error or record.error})
    return out


def _judge_failed(record: RoundRecord) -> bool:
    return bool(record.error and record.error.startswith(_JUDGE_FAILED))


# --- many traces --------------------------------------------------------------------------------

async def stored_traces(store: AuditStore, query: TraceQuery, limit: int
                        ) -> AsyncIterator[Trace]:
    """Traces matching `query`, newest first, through the AuditStore protocol's pages."""
    cursor: str | None = None
    count = 0
    while count < limit:
        page = await store.query(replace(query, cursor=cursor, limit=min(500, limit - count)))
        for item in page.items:
            trace = await store.get(item["id"])
            if trace is not None:
                count += 1
                yield trace
        cursor = page.next_cursor
        if cursor is None:
            return


async def replay(store: AuditStore, candidate: Policy, query: TraceQuery,
                 limit: int = 10_000) -> ReplayReport:
    report = ReplayReport(candidate=candidate.ref, policy_id=query.policy_id)
    async for trace in stored_traces(store, query, limit + 1):
        if len(report.rows) + sum(report.skipped.values()) >= limit:
            report.truncated = True
            break
        try:
            report.rows.append(redecide(trace, candidate))
        except NotReplayable as exc:
            report.skipped[str(exc)] += 1
    report.rows.sort(key=lambda r: r.created_at)
    if not report.rows and not report.skipped and query.policy_id is not None:
        page = await store.query(replace(query, policy_id=None, limit=500))
        report.others = Counter(str((item.get("policy") or {}).get("id"))
                                for item in page.items)
    return report


# --- output ---------------------------------------------------------------------------------------

CSV_COLUMNS = ["trace_id", "created_at", "tenant", "key_id", "model", "policy_id",
               "policy_version", "policy_sha256", "old_decision", "new_decision", "exact",
               "changed", "reason", "prompt"]


def to_csv(rows: Sequence[Replayed]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        writer.writerow([r.trace_id, _iso(r.created_at), r.tenant or "", r.key_id or "",
                         r.model or "", r.policy.get("id", ""), r.policy.get("version", ""),
                         r.policy.get("sha256", ""), r.old, r.new_text,
                         "yes" if r.exact else "no", r.changed, r.reason, r.prompt])
    return out.getvalue()


def render(report: ReplayReport, *, everything: bool = False, width: int = 48) -> str:
    c = report.candidate
    lines = [f"Replay under {c['id']} v{c['version']} (sha256 {str(c['sha256'])[:12]}): "
             f"{len(report.rows)} trace(s) re-decided, "
             f"{sum(r.changed == 'yes' for r in report.rows)} would change"
             + (f", {might} might (a step they need was never recorded)"
                if (might := sum(r.changed == "not known" for r in report.rows)) else "")
             + "."]
    for transition, count in sorted(report.transitions().items()):
        lines.append(f"  {count:>5}  {transition}")
    for reason, count in sorted(report.skipped.items()):
        lines.append(f"  {count:>5}  skipped: {reason}")
    if report.others:
        seen = ", ".join(f"{pid} ({n})" for pid, n in report.others.most_common(5))
        lines.append(f"  No stored trace ran under policy id {report.policy_id!r}; the same "
                     f"period has traces of {seen}{' ...' if len(report.others) > 5 else ''}. "
                     "To replay those under this candidate, name the recorded id with --policy "
                     "ID, or take every trace with --any-policy.")
    if report.truncated:
        lines.append("  (stopped at --limit; narrow with --since or --policy)")
    rows = report.rows if everything else report.changed
    if rows:
        header = ("trace", "time (UTC)", "tenant", "policy", "was", "now", "changed", "why",
                  "prompt")
        table = [header, *([r.trace_id, _iso(r.created_at)[:19], r.tenant or "-",
                            f"{r.policy.get('id')} v{r.policy.get('version')}", r.old,
                            r.new_text if r.exact else f"not known ({r.new_text})", r.changed,
                            r.reason, _cut(r.prompt, width)]
                           for r in rows)]
        widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
        lines.append("")
        for row in table:
            lines.append("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True))
                         .rstrip())
    return "\n".join(lines) + "\n"


def _num(value: float) -> str:
    """A score or threshold exactly as recorded (the shortest text that reads back as the same
    float): rounding could print 0.99 < 0.99 for 0.989 under 0.99."""
    return repr(float(value))


def _iso(ts: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _cut(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
