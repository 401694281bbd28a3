"""The engine's loop (guard/pipeline/engine.py), in-process with guard.testing's fakes: every
branch of prescreen, generate, judge, refine and regenerate, as the images, the backend's prompts,
the decision and the trace show it. No sockets, no models; the whole file runs in under a second.

The fakes' rules here: a prompt naming a colour makes an image of it (FakeBackend); the judge
finds `gore` in a prompt or a red image violent (edit), `slur` or a green image hateful (refuse),
a yellow image shows a weapon (allowed, recorded), and refines by turning gore into paint and red
into blue.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from guard.core.config import RouteConfig
from guard.core.policy import Policy
from guard.core.types import GeneratedImage, GenerationCall, JudgeInput, Trace, Verdict
from guard.pipeline.engine import EditInputs, Engine, Outcome
from guard.pipeline.routing import Router
from guard.plugins import Backend, EditingBackend
from guard.support.errors import BackendError, BackendTimeout, JudgeError, PolicyViolation
from guard.support.telemetry import Metrics, Telemetry, TelemetryConfig
from guard.testing import (
    BLACK,
    GREEN,
    RED,
    WHITE,
    YELLOW,
    BackendCall,
    FakeBackend,
    FakeJudge,
    edited_from,
    png,
    prompt_of,
)

MODEL = "test-model"
POLICY: dict[str, Any] = {
    "id": "engine-test", "version": 1,
    "categories": {"violence": {"threshold": 0.5, "action": "edit"},
                   "hate": {"threshold": 0.5, "action": "refuse"},
                   "weapons": {"threshold": 0.5, "action": "allow"}},
    # What the rule refiner adds when the judge suggests nothing.
    "terms": {"violence": {"append": "calm and peaceful"}},
}
CALM = ", calm and peaceful"


def policy(**changes: Any) -> Policy:
    return Policy.model_validate({**POLICY, **changes})


DEFAULT = policy()


def soften(prompt: str) -> str:
    return prompt.replace("gore", "paint").replace("red", "blue")


def make_judge(refine: Callable[[str], str | None] = soften, delay_s: float = 0.0) -> FakeJudge:
    return FakeJudge(words={"gore": {"violence": 0.9}, "slur": {"hate": 0.95}},
                     colours={RED: {"violence": 0.9}, GREEN: {"hate": 0.99},
                              YELLOW: {"weapons": 0.7}},
                     refine=refine, delay_s=delay_s)


class Rig:
    """An engine as guard.pipeline.exchange.build_state builds it, over fakes."""

    def __init__(self, backend: Backend | None = None, judge: FakeJudge | None = None, *,
                 enabled: bool = True, fallback: Backend | None = None) -> None:
        self.backend = backend or FakeBackend()
        self.judge = judge or make_judge()
        backends = {b.name: b for b in (self.backend, fallback) if b is not None}
        router = Router(backends, {"*": RouteConfig(backend=self.backend.name)},
                        fallback.name if fallback else None)
        self.spans = InMemorySpanExporter()
        self.metrics = Metrics()
        self.engine = Engine(self.judge, router, Telemetry(TelemetryConfig(), self.spans),
                             self.metrics, enabled=enabled)
        self.trace = Trace()

    async def run(self, prompt: str, *, n: int = 1, policy: Policy = DEFAULT,
                  inputs: EditInputs | None = None) -> Outcome:
        self.trace = Trace()
        return await self.engine.run(GenerationCall(prompt=prompt, n=n, model=MODEL),
                                     self.engine.router.route(MODEL), policy, self.trace, inputs)

    @property
    def calls(self) -> list[BackendCall]:
        assert isinstance(self.backend, FakeBackend)
        return self.backend.calls

    def rounds(self) -> list[tuple[int, str]]:
        return [(r.index, r.kind) for r in self.trace.rounds]

    def actions(self) -> list[list[tuple[int, str]]]:
        """Per round, each judged item's slot and the action taken."""
        return [[(i.slot, i.action) for i in r.images] for r in self.trace.rounds]


def generated(prompt: str, n: int = 1) -> BackendCall:
    return BackendCall("generate", prompt, n, MODEL)


def made_from(outcome: Outcome) -> list[tuple[int, str | None, str]]:
    """Each returned image: its slot, the prompt the backend made it from, its decision."""
    return [(f.slot, prompt_of(f.image), f.decision) for f in outcome.images]


# --- a safe request ---------------------------------------------------------------------------

