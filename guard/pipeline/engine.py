"""The request lifecycle: prescreen, generate, judge, refine, regenerate, until safe or out of rounds.

    prescreen (policy.prescreen): judge the prompt alone before spending a generation
        refuse-category hit -> PolicyViolation, the backend is never called
        edit-category hit   -> the refined prompt becomes round 1's prompt
    round k: generate the pending slots (one backend call per distinct prompt), judge every new
        image in one batched judge call; safe images are kept, unsafe ones get a refined prompt
    until every slot is safe or k = rounds.max -> rounds.on_exhausted (refuse | drop)

The engine never names a vendor: it sees a Router, a Judge, a Policy and the Trace it fills in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from guard.core.policy import Decision, Policy
from guard.core.refiner import refine_prompt
from guard.core.types import (
    GeneratedImage,
    GenerationCall,
    HistoryEntry,
    JudgedImage,
    JudgeInput,
    RoundRecord,
    SlotResult,
    Trace,
    Verdict,
    clock,
)
from guard.pipeline.routing import Route, Router
from guard.plugins import Judge
from guard.support.errors import BackendError, GuardError, JudgeError, PolicyViolation
from guard.support.telemetry import Metrics, Telemetry

log = logging.getLogger("safeedit.engine")


@dataclass(frozen=True, slots=True)
class FinalImage:
    slot: int
    image: GeneratedImage
    prompt: str
    decision: str  # passed | edited


@dataclass(frozen=True, slots=True)
class EditInputs:
    """The client's images (and mask) for /v1/images/edits, already validated."""

    images: tuple[bytes, ...]
    mask: bytes | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    images: list[FinalImage]
    rounds: int


