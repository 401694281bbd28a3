"""One backend call with its previews judged as they arrive, stopped at an unsafe one (issue 18).

A PreviewingBackend (guard.plugins) shows partial images while it generates: OpenAI's streamed
`partial_images`, a diffusers pipeline's `preview_steps`. Each preview is judged as it arrives,
verdict only (`policy.verdict_only()`: no reasoning, no refined prompt), and decided by
`policy.decide`. An unsafe one stops that image's generation at once; once every image of the call
is stopped, the call is cancelled here without waiting for the backend to notice.

The stopping preview then stands in for its image, its verdict with it (`Generated.stopped`): the
engine judges it no more where no explanation can be used (a `refuse` decision, the
`verdict_only()` view), has a Refiner judge explain it from the preview's scores, and only
judges it again, now with the explanation, where the judge has no explain-only path
(`verdicts_for`). Nothing unjudged reaches the client: previews judged safe are dropped, and an
image that was not stopped is judged as the final image always is.

Previews only ever stop a generation sooner. A preview that does not decode, or whose judging
fails, is recorded nowhere and changes nothing: the final image, judged under the policy's
`on_judge_error`, still decides. Each judged preview is recorded on the round
(`RoundRecord.previews`, `stopped` on the one that stopped its generation) and counted in
`guard_previews_total{backend,outcome}`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace

from guard.core.policy import Policy
from guard.core.types import (
    GeneratedImage,
    GenerationCall,
    JudgedPreview,
    JudgeInput,
    RoundRecord,
    Verdict,
    clock,
)
from guard.pipeline.routing import Route, Router
from guard.plugins import Explanation, Judge, Preview, PreviewAction, Refiner
from guard.support.errors import BackendError, GuardError
from guard.support.telemetry import Metrics

log = logging.getLogger("safeedit.previews")


@dataclass(frozen=True, slots=True)
class Generated:
    """A backend call's images, and the verdicts of the previews that stand in for some."""

    backend: str
    images: list[GeneratedImage]
    stopped: dict[int, Verdict] = field(default_factory=dict)  # image index -> its preview's


