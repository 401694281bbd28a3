"""Property tests of the two parsers that read untrusted text fast: the base64-lifting JSON parser
(guard.support.b64json, backend answers) and the builtin judge's term matcher (guard.core.terms,
prompts). Generated inputs; each example that once found a bug is kept as an `@example`."""

from __future__ import annotations

import base64
import json
import random
import re
import time
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from guard.core.policy import POLICIES_DIR, load_policy
from guard.core.refiner import refine_prompt
from guard.core.terms import score_prompt
from guard.support import b64json

# --- b64json: what `loads` gives is what `orjson.loads` gives ------------------------------------

SIZES = st.one_of(st.integers(0, 60), st.integers(3073, 9000))


@st.composite
def base64_text(draw: st.DrawFn) -> str:
    """Base64 of random bytes, short or past the length where the parser lifts it out."""
    size = draw(SIZES)
    return base64.b64encode(random.Random(draw(st.integers())).randbytes(size)).decode()


# Strings a careless lifter or placeholder would get wrong: a NUL then digits is what the
# parser's own placeholder looked like; a quote before `b64_json` ends a key that merely ends so.
TRICKY = st.sampled_from(["\x000", "\x001", "\x00x", "\x00", 'x"b64_json', "b64_json", "\\", '"',
                          "é", "\U0001f600", "\n", "\x01", "\u2028", "/", "\ud800"])
plain_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
text = st.one_of(plain_text, TRICKY, st.lists(st.one_of(plain_text, TRICKY), max_size=4)
                 .map("".join))

ODD = st.one_of(TRICKY, st.sampled_from(["é", " ", "data:image/png;base64,", "\x7f", "\x1f"]))


@st.composite
def long_string(draw: st.DrawFn) -> str:
    """A long `b64_json` value that is not plain base64: a JSON string all the same."""
    b64 = draw(base64_text()) or "QUJD"
    at = draw(st.integers(0, len(b64)))
    return b64[:at] + draw(ODD) + b64[at:]


KEYS = st.one_of(st.sampled_from(["b64_json", "revised_prompt", "url", "created", "data",
                                  'x"b64_json', "b64_json ", "B64_json"]), text)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1),
                    st.floats(allow_nan=False, allow_infinity=False), text)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=3)), max_leaves=8)


def image_item() -> st.SearchStrategy[dict[str, Any]]:
    b64 = st.one_of(base64_text(), long_string(), st.none(), st.integers(), values)
    return st.fixed_dictionaries({"b64_json": b64}, optional={
        "revised_prompt": text, "url": text, "extra": values, "nested": st.fixed_dictionaries(
            {"b64_json": base64_text()})})


payloads = st.fixed_dictionaries({"created": st.integers(0, 2**40), "data": st.lists(
    image_item(), max_size=4)}, optional={"usage": values, "b64_json": base64_text(),
                                          "note": text})


class Writer:
    """Writes a value as JSON the ways JSON allows, chosen by a seeded random: whitespace between
    any two tokens, each character of a string as itself, `\\uXXXX` (surrogate pairs above
    U+FFFF) or a short escape; a long string (an image) as it is, with its slashes escaped, or
    with what JSON forbids inside a string left raw."""

    def __init__(self, seed: int) -> None:
        self.rnd = random.Random(seed)

    def ws(self) -> str:
        return self.rnd.choice(["", "", " ", "\n", "\t", "\r\n  ", "  "])

    def string(self, value: str) -> str:
        if len(value) > 200:
            how = self.rnd.choice(["plain", "plain", "slashes", "raw"])
            if how == "raw":
                return '"' + value + '"'
            if how == "slashes":
                value = value.replace("/", "\\/")
            return '"' + _MUST_ESCAPE.sub(lambda m: _escape(m.group(), "plain"), value) + '"'
        return '"' + "".join(_escape(c, self.rnd.choice(["plain", "plain", "u", "short"]))
                             for c in value) + '"'

    def value(self, value: Any) -> str:
        if isinstance(value, dict):
            items = [self.ws() + self.string(k) + self.ws() + ":" + self.ws() + self.value(v)
                     + self.ws() for k, v in value.items()]
            return "{" + (",".join(items) or self.ws()) + "}"
        if isinstance(value, list):
            return "[" + (",".join(self.ws() + self.value(v) + self.ws() for v in value)
                          or self.ws()) + "]"
        if isinstance(value, str):
            return self.string(value)
        return json.dumps(value)


_MUST_ESCAPE = re.compile(r'["\\\x00-\x1f\ud800-\udfff]')
_SHORT = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b",
          "\f": "\\f", "/": "\\/"}


