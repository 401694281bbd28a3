"""One request's state as the engine's tasks share it, and what the engine hands back."""

from __future__ import annotations

from dataclasses import dataclass, field

from guard.core.policy import Policy
from guard.core.types import GeneratedImage, GenerationCall, SlotResult, Trace
from guard.pipeline.deadline import Deadline
from guard.pipeline.routing import Route
from guard.pipeline.slots import Slot
from guard.pipeline.together import ReadyTogether
from guard.pipeline.unassessed import PromptVerdicts


@dataclass(frozen=True, slots=True)
class FinalImage:
    slot: int
    image: GeneratedImage
    prompt: str
    decision: str  # passed | edited


@dataclass(frozen=True, slots=True)
class EditInputs:
    """The client's images (and mask) for /v1/images/edits, already validated."""

    images: tuple[bytes, ...]
    mask: bytes | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    images: list[FinalImage]
    rounds: int


@dataclass(eq=False)
class Run:
    """One request's state, shared by the tasks of its slots."""

    call: GenerationCall
    route: Route
    policy: Policy
    trace: Trace
    inputs: EditInputs | None
    slots: list[Slot]
    together: ReadyTogether  # judges what is ready in the same turn as one batch
    deadline: Deadline | None = None
    final: dict[int, FinalImage] = field(default_factory=dict)
    dropped: dict[int, SlotResult] = field(default_factory=dict)
    flagged: set[str] = field(default_factory=set)
    hedging: set[int] = field(default_factory=set)  # slots whose hedge is not judged yet
    waiting: set[int] = field(default_factory=set)  # slots out of tries, waiting on their hedge
    late: bool = False  # a slot was given up because its next round would miss the deadline
    stop: str = ""  # why the request's open calls were cancelled, for their records
    prompts: PromptVerdicts = field(default_factory=PromptVerdicts)  # for unassessed categories

    def why_cancelled(self, group: list[Slot]) -> str:
        if self.stop:
            return self.stop
        return SERVED_ELSEWHERE if all(s.index in self.final for s in group) else "cancelled"

    def prompts_with(self, group: list[Slot]) -> list[str]:
        """Each slot's prompt, `group`'s own where it has one (a hedge's)."""
        prompts = [s.prompt for s in self.slots]
        for slot in group:
            prompts[slot.index] = slot.prompt
        return prompts


SERVED_ELSEWHERE = "its images were served by another call"  # policy hedge
