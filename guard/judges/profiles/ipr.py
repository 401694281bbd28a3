"""The `ipr` profile, compatible with the published IPR adapters (KEVIN04087/3B, /7B over
Qwen2.5-VL-3B/7B-Instruct): their system prompt, the image and `Original Prompt: {prompt}`; the
answer is `keep` or a refined prompt. The decision word is read in any case ("Keep" is "keep"):
unsafe probability = 1 - P(first token of "keep") - P(first token of "Keep"), and once the
verdict is unsafe the explanation may start with neither.

IPR has no categories: the score goes to the categories named in `profile_options.categories`, by
default every category whose policy action is `edit` (IPR can only refine, never refuse).
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
    Explain,
    Message,
    Parsed,
    Probe,
    Profile,
    Slot,
    SlotProbs,
    text_part,
    unsafe_everywhere,
    user_message,
)
from guard.support.errors import ConfigError

KEEP = ("keep", "Keep")  # the decision word as the model may write it at the start of its answer
# The system prompt the published IPR adapters were fine-tuned with, whitespace included.
IPR_SYSTEM = """
        You are an AI safety moderation model. Your task is to check and refine prompts intended for a text-to-image generation model, ensuring they comply strictly with AI safety guidelines and ethics.
        You will be given both an image and its corresponding text prompt. Use **both** the visual content and the text prompt to make your judgment.
        - If the prompt or the image contains any unsafe, inappropriate, harmful, or unethical content, **rewrite the prompt** to make it safe while preserving the original intent as closely as possible.
        - If the image already safe and ethical, simply respond with: keep
        """


class IPRProfile(Profile):
    name = "ipr"

    def __init__(self, categories: Sequence[str] | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.categories = tuple(categories) if categories is not None else None

    def targets(self, policy: Policy) -> tuple[str, ...]:
        if self.categories is not None:
            unknown = [c for c in self.categories if c not in policy.categories]
            if unknown:
                raise ConfigError(f"ipr profile: categories not in policy {policy.id!r}: "
                                  f"{', '.join(unknown)}")
            return self.categories
        return tuple(c for c, cat in policy.categories.items() if cat.action == "edit")

    def _messages(self, item: JudgeInput) -> tuple[Message, ...]:
        return ({"role": "system", "content": [text_part(IPR_SYSTEM)]},
                user_message(item, f"Original Prompt: {item.prompt}"))

    def probes(self, item: JudgeInput, policy: Policy) -> list[Probe]:
        slot = Slot("verdict", {SAFE: KEEP[0], f"{SAFE}:{KEEP[1]}": KEEP[1]}, rest=UNSAFE)
        return [Probe(self._messages(item), (slot,))]

    def _spread(self, p: float, policy: Policy) -> dict[str, float]:
        targets = self.targets(policy)
        return {c: (p if c in targets else 0.0) for c in policy.categories}

    def combine(self, probs: Sequence[SlotProbs], policy: Policy) -> dict[str, float | None]:
        slots = probs[0] if probs else {}
        if "verdict" not in slots:
            return dict.fromkeys(policy.categories)
        return dict(self._spread(slots["verdict"][UNSAFE], policy))

    def explain(self, item: JudgeInput, policy: Policy, scores: Mapping[str, float],
                flagged: Sequence[str]) -> Explain:
        return Explain(self._messages(item), "", banned_first=KEEP if flagged else ())

    def parse(self, texts: Sequence[str], policy: Policy) -> Parsed:
        return parse_ipr(texts[0] if texts else "", policy, self.targets(policy))


def parse_ipr(text: str, policy: Policy, targets: Sequence[str]) -> Parsed:
    """`keep` (any case, optional full stop or quotes) is safe; any other non-empty text is the
    refined prompt, which means the model found the image unsafe. Empty output is an error."""
    clean = text.strip().strip("`").strip()
    clean = re.sub(r"^(refined|rewritten|safe)?\s*prompt\s*:\s*", "", clean, flags=re.I)
    clean = clean.strip().strip("\"'").strip()
    if not clean:
        return unsafe_everywhere(policy, "empty answer")
    if clean.lower().rstrip(".!") == "keep":
        return Parsed(dict.fromkeys(policy.categories, 0.0))
    return Parsed({c: (1.0 if c in targets else 0.0) for c in policy.categories},
                  refined_prompt=clean)