class Engine:
    def __init__(self, judge: Judge, router: Router, telemetry: Telemetry, metrics: Metrics,
                 *, enabled: bool = True) -> None:
        self.judge = judge
        self.router = router
        self.telemetry = telemetry
        self.metrics = metrics
        self.enabled = enabled

    async def run(self, call: GenerationCall, route: Route, policy: Policy, trace: Trace,
                  inputs: EditInputs | None = None) -> Outcome:
        """Produce `call.n` safe images or raise; the trace records every step either way.

        With `inputs` the backend edits the client's images instead of generating. An unsafe
        image is redone from its refined prompt; with the policy's `refine_mode: edit` it is
        repaired instead, by editing that image with the refined prompt.
        """
        original = call.prompt
        repair: dict[int, GeneratedImage] = {}
        prompts = [original] * call.n
        history: list[list[HistoryEntry]] = [[] for _ in range(call.n)]
        flagged_any: set[str] = set()
        final: dict[int, FinalImage] = {}
        refused: dict[int, SlotResult] = {}

        try:
            if self.enabled and policy.prescreen:
                verdict, decision = await self._prescreen(original, policy, trace)
                flagged_any.update(decision.flagged)
                if decision.action == "refuse":
                    raise self._violation(decision.flagged, "the prompt")
                if decision.action == "edit":
                    prompts = [self._refined(verdict, original, decision, policy)] * call.n
                    history = [[_history(original, verdict, decision)] for _ in range(call.n)]

            pending = list(range(call.n))
            rounds = 0
            for k in range(1, (policy.rounds.max if self.enabled else 1) + 1):
                rounds = k
                with self.telemetry.span("guard.round", **{"guard.round": k,
                                                           "guard.pending": len(pending)}):
                    record = RoundRecord(index=k, kind="generate")
                    trace.rounds.append(record)
                    images = await self._produce(call, route, pending, prompts, record, trace,
                                                 inputs, repair)
                    if not self.enabled:
                        for slot, image in images.items():
                            final[slot] = FinalImage(slot, image, prompts[slot], "passed")
                        pending = []
                        break
                    items = [JudgeInput(prompt=prompts[s], original_prompt=original,
                                        image=images[s], history=tuple(history[s]))
                             for s in pending]
                    verdicts = await self._judge(items, policy, record, stage="image")
                    still: list[int] = []
                    for slot, verdict in zip(pending, verdicts, strict=True):
                        decision = _decide(policy, verdict)
                        flagged_any.update(decision.flagged)
                        record.images.append(_judged(slot, prompts[slot], images[slot], verdict,
                                                     decision))
                        self._count(decision)
                        if policy.image_retention == "all" or (
                                policy.image_retention == "flagged" and decision.flagged):
                            trace.retain(images[slot])
                        if decision.action == "pass":
                            untouched = k == 1 and prompts[slot] == original
                            final[slot] = FinalImage(slot, images[slot], prompts[slot],
                                                     "passed" if untouched else "edited")
                        elif decision.action == "refuse":
                            raise self._violation(decision.flagged, f"image {slot}")
                        else:
                            history[slot].append(_history(prompts[slot], verdict, decision))
                            if verdict is not None:
                                prompts[slot] = self._refined(verdict, prompts[slot], decision,
                                                              policy)
                            if policy.refine_mode == "edit" and self.router.can_edit(route):
                                repair[slot] = images[slot]
                            still.append(slot)
                    pending = still
                if not pending:
                    break

            if pending:
                if policy.rounds.on_exhausted == "refuse" or len(pending) == call.n:
                    raise self._violation(tuple(sorted(flagged_any)),
                                          f"{len(pending)} image(s) after {rounds} rounds")
                for slot in pending:
                    refused[slot] = SlotResult(slot=slot, decision="refused", rounds=rounds,
                                               prompt=prompts[slot],
                                               categories=sorted(history[slot][-1].flagged))
            return Outcome(images=[final[s] for s in sorted(final)], rounds=rounds)
        finally:
            trace.categories = sorted(flagged_any)
            trace.results = sorted(
                [SlotResult(slot=f.slot, decision=f.decision,  # type: ignore[arg-type]
                            rounds=_rounds_of(trace, f.slot), prompt=f.prompt,
                            image_sha256=f.image.sha256 if self.enabled else None,
                            categories=_categories_of(trace, f.slot))
                 for f in final.values()] + list(refused.values()),
                key=lambda r: r.slot)
            self.metrics.rounds.observe(sum(1 for r in trace.rounds if r.kind == "generate"))

    # --- steps ------------------------------------------------------------------------------

    async def _prescreen(self, prompt: str, policy: Policy, trace: Trace
                         ) -> tuple[Verdict | None, Decision]:
        record = RoundRecord(index=0, kind="prescreen")
        trace.rounds.append(record)
        verdicts = await self._judge([JudgeInput(prompt=prompt, original_prompt=prompt)],
                                     policy, record, stage="prescreen")
        decision = _decide(policy, verdicts[0])
        record.images.append(_judged(0, prompt, None, verdicts[0], decision))
        self._count(decision)
        return verdicts[0], decision

    async def _produce(self, call: GenerationCall, route: Route, pending: Sequence[int],
                       prompts: Sequence[str], record: RoundRecord, trace: Trace,
                       inputs: EditInputs | None, repair: dict[int, GeneratedImage]
                       ) -> dict[int, GeneratedImage]:
        """One backend call per distinct prompt (or per image under repair), all at once."""
        groups: dict[tuple[str, int | None], list[int]] = {}
        for slot in pending:
            key = (prompts[slot], slot if slot in repair else None)
            groups.setdefault(key, []).append(slot)
        timer = clock()

        async def one(prompt: str, slots: list[int], source: GeneratedImage | None
                      ) -> tuple[str, list[GeneratedImage]]:
            sub = replace(call, prompt=prompt, n=len(slots))
            with self.telemetry.span("guard.backend", **{"guard.backend": route.backend,
                                                         "guard.n": len(slots),
                                                         "guard.edit": bool(source or inputs)}):
                started = time.perf_counter()
                if source is not None:
                    used, images = await self.router.edit(route, sub, [source.data], None)
                elif inputs is not None:
                    used, images = await self.router.edit(route, sub, list(inputs.images),
                                                          inputs.mask)
                else:
                    used, images = await self.router.generate(route, sub)
                self.metrics.backend_latency.labels(used).observe(time.perf_counter() - started)
            if len(images) != len(slots):
                raise BackendError(f"backend {used!r} returned {len(images)} image(s) for "
                                   f"n={len(slots)}", code="backend_bad_response")
            if self.enabled:
                # Decoded and checked here, so a broken image is the backend's failure (502),
                # never the judge's; a passthrough relays the backend's bytes unlooked-at.
                for image in images:
                    image.validate()
            return used, images

        try:
            results = await asyncio.gather(*(
                one(prompt, slots, repair.pop(source) if source is not None else None)
                for (prompt, source), slots in groups.items()))
        finally:
            record.backend_ms = timer.ms()
        out: dict[int, GeneratedImage] = {}
        for (used, images), slots in zip(results, groups.values(), strict=True):
            record.backend = trace.backend = used
            out.update(zip(slots, images, strict=True))
        return out

    async def _judge(self, items: list[JudgeInput], policy: Policy, record: RoundRecord,
                     stage: str) -> list[Verdict | None]:
        """Judge a batch. A judge failure follows policy.on_judge_error: refuse (503) or allow,
        in which case the items go unjudged (None) and the round records why."""
        timer = clock()
        try:
            with self.telemetry.span("guard.judge", **{"guard.judge": self.judge.id,
                                                       "guard.stage": stage,
                                                       "guard.batch": len(items)}):
                verdicts = await self.judge.judge(items, policy)
            if len(verdicts) != len(items):
                raise JudgeError(f"judge returned {len(verdicts)} verdicts for {len(items)} items")
            return list(verdicts)
        except Exception as exc:  # noqa: BLE001 - any judge failure is a judge failure
            reason = exc.message if isinstance(exc, GuardError) else type(exc).__name__
            if isinstance(exc, GuardError) and exc.detail:  # redacted: the trace may keep it
                reason = f"{reason} ({exc.detail})"
            record.error = f"judge error: {reason}"
            log.warning("judge %s failed at %s: %s", self.judge.id, stage, reason)
            if policy.on_judge_error == "allow":
                return [None] * len(items)
            raise JudgeError("The safety judge is unavailable; the request was not served "
                             "(policy on_judge_error: refuse).") from exc
        finally:
            record.judge_ms += timer.ms()
            self.metrics.judge_latency.labels(self.judge.id, stage).observe(timer.ms() / 1000)

    def _refined(self, verdict: Verdict | None, prompt: str, decision: Decision,
                 policy: Policy) -> str:
        if verdict is not None and verdict.refined_prompt and verdict.refined_prompt.strip():
            return verdict.refined_prompt.strip()
        return refine_prompt(prompt, decision.flagged, policy)

    def _violation(self, categories: Sequence[str], what: str) -> PolicyViolation:
        cats = ", ".join(categories) or "unspecified"
        return PolicyViolation(
            f"Your request was rejected by the safety policy ({what} crossed: {cats}).",
            categories=tuple(categories))

    def _count(self, decision: Decision) -> None:
        for category in decision.flagged:
            self.metrics.flags.labels(category, decision.action).inc()