async def generate_judging_previews(
        router: Router, route: Route, call: GenerationCall, *, judge: Judge | None,
        policy: Policy | None, original: str, record: RoundRecord, slots: Sequence[int],
        metrics: Metrics) -> Generated:
    """`router.generate(route, call)`, with the previews of a backend that shows them judged.

    Returns the backend used and one image per image of the call: the final image, or the
    unsafe preview that stopped it, with that preview's verdict in `stopped`. `slots[i]` is the
    slot image i of the call fills (for the trace); no `judge` (the guard switched off) or no
    `policy` judges nothing.
    """
    if judge is None or policy is None or not router.shows_previews(route, call):
        return Generated(*await router.generate(route, call))
    watch = _Watch(route.backend, call, judge, policy, original, record, slots, metrics)
    making = asyncio.ensure_future(router.generate_previewed(route, call, watch.on_preview))
    all_stopped = asyncio.ensure_future(watch.all_stopped.wait())
    try:
        await asyncio.wait((making, all_stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        all_stopped.cancel()
        if not making.done():
            making.cancel()  # every image is unsafe already, or the request itself was cancelled
            await asyncio.wait((making,))
        watch.closed = True  # a straggler's previews (a pipeline thread's) are not judged
    stopped = {i: verdict for i, (_, verdict) in watch.stops.items()}
    if len(watch.stops) == call.n:
        # The previews decided every image: whatever the backend did after that is moot.
        done = not making.cancelled() and making.exception() is None
        return Generated(making.result()[0] if done else route.backend,
                         [watch.stops[i][0].image for i in range(call.n)], stopped)
    used, made = making.result()
    images: list[GeneratedImage] = []
    for i, image in enumerate(made):
        stop = watch.stops.get(i)
        if stop is not None:
            images.append(stop[0].image)
        elif image is None:
            raise BackendError(f"backend {used!r} stopped an image nobody asked it to stop",
                               code="backend_bad_response")
        else:
            images.append(image)
    return Generated(used, images, stopped)


Judging = Callable[[list[JudgeInput]], Awaitable[list[Verdict | None]]]


async def verdicts_for(items: Sequence[JudgeInput], stopped: Sequence[Verdict | None],
                       view: Policy, judge: Judge, judging: Judging, record: RoundRecord
                       ) -> list[Verdict | None]:
    """One verdict per item; `stopped[i]` is the verdict of the preview item i is (None for a
    final image). A preview's verdict is used as it is where no explanation can be used
    (`view.wants_explanation` is false: a refuse decision, the verdict-only view), and explained
    from its scores by a Refiner judge's `refine`; every other item goes to `judging` (one batch).
    """
    out: list[Verdict | None] = [None] * len(items)
    refiner = _refiner(judge)
    again: list[int] = []
    explain: dict[int, Verdict] = {}
    for i, verdict in enumerate(stopped):
        if verdict is None:
            again.append(i)
        elif not view.wants_explanation(verdict.scores):
            out[i] = replace(verdict, latency_ms=0.0)  # judged once already, as the preview
        elif refiner is not None:
            explain[i] = verdict
        else:
            # A judge without an explain-only path (a remote or vlm judge, as yet) judges the
            # preview again, as a final image, to explain it.
            again.append(i)
    refining: asyncio.Future[list[Verdict]] | None = None
    if refiner is not None and explain:  # beside the judging of the others
        refining = asyncio.ensure_future(_explain(
            refiner, [items[i] for i in explain], view, list(explain.values()), record))
    try:
        if again:
            for i, verdict in zip(again, await judging([items[i] for i in again]), strict=True):
                out[i] = verdict
        if refining is not None:
            for i, verdict in zip(explain, await refining, strict=True):
                out[i] = verdict
    finally:
        if refining is not None and not refining.done():
            refining.cancel()
    return out


def _refiner(judge: Judge) -> Refiner | None:
    return judge if isinstance(judge, Refiner) else None


async def _explain(refiner: Refiner, items: list[JudgeInput], view: Policy,
                   verdicts: list[Verdict], record: RoundRecord) -> list[Verdict]:
    """The previews' verdicts with the refiner's thought and refined prompt. Should the refiner
    fail, the scores still stand (the images stay unsafe) and the policy's rules refine them."""
    timer = clock()
    try:
        explained = list(await refiner.refine(items, view, [v.scores for v in verdicts]))
        if len(explained) != len(items):
            raise ValueError(f"{len(explained)} explanations for {len(items)} items")
    except Exception as exc:  # noqa: BLE001 - the verdicts are known; only their reasons fail
        log.warning("explaining %d stopped preview(s) failed (%s); the policy's rules refine "
                    "them", len(items), type(exc).__name__)
        explained = [Explanation()] * len(items)
    ms = timer.ms()
    record.judge_ms += ms
    return [replace(v, thought=e.thought, refined_prompt=e.refined_prompt, latency_ms=ms)
            for v, e in zip(verdicts, explained, strict=True)]


class _Watch:
    """The handler a PreviewingBackend calls with each preview, and what it decided."""

    def __init__(self, backend: str, call: GenerationCall, judge: Judge, policy: Policy,
                 original: str, record: RoundRecord, slots: Sequence[int],
                 metrics: Metrics) -> None:
        self.backend = backend
        self.call = call
        self.judge = judge
        self.policy = policy
        self.original = original
        self.record = record
        self.slots = slots
        self.metrics = metrics
        self.stops: dict[int, tuple[Preview, Verdict]] = {}
        self.all_stopped = asyncio.Event()
        self.closed = False

    async def on_preview(self, preview: Preview) -> PreviewAction:
        if self.closed or preview.index in self.stops:
            return "stop"
        if not 0 <= preview.index < self.call.n:
            log.warning("backend %s showed a preview of image %d of %d; ignored", self.backend,
                        preview.index, self.call.n)
            return "continue"
        try:
            preview.image.validate()
        except (GuardError, ValueError):
            log.warning("backend %s showed a preview that does not decode; not judged",
                        self.backend)
            return "continue"
        item = JudgeInput(prompt=self.call.prompt, original_prompt=self.original,
                          image=preview.image)
        timer = clock()
        try:
            verdicts = await self.judge.judge([item], self.policy.verdict_only())
            if len(verdicts) != 1:
                raise ValueError(f"{len(verdicts)} verdicts for one preview")
        except Exception as exc:  # noqa: BLE001 - a failed preview costs nothing but itself
            log.warning("judging a preview of backend %s failed (%s); the final image will be "
                        "judged", self.backend, type(exc).__name__)
            return "continue"
        finally:
            self.metrics.judge_latency.labels(self.judge.id, "preview").observe(
                timer.ms() / 1000)
        verdict = verdicts[0]
        decision = self.policy.decide(verdict.scores)
        self.record.previews.append(JudgedPreview(
            slot=self.slots[preview.index], step=preview.step,
            image_sha256=preview.image.sha256, judge_id=verdict.judge_id,
            scores={k: round(v, 6) for k, v in verdict.scores.items()},
            flagged=list(decision.flagged), action=decision.action,
            judge_ms=round(timer.ms(), 3), stopped=decision.unsafe))
        self.metrics.previews.labels(self.backend,
                                     "stopped" if decision.unsafe else "continued").inc()
        if not decision.unsafe:
            return "continue"
        self.stops[preview.index] = (preview, verdict)
        if len(self.stops) == self.call.n:
            self.all_stopped.set()
        return "stop"
