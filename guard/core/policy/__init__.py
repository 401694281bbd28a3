"""Policies: the compliance officers' YAML files, their model, inheritance and decisions.

A policy sets, per category, a score threshold in [0, 1] and the action taken when a score reaches
it (`edit`, `refuse`, `allow`), how many rounds of editing are allowed, and what happens when they
run out or when the judge fails. Judges produce scores; only the policy turns scores into decisions,
which is what makes replaying stored traces under a candidate policy possible.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from guard.support.errors import ConfigError

Action = Literal["edit", "refuse", "allow"]
Unassessed = Literal["refuse", "pass", "prompt"]
_ACTION_RANK = {"allow": 0, "edit": 1, "refuse": 2}

# The shipped policies are package data of `guard`: in a checkout guard/policies links to the
# top-level policies/ folder, which a wheel carries as files (pip installs packages unzipped).
POLICIES_DIR = Path(str(resources.files("guard") / "policies")).resolve()


def local_policies_dir() -> Path | None:
    """`./policies/` in the working directory, when it is a folder other than the shipped one.

    `safeedit serve` and `safeedit policy validate` read it after the shipped policies."""
    local = Path("policies").resolve()
    return local if local.is_dir() and local != POLICIES_DIR else None


def policy_sources(extra: Iterable[str | Path] = ()) -> list[Path]:
    """Where policies are read from, in order (later files win on equal ids): the shipped
    policies, then `extra` (the config's `policy_paths`, the command line's folders)."""
    return [POLICIES_DIR, *(Path(p) for p in extra)]


class _Strict(BaseModel):
    # A typo in a policy must never silently weaken it: unknown keys are errors.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Category(_Strict):
    threshold: float = Field(
        ge=0.0, le=1.0,
        description="Score in [0, 1] at or above which the category counts as crossed.")
    action: Action = Field(
        description="What happens when the threshold is crossed: `edit` (refine the prompt and "
                    "regenerate), `refuse` (never edited, the request is refused) or `allow` "
                    "(recorded in the trace, nothing else).")
    description: str = Field("", description="What the category covers, in words, for reviewers.")
    unassessed: Unassessed | None = Field(
        None, description="What it means when no judge could assess an image for this category "
                          "(overrides the policy's `unassessed`): `refuse`, `pass` or `prompt`.")


class Rounds(_Strict):
    max: int = Field(3, ge=1, le=10,
                     description="Most generation rounds per image, the first one included.")
    on_exhausted: Literal["refuse", "drop"] = Field(
        "refuse",
        description="When an image is still unsafe after the last round: `refuse` the request, "
                    "or `drop` that image and return the safe ones (refuse if none is left).")
    deadline_s: float | None = Field(
        None, gt=0,
        description="Seconds a request may take in all (a client's `x-guard-deadline-s` header "
                    "may shorten it, or set one where this is none): no round starts that could "
                    "not finish in time, and at the deadline the request ends (HTTP 504 "
                    "guard_deadline_exceeded, or the safe images when `on_exhausted: drop`).")


class Hedge(_Strict):
    band: tuple[float, float] = Field(
        description="[low, high]: when the prescreen's highest score lies in this band (the "
                    "prompt passed, but barely), round 1 also generates the refined prompt beside "
                    "the original and each image keeps whichever is first judged safe.")

    @field_validator("band")
    @classmethod
    def _ordered(cls, band: tuple[float, float]) -> tuple[float, float]:
        low, high = band
        if not 0.0 <= low < high <= 1.0:
            raise ValueError("the band is [low, high] with 0 <= low < high <= 1")
        return band


class TermSet(_Strict):
    strong: tuple[str, ...] = Field(
        (), description="Words or phrases that on their own put the category over 0.9.")
    weak: tuple[str, ...] = Field(
        (), description="Suggestive words: each adds about 0.35; two of them cross 0.5.")
    patterns: tuple[str, ...] = Field(
        (), description="Regular expressions (case-insensitive) that count like a strong term.")
    rewrites: Mapping[str, str] = Field(
        default_factory=dict,
        description="How the rule-based refiner replaces a flagged term; a term without a "
                    "rewrite is removed from the refined prompt.")
    append: str = Field(
        "", description="Words the refiner adds to the prompt when this category was flagged "
                        "on the image, e.g. `fully clothed`.")
    requires: tuple[str, ...] = Field(
        (), description="Only score this category when one of these categories also has a hit "
                        "(e.g. `minors` requires `sexual`, so 'a child flying a kite' passes).")


class Policy(_Strict):
    id: str = Field(description="Policy id, recorded in every trace.")
    version: int = Field(ge=0, description="Version number, recorded in every trace.")
    description: str = Field("", description="What the policy is for, in words.")
    extends: str | None = Field(
        None, description="Id of a policy whose fields this one inherits and overrides.")
    prescreen: Literal[True, False, "concurrent"] = Field(
        True, description="Judge the prompt alone before spending a generation (`true`), not at "
                          "all (`false`), or while round 1 generates (`concurrent`: that "
                          "generation is cancelled, never judged nor returned, when the prompt "
                          "is to be edited or refused).")
    categories: Mapping[str, Category] = Field(
        description="Categories with their threshold and action.")
    rounds: Rounds = Field(default_factory=Rounds,
                           description="Round limit and what happens when it is reached.")
    hedge: Hedge | None = Field(
        None, description="Off by default: `{band: [low, high]}` generates a borderline "
                          "prompt's refined version beside it in round 1 (extra generations, "
                          "counted in the metrics and the trace).")
    on_judge_error: Literal["refuse", "allow"] = Field(
        "refuse",
        description="When the judge fails: `refuse` (fail closed, HTTP 503) or `allow` "
                    "(return the image unjudged, recorded in the trace).")
    unassessed: Unassessed = Field(
        "prompt",
        description="What it means when no judge could assess an image for a category (a "
                    "hosted service applies some categories to text only, NudeNet sees nudity "
                    "only): `prompt` (the verdict on the prompt stands for that category; "
                    "refused when no judge assessed the prompt for it either), `refuse`, or "
                    "`pass`. A category's own `unassessed` overrides it.")
    image_retention: Literal["none", "flagged", "flagged_and_delivered", "all"] = Field(
        "flagged_and_delivered",
        description="Which images the audit store keeps: `none` (hash only), `flagged` (images "
                    "of unsafe rounds), `flagged_and_delivered` (for a request with any flag, "
                    "its flagged images and the images delivered in their place) or `all`.")
    refine_mode: Literal["regenerate", "edit"] = Field(
        "regenerate",
        description="How an unsafe image is repaired: `regenerate` from the refined prompt, or "
                    "`edit` the image with the refined prompt where the backend can.")
    terms: Mapping[str, TermSet] = Field(
        default_factory=dict,
        description="The builtin judge's term lists, patterns and rewrites per category.")

    _sha256: str = PrivateAttr("")
    _source: str = PrivateAttr("")
    # What `wants_explanation` answers for: "edit" decisions (the policy itself), "never" (the
    # verdict_only() view), or also a prompt in the hedge band (the hedging() view).
    _explain: Literal["edit", "never", "hedge"] = PrivateAttr("edit")
    # Each view made once, keyed by what it explains and by whose view it is (a model_copy of a
    # policy shares this dict: its own views must never be the original's).
    _views: dict[tuple[str, int], Policy] = PrivateAttr(default_factory=dict)

    @property
    def sha256(self) -> str:
        """sha256 of the policy file followed by the files it extends, in order."""
        return self._sha256

    @property
    def source(self) -> str:
        return self._source

    @property
    def ref(self) -> dict[str, Any]:
        return {"id": self.id, "version": self.version, "sha256": self.sha256}

    def decide(self, scores: Mapping[str, float], *, unassessed: Iterable[str] = (),
               prompt: Mapping[str, float] | None = None) -> Decision:
        """Turn a judge's scores into flagged categories and the strongest action.

        `unassessed`: the categories an image was not judged for (no judge looked at the image
        for them); each is decided as `unassessed_outcomes` says, with `prompt` the scores of the
        categories the prompt was judged for. A score a judge gave always counts."""
        outcomes = self.unassessed_outcomes(unassessed, prompt or {})
        if any(o == "prompt" for o in outcomes.values()):
            assert prompt is not None
            scores = {**scores, **{c: max(scores.get(c, 0.0), prompt[c])
                                   for c, o in outcomes.items() if o == "prompt"}}
        flagged: list[str] = []
        action: Action | None = None
        for name, cat in self.categories.items():
            refused = outcomes.get(name) == "refuse"
            if refused or scores.get(name, 0.0) >= cat.threshold:
                flagged.append(name)
                acted: Action = "refuse" if refused else cat.action
                if action is None or _ACTION_RANK[acted] > _ACTION_RANK[action]:
                    action = acted
        blind = tuple(c for c, o in outcomes.items() if o == "refuse")
        if action is None or action == "allow":
            return Decision("pass", tuple(flagged), blind)
        return Decision(action, tuple(flagged), blind)

    def unassessed_mode(self, category: str) -> Unassessed:
        """The policy's `unassessed` for a category (its own, else the policy's)."""
        cat = self.categories.get(category)
        own = cat.unassessed if cat is not None else None
        return own if own is not None else self.unassessed

    def unassessed_outcomes(self, categories: Iterable[str], prompt: Mapping[str, float]
                            ) -> dict[str, Unassessed]:
        """What decides each policy category in `categories`, which an image was not judged
        for: `refuse`, `pass`, or `prompt` (its score in `prompt`, the categories the prompt was
        judged for; `refuse` when the prompt was not judged for it either: nobody looked). A
        category whose action is `allow` only records, so it is never refused for this."""
        out: dict[str, Unassessed] = {}
        for name in categories:
            cat = self.categories.get(name)
            if cat is None:
                continue
            mode = self.unassessed_mode(name)
            if mode == "prompt" and name not in prompt:
                mode = "refuse"
            out[name] = "pass" if mode == "refuse" and cat.action == "allow" else mode
        return out

    def wants_explanation(self, scores: Mapping[str, float], *,
                          at_round: int | None = None) -> bool:
        """Whether a judge should spend time on a thought and a refined prompt for these scores.

        The one question a judge asks the policy: judges score, and explain only when this says
        so (verdict first); what happens to the item is decided by the engine with `decide`.
        Only where a refined prompt could still be used: an `edit` decision, before the last
        round (`at_round`, when known, counts generation rounds from 1), and never under the
        `verdict_only()` view the engine hands a judge when no further round can follow. Under
        the `hedging()` view, also a passing prompt whose scores lie in the hedge band.
        """
        if self._explain == "never" or (at_round is not None and at_round >= self.rounds.max):
            return False
        decision = self.decide(scores)
        return decision.action == "edit" or (
            self._explain == "hedge" and decision.action == "pass" and self.in_hedge_band(scores))

    def in_hedge_band(self, scores: Mapping[str, float]) -> bool:
        """Whether the highest of these scores lies in the policy's hedge band."""
        if self.hedge is None:
            return False
        low, high = self.hedge.band
        return low <= max((scores.get(c, 0.0) for c in self.categories), default=0.0) <= high

    def hedge_categories(self, scores: Mapping[str, float]) -> tuple[str, ...]:
        """The categories whose scores reach the hedge band (what a hedged prompt refines)."""
        low = self.hedge.band[0] if self.hedge is not None else 1.0
        return tuple(c for c in self.categories if scores.get(c, 0.0) >= low)

    def verdict_only(self) -> Policy:
        """This policy as a judge should see it where no refined prompt can be used: the same
        categories and thresholds, `wants_explanation` always false (same sha256 and source)."""
        return self._as("never")

    def hedging(self) -> Policy:
        """This policy as the prescreen's judge sees it under `hedge`: a passing prompt in the
        band is explained too, so its refined version can be generated beside it."""
        return self._as("hedge") if self.hedge is not None else self

    def _as(self, explain: Literal["edit", "never", "hedge"]) -> Policy:
        if self._explain == explain:
            return self
        view = self._views.get((explain, id(self)))
        if view is None:
            view = self.model_copy()
            view._explain, view._views = explain, {}
            self._views[(explain, id(self))] = view
        return view

    @property
    def prescreen_concurrent(self) -> bool:
        return self.prescreen == "concurrent"


@dataclass(frozen=True, slots=True)
class Decision:
    action: Literal["pass", "edit", "refuse"]
    flagged: tuple[str, ...] = ()
    # Of `flagged`, the categories refused because nothing judged the image for them (the
    # policy's `unassessed`), not because a score crossed.
    unassessed: tuple[str, ...] = ()

    @property
    def unsafe(self) -> bool:
        return self.action != "pass"


class PolicySet:
    """All policies of a directory (plus single files), resolved through `extends`."""

    def __init__(self, policies: Mapping[str, Policy]) -> None:
        self._policies = dict(policies)

    def __getitem__(self, policy_id: str) -> Policy:
        try:
            return self._policies[policy_id]
        except KeyError:
            raise ConfigError(f"unknown policy {policy_id!r}") from None

    def __contains__(self, policy_id: object) -> bool:
        return policy_id in self._policies

    def ids(self) -> list[str]:
        return sorted(self._policies)

    @classmethod
    def load(cls, paths: list[Path]) -> PolicySet:
        """Load every policy under `paths` (directories or files; later ones win on equal ids).

        Raises ConfigError listing every problem, each with file:line:column."""
        from guard.core.policy.loader import load_policies  # it builds on this module

        loaded = load_policies(paths)
        loaded.raise_for_errors()
        return cls(loaded.policies)


def load_policy(path: str | Path) -> Policy:
    """Load one policy file; `extends` is resolved against the files beside it and the shipped ones."""
    from guard.core.policy.loader import load_file

    loaded = load_file(path)
    loaded.raise_for_errors()
    return next(iter(loaded.policies.values()))
