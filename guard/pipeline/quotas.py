"""Limits of the images API per key and per tenant: requests per minute, images per day and
requests in flight, counted in Redis when replicas share them, else in this process.

    Quotas             the app's part: which limits apply to a caller, the OpenAI-style
                       headers, what to do when the counts are out of reach (`on_unavailable`)
    QuotaStore         the contract: admit a request in all its buckets at once, or in none
    ├── MemoryQuotas   one process (no `redis_url`)
    └── RedisQuotas    shared by replicas; each call is one Lua script, atomic in Redis, timed
                       by Redis's clock, so replicas neither race nor disagree about the time

What is counted, the same in both stores:
- `requests_per_minute`: a sliding window, at most N requests admitted in any 60 seconds.
- `images_per_day`: the sum of `n` admitted per UTC day. Counted at admission, so requests in
  flight together cannot overshoot; given back when the request ends in a 429 or a 5xx (the
  client got nothing through no fault of its own), kept when the policy refused it or the client
  went away (the backend may have made the images by then).
- `max_concurrent`: a slot held from admission until the trace is written; a slot its replica
  never released (killed mid-request) is freed after `concurrency_ttl_s`.
A request is admitted only when its key's bucket and its tenant's both admit it; a refused
request counts nowhere.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from guard.core.config import Config, Limits
from guard.support.errors import GuardError, RateLimited, Unavailable
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

    async def release(self, ticket: str, buckets: Sequence[Bucket], refund: int,
                      day: int) -> None:
        """Free the ticket's slots; give `refund` images back if still on `day`."""
        ...

    async def ready(self) -> bool: ...

    async def aclose(self) -> None: ...


class MemoryQuotas:
    """The counts of one process. `clock` is wall seconds (the day is a UTC day); a test may
    pass its own."""

    def __init__(self, *, slot_ttl_s: float = 900.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._clock, self._slot_ttl_s = clock, slot_ttl_s
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
                self._slots.setdefault(b.scope, {})[ticket] = now + self._slot_ttl_s
        return Admitted(day, tuple(requests), tuple(counted))

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


# Times in the scripts are integer microseconds of Redis's clock. Per bucket, three keys: the
# window (a sorted set of tickets by admission time), the day's images (a hash: day, used) and
# the slots in flight (a sorted set of tickets by expiry).
_ACQUIRE = """
redis.replicate_commands()  -- writes after TIME (the default from Redis 5 on)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window, dayus = 60000000, 86400000000
local day = math.floor(now / dayus)
local day_left = (day + 1) * dayus - now
local ticket, n, ttl_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local buckets = #KEYS / 3
local function used_today(key)
  if tonumber(redis.call('HGET', key, 'day')) == day then
    return tonumber(redis.call('HGET', key, 'used')) or 0
  end
  return 0
end
for i = 0, buckets - 1 do
  local rpm, ipd, conc = tonumber(ARGV[4 + 3 * i]), tonumber(ARGV[5 + 3 * i]),
                         tonumber(ARGV[6 + 3 * i])
  local rk, ik, sk = KEYS[1 + 3 * i], KEYS[2 + 3 * i], KEYS[3 + 3 * i]
  if rpm > 0 then
    redis.call('ZREMRANGEBYSCORE', rk, '-inf', now - window)
    local count = redis.call('ZCARD', rk)
    if count >= rpm then
      local oldest = tonumber(redis.call('ZRANGE', rk, 0, 0, 'WITHSCORES')[2])
      local newest = tonumber(redis.call('ZRANGE', rk, -1, -1, 'WITHSCORES')[2])
      return {0, i, 1, count, oldest + window - now, newest + window - now}
    end
  end
  if ipd > 0 then
    local used = used_today(ik)
    if used + n > ipd then return {0, i, 2, used, day_left, day_left} end
  end
  if conc > 0 then
    redis.call('ZREMRANGEBYSCORE', sk, '-inf', now)
    local held = redis.call('ZCARD', sk)
    if held >= conc then return {0, i, 3, held, 0, 0} end
  end
end
local out = {1, day}
for i = 0, buckets - 1 do
  local rpm, ipd, conc = tonumber(ARGV[4 + 3 * i]), tonumber(ARGV[5 + 3 * i]),
                         tonumber(ARGV[6 + 3 * i])
  local rk, ik, sk = KEYS[1 + 3 * i], KEYS[2 + 3 * i], KEYS[3 + 3 * i]
  local left, images_left = -1, -1
  if rpm > 0 then
    redis.call('ZADD', rk, now, ticket)
    redis.call('PEXPIRE', rk, window / 1000)
    left = rpm - redis.call('ZCARD', rk)
  end
  if ipd > 0 then
    local used = used_today(ik) + n
    redis.call('HSET', ik, 'day', day, 'used', used)
    redis.call('PEXPIREAT', ik, (day + 1) * dayus / 1000 + 3600000)
    images_left = ipd - used
  end
  if conc > 0 then
    redis.call('ZADD', sk, now + ttl_ms * 1000, ticket)
    redis.call('PEXPIRE', sk, ttl_ms)
  end
  table.insert(out, left)
  table.insert(out, images_left)
end
table.insert(out, day_left)
return out
"""

_RELEASE = """
local ticket, refund, day = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 0, #KEYS / 2 - 1 do
  local ik, sk = KEYS[1 + 2 * i], KEYS[2 + 2 * i]
  redis.call('ZREM', sk, ticket)
  if refund > 0 and tonumber(redis.call('HGET', ik, 'day')) == day then
    if redis.call('HINCRBY', ik, 'used', -refund) < 0 then redis.call('HSET', ik, 'used', 0) end
  end
end
return 1
"""

_REFUSED_BY: tuple[LimitName, ...] = ("requests_per_minute", "images_per_day", "max_concurrent")


class RedisQuotas:
    """Counts shared by every replica that names the same Redis and `key_prefix`."""

    def __init__(self, url: str, *, key_prefix: str, timeout_s: float = 0.5,
                 slot_ttl_s: float = 900.0) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # One quick retry covers a pooled connection Redis has dropped; more would hold every
        # request up when Redis is down, and `on_unavailable` decides what happens then.
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1))
        self._prefix = key_prefix
        self._slot_ttl_ms = max(1, math.ceil(slot_ttl_s * 1000))
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._release = self._redis.register_script(_RELEASE)

    def _keys(self, bucket: Bucket) -> tuple[str, str, str]:
        base = f"{self._prefix}{bucket.scope}:"
        return base + "requests", base + "images", base + "inflight"

    async def acquire(self, ticket: str, buckets: Sequence[Bucket],
                      images: int) -> Admitted | Refused:
        keys: list[str] = []
        args: list[str | int] = [ticket, images, self._slot_ttl_ms]
        for b in buckets:
            keys += self._keys(b)
            args += [b.limits.requests_per_minute or 0, b.limits.images_per_day or 0,
                     b.limits.max_concurrent or 0]
        out = [int(x) for x in await self._call(self._acquire, keys, args)]
        if out[0] == 0:
            _, index, which, used, retry_us, reset_us = out
            limit: LimitName = _REFUSED_BY[which - 1]
            bucket = buckets[index]
            value = int(getattr(bucket.limits, limit))
            if limit == "max_concurrent":
                retry_us = reset_us = int(CONCURRENCY_RETRY_S * 1e6)
            return Refused(limit, bucket.scope, Usage(value, max(0, value - used), reset_us / 1e6),
                           used, retry_us / 1e6)
        day, day_left = out[1], out[-1] / 1e6
        requests, counted = [], []
        for i, b in enumerate(buckets):
            left, images_left = out[2 + 2 * i], out[3 + 2 * i]
            if b.limits.requests_per_minute is not None:
                requests.append(Usage(b.limits.requests_per_minute, left, WINDOW_S))
            if b.limits.images_per_day is not None:
                counted.append(Usage(b.limits.images_per_day, images_left, day_left))
        return Admitted(day, tuple(requests), tuple(counted))

    async def release(self, ticket: str, buckets: Sequence[Bucket], refund: int,
                      day: int) -> None:
        keys = [k for b in buckets for k in self._keys(b)[1:]]
        await self._call(self._release, keys, [ticket, refund, day])

    async def _call(self, script: Any, keys: list[str], args: list[str | int]) -> Any:
        from redis.exceptions import RedisError

        try:
            return await script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise Unavailable("The request limits cannot be checked (their store is "
                             "unavailable); the request was not served.",
                             code="limits_unavailable", headers={"retry-after": "1"},
                             detail=f"{type(exc).__name__}: {exc}") from exc

    async def ready(self) -> bool:
        return bool(await self._redis.ping())

    async def aclose(self) -> None:
        await self._redis.aclose()


