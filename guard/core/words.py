"""Words of a prompt as the builtin judge's term matcher (guard.core.terms) compares them:
split with their spans, folded (case, accents, look-alike letters), leetspeak undone, and the
alternatives of a word written apart (`n.a.k.e.d`, `n-ked`, `n a k e d`); format characters
(zero-width spaces and joiners, soft hyphens, direction marks) and NUL, which split a word past
every list, removed first. Also the closed classes of English words (articles, prepositions,
pronouns) the rule refiner (guard.core.refiner) reads phrases by."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# Characters that stand for letters inside a word.
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t",
                       "@": "a", "$": "s", "!": "i"})
# Cyrillic and Greek letters that look like Latin ones and are used to dodge filters.
_CONFUSABLES = str.maketrans({
    "а": "a", "в": "b", "е": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c",
    "т": "t", "у": "y", "х": "x", "і": "i", "ј": "j", "ѕ": "s", "ԁ": "d", "ɡ": "g",
    "α": "a", "ε": "e", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t", "υ": "u",
    "χ": "x",
})
MASK = "*"
# A raw word: letters, digits, and the characters used for leetspeak, masking and joining.
_RAW_WORD = re.compile(r"[\w@$*!'’.\-]+", re.UNICODE)
_SEPARATORS = re.compile(r"[.\-_]+")
VOWELS = set("aeiou")
NEGATORS = frozenset({"no", "not", "without", "non", "anti", "zero", "never"})


def strip_format(text: str) -> tuple[str, list[int] | None]:
    """`text` without format characters (Unicode category Cf) and NUL, and where each character
    left came from (None when nothing was removed)."""
    if text.isprintable() or not any(_invisible(c) for c in text):
        return text, None
    where = [i for i, c in enumerate(text) if not _invisible(c)]
    return "".join(text[i] for i in where), where


def _invisible(ch: str) -> bool:
    return ch == "\0" or (not ch.isprintable() and unicodedata.category(ch) == "Cf")


# --- closed word classes, for reading phrases ------------------------------------------------

ARTICLES = frozenset({"a", "an", "the"})
# Words that stand before a noun and mean nothing without one.
DETERMINERS = ARTICLES | frozenset({
    "his", "her", "their", "its", "my", "your", "our", "this", "that", "these", "those", "some",
    "any", "each", "every", "another", "several", "many", "few", "one", "two", "three", "four",
    "five", "six", "seven", "eight", "nine", "ten", "lots", "lot", "bunch", "pair"})
PREPOSITIONS = frozenset({
    "about", "above", "across", "after", "against", "along", "amid", "among", "around", "as",
    "at", "before", "behind", "below", "beneath", "beside", "besides", "between", "beyond", "by",
    "despite", "down", "during", "except", "for", "from", "in", "inside", "into", "like", "near",
    "of", "off", "on", "onto", "out", "outside", "over", "past", "per", "through",
    "throughout", "to", "toward", "towards", "under", "underneath", "until", "up", "upon", "via",
    "with", "within", "without"})
CONJUNCTIONS = frozenset({"and", "or", "but", "nor", "&", "while", "whilst", "whereas", "so"})
# An object that goes with the verb it follows ("choking each other", "beating him").
OBJECT_PRONOUNS = frozenset({
    "him", "her", "them", "it", "me", "us", "you", "himself", "herself", "themselves", "itself",
    "myself", "yourself", "ourselves", "each", "one"})
AUXILIARIES = frozenset({
    "be", "is", "are", "was", "were", "been", "being", "has", "have", "had", "having", "do",
    "does", "did", "doing", "get", "gets", "got", "getting", "gotten"})
# Words ending in -ing that are things, not doings ("a painting of a king").
ING_NOUNS = frozenset({
    "anything", "awning", "bedding", "being", "beings", "bling", "building", "buildings",
    "ceiling", "clothing", "darling", "dressing", "dumpling", "evening", "everything", "feeling",
    "king", "kings", "lighting", "morning", "nothing", "offspring", "painting", "paintings",
    "pudding", "ring", "rings", "sibling", "something", "spring", "sterling", "string",
    "swing", "thing", "things", "viking", "vikings", "wedding", "wing", "wings", "ping",
    "ding", "sling", "fling", "sing", "bring", "sting", "cling", "wring", "during"})
# Words that describe the picture rather than what is in it: a prompt of only these (and
# function words) has nothing left to show.
STYLE_WORDS = frozenset({
    "art", "artwork", "artstation", "award", "winning", "beautiful", "cinematic", "concept",
    "detail", "detailed", "details", "digital", "dramatic", "epic", "high", "highly", "hd",
    "hdr", "hyperrealistic", "hyper", "illustration", "intricate", "k", "lighting", "masterpiece",
    "octane", "painting", "photo", "photograph", "photography", "photorealistic", "portrait",
    "quality", "realistic", "render", "resolution", "sharp", "focus", "style", "trending",
    "ultra", "unreal", "engine", "uhd", "4k", "8k", "16k", "volumetric", "hq", "closeup",
    "close-up", "full", "body", "shot", "image", "picture", "very", "extremely", "insanely",
    "stunning", "amazing", "best", "professional", "smooth", "elegant", "vivid", "colors",
    "colours", "lens", "mm", "f"})
FUNCTION_WORDS = (DETERMINERS | PREPOSITIONS | CONJUNCTIONS | OBJECT_PRONOUNS | AUXILIARIES
                  | frozenset({"he", "she", "they", "i", "we", "who", "which", "what", "there",
                               "not", "no", "very", "just", "also", "other", "s"}))


def fold(text: str) -> str:
    """Lowercase, accents stripped, look-alike letters mapped to Latin."""
    text = unicodedata.normalize("NFKD", text.translate(_CONFUSABLES))
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return text.lower().translate(_CONFUSABLES)


def norm_word(word: str) -> str:
    """One word as compared with the term lists: folded, leetspeak undone, apostrophes dropped."""
    word = fold(word)
    if word.endswith(("'s", "’s")):
        word = word[:-2]
    word = word.replace("'", "").replace("’", "")
    if any(c.isalpha() for c in word) and not word.isalpha():
        # Leetspeak only inside words: "4k" and "1980s" keep their digits' meaning as far as
        # they can, but a word that mixes letters and symbols is read as letters.
        word = word.translate(_LEET)
    return word


def squeeze(word: str) -> str:
    return re.sub(r"(.)\1+", r"\1", word)


def _runs(word: str) -> list[tuple[str, int]]:
    return [(m.group(1), len(m.group(0))) for m in re.finditer(r"(.)\1*", word)]


def stretched(term: str, word: str) -> bool:
    """Whether `word` is `term` with letters held longer ("nuuude", "nudee", "sexxx").

    A run may grow only to three or more letters, or at the end of the word: "good" is not "god"
    stretched and "shoot" is not "shot", but "gooore" is "gore" and "nakedd" is "naked"."""
    a, b = _runs(term), _runs(word)
    if len(a) != len(b):
        return False
    for i, ((ca, na), (cb, nb)) in enumerate(zip(a, b, strict=True)):
        if ca != cb or nb < na:
            return False
        if nb > na and nb < 3 and i != len(a) - 1:
            return False
    return True


def inflections(word: str) -> dict[str, str]:
    """A term's word and its plural and verb forms, each with its form: base, plural, ed, ing."""
    out = {word: "base"}
    if len(word) < 3 or not word.isalpha():
        out[word + "s"] = "plural"
        return out
    if word.endswith(("s", "x", "z", "ch", "sh", "o")):
        out[word + "es"] = "plural"
    if word.endswith("y") and word[-2] not in VOWELS:
        out[word[:-1] + "ies"] = "plural"
        out[word[:-1] + "ied"] = "ed"
    if not word.endswith("s"):
        out[word + "s"] = "plural"
    if word.endswith("e"):
        out[word + "d"] = "ed"
        out[word[:-1] + "ing"] = "ing"
    else:
        out[word + "ed"] = "ed"
        out[word + "ing"] = "ing"
        if (word[-1] not in VOWELS | {"w", "x", "y"} and word[-2] in VOWELS
                and word[-3] not in VOWELS):
            # stab → stabbed, stabbing
            out[word + word[-1] + "ed"] = "ed"
            out[word + word[-1] + "ing"] = "ing"
    return out