async def test_a_safe_prompt_is_generated_once_judged_in_one_batch_and_passed() -> None:
    rig = Rig(FakeBackend(delay_s=0.01), make_judge(delay_s=0.01))
    outcome = await rig.run("a blue apple", n=2)

    assert made_from(outcome) == [(0, "a blue apple", "passed"), (1, "a blue apple", "passed")]
    assert outcome.rounds == 1
    assert rig.calls == [generated("a blue apple", 2)]
    # The prompt alone first, then both images in one judge call.
    assert [[i.image is not None for i in batch] for batch in rig.judge.calls] == [
        [False], [True, True]]
    trace = rig.trace
    assert rig.rounds() == [(0, "prescreen"), (1, "generate")]
    assert rig.actions() == [[(0, "pass")], [(0, "pass"), (1, "pass")]]
    first = trace.rounds[1]
    assert first.backend == trace.backend == "fake" and first.error is None
    # Each call took its 10 ms (less a timer's tolerance), and the round says so.
    assert first.backend_ms > 5 and first.judge_ms > 5 and trace.rounds[0].judge_ms > 5
    # Verdict first: nothing unsafe, so the judge wrote no thought and no refined prompt.
    assert all(i.thought == "" and i.refined_prompt is None and i.judge_id == "fake"
               for r in trace.rounds for i in r.images)
    assert first.images[0].scores == {"violence": 0.0, "hate": 0.0, "weapons": 0.0}
    assert [(r.slot, r.decision, r.rounds, r.image_sha256) for r in trace.results] == [
        (0, "passed", 1, outcome.images[0].image.sha256),
        (1, "passed", 1, outcome.images[1].image.sha256)]
    assert trace.categories == [] and trace.retained_images == {}
    names = [s.name for s in rig.spans.get_finished_spans()]
    assert sorted(names) == ["guard.backend", "guard.judge", "guard.judge", "guard.round"]
    assert rig.metrics.registry.get_sample_value("guard_rounds_sum") == 1


# --- prescreen --------------------------------------------------------------------------------

async def test_a_prompt_in_a_refuse_category_is_refused_before_any_generation() -> None:
    rig = Rig()
    with pytest.raises(PolicyViolation) as info:
        await rig.run("a slur on a wall", n=2)

    assert info.value.categories == ("hate",) and "the prompt" in info.value.message
    assert rig.calls == []
    assert rig.rounds() == [(0, "prescreen")]
    (screened,) = rig.trace.rounds[0].images
    assert (screened.action, screened.flagged, screened.image_sha256) == ("refuse", ["hate"], None)
    assert rig.trace.categories == ["hate"] and rig.trace.results == []


async def test_a_prompt_in_an_edit_category_is_refined_before_the_first_generation() -> None:
    rig = Rig()
    outcome = await rig.run("gore on a blue wall")

    assert made_from(outcome) == [(0, "paint on a blue wall", "edited")]
    assert rig.calls == [generated("paint on a blue wall")]
    screened = rig.trace.rounds[0].images[0]
    assert (screened.action, screened.flagged) == ("edit", ["violence"])
    assert screened.refined_prompt == "paint on a blue wall" and "violence" in screened.thought
    # The judge sees how the image came about: the original prompt and the prescreen's verdict.
    (item,) = rig.judge.calls[1]
    assert (item.prompt, item.original_prompt) == ("paint on a blue wall", "gore on a blue wall")
    assert [(h.prompt, h.flagged) for h in item.history] == [
        ("gore on a blue wall", ("violence",))]
    (result,) = rig.trace.results
    assert (result.decision, result.prompt, result.categories) == (
        "edited", "paint on a blue wall", ["violence"])


async def test_without_prescreen_the_prompt_goes_straight_to_the_backend() -> None:
    rig = Rig()
    outcome = await rig.run("gore on a blue wall", policy=policy(prescreen=False))

    # Found in the image's round instead, and regenerated from the judge's refined prompt.
    assert made_from(outcome) == [(0, "paint on a blue wall", "edited")]
    assert rig.calls == [generated("gore on a blue wall"), generated("paint on a blue wall")]
    assert rig.rounds() == [(1, "generate"), (2, "generate")]


# --- regeneration -----------------------------------------------------------------------------

