"""Judge profiles: the prompts a model sees and the pure parsers of its answers, on literal texts."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from guard.core.policy import Policy
from guard.core.types import GeneratedImage, HistoryEntry, JudgeInput
from guard.judges.profiles import (
    IPR_SYSTEM,
    SAFE,
    UNSAFE,
    Parsed,
    Probe,
    Profile,
    Slot,
    SlotProbs,
    get_profile,
    merge_scores,
    parse_ipr,
    parse_llavaguard,
    parse_safeeditor,
    parse_shieldgemma2,
    unsafe_everywhere,
)
from guard.judges.vlm import VLMJudge
from guard.plugins import build_judge, profiles
from guard.support.errors import ConfigError
from tests.servers import serve

POLICY = Policy.model_validate({
    "id": "t", "version": 1,
    "categories": {
        "sexual": {"threshold": 0.5, "action": "edit", "description": "explicit sexual content"},
        "violence": {"threshold": 0.6, "action": "edit"},
        "minors": {"threshold": 0.1, "action": "refuse"},
    }})
CATS = ("sexual", "violence", "minors")
IMAGE = GeneratedImage(data=b"\x89PNG not really")


def unsafe_all(parsed: Parsed) -> bool:
    return not parsed.ok and parsed.scores == dict.fromkeys(CATS, 1.0)


# --- safeeditor ----------------------------------------------------------------------------------

def test_safeeditor_reads_a_safe_answer() -> None:
    text = ("<judgement>\nsexual: no\nviolence: no\nminors: no\n</judgement>\n"
            "<thought>A cat asleep on a sofa.</thought>\n<refined_prompt>none</refined_prompt>")
    parsed = parse_safeeditor(text, POLICY)
    assert parsed.ok
    assert parsed.scores == dict.fromkeys(CATS, 0.0)
    assert parsed.thought == "A cat asleep on a sofa."
    assert parsed.refined_prompt is None


def test_safeeditor_reads_an_unsafe_answer_with_its_refined_prompt() -> None:
    text = ("<judgement>\nsexual: no\nviolence: yes\nminors: no\n</judgement>\n"
            "<thought>Graphic blood on the knight.</thought>\n"
            "<refined_prompt>a knight facing a dragon, heroic, no blood</refined_prompt>")
    parsed = parse_safeeditor(text, POLICY)
    assert parsed.scores == {"sexual": 0.0, "violence": 1.0, "minors": 0.0}
    assert parsed.thought == "Graphic blood on the knight."
    assert parsed.refined_prompt == "a knight facing a dragon, heroic, no blood"


def test_safeeditor_accepts_a_verdict_cut_at_its_closing_tag_and_loose_spelling() -> None:
    # What a remote server returns when asked to stop at "</judgement>".
    text = "<judgement>\n- Sexual: No\nViolence: YES.\n  minors : no\n"
    parsed = parse_safeeditor(text, POLICY)
    assert parsed.ok
    assert parsed.scores == {"sexual": 0.0, "violence": 1.0, "minors": 0.0}
    assert parsed.refined_prompt is None


def test_safeeditor_reads_an_unclosed_refined_prompt() -> None:
    text = ("<judgement>\nsexual: yes\nviolence: no\nminors: no\n</judgement>\n<thought>Nudity."
            "</thought>\n<refined_prompt>a portrait, fully clothed")
    assert parse_safeeditor(text, POLICY).refined_prompt == "a portrait, fully clothed"


@pytest.mark.parametrize("text", [
    "",
    "I'm sorry, I can't help with that.",
    "<judgement>\nsexual: no\nviolence: no\n</judgement>",                      # minors missing
    "<judgement>\nsexual: no\nviolence: no\nminors: no\ndrugs: no\n</judgement>",  # unknown
    "<judgement>\nsexual: no\nviolence: maybe\nminors: no\n</judgement>",
    "<judgement>\nsexual: no\nsexual: yes\nviolence: no\nminors: no\n</judgement>",
    "<judgement>\nThe image is fine.\n</judgement>",
])
def test_safeeditor_fails_closed_on_malformed_answers(text: str) -> None:
    assert unsafe_all(parse_safeeditor(text, POLICY))


def test_safeeditor_probe_reads_one_slot_per_category_in_policy_order() -> None:
    profile = get_profile("safeeditor")
    [probe] = profile.probes(JudgeInput("a knight", "a knight", IMAGE), POLICY)
    slots = [p for p in probe.answer if isinstance(p, Slot)]
    assert [s.name for s in slots] == list(CATS)
    assert all(s.options == {"unsafe": " yes", "safe": " no"} for s in slots)
    # The forced answer: each category answered "no" before the next one is asked.
    text = "".join(p for p in probe.answer if isinstance(p, str))
    assert text == "<judgement>\nsexual: no\nviolence: no\nminors:"
    system = probe.messages[0]["content"][0]["text"]
    assert "- sexual: explicit sexual content" in system and "- minors: minors content" in system
    assert probe.has_image and probe.messages[-1]["content"][0] == {"type": "image"}


def test_safeeditor_shows_earlier_rounds_as_a_conversation() -> None:
    history = (HistoryEntry(prompt="a bloody knight", scores={"violence": 0.9},
                            flagged=("violence",), thought="Too much blood.",
                            refined_prompt="a knight, no blood"),)
    item = JudgeInput("a knight, no blood", "a bloody knight", IMAGE, history)
    [probe] = get_profile("safeeditor").probes(item, POLICY)
    roles = [m["role"] for m in probe.messages]
    assert roles == ["system", "user", "assistant", "user"]
    assert probe.messages[1]["content"] == [{"type": "text", "text": "Prompt: a bloody knight"}]
    past = probe.messages[2]["content"][0]["text"]
    assert "violence: yes" in past and "sexual: no" in past
    assert "<thought>Too much blood.</thought>" in past
    assert "<refined_prompt>a knight, no blood</refined_prompt>" in past
    last = probe.messages[3]["content"][1]["text"]
    assert last == "Prompt: a knight, no blood\nOriginal prompt: a bloody knight"
    # Only the current round carries the image.
    assert sum(1 for m in probe.messages if isinstance(m["content"], list)
               for p in m["content"] if p["type"] == "image") == 1


def test_safeeditor_explanation_forces_the_measured_verdict() -> None:
    profile = get_profile("safeeditor")
    item = JudgeInput("x", "x", None)
    explain = profile.explain(item, POLICY, {"violence": 0.8}, ("violence",))
    assert explain is not None
    assert explain.prefix == ("<judgement>\nsexual: no\nviolence: yes\nminors: no\n</judgement>\n"
                              "<thought>")
    assert explain.stop == ("</refined_prompt>",)
    # A prompt-only item has no image part anywhere.
    assert all(p["type"] == "text" for m in explain.messages for p in m["content"])


# --- ipr -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["keep", "Keep.", ' "keep" ', "KEEP\n"])
def test_ipr_keep_means_safe(text: str) -> None:
    parsed = parse_ipr(text, POLICY, ("sexual", "violence"))
    assert parsed.ok and parsed.scores == dict.fromkeys(CATS, 0.0)
    assert parsed.refined_prompt is None


@pytest.mark.parametrize("text,refined", [
    ("A knight in shining armour facing a dragon", "A knight in shining armour facing a dragon"),
    ("Refined prompt: a calm lake at dawn", "a calm lake at dawn"),
    ("'a portrait, fully clothed'", "a portrait, fully clothed"),
])
def test_ipr_any_other_answer_is_the_refined_prompt(text: str, refined: str) -> None:
    parsed = parse_ipr(text, POLICY, ("sexual", "violence"))
    assert parsed.ok and parsed.refined_prompt == refined
    # IPR has no categories: its verdict counts for the edit categories only.
    assert parsed.scores == {"sexual": 1.0, "violence": 1.0, "minors": 0.0}


@pytest.mark.parametrize("text", ["", "   \n", "``` ```"])
def test_ipr_empty_answer_fails_closed(text: str) -> None:
    assert unsafe_all(parse_ipr(text, POLICY, ("sexual", "violence")))


def test_ipr_prompt_is_the_published_one_and_targets_follow_the_policy() -> None:
    profile = get_profile("ipr")
    [probe] = profile.probes(JudgeInput("a bloody knight", "a knight", IMAGE), POLICY)
    assert probe.messages[0]["content"][0]["text"] == IPR_SYSTEM
    assert probe.messages[1]["content"] == [{"type": "image"},
                                            {"type": "text",
                                             "text": "Original Prompt: a bloody knight"}]
    [slot] = probe.answer
    assert isinstance(slot, Slot) and slot.options == {"safe": "keep", "safe:Keep": "Keep"}
    assert slot.rest == "unsafe"
    assert profile.combine([{"verdict": {"safe": 0.3, "unsafe": 0.7}}], POLICY) == {
        "sexual": 0.7, "violence": 0.7, "minors": 0.0}
    chosen = get_profile("ipr", {"categories": ["violence"]})
    assert chosen.combine([{"verdict": {"safe": 0.3, "unsafe": 0.7}}], POLICY) == {
        "sexual": 0.0, "violence": 0.7, "minors": 0.0}
    with pytest.raises(ConfigError, match="drugs"):
        get_profile("ipr", {"categories": ["drugs"]}).targets(POLICY)
    unsafe = profile.explain(JudgeInput("x", "x"), POLICY, {}, ("violence",))
    safe = profile.explain(JudgeInput("x", "x"), POLICY, {}, ())
    assert unsafe is not None and unsafe.banned_first == ("keep", "Keep")
    assert safe is not None and safe.banned_first == ()


# --- llavaguard ----------------------------------------------------------------------------------

def test_llavaguard_reads_safe_and_unsafe_json() -> None:
    safe = parse_llavaguard('{\n    "rating": "Safe",\n    "category": "NA: None applying",\n'
                            '    "rationale": "A landscape."\n}', POLICY)
    assert safe.ok and safe.scores == dict.fromkeys(CATS, 0.0) and safe.thought == "A landscape."
    unsafe = parse_llavaguard('```json\n{"rating": "Unsafe", "category": "O2: Violence, Harm", '
                              '"rationale": "Blood and gore.",}\n```', POLICY)
    assert unsafe.ok and unsafe.scores == {"sexual": 0.0, "violence": 1.0, "minors": 0.0}
    assert unsafe.thought == "Blood and gore."


def test_llavaguard_accepts_a_verdict_cut_before_the_rationale() -> None:
    parsed = parse_llavaguard('{\n    "rating": "Unsafe",\n    "category": "O3: Sexual Content",'
                              '\n    ', POLICY)
    assert parsed.ok and parsed.scores["sexual"] == 1.0


@pytest.mark.parametrize("text", [
    "The image is safe.",
    '{"rating": "Maybe", "category": "NA: None applying"}',
    '{"rating": "Unsafe", "category": "O10: Disasters"}',     # not a trained category
    '{"rating": "Unsafe", "category": "NA: None applying"}',
    '["Safe"]',
])
def test_llavaguard_fails_closed_on_malformed_answers(text: str) -> None:
    assert unsafe_all(parse_llavaguard(text, POLICY))


def test_llavaguard_scores_are_joint_probabilities() -> None:
    # The trained codes: sexual is O3 + O4, violence O2 + O8; minors has none (unassessed).
    profile = get_profile("llavaguard")
    probs = {"rating": {"unsafe": 0.8, "safe": 0.2},
             "category": {"O2": 0.25, "O3": 0.375, "O4": 0.125, "O8": 0.125, "O9": 0.125}}
    assert profile.combine([probs], POLICY) == pytest.approx({"sexual": 0.4, "violence": 0.3})
    # A remote answer rated Safe has no category slot: each category gets at most P(unsafe).
    assert profile.combine([{"rating": {"unsafe": 0.1, "safe": 0.9}}], POLICY) == pytest.approx(
        {"sexual": 0.1, "violence": 0.1})


# --- shieldgemma2 (its trained policies: tests/test_profiles_trained.py) -------------------------

def test_shieldgemma2_one_yes_no_answer_per_trained_policy() -> None:
    trained = {"sexual": ["sexual"], "violence": ["violence"]}
    parsed = parse_shieldgemma2(["No", "Yes, there is blood."], POLICY, trained)
    assert parsed.ok and parsed.scores == {"sexual": 0.0, "violence": 1.0}
    assert not parse_shieldgemma2(["No", "Perhaps"], POLICY, trained).ok
    assert not parse_shieldgemma2(["No"], POLICY, trained).ok


# --- shared --------------------------------------------------------------------------------------

def test_measured_scores_win_but_a_parse_error_fails_closed() -> None:
    parsed = Parsed({"sexual": 0.0, "violence": 1.0, "minors": 0.0})
    measured = {"sexual": 0.2, "violence": None, "minors": 0.01}
    assert merge_scores(measured, parsed, POLICY) == {"sexual": 0.2, "violence": 1.0,
                                                      "minors": 0.01}
    broken = Parsed(dict.fromkeys(CATS, 1.0), error="garbage")
    assert merge_scores(measured, broken, POLICY) == dict.fromkeys(CATS, 1.0)


def test_unknown_profile_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="no option"):
        get_profile("safeeditor", {"temperature": 1})


# --- registration --------------------------------------------------------------------------------

@pytest.mark.parametrize("judge", [{"kind": "vlm"},
                                   {"kind": "remote", "api_base": "http://127.0.0.1:9/v1"}],
                         ids=["vlm", "remote"])
def test_an_unknown_profile_name_is_a_config_error_naming_the_known_ones(
        judge: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as caught:
        build_judge({**judge, "model": "judge", "profile": "llamaguard"})
    message = str(caught.value)
    assert "unknown judge profile kind 'llamaguard'" in message
    known = message.split("known: ", 1)[1].split(", ")
    assert {"safeeditor", "ipr", "llavaguard", "shieldgemma2"} <= set(known)


class FlagOrFine(Profile):
    """A third party's profile: one question per item, answered `flag` or `fine`, scored for one
    category (a `profile_options` entry)."""

    name = "mine"
    explains = False

    def __init__(self, category: str = "violence", **options: object) -> None:
        super().__init__(**options)
        self.category = category

    def probes(self, item: JudgeInput, policy: Policy) -> list[Probe]:
        text = f"Flag or fine? {item.prompt}"
        slot = Slot("verdict", {UNSAFE: "flag", SAFE: "fine"})
        return [Probe(({"role": "user", "content": [{"type": "text", "text": text}]},), (slot,))]

    def combine(self, probs: Sequence[SlotProbs], policy: Policy) -> dict[str, float | None]:
        slots = probs[0] if probs else {}
        p = slots["verdict"][UNSAFE] if "verdict" in slots else None
        return {c: p if c == self.category else 0.0 for c in policy.categories}

    def parse(self, texts: Sequence[str], policy: Policy) -> Parsed:
        word = texts[0].strip() if texts else ""
        if word not in ("flag", "fine"):
            return unsafe_everywhere(policy, f"expected flag or fine, got {word!r}")
        hit = word == "flag"
        return Parsed({c: 1.0 if hit and c == self.category else 0.0 for c in policy.categories})


@pytest.fixture
def mine() -> Iterator[None]:
    # The registry is process-wide: the test's kind goes again afterwards.
    profiles.register("mine", FlagOrFine)
    yield
    profiles.unregister("mine")


def flag_or_fine_server(asked: list[str]) -> Starlette:
    """A chat model that flags prompts mentioning blood, 90% sure, with the answer's logprobs."""

    async def chat(request: Request) -> JSONResponse:
        body = await request.json()
        question = body["messages"][-1]["content"]
        asked.append(question)
        p = 0.9 if "blood" in question else 0.2
        word = "flag" if p >= 0.5 else "fine"
        top = [{"token": "flag", "logprob": math.log(p)},
               {"token": "fine", "logprob": math.log(1 - p)}]
        entry = {"token": word, "logprob": math.log(max(p, 1 - p)), "top_logprobs": top}
        return JSONResponse({"choices": [{
            "index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": word},
            "logprobs": {"content": [entry]}}]})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


