"""A policy in plain language, and the effective difference between two policies, in words.

Both work on resolved policies (`extends` merged in), so what they say is what the proxy does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from guard.audit.policies import PolicyHistory
from guard.core.policy import Category, Policy, TermSet
from guard.core.policy.loader import Source, from_canonical, origin

Effect = Literal["stricter", "looser", "neutral"]
_RANK = {"allow": 0, "edit": 1, "refuse": 2}

_ACTION_HEADINGS = {
    "refuse": "Refused (never edited; the client gets HTTP 400 content_policy_violation):",
    "edit": "Edited (the prompt is refined and the image made again):",
    "allow": "Recorded only (allowed; the score is kept in the trace):",
}
_EXHAUSTED = {
    "refuse": "the whole request is refused",
    "drop": "that image is dropped and the safe ones are returned (refused if none is left)",
}
_PRESCREEN = {
    True: "prompts are judged before generating (prescreen on)",
    False: "prompts are not judged before generating (prescreen off): unsafe prompts reach "
           "the backend",
    "concurrent": "prompts are judged while the first round generates (prescreen concurrent): "
                  "that generation is cancelled, never judged nor returned, when the prompt is "
                  "to be edited or refused",
}
_JUDGE_ERROR = {
    "refuse": "the request is refused (HTTP 503, fail closed)",
    "allow": "images are returned unjudged (fail open; the trace records it)",
}
_UNASSESSED = {
    "prompt": "the verdict on its prompt stands (refused when no judge assessed the prompt for "
              "it either)",
    "refuse": "the image is refused",
    "pass": "that category passes (a score a judge gave still counts)",
}
_UNASSESSED_RANK = {"pass": 0, "prompt": 1, "refuse": 2}
_REFINE = {
    "regenerate": "unsafe images are made again from the refined prompt",
    "edit": "unsafe images are edited with the refined prompt where the backend can edit, "
            "else made again",
}
_RETENTION = {
    "none": "no images are kept (the trace holds each image's sha256)",
    "flagged": "images of unsafe rounds are kept",
    "flagged_and_delivered": "for a request with any flag, its flagged images and the ones "
                             "delivered in their place are kept",
    "all": "every image is kept",
}


# --- explain ------------------------------------------------------------------------------------

def explain(policy: Policy, chain: Sequence[Source] = ()) -> str:
    """What `policy` does, in plain language; with its chain of files, where each value is set."""

    def where(*loc: str) -> str:
        if not chain:
            return ""
        source = origin(chain, loc)
        if source is None:
            return " (built-in default)"
        return "" if source is chain[0] else f" (from {source.id})"

    lines = [f"Policy '{policy.id}', version {policy.version}"]
    if chain:
        parents = ", ".join(f"{s.id} ({s.path})" for s in chain[1:])
        lines.append(f"  file: {chain[0].path}" + (f"; extends {parents}" if parents else ""))
    elif policy.extends:
        lines.append(f"  extends: {policy.extends}")
    if policy.sha256:
        lines.append(f"  sha256: {policy.sha256}")
    if policy.description:
        lines.append(f"  {policy.description.strip()}")
    lines.append("")
    if policy.prescreen_concurrent:
        lines.append("The prompt alone is judged while the first image is made (prescreen "
                     "concurrent): a prompt over a refuse threshold is refused and one over an "
                     "edit threshold rewritten, that first generation cancelled unseen; a safe "
                     f"prompt costs no extra wait.{where('prescreen')}")
    elif policy.prescreen:
        lines.append("Before any image is made, the prompt alone is judged: a prompt over a "
                     "refuse threshold is refused without a generation, one over an edit "
                     f"threshold is rewritten first.{where('prescreen')}")
    else:
        lines.append("Prompts are not judged before generating (prescreen off): only images "
                     f"are judged.{where('prescreen')}")
    for action in ("refuse", "edit", "allow"):
        cats = [(n, c) for n, c in policy.categories.items() if c.action == action]
        if not cats:
            continue
        lines += ["", _ACTION_HEADINGS[action]]
        width = max(len(n) for n, _ in cats)
        for name, cat in sorted(cats, key=lambda nc: nc[1].threshold):
            about = f" - {cat.description.strip()}" if cat.description else ""
            if cat.unassessed is not None:
                about += f" (image not assessed: {cat.unassessed})"
            lines.append(f"  {name:<{width}}  score {_score(cat.threshold)} or more{about}"
                         f"{_category_origin(chain, name)}")
    lines += ["", "Any other category a judge reports is recorded in the trace, not acted on."]
    rounds = policy.rounds
    lines += [
        "",
        f"Rounds: at most {rounds.max} generation{'s' if rounds.max > 1 else ''} per image, the "
        f"first included ({_edits(rounds.max)}).{where('rounds', 'max')}",
        f"Still unsafe after round {rounds.max}, or when nothing new is left to try: "
        f"{_EXHAUSTED[rounds.on_exhausted]}.{where('rounds', 'on_exhausted')}",
        f"Deadline: {_deadline(rounds.deadline_s)}.{where('rounds', 'deadline_s')}",
        f"Hedging: {_hedge(policy)}.{where('hedge')}",
        f"When the judge fails: {_JUDGE_ERROR[policy.on_judge_error]}."
        f"{where('on_judge_error')}",
        f"Where no judge could assess an image for a category: "
        f"{_UNASSESSED[policy.unassessed]}.{where('unassessed')}",
        f"Repair: {_REFINE[policy.refine_mode]}.{where('refine_mode')}",
        f"Audit log: {_RETENTION[policy.image_retention]}.{where('image_retention')}",
    ]
    if policy.terms:
        lines += ["", "Builtin judge term lists (scores come from these when the judge is "
                      "`builtin`):"]
        width = max(len(n) for n in policy.terms)
        for name, terms in policy.terms.items():
            lines.append(f"  {name:<{width}}  {_terms_summary(terms)}")
    return "\n".join(lines) + "\n"


def _category_origin(chain: Sequence[Source], name: str) -> str:
    if not chain:
        return ""
    found = {part: origin(chain, ("categories", name, part)) for part in ("threshold", "action")}
    ids = {part: (s.id if s is not None else "?") for part, s in found.items()}
    if all(s is chain[0] for s in found.values()):
        return ""
    if ids["threshold"] == ids["action"]:
        return f"  (from {ids['threshold']})"
    return f"  (threshold from {ids['threshold']}, action from {ids['action']})"


def _deadline(seconds: float | None) -> str:
    if seconds is None:
        return ("none (a client may set one with the x-guard-deadline-s header); rounds run "
                "until the images are safe or the rounds run out")
    return (f"{seconds:g} s per request (a client's x-guard-deadline-s may shorten it): no round "
            "starts that could not finish in time; when time runs out the request fails with "
            "HTTP 504 guard_deadline_exceeded, or with `on_exhausted: drop` returns its safe "
            "images")


def _hedge(policy: Policy) -> str:
    if policy.hedge is None:
        return "off"
    low, high = policy.hedge.band
    return (f"when the prompt's highest prescreen score lies in [{_score(low)}, "
            f"{_score(high)}], the first round also generates the refined prompt and keeps the "
            "first safe image (extra generations)")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _edits(rounds: int) -> str:
    if rounds == 1:
        return "no edits: an unsafe image is not redone"
    return f"up to {rounds - 1} edit{'s' if rounds > 2 else ''}"


def _terms_summary(terms: TermSet) -> str:
    parts = [_count(len(v), noun) for noun, v in (
        ("strong term", terms.strong), ("weak term", terms.weak), ("pattern", terms.patterns),
        ("rewrite", terms.rewrites)) if v]
    if terms.append:
        parts.append(f'adds "{terms.append}"')
    if terms.requires:
        parts.append(f"only with {' or '.join(terms.requires)}")
    return ", ".join(parts) or "empty"


# --- diff ---------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Change:
    field: str
    text: str
    effect: Effect = "neutral"

    def __str__(self) -> str:
        return f"[{self.effect}] {self.text}"


def diff(old: Policy, new: Policy) -> list[Change]:
    """The effective differences between two resolved policies, in words, each marked stricter
    (more is edited or refused), looser (less is) or neutral."""
    out: list[Change] = []
    for name in ("id", "version", "extends"):
        a, b = getattr(old, name), getattr(new, name)
        if a != b:
            out.append(Change(name, f"{name}: {_show(a)} -> {_show(b)}"))
    if old.description != new.description:
        out.append(Change("description", "description changed"))
    if old.prescreen != new.prescreen:
        # On and concurrent refuse and edit alike: only when the prompt is judged differs.
        effect: Effect = ("looser" if not new.prescreen else
                          "stricter" if not old.prescreen else "neutral")
        out.append(Change("prescreen", f"{_PRESCREEN[new.prescreen]} "
                                       f"(was: {_PRESCREEN[old.prescreen]})", effect))
    for name in [*old.categories, *(n for n in new.categories if n not in old.categories)]:
        out += _category_changes(name, old.categories.get(name), new.categories.get(name))
    out += _rounds_changes(old, new)
    if old.on_judge_error != new.on_judge_error:
        out.append(Change("on_judge_error",
                          f"when the judge fails: {_JUDGE_ERROR[new.on_judge_error]} "
                          f"(was: {_JUDGE_ERROR[old.on_judge_error]})",
                          "looser" if new.on_judge_error == "allow" else "stricter"))
    if old.unassessed != new.unassessed:
        out.append(Change("unassessed", "where no judge could assess an image for a category: "
                          f"{_UNASSESSED[new.unassessed]} (was: {_UNASSESSED[old.unassessed]})",
                          _unassessed_effect(old.unassessed, new.unassessed)))
    if old.refine_mode != new.refine_mode:
        out.append(Change("refine_mode", f"repair: {_REFINE[new.refine_mode]} "
                                         f"(was: {_REFINE[old.refine_mode]})"))
    if old.image_retention != new.image_retention:
        out.append(Change("image_retention", f"audit log: {_RETENTION[new.image_retention]} "
                                             f"(was: {_RETENTION[old.image_retention]})"))
    for name in [*old.terms, *(n for n in new.terms if n not in old.terms)]:
        out += _terms_changes(name, old.terms.get(name, TermSet()),
                              new.terms.get(name, TermSet()))
    return out


def _category_changes(name: str, old: Category | None, new: Category | None) -> list[Change]:
    field = f"categories.{name}"
    if old is None and new is not None:
        return [Change(field, f"new category '{name}': {_acted(new)}",
                       "neutral" if new.action == "allow" else "stricter")]
    if new is None and old is not None:
        return [Change(field, f"category '{name}' removed (was {_acted(old)}): no longer acted on",
                       "neutral" if old.action == "allow" else "looser")]
    assert old is not None and new is not None
    out: list[Change] = []
    more_action = _RANK[new.action] - _RANK[old.action]
    lower = new.threshold < old.threshold
    if more_action and old.threshold != new.threshold:
        agree = (more_action > 0) == lower
        effect: Effect = ("stricter" if lower else "looser") if agree else "neutral"
        out.append(Change(field, f"{name}: {_acted(new)} (was {_acted(old)})", effect))
    elif more_action:
        out.append(Change(f"{field}.action", f"{name}: {_verb(old.action)} -> "
                          f"{_verb(new.action)} at score {_score(new.threshold)} or more",
                          "stricter" if more_action > 0 else "looser"))
    elif old.threshold != new.threshold and new.action != "allow":
        out.append(Change(f"{field}.threshold",
                          f"{name}: {_verb(new.action)} from score {_score(new.threshold)} "
                          f"(was {_score(old.threshold)}): acts on {'more' if lower else 'fewer'} "
                          "prompts and images", "stricter" if lower else "looser"))
    elif old.threshold != new.threshold:
        out.append(Change(f"{field}.threshold", f"{name}: recorded from score "
                          f"{_score(new.threshold)} (was {_score(old.threshold)})"))
    if old.description != new.description:
        out.append(Change(f"{field}.description", f"{name}: description changed"))
    if old.unassessed != new.unassessed:
        out.append(Change(f"{field}.unassessed",
                          f"{name}: an image not assessed for it: {_own(new.unassessed)} "
                          f"(was {_own(old.unassessed)})",
                          _unassessed_effect(old.unassessed, new.unassessed)))
    return out


def _own(mode: str | None) -> str:
    return mode if mode is not None else "as the policy's `unassessed` says"


def _unassessed_effect(old: str | None, new: str | None) -> Effect:
    if old is None or new is None:
        return "neutral"
    rank = _UNASSESSED_RANK[new] - _UNASSESSED_RANK[old]
    return "stricter" if rank > 0 else "looser" if rank < 0 else "neutral"


def _rounds_changes(old: Policy, new: Policy) -> list[Change]:
    out: list[Change] = []
    a, b = old.rounds, new.rounds
    if a.max != b.max:
        more = b.max > a.max
        out.append(Change("rounds.max", f"rounds: at most {b.max} (was {a.max}): "
                          + ("more attempts to edit before giving up, fewer refusals, "
                             "more latency" if more else
                             "fewer attempts to edit before giving up, more refusals"),
                          "neutral" if more else "stricter"))
    if a.on_exhausted != b.on_exhausted:
        out.append(Change("rounds.on_exhausted",
                          f"still unsafe after the last round: {_EXHAUSTED[b.on_exhausted]} "
                          f"(was: {_EXHAUSTED[a.on_exhausted]})",
                          "looser" if b.on_exhausted == "drop" else "stricter"))
    if a.deadline_s != b.deadline_s:
        # A shorter deadline fails more requests (HTTP 504), never lets an unsafe image through.
        out.append(Change("rounds.deadline_s", f"deadline: {_deadline(b.deadline_s)} (was: "
                                               f"{_deadline(a.deadline_s)})"))
    if old.hedge != new.hedge:
        out.append(Change("hedge", f"hedging: {_hedge(new)} (was: {_hedge(old)})"))
    return out


def _terms_changes(name: str, old: TermSet, new: TermSet) -> list[Change]:
    out: list[Change] = []
    for kind in ("strong", "weak", "patterns"):
        before, after = getattr(old, kind), getattr(new, kind)
        added = [t for t in after if t not in before]
        removed = [t for t in before if t not in after]
        if added:
            out.append(Change(f"terms.{name}.{kind}",
                              f"{name}: {kind} terms added: {_words(added)}", "stricter"))
        if removed:
            out.append(Change(f"terms.{name}.{kind}",
                              f"{name}: {kind} terms removed: {_words(removed)}", "looser"))
    for term in [*old.rewrites, *(t for t in new.rewrites if t not in old.rewrites)]:
        a, b = old.rewrites.get(term), new.rewrites.get(term)
        if a != b:
            now = f'rewritten to "{b}"' if b is not None else "removed from refined prompts"
            out.append(Change(f"terms.{name}.rewrites",
                              f'{name}: "{term}" is now {now}'
                              + (f' (was "{a}")' if a is not None else "")))
    if old.append != new.append:
        out.append(Change(f"terms.{name}.append",
                          f"{name}: the refiner now adds {_show(new.append)} "
                          f"(was {_show(old.append)})"))
    if set(old.requires) != set(new.requires):
        out.append(Change(f"terms.{name}.requires",
                          f"{name}: scored only with {' or '.join(new.requires) or 'anything'} "
                          f"(was {' or '.join(old.requires) or 'anything'})",
                          _gate_effect(set(old.requires), set(new.requires))))
    return out


def _gate_effect(old: set[str], new: set[str]) -> Effect:
    # `requires` is a gate: any one of its categories opens it; no gate scores always.
    if not new or (old and new > old):
        return "stricter"
    if not old or new < old:
        return "looser"
    return "neutral"


def _acted(cat: Category) -> str:
    return f"{_verb(cat.action)} at score {_score(cat.threshold)} or more"


def _verb(action: str) -> str:
    return {"edit": "edited", "refuse": "refused", "allow": "recorded only"}[action]


def _words(terms: Sequence[str]) -> str:
    return ", ".join(f'"{t}"' for t in terms)


def _show(value: object) -> str:
    if value is None or value == "":
        return "(none)"
    return f'"{value}"' if isinstance(value, str) else str(value)


async def compare_versions(history: PolicyHistory, a: str, b: str) -> list[Change] | None:
    """The effective differences between two versions kept in the policy history (by sha256),
    or None when either is not there."""
    old, new = await history.content(a), await history.content(b)
    if old is None or new is None:
        return None
    return diff(from_canonical(old[2]), from_canonical(new[2]))


def _score(value: float) -> str:
    """A threshold as written, never rounded: 0.60 stays 0.60, 0.985 is 0.985 (not 0.98 or
    0.99, which could make two different thresholds read alike)."""
    return f"{value:.2f}" if round(value, 2) == value else repr(value)
