"""The rule-based refiner: rewrite or remove what made a prompt cross the policy's thresholds.

The fallback refiner of every judge (a model that writes no refined prompt, the builtin judge, the
offline tools that re-decide traces): it works on the matches of the policy's term lists
(guard.core.terms), so it needs no model and gives the same answer offline as in the proxy.

It edits phrases, not words, the way a person would rewrite the prompt:
- a term with a rewrite in the policy is replaced ("a naked woman" -> "a clothed woman"); in a
  pattern's match ("a soldier shooting a civilian") the words with a rewrite are;
- a term without one goes with the words that only stand for it: its article, possessive or
  number, the verb it is the object of and a preposition that led to it ("a man sniffing cocaine
  at a party" -> "a man at a party", "focus on his face with blood splatters" -> "focus on his
  face"); a verb goes with its object when that is a pronoun ("two men choking each other" ->
  "two men"), and where someone does it to someone, both stay ("a man kicking a dog" -> "a man
  with a dog");
- no article, preposition or possessive is left standing for nothing ("an [orgasm] on a table"
  never becomes "an on a table"), and the subject and the setting stay.
Weak terms without a rewrite stay unless they cross the threshold by themselves, or the prompt
still crosses it without them ("blunt borders" once "bank robbery" is gone). When nothing is left
but function and style words ("porn, highly detailed, 8k"), there is nothing benign to make: `refine_prompt` answers None, and the engine ends the slot as
the policy's `rounds.on_exhausted` says.
"""

from __future__ import annotations

import dataclasses
import re
from bisect import bisect_left, bisect_right
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from guard.core.policy import Policy
from guard.core.terms import Hit, combine, matcher_for
from guard.core.words import (
    ARTICLES,
    AUXILIARIES,
    CONJUNCTIONS,
    DETERMINERS,
    FUNCTION_WORDS,
    ING_NOUNS,
    OBJECT_PRONOUNS,
    PREPOSITIONS,
    STYLE_WORDS,
    VOWELS,
    fold,
    inflections,
    strip_format,
)

_NOT_WORDS = re.compile(r"[\W_]+")
_WORD = re.compile(r"[\w'’]+(?:-[\w'’]+)*")
# What ends a clause between two words: a phrase is never read across it.
_BOUNDARY = re.compile(r"[^\s\-'’]")
_LINKS = PREPOSITIONS | CONJUNCTIONS
_NEXT_WORD = re.compile(r"\s*([\w'’]+(?:-[\w'’]+)*)")
_SUBJECTS = frozenset({"he", "she", "it", "they", "there", "who", "which"})


def normalise(prompt: str) -> str:
    """A prompt as the repeat check compares it: case, spacing and punctuation ignored."""
    return _NOT_WORDS.sub(" ", prompt.casefold()).strip()


def next_refinement(prompt: str, model_prompt: str | None, flagged: Sequence[str],
                    policy: Policy, tried: Collection[str]) -> tuple[str, bool] | None:
    """The next prompt to try after `prompt` was judged unsafe, never one in `tried` (prompts
    already made, `normalise`d): the judge's refined prompt (`model_prompt`) first, then the rule
    refiner's rewrite of `prompt`, then of the judge's. (prompt, whether the judge wrote it), or
    None when nothing new is left, or nothing but function and style words."""
    model = (model_prompt or "").strip()
    candidates = [(model, True)] if model else []
    candidates.append((refine_prompt(prompt, flagged, policy) or "", False))
    if model:
        candidates.append((refine_prompt(model, flagged, policy) or "", False))
    for text, by_model in candidates:  # a judge's husk ("8k, highly detailed") is no prompt
        if _content(text) and normalise(text) not in tried:
            return text.strip(), by_model
    return None


