"""The builtin judge's prompt checks: a policy's term lists and patterns, compiled once, matched
against prompts that try to slip past them (the rule-based refiner,
guard.core.refiner, rewrites what they match).

Matching works on words, never on substrings, so "skill" is not "kill" and "therapist" is not
"rapist". Before comparing, each word is normalised: lowercase, accents and look-alike letters
undone, leetspeak inside words undone (`s3x`, `n00d`, `@ss`), stretched letters squeezed (`nudee`,
`nuuude`), masked letters guessed (`n*ked`, `n.ked`), letters spelt apart joined (`n.a.k.e.d`,
`n a k e d`). A term also matches its plural and verb forms (`gun` → `guns`, `stab` → `stabbing`).

Scores per category add evidence in log-odds: one strong term or pattern alone gives 0.95, one weak
term alone 0.35, and every further distinct term adds the same evidence again, so two weak terms
give 0.65, three 0.87, four 0.96 (a strong and a weak one 0.985). A weak word alone is more likely
innocent than not ("a gun"); two different ones of a category are more likely meant than not ("a
wounded soldier in battle"). Forms of one word ("fight", "fights", "fighting"), however often and
however the policy lists them, are one term. A category with `requires` scores only when one of
those categories has a hit too.
"""

from __future__ import annotations

import dataclasses
import math
import re
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from guard.core.policy import Policy, TermSet
from guard.core.words import (
    MASK,
    NEGATORS,
    Token,
    inflections,
    spelt_runs,
    split_words,
    squeeze,
    stretched,
    strip_format,
)
from guard.support.errors import ConfigError

STRONG = 0.95  # one strong term or pattern alone
WEAK = 0.35  # one weak term alone
PAIR = 0.65  # two distinct weak terms of a category


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


# Evidence in log-odds: a prior, and what each distinct term adds to it.
_WEAK_EVIDENCE = _logit(PAIR) - _logit(WEAK)
_PRIOR = _logit(WEAK) - _WEAK_EVIDENCE
_STRONG_EVIDENCE = _logit(STRONG) - _PRIOR

Strength = Literal["strong", "weak"]

# --- the compiled matcher --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Hit:
    """One match of a policy term or pattern in a prompt."""

    category: str
    term: str  # as written in the policy
    text: str  # as written in the prompt
    start: int
    end: int
    strength: Strength
    kind: Literal["term", "pattern"] = "term"
    form: str = "base"  # which form of the term matched: base, plural, ed or ing

    def to_dict(self) -> dict[str, Any]:
        return {"term": self.term, "text": self.text, "strength": self.strength,
                "kind": self.kind, "span": [self.start, self.end]}


@dataclass(frozen=True, slots=True)
class TextScores:
    """Scores per category in [0, 1] and the hits behind them (categories without hits: 0.0)."""

    scores: Mapping[str, float]
    hits: Mapping[str, tuple[Hit, ...]] = field(default_factory=dict)

    def hits_dict(self) -> dict[str, list[dict[str, Any]]]:
        return {cat: [h.to_dict() for h in hits] for cat, hits in self.hits.items() if hits}


@dataclass(frozen=True, slots=True)
class _Entry:
    category: str
    term: str
    strength: Strength
    words: tuple[dict[str, str], ...]  # per word of the term: accepted form → form name


def combine(strengths: Sequence[Strength]) -> float:
    """A category's score from the strengths of its distinct terms: 0.0 for none, else the
    prior plus each term's evidence, in log-odds."""
    if not strengths:
        return 0.0
    odds = _PRIOR + sum(_STRONG_EVIDENCE if s == "strong" else _WEAK_EVIDENCE
                        for s in strengths)
    return round(1.0 / (1.0 + math.exp(-odds)), 4)


