"""Counting failures per key (a client address, a key id) over a sliding window.

`Limiter` is the contract; `MemoryLimiter` serves one process. Replicas that must share their
counts (so that an attacker cannot spread guesses over them) need a shared implementation of the
same contract, Redis say, which is why its methods are async.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Protocol


class Limiter(Protocol):
    async def retry_after(self, key: str) -> float:
        """Seconds until `key` may try again: 0 while it is under the limit."""
        ...

    async def hit(self, key: str) -> float:
        """Count one failure for `key`; the seconds it must now wait (0 while under the limit)."""
        ...

    async def aclose(self) -> None: ...


class MemoryLimiter:
    """At most `limit` failures per key in any `window_s` seconds (a sliding log of each key's
    last `limit` failure times). Memory stays bounded: beyond `max_keys` keys, the one that
    failed least recently is forgotten. `clock` is monotonic seconds (a test passes its own)."""

    def __init__(self, limit: int = 10, window_s: float = 300.0, *, max_keys: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if limit < 1 or window_s <= 0 or max_keys < 1:
            raise ValueError("limit and max_keys must be at least 1, window_s positive")
        self.limit, self.window_s, self._max_keys, self._clock = limit, window_s, max_keys, clock
        self._failures: dict[str, deque[float]] = {}

    def _wait(self, key: str, now: float) -> float:
        times = self._failures.get(key)
        if times is None:
            return 0.0
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            del self._failures[key]
            return 0.0
        return times[0] + self.window_s - now if len(times) >= self.limit else 0.0

    async def retry_after(self, key: str) -> float:
        return self._wait(key, self._clock())

    async def hit(self, key: str) -> float:
        now = self._clock()
        self._wait(key, now)  # drops what has left the window
        times = self._failures.pop(key, None) or deque(maxlen=self.limit)
        times.append(now)
        self._failures[key] = times  # (re)inserted last: dict order is least recently failed
        if len(self._failures) > self._max_keys:
            del self._failures[next(iter(self._failures))]
        return self._wait(key, now)

    async def aclose(self) -> None:
        self._failures.clear()
