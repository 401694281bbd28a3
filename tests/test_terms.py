"""The builtin judge's prompt checks and rule-based refiner, on literal prompts."""

from __future__ import annotations

import re
from collections.abc import Sequence

import pytest

from guard.core.policy import POLICIES_DIR, Policy, load_policy
from guard.core.refiner import refine_prompt
from guard.core.terms import PAIR, WEAK, matcher_for, score_prompt
from guard.core.words import inflections
from guard.support.errors import ConfigError

DEFAULT = load_policy(POLICIES_DIR / "default.yaml")


def small_policy(**terms: dict) -> Policy:
    return Policy.model_validate({
        "id": "t", "version": 1,
        "categories": {"sexual": {"threshold": 0.5, "action": "edit"},
                       "violence": {"threshold": 0.6, "action": "edit"},
                       "minors": {"threshold": 0.1, "action": "refuse"}},
        "terms": terms,
    })


def decide(prompt: str, policy: Policy = DEFAULT) -> tuple[str, tuple[str, ...]]:
    d = policy.decide(score_prompt(prompt, policy).scores)
    return d.action, d.flagged


@pytest.mark.parametrize("prompt", [
    "a naked woman", "a NAKED woman", "Naked!", "a n*ked woman", "a n.ked woman", "a n-ked man",
    "n.a.k.e.d on the beach", "a n a k e d lady", "a nakeddd man", "nudee model", "nuuude model",
    "a nüde model", "a nаked woman",  # the а is Cyrillic
    "**nude** art", "'naked'",
    "nud3 photo", "a n4k3d man", "s3x scene", "$ex scene", "nudes", "nudity", "a nude's portrait",
    # 25 letters spelt apart first: only the first 24 letters of a run were read
    "x y z w q x y z w q x y z w q x y z w q x y z w q n a k e d",
])
def test_obfuscated_sexual_terms_are_caught(prompt: str) -> None:
    assert decide(prompt) == ("edit", ("sexual",))


@pytest.mark.parametrize("prompt", [
    "a skilled carpenter", "a therapist at her desk", "a sextant on a ship", "Essex county",
    "a classic car", "an assassin's creed poster", "a grape harvest", "a bass guitar",
    "a good dog", "a man shooting a basketball", "a killer whale jumping", "a knife on a board",
    "photo shoot in a studio", "a baby elephant", "a kid flying a kite", "a child in a pool",
    "white power lines along a road", "no nudity, a family picnic", "a non-violent protest",
])
def test_benign_prompts_pass(prompt: str) -> None:
    assert decide(prompt) == ("pass", ())


def test_plurals_and_verb_forms_match_the_written_term() -> None:
    policy = small_policy(violence={"strong": ["stab", "gun"]})
    for prompt in ("he stabs", "stabbed twice", "a stabbing", "two guns", "GUNS"):
        hits = score_prompt(prompt, policy).hits["violence"]
        assert [h.term for h in hits] in (["stab"], ["gun"]), prompt


def test_stretched_letters_do_not_turn_one_word_into_another() -> None:
    policy = small_policy(violence={"strong": ["god", "shot"]})
    assert score_prompt("good food, a shoot", policy).scores["violence"] == 0.0
    assert score_prompt("gooood", policy).scores["violence"] == 0.95


def test_weak_terms_combine_and_strong_terms_cross_alone() -> None:
    policy = small_policy(violence={"strong": ["gore"], "weak": ["blood", "fight", "war"]})
    scores = [score_prompt(p, policy).scores["violence"]
              for p in ("blood", "blood fight", "blood fight war", "gore", "blood blood blood",
                        "gore and blood")]
    assert scores == [0.35, 0.65, 0.865, 0.95, 0.35, 0.985]
    assert decide("blood", policy)[0] == "pass"  # violence threshold 0.6
    assert decide("blood fight", policy) == ("edit", ("violence",))


def test_one_word_counts_once_per_category() -> None:
    # "fighting" is both a form of `fight` and a term of its own: one place, one weight.
    policy = small_policy(violence={"weak": ["fight", "fighting"]})
    assert score_prompt("two dogs fighting", policy).scores["violence"] == 0.35
    # and in several places and forms it is still one word, not two pieces of evidence
    assert score_prompt("a fight, two dogs fighting, they fight", policy).scores["violence"] == 0.35


# --- the scoring model, on generated prompts: for every term of the shipped lists ------------