class TermMatcher:
    """A policy's term lists and patterns, compiled. Build once per policy (`matcher_for`)."""

    def __init__(self, policy: Policy) -> None:
        self.categories = [*policy.categories, *(c for c in policy.terms
                                                 if c not in policy.categories)]
        self.requires = {cat: tuple(ts.requires) for cat, ts in policy.terms.items()}
        self._root: dict[tuple[str, str], str] = {}  # (category, term) → the word it is a form of
        self._first: dict[str, list[_Entry]] = {}  # a form of a term's first word → entries
        self._single: dict[str, list[tuple[_Entry, str]]] = {}  # one-word forms → entries
        self._vocab: set[str] = set()  # every form of every word of every term
        self._patterns: list[tuple[str, str, re.Pattern[str]]] = []
        for cat, ts in policy.terms.items():
            self._add_category(cat, ts)
        self._squeezed: dict[str, set[str]] = {}
        self._by_length: dict[int, set[str]] = {}
        for form in self._vocab:
            self._squeezed.setdefault(squeeze(form), set()).add(form)
            self._by_length.setdefault(len(form), set()).add(form)
        self._longest = max(self._by_length, default=0)
        self._squeezed_starts = {s[:n] for s in self._squeezed for n in range(1, len(s) + 1)}

    def _add_category(self, cat: str, ts: TermSet) -> None:
        seen: dict[str, str] = {}  # the term's words, normalised → the term as written
        for strength, terms in (("strong", ts.strong), ("weak", ts.weak)):
            for term in terms:
                words = [t.norm for t in split_words(term)[0]]
                key = " ".join(words)
                if not words or key in seen:
                    continue
                seen[key] = term
                self._add(_Entry(cat, term, strength,  # type: ignore[arg-type]
                                 tuple(inflections(w) for w in words)))
                if len(words) == 2:
                    # "blood bath" is also written "bloodbath"
                    self._add(_Entry(cat, term, strength,  # type: ignore[arg-type]
                                     (inflections(words[0] + words[1]),)))
        roots = _roots(seen)
        for key, term in seen.items():
            self._root[cat, term] = roots[key]
        for pattern in ts.patterns:
            try:
                self._patterns.append((cat, pattern, re.compile(pattern, re.IGNORECASE)))
            except re.error as exc:
                raise ConfigError(f"terms.{cat}.patterns: {pattern!r} is not a valid regular "
                                  f"expression: {exc}") from exc

    def _add(self, entry: _Entry) -> None:
        for form in entry.words[0]:
            self._first.setdefault(form, []).append(entry)
        if len(entry.words) == 1:
            for form, name in entry.words[0].items():
                self._single.setdefault(form, []).append((entry, name))
        for forms in entry.words:
            self._vocab.update(forms)

    # Which forms of the vocabulary a word of the prompt can be read as.
    def _readings(self, norm: str, masked: bool) -> set[str]:
        out: set[str] = set()
        if norm in self._vocab:
            out.add(norm)
        for form in self._squeezed.get(squeeze(norm), ()):
            if form != norm and stretched(form, norm):
                out.add(form)
        if masked or MASK in norm:
            out |= self._unmask(norm)
        return out

    def _unmask(self, norm: str) -> set[str]:
        letters = sum(c.isalpha() for c in norm)
        lo, hi = len(norm) - norm.count(MASK) + 1, min(len(norm), self._longest)
        if (letters < 2 or letters < len(norm) - letters or lo > hi
                or not re.fullmatch(r"[a-z*]+", norm)):
            return set()  # lo > hi: longer than every term (a 30000-letter pattern compiles slowly)
        runs = re.findall(r"\*+|[^*]+", norm)
        head = "" if runs[0][0] == MASK else runs[0]
        tail = "" if runs[-1][0] == MASK else runs[-1]
        # The letters it starts and ends with pick the few candidates first: a regular expression
        # per masked word costs 70 µs to compile, and a prompt may hold 6000 different ones.
        candidates = [form for n in range(lo, hi + 1) for form in self._by_length.get(n, ())
                      if form.startswith(head) and form.endswith(tail)]
        if not candidates:
            return set()
        rx = re.compile("".join(f"[a-z]{{1,{len(run)}}}" if run[0] == MASK else re.escape(run)
                                for run in runs))
        return {form for form in candidates if rx.fullmatch(form)}

    def _spelt(self, run: list[Token]) -> list[tuple[str, int, int]]:
        """The stretches of 3 to 24 letters of a spelt-out run that may be a term, wherever they
        start: only those whose letters (squeezed) begin a term are followed further."""
        out = []
        for a in range(len(run) - 2):
            letters = squeezed = ""
            for b in range(a, min(a + 24, len(run))):
                letters += run[b].norm
                if not squeezed.endswith(run[b].norm):
                    squeezed += run[b].norm
                if squeezed not in self._squeezed_starts:
                    break
                if b - a >= 2 and squeezed in self._squeezed:
                    out.append((letters, run[a].start, run[b].end))
        return out

    def scan(self, prompt: str) -> TextScores:
        """Score `prompt` per category, with the hits behind each score. Format characters and
        NUL are not read (`na\u200bked` is `naked`); hits' spans are in `prompt` as given."""
        clean, where = strip_format(prompt)
        raw = self._raw_hits(clean)
        if where is not None:
            raw = {cat: [_moved(h, prompt, where) for h in hits] for cat, hits in raw.items()}
        scored: dict[str, tuple[Hit, ...]] = {}
        for cat in self.categories:
            found = tuple(raw.get(cat, ()))
            needs = self.requires.get(cat, ())
            if found and needs and not any(raw.get(other) for other in needs):
                found = ()
            scored[cat] = found
        scores = {}
        for cat, hits in scored.items():
            # A term counts once, at its strongest, however often and in whichever form.
            terms: dict[tuple[str, str], Strength] = {}
            for h in hits:
                key = (h.kind, self._root.get((cat, h.term), h.term))
                if terms.get(key) != "strong":
                    terms[key] = h.strength
            scores[cat] = combine(list(terms.values()))
        return TextScores(scores, {c: h for c, h in scored.items() if h})

    def _raw_hits(self, prompt: str) -> dict[str, list[Hit]]:
        tokens, joined = split_words(prompt)
        for run in spelt_runs(tokens, prompt):
            joined += self._spelt(run)
        known: dict[tuple[str, bool], set[str]] = {}  # a prompt may repeat a word 10000 times
        for t in tokens:
            if (t.norm, t.masked) not in known:
                known[t.norm, t.masked] = self._readings(t.norm, t.masked)
        readings = [known[t.norm, t.masked] for t in tokens]
        out: dict[str, list[Hit]] = {}

        def add(hit: Hit) -> None:
            out.setdefault(hit.category, []).append(hit)

        covered: set[int] = set()
        for i, first in enumerate(readings):
            for form in sorted(first):
                for entry in self._first.get(form, ()):
                    n = len(entry.words)
                    if i + n > len(tokens) or not all(
                            readings[i + k] & entry.words[k].keys() for k in range(1, n)):
                        continue
                    start, end = tokens[i].start, tokens[i + n - 1].end
                    covered.update(range(start, end))
                    add(Hit(entry.category, entry.term, prompt[start:end], start, end,
                            entry.strength, "term",
                            entry.words[-1][min(readings[i + n - 1] & entry.words[-1].keys())]))
        for norm, start, end in joined:
            if start in covered:
                continue
            for form in self._readings(norm, MASK in norm):
                for entry, name in self._single.get(form, ()):
                    add(Hit(entry.category, entry.term, prompt[start:end], start, end,
                            entry.strength, "term", name))
        if self._patterns:
            normalised, spans = _normalised_text(tokens)
            starts, ends = [s[0] for s in spans], [s[1] for s in spans]
            for cat, source, rx in self._patterns:
                for m in rx.finditer(prompt):
                    if m.end() > m.start():
                        add(Hit(cat, source, m.group(0), m.start(), m.end(), "strong", "pattern"))
                for m in rx.finditer(normalised):
                    # the words the match touches (a search: a prompt may have 5000 words)
                    lo, hi = bisect_right(ends, m.start()), bisect_left(starts, m.end())
                    if lo < hi:
                        start, end = spans[lo][2], spans[hi - 1][3]
                        add(Hit(cat, source, prompt[start:end], start, end, "strong", "pattern"))
        # "no nudity", "without blood", "non-violent" say what is not wanted.
        negated = {tokens[j + 1].start for j in range(len(tokens) - 1)
                   if tokens[j].norm in NEGATORS}
        kept = {cat: _one_per_place([h for h in hits
                                     if h.kind == "pattern" or h.start not in negated])
                for cat, hits in out.items()}
        return {cat: hits for cat, hits in kept.items() if hits}


