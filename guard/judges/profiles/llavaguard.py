"""The `llavaguard` profile: the policy as LlavaGuard's policy text (categories coded O1..O9 in
policy order), JSON `rating` / `category` / `rationale` out.

Score of category k = P("Unsafe") times P(code k | "Unsafe") among the policy's codes. Judge only:
no refined prompt (the proxy falls back to the rule-based refiner). More than nine categories: the
tenth on get P("Unsafe").
"""

from __future__ import annotations

import json
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
    RemotePlan,
    Slot,
    SlotProbs,
    unsafe_everywhere,
    user_message,
)

LLAVAGUARD_INTRO = ("Provide a safety assessment for the content provided by the user. Determine "
                    "compliance or violation against our safety policy by reviewing the following "
                    "policy categories:\n")
LLAVAGUARD_STEPS = """\
Assessment Steps:
1. Select a safety "rating". This should be "Unsafe" if the content violates the safety policy; \
otherwise, it should be "Safe".
2. Assign a policy "category". If none of the policy categories are applicable, select \
"NA: None applying".
3. Provide a "rationale". Describe the user content and justify why it is considered safe or \
unsafe, referring to the specific policy category and its associated guidelines to illustrate \
any violations or compliance.
To provide your assessment use the following json template for each category:
{{
    "rating": str<"Unsafe"|"Safe">,
    "category": str<{codes}|"NA: None applying">,
    "rationale": str,
}}.
"""
_LG_OPEN = '{\n    "rating": "'


def llavaguard_codes(policy: Policy) -> dict[str, str]:
    """category -> LlavaGuard code label, e.g. `O1: Sexual`."""
    return {c: f"O{i}: {c.replace('_', ' ').capitalize()}"
            for i, c in enumerate(policy.categories, start=1)}


class LlavaGuardProfile(Profile):
    name = "llavaguard"

    def _messages(self, item: JudgeInput, policy: Policy) -> tuple[Message, ...]:
        codes = llavaguard_codes(policy)
        body = "".join(
            f"{codes[c]}:\nShould not:\n- Contain "
            f"{cat.description or c.replace('_', ' ') + ' content'}.\n\n"
            for c, cat in policy.categories.items())
        text = LLAVAGUARD_INTRO + body + LLAVAGUARD_STEPS.format(
            codes="|".join(f'"{label}"' for label in codes.values()))
        if item.image is None:
            text += f"\nThe content to assess is this text-to-image prompt: {item.prompt}\n"
        return (user_message(item, text),)

    def probes(self, item: JudgeInput, policy: Policy) -> list[Probe]:
        digits = {c: str(i) for i, c in enumerate(policy.categories, start=1) if i <= 9}
        answer: tuple[str | Slot, ...] = (
            _LG_OPEN, Slot("rating", {UNSAFE: "Unsafe", SAFE: "Safe"}, marker='"rating": "'),
            'Unsafe",\n    "category": "O', Slot("category", digits, marker='"category": "O'))
        return [Probe(self._messages(item, policy), answer)]

    def combine(self, probs: Sequence[SlotProbs], policy: Policy) -> dict[str, float | None]:
        slots = probs[0] if probs else {}
        if "rating" not in slots:
            return dict.fromkeys(policy.categories)
        unsafe = slots["rating"][UNSAFE]
        which = slots.get("category")
        # Without the category slot (a remote answer rated Safe names no category) the joint
        # probability of any one category is at most P(unsafe).
        return {c: unsafe * which[c] if which is not None and c in which else unsafe
                for c in policy.categories}

    def explain(self, item: JudgeInput, policy: Policy, scores: Mapping[str, float],
                flagged: Sequence[str]) -> Explain:
        codes = llavaguard_codes(policy)
        if flagged:
            top = max(flagged, key=lambda c: scores.get(c, 0.0))
            head = f'Unsafe",\n    "category": "{codes[top]}",\n'
        else:
            head = 'Safe",\n    "category": "NA: None applying",\n'
        return Explain(self._messages(item, policy), _LG_OPEN + head + '    "rationale": "',
                       stop=("}",))

    def remote_plan(self, policy: Policy) -> RemotePlan:
        return RemotePlan(stop=('"rationale"',), max_tokens=64)

    def parse(self, texts: Sequence[str], policy: Policy) -> Parsed:
        return parse_llavaguard(texts[0] if texts else "", policy)


def parse_llavaguard(text: str, policy: Policy) -> Parsed:
    """Parse LlavaGuard's JSON. A verdict-only answer (stopped before `"rationale"`) is accepted.
    Unsafe with a category outside the policy, or anything not JSON of that shape, is an error."""
    body = text.strip()
    fenced = re.search(r"```(?:json)?\s*(.*?)```", body, re.S)
    if fenced:
        body = fenced.group(1).strip()
    start, end = body.find("{"), body.rfind("}")
    if start < 0:
        return unsafe_everywhere(policy, "no JSON object")
    candidate = body[start:end + 1] if end > start else body[start:]
    data = _loads_lenient(candidate)
    if not isinstance(data, dict):
        return unsafe_everywhere(policy, "answer is not a JSON object")
    rating = str(data.get("rating", "")).strip().lower()
    rationale = str(data.get("rationale", "") or "").strip()
    if rating == "safe":
        return Parsed(dict.fromkeys(policy.categories, 0.0), thought=rationale)
    if rating != "unsafe":
        return unsafe_everywhere(policy, f"rating must be Safe or Unsafe, got {rating!r}",
                                 rationale)
    code = re.match(r"\s*O(\d+)\b", str(data.get("category", "")))
    names = list(policy.categories)
    if code is None or not 1 <= int(code.group(1)) <= len(names):
        return unsafe_everywhere(policy, f"unknown category {data.get('category')!r}", rationale)
    hit = names[int(code.group(1)) - 1]
    return Parsed({c: 1.0 if c == hit else 0.0 for c in names}, thought=rationale)


def _loads_lenient(text: str) -> Any:
    """json.loads, also accepting the template's trailing comma, an answer cut off before its
    closing brace (verdict-only requests stop there), and one cut off inside the rationale
    (decoding stops at `max_new_tokens`)."""
    attempts = [text, re.sub(r",\s*}", "}", text)]
    cut = text.rstrip().rstrip(",")
    if not cut.endswith("}"):
        attempts += [cut + "\n}", text + '"\n}']
    for attempt in attempts:
        try:
            return json.loads(attempt, strict=False)
        except json.JSONDecodeError:
            continue
    return None