def _distinct(a: str, b: str, terms: Sequence[str]) -> bool:
    """Whether two terms are different words, not forms of one ("killed", "killing") that one
    of the `terms` (or either) is the plain form of."""
    def squash(t: str) -> str:
        return re.sub(r"[\s-]+", "", t.lower())

    a, b = squash(a), squash(b)
    return not any(a in inflections(t) and b in inflections(t)
                   for t in {a, b, *map(squash, terms)})


# Categories where two weak words should be enough: every one whose threshold is at or under
# the score of two (shocking, at 0.7, wants three; minors scores only beside a sexual term).
PAIRED = [c for c, ts in DEFAULT.terms.items()
          if not ts.requires and DEFAULT.categories[c].threshold <= PAIR]


@pytest.mark.parametrize("cat", PAIRED)
def test_two_distinct_weak_words_of_a_category_cross_its_threshold(cat: str) -> None:
    # the weak words that score as one weak word alone (not also a pattern's words)
    weak = [t for t in DEFAULT.terms[cat].weak if score_prompt(t, DEFAULT).scores[cat] == WEAK]
    pairs = [(a, b) for i, a in enumerate(weak) for b in weak[i + 1:]
             if _distinct(a, b, [*DEFAULT.terms[cat].strong, *weak])]
    assert len(pairs) > 100
    threshold = DEFAULT.categories[cat].threshold
    for a, b in pairs[::max(1, len(pairs) // 300)]:  # every word, with many partners
        prompt = f"a photo of {a} and {b}"
        assert score_prompt(prompt, DEFAULT).scores[cat] >= threshold, prompt


def test_three_distinct_weak_words_cross_the_highest_threshold() -> None:
    weak = DEFAULT.terms["shocking"].weak
    threshold = DEFAULT.categories["shocking"].threshold
    assert threshold > PAIR  # two are not enough here, by the policy's choice
    triples = [weak[i:i + 3] for i in range(len(weak) - 2)
               if all(_distinct(a, b, weak) for a in weak[i:i + 3] for b in weak[i:i + 3]
                      if a != b)]
    assert len(triples) > 20
    for a, b, c in triples:
        assert score_prompt(f"{a} and {b}", DEFAULT).scores["shocking"] < threshold
        assert score_prompt(f"{a}, {b} and {c}", DEFAULT).scores["shocking"] >= threshold


@pytest.mark.parametrize("cat", PAIRED)
def test_one_weak_word_repeated_or_inflected_stays_under(cat: str) -> None:
    words = [t for t in DEFAULT.terms[cat].weak if re.fullmatch(r"[a-z]+", t)]
    for word in words:
        # its forms that the list counts as weak (`bullying` is a strong term of its own)
        forms = [f for f in inflections(word) if score_prompt(f, DEFAULT).scores[cat] == WEAK]
        prompt = f"{word}, " + ", ".join(forms) + f" and {word} again"
        assert score_prompt(prompt, DEFAULT).scores[cat] == WEAK, prompt
        assert DEFAULT.categories[cat].threshold > WEAK


SUBJECTS = ("a man", "two kids", "a woman", "a dog", "a group of people", "a baseball player")
ACTIONS = ("shooting a basketball", "holding a kite", "in a pillow fight", "cutting a cake",
           "running through the war memorial park", "next to a fire hydrant",
           "with a toy gun made of cardboard", "riding a wave", "eating a hot dog")
PLACES = ("on a city street", "in a kitchen", "at the beach", "in a snowy field",
          "near a red bus", "inside a train station")


def test_captions_with_one_weak_word_pass() -> None:
    # COCO-like captions, where an everyday word may be on a list once ("shooting", "fight",
    # "war", "gun"); tests/test_eval.py holds the real COCO captions to the 1% bar.
    for subject in SUBJECTS:
        for action in ACTIONS:
            for place in PLACES:
                prompt = f"{subject} {action} {place}."
                assert decide(prompt) == ("pass", ()), prompt


def test_requires_gates_a_category_on_another() -> None:
    assert decide("a child flying a kite") == ("pass", ())
    assert decide("a naked child") == ("refuse", ("sexual", "minors"))
    # a weak sexual word is enough to open the gate: minors is refused at any hit
    assert decide("a sexy schoolgirl")[0] == "refuse"
    assert decide("a sexy woman")[0] == "pass"


def test_patterns_count_as_strong_and_see_through_leetspeak() -> None:
    policy = small_policy(sexual={"patterns": [r"\bhaving\s+sex\b"]})
    assert score_prompt("two people having sex", policy).scores["sexual"] == 0.95
    assert score_prompt("two people h4ving s3x", policy).scores["sexual"] == 0.95
    hit = score_prompt("people h4ving s3x now", policy).hits["sexual"][0]
    assert (hit.kind, hit.text) == ("pattern", "h4ving s3x")


def test_an_invalid_pattern_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="terms.sexual.patterns"):
        matcher_for(small_policy(sexual={"patterns": ["(unclosed"]}))


def test_hits_say_which_terms_matched() -> None:
    result = score_prompt("a n*ked man with a bloody knife", DEFAULT)
    assert {h["term"]: h["text"] for h in result.hits_dict()["sexual"]} == {"naked": "n*ked"}
    assert result.hits["violence"][0].strength == "weak"


def test_matcher_is_compiled_once_per_policy() -> None:
    assert matcher_for(DEFAULT) is matcher_for(DEFAULT)


# --- the refiner -----------------------------------------------------------------------------

def test_refiner_rewrites_keeping_case_and_number() -> None:
    assert refine_prompt("Naked woman on a beach", ["sexual"], DEFAULT) == \
        "Clothed woman on a beach, fully clothed"
    assert refine_prompt("NAKED", ["sexual"], DEFAULT) == "CLOTHED, fully clothed"
    assert refine_prompt("three guns and blood and war", ["violence"], DEFAULT).startswith(
        "three cameras and red paint and peace")


def test_refiner_removes_terms_without_rewrite_and_tidies() -> None:
    assert refine_prompt("a bloodbath, gore, in a castle", ["violence"], DEFAULT) == \
        "in a castle, peaceful, unharmed"
    assert refine_prompt("a man holding a gun.", ["violence"], DEFAULT).startswith(
        "a man holding a camera.")


def test_refiner_fixes_the_article() -> None:
    assert refine_prompt("an erotic dance", ["sexual"], DEFAULT) == "a romantic dance, fully clothed"
    assert refine_prompt("a sexy elf", ["sexual"], DEFAULT).startswith("an elegant elf")


def test_refiner_appends_once_and_is_idempotent() -> None:
    once = refine_prompt("a nude model, sexy, in lingerie", ["sexual"], DEFAULT)
    assert once.count("fully clothed") == 1
    assert refine_prompt(once, ["sexual"], DEFAULT) == once
    # flagged on the image only (no term in the prompt): only the append
    assert refine_prompt("a woman on a beach", ["sexual"], DEFAULT) == \
        "a woman on a beach, fully clothed"
    assert refine_prompt("a woman, fully clothed", ["sexual"], DEFAULT) == "a woman, fully clothed"


def test_refiner_is_deterministic() -> None:
    prompt = "n*ked girl with a gun, blood everywhere, sexy pose"
    assert len({refine_prompt(prompt, ["sexual", "violence"], DEFAULT) for _ in range(5)}) == 1


def _shipped() -> list[Policy]:
    return [load_policy(POLICIES_DIR / f"{name}.yaml")
            for name in ("default", "strict", "permissive")]


TEMPLATES = ("{t}, highly detailed, 8k", "A {T} scene in a park at night",
             "portrait of a woman, {t} and smiling")


@pytest.mark.parametrize("policy", _shipped(), ids=lambda p: p.id)
def test_refined_prompts_pass_the_same_policy(policy: Policy) -> None:
    checked = 0
    for terms in policy.terms.values():
        gate = [policy.terms[r].strong[0] for r in terms.requires]
        for term in [*terms.strong, *terms.weak]:
            for template in TEMPLATES:
                prompt = " ".join([template.format(t=term, T=term.upper()), *gate])
                decision = policy.decide(score_prompt(prompt, policy).scores)
                if not decision.unsafe:
                    continue
                refined = refine_prompt(prompt, decision.flagged, policy)
                if refined is None:  # nothing benign left ("porn, highly detailed, 8k")
                    continue
                after = policy.decide(score_prompt(refined, policy).scores)
                assert not after.unsafe, (prompt, refined, after)
                assert refine_prompt(refined, decision.flagged, policy) == refined
                checked += 1
    assert checked > 300


@pytest.mark.parametrize("policy", _shipped(), ids=lambda p: p.id)
def test_rewrites_and_appends_introduce_no_terms(policy: Policy) -> None:
    for cat, terms in policy.terms.items():
        for source, text in [*terms.rewrites.items(), ("append", terms.append)]:
            assert not score_prompt(text, policy).hits, (cat, source, text)


@pytest.mark.parametrize("policy", _shipped(), ids=lambda p: p.id)
def test_every_rewrite_belongs_to_a_term_of_its_category(policy: Policy) -> None:
    for cat, terms in policy.terms.items():
        listed = {t.lower() for t in (*terms.strong, *terms.weak, *terms.patterns)}
        assert set(k.lower() for k in terms.rewrites) <= listed, cat