async def test_only_the_unsafe_slot_is_regenerated() -> None:
    rig = Rig(FakeBackend(overrides={2: RED}))  # the third image comes out red
    outcome = await rig.run("a blue apple", n=4)

    # The judge suggested nothing for "a blue apple", so the policy's terms refined it.
    refined = "a blue apple" + CALM
    assert made_from(outcome) == [(0, "a blue apple", "passed"), (1, "a blue apple", "passed"),
                                  (2, refined, "edited"), (3, "a blue apple", "passed")]
    assert outcome.rounds == 2
    assert rig.calls == [generated("a blue apple", 4), generated(refined, 1)]
    assert [len(batch) for batch in rig.judge.calls] == [1, 4, 1]
    (again,) = rig.judge.calls[2]
    assert [(h.prompt, h.flagged) for h in again.history] == [("a blue apple", ("violence",))]
    assert rig.actions() == [[(0, "pass")],
                             [(0, "pass"), (1, "pass"), (2, "edit"), (3, "pass")],
                             [(2, "pass")]]
    unsafe = rig.trace.rounds[1].images[2]
    assert unsafe.scores["violence"] == 0.9 and unsafe.thought and unsafe.refined_prompt is None
    assert [(r.decision, r.rounds, r.categories) for r in rig.trace.results] == [
        ("passed", 1, []), ("passed", 1, []), ("edited", 2, ["violence"]), ("passed", 1, [])]
    assert rig.trace.categories == ["violence"]
    assert rig.metrics.registry.get_sample_value(
        "guard_category_flags_total", {"category": "violence", "action": "edit"}) == 1


async def test_unsafe_slots_with_the_same_refined_prompt_share_one_backend_call() -> None:
    rig = Rig(FakeBackend(overrides={0: RED, 2: RED}))
    outcome = await rig.run("a blue apple", n=3)

    refined = "a blue apple" + CALM
    assert rig.calls == [generated("a blue apple", 3), generated(refined, 2)]
    assert [d for _, _, d in made_from(outcome)] == ["edited", "passed", "edited"]


async def test_refine_mode_edit_repairs_the_unsafe_image_instead_of_regenerating() -> None:
    rig = Rig(FakeBackend(overrides={0: RED}))
    outcome = await rig.run("a red apple", policy=policy(refine_mode="edit"))

    assert made_from(outcome) == [(0, "a blue apple", "edited")]
    first, repair = rig.calls
    assert first == generated("a red apple")
    # The unsafe image itself went back to the backend, with the judge's refined prompt.
    assert (repair.kind, repair.prompt, repair.mask) == ("edit", "a blue apple", None)
    unsafe_sha = rig.trace.rounds[1].images[0].image_sha256
    assert [hashlib.sha256(i).hexdigest() for i in repair.images] == [unsafe_sha]
    assert edited_from(outcome.images[0].image) == unsafe_sha


class GenerateOnly:
    """A backend that cannot edit: FakeBackend's generate alone."""

    def __init__(self, inner: FakeBackend) -> None:
        self.inner, self.name = inner, inner.name

    async def generate(self, call: GenerationCall) -> list[GeneratedImage]:
        return await self.inner.generate(call)

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


async def test_refine_mode_edit_regenerates_where_the_backend_cannot_edit() -> None:
    inner = FakeBackend(overrides={0: RED})
    backend = GenerateOnly(inner)
    assert isinstance(backend, Backend) and not isinstance(backend, EditingBackend)
    rig = Rig(backend)
    outcome = await rig.run("a red apple", policy=policy(refine_mode="edit"))

    assert made_from(outcome) == [(0, "a blue apple", "edited")]
    assert inner.calls == [generated("a red apple"), generated("a blue apple")]


async def test_an_edit_request_edits_the_clients_images_in_every_round() -> None:
    rig = Rig(FakeBackend(overrides={0: RED}))
    inputs = EditInputs(images=(png(WHITE),), mask=png(BLACK))
    outcome = await rig.run("a red hat", inputs=inputs)

    assert made_from(outcome) == [(0, "a blue hat", "edited")]
    # Regenerating an edit means editing the client's image again, with the refined prompt.
    assert [(c.kind, c.prompt, c.images, c.mask) for c in rig.calls] == [
        ("edit", "a red hat", inputs.images, inputs.mask),
        ("edit", "a blue hat", inputs.images, inputs.mask)]


# --- refusals on the way ----------------------------------------------------------------------

async def test_an_image_in_a_refuse_category_refuses_the_request_at_once() -> None:
    rig = Rig(FakeBackend(overrides={1: GREEN}))
    with pytest.raises(PolicyViolation) as info:
        await rig.run("a blue apple", n=2, policy=policy(rounds={"max": 3}))

    assert info.value.categories == ("hate",) and "image 1" in info.value.message
    assert rig.calls == [generated("a blue apple", 2)]  # no second round
    assert rig.actions()[-1] == [(0, "pass"), (1, "refuse")]
    assert rig.trace.categories == ["hate"]