def _escape(c: str, how: str) -> str:
    if how == "short" and c in _SHORT:
        return _SHORT[c]
    if how == "u" or c in '"\\' or c < " " or "\ud800" <= c <= "\udfff":
        if c > "\uffff":  # a surrogate pair
            n = ord(c) - 0x10000
            return f"\\u{0xD800 + (n >> 10):04x}\\u{0xDC00 + (n & 0x3FF):04X}"
        return f"\\u{ord(c):04x}"
    return c


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    payload = draw(payloads)
    if draw(st.booleans()):  # keys in any order
        payload = dict(draw(st.permutations(list(payload.items()))))
    writer = Writer(draw(st.integers(0, 2**32)))
    return (writer.ws() + writer.value(payload) + writer.ws()).encode("utf-8", "surrogatepass")


def _as_text(node: Any) -> Any:
    """`loads_raw`'s answer with its base64 (a view of the body) read as text, as `loads`
    gives it."""
    if isinstance(node, dict):
        return {k: _as_text(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_as_text(v) for v in node]
    return str(node, "ascii") if isinstance(node, memoryview) else node


def assert_same_as_orjson(body: bytes) -> None:
    try:
        expected = orjson.loads(body)
    except orjson.JSONDecodeError:
        with pytest.raises(orjson.JSONDecodeError):
            b64json.loads(body)
        with pytest.raises(orjson.JSONDecodeError):
            b64json.loads_raw(body)
        return
    assert b64json.loads(body) == expected
    assert _as_text(b64json.loads_raw(body)) == expected


LONG = base64.b64encode(bytes(range(256)) * 20).decode()  # 6828 characters


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.data_too_large])
@given(bodies())
@example(b'{"x\\"b64_json": "' + LONG.encode() + b'"}')  # a key that only ends in b64_json
@example(b'{"data": [{"b64_json": "' + LONG.encode() + b'"}, {"b64\\u005fjson": "\\u00001"}]}')
@example(b'{"data": [{"b64_json": "' + LONG.encode() + b'"}, {"b64\\u005fjson": "\\u0000x"}]}')
@example(b'{"b64_json": "' + LONG[:5000].encode() + b'\n' + LONG[5000:].encode() + b'"}')
@example(b'{"b64_json": "' + LONG.encode() + '\u00e9'.encode() + b'"}')
@example(b'{"b64_json": "' + LONG.encode() + b'\xff"}')
def test_b64json_loads_is_orjson(body: bytes) -> None:
    assert_same_as_orjson(body)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=40), st.integers(0, 4))
def test_b64json_loads_is_orjson_on_broken_bodies(noise: bytes, cut: int) -> None:
    """Truncated or corrupted answers: both refuse, or both read the same."""
    body = b'{"data": [{"b64_json": "' + LONG.encode() + b'", "revised_prompt": "a \\"cat\\""}]}'
    assert_same_as_orjson(body[:len(body) - cut * 7] + noise)
    assert_same_as_orjson(noise + body)


# --- terms: the term matcher on generated prompts ------------------------------------------------

DEFAULT = load_policy(POLICIES_DIR / "default.yaml")
# Categories scored on their own (no `requires`) and their plain terms, one or more words.
TERMS = sorted((cat, term, strength) for cat, ts in DEFAULT.terms.items() if not ts.requires
               for strength, terms in (("strong", ts.strong), ("weak", ts.weak))
               for term in terms if re.fullmatch(r"[a-z]+(?:[ -][a-z]+)*", term))
SINGLE = [t for t in TERMS if re.fullmatch(r"[a-z]+", t[1])]
_IN_A_WORD = re.compile(r"[\w@$*!'’.\-]")
# Characters that never belong to a word: punctuation, symbols, every kind of space, marks.
separators = st.text(st.characters(exclude_categories=["Cs"]).filter(
    lambda c: not _IN_A_WORD.match(c)), min_size=1, max_size=4)


def random_case(data: st.DataObject, word: str) -> str:
    flips = data.draw(st.lists(st.booleans(), min_size=len(word), max_size=len(word)))
    return "".join(c.upper() if up else c for c, up in zip(word, flips, strict=True))


def hits_of(prompt: str, term: str) -> list[str]:
    return [h.text for hits in score_prompt(prompt, DEFAULT).hits.values() for h in hits
            if h.term == term and h.kind == "term"]


