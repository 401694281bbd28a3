"""Retrying calls to a server the guard depends on: image backends and the remote judge.

One call = at most `attempts` tries within one overall deadline. Between tries: exponential
backoff with full jitter; a Retry-After on the failure (seconds or an HTTP date) is honoured when
it fits in what is left of the deadline, and otherwise the failure is raised as it came (a
backend's 429 reaches the client with its Retry-After). Which failures deserve another try is
the caller's to say: `backend_retryable` for the adapters retries 429, 5xx and connection
failures, not timeouts (the backend may still be working on the first try), 4xx or malformed
answers. The SDKs' own retries are off, so that this is the only policy.

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
import math
import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field

from guard.support.errors import (
    BackendError,
    BackendRateLimited,
    BackendRejected,
    BackendTimeout,
    GuardError,
)

log = logging.getLogger("safeedit.retry")

T = TypeVar("T")

_RETRIED_BACKEND_CODES = frozenset({"backend_error", "backend_unavailable"})


class RetryPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    attempts: int = Field(3, ge=1, le=20)
    backoff_s: float = Field(0.5, ge=0)
    max_backoff_s: float = Field(8.0, ge=0)
    deadline_s: float | None = Field(None, gt=0)

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (0 for the first): full jitter."""
        return random.uniform(0, min(self.max_backoff_s, self.backoff_s * 2**retry))


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds a Retry-After header value asks to wait, as delta-seconds or an HTTP date
    (a date in the past is 0); None when there is none or it cannot be read."""
    if not value or not value.strip():
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # "-0000": UTC, with no claim about the local zone
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, seconds) if math.isfinite(seconds) else None


MAX_RETRY_AFTER_S = 86_400


def retry_after_header(value: str | None) -> dict[str, str]:
    """A server's Retry-After, fit to pass on to a client: `{"retry-after": whole seconds}` when
    the value parses (delta-seconds or an HTTP date), else nothing. Only what was parsed goes on,
    never the server's text: a server that echoes its request would hand the operator's key to
    the client in it."""
    seconds = retry_after_s(value)
    if seconds is None:
        return {}
    return {"retry-after": str(min(MAX_RETRY_AFTER_S, math.ceil(seconds)))}


def backend_retryable(exc: GuardError) -> bool:
    """429, 5xx and connection failures; not timeouts, 4xx or malformed answers."""
    if isinstance(exc, BackendRateLimited):
        return True
    if not isinstance(exc, BackendError) or isinstance(exc, BackendTimeout | BackendRejected):
        return False
    return exc.code in _RETRIED_BACKEND_CODES


class Retrying:
    """Calls one server: at most `max_concurrency` tries in flight (the rest wait their turn),
    each call retried under `policy`, all of it within the deadline (`policy.deadline_s`, else
    2 x `timeout_s`). `what` names the server in the deadline's error ("backend 'sd'");
    `expired` makes that error (BackendTimeout for a backend)."""

    def __init__(self, what: str, policy: RetryPolicy, *, timeout_s: float,
                 retryable: Callable[[GuardError], bool] = backend_retryable,
                 expired: Callable[[str], GuardError] = BackendTimeout,
                 max_concurrency: int | None = None) -> None:
        self.what = what
        self.policy = policy
        self.deadline_s = policy.deadline_s or 2 * timeout_s
        self._retryable = retryable
        self._expired = expired
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
                raise self._expired(f"{self.what} did not answer within "
                                    f"{self.deadline_s:g} s") from exc
            except GuardError as exc:
                if tried == self.policy.attempts or not self._retryable(exc):
                    raise
                wait = self.policy.backoff(tried - 1)
                asked = retry_after_s(exc.headers.get("retry-after"))
                if asked is not None:
                    wait = max(wait, asked)
                if loop.time() + wait >= deadline:
                    raise  # a Retry-After beyond the deadline goes on as it came
                log.warning("%s (attempt %d of %d); retrying in %.2f s", exc.message, tried,
                            self.policy.attempts, wait)
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover
