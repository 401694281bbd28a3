"""Composite judges: several judges behind the one `Judge` interface.

    judge:                                 judge:
      kind: ensemble                         kind: cascade
      members: [{kind: builtin}, {...}]      stages: [{kind: builtin}, {kind: vlm, ...}]
      refiner: {kind: builtin}               escalate: {low: 0.2, high: 0.8}
      choose: {sexual: 1}
      on_member_error: fail

`ensemble`: every member judges the same items concurrently, and the verdict combines them by
coverage: per category, the highest score of the members that assessed it (Verdict.coverage), or
the score of the member `choose` names for that category (a member index, or its judge id when no
other member has it; when that member was skipped or did not assess the category, the highest of
the others). The verdict's `assessed_on` is the union of the members': only a category no member
assessed is unassessed, and the policy's `unassessed` decides what that means. Where
`policy.wants_explanation` says so for the combined scores, the refiner (a judge section; default
the builtin rule refiner, without NudeNet) writes the thought and the refined prompt: a
`guard.judges.Refiner` is handed the combined scores, any other judge sees them as the last entry
of the item's history (a model judge used this way wants `explain: always`). `on_member_error`:
`fail` (default: a failing member fails the verdict, fail closed) or `skip` (judge with the
others, record the error; all failing still fails). `details.members` lists each member's judge
id, scores, what it assessed, time and error.

`cascade`: the first stage judges every item; an item moves on to the next stage while it is
uncertain, i.e. while some policy category's score s lies in the band `low <= s < high` (a score
under `low` is surely safe, one at or over `high` surely unsafe; a category the stage did not
score counts as 0). An item is handed on too while the stage did not assess some policy
category on the item's own input (the image, or a prompt alone: the builtin judge's image check
sees nudity only, a hosted service may not apply a category to images), so a low score there is
never read as safe. An item a stage flags (`policy.wants_explanation`) without a refined prompt
is handed on as well, so that a later stage that can refine writes it; the verdict is then the
later stage's, scores included, as it saw more (when no later stage refines, the engine's rule
refiner does). The last stage decides whatever it says, combined by coverage with the stages
before it: for a category it did not assess on some input an earlier stage did, the higher of
its score and that stage's; `assessed_on` is the union along the way. `details.stage` names the
deciding stage (index and judge id); `details.stages` lists each stage the item went through
with its scores, what it assessed, its time (the stage's call for the batch) and why it handed
the item on.

Lifecycle: `start()` starts every Startable member, stage and refiner concurrently; `ready()` is
true when all of them are ready (a cascade needs its last stage for any uncertain item, an
ensemble every member for every item); `aclose()` closes all of them, even when one fails.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from guard.core.policy import Policy
from guard.core.types import INPUTS, HistoryEntry, JudgeInput, Verdict
from guard.judges.coverage import declared
from guard.plugins import Explanation, Judge, Refiner, build_judge
from guard.support.errors import ConfigError, GuardError, JudgeError
from guard.support.lifecycle import Startable, close_all

Section = dict[str, Any]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Band(_Strict):
    low: float = Field(0.2, ge=0.0, le=1.0, description="Scores under this are surely safe.")
    high: float = Field(0.8, ge=0.0, le=1.0,
                        description="Scores at or over this are surely unsafe.")


class EnsembleOptions(_Strict):
    members: list[Section] = Field(description="Judge sections, each `{kind: ..., ...}`.")
    refiner: Section | None = Field(
        None, description="Judge section writing thought and refined prompt (default builtin).")
    choose: dict[str, int | str] = Field(
        default_factory=dict, description="Per category, the member (index or id) to trust.")
    on_member_error: Literal["fail", "skip"] = "fail"
    id: str | None = None


class CascadeOptions(_Strict):
    stages: list[Section] = Field(description="Judge sections, cheapest first.")
    escalate: Band = Field(default_factory=Band)
    id: str | None = None


def _build(where: str, section: Mapping[str, Any]) -> Judge:
    try:
        return build_judge(section)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc.message}") from exc


def _validate(model: type[_Strict], what: str, options: Mapping[str, Any]) -> Any:
    try:
        return model.model_validate(dict(options))
    except ValidationError as exc:
        raise ConfigError.from_validation(what, exc) from exc


def _reason(exc: BaseException) -> str:
    """What a failure says in a trace: the guard's own message (and its redacted detail), never a
    foreign exception's text, which may echo a request."""
    if isinstance(exc, GuardError):
        return f"{exc.message} ({exc.detail})" if exc.detail else exc.message
    return type(exc).__name__


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000.0, 3)


def _rounded(scores: Mapping[str, float]) -> dict[str, float]:
    return {c: round(float(s), 6) for c, s in scores.items()}