@settings(max_examples=200, deadline=None)
@given(st.data(), st.sampled_from(TERMS), separators, separators)
def test_a_listed_term_between_non_word_characters_is_found(data: st.DataObject, entry: Any,
                                                             left: str, right: str) -> None:
    cat, term, strength = entry
    words = re.split(r"([ -])", term)
    written = "".join(w if w == "-" else data.draw(separators) if w == " "
                      else random_case(data, w) for w in words)
    prompt = left + written + right
    result = score_prompt(prompt, DEFAULT)
    # The hit may name another listed form of the same words ("hang herself", "hanged herself").
    assert any(h.start >= len(left) and h.end <= len(left) + len(written)
               for h in result.hits.get(cat, ())), prompt
    assert result.scores[cat] >= (0.95 if strength == "strong" else 0.35)


@settings(max_examples=200, deadline=None)
@given(st.data(), st.sampled_from(SINGLE), st.text("abcdefghijklmnopqrstuvwxyz", min_size=1,
                                                   max_size=4),
       st.text("abcdefghijklmnopqrstuvwxyz", max_size=4))
def test_a_term_inside_a_longer_word_is_not_found(data: st.DataObject, entry: Any, before: str,
                                                  after: str) -> None:
    """"skill" is not "kill": a word that starts with other letters is another word."""
    term = entry[1]
    if before[0] == term[0]:
        before = chr((ord(before[0]) - 96) % 26 + 97) + before[1:]
    word = random_case(data, before + term + after)
    assert hits_of(f"a {word} here", term) == [], word


# Words that say nothing: no term, no negator.
FILLER = st.lists(st.one_of(st.sampled_from(["a", "x", "b", "q", "z", "t", "the", "red", "cat",
                                             "on", "i", "w"]),
                            st.text("bcfhjlpqvwxyz", min_size=1, max_size=1)), max_size=40)


@settings(max_examples=150, deadline=None)
@given(FILLER, st.sampled_from(SINGLE), FILLER)
# 25 letters first: only the first 24 letters of a run were read
@example([*"xyzwqxyzwqxyzwqxyzwqxyzwq"], ("sexual", "naked", "strong"), [])
def test_a_term_spelt_apart_is_found_wherever_it_stands(before: list[str], entry: Any,
                                                        after: list[str]) -> None:
    cat, term, strength = entry
    prompt = " ".join([*before, " ".join(term), *after])
    assert score_prompt(prompt, DEFAULT).scores[cat] >= (0.95 if strength == "strong" else 0.35), \
        prompt


anything = st.text(st.characters(exclude_categories=[]), max_size=300)
HARD = st.sampled_from(["\ud800", "\udfff", "\x00", "\u0301\u0301", "n*k*d", "n.a.k.e.d", "İ",
                        "ﬁ", "ｎｕｄｅ", "ß", "‮", "\u200d", "a a a", "*", "-", "'s", "$$", "@"])
prompts = st.lists(st.one_of(anything, HARD), max_size=12).map("".join)


@settings(max_examples=200, deadline=None)
@given(prompts)
def test_matching_and_refining_never_raise_on_any_text(prompt: str) -> None:
    result = score_prompt(prompt, DEFAULT)
    assert all(0.0 <= s <= 1.0 for s in result.scores.values())
    for hits in result.hits.values():
        for h in hits:
            assert prompt[h.start:h.end] == h.text
    refine_prompt(prompt, [c for c, s in result.scores.items() if s] or ["sexual"], DEFAULT)


@settings(max_examples=6, deadline=None)
@given(st.one_of(prompts.filter(bool), st.sampled_from(["a*", "n*k ", "n ", "nu", "n-", "x.",
                                                        "*a", "nude", "n\u0301"])))
@example("a*")  # one masked word of 32000 characters (was 4 s: a regex of 32000 characters)
@example("n*k ")  # 8000 masked words (was 1 s: the same word unmasked 8000 times)
@example("nude ")  # 6400 hits (was 5 s: each hit checked against every other)
@example("n ")  # 16000 letters spelt apart
def test_the_longest_prompt_is_matched_in_bounded_time(chunk: str) -> None:
    assert_scanned_in_bounded_time((chunk * (32000 // len(chunk) + 1))[:32000])


def test_many_different_masked_words_are_matched_in_bounded_time() -> None:
    """Was 3 s: a regular expression compiled for each of 6400 masked words."""
    rnd = random.Random(1)
    letters = "abcdefghijklmnopqrstuvwxyz"
    assert_scanned_in_bounded_time(" ".join(
        rnd.choice(letters) + "*" + rnd.choice(letters) + rnd.choice(letters) for _ in range(6400)))


def assert_scanned_in_bounded_time(prompt: str) -> None:
    assert len(prompt) <= 32000  # gpt-image-1's longest prompt
    started = time.process_time()  # CPU time: the machine may be busy with other tests
    score_prompt(prompt, DEFAULT)
    assert time.process_time() - started < 1.5
