"""A request's deadline, and what a round is expected to cost, so no round starts in vain.

The deadline is the policy's `rounds.deadline_s`, shortened (or set) by the client's
`x-guard-deadline-s` header, which the HTTP edge parses into a number. The engine keeps one
`Estimates` for all requests: recent generation times per backend and recent judge times, a
moving average of each, which is enough to tell whether one more round fits.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

_WEIGHT = 0.3  # of the newest sample in the moving average


def effective(policy_s: float | None, client_s: float | None) -> float | None:
    """The stricter of the policy's and the client's deadline (None: no deadline)."""
    given = [s for s in (policy_s, client_s) if s is not None]
    return min(given) if given else None


@dataclass
class Estimates:
    """Recent durations in seconds: generation per backend, judging per stage."""

    generation: dict[str, float] = field(default_factory=dict)
    judging: dict[str, float] = field(default_factory=dict)

    def record_generation(self, backend: str, seconds: float) -> None:
        _update(self.generation, backend, seconds)

    def record_judging(self, stage: str, seconds: float) -> None:
        _update(self.judging, stage, seconds)

    def round_s(self, backend: str) -> float:
        """A round's expected cost on `backend`: a generation and an image verdict (0 for what
        was never seen, so a cold start never refuses a round it knows nothing about)."""
        return self.generation.get(backend, 0.0) + self.judging.get("image", 0.0)


def _update(table: dict[str, float], key: str, seconds: float) -> None:
    old = table.get(key)
    table[key] = seconds if old is None else (1 - _WEIGHT) * old + _WEIGHT * seconds


@dataclass(frozen=True, slots=True)
class Deadline:
    """When a request must be answered, on the event loop's clock."""

    at: float
    seconds: float

    @classmethod
    def start(cls, seconds: float) -> Deadline:
        return cls(asyncio.get_running_loop().time() + seconds, seconds)

    def left(self) -> float:
        return self.at - asyncio.get_running_loop().time()

    def fits(self, cost_s: float) -> bool:
        return cost_s < self.left()