Covered = dict[str, set[str]]  # category -> the inputs it was assessed on


def _covered(verdict: Verdict, policy: Policy, item: JudgeInput) -> Covered:
    cov = verdict.coverage(policy.categories, image=item.image is not None)
    return {c: set(inputs) for c, inputs in cov.items() if inputs}


def _listed(on: Covered) -> dict[str, list[str]]:
    return {c: [i for i in INPUTS if i in inputs] for c, inputs in on.items()}


@dataclass(slots=True)
class _Run:
    """One judge's call on a batch: its verdicts, or why it failed, and how long it took."""

    verdicts: list[Verdict] | None
    ms: float
    error: BaseException | None = None


async def _run(judge: Judge, items: Sequence[JudgeInput], policy: Policy) -> _Run:
    started = time.perf_counter()
    try:
        verdicts = list(await judge.judge(items, policy))
        if len(verdicts) != len(items):
            raise JudgeError(f"{len(verdicts)} verdicts for {len(items)} items")
    except Exception as exc:  # noqa: BLE001 - recorded, then failed or skipped by the caller
        return _Run(None, _ms(started), exc)
    return _Run(verdicts, _ms(started))


class _Parts:
    """Lifecycle of the judges a composite holds."""

    parts: list[Judge]
    judges: list[Judge]  # those whose verdicts it combines (members, stages; not a refiner)

    async def start(self) -> None:
        await asyncio.gather(*(p.start() for p in self.parts if isinstance(p, Startable)))

    def coverage(self, policy: Policy) -> Covered:
        """The union of what its judges assess (guard.plugins.Covering)."""
        out: Covered = {}
        for judge in self.judges:
            for category, inputs in declared(judge, policy).items():
                if inputs:
                    out.setdefault(category, set()).update(inputs)
        return out

    async def ready(self) -> bool:
        return all(await asyncio.gather(*(p.ready() for p in self.parts)))

    async def aclose(self) -> None:
        await close_all(self.parts)


class JudgeRefiner:
    """Any judge as a Refiner: it judges the item with the combined scores and flags as the last
    entry of its history, and its thought and refined prompt are taken (its scores are not)."""

    def __init__(self, judge: Judge) -> None:
        self.judge = judge

    async def refine(self, items: Sequence[JudgeInput], policy: Policy,
                     scores: Sequence[Mapping[str, float]]) -> list[Explanation]:
        asked = [replace(item, history=(*item.history, HistoryEntry(
            prompt=item.prompt, scores=dict(s), flagged=policy.decide(s).flagged)))
            for item, s in zip(items, scores, strict=True)]
        verdicts = await self.judge.judge(asked, policy)
        if len(verdicts) != len(items):
            raise JudgeError(f"refiner {self.judge.id} returned {len(verdicts)} verdicts "
                             f"for {len(items)} items")
        return [Explanation(v.thought, v.refined_prompt) for v in verdicts]


class EnsembleJudge(_Parts):
    """Members judge concurrently; per category the highest score (or the chosen member's)."""

    def __init__(self, members: Sequence[Judge], *, refiner: Judge | None = None,
                 choose: Mapping[str, int | str] | None = None,
                 on_member_error: Literal["fail", "skip"] = "fail",
                 id: str | None = None) -> None:
        if not members:
            raise ConfigError("judge (ensemble): `members` needs at least one judge")
        self.members = list(members)
        if refiner is None:
            from guard.judges.builtin import BuiltinJudge

            refiner = BuiltinJudge(nudenet=False)  # the rule refiner reads prompts only
        self.refiner_judge = refiner
        self.refiner: Refiner = refiner if isinstance(refiner, Refiner) else JudgeRefiner(refiner)
        self.choose = {cat: self._member_index(cat, ref) for cat, ref in (choose or {}).items()}
        self.on_member_error = on_member_error
        self.id = id or "ensemble(" + "+".join(m.id for m in self.members) + ")"
        self.parts = [*self.members, refiner]
        self.judges = self.members

    def _member_index(self, category: str, ref: int | str) -> int:
        ids = [m.id for m in self.members]
        if isinstance(ref, int):
            if 0 <= ref < len(ids):
                return ref
        elif ids.count(ref) == 1:
            return ids.index(ref)
        elif ids.count(ref) > 1:
            raise ConfigError(f"judge (ensemble): choose.{category}: {ref!r} names several "
                              f"members; give its index (0 to {len(ids) - 1})")
        raise ConfigError(f"judge (ensemble): choose.{category}: no member {ref!r}; members: "
                          + ", ".join(f"{i} ({m})" for i, m in enumerate(ids)))

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> EnsembleJudge:
        opts: EnsembleOptions = _validate(EnsembleOptions, "judge (ensemble)", options)
        members = [_build(f"judge (ensemble) members[{i}]", m)
                   for i, m in enumerate(opts.members)]
        refiner = _build("judge (ensemble) refiner", opts.refiner) \
            if opts.refiner is not None else None
        return cls(members, refiner=refiner, choose=opts.choose,
                   on_member_error=opts.on_member_error, id=opts.id)

    async def refine(self, items: Sequence[JudgeInput], policy: Policy,
                     scores: Sequence[Mapping[str, float]]) -> list[Explanation]:
        """A Refiner (guard.plugins): its refiner explains scores already known (a preview that
        stopped its generation), without the members judging again."""
        return await self.refiner.refine(items, policy, scores)

    async def judge(self, items: Sequence[JudgeInput], policy: Policy) -> list[Verdict]:
        if not items:
            return []
        started = time.perf_counter()
        runs = await asyncio.gather(*(_run(m, items, policy) for m in self.members))
        failed = [(i, r.error) for i, r in enumerate(runs) if r.error is not None]
        if failed and (self.on_member_error == "fail" or len(failed) == len(runs)):
            i, error = failed[0]
            assert error is not None
            what = "every ensemble member failed; " if len(failed) == len(runs) else ""
            raise JudgeError(f"{what}ensemble member {i} ({self.members[i].id}) failed: "
                             f"{_reason(error)}") from error
        both = [self._combine([r.verdicts[k] if r.verdicts else None for r in runs], policy,
                              items[k]) for k in range(len(items))]
        combined = [scores for scores, _ in both]
        wanted = [k for k, scores in enumerate(combined) if policy.wants_explanation(scores)]
        explained: dict[int, Explanation] = {}
        if wanted:
            try:
                answers = await self.refiner.refine([items[k] for k in wanted], policy,
                                                    [combined[k] for k in wanted])
            except Exception as exc:
                raise JudgeError(f"ensemble refiner ({self.refiner_judge.id}) failed: "
                                 f"{_reason(exc)}") from exc
            explained = dict(zip(wanted, answers, strict=True))
        latency = _ms(started)
        return [self._verdict(k, runs, *both[k], explained.get(k), latency)
                for k in range(len(items))]

    def _combine(self, verdicts: Sequence[Verdict | None], policy: Policy, item: JudgeInput
                 ) -> tuple[dict[str, float], Covered]:
        """Per category, the highest score of the members that assessed it (the chosen
        member's, where `choose` names one that did); what they assessed it on, together."""
        scores: dict[str, float] = {}
        on: Covered = {}
        covered = [_covered(v, policy, item) if v is not None else {} for v in verdicts]
        for verdict, cov in zip(verdicts, covered, strict=True):
            for cat, score in (verdict.scores if verdict else {}).items():
                if cat in cov or cat not in policy.categories:  # a score only for what it saw
                    scores[cat] = max(scores.get(cat, 0.0), float(score))
            for cat, inputs in cov.items():
                on.setdefault(cat, set()).update(inputs)
                scores.setdefault(cat, 0.0)
        for cat, index in self.choose.items():
            chosen = verdicts[index]
            if chosen is not None and cat in covered[index] and cat in chosen.scores:
                scores[cat] = float(chosen.scores[cat])
        return scores, on

    def _verdict(self, k: int, runs: Sequence[_Run], scores: dict[str, float], on: Covered,
                 explanation: Explanation | None, latency: float) -> Verdict:
        members: list[dict[str, Any]] = []
        raws: list[str] = []
        for member, run in zip(self.members, runs, strict=True):
            entry: dict[str, Any] = {"judge_id": member.id, "latency_ms": run.ms}
            if run.verdicts is None:
                assert run.error is not None
                entry.update(scores={}, error=_reason(run.error))
            else:
                verdict = run.verdicts[k]
                entry["scores"] = _rounded(verdict.scores)
                if verdict.assessed_on is not None:
                    entry["assessed_on"] = dict(verdict.assessed_on)
                if verdict.details:
                    entry["details"] = dict(verdict.details)
                if verdict.raw:
                    raws.append(f"[{member.id}]\n{verdict.raw}")
            members.append(entry)
        details: dict[str, Any] = {"members": members}
        if explanation is not None:
            details["refiner"] = self.refiner_judge.id
        explanation = explanation or Explanation()
        return Verdict(scores=scores, judge_id=self.id, thought=explanation.thought,
                       refined_prompt=explanation.refined_prompt, raw="\n---\n".join(raws),
                       latency_ms=latency, details=details, assessed_on=_listed(on))


class CascadeJudge(_Parts):
    """Stages from cheap to costly; an item goes on only while its scores are uncertain."""

    def __init__(self, stages: Sequence[Judge], *, escalate: Band | None = None,
                 id: str | None = None) -> None:
        if not stages:
            raise ConfigError("judge (cascade): `stages` needs at least one judge")
        band = escalate or Band()
        if band.low >= band.high:
            raise ConfigError(f"judge (cascade): escalate.low ({band.low:g}) must be below "
                              f"escalate.high ({band.high:g})")
        self.stages = list(stages)
        self.band = band
        self.id = id or "cascade(" + ">".join(s.id for s in self.stages) + ")"
        self.parts = self.judges = list(self.stages)

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> CascadeJudge:
        opts: CascadeOptions = _validate(CascadeOptions, "judge (cascade)", options)
        stages = [_build(f"judge (cascade) stages[{i}]", s) for i, s in enumerate(opts.stages)]
        return cls(stages, escalate=opts.escalate, id=opts.id)

    def uncertain(self, scores: Mapping[str, float], policy: Policy) -> bool:
        """Whether some policy category's score lies in the band [low, high)."""
        return any(self.band.low <= scores.get(cat, 0.0) < self.band.high
                   for cat in policy.categories)

    def _hand_on(self, verdict: Verdict, policy: Policy, item: JudgeInput) -> str | None:
        if self.uncertain(verdict.scores, policy):
            return "uncertain"
        if policy.wants_explanation(verdict.scores) and not (verdict.refined_prompt or "").strip():
            return "refine"
        own = "image" if item.image is not None else "text"
        if any(own not in inputs for inputs in
               verdict.coverage(policy.categories, image=item.image is not None).values()):
            return "unassessed"
        return None

    async def judge(self, items: Sequence[JudgeInput], policy: Policy) -> list[Verdict]:
        started = time.perf_counter()
        decided: list[tuple[int, Verdict] | None] = [None] * len(items)
        seen: list[list[Verdict]] = [[] for _ in items]  # each stage's verdict, in order
        path: list[list[dict[str, Any]]] = [[] for _ in items]
        pending = list(range(len(items)))
        last = len(self.stages) - 1
        for index, stage in enumerate(self.stages):
            if not pending:
                break
            run = await _run(stage, [items[k] for k in pending], policy)
            if run.verdicts is None:
                assert run.error is not None
                raise JudgeError(f"cascade stage {index} ({stage.id}) failed: "
                                 f"{_reason(run.error)}") from run.error
            still: list[int] = []
            for k, verdict in zip(pending, run.verdicts, strict=True):
                reason = self._hand_on(verdict, policy, items[k]) if index < last else None
                entry: dict[str, Any] = {"index": index, "judge_id": stage.id,
                                         "scores": _rounded(verdict.scores),
                                         "latency_ms": run.ms, "handed_on": reason}
                if verdict.assessed_on is not None:
                    entry["assessed_on"] = dict(verdict.assessed_on)
                if verdict.details:
                    entry["details"] = dict(verdict.details)
                path[k].append(entry)
                seen[k].append(verdict)
                decided[k] = (index, verdict)
                if reason is not None:
                    still.append(k)
            pending = still
        latency = _ms(started)
        out = []
        for k, pair in enumerate(decided):
            assert pair is not None
            index, verdict = pair
            scores, on = _along(seen[k], policy, items[k])
            out.append(Verdict(
                scores=scores, judge_id=self.id, thought=verdict.thought,
                refined_prompt=verdict.refined_prompt, raw=verdict.raw, latency_ms=latency,
                details={"stage": {"index": index, "judge_id": self.stages[index].id},
                         "stages": path[k]}, assessed_on=_listed(on)))
        return out


def _along(verdicts: Sequence[Verdict], policy: Policy, item: JudgeInput
           ) -> tuple[dict[str, float], Covered]:
    """The last stage's scores, and for a category an earlier stage assessed on an input the
    later ones did not, the higher of the two: what a later stage did not look at, the earlier
    finding stands for."""
    last = verdicts[-1]
    scores = dict(last.scores)
    on = _covered(last, policy, item)
    for earlier in reversed(verdicts[:-1]):
        for cat, inputs in _covered(earlier, policy, item).items():
            if inputs - on.get(cat, set()):
                on.setdefault(cat, set()).update(inputs)
                scores[cat] = max(scores.get(cat, 0.0), float(earlier.scores.get(cat, 0.0)))
    return scores, on


__all__ = ["Band", "CascadeJudge", "CascadeOptions", "EnsembleJudge", "EnsembleOptions",
           "JudgeRefiner"]
