"""The guard's retry policy for backend calls, shared by the adapters.

One call to a backend = at most `attempts` tries within one overall deadline. Retried: 429 (rate
limited), 5xx and connection failures, after exponential backoff with full jitter; a 429's
Retry-After is honoured when it fits in what is left of the deadline, and passed on to the client
otherwise. Not retried: timeouts (the backend may still be working on the first try), 4xx, and
malformed answers. The SDKs' own retries are off, so that this is the only policy.

Options (`retry:` in a backend's section):
    attempts (3)        tries in all, the first included
    backoff_s (0.5)     first backoff; doubles per retry, with full jitter
    max_backoff_s (8)   cap on one backoff
    deadline_s (null)   the whole call, retries and queueing included; default 2 x timeout_s
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pydantic import Field

from adapters.options import Options
from guard.errors import BackendError, BackendRateLimited, BackendRejected, BackendTimeout

log = logging.getLogger("safeedit.backends")

T = TypeVar("T")

_RETRIED_CODES = frozenset({"backend_error", "backend_unavailable"})


class RetryPolicy(Options):
    attempts: int = Field(3, ge=1, le=20)
    backoff_s: float = Field(0.5, ge=0)
    max_backoff_s: float = Field(8.0, ge=0)
    deadline_s: float | None = Field(None, gt=0)

    def backoff(self, retry: int) -> float:
        return random.uniform(0, min(self.max_backoff_s, self.backoff_s * 2**retry))


def retryable(exc: BackendError) -> bool:
    if isinstance(exc, BackendRateLimited):
        return True
    if isinstance(exc, BackendTimeout | BackendRejected):
        return False
    return exc.code in _RETRIED_CODES


def retry_after_s(exc: BackendError) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), if the error has one."""
    value = exc.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Caller:
    """Calls one backend: at most `max_concurrency` calls in flight (the rest wait their turn),
    each retried under `policy`, all of it within the deadline."""

    def __init__(self, backend: str, policy: RetryPolicy, *, timeout_s: float,
                 max_concurrency: int | None = None) -> None:
        self.backend = backend
        self.policy = policy
        self.deadline_s = policy.deadline_s or 2 * timeout_s
        self._slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def __call__(self, attempt: Callable[[], Awaitable[T]]) -> T:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.deadline_s
        for tried in range(1, self.policy.attempts + 1):
            timer = asyncio.timeout_at(deadline)
            try:
                async with timer:
                    if self._slots is None:
                        return await attempt()
                    async with self._slots:
                        return await attempt()
            except TimeoutError as exc:
                if not timer.expired():
                    raise
                raise BackendTimeout(f"backend {self.backend!r} did not answer within "
                                     f"{self.deadline_s:g} s") from exc
            except BackendError as exc:
                if tried == self.policy.attempts or not retryable(exc):
                    raise
                wait = self.policy.backoff(tried - 1)
                asked = retry_after_s(exc)
                if asked is not None:
                    wait = max(wait, asked)
                if loop.time() + wait >= deadline:
                    raise  # a Retry-After beyond the deadline goes to the client as it came
                log.warning("backend %s: %s (attempt %d of %d); retrying in %.2f s",
                            self.backend, exc.code, tried, self.policy.attempts, wait)
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover
