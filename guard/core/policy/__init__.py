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

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from guard.support.errors import ConfigError

Action = Literal["edit", "refuse", "allow"]
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


class Rounds(_Strict):
    max: int = Field(3, ge=1, le=10,
                     description="Most generation rounds per image, the first one included.")
    on_exhausted: Literal["refuse", "drop"] = Field(
        "refuse",
        description="When an image is still unsafe after the last round: `refuse` the request, "
                    "or `drop` that image and return the safe ones (refuse if none is left).")


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
    prescreen: bool = Field(
        True, description="Judge the prompt alone before spending a generation.")
    categories: Mapping[str, Category] = Field(
        description="Categories with their threshold and action.")
    rounds: Rounds = Field(default_factory=Rounds,
                           description="Round limit and what happens when it is reached.")
    on_judge_error: Literal["refuse", "allow"] = Field(
        "refuse",
        description="When the judge fails: `refuse` (fail closed, HTTP 503) or `allow` "
                    "(return the image unjudged, recorded in the trace).")
    image_retention: Literal["none", "flagged", "all"] = Field(
        "none",
        description="Which images the audit store keeps: `none` (hash only), `flagged` (images "
                    "of unsafe rounds) or `all`.")
    refine_mode: Literal["regenerate", "edit"] = Field(
        "regenerate",
        description="How an unsafe image is repaired: `regenerate` from the refined prompt, or "
                    "`edit` the image with the refined prompt where the backend can.")
    terms: Mapping[str, TermSet] = Field(
        default_factory=dict,
        description="The builtin judge's term lists, patterns and rewrites per category.")

    _sha256: str = PrivateAttr("")
    _source: str = PrivateAttr("")

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

    def decide(self, scores: Mapping[str, float]) -> Decision:
        """Turn a judge's scores into flagged categories and the strongest action."""
        flagged: list[str] = []
        action: Action | None = None
        for name, cat in self.categories.items():
            if scores.get(name, 0.0) >= cat.threshold:
                flagged.append(name)
                if action is None or _ACTION_RANK[cat.action] > _ACTION_RANK[action]:
                    action = cat.action
        if action is None or action == "allow":
            return Decision("pass", tuple(flagged))
        return Decision(action, tuple(flagged))

    def wants_explanation(self, scores: Mapping[str, float]) -> bool:
        """Whether a judge should spend time on a thought and a refined prompt for these scores.

        The one question a judge asks the policy: judges score, and explain only when this says
        so (verdict first); what happens to the item is decided by the engine with `decide`.
        """
        return self.decide(scores).unsafe


@dataclass(frozen=True, slots=True)
class Decision:
    action: Literal["pass", "edit", "refuse"]
    flagged: tuple[str, ...] = ()

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
