"""The loop's latency mechanisms (issue 18), in-process with guard.testing's fakes: no wasted
explanation or repeated prompt, the prescreen beside round 1, the deadline, slots on their own
clocks, hedging. The same fakes' rules as tests/test_engine.py: a prompt naming a colour makes an
image of it; `gore` or a red (or black) image is violent (edit), `slur` or a green image hateful
(refuse)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from guard.cli import main
from guard.core.config import RouteConfig
from guard.core.policy import Policy
from guard.core.refiner import next_refinement, normalise
from guard.core.types import (
    GeneratedImage,
    GenerationCall,
    JudgedImage,
    JudgeInput,
    RoundRecord,
    Trace,
    TraceError,
    Verdict,
)
from guard.offline.replay import redecide
from guard.pipeline.deadline import Estimates, effective
from guard.pipeline.engine import Engine, Outcome
from guard.pipeline.routing import Router
from guard.support.errors import DeadlineExceeded, PolicyViolation
from guard.support.telemetry import Metrics, Telemetry, TelemetryConfig
from guard.testing import BLACK, GREEN, RED, FakeBackend, FakeJudge, colour_of, prompt_of

MODEL = "test-model"
POLICY: dict[str, Any] = {
    "id": "latency-test", "version": 1,
    "categories": {"violence": {"threshold": 0.5, "action": "edit"},
                   "hate": {"threshold": 0.5, "action": "refuse"}},
    "terms": {"violence": {"append": "calm and peaceful"}},
}


def policy(**changes: Any) -> Policy:
    raw = {**POLICY, **changes}
    if "rounds" in changes:
        raw["rounds"] = {"max": 3, **changes["rounds"]}
    return Policy.model_validate(raw)


DEFAULT = policy()


def make_judge(refine: Callable[[str], str | None] | None = None, delay_s: float = 0.0,
               judge_id: str = "fake") -> FakeJudge:
    return FakeJudge(words={"gore": {"violence": 0.9}, "slur": {"hate": 0.95}},
                     colours={RED: {"violence": 0.9}, BLACK: {"violence": 0.9},
                              GREEN: {"hate": 0.99}},
                     refine=refine, delay_s=delay_s, judge_id=judge_id)


class TimedBackend(FakeBackend):
    """A FakeBackend whose calls take `slow_s` when the prompt has a word of `slow_words`,
    recording when each call started and ended."""

    def __init__(self, *, slow_words: Sequence[str] = (), slow_s: float = 0.0,
                 **kw: Any) -> None:
        super().__init__(**kw)
        self.slow_words, self.slow_s = tuple(slow_words), slow_s
        self.spans: list[tuple[str, float, float | None]] = []

    async def generate(self, call: GenerationCall) -> list[GeneratedImage]:
        started = time.perf_counter()
        self.spans.append((call.prompt, started, None))
        if any(w in call.prompt.split() for w in self.slow_words):
            await asyncio.sleep(self.slow_s)
        images = await super().generate(call)
        self.spans[self.spans.index((call.prompt, started, None))] = (
            call.prompt, started, time.perf_counter())
        return images


class Rig:
    def __init__(self, backend: FakeBackend | None = None, judge: FakeJudge | None = None
                 ) -> None:
        self.backend = backend or FakeBackend()
        self.judge = judge or make_judge()
        router = Router({self.backend.name: self.backend},
                        {"*": RouteConfig(backend=self.backend.name)}, None)
        self.metrics = Metrics()
        self.engine = Engine(self.judge, router, Telemetry(TelemetryConfig()), self.metrics)
        self.trace = Trace()

    async def run(self, prompt: str, *, n: int = 1, policy: Policy = DEFAULT,
                  deadline_s: float | None = None) -> Outcome:
        self.trace = Trace()
        return await self.engine.run(GenerationCall(prompt=prompt, n=n, model=MODEL),
                                     self.engine.router.route(MODEL), policy, self.trace,
                                     deadline_s=deadline_s)

    def judged(self) -> list[JudgedImage]:
        return [i for r in self.trace.rounds if r.kind != "prescreen" for i in r.images]

    def image_batches(self) -> list[list[JudgeInput]]:
        return [b for b in self.judge.calls if b[0].image is not None]


# --- no wasted work: explanations -------------------------------------------------------------

def test_the_new_policy_fields_are_validated_in_the_officers_words(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("id: p\nversion: 1\nprescreen: sometimes\ncategories:\n"
                    "  violence: {threshold: 0.5, action: edit}\nrounds: {deadline_s: -1}\n"
                    "hedge: {band: [0.8, 0.2]}\n")
    assert main(["policy", "validate", str(path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"{path}:3:12: error: prescreen: got 'sometimes'; allowed: one of true, false, "
        "concurrent",
        f"{path}:6:22: error: rounds.deadline_s: got -1; allowed: a number above 0 or nothing "
        "(null)",
        f"{path}:7:15: error: hedge.band: Value error, the band is [low, high] with 0 <= low < "
        "high <= 1 (got a list); allowed: [a number, a number]"]
    ok = policy(prescreen="concurrent", rounds={"deadline_s": 2.5}, hedge={"band": [0.3, 0.7]})
    assert (ok.prescreen, ok.rounds.deadline_s, ok.hedge and ok.hedge.band) == (
        "concurrent", 2.5, (0.3, 0.7))
    assert policy().hedge is None and policy().rounds.deadline_s is None


def test_wants_explanation_only_where_a_refined_prompt_can_be_used() -> None:
    p = policy(rounds={"max": 2})
    assert p.wants_explanation({"violence": 0.9})
    assert p.wants_explanation({"violence": 0.9}, at_round=1)
    assert not p.wants_explanation({"violence": 0.9}, at_round=2)  # the last round
    assert not p.wants_explanation({"violence": 0.9, "hate": 0.9})  # refused: never refined
    assert not p.wants_explanation({"violence": 0.1})
    view = p.verdict_only()
    assert view is p.verdict_only() and view.verdict_only() is view
    assert not view.wants_explanation({"violence": 0.9})
    assert view.decide({"violence": 0.9}) == p.decide({"violence": 0.9})


async def test_the_last_round_asks_the_judge_for_a_verdict_only() -> None:
    rig = Rig(judge=make_judge(refine=lambda p: p + " again"))
    with pytest.raises(PolicyViolation):
        await rig.run("a red car", policy=policy(rounds={"max": 2}))

    first, last = rig.judged()
    assert first.action == last.action == "edit"
    assert first.thought and first.refined_prompt == "a red car again"
    # Round 2 is the last: its refined prompt could never be used, so none was asked for.
    assert (last.round, last.thought, last.refined_prompt) == (2, "", None)
    assert rig.backend.prompts == ["a red car", "a red car again"]


async def test_a_refuse_decision_asks_for_no_explanation() -> None:
    rig = Rig(judge=make_judge(refine=lambda p: p + " again"))
    with pytest.raises(PolicyViolation) as info:
        await rig.run("a green flag")

    assert info.value.categories == ("hate",)
    (image,) = rig.judged()
    assert (image.action, image.thought, image.refined_prompt) == ("refuse", "", None)


# --- no wasted work: repeated prompts ---------------------------------------------------------

def test_a_prompt_already_tried_is_skipped_for_the_next_refiner_in_line() -> None:
    p = policy()
    tried = {normalise("A red car!")}
    assert normalise("  a RED   car. ") == normalise("a red car") == "a red car"
    # The judge's prompt is a repeat: the rule refiner's rewrite of the current prompt comes next.
    assert next_refinement("A red car!", "a red car", ("violence",), p, tried) == (
        "A red car!, calm and peaceful", False)
    assert next_refinement("a red car", "a blue car", ("violence",), p, tried) == (
        "a blue car", True)
    tried.add(normalise("A red car!, calm and peaceful"))
    assert next_refinement("A red car!, calm and peaceful", "a red car", ("violence",), p,
                           tried) is None


async def test_a_refined_prompt_equal_to_one_tried_is_never_generated_again() -> None:
    # The judge keeps suggesting the prompt it was given, give or take punctuation.
    rig = Rig(judge=make_judge(refine=lambda p: p.rstrip("!").upper() + "."))
    with pytest.raises(PolicyViolation) as info:
        await rig.run("a red car!", policy=policy(rounds={"max": 5}))

    # The rule refiner had one new prompt; after it nothing new was left: refused at once,
    # after two rounds of five, and no prompt generated twice.
    assert rig.backend.prompts == ["a red car!", "a red car!, calm and peaceful"]
    assert "nothing new to try" in info.value.message
    assert [(i.round, i.refined_by) for i in rig.judged()] == [(1, None), (2, "rules")]
    assert rig.trace.round_count() == 2


async def test_a_stuck_slot_is_dropped_at_once_and_the_others_are_served() -> None:
    rig = Rig(FakeBackend(overrides={0: RED}), make_judge(refine=lambda p: p))
    outcome = await rig.run("a grey car", n=2,
                            policy=policy(terms={}, rounds={"on_exhausted": "drop"}))

    assert [(f.slot, f.decision) for f in outcome.images] == [(1, "passed")]
    assert rig.backend.prompts == ["a grey car"]  # nothing new for slot 0: no second round
    assert [(r.slot, r.decision, r.rounds) for r in rig.trace.results] == [
        (0, "refused", 1), (1, "passed", 1)]


# --- prescreen beside round 1 -----------------------------------------------------------------

async def test_a_concurrent_prescreen_judges_the_prompt_while_round_1_generates() -> None:
    backend = TimedBackend(slow_words=("car",), slow_s=0.3)
    rig = Rig(backend, make_judge(delay_s=0.3))
    t0 = time.perf_counter()
    outcome = await rig.run("a blue car", policy=policy(prescreen="concurrent"))

    assert [(f.decision, prompt_of(f.image)) for f in outcome.images] == [("passed", "a blue car")]
    (prompt, started, _), = backend.spans
    assert started - t0 < 0.15  # not after the 0.3 s prescreen
    assert [(r.index, r.kind, r.cancelled) for r in rig.trace.rounds] == [
        (0, "prescreen", None), (1, "generate", None)]
    assert len(rig.judge.calls) == 2


@pytest.mark.parametrize(("prompt", "action"), [("gore on a blue car", "edit"),
                                                ("a slur on a blue car", "refuse")])
async def test_a_concurrent_prescreen_cancels_round_1_when_the_prompt_is_not_safe(
        prompt: str, action: str) -> None:
    backend = TimedBackend(slow_words=("car",), slow_s=0.5)
    rig = Rig(backend, make_judge(refine=lambda p: p.replace("gore", "paint"), delay_s=0.1))
    p = policy(prescreen="concurrent")
    if action == "refuse":
        with pytest.raises(PolicyViolation):
            await rig.run(prompt, policy=p)
    else:
        outcome = await rig.run(prompt, policy=p)
        assert [prompt_of(f.image) for f in outcome.images] == ["paint on a blue car"]

    # The cancelled generation never finished, and its image was never judged nor returned.
    assert backend.spans[0][0] == prompt and backend.spans[0][2] is None
    assert all(i.prompt != prompt for b in rig.image_batches() for i in b)
    cancelled = rig.trace.rounds[1]
    assert (cancelled.index, cancelled.kind, cancelled.images) == (1, "generate", [])
    assert cancelled.cancelled == f"the prescreen decided {action}"
    assert rig.trace.round_count() == (1 if action == "edit" else 0)


# --- the deadline -----------------------------------------------------------------------------

def test_the_stricter_deadline_applies() -> None:
    assert effective(None, None) is None
    assert effective(5.0, None) == effective(None, 5.0) == 5.0
    assert effective(5.0, 2.0) == effective(2.0, 5.0) == 2.0
    estimates = Estimates()
    assert estimates.round_s("fake") == 0.0  # nothing known: no round refused
    estimates.record_generation("fake", 1.0)
    estimates.record_generation("fake", 2.0)
    estimates.record_judging("image", 0.5)
    assert estimates.round_s("fake") == pytest.approx(1.3 + 0.5)


async def test_a_round_that_cannot_finish_in_time_is_not_started() -> None:
    backend = TimedBackend(slow_words=("car",), slow_s=0.2)
    rig = Rig(backend, make_judge(refine=lambda p: p + " again"))
    rig.engine.estimates.record_generation("fake", 0.2)  # what recent requests took
    t0 = time.perf_counter()
    with pytest.raises(DeadlineExceeded) as info:
        await rig.run("a red car", policy=policy(rounds={"deadline_s": 0.35}))

    assert time.perf_counter() - t0 < 0.33  # answered at once, not at the deadline
    assert info.value.code == "guard_deadline_exceeded" and info.value.type == "server_error"
    assert backend.prompts == ["a red car"]
    # No round could follow, so the judge was asked for a verdict only.
    (image,) = rig.judged()
    assert (image.action, image.refined_prompt) == ("edit", None)
    assert [(r.decision, r.rounds) for r in rig.trace.results] == [("failed", 1)]


async def test_the_deadline_cuts_a_backend_call_and_is_traced() -> None:
    rig = Rig(TimedBackend(slow_words=("car",), slow_s=5.0))
    t0 = time.perf_counter()
    with pytest.raises(DeadlineExceeded):
        await rig.run("a blue car", policy=policy(rounds={"deadline_s": 10}), deadline_s=0.2)

    assert 0.18 < time.perf_counter() - t0 < 0.5  # the client's shorter deadline
    cut = rig.trace.rounds[-1]
    assert (cut.kind, cut.images, cut.cancelled) == ("generate", [], "the deadline passed")
    assert rig.trace.round_count() == 0


async def test_with_on_exhausted_drop_the_safe_images_are_served_at_the_deadline() -> None:
    # Slot 0 comes out red; its second try is slow and misses the deadline.
    backend = TimedBackend(slow_words=("again",), slow_s=5.0, overrides={0: RED})
    rig = Rig(backend, make_judge(refine=lambda p: p + " again"))
    outcome = await rig.run("a blue car", n=2, deadline_s=0.3,
                            policy=policy(rounds={"on_exhausted": "drop"}))

    assert [(f.slot, f.decision) for f in outcome.images] == [(1, "passed")]
    assert [(r.slot, r.decision) for r in rig.trace.results] == [(0, "failed"), (1, "passed")]
    assert rig.trace.rounds[-1].cancelled == "the deadline passed"


# --- slots on their own clocks ----------------------------------------------------------------

class ByColour(FakeJudge):
    """Refines what it sees: a red image's prompt gets `slow`, a black one's `quick`."""

    async def judge(self, items: Sequence[JudgeInput], policy: Policy) -> list[Verdict]:
        words = {RED: "slow", BLACK: "quick"}
        return [replace(v, refined_prompt=f"{i.prompt} {words[colour_of(i.image.data)]}")
                if v.refined_prompt is not None and i.image is not None else v
                for i, v in zip(items, await super().judge(items, policy), strict=True)]


async def test_a_slot_starts_its_next_round_without_waiting_for_the_others() -> None:
    # Round 1: slot 0 red, slot 1 black. Slot 0's retry is slow; slot 1's comes out black again
    # (the third image made) and goes on to round 3 while slot 0's round 2 still generates.
    backend = TimedBackend(slow_words=("slow",), slow_s=0.4,
                           overrides={0: RED, 1: BLACK, 2: BLACK})
    judge = ByColour(colours={RED: {"violence": 0.9}, BLACK: {"violence": 0.9}},
                     refine=lambda p: p + "?")
    rig = Rig(backend, judge)
    outcome = await rig.run("a car", n=2)

    assert [(f.slot, prompt_of(f.image), f.decision) for f in outcome.images] == [
        (0, "a car slow", "edited"), (1, "a car quick quick", "edited")]
    spans = {prompt: (start, end) for prompt, start, end in backend.spans}
    assert spans["a car quick quick"][0] < spans["a car slow"][1]  # round 3 began first
    assert [(r.slot, r.rounds) for r in rig.trace.results] == [(0, 2), (1, 3)]
    per_image = sorted((i.slot, i.round, i.refined_by) for i in rig.judged())
    assert per_image == [(0, 1, None), (0, 2, "fake"), (1, 1, None), (1, 2, "fake"),
                         (1, 3, "fake")]
    # One record per backend call; rounds are counted by index.
    assert [(r.index, r.kind) for r in rig.trace.rounds] == [
        (0, "prescreen"), (1, "generate"), (2, "generate"), (2, "generate"), (3, "generate")]
    assert rig.trace.round_count() == outcome.rounds == 3
    assert all(i.backend_ms is not None and i.backend_ms >= 0 for i in rig.judged())
    slow = next(i for i in rig.judged() if i.prompt == "a car slow")
    assert slow.backend_ms is not None and slow.backend_ms >= 400


async def test_images_of_different_slots_ready_together_are_judged_in_one_batch() -> None:
    judge = ByColour(colours={RED: {"violence": 0.9}, BLACK: {"violence": 0.9}},
                     refine=lambda p: p + "?")
    rig = Rig(FakeBackend(overrides={0: RED, 1: BLACK}), judge)
    outcome = await rig.run("a car", n=2)

    # Two prompts, two backend calls in round 2; their images were ready at once: one batch.
    assert [(c.prompt, c.n) for c in rig.backend.calls] == [
        ("a car", 2), ("a car slow", 1), ("a car quick", 1)]
    assert [[i.prompt for i in batch] for batch in judge.calls] == [
        ["a car"], ["a car", "a car"], ["a car slow", "a car quick"]]
    assert [f.decision for f in outcome.images] == ["edited", "edited"]
    second = [r for r in rig.trace.rounds if r.index == 2]
    assert len(second) == 2 and second[0].judge_ms == second[1].judge_ms


async def test_a_round_that_edits_is_recorded_as_an_edit() -> None:
    rig = Rig(FakeBackend(overrides={0: RED}))
    await rig.run("a blue car", policy=policy(refine_mode="edit"))

    assert [(r.index, r.kind) for r in rig.trace.rounds] == [
        (0, "prescreen"), (1, "generate"), (2, "edit")]
    assert rig.trace.round_count() == 2 and rig.trace.summary()["rounds"] == 2


def test_rounds_are_counted_by_index_whatever_the_number_of_calls() -> None:
    trace = Trace(rounds=[RoundRecord(index=0, kind="prescreen"),
                          RoundRecord(index=1, kind="generate", cancelled="the prescreen"),
                          RoundRecord(index=1, kind="generate"),
                          RoundRecord(index=2, kind="edit"),
                          RoundRecord(index=2, kind="generate")])
    assert trace.round_count() == 2



def test_the_dashboard_and_the_export_count_rounds_that_made_images() -> None:
    from guard.audit.chain import ChainRow
    from guard.audit.export import CSV_FIELDS, csv_record
    from guard.review.dashboard import aggregate

    trace = Trace(rounds=[RoundRecord(index=0, kind="prescreen"),
                          RoundRecord(index=1, kind="generate", cancelled="the prescreen"),
                          RoundRecord(index=1, kind="generate", backend_ms=10.0),
                          RoundRecord(index=2, kind="edit", backend_ms=20.0),
                          RoundRecord(index=2, kind="generate", backend_ms=30.0)],
                  decision="edited", created_at=100.0)
    figures = aggregate([trace], 0.0, 200.0)
    assert dict(figures.rounds) == {2: 1}
    # Percentiles of 10, 20 and 30 ms: the cancelled call adds no backend time (with it, the
    # median would be 10).
    assert figures.latency_ms["backend"] == {50: 20.0, 90: 30.0, 99: 30.0}
    row = ChainRow(seq=1, body=trace.canonical_bytes(), prev_hash=None, hash="h",
                   columns={"id": trace.id})
    assert csv_record(row)[CSV_FIELDS.index("rounds")] == 2


# --- replay understands these traces ----------------------------------------------------------

async def test_replay_reads_a_concurrent_prescreen_and_per_slot_records_as_the_engine_did(
        ) -> None:
    backend = TimedBackend(slow_words=("car",), slow_s=0.2, overrides={1: RED})
    rig = Rig(backend, make_judge(refine=lambda p: p.replace("gore", "paint"), delay_s=0.05))
    concurrent = policy(prescreen="concurrent")
    await rig.run("gore on a blue car", n=2, policy=concurrent)
    trace = rig.trace
    trace.request = {"prompt": "gore on a blue car", "n": 2}
    trace.policy = concurrent.ref
    trace.finish(200, None, 1.0)
    assert trace.decision == "edited" and any(r.cancelled for r in trace.rounds)

    # The cancelled call is no round; `concurrent` replays as `true`.
    for candidate in (concurrent, policy(prescreen=True)):
        replayed = redecide(trace, candidate)
        assert (replayed.new, replayed.reason) == (("edited",), "")


async def test_replay_ends_a_stuck_image_where_the_engine_would() -> None:
    rig = Rig(judge=make_judge(refine=lambda p: p))
    with pytest.raises(PolicyViolation):
        await rig.run("a red car", policy=policy(terms={}))
    trace = rig.trace
    trace.request, trace.policy = {"prompt": "a red car", "n": 1}, POLICY
    trace.finish(400, TraceError(status=400, type="invalid_request_error",
                                 code="content_policy_violation", message="refused"), 1.0)

    replayed = redecide(trace, policy(terms={}, rounds={"max": 5}))
    assert replayed.new == ("refused",)
    assert replayed.reason == "image 0: nothing new to try after round 1"


# --- hedging ----------------------------------------------------------------------------------

BORDERLINE = {"borderline": {"violence": 0.4}}  # passes the 0.5 threshold, inside [0.3, 0.7]


def hedging_judge(delay_s: float = 0.0) -> FakeJudge:
    return FakeJudge(words=BORDERLINE, colours={RED: {"violence": 0.9}},
                     refine=lambda p: p.replace("borderline", "calm").replace("red", "blue"),
                     delay_s=delay_s)


async def test_a_borderline_prompt_is_hedged_and_the_first_safe_image_is_served() -> None:
    backend = TimedBackend(slow_words=("borderline",), slow_s=0.5)
    rig = Rig(backend, hedging_judge())
    t0 = time.perf_counter()
    outcome = await rig.run("a borderline red car", policy=policy(hedge={"band": [0.3, 0.7]}))

    assert time.perf_counter() - t0 < 0.4  # the hedge's image, not the slow original's
    assert [(prompt_of(f.image), f.decision) for f in outcome.images] == [
        ("a calm blue car", "edited")]
    screened = rig.trace.rounds[0].images[0]
    assert (screened.action, screened.refined_prompt) == ("pass", "a calm blue car")
    assert [(r.index, r.hedge, r.cancelled) for r in rig.trace.rounds[1:]] == [
        (1, False, "its images were served by another call"), (1, True, None)]
    (hedged,) = rig.judged()
    assert (hedged.round, hedged.refined_by, hedged.action) == (1, "fake", "pass")
    assert rig.trace.round_count() == outcome.rounds == 1
    assert [(r.decision, r.rounds) for r in rig.trace.results] == [("edited", 1)]
    value = rig.metrics.registry.get_sample_value
    assert value("guard_hedge_images_total", {"outcome": "made"}) == 1
    assert value("guard_hedge_images_total", {"outcome": "served"}) == 1


async def test_an_unsafe_hedge_leaves_the_slot_to_its_own_rounds() -> None:
    judge = FakeJudge(words=BORDERLINE, colours={RED: {"violence": 0.9}},
                      refine=lambda p: p.replace("borderline", "calm"))
    rig = Rig(judge=judge)
    with pytest.raises(PolicyViolation):  # red whatever the prompt
        await rig.run("a borderline red car", policy=policy(hedge={"band": [0.3, 0.7]}))

    # The hedge's prompt counts as tried for its slot: the slot's own rounds never repeat it.
    assert rig.backend.prompts == ["a borderline red car", "a calm red car",
                                   "a borderline red car, calm and peaceful",
                                   "a calm red car, calm and peaceful"]
    assert [(r.index, r.hedge) for r in rig.trace.rounds] == [
        (0, False), (1, False), (1, True), (2, False), (3, False)]


async def test_a_slot_out_of_tries_waits_for_its_hedge() -> None:
    # The slot's own way is stuck at once (the only new prompt is the hedge's, already being
    # made); it is not refused while its slower hedge may still serve it.
    rig = Rig(TimedBackend(slow_words=("calm",), slow_s=0.2), hedging_judge())
    outcome = await rig.run("a borderline red car",
                            policy=policy(terms={}, hedge={"band": [0.3, 0.7]}))

    assert [(prompt_of(f.image), f.decision) for f in outcome.images] == [
        ("a calm blue car", "edited")]
    assert rig.backend.prompts == ["a borderline red car", "a calm blue car"]


async def test_replay_serves_a_slot_from_its_recorded_hedge() -> None:
    hedging = policy(hedge={"band": [0.3, 0.7]})
    rig = Rig(TimedBackend(slow_words=("borderline",), slow_s=0.3), hedging_judge())
    await rig.run("a borderline red car", policy=hedging)
    trace = rig.trace
    trace.request, trace.policy = {"prompt": "a borderline red car", "n": 1}, hedging.ref
    trace.finish(200, None, 1.0)

    assert (redecide(trace, hedging).new, redecide(trace, hedging).reason) == (("edited",), "")
    # Without hedging the slot's own round 1 was never judged: its outcome is not known.
    assert redecide(trace, policy()).new == ("passed", "edited", "refused")


@pytest.mark.parametrize(("prompt", "hedge"), [("a borderline blue car", None),
                                               ("a blue car", {"band": [0.3, 0.7]})])
async def test_without_hedge_or_outside_its_band_nothing_extra_is_made(
        prompt: str, hedge: dict[str, Any] | None) -> None:
    rig = Rig(judge=hedging_judge())
    await rig.run(prompt, policy=policy(hedge=hedge))

    assert rig.backend.prompts == [prompt]
    assert rig.trace.rounds[0].images[0].refined_prompt is None  # nothing explained
    assert not any(r.hedge for r in rig.trace.rounds)
