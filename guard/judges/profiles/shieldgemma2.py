"""The `shieldgemma2` profile: ShieldGemma 2's three trained policies, word for word, one Yes/No
probe each. Judge only.

ShieldGemma 2 was trained on three policies with fixed wording (`TRAINED_POLICIES`, as
transformers' `ShieldGemma2Processor` holds them): dangerous content, sexually explicit content,
violence/gore. A policy category is judged by the trained policy it maps to (`CATEGORY_POLICIES`,
overridden by `profile_options: {policies: {category: dangerous|sexual|violence|null}}`); two
categories on one policy share its probe and its P("Yes"). A category that maps to none (`hate`,
`harassment`, `minors` by default) is not assessed: it has no score, the verdict's
`assessed_on` leaves it out, and the policy's `unassessed:` decides. The model judges images only:
a prompt alone (a text prescreen) is asked nothing and assesses nothing.

The token path is the processor's: the real ShieldGemma 2 chat template wraps the policy in its
instruction, adds BOS itself and ends with the model's turn (no generation prompt), and the
processor tokenizes with the tokenizer's special tokens (Gemma's own BOS as well), which
`encode` below says to the vlm judge. For any other model set
`profile_options: {wrap_instruction: true}`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from guard.core.policy import Policy
from guard.core.types import JudgeInput
from guard.judges.profiles.base import (
    SAFE,
    UNSAFE,
    Encoding,
    Parsed,
    Probe,
    Profile,
    RemotePlan,
    Slot,
    SlotProbs,
    user_message,
)
from guard.support.errors import ConfigError

# transformers.models.shieldgemma2.processing_shieldgemma2.DEFAULT_SHIELDGEMMA2_POLICIES
TRAINED_POLICIES: dict[str, str] = {
    "dangerous": (
        "No Dangerous Content: The image shall not contain content that"
        " facilitates or encourages activities that could cause real-world harm"
        " (e.g., building firearms and explosive devices, promotion of"
        " terrorism, instructions for suicide)."
    ),
    "sexual": (
        "No Sexually Explicit content: The image shall not contain content that"
        " depicts explicit or graphic sexual acts (e.g., pornography, erotic"
        " nudity, depictions of rape or sexual assault)."
    ),
    "violence": (
        "No Violence/Gore content: The image shall not contain content that"
        " depicts shocking, sensational, or gratuitous violence (e.g.,"
        " excessive blood and gore, gratuitous violence against animals,"
        " extreme injury or moment of death)."
    ),
}
# policy category -> the trained policy that judges it (by the policies' own examples)
CATEGORY_POLICIES: dict[str, str] = {
    "sexual": "sexual", "violence": "violence", "shocking": "violence",
    "illegal_activity": "dangerous", "self_harm": "dangerous",
}

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
    # as ShieldGemma2Processor: its template ends with the model's turn, and the tokenizer adds
    # its special tokens (Gemma's BOS) to the text the template wrote
    encoding = Encoding(add_generation_prompt=False, add_special_tokens=True)

    def __init__(self, wrap_instruction: bool = False,
                 policies: Mapping[str, str | None] | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.wrap_instruction = bool(wrap_instruction)
        merged: dict[str, str | None] = {**CATEGORY_POLICIES, **dict(policies or {})}
        unknown = sorted(str(v) for v in merged.values()
                         if v is not None and v not in TRAINED_POLICIES)
        if unknown:
            raise ConfigError(f"profile 'shieldgemma2': no trained policy {', '.join(unknown)} "
                              f"(it has {', '.join(TRAINED_POLICIES)})")
        self.mapping = {c: p for c, p in merged.items() if p is not None}

    def trained(self, policy: Policy) -> dict[str, list[str]]:
        """trained policy -> the policy's categories it judges, in the processor's order."""
        out: dict[str, list[str]] = {}
        for key in TRAINED_POLICIES:
            cats = [c for c in policy.categories if self.mapping.get(c) == key]
            if cats:
                out[key] = cats
        return out

    def coverage(self, policy: Policy) -> dict[str, set[str]]:
        return {c: {"image"} for cats in self.trained(policy).values() for c in cats}

    def probes(self, item: JudgeInput, policy: Policy) -> list[Probe]:
        if item.image is None:
            return []  # trained on images: a prompt alone is not its to judge
        out = []
        for key in self.trained(policy):
            text = TRAINED_POLICIES[key]
            if self.wrap_instruction:
                text = SHIELDGEMMA2_INSTRUCTION.format(policy=text)
            slot = Slot("verdict", {UNSAFE: "Yes", SAFE: "No"})
            out.append(Probe((user_message(item, text),), (slot,), key=key))
        return out

    def combine(self, probs: Sequence[SlotProbs], policy: Policy) -> dict[str, float | None]:
        scores: dict[str, float | None] = {}
        for cats, slots in zip(self.trained(policy).values(), probs, strict=False):
            for c in cats:
                scores[c] = slots["verdict"][UNSAFE] if "verdict" in slots else None
        return scores

    def remote_plan(self, policy: Policy) -> RemotePlan:
        return RemotePlan(max_tokens=1)

    def parse(self, texts: Sequence[str], policy: Policy) -> Parsed:
        if not texts:  # a prompt alone: nothing was asked
            return Parsed({})
        return parse_shieldgemma2(texts, policy, self.trained(policy))


def parse_shieldgemma2(texts: Sequence[str], policy: Policy,
                       trained: Mapping[str, Sequence[str]]) -> Parsed:
    """One answer per trained policy asked (`trained`: policy -> its categories, in order),
    each starting with Yes or No; the categories of no trained policy get no score."""
    if len(texts) != len(trained):
        return Parsed(dict.fromkeys((c for cats in trained.values() for c in cats), 1.0),
                      error=f"{len(texts)} answers for {len(trained)} policies")
    scores: dict[str, float] = {}
    for (key, cats), text in zip(trained.items(), texts, strict=True):
        first = re.match(r"\W*([A-Za-z]+)", text)
        word = first.group(1).lower() if first else ""
        if word not in ("yes", "no"):
            return Parsed(dict.fromkeys((c for cs in trained.values() for c in cs), 1.0),
                          error=f"{key}: expected Yes or No, got {text.strip()[:40]!r}")
        for c in cats:
            scores[c] = 1.0 if word == "yes" else 0.0
    return Parsed(scores)
