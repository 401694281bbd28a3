"""One image slot's own way through the loop: its prompt, who wrote it, what it already tried.

Slots go their own way: a slot starts its next round as soon as its own image is judged, whatever
the others are doing. What a slot may generate next (`Slot.next_prompt`) never repeats a prompt
it already tried, after normalising case, spacing and punctuation: the judge's refined prompt
first, then the rule refiner's (guard.core.refiner); when neither is new the slot is stuck and
ends at once as the policy's `rounds.on_exhausted` says.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from guard.core.policy import Decision, Policy
from guard.core.refiner import next_refinement, normalise
from guard.core.types import GeneratedImage, HistoryEntry, Verdict

RULES = "rules"  # `refined_by` of a prompt the rule refiner wrote


@dataclass(eq=False)
class Slot:
    index: int
    prompt: str
    refined_by: str | None = None  # who wrote `prompt`: None for the client's own
    rounds: int = 0  # rounds this slot has made images in
    history: list[HistoryEntry] = field(default_factory=list)
    repair: GeneratedImage | None = None  # refine_mode edit: the image to edit next
    tried: set[str] = field(default_factory=set)  # normalised prompts already generated
    hedge: bool = False  # policy hedge: another try at slot `index`, beside its own

    def remember(self, prompt: str) -> None:
        self.tried.add(normalise(prompt))

    def next_prompt(self, verdict: Verdict | None, decision: Decision, policy: Policy
                    ) -> tuple[str, str] | None:
        """(prompt, who wrote it) for this slot's next round, or None when nothing new is left
        (guard.core.refiner.next_refinement)."""
        found = next_refinement(self.prompt, verdict.refined_prompt if verdict else None,
                                decision.flagged, policy, self.tried)
        if found is None:
            return None
        prompt, by_judge = found
        if by_judge and verdict is not None:  # an ensemble names the refiner that wrote it
            return prompt, str(verdict.details.get("refiner") or verdict.judge_id)
        return prompt, RULES


def new_slots(n: int, prompt: str) -> list[Slot]:
    return [Slot(index=i, prompt=prompt) for i in range(n)]


def groups(slots: Iterable[Slot]) -> list[list[Slot]]:
    """Slots that can share one backend call: the same prompt, none under repair (an image
    being edited is its own call)."""
    out: dict[tuple[str, int | None], list[Slot]] = {}
    for slot in slots:
        key = (slot.prompt, slot.index if slot.repair is not None else None)
        out.setdefault(key, []).append(slot)
    return list(out.values())


def indices(slots: Sequence[Slot]) -> list[int]:
    return [s.index for s in slots]
