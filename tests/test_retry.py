"""guard.support.retry: the one retry policy of the backends and the remote judge."""

from __future__ import annotations

import asyncio
import email.utils
import time

import pytest

from guard.support.errors import (
    BackendError,
    BackendRateLimited,
    BackendRejected,
    BackendTimeout,
    GuardError,
    JudgeError,
    PolicyViolation,
)
from guard.support.retry import Retrying, RetryPolicy, backend_retryable, retry_after_s

NOW = 1_750_000_000.0


def http_date(ts: float) -> str:
    return email.utils.formatdate(ts, usegmt=True)


@pytest.mark.parametrize("retry", range(6))
def test_backoff_is_full_jitter_under_a_doubling_capped_bound(retry: int) -> None:
    policy = RetryPolicy(backoff_s=0.5, max_backoff_s=3.0)
    bound = min(3.0, 0.5 * 2**retry)
    waits = [policy.backoff(retry) for _ in range(500)]
    assert all(0.0 <= w <= bound for w in waits)
    # jittered: spread over the whole range, not one value
    assert min(waits) < 0.2 * bound and max(waits) > 0.8 * bound


@pytest.mark.parametrize("value, seconds", [
    ("3", 3.0), ("0", 0.0), (" 1.5 ", 1.5), ("-4", 0.0),
    (http_date(NOW + 30), 30.0),
    (http_date(NOW - 30), 0.0),                                 # already past
    ("Sun, 15 Jun 2025 15:07:10 GMT", 30.0),                    # NOW is 15:06:40 UTC
    ("Sun, 15 Jun 2025 15:07:10 -0000", 30.0),                  # "-0000" is UTC too
    ("Sun, 15 Jun 2025 17:07:10 +0200", 30.0),
    (None, None), ("", None), ("soon", None), ("inf", None), ("nan", None),
])
def test_retry_after_as_seconds_or_http_date(value: str | None, seconds: float | None) -> None:
    assert retry_after_s(value, now=NOW) == seconds


def test_an_http_date_without_a_zone_is_utc_whatever_the_local_zone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert retry_after_s("Sun, 15 Jun 2025 15:07:10 -0000", now=NOW) == 30.0
    finally:
        monkeypatch.undo()
        time.tzset()


def test_retry_after_defaults_to_the_clock() -> None:
    asked = retry_after_s(http_date(time.time() + 60))
    assert asked is not None and 58 <= asked <= 60


@pytest.mark.parametrize("error, retried", [
    (BackendError("5xx"), True),
    (BackendError("down", code="backend_unavailable"), True),
    (BackendRateLimited("429"), True),
    (BackendTimeout("slow"), False),
    (BackendRejected("400"), False),
    (BackendError("bad json", code="backend_bad_response"), False),
    (BackendError("bad key", code="backend_auth_failed"), False),
    (PolicyViolation("provider filter"), False),
    (JudgeError("judge"), False),
])
def test_what_backends_retry(error: GuardError, retried: bool) -> None:
    assert backend_retryable(error) is retried


class Flaky:
    """An upstream that fails the first `failures` calls with `error`, then answers "ok"."""

    def __init__(self, failures: int, error: GuardError, hang_s: float = 0.0) -> None:
        self.failures, self.error, self.hang_s = failures, error, hang_s
        self.calls: list[float] = []

    async def __call__(self) -> str:
        self.calls.append(time.perf_counter())
        if self.hang_s:
            await asyncio.sleep(self.hang_s)
        if len(self.calls) <= self.failures:
            raise self.error
        return "ok"


FAST = RetryPolicy(attempts=3, backoff_s=0.01, max_backoff_s=0.02)


async def test_retryable_failures_are_retried_until_success() -> None:
    upstream = Flaky(2, BackendError("backend 'sd' failed with HTTP 500"))
    assert await Retrying("backend 'sd'", FAST, timeout_s=5)(upstream) == "ok"
    assert len(upstream.calls) == 3


async def test_attempts_are_bounded_and_the_last_failure_raised() -> None:
    upstream = Flaky(99, BackendError("backend 'sd' failed with HTTP 500"))
    with pytest.raises(BackendError, match="HTTP 500"):
        await Retrying("backend 'sd'", FAST, timeout_s=5)(upstream)
    assert len(upstream.calls) == 3


async def test_other_failures_are_raised_at_once() -> None:
    upstream = Flaky(99, BackendRejected("invalid size"))
    with pytest.raises(BackendRejected):
        await Retrying("backend 'sd'", FAST, timeout_s=5)(upstream)
    assert len(upstream.calls) == 1


async def test_the_caller_says_what_is_retryable() -> None:
    upstream = Flaky(1, JudgeError("remote judge answered 503"))
    call = Retrying("remote judge", FAST, timeout_s=5,
                    retryable=lambda exc: isinstance(exc, JudgeError), expired=JudgeError)
    assert await call(upstream) == "ok" and len(upstream.calls) == 2


async def test_an_http_date_retry_after_is_waited_for() -> None:
    # HTTP dates have whole seconds: two seconds from now is a wait of more than one.
    when = http_date(int(time.time()) + 2)
    upstream = Flaky(1, BackendRateLimited("429", headers={"retry-after": when}))
    assert await Retrying("backend 'sd'", FAST, timeout_s=5)(upstream) == "ok"
    first, second = upstream.calls
    assert second - first >= 1.0


async def test_a_retry_after_beyond_the_deadline_is_raised_as_it_came() -> None:
    upstream = Flaky(99, BackendRateLimited("429", headers={"retry-after": "30"}))
    started = time.perf_counter()
    with pytest.raises(BackendRateLimited) as info:
        await Retrying("backend 'sd'", RetryPolicy(attempts=5, deadline_s=3),
                       timeout_s=60)(upstream)
    assert info.value.headers == {"retry-after": "30"}
    assert len(upstream.calls) == 1 and time.perf_counter() - started < 1


async def test_the_deadline_cuts_a_hanging_attempt() -> None:
    upstream = Flaky(0, BackendError("unused"), hang_s=5)
    started = time.perf_counter()
    with pytest.raises(JudgeError, match=r"remote judge did not answer within 0\.3 s"):
        await Retrying("remote judge", FAST, timeout_s=0.15, expired=JudgeError)(upstream)
    assert time.perf_counter() - started < 1


async def test_the_deadline_bounds_retries_and_queueing() -> None:
    upstream = Flaky(999, BackendError("backend 'sd' failed with HTTP 500"), hang_s=0.05)
    policy = RetryPolicy(attempts=20, backoff_s=0.05, max_backoff_s=0.05, deadline_s=0.5)
    call = Retrying("backend 'sd'", policy, timeout_s=60, max_concurrency=1)
    started = time.perf_counter()
    results = await asyncio.gather(call(upstream), call(upstream), return_exceptions=True)
    assert all(isinstance(r, BackendError) for r in results)
    assert time.perf_counter() - started < 1 and 2 <= len(upstream.calls) < 20
