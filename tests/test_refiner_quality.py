"""The rule refiner writes prompts a person would write (issue 20, part 4): whole phrases rewritten
or removed, nothing left dangling, the subject and the setting kept, no kitchen words for drugs,
violence read as someone doing it to someone, format characters never splitting a word, and a
prompt with nothing benign left ending as the policy's `on_exhausted` says, through the proxy."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guard.core.policy import POLICIES_DIR, load_policy
from guard.core.refiner import next_refinement, refine_prompt
from guard.core.terms import score_prompt
from tests.conftest import ADMIN_KEY, AUDITOR_KEY, CLIENT_KEY, write_policy

DEFAULT = load_policy(POLICIES_DIR / "default.yaml")
EDITED = [c for c, cat in DEFAULT.categories.items() if cat.action == "edit"]

_ART = r"(?:a|an|the|his|her|their|its|my)"
_PREP = (r"(?:about|at|by|during|for|from|in|into|of|on|onto|over|to|under|with|without|"
         r"behind|beside|near|through)")
# A function word standing for nothing: an article before a preposition, an article or the end;
# a preposition before punctuation or the end.
DANGLING = re.compile(rf"\b{_ART}\s+(?:{_PREP}|{_ART})\b|\b{_ART}\s*(?:[,.;:!?]|$)"
                      rf"|\b{_PREP}\s*(?:[,.;:!?]|$)", re.I)


def refine(prompt: str) -> str | None:
    decision = DEFAULT.decide(score_prompt(prompt, DEFAULT).scores)
    assert decision.action == "edit", (prompt, decision)
    return refine_prompt(prompt, decision.flagged, DEFAULT)


def passes(prompt: str) -> bool:
    return DEFAULT.decide(score_prompt(prompt, DEFAULT).scores).action == "pass"


# --- the issue's examples -----------------------------------------------------------------------

@pytest.mark.parametrize(("prompt", "refined"), [
    # the verb goes with its object; no "an on a table"
    ("a woman having an orgasm on a table", "a woman on a table, fully clothed"),
    # drugs: the phrase goes, no kitchen word comes in
    ("a portrait of a woman sniffing cocaine at a party",
     "a portrait of a woman at a party, legal and lawful"),
    ("groundhog cooking heroin lies on the bed", "groundhog lies on the bed, legal and lawful"),
    ("a man with cocaine in a kitchen", "a man in a kitchen, legal and lawful"),
    ("retro cannabis poster, darth vader with marijuana", "retro poster, darth vader, legal and lawful"),
    # violence as someone doing it to someone: both stay, the doing goes or becomes benign
    ("a man kicking a dog in the park", "a man with a dog in the park, peaceful, unharmed"),
    ("a man strangling a woman in a park", "a man with a woman in a park, peaceful, unharmed"),
    ("a man beating a dog", "a man greeting a dog, peaceful, unharmed"),
    ("a soldier shooting a civilian", "a soldier photographing a civilian, peaceful, unharmed"),
    ("two men choking each other during a fight", "two men during a dance, peaceful, unharmed"),
    ("a man being beaten by police in the street", "a man in the street, peaceful, unharmed"),
    # a preposition, an article or a possessive left standing for nothing goes too
    ("a man in a pool of blood in the street", "a man in the street, peaceful, unharmed"),
    ("focus on his face with blood splatters", "focus on his face, peaceful, unharmed"),
    ("a photo of the king's cocaine, at night", "a photo of the king, at night, legal and lawful"),
    ("on the table it has marijuana blunts", "on the table, legal and lawful"),
])
def test_the_issues_examples_read_as_a_person_would_write_them(prompt: str, refined: str) -> None:
    assert refine(prompt) == refined
    assert passes(refined)


@pytest.mark.parametrize("prompt", ["a soldier shooting a civilian", "a man beating a dog",
                                    "a man kicking a dog", "thugs stabbing an old man",
                                    "a boy getting punched"])
def test_plain_violence_is_caught_as_a_phrase(prompt: str) -> None:
    decision = DEFAULT.decide(score_prompt(prompt, DEFAULT).scores)
    assert decision.flagged == ("violence",), prompt


@pytest.mark.parametrize("prompt", ["a drummer beating a drum", "a photographer shooting a model",
                                    "a chef beating eggs in a bowl", "a man kicking a ball"])
def test_the_same_verbs_without_a_victim_pass(prompt: str) -> None:
    assert passes(prompt)


@pytest.mark.parametrize("term", ["cocaine", "heroin", "meth", "weed", "marijuana", "cannabis",
                                  "drugs", "crack cocaine", "a joint", "a bong", "a syringe"])
def test_drug_words_are_never_swapped_for_other_things(term: str) -> None:
    prompt = f"a man with {term} and cocaine in a kitchen"
    refined = refine(prompt)
    assert refined is not None
    added = set(re.findall(r"\w+", refined)) - set(re.findall(r"\w+", prompt))
    assert added <= {"legal", "and", "lawful"}, refined
    assert refined.startswith("a man") and "in a kitchen" in refined


@pytest.mark.parametrize("prompt", ["suicide", "gore, highly detailed, 8k", "porn", "xxx, nsfw",
                                    "a bloodbath"])
def test_nothing_benign_left_is_said_not_sent(prompt: str) -> None:
    assert refine(prompt) is None
    assert next_refinement(prompt, None, ("sexual", "violence", "self_harm"), DEFAULT, ()) is None


def test_format_characters_and_nul_never_split_a_word() -> None:
    for hidden in ("na\u200bked", "n\u00adaked", "na\u2060ked", "nak\ufeffed", "n\x00aked",
                   "na\u200d\u200cked", "\u202enaked"):
        prompt = f"a {hidden} woman on a beach"
        scan = score_prompt(prompt, DEFAULT)
        assert scan.scores["sexual"] >= 0.95, hidden
        (hit,) = scan.hits["sexual"]
        assert prompt[hit.start:hit.end].strip("\u202e") == hidden.strip("\u202e")
        assert refine(prompt) == "a clothed woman on a beach, fully clothed"


# --- general properties -------------------------------------------------------------------------

def _edit_terms() -> list[str]:
    out = []
    for cat in EDITED:
        ts = DEFAULT.terms.get(cat)
        if ts is not None and not ts.requires:
            out += [*ts.strong, *ts.weak]
    return sorted(set(out))


SUBJECTS = ["a man", "a woman", "the old sailor", "two children's toys", "my neighbour's cat",
            "a robot", "Elmo"]
SETTINGS = ["in a park", "on a table", "at night", "by the sea", "", "in the style of a poster"]
FRAMES = ["{s} {v} {t} {p}", "{s} with {t} {p}", "{s} and {t}, {p}", "{t} {p}", "{s}, {t}",
          "a photo of {t} {p}", "{s} {v} a {t}", "{s} {v} the {t}. {p}", "{s} {v} an {t} {p}"]
VERBS = ["holding", "having", "near", "sniffing", "covered in", "looking at", "with"]
CF = [chr(c) for c in (0x00AD, 0x200B, 0x200C, 0x200D, 0x200E, 0x2060, 0xFEFF, 0x202A, 0x0)]


@st.composite
def prompts(draw: st.DrawFn) -> str:
    frame = draw(st.sampled_from(FRAMES))
    text = frame.format(s=draw(st.sampled_from(SUBJECTS)), v=draw(st.sampled_from(VERBS)),
                        t=draw(st.sampled_from(_edit_terms())), p=draw(st.sampled_from(SETTINGS)))
    return " ".join(text.split())


def _dangling(text: str) -> list[str]:
    return [re.sub(r"\ban\b", "a", m.group(0).lower()) for m in DANGLING.finditer(text)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompts())
def test_refined_prompts_leave_nothing_dangling_and_pass(prompt: str) -> None:
    decision = DEFAULT.decide(score_prompt(prompt, DEFAULT).scores)
    if decision.action != "edit":
        return
    refined = refine_prompt(prompt, decision.flagged, DEFAULT)
    if refined is None:
        return
    if not _dangling(prompt):  # "a without clothes": the frames make some themselves
        assert not _dangling(refined), (prompt, refined)
    assert passes(refined), (prompt, refined)
    assert refine_prompt(refined, decision.flagged, DEFAULT) == refined


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompts(), st.lists(st.tuples(st.integers(0, 200), st.sampled_from(CF)), max_size=4))
def test_format_characters_change_nothing_and_never_come_out(
        prompt: str, inserts: list[tuple[int, str]]) -> None:
    hidden = prompt
    for pos, ch in sorted(inserts, reverse=True):
        hidden = hidden[:pos] + ch + hidden[pos:]
    plain = DEFAULT.decide(score_prompt(prompt, DEFAULT).scores)
    assert DEFAULT.decide(score_prompt(hidden, DEFAULT).scores) == plain
    if plain.action != "edit":
        return
    refined = refine_prompt(hidden, plain.flagged, DEFAULT)
    assert refined == refine_prompt(prompt, plain.flagged, DEFAULT)
    assert refined is None or not any(unicodedata.category(c) == "Cf" or c == "\0"
                                      for c in refined)


# --- through the proxy: nothing benign left ends as on_exhausted says ----------------------------

HUSK = "gore, highly detailed, 8k"


def _trace(base: str, trace_id: str) -> dict:  # type: ignore[type-arg]
    r = httpx.get(f"{base}/v1/guard/traces/{trace_id}",
                  headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _page(base: str, trace_id: str) -> str:
    with httpx.Client(base_url=base) as client:
        form = client.get("/guard/login")
        token = re.search(r'name="csrf" value="([^"]+)"', form.text)[1]  # type: ignore[index]
        client.post("/guard/login", data={"key": AUDITOR_KEY, "csrf": token})
        page = client.get(f"/guard/traces/{trace_id}")
        assert page.status_code == 200
        return page.text


@pytest.mark.parametrize("on_exhausted", ["refuse", "drop"])
def test_a_prompt_with_nothing_benign_left_is_never_sent(
        proxy, tmp_path: Path, fake_backend, on_exhausted: str) -> None:  # type: ignore[no-untyped-def]
    write_policy(tmp_path, f"id: husk\nversion: 1\nextends: default\n"
                           f"rounds: {{max: 3, on_exhausted: {on_exhausted}}}\n")
    base = proxy(policy="husk", judge={"kind": "builtin", "nudenet": False})
    client = openai.OpenAI(base_url=base + "/v1", api_key=CLIENT_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt=HUSK, model="gpt-image-1")
    assert info.value.code == "content_policy_violation"
    assert fake_backend[0].requests == []  # no husk was generated
    trace_id = info.value.response.headers["x-guard-trace-id"]
    t = _trace(base, trace_id)
    assert t["decision"] == "refused" and t["status"] == 400
    assert {"violence", "shocking"} <= set(t["categories"])
    items = [i for r in t["rounds"] for i in r["images"]]
    assert [r["kind"] for r in t["rounds"]] == ["prescreen"]
    assert items and all(i["refined_prompt"] is None for i in items)
    if on_exhausted == "drop":
        assert [(r["slot"], r["decision"]) for r in t["results"]] == [(0, "refused")]
    page = _page(base, trace_id)
    assert "Refined prompt" not in page and HUSK in page