async def test_a_refusal_records_every_verdict_of_its_call_and_serves_nothing() -> None:
    rig = Rig(FakeBackend(overrides={1: GREEN}))  # slot 1 is hateful; 0 and 2 are fine
    with pytest.raises(PolicyViolation):
        await rig.run("a blue apple", n=3)

    # The slot judged after the refused one is in the trace too (its verdict was paid for).
    assert rig.actions()[-1] == [(0, "pass"), (1, "refuse"), (2, "pass")]
    # No image left the proxy: the slots judged safe share the request's fate in the results.
    assert {r.decision for r in rig.trace.results} == {"refused"}
    assert [r.slot for r in rig.trace.results] == [0, 2]


async def test_an_allowed_category_is_recorded_and_the_image_served() -> None:
    rig = Rig(FakeBackend(overrides={0: YELLOW}))
    outcome = await rig.run("a blue apple")

    assert made_from(outcome) == [(0, "a blue apple", "passed")]
    assert rig.trace.rounds[1].images[0].flagged == ["weapons"]
    assert rig.trace.categories == ["weapons"] and rig.trace.results[0].categories == ["weapons"]


@pytest.mark.parametrize(("retention", "kept"), [("none", []), ("flagged", [1]),
                                                  ("all", [0, 1])])
async def test_the_policy_chooses_which_images_the_trace_retains(retention: str,
                                                                  kept: list[int]) -> None:
    rig = Rig(FakeBackend(overrides={1: YELLOW}))
    outcome = await rig.run("a blue apple", n=2, policy=policy(image_retention=retention))
    assert sorted(rig.trace.retained_images) == sorted(outcome.images[s].image.sha256 for s in kept)


# --- out of rounds ----------------------------------------------------------------------------

def stubborn() -> tuple[FakeBackend, FakeJudge]:
    """Every apple comes out red; each refined prompt is new, and never helps."""
    return (FakeBackend(colours={"apple": RED}),
            make_judge(refine=lambda prompt: prompt + ", softer"))


async def test_on_exhausted_refuse_refuses_after_the_last_round() -> None:
    backend, judge = stubborn()
    rig = Rig(backend, judge)
    with pytest.raises(PolicyViolation) as info:
        await rig.run("an apple", policy=policy(rounds={"max": 3, "on_exhausted": "refuse"}))

    assert info.value.categories == ("violence",) and "after 3 rounds" in info.value.message
    assert backend.prompts == ["an apple", "an apple, softer", "an apple, softer, softer"]
    assert rig.rounds() == [(0, "prescreen"), (1, "generate"), (2, "generate"), (3, "generate")]
    assert rig.actions()[1:] == [[(0, "edit")]] * 3
    assert rig.trace.results == []


async def test_on_exhausted_drop_returns_the_safe_images_and_records_the_dropped_one() -> None:
    # Slot 1 comes out red in every one of its rounds (images 1, 2 and 3 of this backend).
    backend = FakeBackend(overrides={1: RED, 2: RED, 3: RED})
    rig = Rig(backend, make_judge(refine=lambda prompt: prompt + ", softer"))
    outcome = await rig.run("a blue apple", n=2,
                            policy=policy(rounds={"max": 3, "on_exhausted": "drop"}))

    assert made_from(outcome) == [(0, "a blue apple", "passed")]
    assert backend.prompts == ["a blue apple", "a blue apple, softer",
                               "a blue apple, softer, softer"]
    assert [c.n for c in backend.calls] == [2, 1, 1]
    assert [(r.slot, r.decision, r.rounds, r.categories) for r in rig.trace.results] == [
        (0, "passed", 1, []), (1, "refused", 3, ["violence"])]
    assert rig.trace.results[1].image_sha256 is None  # nothing of it left the guard


async def test_on_exhausted_drop_still_refuses_when_no_image_is_left() -> None:
    backend, judge = stubborn()
    rig = Rig(backend, judge)
    with pytest.raises(PolicyViolation) as info:
        await rig.run("an apple", n=2, policy=policy(rounds={"max": 2, "on_exhausted": "drop"}))

    assert "2 image(s) after 2 rounds" in info.value.message
    assert [c.n for c in backend.calls] == [2, 2]


# --- failures ---------------------------------------------------------------------------------

async def test_a_failing_judge_refuses_before_generating_when_the_policy_says_refuse() -> None:
    rig = Rig()
    rig.judge.fail(JudgeError("judge down", detail="connection refused"))
    with pytest.raises(JudgeError) as info:
        await rig.run("a blue apple")

    assert "not served" in info.value.message
    assert rig.calls == []
    assert rig.trace.rounds[0].error == "judge error: judge down (connection refused)"