def refine_prompt(prompt: str, flagged: Sequence[str], policy: Policy) -> str | None:
    """Rewrite or remove the phrases that made `prompt` cross the `flagged` categories, then add
    each category's `append` words once; None when nothing but function and style words is left.

    Format characters and NUL are dropped first. If the rewritten prompt still crosses a category
    (a flagged one or another), that category is refined as well: the result scores below every
    threshold under the same policy's term lists, and refining it again changes nothing."""
    matcher = matcher_for(policy)
    tables = _tables(policy)
    cats = list(dict.fromkeys(flagged))
    text = strip_format(prompt)[0]
    scan = matcher.scan(text)
    # Categories whose weak terms go even without a rewrite: those the weak terms alone cross
    # (two of them are meant: "choking ... during a fight"), or the prompt still crosses.
    loose = {c for c in cats if c in policy.decide(
        {c: combine(["weak"] * len({h.term for h in scan.hits.get(c, ())
                                    if h.strength == "weak" and h.kind == "term"}))}).flagged}
    for _ in range(6):
        hits = [h for c in cats for h in scan.hits.get(c, ())
                if c in loose or h.strength == "strong" or h.kind == "pattern"
                or _replacement(h, tables)]
        if hits:
            text = _tidy(_rewrite(text, hits, tables))
            scan = matcher.scan(text)
        over = policy.decide(scan.scores).flagged
        new = [c for c in over if c not in cats]
        stricter = [c for c in over if c in cats and c not in loose]
        if not hits and not new and not stricter:
            break
        cats += new
        loose.update(stricter)
    text = _tidy(text)
    if not _content(text):
        return None  # nothing benign left: a husk of style words and appends is not a prompt
    for cat in sorted(cats, key=lambda c: matcher.categories.index(c)
                      if c in matcher.categories else len(matcher.categories)):
        terms = policy.terms.get(cat)
        extra = terms.append.strip() if terms else ""
        if extra and fold(extra) not in fold(text):
            text = f"{text}, {extra}" if text else extra
    return text or None


def _content(text: str) -> bool:
    """Whether `text` shows something: a word that is not a function or a style word."""
    return any((w := fold(m.group(0))) not in FUNCTION_WORDS and w not in STYLE_WORDS
               and len(w) > 1 and not w.isdigit() for m in _WORD.finditer(text))


# --- one pass: the phrases of the hits, rewritten or removed -----------------------------------

@dataclass(frozen=True, slots=True)
class _Word:
    start: int
    end: int
    w: str  # folded


@dataclass(frozen=True, slots=True)
class _Edit:
    start: int
    end: int
    new: str


def _rewrite(text: str, hits: list[Hit], tables: _Tables) -> str:
    words = [_Word(m.start(), m.end(), fold(m.group(0))) for m in _WORD.finditer(text)]
    bounds = ([w.start for w in words], [w.end for w in words])
    # Longest match wins where hits overlap ("blood bath" over "blood").
    chosen: list[Hit] = []
    for h in sorted(hits, key=lambda h: (h.start, -(h.end - h.start), h.form != "base")):
        if not chosen or h.start >= chosen[-1].end:
            chosen.append(h)
    # Terms side by side go as one phrase ("marijuana blunts").
    merged: list[Hit] = []
    for h in chosen:
        if (merged and h.kind == merged[-1].kind == "term" and not _replacement(h, tables)
                and not _replacement(merged[-1], tables)
                and not text[merged[-1].end:h.start].strip()):
            h = dataclasses.replace(h, start=merged.pop().start)
        merged.append(h)
    edits: list[_Edit] = []
    for h in merged:
        if edits and h.start < edits[-1].end:
            continue  # inside the phrase of an earlier hit, gone with it
        new = _replacement(h, tables) if h.kind == "term" else _in_pattern(h, tables)
        edit = _Edit(h.start, h.end, new) if new else _phrase(text, words, bounds, h)
        if edits and edit.start < edits[-1].end:  # phrases that meet become one
            edit = _Edit(edits[-1].start, max(edit.end, edits[-1].end),
                         edits[-1].new if not edit.new else edit.new)
            edits.pop()
        edits.append(edit)
    out = ""
    pos = 0
    for e in edits:
        before = out + text[pos:e.start]
        if e.new:
            new, nxt = e.new, _NEXT_WORD.match(text, e.end)
            while (new.split()[-1].lower() in PREPOSITIONS and len(new.split()) > 1
                   and (nxt is None or fold(nxt.group(1)) in _LINKS)):
                new = new.rsplit(maxsplit=1)[0]  # "pointing at" with nothing to point at
            out, pos = _fix_article(before, new) + new, e.end
            continue
        pos = e.end + len(text[e.end:e.end + 64]) - len(text[e.end:e.end + 64].lstrip(" -"))
        out = before.rstrip(" -")
        if out and text[pos:pos + 1].isalnum():  # a word follows: one space, and its article
            out = _fix_article(out, text[pos:pos + 64])
            out += "" if out.endswith(("(", "[", '"', "“")) else " "
    return out + text[pos:]