@dataclass(frozen=True, slots=True)
class Token:
    norm: str
    start: int
    end: int
    masked: bool = False  # contains `*` standing for letters


def split_words(text: str) -> tuple[list[Token], list[tuple[str, int, int]]]:
    """Words of `text` with their spans, and the joined alternatives of separated words
    (`n.a.k.e.d`, `n-ked`) to try as one word. Words spelt out with spaces: `spelt_runs`."""
    tokens: list[Token] = []
    joined: list[tuple[str, int, int]] = []
    for m in _RAW_WORD.finditer(text):
        raw, start = m.group(0), m.start()
        # Sentence punctuation, quotes and *emphasis* around a word are not part of it.
        lead = len(raw) - len(raw.lstrip(".-'’!_*"))
        raw = raw.strip(".-'’!_*")
        start += lead
        if not raw:
            continue
        parts = [(p.group(0), start + p.start()) for p in re.finditer(r"[^.\-_]+", raw)]
        if len(parts) > 1:
            if all(len(p) == 1 for p, _ in parts):
                tokens.append(Token(norm_word("".join(p for p, _ in parts)), start,
                                     start + len(raw)))
                continue
            # "n-ked", "n.ked": a separator may mask a letter.
            joined.append((norm_word(_SEPARATORS.sub(MASK, raw)), start, start + len(raw)))
        for part, pstart in parts:
            norm = norm_word(part)
            if norm.strip(MASK):
                tokens.append(Token(norm, pstart, pstart + len(part), MASK in norm))
    return tokens, joined


def spelt_runs(tokens: list[Token], text: str) -> list[list[Token]]:
    """Runs of three or more one-letter words apart by one space: "n a k e d", and the words
    that may hide in them ("a n a k e d", "x y z n a k e d")."""
    runs = []
    i = 0
    while i < len(tokens):
        j = i
        while (j < len(tokens) and len(tokens[j].norm) == 1 and tokens[j].norm.isalpha()
               and (j == i or text[tokens[j - 1].end:tokens[j].start] == " ")):
            j += 1
        if j - i >= 3:
            runs.append(tokens[i:j])
        i = max(j, i + 1)
    return runs
