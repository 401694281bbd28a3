"""The rule-based refiner: rewrite or remove what made a prompt cross the policy's thresholds.

The fallback refiner of every judge (a model that writes no refined prompt, the builtin judge, the
offline tools that re-decide traces): it works on the matches of the policy's term lists
(guard.core.terms), so it needs no model and gives the same answer offline as in the proxy.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence

from guard.core.policy import Policy
from guard.core.terms import Hit, matcher_for
from guard.core.words import VOWELS, fold

_NOT_WORDS = re.compile(r"[\W_]+")


def normalise(prompt: str) -> str:
    """A prompt as the repeat check compares it: case, spacing and punctuation ignored."""
    return _NOT_WORDS.sub(" ", prompt.casefold()).strip()


def next_refinement(prompt: str, model_prompt: str | None, flagged: Sequence[str],
                    policy: Policy, tried: Collection[str]) -> tuple[str, bool] | None:
    """The next prompt to try after `prompt` was judged unsafe, never one in `tried` (prompts
    already made, `normalise`d): the judge's refined prompt (`model_prompt`) first, then the rule
    refiner's rewrite of `prompt`, then of the judge's. (prompt, whether the judge wrote it), or
    None when nothing new is left."""
    model = (model_prompt or "").strip()
    candidates = [(model, True)] if model else []
    candidates.append((refine_prompt(prompt, flagged, policy), False))
    if model:
        candidates.append((refine_prompt(model, flagged, policy), False))
    for text, by_model in candidates:
        if text.strip() and normalise(text) not in tried:
            return text.strip(), by_model
    return None


def refine_prompt(prompt: str, flagged: Sequence[str], policy: Policy) -> str:
    """Rewrite or remove what made `prompt` cross the `flagged` categories, then add each
    category's `append` words once.

    Terms with a rewrite in the policy are replaced (keeping capitals and plurals), others are
    removed, and the punctuation left behind is tidied. If removing words still leaves a category
    over its threshold, that category is refined as well. Refining a refined prompt changes
    nothing, and the result scores below every threshold under the same policy's term lists."""
    matcher = matcher_for(policy)
    cats = [c for c in dict.fromkeys(flagged)]
    text = prompt
    for _ in range(4):
        hits = [h for c in cats for h in matcher.scan(text).hits.get(c, ())]
        if hits:
            text = _tidy(_rewrite(text, hits, policy))
        new = [c for c in policy.decide(matcher.scan(text).scores).flagged if c not in cats]
        if not hits and not new:
            break
        cats += new
    text = _tidy(text)
    for cat in sorted(cats, key=lambda c: matcher.categories.index(c)
                      if c in matcher.categories else len(matcher.categories)):
        terms = policy.terms.get(cat)
        extra = terms.append.strip() if terms else ""
        if extra and fold(extra) not in fold(text):
            text = f"{text}, {extra}" if text else extra
    return text


def _rewrite(text: str, hits: list[Hit], policy: Policy) -> str:
    # Longest match wins where hits overlap ("blood bath" over "blood").
    chosen: list[Hit] = []
    for h in sorted(hits, key=lambda h: (h.start, -(h.end - h.start), h.form != "base")):
        if not chosen or h.start >= chosen[-1].end:
            chosen.append(h)
    out = ""
    pos = 0
    for h in chosen:
        out += text[pos:h.start]
        new = _replacement(h, policy)
        after = text[h.end:]
        if new:
            out = _fix_article(out, new) + new
        else:
            out = out.rstrip(" -")
            if re.match(r"\s*(?:[,.;:!?)\]]|$)", after):
                # An article left with nothing to stand for ("holding a [gun].").
                out = re.sub(r"(?:^|\s)(?:a|an|the|A|An|The)$", "", out)
            else:
                out = _fix_article(out, after.lstrip(" -"))
        pos = h.end
    return out + text[pos:]


def _replacement(hit: Hit, policy: Policy) -> str:
    terms = policy.terms.get(hit.category)
    if terms is None:
        return ""
    rewrites = {fold(k).strip(): v for k, v in terms.rewrites.items()}
    new = rewrites.get(fold(hit.term).strip(), "")
    if not new:
        return ""
    if " " not in new:
        new = _inflect(new, hit.form)
    if hit.text.isupper() and len(hit.text) > 1:
        return new.upper()
    if hit.text[:1].isupper():
        return new[:1].upper() + new[1:]
    return new


def _inflect(word: str, form: str) -> str:
    """A rewrite in the form the replaced word had ("stabbing" → "poking", "guns" → "cameras")."""
    consonant_y = word.endswith("y") and word[-2:-1] not in VOWELS
    if form == "plural" and not word.endswith("s"):
        return word[:-1] + "ies" if consonant_y else word + "s"
    if form == "ing" and not word.endswith("ing"):
        return (word[:-1] if word.endswith("e") and not word.endswith("ee") else word) + "ing"
    if form == "ed" and not word.endswith("ed"):
        return word[:-1] + "ied" if consonant_y else word + ("d" if word.endswith("e") else "ed")
    return word


def _fix_article(before: str, following: str) -> str:
    """`a` or `an` right before a replaced word, chosen for the word that now follows."""
    m = re.search(r"(?:^|\s)(a|an|A|An)(\s*)$", before)
    word = following.split(maxsplit=1)[0] if following.split() else ""
    if not m or not word[:1].isalpha():
        return before
    right = "an" if word[0].lower() in VOWELS else "a"
    if m.group(1)[0].isupper():
        right = right.capitalize()
    return before[:m.start(1)] + right + (m.group(2) or " ")


def _tidy(text: str) -> str:
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" ([,.;:!?])", r"\1", text)
    text = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", text)
    text = re.sub(r"\(\s*\)|\[\s*\]", "", text)
    text = re.sub(r" {2,}", " ", text)
    return text.strip(" ,;:-")