async def test_a_judge_failing_on_the_images_refuses_them_when_the_policy_says_refuse() -> None:
    rig = Rig()
    rig.judge.fail(JudgeError("judge down"))
    with pytest.raises(JudgeError):
        await rig.run("a blue apple", policy=policy(prescreen=False))

    assert rig.calls == [generated("a blue apple")]  # made, then never served
    assert rig.trace.rounds[0].error == "judge error: judge down"
    assert rig.trace.results == []


async def test_a_failing_judge_lets_images_through_unjudged_when_the_policy_says_allow() -> None:
    rig = Rig()
    rig.judge.fail(JudgeError("judge down"))
    outcome = await rig.run("a blue apple", n=2, policy=policy(on_judge_error="allow"))

    assert made_from(outcome) == [(0, "a blue apple", "passed"), (1, "a blue apple", "passed")]
    assert rig.calls == [generated("a blue apple", 2)]
    assert [r.error for r in rig.trace.rounds] == ["judge error: judge down"] * 2
    assert {i.judge_id for r in rig.trace.rounds for i in r.images} == {
        "(judge failed; allowed by policy)"}
    assert [r.decision for r in rig.trace.results] == ["passed", "passed"]


class Forgetful(FakeJudge):
    """A judge with a bug: it loses the last verdict of every batch."""

    async def judge(self, items: Sequence[JudgeInput], policy: Policy) -> list[Verdict]:
        return (await super().judge(items, policy))[:-1]


async def test_a_judge_answering_too_few_verdicts_has_failed() -> None:
    rig = Rig(judge=Forgetful())
    with pytest.raises(JudgeError):
        await rig.run("a blue apple")
    assert rig.calls == []
    assert rig.trace.rounds[0].error == "judge error: judge returned 0 verdicts for 1 items"


class Stingy(FakeBackend):
    """A backend with a bug: one image fewer than asked for."""

    async def generate(self, call: GenerationCall) -> list[GeneratedImage]:
        return (await super().generate(call))[:-1]


async def test_a_backend_returning_too_few_images_has_failed() -> None:
    rig = Rig(Stingy())
    with pytest.raises(BackendError) as info:
        await rig.run("a blue apple", n=2)
    assert info.value.code == "backend_bad_response"
    assert len(rig.judge.calls) == 1  # the prescreen; no image was judged


@pytest.mark.parametrize("on_judge_error", ["refuse", "allow"])
async def test_a_failing_backend_fails_the_request_whatever_on_judge_error_says(
        on_judge_error: str) -> None:
    rig = Rig()
    timeout = BackendTimeout("The image backend timed out.")
    assert isinstance(rig.backend, FakeBackend)
    rig.backend.fail(timeout)
    with pytest.raises(BackendTimeout) as info:
        await rig.run("a blue apple", policy=policy(on_judge_error=on_judge_error))

    assert info.value is timeout
    assert len(rig.calls) == 1 and len(rig.judge.calls) == 1  # the prescreen only
    assert rig.rounds() == [(0, "prescreen"), (1, "generate")]
    assert rig.trace.rounds[1].images == [] and rig.trace.results == []


async def test_a_failing_backend_is_replaced_by_the_fallback_and_the_trace_says_so() -> None:
    primary, spare = FakeBackend("primary"), FakeBackend("spare")
    primary.fail(BackendError("The image backend failed."))
    rig = Rig(primary, fallback=spare)
    outcome = await rig.run("a blue apple")

    assert made_from(outcome) == [(0, "a blue apple", "passed")]
    assert len(primary.calls) == 1 and spare.prompts == ["a blue apple"]
    assert rig.trace.rounds[1].backend == rig.trace.backend == "spare"


# --- passthrough ------------------------------------------------------------------------------

async def test_a_disabled_guard_passes_the_backends_images_through_unjudged() -> None:
    rig = Rig(enabled=False)
    outcome = await rig.run("a slur in green", n=2, policy=policy(rounds={"max": 3}))

    assert made_from(outcome) == [(0, "a slur in green", "passed"),
                                  (1, "a slur in green", "passed")]
    assert rig.judge.calls == []
    assert rig.calls == [generated("a slur in green", 2)]
    assert rig.rounds() == [(1, "generate")] and rig.actions() == [[]]
    assert [(r.decision, r.image_sha256) for r in rig.trace.results] == [("passed", None)] * 2