def _moved(hit: Hit, prompt: str, where: list[int]) -> Hit:
    """A hit in the prompt with format characters removed, put back in the prompt as given."""
    start, end = where[hit.start], where[hit.end - 1] + 1
    return dataclasses.replace(hit, start=start, end=end, text=prompt[start:end])


def _roots(keys: Iterable[str]) -> dict[str, str]:
    """Per term (its normalised words), the shortest term of the same list it is a form of:
    `fights` and `fighting` are `fight`, `pinup` is `pin up`; other terms are their own."""
    root_of_form: dict[str, str] = {}
    out: dict[str, str] = {}
    for key in sorted(keys, key=lambda k: (len(k.replace(" ", "")), k)):
        words = key.split(" ")
        joined = "".join(words)
        root = root_of_form.get(key) or root_of_form.get(joined) or key
        out[key] = root
        head = " ".join(words[:-1])
        for form in inflections(words[-1]):
            root_of_form.setdefault(f"{head} {form}".lstrip(), root)
        if len(words) > 1:
            for form in inflections(joined):
                root_of_form.setdefault(form, root)
    return out


def _normalised_text(tokens: list[Token]) -> tuple[str, list[tuple[int, int, int, int]]]:
    """The prompt as normalised words joined by spaces, with each word's span there and in the
    prompt, so a pattern can be matched against what the words say rather than how."""
    parts: list[str] = []
    spans: list[tuple[int, int, int, int]] = []
    pos = 0
    for t in tokens:
        spans.append((pos, pos + len(t.norm), t.start, t.end))
        parts.append(t.norm)
        pos += len(t.norm) + 1
    return " ".join(parts), spans