def _phrase(text: str, words: list[_Word], bounds: tuple[list[int], list[int]],
            hit: Hit) -> _Edit:
    """What goes with a term that has no rewrite: its phrase, and the function words that would
    be left standing for nothing."""
    # the words the hit touches (a search: a prompt may have 5000 words)
    a = bisect_right(bounds[1], hit.start)
    b = bisect_left(bounds[0], hit.end) - 1
    if a > b:
        return _Edit(hit.start, hit.end, "")

    def cut(k: int) -> bool:  # a clause ends between word k - 1 and word k
        return k <= 0 or k >= len(words) or bool(
            _BOUNDARY.search(text[words[k - 1].end:words[k].start]))

    def left() -> str | None:
        return None if cut(a) else words[a - 1].w

    def right() -> str | None:
        return None if cut(b + 1) else words[b + 1].w

    new = ""
    if _verb(words, a) and words[a].w not in AUXILIARIES:
        # A doing: the verb with its object. Someone doing it to someone keeps both ("a man
        # [kicking] a dog" -> "a man with a dog"); a pronoun object goes with it.
        obj = b + 1 if a == b else a + 1
        k = obj
        while k < len(words) and not cut(k) and words[k].w in DETERMINERS:
            k += 1
        if k < len(words) and not cut(k) and words[k].w in OBJECT_PRONOUNS:
            b = max(b, k + 1 if k + 1 < len(words) and not cut(k + 1)
                    and words[k + 1].w in {"other", "another"} else k)
        elif (k < len(words) and not cut(k) and (a == b or k > obj)
              and words[k].w not in FUNCTION_WORDS and not _verb(words, k)
              and left() not in (None, *FUNCTION_WORDS)):
            return _Edit(words[a].start, words[a].end, "with")
    elif words[a].w in AUXILIARIES:
        # A passive doing ("being beaten"), with who did it ("by police").
        if right() == "by":
            b += 1
            while right() is not None and right() not in _LINKS and not _verb(words, b + 1):
                b += 1
    elif (right() in (None, *_LINKS) or _verb(words, b + 1) or _verb(words, a - 1)
          or (left() in ARTICLES and _verb(words, a - 2) and not cut(a - 1))):
        # The head of a noun phrase: its article and words between ("a brutal [suicide]"), and
        # the verb or preposition it hangs on.
        for n in (1, 2, 3):  # not at the start of a clause: "a cat [genocide]" keeps its cat
            if (a - n >= 1 and not any(cut(k) for k in range(a - n, a + 1))
                    and words[a - n].w in DETERMINERS
                    and not any(_verb(words, k) or words[k].w in FUNCTION_WORDS
                                or words[k].w.endswith(("'s", "’s"))
                                for k in range(a - n + 1, a))):
                a -= n
                break
        while left() in DETERMINERS:
            a -= 1
        if (_verb(words, a - 1) and not cut(a)) or left() in AUXILIARIES:
            a -= 1  # "sniffing cocaine", "having an orgasm"
            while left() in AUXILIARIES:
                a -= 1
        elif left() in PREPOSITIONS and right() in (None, *_LINKS):
            a -= 1  # "with blood splatters", "in a pool of blood"
            if left() is not None and words[a - 1].w.endswith("ed"):
                a -= 1  # "smeared with"
    # What would dangle: "an [...] on", "of [...],", "and [...].", "[...] and".
    while True:
        lw, rw = left(), right()
        if lw in DETERMINERS and (rw is None or rw in _LINKS | DETERMINERS):
            a -= 1
        elif lw in PREPOSITIONS and (rw is None or rw in _LINKS):
            a -= 1
        elif lw in CONJUNCTIONS | _SUBJECTS and rw is None:
            a -= 1
        elif lw is None and rw in CONJUNCTIONS:
            b += 1
        else:
            break
    lw, rw = left(), right()
    start, end = words[a].start, words[b].end
    if lw is not None and rw is None and lw.endswith(("'s", "’s")):
        start = words[a - 1].end - 2  # "the soldier's [rifle]." -> "the soldier."
    elif (lw is not None and lw not in FUNCTION_WORDS and rw in DETERMINERS):
        new = "and"  # never two phrases side by side: "a man [...] a dog"
    return _Edit(start, end, new)


