"""Limits of the images API per key and per tenant: requests per minute, images per day and
requests in flight, counted in Redis when replicas share them, else in this process.

    Quotas             the app's part: which limits apply to a caller, the OpenAI-style
                       headers, what to do when the counts are out of reach (`on_unavailable`)
    QuotaStore         the contract: admit a request in all its buckets at once, or in none
    ├── MemoryQuotas   one process (no `redis_url`)
    └── RedisQuotas    shared by replicas (guard.pipeline.quotas_redis)

What is counted, the same in both stores:
- `requests_per_minute`: a sliding window, at most N requests admitted in any 60 seconds.
- `images_per_day`: the sum of `n` admitted per UTC day. Counted at admission, so requests in
  flight together cannot overshoot; given back when the request ends in a 429 or a 5xx (the
  client got nothing through no fault of its own), kept when the policy refused it or the client
  went away (the backend may have made the images by then).
- `max_concurrent`: a slot held from admission until the trace is written. A slot is a lease of
  `slot_lease_s`, renewed every third of it while the request runs, so a slot its replica never
  released (killed mid-request, or the store down when the request ended) is free again within
  `slot_lease_s`. A release that fails is retried in the background until it is moot.
A request is admitted only when its key's bucket and its tenant's both admit it; a refused
request counts nowhere.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from guard.core.config import Config, Limits
from guard.support.errors import GuardError, RateLimited
from guard.support.telemetry import Metrics

log = logging.getLogger("safeedit.quotas")

WINDOW_S = 60.0
DAY_S = 86_400.0
CONCURRENCY_RETRY_S = 1.0  # nobody knows when a slot frees; a second is a polite first wait
LimitName = Literal["requests_per_minute", "images_per_day", "max_concurrent"]


@dataclass(frozen=True, slots=True)
class Bucket:
    """One set of counts: `key:<id>` or `tenant:<name>`, with the limits that apply to it."""

    scope: str
    limits: Limits


@dataclass(frozen=True, slots=True)
class Usage:
    """A limit as a client sees it after a request: for the x-ratelimit-* headers."""

    limit: int
    remaining: int
    reset_s: float  # until the counts are back to none


@dataclass(frozen=True, slots=True)
class Admitted:
    day: int  # the UTC day (days since the epoch) images were counted on, for a refund
    requests: tuple[Usage, ...] = ()
    images: tuple[Usage, ...] = ()


@dataclass(frozen=True, slots=True)
class Refused:
    limit: LimitName
    scope: str
    usage: Usage  # of the limit that refused
    used: int
    retry_after_s: float


class QuotaStore(Protocol):
    async def acquire(self, ticket: str, buckets: Sequence[Bucket],
                      images: int) -> Admitted | Refused:
        """Count request `ticket` (asking for `images`) in every bucket, or in none; raises a
        GuardError (503) when the counts cannot be reached."""
        ...

    async def renew(self, ticket: str, buckets: Sequence[Bucket]) -> None:
        """Extend the lease of the ticket's slots to `slot_lease_s` from now (a slot already
        freed stays free)."""
        ...

    async def release(self, ticket: str, buckets: Sequence[Bucket], refund: int,
                      day: int) -> None:
        """Free the ticket's slots; give `refund` images back if still on `day`. Retried after
        a failure, which may have come after the work was done: the images come back once."""
        ...

    async def ready(self) -> bool: ...

    async def aclose(self) -> None: ...


class MemoryQuotas:
    """The counts of one process. `clock` is wall seconds (the day is a UTC day); a test may
    pass its own."""

    def __init__(self, *, slot_lease_s: float = 30.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._clock, self._slot_lease_s = clock, slot_lease_s
        self._requests: dict[str, deque[float]] = {}  # admission times inside the window
        self._images: dict[str, tuple[int, int]] = {}  # scope -> (day, images used)
        self._slots: dict[str, dict[str, float]] = {}  # scope -> ticket -> expiry

    async def acquire(self, ticket: str, buckets: Sequence[Bucket],
                      images: int) -> Admitted | Refused:
        now = self._clock()
        day = int(now // DAY_S)
        day_left = (day + 1) * DAY_S - now
        for b in buckets:  # check every bucket before counting in any
            rpm, ipd, conc = (b.limits.requests_per_minute, b.limits.images_per_day,
                              b.limits.max_concurrent)
            times = self._window(b.scope, now)
            if rpm is not None and len(times) >= rpm:
                return Refused("requests_per_minute", b.scope,
                               Usage(rpm, 0, times[-1] + WINDOW_S - now), len(times),
                               times[0] + WINDOW_S - now)
            used = self._used(b.scope, day)
            if ipd is not None and used + images > ipd:
                return Refused("images_per_day", b.scope, Usage(ipd, ipd - used, day_left), used,
                               day_left)
            slots = self._held(b.scope, now)
            if conc is not None and len(slots) >= conc:
                return Refused("max_concurrent", b.scope, Usage(conc, 0, CONCURRENCY_RETRY_S),
                               len(slots), CONCURRENCY_RETRY_S)
        requests, counted = [], []
        for b in buckets:
            rpm, ipd, conc = (b.limits.requests_per_minute, b.limits.images_per_day,
                              b.limits.max_concurrent)
            if rpm is not None:
                times = self._requests.setdefault(b.scope, deque())
                times.append(now)
                requests.append(Usage(rpm, rpm - len(times), WINDOW_S))
            if ipd is not None:
                used = self._used(b.scope, day) + images
                self._images[b.scope] = (day, used)
                counted.append(Usage(ipd, ipd - used, day_left))
            if conc is not None:
                self._slots.setdefault(b.scope, {})[ticket] = now + self._slot_lease_s
        return Admitted(day, tuple(requests), tuple(counted))

    async def renew(self, ticket: str, buckets: Sequence[Bucket]) -> None:
        expiry = self._clock() + self._slot_lease_s
        for b in buckets:
            slots = self._slots.get(b.scope, {})
            if ticket in slots:
                slots[ticket] = expiry

    async def release(self, ticket: str, buckets: Sequence[Bucket], refund: int,
                      day: int) -> None:
        for b in buckets:
            self._slots.get(b.scope, {}).pop(ticket, None)
            counted_day, used = self._images.get(b.scope, (None, 0))
            if refund and counted_day == day:
                self._images[b.scope] = (day, max(0, used - refund))

    def _window(self, scope: str, now: float) -> deque[float]:
        times = self._requests.get(scope, deque())
        while times and times[0] <= now - WINDOW_S:
            times.popleft()
        return times

    def _used(self, scope: str, day: int) -> int:
        counted_day, used = self._images.get(scope, (day, 0))
        return used if counted_day == day else 0

    def _held(self, scope: str, now: float) -> dict[str, float]:
        slots = self._slots.get(scope, {})
        for ticket in [t for t, expiry in slots.items() if expiry <= now]:
            del slots[ticket]
        return slots

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        self._requests.clear()
        self._images.clear()
        self._slots.clear()


@dataclass(frozen=True, slots=True)
class Ticket:
    """A request's place in its buckets, given back when its trace is written."""

    id: str = ""
    buckets: tuple[Bucket, ...] = ()
    images: int = 0
    day: int = 0
    headers: dict[str, str] = field(default_factory=dict)