async def test_a_registered_third_party_profile_is_used_by_name(mine: None) -> None:
    assert "mine" in profiles.kinds()
    asked: list[str] = []
    with serve(flag_or_fine_server(asked)) as url:
        judge = build_judge({"kind": "remote", "api_base": url + "/v1", "model": "judge",
                             "profile": "mine", "profile_options": {"category": "sexual"}})
        try:
            verdicts = await judge.judge([JudgeInput("a knight covered in blood", "p"),
                                          JudgeInput("a quiet lake", "p")], POLICY)
        finally:
            await judge.aclose()
    assert asked == ["Flag or fine? a knight covered in blood", "Flag or fine? a quiet lake"]
    # Scores come from the profile's slot, read in the server's logprobs, for its one category.
    assert verdicts[0].scores == pytest.approx({"sexual": 0.9, "violence": 0.0, "minors": 0.0})
    assert verdicts[1].scores == pytest.approx({"sexual": 0.2, "violence": 0.0, "minors": 0.0})
    assert judge.id == "remote:mine:judge"
    # The local judge finds it by the same name, with the same options.
    local = build_judge({"kind": "vlm", "model": "judge", "profile": "mine",
                         "profile_options": {"category": "minors"}})
    assert isinstance(local, VLMJudge)
    assert isinstance(local.profile, FlagOrFine) and local.profile.category == "minors"
    await local.aclose()
    with pytest.raises(ConfigError, match="profile 'mine'"):
        get_profile("mine", {"colour": "red"})