def _verb(words: list[_Word], k: int) -> bool:
    """Whether word k reads as a verb: an -ing word not after an article ("a bleeding nose" is
    not a doing), not a thing ("painting"), or an auxiliary."""
    if k < 0 or k >= len(words):
        return False
    w = words[k].w
    if w in AUXILIARIES:
        return True
    return (w.endswith("ing") and len(w) > 4 and w not in ING_NOUNS
            and (k == 0 or words[k - 1].w not in DETERMINERS))


# Per category: its rewrites by term, and by every form of a one-word term.
_Tables = dict[str, tuple[dict[str, str], dict[str, tuple[str, str]]]]


def _tables(policy: Policy) -> _Tables:
    out: _Tables = {}
    for cat, terms in policy.terms.items():
        by_term = {fold(k).strip(): v for k, v in terms.rewrites.items() if v.strip()}
        forms: dict[str, tuple[str, str]] = {}
        for key, new in by_term.items():
            if " " not in key:
                for form, name in inflections(key).items():
                    forms.setdefault(form, (new, name))
        out[cat] = (by_term, forms)
    return out


def _replacement(hit: Hit, tables: _Tables) -> str:
    new = tables.get(hit.category, ({}, {}))[0].get(fold(hit.term).strip(), "")
    return _shaped(new, hit.text, hit.form) if new else ""


def _in_pattern(hit: Hit, tables: _Tables) -> str:
    """A pattern's match with its words that have a rewrite rewritten ("shooting a civilian" ->
    "photographing a civilian"); "" when none has one."""
    forms = tables.get(hit.category, ({}, {}))[1]
    changed = False

    def swap(m: re.Match[str]) -> str:
        nonlocal changed
        found = forms.get(fold(m.group(0)))
        if found is None:
            return m.group(0)
        changed = True
        return _shaped(found[0], m.group(0), found[1])

    out = _WORD.sub(swap, hit.text)
    return out if changed else ""


def _shaped(new: str, old: str, form: str) -> str:
    """A rewrite in the form and case of the word it replaces."""
    if " " not in new:
        new = _inflect(new, form)
    if old.isupper() and len(old) > 1:
        return new.upper()
    if old[:1].isupper():
        return new[:1].upper() + new[1:]
    return new


def _inflect(word: str, form: str) -> str:
    """A rewrite in the form the replaced word had ("stabbing" → "poking", "guns" → "cameras")."""
    consonant_y = word.endswith("y") and word[-2:-1] not in VOWELS
    if form == "plural" and not word.endswith("s"):
        if word.endswith(("x", "z", "ch", "sh")):
            return word + "es"
        return word[:-1] + "ies" if consonant_y else word + "s"
    if form in ("ing", "ed") and not word.endswith(form):
        if (len(word) <= 4 and word[-1] not in VOWELS | {"w", "x", "y"}
                and word[-2] in VOWELS and word[-3] not in VOWELS):
            word += word[-1]  # hug → hugging, hugged
        if form == "ing":
            return (word[:-1] if word.endswith("e") and not word.endswith("ee") else word) + "ing"
        return word[:-1] + "ied" if consonant_y else word + ("d" if word.endswith("e") else "ed")
    return word


def _fix_article(before: str, following: str) -> str:
    """`a` or `an` right before a replaced word, chosen for the word that now follows."""
    tail = ("" if len(before) > 12 else " ") + before[-12:]  # a prompt may have 5000 edits
    m = re.search(r"\s(a|an|A|An)(\s*)$", tail)
    if m is None:
        return before
    words = following[:64].split(maxsplit=1)
    word = words[0] if words else ""
    if not word[:1].isalpha():
        return before
    right = "an" if word[0].lower() in VOWELS else "a"
    if m.group(1)[0].isupper():
        right = right.capitalize()
    return before[:len(before) - (len(tail) - m.start(1))] + right + (m.group(2) or " ")


def _tidy(text: str) -> str:
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" ([,.;:!?])", r"\1", text)
    text = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", text)
    text = re.sub(r"\(\s*\)|\[\s*\]", "", text)
    text = re.sub(r"^\s*[,.;:]\s*", "", text)
    text = re.sub(r" {2,}", " ", text)
    return text.strip(" ,;:-")
