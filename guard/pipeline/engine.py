"""The request lifecycle: prescreen, generate, judge, refine, regenerate, until safe or out of rounds.

    prescreen (policy.prescreen): judge the prompt alone before spending a generation, or
        (`concurrent`) while round 1 generates, that generation cancelled unless the prompt passes
        refuse-category hit -> PolicyViolation, no image is ever judged or returned
        edit-category hit   -> the refined prompt becomes round 1's prompt
    round k, per slot on its own clock: one backend call per distinct prompt, its images judged
        together; safe images are kept, an unsafe one gets a refined prompt it never tried
        (guard.pipeline.slots) and its slot goes on at once, whatever the other slots do
    a slot ends when safe, at k = rounds.max, when nothing new is left to try, or when the next
        round would miss the deadline (guard.pipeline.deadline) -> rounds.on_exhausted
    no explanation is asked for where its refined prompt could never be used (the last round, a
        refuse decision, no time left): the judge gets the policy's `verdict_only()` view
    hedge (policy.hedge): a prompt that passed with its highest score in the band is also made
        from its refined version in round 1; each slot keeps its first image judged safe
    unassessed (policy.unassessed): what no judge assessed on an image is decided by its
        prompt's verdict or the policy (guard.pipeline.unassessed)

The engine never names a vendor: it sees a Router, a Judge, a Policy and the Trace it fills in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from guard.core.policy import Decision, Policy
from guard.core.types import (
    GeneratedImage,
    GenerationCall,
    JudgeInput,
    RoundRecord,
    SlotResult,
    Trace,
    Verdict,
    clock,
)
from guard.pipeline.deadline import Deadline, Estimates, effective
from guard.pipeline.previews import Generated, generate_judging_previews, verdicts_for
from guard.pipeline.records import categories_of, decide, given_up, history_entry, judged
from guard.pipeline.routing import Route, Router
from guard.pipeline.run import SERVED_ELSEWHERE, EditInputs, FinalImage, Outcome, Run
from guard.pipeline.slots import Slot, groups, indices, new_slots
from guard.pipeline.together import ReadyTogether
from guard.pipeline.unassessed import left_to_image, reason
from guard.plugins import Judge
from guard.support.errors import (
    BackendError,
    DeadlineExceeded,
    GuardError,
    JudgeError,
    PolicyViolation,
)
from guard.support.telemetry import Metrics, Telemetry, gen_ai_request

log = logging.getLogger("safeedit.engine")


RoundTask = asyncio.Task[list[list[Slot]]]
# By slot: a call's images, and the verdicts of the stopped previews among them.
Images = tuple[dict[int, GeneratedImage], dict[int, Verdict]]
Made = asyncio.Task[tuple[RoundRecord, Images]]  # a call made beforehand


class Engine:
    def __init__(self, judge: Judge, router: Router, telemetry: Telemetry, metrics: Metrics,
                 *, enabled: bool = True) -> None:
        self.judge = judge
        self.router = router
        self.telemetry = telemetry
        self.metrics = metrics
        self.enabled = enabled
        self.estimates = Estimates()  # recent generation and judge times, for deadlines

    async def run(self, call: GenerationCall, route: Route, policy: Policy, trace: Trace,
                  inputs: EditInputs | None = None, *, deadline_s: float | None = None
                  ) -> Outcome:
        """Produce `call.n` safe images or raise; the trace records every step either way.

        With `inputs` the backend edits the client's images instead of generating. An unsafe
        image is redone from its refined prompt; with the policy's `refine_mode: edit` it is
        repaired instead, by editing that image with the refined prompt. `deadline_s` is the
        client's deadline (`x-guard-deadline-s`): the stricter of it and the policy's applies.
        """
        run = Run(call, route, policy, trace, inputs, new_slots(call.n, call.prompt),
                  ReadyTogether(lambda items, view, records: self._judge(
                      items, view, records, stage="image")))
        limit = effective(policy.rounds.deadline_s, deadline_s) if self.enabled else None
        withheld: str | None = None  # what the kept images became when the request failed
        try:
            if limit is None:
                await self._loop(run)
            else:
                run.deadline = Deadline.start(limit)
                try:
                    async with asyncio.timeout_at(run.deadline.at) as timeout:
                        await self._loop(run)
                except TimeoutError:
                    if not timeout.expired():
                        raise
                    run.late = True
                    for slot in run.slots:
                        if slot.index not in run.final:
                            run.dropped.setdefault(slot.index, given_up(slot, "failed"))
            return self._outcome(run)
        except BaseException as exc:
            withheld = "refused" if isinstance(exc, PolicyViolation) else "failed"
            raise
        finally:
            trace.categories = sorted(run.flagged)
            trace.results = sorted(
                # An image judged safe but never served (the request was refused or failed)
                # shares its request's fate: no client saw it.
                [SlotResult(slot=f.slot, decision=withheld or f.decision,  # type: ignore[arg-type]
                            rounds=run.slots[f.slot].rounds or 1, prompt=f.prompt,
                            image_sha256=f.image.sha256 if self.enabled else None,
                            categories=categories_of(trace, f.slot))
                 for f in run.final.values()]
                + [r for s, r in run.dropped.items() if s not in run.final],
                key=lambda r: r.slot)
            self.metrics.rounds.observe(trace.round_count())

    def _outcome(self, run: Run) -> Outcome:
        served = [run.final[s] for s in sorted(run.final)]
        if len(served) < run.call.n:
            if run.late and (not served or run.policy.rounds.on_exhausted == "refuse"):
                raise self._late(run)
            if not served:
                raise self._violation(tuple(sorted(run.flagged)),
                                      f"{run.call.n} image(s) after "
                                      f"{max(s.rounds for s in run.slots)} rounds")
        if run.policy.image_retention == "flagged_and_delivered" and run.flagged:
            for final in served:  # what the client got instead of what was flagged
                run.trace.retain(final.image)
        return Outcome(images=served, rounds=max(run.trace.round_count(), 1))

    # --- the loop -----------------------------------------------------------------------------

    async def _loop(self, run: Run) -> None:
        """The prescreen, then every slot's rounds, each slot on its own clock."""
        policy, slots = run.policy, run.slots
        early: Made | None = None
        hedges: list[Slot] = []
        record = RoundRecord(index=1, kind="generate")  # the early call's, when there is one
        if self.enabled and policy.prescreen:
            if policy.prescreen_concurrent:
                record = self._open(run, slots)
                early = asyncio.create_task(self._make(run, slots, record))
            try:
                verdict, decision = await self._prescreen(run.call.prompt, policy, run.trace)
            except BaseException as exc:
                if early is not None:
                    await _cancel([early], record, "the prescreen failed"
                                  if isinstance(exc, Exception) else _stop_reason(exc, run))
                raise
            run.flagged.update(decision.flagged)
            run.prompts.remember(policy, run.call.prompt, verdict)  # for unassessed categories
            if early is not None and decision.action != "pass":
                await _cancel([early], record, f"the prescreen decided {decision.action}")
                early = None
            if decision.action == "refuse":
                raise self._violation(decision.flagged, "the prompt")
            if decision.action == "edit":
                first = slots[0].next_prompt(verdict, decision, policy)
                if first is None:  # nothing benign left to make: as rounds.on_exhausted says
                    if policy.rounds.on_exhausted == "refuse":
                        raise self._violation(decision.flagged,
                                              "the prompt, with nothing benign left to make,")
                    for slot in slots:
                        run.dropped[slot.index] = given_up(slot, "refused")
                    return
                for slot in slots:
                    slot.history.append(history_entry(slot.prompt, verdict, decision))
                    slot.prompt, slot.refined_by = first
            elif verdict is not None and policy.in_hedge_band(verdict.scores):
                hedges = self._hedges(run, verdict)
                run.hedging = {s.index for s in hedges}

        tasks: dict[RoundTask, list[Slot]] = {}

        def start(group: list[Slot], made: Made | None = None) -> None:
            tasks[asyncio.create_task(self._round(run, group, made))] = group

        for group in [slots] if early is not None else groups(slots):
            start(group, early)
        if hedges:
            start(hedges)
        try:
            while tasks:
                done, _ = await asyncio.wait(set(tasks), return_when=asyncio.FIRST_COMPLETED)
                ended = [(t, tasks.pop(t)) for t in done]
                errors = [e for t, _ in ended if not t.cancelled() and (e := t.exception())]
                if errors:
                    raise errors[0]
                for task, _ in ended:
                    for group in [] if task.cancelled() else task.result():
                        start(group)
                for task, group in tasks.items():  # hedged: a slot served one way needs no other
                    if not task.cancelling() and all(s.index in run.final for s in group):
                        task.cancel()
        except BaseException as exc:
            run.stop = _stop_reason(exc, run)
            raise
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await run.together.aclose()

    def _hedges(self, run: Run, verdict: Verdict) -> list[Slot]:
        """Under `hedge`, a prompt that passed in the band: the same slots again, made from its
        refined version beside the original (none when nothing new can be written)."""
        probe = Slot(index=-1, prompt=run.call.prompt)
        probe.remember(run.call.prompt)
        flagged = run.policy.hedge_categories(verdict.scores)
        found = probe.next_prompt(verdict, Decision("edit", flagged), run.policy)
        if found is None:
            return []
        seen = history_entry(run.call.prompt, verdict, Decision("pass", flagged))
        return [Slot(index=s.index, prompt=found[0], refined_by=found[1], history=[seen],
                     tried=s.tried, hedge=True) for s in run.slots]  # tried: one set per slot

    async def _round(self, run: Run, group: list[Slot], made: Made | None = None
                     ) -> list[list[Slot]]:
        """One round of `group` (slots sharing a prompt): make, judge, decide. Returns the
        groups that go on to their next round."""
        with self.telemetry.span("guard.round", **{"guard.round": group[0].rounds + 1,
                                                   "guard.pending": len(group)}):
            return await self._step(run, group, made)

    async def _step(self, run: Run, group: list[Slot], made: Made | None) -> list[list[Slot]]:
        policy, k = run.policy, group[0].rounds + 1
        group = [s for s in group if s.index not in run.final]  # hedged: served another way
        if not group:
            return []
        if made is None:
            if not self._fits(run):
                for slot in group:
                    self._give_up(run, slot, late=True)
                return []
            record = self._open(run, group)
            record, (images, stopped) = await self._make(run, group, record)
        else:
            record, (images, stopped) = await made
        if not self.enabled:
            for slot in group:
                slot.rounds = k
                run.final[slot.index] = FinalImage(slot.index, images[slot.index], slot.prompt,
                                                   "passed")
            return []
        if group[0].hedge:
            self.metrics.hedges.labels("made").inc(len(group))
        group = [s for s in group if s.index not in run.final]
        if not group:
            record.cancelled = SERVED_ELSEWHERE
            return []
        # Explanations only where a refined prompt can still be used (never from a hedge).
        late = k < policy.rounds.max and not self._fits(run, judging=True)  # no time for k + 1
        view = (policy if k < policy.rounds.max and not group[0].hedge and not late
                else policy.verdict_only())
        items = [JudgeInput(prompt=s.prompt, original_prompt=run.call.prompt,
                            image=images[s.index], history=tuple(s.history)) for s in group]
        try:
            # A stopped preview comes with its verdict: judged again only to be explained.
            verdicts = await verdicts_for(
                items, [stopped.get(s.index) for s in group], view, self.judge,
                lambda again: run.together.judge(again, view, record), record)
            # What an image was not assessed for may need its prompt's verdict (the policy's
            # `unassessed: prompt`): judged here, text only, where no judge has read it yet.
            await run.prompts.read(policy, items, verdicts, lambda asked: self._judge(
                asked, policy.verdict_only(), [record], stage="prompt"))
        except asyncio.CancelledError:
            record.cancelled = record.cancelled or run.why_cancelled(group)
            raise
        after: list[Slot] = []
        refused: tuple[int, Decision] | None = None  # raised once every verdict is recorded
        for slot, item, verdict in zip(group, items, verdicts, strict=True):
            image = images[slot.index]
            decision, blind = run.prompts.decide(policy, item, verdict)
            run.flagged.update(decision.flagged)
            record.images.append(judged(slot.index, slot.prompt, image, verdict, decision,
                                        round=k, backend_ms=record.backend_ms,
                                        refined_by=slot.refined_by, unassessed=blind))
            self._count(decision)
            if policy.image_retention == "all" or (
                    policy.image_retention != "none" and decision.flagged):
                run.trace.retain(image)
            slot.rounds = k
            if decision.action == "pass" and slot.index not in run.final:
                untouched = k == 1 and slot.prompt == run.call.prompt
                run.final[slot.index] = FinalImage(slot.index, image, slot.prompt,
                                                   "passed" if untouched else "edited")
                if slot.hedge:
                    run.slots[slot.index].rounds = max(run.slots[slot.index].rounds, k)
                    self.metrics.hedges.labels("served").inc()
            if decision.action == "refuse":
                refused = refused or (slot.index, decision)
                continue
            if slot.hedge:  # unsafe: its slot goes on its own way, or ends if it had waited on this
                run.hedging.discard(slot.index)
                if slot.index in run.waiting and slot.index not in run.final:
                    self._give_up(run, run.slots[slot.index], late=False)
                continue
            if decision.action == "pass":
                continue
            slot.history.append(history_entry(slot.prompt, verdict, decision))
            if late:
                self._give_up(run, slot, late=True)
                continue
            nxt = slot.next_prompt(verdict, decision, policy) if k < policy.rounds.max else None
            if nxt is None:  # out of rounds, or nothing new left to try
                self._give_up(run, slot, late=False)
                continue
            slot.prompt, slot.refined_by = nxt
            if policy.refine_mode == "edit" and self.router.can_edit(run.route):
                slot.repair = image
            after.append(slot)
        if refused is not None:
            raise self._violation(refused[1].flagged, f"image {refused[0]}",
                                  refused[1].unassessed)
        return groups(after)

    def _give_up(self, run: Run, slot: Slot, *, late: bool) -> None:
        """A slot that cannot become safe (or not in time): as `on_exhausted` says, once its
        hedge, if it has one, is judged unsafe too."""
        if not late and slot.index in run.hedging and slot.index not in run.waiting:
            run.waiting.add(slot.index)
            return
        run.late = run.late or late
        if run.policy.rounds.on_exhausted == "refuse":
            if late:
                run.dropped[slot.index] = given_up(slot, "failed")
                raise self._late(run)
            stuck = ", nothing new to try," if slot.rounds < run.policy.rounds.max else ""
            raise self._violation(tuple(sorted(run.flagged)),
                                  f"image {slot.index} after {slot.rounds} rounds{stuck}")
        run.dropped[slot.index] = given_up(slot, "failed" if late else "refused")

    def _fits(self, run: Run, *, judging: bool = False) -> bool:
        """Whether one more round (after the judging under way, when `judging`) can finish by
        the deadline, from recent times."""
        if run.deadline is None:
            return True
        cost = self.estimates.round_s(run.route.backend)
        if judging:
            cost += self.estimates.judging.get("image", 0.0)
        return run.deadline.fits(cost)

    def _late(self, run: Run) -> DeadlineExceeded:
        assert run.deadline is not None
        return DeadlineExceeded(f"The request's deadline ({run.deadline.seconds:g} s) passed "
                                "before every image was judged safe; no unjudged image is served.")

    def _open(self, run: Run, group: list[Slot]) -> RoundRecord:
        edit = run.inputs is not None or any(s.repair is not None for s in group)
        record = RoundRecord(index=group[0].rounds + 1, kind="edit" if edit else "generate",
                             hedge=group[0].hedge)
        run.trace.rounds.append(record)
        return record

    async def _make(self, run: Run, group: list[Slot], record: RoundRecord
                    ) -> tuple[RoundRecord, Images]:
        repair = {s.index: s.repair for s in group if s.repair is not None}
        for slot in group:
            slot.repair = None
            slot.remember(slot.prompt)
        started = time.perf_counter()
        try:
            made = await self._produce(run.call, run.route, indices(group),
                                       run.prompts_with(group), record, run.trace, run.inputs,
                                       repair, policy=run.policy)
        except asyncio.CancelledError:
            record.cancelled = record.cancelled or run.why_cancelled(group)
            raise
        self.estimates.record_generation(run.route.backend, time.perf_counter() - started)
        return record, made

    # --- steps ------------------------------------------------------------------------------

    async def _prescreen(self, prompt: str, policy: Policy, trace: Trace
                         ) -> tuple[Verdict | None, Decision]:
        record = RoundRecord(index=0, kind="prescreen")
        trace.rounds.insert(0, record)  # first, even beside a concurrent round 1
        verdicts = await self._judge([JudgeInput(prompt=prompt, original_prompt=prompt)],
                                     policy.hedging(), [record], stage="prescreen")
        decision = decide(policy, verdicts[0])
        record.images.append(judged(0, prompt, None, verdicts[0], decision,
                                    unassessed=left_to_image(policy, verdicts[0])))
        self._count(decision)
        return verdicts[0], decision

    async def _produce(self, call: GenerationCall, route: Route, pending: Sequence[int],
                       prompts: Sequence[str], record: RoundRecord, trace: Trace,
                       inputs: EditInputs | None, repair: dict[int, GeneratedImage],
                       *, policy: Policy | None = None) -> Images:
        """One backend call per distinct prompt (or per image under repair), all at once."""
        groups: dict[tuple[str, int | None], list[int]] = {}
        for slot in pending:
            key = (prompts[slot], slot if slot in repair else None)
            groups.setdefault(key, []).append(slot)
        timer = clock()

        async def one(prompt: str, slots: list[int], source: GeneratedImage | None
                      ) -> Generated:
            sub = replace(call, prompt=prompt, n=len(slots))
            with self.telemetry.span("guard.backend", **{"guard.backend": route.backend,
                                                         "guard.n": len(slots),
                                                         "guard.edit": bool(source or inputs),
                                                         **gen_ai_request(route.model or sub.model,
                                                                         len(slots))}):
                started = time.perf_counter()
                if source is not None:
                    made = Generated(*await self.router.edit(route, sub, [source.data], None))
                elif inputs is not None:
                    made = Generated(*await self.router.edit(route, sub, list(inputs.images),
                                                             inputs.mask))
                else:
                    # Previews (issue 18, guard.pipeline.previews): a backend that shows partial
                    # images has each judged (verdict only) as it arrives; an unsafe one stops
                    # that image's generation at once and stands in for it with its verdict
                    # (unsafe, explained below where it can be used), never returned unjudged.
                    made = await generate_judging_previews(
                        self.router, route, sub, judge=self.judge if self.enabled else None,
                        policy=policy, original=call.prompt, record=record, slots=slots,
                        metrics=self.metrics)
                self.metrics.backend_latency.labels(made.backend).observe(
                    time.perf_counter() - started)
            if len(made.images) != len(slots):
                raise BackendError(f"backend {made.backend!r} returned {len(made.images)} "
                                   f"image(s) for n={len(slots)}", code="backend_bad_response")
            if self.enabled:
                # Decoded and checked here, so a broken image is the backend's failure (502),
                # never the judge's; a passthrough relays the backend's bytes unlooked-at.
                for image in made.images:
                    image.validate()
            return made

        try:
            results = await asyncio.gather(*(
                one(prompt, slots, repair.pop(source) if source is not None else None)
                for (prompt, source), slots in groups.items()))
        finally:
            record.backend_ms = timer.ms()
        out: dict[int, GeneratedImage] = {}
        stopped: dict[int, Verdict] = {}
        for made, slots in zip(results, groups.values(), strict=True):
            record.backend = trace.backend = made.backend
            out.update(zip(slots, made.images, strict=True))
            stopped.update((slots[i], verdict) for i, verdict in made.stopped.items())
        return out, stopped

    async def _judge(self, items: list[JudgeInput], policy: Policy,
                     records: Sequence[RoundRecord], stage: str) -> list[Verdict | None]:
        """Judge a batch (the items of `records`' rounds). A judge failure follows
        policy.on_judge_error: refuse (503) or allow, in which case the items go unjudged (None)
        and the rounds record why."""
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
            for record in records:
                record.error = f"judge error: {reason}"
            log.warning("judge %s failed at %s: %s", self.judge.id, stage, reason)
            if policy.on_judge_error == "allow":
                return [None] * len(items)
            raise JudgeError("The safety judge is unavailable; the request was not served "
                             "(policy on_judge_error: refuse).") from exc
        finally:
            ms = timer.ms()
            for record in records:
                record.judge_ms += ms
            self.estimates.record_judging(stage, ms / 1000)
            self.metrics.judge_latency.labels(self.judge.id, stage).observe(ms / 1000)

    def _violation(self, categories: Sequence[str], what: str, blind: Sequence[str] = ()
                   ) -> PolicyViolation:
        # OpenAI's words for a refusal: clients that see only the message (litellm's image
        # calls) recognise a content-policy violation by them.
        return PolicyViolation("Your request was rejected as a result of the safety system "
                               f"({reason(what, categories, blind)}).",
                               categories=tuple(categories))

    def _count(self, decision: Decision) -> None:
        for category in decision.flagged:
            self.metrics.flags.labels(category, decision.action).inc()


async def _cancel(tasks: list[asyncio.Task[Any]], record: RoundRecord, why: str) -> None:
    """Cancel calls whose images must never be judged or returned; their record says why."""
    record.cancelled = why
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _stop_reason(exc: BaseException, run: Run) -> str:
    if isinstance(exc, asyncio.CancelledError | TimeoutError):
        passed = run.deadline is not None and run.deadline.left() <= 0
        return "the deadline passed" if passed else "the request was cancelled"
    code = exc.code if isinstance(exc, GuardError) else type(exc).__name__
    return f"the request ended ({code})"
