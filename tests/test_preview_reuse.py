"""A stopped preview's verdict is reused: the image it stands in for is not judged again where
no explanation can be used, and a Refiner judge explains it from the preview's scores (issue 18).

In-process, through the engine, with tests/test_partials.py's previewing backend and guard.testing's
judge; judge calls are counted from the judge's own record of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from guard.core.config import RouteConfig
from guard.core.policy import Policy
from guard.core.types import GenerationCall, JudgeInput, Trace, Verdict
from guard.pipeline.engine import Engine
from guard.pipeline.routing import Router
from guard.pipeline.run import Outcome
from guard.plugins import Explanation, Judge, Refiner
from guard.support.errors import PolicyViolation
from guard.support.telemetry import Metrics, Telemetry, TelemetryConfig
from guard.testing import BLUE, RED, FakeJudge, colour_of
from tests.test_partials import POLICY, PreviewingFake


class RefiningJudge:
    """A judge with an explain-only path, as the builtin judge has: guard.testing's judge scores,
    and `refine` writes the thought and refined prompt for scores it is handed."""

    def __init__(self, scorer: FakeJudge, delay_s: float = 0.0) -> None:
        self.scorer = scorer
        self.id = scorer.id
        self.delay_s = delay_s
        self.refined: list[tuple[str, dict[str, float]]] = []

    async def judge(self, items: Sequence[JudgeInput], policy: Policy) -> list[Verdict]:
        return await self.scorer.judge(items, policy)

    async def refine(self, items: Sequence[JudgeInput], policy: Policy,
                     scores: Sequence[Mapping[str, float]]) -> list[Explanation]:
        await asyncio.sleep(self.delay_s)
        out = []
        for item, item_scores in zip(items, scores, strict=True):
            self.refined.append((item.prompt, dict(item_scores)))
            if not policy.wants_explanation(item_scores):
                out.append(Explanation())
                continue
            out.append(Explanation("the apple looks violent",
                                   item.prompt.replace("red", "blue")))
        return out

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


def engine_with(judge: Judge, backend: PreviewingFake | None = None) -> Engine:
    backend = backend or PreviewingFake()
    router = Router({backend.name: backend}, {"*": RouteConfig(backend=backend.name)})
    return Engine(judge, router, Telemetry(TelemetryConfig()), Metrics())


def judged_times(judge: FakeJudge, sha256: str) -> int:
    """How many times the judge was shown the image with this sha256."""
    return sum(1 for call in judge.calls for item in call
               if item.image is not None and item.image.sha256 == sha256)


async def run(engine: Engine, prompt: str, policy: Policy = POLICY) -> tuple[Outcome, Trace]:
    trace = Trace()
    outcome = await engine.run(GenerationCall(prompt=prompt, n=1, model="m"),
                               engine.router.route("m"), policy, trace)
    return outcome, trace


async def test_a_refused_preview_refuses_with_its_one_verdict() -> None:
    judge = FakeJudge(colours={RED: {"hate": 0.9}})
    engine = engine_with(judge)
    trace = Trace()
    with pytest.raises(PolicyViolation) as info:
        await engine.run(GenerationCall(prompt="a red apple", n=1, model="m"),
                         engine.router.route("m"), POLICY, trace)
    assert info.value.categories == ("hate",)
    [preview] = trace.rounds[0].previews
    assert preview.stopped and preview.action == "refuse"
    assert len(judge.calls) == 1 and judged_times(judge, preview.image_sha256) == 1
    # The round's record of the image is the preview's verdict, at no further judging time.
    [image] = trace.rounds[0].images
    assert (image.image_sha256, image.scores, image.judge_id, image.action, image.judge_ms) == (
        preview.image_sha256, preview.scores, preview.judge_id, "refuse", 0.0)


async def test_on_the_last_round_a_stopped_preview_is_not_judged_again() -> None:
    judge = FakeJudge(colours={RED: {"violence": 0.9}}, refine=lambda p: f"{p}, calm")
    engine = engine_with(judge)
    policy = POLICY.model_copy(update={"rounds": POLICY.rounds.model_copy(update={"max": 2})})
    trace = Trace()
    with pytest.raises(PolicyViolation):
        await engine.run(GenerationCall(prompt="a red apple", n=1, model="m"),
                         engine.router.route("m"), policy, trace)
    first, last = trace.rounds
    assert [p.stopped for p in first.previews] == [True] == [p.stopped for p in last.previews]
    # Round 1 still judges its preview again to explain it (the fake judge has no refine);
    # round 2 is the last: its refined prompt could never be used, so its preview's verdict is
    # the image's. (Both rounds' previews are the same red PNG: calls are told apart by prompt.)
    assert first.images[0].refined_prompt == "a red apple, calm"
    assert [[i.prompt for i in call] for call in judge.calls] == [
        ["a red apple"], ["a red apple"], ["a red apple, calm"]]
    assert (last.images[0].scores, last.images[0].judge_ms) == (last.previews[0].scores, 0.0)


async def test_a_refiner_explains_the_stopped_preview_from_its_scores() -> None:
    scorer = FakeJudge(colours={RED: {"violence": 0.9}})
    judge = RefiningJudge(scorer, delay_s=0.02)
    assert isinstance(judge, Refiner)
    backend = PreviewingFake()
    engine = engine_with(judge, backend)
    outcome, trace = await run(engine, "a red apple")
    assert [(f.decision, colour_of(f.image.data)) for f in outcome.images] == [("edited", BLUE)]
    assert backend.prompts == ["a red apple", "a blue apple"]
    first, second = trace.rounds
    [preview] = first.previews
    assert judged_times(scorer, preview.image_sha256) == 1  # the preview's verdict only
    assert judge.refined == [("a red apple", preview.scores)]
    [image] = first.images
    assert (image.scores, image.judge_id, image.action) == (preview.scores, "fake", "edit")
    assert (image.thought, image.refined_prompt) == ("the apple looks violent", "a blue apple")
    assert image.judge_ms >= 20  # the refine call's time, nothing else's
    assert second.images[0].refined_by == "fake"


async def test_a_judge_without_refine_still_judges_the_stopped_preview_to_explain_it() -> None:
    judge = FakeJudge(colours={RED: {"violence": 0.9}}, refine=lambda p: p.replace("red", "blue"))
    engine = engine_with(judge)
    outcome, trace = await run(engine, "a red apple")
    assert outcome.images[0].decision == "edited"
    first = trace.rounds[0]
    sha = first.previews[0].image_sha256
    assert judged_times(judge, sha) == 2  # the preview's verdict, then the stand-in explained
    assert first.images[0].image_sha256 == sha
    assert first.images[0].refined_prompt == "a blue apple"


async def test_a_refiner_that_fails_leaves_the_preview_unsafe_and_the_rules_refine() -> None:
    scorer = FakeJudge(colours={RED: {"violence": 0.9}})

    class Failing(RefiningJudge):
        async def refine(self, *args: Any) -> list[Explanation]:
            raise RuntimeError("refiner down")

    engine = engine_with(Failing(scorer))
    policy = Policy.model_validate({
        **POLICY.model_dump(), "terms": {"violence": {"strong": ["red"], "rewrites": {"red": "blue"}}}})
    outcome, trace = await run(engine, "a red apple", policy)
    [preview] = trace.rounds[0].previews
    assert judged_times(scorer, preview.image_sha256) == 1
    [image] = trace.rounds[0].images
    assert (image.action, image.thought, image.refined_prompt) == ("edit", "", None)
    assert trace.rounds[1].images[0].refined_by == "rules"
    assert outcome.images[0].decision == "edited"
