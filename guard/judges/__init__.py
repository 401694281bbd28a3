"""Judges: look at a prompt (and an image) and score it per policy category.

A judge is anything with this small interface; `builtin`, `vlm`, `remote` and the composites
`ensemble` and `cascade` register through the same registry a third party uses (or the
entry-point group `safeedit.judges`). A `Refiner` writes the thought and refined prompt for items
other judges scored (the builtin judge is one; an ensemble asks its refiner).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from guard.policy import Policy
from guard.registry import Registry
from guard.types import JudgeInput, Verdict


@runtime_checkable
class Judge(Protocol):
    id: str

    async def judge(self, items: Sequence[JudgeInput], policy: Policy) -> list[Verdict]:
        """One verdict per item, in order. Batch where the judge can; raise JudgeError on failure.

        `policy` carries the categories and thresholds, so a verdict-first judge knows whether an
        item crosses a threshold and only then spends time on reasoning and a refined prompt.
        """
        ...

    async def ready(self) -> bool: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Explanation:
    thought: str = ""
    refined_prompt: str | None = None


@runtime_checkable
class Refiner(Protocol):
    async def refine(self, items: Sequence[JudgeInput], policy: Policy,
                     scores: Sequence[Mapping[str, float]]) -> list[Explanation]:
        """For items already scored (`scores[i]` for `items[i]`), a thought and a refined prompt
        where `policy.wants_explanation(scores[i])`, an empty Explanation elsewhere."""
        ...


judges: Registry[Judge] = Registry("judge", "safeedit.judges")
judges.register("builtin", "guard.judges.builtin:BuiltinJudge.from_config")
judges.register("vlm", "guard.judges.vlm:VLMJudge.from_config")
judges.register("remote", "guard.judges.remote:RemoteJudge.from_config")
judges.register("ensemble", "guard.judges.composite:EnsembleJudge.from_config")
judges.register("cascade", "guard.judges.composite:CascadeJudge.from_config")


def build_judge(options: Mapping[str, Any]) -> Judge:
    """Build the judge a config section describes: `{kind: ..., **kind-specific options}`."""
    opts = dict(options)
    kind = opts.pop("kind", "builtin")
    return judges.create(kind, opts)