NO_TICKET = Ticket()


@dataclass(slots=True)
class _Lease:
    """Slots a request of this replica holds, renewed while `owner` (its ASGI task) runs."""

    owner: asyncio.Task[object] | None
    renewed_at: float  # monotonic seconds of the last renewal the store confirmed
    renewing: asyncio.Task[None] | None = None


class Quotas:
    """The limits of one app, and the part `/readyz` reports as `limits` when any is set."""

    def __init__(self, config: Config, metrics: Metrics, store: QuotaStore | None = None) -> None:
        section = config.limits
        self._defaults = section.defaults
        self._keys = {k.id: k.limits.over(self._defaults) for k in config.keys}
        self._tenants = {t: config.tenant_limits(t) for t in config.tenants}
        self.enabled = any(lim.limited for lim in (self._defaults, *self._keys.values(),
                                                   *self._tenants.values()))
        self.fail_open = section.on_unavailable == "open"
        self._metrics = metrics
        self._lease_s = section.slot_lease_s
        self._leases: dict[str, _Lease] = {}  # ticket id -> its slots' lease
        self._tasks: set[asyncio.Task[None]] = set()  # renewals and retried releases
        if store is None and section.redis_url and self.enabled:
            from guard.pipeline.quotas_redis import RedisQuotas

            store = RedisQuotas(section.redis_url, key_prefix=section.key_prefix,
                                timeout_s=section.timeout_s, slot_lease_s=self._lease_s)
        elif store is None:
            store = MemoryQuotas(slot_lease_s=self._lease_s)
        self.store = store

    def buckets(self, key_id: str, tenant: str) -> tuple[Bucket, ...]:
        mine = self._keys.get(key_id, self._defaults)  # open mode's one caller gets the defaults
        theirs = self._tenants.get(tenant)
        return (*((Bucket(f"key:{key_id}", mine),) if mine.limited else ()),
                *((Bucket(f"tenant:{tenant}", theirs),) if theirs and theirs.limited else ()))

    async def admit(self, ticket: str, key_id: str, tenant: str, images: int) -> Ticket:
        """Count the request or raise: RateLimited (429) over a limit; a GuardError (503) when
        the counts are out of reach and `on_unavailable` is closed."""
        buckets = self.buckets(key_id, tenant)
        if not buckets:
            return NO_TICKET
        try:
            result = await self.store.acquire(ticket, buckets, images)
        except GuardError as exc:
            action = "served" if self.fail_open else "refused"
            self._metrics.quota_unavailable.labels(action).inc()
            if not self.fail_open:
                raise
            log.warning("limits unavailable (%s); request %s served uncounted "
                        "(on_unavailable: open)", exc.detail, ticket)
            return NO_TICKET
        if isinstance(result, Refused):
            self._metrics.quota_rejections.labels(result.limit, result.scope.split(":")[0]).inc()
            raise _rate_limited(result, images)
        if any(b.limits.max_concurrent is not None for b in buckets):
            # Renewed while the request's own task runs: a request whose release is never
            # called (its response abandoned before it began) lets its slots lapse.
            lease = self._leases[ticket] = _Lease(asyncio.current_task(), time.monotonic())
            lease.renewing = self._spawn(self._renew(ticket, buckets, lease))
        return Ticket(ticket, buckets, images, result.day, {
            **_headers("requests", min(result.requests, key=_tightness, default=None)),
            **_headers("images", min(result.images, key=_tightness, default=None))})

    async def _renew(self, ticket: str, buckets: Sequence[Bucket], lease: _Lease) -> None:
        while True:
            await asyncio.sleep(self._lease_s / 3)
            if lease.owner is not None and lease.owner.done():
                return
            try:
                await self.store.renew(ticket, buckets)
            except GuardError as exc:
                log.warning("could not renew the slots of request %s (%s); trying again in "
                            "%.3gs", ticket, exc.detail, self._lease_s / 3)
            else:
                lease.renewed_at = time.monotonic()

    async def release(self, ticket: Ticket, status: int) -> None:
        """Free the request's slots; give its images back if it failed through no fault of
        the client's (429, 5xx). Never raises; if the store is out of reach, the release is
        retried in the background until the slots' lease would have expired anyway."""
        if not ticket.buckets:
            return
        lease = self._leases.pop(ticket.id, None)
        if lease is not None and lease.renewing is not None:
            lease.renewing.cancel()
        refund = ticket.images if status == 429 or status >= 500 else 0
        try:
            await self.store.release(ticket.id, ticket.buckets, refund, ticket.day)
        except GuardError as exc:
            if lease is None and not refund:
                return  # no slot and no images to give back: nothing to retry
            expires = (lease.renewed_at if lease else time.monotonic()) + self._lease_s
            log.warning("could not release the limits of request %s (%s); retrying in the "
                        "background", ticket.id, exc.detail)
            self._spawn(self._retry_release(ticket, refund, expires))

    async def _retry_release(self, ticket: Ticket, refund: int, expires: float) -> None:
        for retry in itertools.count(1):
            # Backoff with jitter, so that the requests a blip caught do not retry in step.
            wait = min(self._lease_s / 3, 0.05 * 2**retry) * random.uniform(0.5, 1.0)
            if time.monotonic() + wait >= expires:
                log.warning("gave up releasing the limits of request %s: its slots' lease has "
                            "run out (images not given back: %d)", ticket.id, refund)
                return
            await asyncio.sleep(wait)
            try:
                await self.store.release(ticket.id, ticket.buckets, refund, ticket.day)
            except GuardError:
                continue
            log.info("released the limits of request %s at retry %d", ticket.id, retry)
            return

    def _spawn(self, work: Coroutine[object, object, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def ready(self) -> bool:
        # Failing open, this replica serves without Redis: readiness stays true (taking every
        # replica out of the load balancer would be the outage `open` exists to avoid).
        return self.fail_open or await self.store.ready()

    async def aclose(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._leases.clear()
        await self.store.aclose()


def _tightness(usage: Usage) -> tuple[int, float]:
    return usage.remaining, -usage.reset_s


def _headers(what: str, usage: Usage | None) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers for `what` (requests; images is the guard's analogue)."""
    if usage is None:
        return {}
    return {f"x-ratelimit-limit-{what}": str(usage.limit),
            f"x-ratelimit-remaining-{what}": str(max(0, usage.remaining)),
            f"x-ratelimit-reset-{what}": duration(usage.reset_s)}


_WORDS = {"requests_per_minute": "requests per minute (RPM)",
          "images_per_day": "images per day (IPD)", "max_concurrent": "concurrent requests"}


def _rate_limited(refused: Refused, images: int) -> RateLimited:
    kind, _, name = refused.scope.partition(":")
    wait = duration(refused.retry_after_s)
    asked = images if refused.limit == "images_per_day" else 1
    message = (f"Rate limit reached for {kind} '{name}' on {_WORDS[refused.limit]}: "
               f"Limit {refused.usage.limit}, Used {refused.used}, Requested {asked}. "
               f"Please try again in {wait}.")
    if asked > refused.usage.limit:
        message = (f"This request asks for {asked} images, more than the {kind} '{name}' may "
                   f"have in a day ({refused.usage.limit}).")
    what = "images" if refused.limit == "images_per_day" else "requests"
    headers = {"retry-after": str(max(1, math.ceil(refused.retry_after_s)))}
    if refused.limit != "max_concurrent":
        headers |= _headers(what, refused.usage)
    return RateLimited(message, kind=what, headers=headers)


def duration(seconds: float) -> str:
    """A duration as OpenAI writes it in x-ratelimit-reset-*: `20ms`, `1s`, `6m0s`, `1h2m3.5s`."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    hours, rest = divmod(round(seconds, 3), 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours or minutes:
        text = f"{int(minutes)}m{text}"
    if hours:
        text = f"{int(hours)}h{text}"
    return text
