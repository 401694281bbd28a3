"""One backend call with its previews judged as they arrive, stopped at an unsafe one (issue 18).

A PreviewingBackend (guard.plugins) shows partial images while it generates: OpenAI's streamed
`partial_images`, a diffusers pipeline's `preview_steps`. Each preview is judged as it arrives,
verdict only (`policy.verdict_only()`: no reasoning, no refined prompt), and decided by
`policy.decide`. An unsafe one stops that image's generation at once; once every image of the call
is stopped, the call is cancelled here without waiting for the backend to notice.

The stopping preview then stands in for its image: the engine judges it as it judges every image
(now with the explanation), so the slot is unsafe with that verdict and its refined prompt comes
from the judge as for a final image. Nothing unjudged reaches the client: previews judged safe are
dropped, and an image that was not stopped is judged as the final image always is.

Previews only ever stop a generation sooner. A preview that does not decode, or whose judging
fails, is recorded nowhere and changes nothing: the final image, judged under the policy's
`on_judge_error`, still decides. Each judged preview is recorded on the round
(`RoundRecord.previews`, `stopped` on the one that stopped its generation) and counted in
`guard_previews_total{backend,outcome}`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from guard.core.policy import Policy
from guard.core.types import (
    GeneratedImage,
    GenerationCall,
    JudgedPreview,
    JudgeInput,
    RoundRecord,
    clock,
)
from guard.pipeline.routing import Route, Router
from guard.plugins import Judge, Preview, PreviewAction
from guard.support.errors import BackendError, GuardError
from guard.support.telemetry import Metrics

log = logging.getLogger("safeedit.previews")


async def generate_judging_previews(
        router: Router, route: Route, call: GenerationCall, *, judge: Judge | None,
        policy: Policy | None, original: str, record: RoundRecord, slots: Sequence[int],
        metrics: Metrics) -> tuple[str, list[GeneratedImage]]:
    """`router.generate(route, call)`, with the previews of a backend that shows them judged.

    Returns the backend used and one image per image of the call: the final image, or the
    unsafe preview that stopped it. `slots[i]` is the slot image i of the call fills (for the
    trace); no `judge` (the guard switched off) or no `policy` judges nothing.
    """
    if judge is None or policy is None or not router.shows_previews(route, call):
        return await router.generate(route, call)
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
    if len(watch.stops) == call.n:
        # The previews decided every image: whatever the backend did after that is moot.
        done = not making.cancelled() and making.exception() is None
        return (making.result()[0] if done else route.backend), [
            watch.stops[i].image for i in range(call.n)]
    used, made = making.result()
    images: list[GeneratedImage] = []
    for i, image in enumerate(made):
        stop = watch.stops.get(i)
        if stop is not None:
            images.append(stop.image)
        elif image is None:
            raise BackendError(f"backend {used!r} stopped an image nobody asked it to stop",
                               code="backend_bad_response")
        else:
            images.append(image)
    return used, images


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
        self.stops: dict[int, Preview] = {}
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
        self.stops[preview.index] = preview
        if len(self.stops) == self.call.n:
            self.all_stopped.set()
        return "stop"
