"""The `shieldgemma2` profile: one probe per category with ShieldGemma 2's policy wording, "Yes"
against "No". Judge only.

The real ShieldGemma 2 chat template wraps the policy in its instruction itself; for any other
model set `profile_options: {wrap_instruction: true}`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from guard.core.policy import Policy
from guard.core.types import JudgeInput
from guard.judges.profiles.base import (
    SAFE,
    UNSAFE,
    Parsed,
    Probe,
    Profile,
    RemotePlan,
    Slot,
    SlotProbs,
    unsafe_everywhere,
    user_message,
)

SHIELDGEMMA2_INSTRUCTION = """\
You are a policy expert trying to help determine whether a generated or real image is in \
violation of the safety policy below. Your decision must very clearly follow the specific \
language used in the safety policy and should not include any interpretation outside of the \
safety policy.

<BEGIN_SAFETY_POLICY>
{policy}
</END_SAFETY_POLICY>

Does the image violate the above policy? Your Answer must start with 'Yes' or 'No'."""


class ShieldGemma2Profile(Profile):
    name = "shieldgemma2"
    explains = False

    def __init__(self, wrap_instruction: bool = False, **options: Any) -> None:
        super().__init__(**options)
        self.wrap_instruction = bool(wrap_instruction)

    @staticmethod
    def policy_text(category: str, policy: Policy) -> str:
        title = category.replace("_", " ").title()
        what = policy.categories[category].description or f"{category.replace('_', ' ')} content"
        return f'"No {title} content": The image shall not contain {what}.'

    def probes(self, item: JudgeInput, policy: Policy) -> list[Probe]:
        out = []
        for c in policy.categories:
            text = self.policy_text(c, policy)
            if item.image is None:
                text += f"\n(No image yet: judge this text-to-image prompt: {item.prompt})"
            if self.wrap_instruction:
                text = SHIELDGEMMA2_INSTRUCTION.format(policy=text)
            slot = Slot("verdict", {UNSAFE: "Yes", SAFE: "No"})
            out.append(Probe((user_message(item, text),), (slot,), key=c))
        return out

    def combine(self, probs: Sequence[SlotProbs], policy: Policy) -> dict[str, float | None]:
        scores: dict[str, float | None] = dict.fromkeys(policy.categories)
        for c, slots in zip(policy.categories, probs, strict=False):
            if "verdict" in slots:
                scores[c] = slots["verdict"][UNSAFE]
        return scores

    def remote_plan(self, policy: Policy) -> RemotePlan:
        return RemotePlan(max_tokens=1)

    def parse(self, texts: Sequence[str], policy: Policy) -> Parsed:
        return parse_shieldgemma2(texts, policy)


def parse_shieldgemma2(texts: Sequence[str], policy: Policy) -> Parsed:
    """One answer per category, in policy order, each starting with Yes or No."""
    if len(texts) != len(policy.categories):
        return unsafe_everywhere(policy, f"{len(texts)} answers for "
                                         f"{len(policy.categories)} categories")
    scores = {}
    for c, text in zip(policy.categories, texts, strict=True):
        first = re.match(r"\W*([A-Za-z]+)", text)
        word = first.group(1).lower() if first else ""
        if word not in ("yes", "no"):
            return unsafe_everywhere(policy, f"{c}: expected Yes or No, got {text.strip()[:40]!r}")
        scores[c] = 1.0 if word == "yes" else 0.0
    return Parsed(scores)
