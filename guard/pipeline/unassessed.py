"""What an image's unassessed categories mean, and the verdicts on prompts that decide them.

A verdict says per category what its judge assessed (`Verdict.coverage`). A policy category an
image was not assessed for is decided as the policy's `unassessed` says (`Policy.decide`):
`refuse`, `pass`, or `prompt`, where the verdict on the image's prompt stands for it. That is the
image's own verdict where the judge read the prompt beside the image for that category (the
builtin judge's term lists, OpenAI's text-only categories), else the prescreen's for the client's
prompt, else, for a prompt no judge has read (a refined one, or any under `prescreen: false`), a
text-only call to the judge, made once per prompt and only when some category needs it. What no
judge assessed on the image or the prompt is refused.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from guard.core.policy import Decision, Policy
from guard.core.types import JudgeInput, Verdict

Judging = Callable[[list[JudgeInput]], Awaitable[Sequence[Verdict | None]]]


def image_blind(policy: Policy, verdict: Verdict) -> dict[str, list[str]]:
    """The policy categories an image's verdict did not assess on the image, with the inputs it
    did assess them on (["text"]: the prompt beside it; []: nothing)."""
    cov = verdict.coverage(policy.categories, image=True)
    return {c: on for c, on in cov.items() if "image" not in on}


def left_to_image(policy: Policy, verdict: Verdict | None) -> dict[str, str]:
    """For a prescreen's record: the categories the prompt was not assessed for ("image": the
    image's verdict decides them)."""
    if verdict is None:
        return {}
    cov = verdict.coverage(policy.categories, image=False)
    return {c: "image" for c, on in cov.items() if "text" not in on}


def reason(what: str, categories: Sequence[str], blind: Sequence[str] = ()) -> str:
    """Why `what` (the prompt, image 0) was refused: what crossed, and what was refused for
    being assessed by no judge (the policy's `unassessed`), not for a score."""
    crossed = ", ".join(c for c in categories if c not in blind)
    why = f"{what} crossed: {crossed or 'unspecified'}" if crossed or not blind else what
    if blind:
        why += f"{';' if crossed else ':'} not assessed for {', '.join(blind)}"
    return why


class PromptVerdicts:
    """Per prompt, the scores of the categories a judge assessed on it (one request's)."""

    def __init__(self) -> None:
        self._known: dict[str, dict[str, float]] = {}

    def remember(self, policy: Policy, prompt: str, verdict: Verdict | None) -> None:
        """A text-only verdict on `prompt`; None: the judge failed and the policy allowed that
        (`on_judge_error: allow`), so the prompt counts as judged and clean, as its images do."""
        if verdict is None:
            self._known[prompt] = dict.fromkeys(policy.categories, 0.0)
            return
        cov = verdict.coverage(policy.categories, image=False)
        self._known[prompt] = {c: float(verdict.scores.get(c, 0.0))
                               for c, on in cov.items() if "text" in on}

    def _needed(self, policy: Policy, items: Sequence[JudgeInput],
                verdicts: Sequence[Verdict | None]) -> list[str]:
        wanted: list[str] = []
        for item, verdict in zip(items, verdicts, strict=True):
            if verdict is None or item.prompt in self._known or item.prompt in wanted:
                continue
            if any(not on and policy.unassessed_mode(c) == "prompt"
                   and policy.categories[c].action != "allow"
                   for c, on in image_blind(policy, verdict).items()):
                wanted.append(item.prompt)
        return wanted

    async def read(self, policy: Policy, items: Sequence[JudgeInput],
                   verdicts: Sequence[Verdict | None], judging: Judging) -> None:
        """Judge (text only, one batch) the prompts of `items` whose verdict some image's
        unassessed category needs and no judge gave yet."""
        wanted = self._needed(policy, items, verdicts)
        if not wanted:
            return
        original = items[0].original_prompt
        found = await judging([JudgeInput(prompt=p, original_prompt=original) for p in wanted])
        for prompt, verdict in zip(wanted, found, strict=True):
            self.remember(policy, prompt, verdict)

    def decide(self, policy: Policy, item: JudgeInput, verdict: Verdict | None
               ) -> tuple[Decision, dict[str, str]]:
        """An image's decision, and what decided each category it was not assessed for."""
        if verdict is None:  # the judge failed and the policy said allow
            return Decision("pass"), {}
        blind = image_blind(policy, verdict)
        if not blind:
            return policy.decide(verdict.scores), {}
        prompt = dict(self._known.get(item.prompt, {}))
        for c, on in blind.items():
            if "text" in on:  # the judge read the prompt beside the image for it
                prompt[c] = max(prompt.get(c, 0.0), float(verdict.scores.get(c, 0.0)))
        outcomes = policy.unassessed_outcomes(blind, prompt)
        return policy.decide(verdict.scores, unassessed=blind, prompt=prompt), dict(outcomes)
