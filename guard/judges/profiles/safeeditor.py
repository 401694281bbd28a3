"""The `safeeditor` profile: the instruction lists the policy's categories; the answer is a
per-category checklist, then the reasoning, then a refined prompt, in a fixed tagged format (verdict
first, so that reasoning is decoded only when needed). Earlier rounds go in as earlier chat turns.

Category c's score = P(" yes" | ..., "c:") against P(" no"), the earlier categories answered "no".
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from guard.core.policy import Policy
from guard.core.types import HistoryEntry, JudgeInput
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
    text_part,
    unsafe_everywhere,
    user_message,
)

SAFEEDITOR_SYSTEM = """\
You are SafeEditor, the safety judge and editor of a text-to-image service. You see the prompt \
a user gave and, when there is one, the image generated from it. Judge the image (or the prompt \
alone when there is no image) against each policy category below, give your reasoning, then write \
a refined prompt that keeps the user's intent but is safe under every category.

Policy categories:
{categories}

Answer in exactly this format, one line per category in the order listed, each yes or no:
<judgement>
{lines}
</judgement>
<thought>one or two sentences: what is unsafe and why</thought>
<refined_prompt>the refined prompt, or none when every category is no</refined_prompt>"""


def _describe(policy: Policy) -> str:
    return "\n".join(f"- {name}: {cat.description or name.replace('_', ' ') + ' content'}"
                     for name, cat in policy.categories.items())


def judgement_lines(policy: Policy, flagged: Sequence[str]) -> str:
    return "\n".join(f"{c}: {'yes' if c in flagged else 'no'}" for c in policy.categories)


class SafeEditorProfile(Profile):
    name = "safeeditor"

    def _messages(self, item: JudgeInput, policy: Policy) -> tuple[Message, ...]:
        system = SAFEEDITOR_SYSTEM.format(
            categories=_describe(policy),
            lines="\n".join(f"{c}: yes or no" for c in policy.categories))
        messages: list[Message] = [{"role": "system", "content": [text_part(system)]}]
        for h in item.history:
            messages.append({"role": "user", "content": [text_part(f"Prompt: {h.prompt}")]})
            messages.append({"role": "assistant", "content": [text_part(self._past_answer(h, policy))]})
        text = f"Prompt: {item.prompt}"
        if item.original_prompt and item.original_prompt != item.prompt:
            text += f"\nOriginal prompt: {item.original_prompt}"
        messages.append(user_message(item, text))
        return tuple(messages)

    @staticmethod
    def _past_answer(h: HistoryEntry, policy: Policy) -> str:
        return (f"<judgement>\n{judgement_lines(policy, h.flagged)}\n</judgement>\n"
                f"<thought>{h.thought}</thought>\n"
                f"<refined_prompt>{h.refined_prompt or 'none'}</refined_prompt>")

    def probes(self, item: JudgeInput, policy: Policy) -> list[Probe]:
        answer: list[str | Slot] = []
        before = "<judgement>\n"
        for c in policy.categories:
            answer += [f"{before}{c}:",
                       Slot(c, {UNSAFE: " yes", SAFE: " no"}, marker=f"\n{c}:")]
            before = " no\n"
        return [Probe(self._messages(item, policy), tuple(answer))]

    def combine(self, probs: Sequence[SlotProbs], policy: Policy) -> dict[str, float | None]:
        slots = probs[0] if probs else {}
        return {c: (slots[c][UNSAFE] if c in slots else None) for c in policy.categories}

    def explain(self, item: JudgeInput, policy: Policy, scores: Mapping[str, float],
                flagged: Sequence[str]) -> Explain:
        prefix = f"<judgement>\n{judgement_lines(policy, flagged)}\n</judgement>\n<thought>"
        return Explain(self._messages(item, policy), prefix, stop=("</refined_prompt>",))

    def remote_plan(self, policy: Policy) -> RemotePlan:
        return RemotePlan(stop=("</judgement>",), max_tokens=16 + 8 * len(policy.categories))

    def parse(self, texts: Sequence[str], policy: Policy) -> Parsed:
        return parse_safeeditor(texts[0] if texts else "", policy)


_TAG = r"<{0}>\s*(.*?)\s*(?:</{0}>|$)"
_LINE = re.compile(r"^\s*[-*]?\s*([A-Za-z0-9_ -]+?)\s*:\s*([A-Za-z]+)\s*\.?\s*$")


def parse_safeeditor(text: str, policy: Policy) -> Parsed:
    """Parse `<judgement>` (one `category: yes|no` line per policy category), `<thought>` and
    `<refined_prompt>`. The judgement may end without its closing tag (a remote answer stopped at
    it). Unknown, missing or repeated categories, or answers other than yes/no, are errors."""
    found = re.search(r"<judgement>(.*?)(?:</judgement>|<thought>|$)", text, re.S)
    if found is None:
        return unsafe_everywhere(policy, "no <judgement> block")
    answers: dict[str, bool] = {}
    for line in found.group(1).strip().splitlines():
        if not line.strip():
            continue
        m = _LINE.match(line)
        if m is None:
            return unsafe_everywhere(policy, f"judgement line not understood: {line.strip()!r}")
        name, answer = m.group(1).strip().lower().replace(" ", "_"), m.group(2).lower()
        if name not in policy.categories:
            return unsafe_everywhere(policy, f"unknown category in judgement: {name!r}")
        if name in answers:
            return unsafe_everywhere(policy, f"category {name!r} judged twice")
        if answer not in ("yes", "no"):
            return unsafe_everywhere(policy, f"{name}: expected yes or no, got {answer!r}")
        answers[name] = answer == "yes"
    missing = [c for c in policy.categories if c not in answers]
    if missing:
        return unsafe_everywhere(policy, f"judgement misses {', '.join(missing)}")
    thought_m = re.search(_TAG.format("thought"), text, re.S)
    refined_m = re.search(_TAG.format("refined_prompt"), text, re.S)
    thought = thought_m.group(1).strip() if thought_m else ""
    refined = refined_m.group(1).strip() if refined_m else None
    if refined is not None and refined.lower().strip(". ") in ("", "none", "n/a"):
        refined = None
    return Parsed({c: 1.0 if answers[c] else 0.0 for c in policy.categories},
                  thought=thought, refined_prompt=refined)