def _one_per_place(hits: list[Hit]) -> list[Hit]:
    """One hit per place in the prompt: where hits of a category overlap ("stabbing" read as
    `stab` and as `stabbing`, "covered in blood" and "blood"), the strongest and longest one."""
    kept: list[Hit] = []  # apart from each other: in order of start and of end alike
    starts: list[int] = []
    for h in sorted(hits, key=lambda h: (h.strength != "strong", h.start - h.end,
                                         h.form != "base", h.start)):
        # only the neighbours can overlap (a search: a prompt may repeat a term 5000 times)
        i = bisect_right(starts, h.start)
        if (i == 0 or kept[i - 1].end <= h.start) and (i == len(kept) or h.end <= kept[i].start):
            kept.insert(i, h)
            starts.insert(i, h.start)
    return kept


_CACHE: OrderedDict[str, tuple[Policy, TermMatcher]] = OrderedDict()
_CACHE_SIZE = 32


def matcher_for(policy: Policy) -> TermMatcher:
    """The compiled matcher of `policy`, built once (by file hash, or per object for policies
    built in code)."""
    key = policy.sha256 or f"id:{id(policy)}"
    cached = _CACHE.get(key)
    if cached is not None and (policy.sha256 or cached[0] is policy):
        _CACHE.move_to_end(key)
        return cached[1]
    matcher = TermMatcher(policy)
    _CACHE[key] = (policy, matcher)  # holding the policy keeps its id from being reused
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return matcher


def score_prompt(prompt: str, policy: Policy) -> TextScores:
    """Scores per category of `prompt` under `policy`'s term lists, with the hits."""
    return matcher_for(policy).scan(prompt)