def _decide(policy: Policy, verdict: Verdict | None) -> Decision:
    # No verdict means the judge failed and the policy said allow.
    return Decision("pass") if verdict is None else policy.decide(verdict.scores)


def _history(prompt: str, verdict: Verdict | None, decision: Decision) -> HistoryEntry:
    return HistoryEntry(prompt=prompt, scores=dict(verdict.scores) if verdict else {},
                        flagged=decision.flagged, thought=verdict.thought if verdict else "",
                        refined_prompt=verdict.refined_prompt if verdict else None)


def _judged(slot: int, prompt: str, image: GeneratedImage | None, verdict: Verdict | None,
            decision: Decision) -> JudgedImage:
    if verdict is None:
        return JudgedImage(slot=slot, prompt=prompt,
                           image_sha256=image.sha256 if image else None,
                           judge_id="(judge failed; allowed by policy)", action=decision.action)
    return JudgedImage(
        slot=slot, prompt=prompt, image_sha256=image.sha256 if image else None,
        judge_id=verdict.judge_id, scores={k: round(v, 6) for k, v in verdict.scores.items()},
        flagged=list(decision.flagged), action=decision.action, thought=verdict.thought,
        refined_prompt=verdict.refined_prompt, raw=verdict.raw[:4000],
        judge_ms=round(verdict.latency_ms, 3), details=dict(verdict.details))


def _rounds_of(trace: Trace, slot: int) -> int:
    return sum(1 for r in trace.rounds if r.kind == "generate"
               and any(i.slot == slot for i in r.images)) or 1


def _categories_of(trace: Trace, slot: int) -> list[str]:
    """Categories flagged on the way to this slot's image: the prescreen's and its rounds'."""
    return sorted({c for r in trace.rounds for i in r.images
                   if r.kind == "prescreen" or i.slot == slot for c in i.flagged})