@dataclass(frozen=True, slots=True)
class Ticket:
    """A request's place in its buckets, given back when its trace is written."""

    id: str = ""
    buckets: tuple[Bucket, ...] = ()
    images: int = 0
    day: int = 0
    headers: dict[str, str] = field(default_factory=dict)


NO_TICKET = Ticket()


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
        if store is None and section.redis_url and self.enabled:
            store = RedisQuotas(section.redis_url, key_prefix=section.key_prefix,
                                timeout_s=section.timeout_s, slot_ttl_s=section.concurrency_ttl_s)
        elif store is None:
            store = MemoryQuotas(slot_ttl_s=section.concurrency_ttl_s)
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
        return Ticket(ticket, buckets, images, result.day, {
            **_headers("requests", min(result.requests, key=_tightness, default=None)),
            **_headers("images", min(result.images, key=_tightness, default=None))})

    async def release(self, ticket: Ticket, status: int) -> None:
        """Free the request's slots; give its images back if it failed through no fault of
        the client's (429, 5xx). Never raises: an unreleased slot expires by itself."""
        if not ticket.buckets:
            return
        refund = ticket.images if status == 429 or status >= 500 else 0
        try:
            await self.store.release(ticket.id, ticket.buckets, refund, ticket.day)
        except GuardError:
            log.warning("could not release the limits of request %s; its slot expires by "
                        "itself", ticket.id, exc_info=True)

    async def ready(self) -> bool:
        # Failing open, this replica serves without Redis: readiness stays true (taking every
        # replica out of the load balancer would be the outage `open` exists to avoid).
        return self.fail_open or await self.store.ready()

    async def aclose(self) -> None:
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
