"""The request limits counted in Redis, shared by every replica that names the same Redis and
`key_prefix` (guard.pipeline.quotas says what is counted). Each call is one Lua script, atomic in
Redis and timed by Redis's clock, so replicas neither race nor disagree about the time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from guard.pipeline.quotas import (
    CONCURRENCY_RETRY_S,
    WINDOW_S,
    Admitted,
    Bucket,
    LimitName,
    Refused,
    Usage,
)
from guard.support.errors import Unavailable

# Times in the scripts are integer microseconds of Redis's clock. Per bucket, three keys: the
# window (a sorted set of tickets by admission time), the day's images (a hash: day, used) and
# the slots in flight (a sorted set of tickets by the expiry of their lease). A slots key lives
# as long as its last lease, however long another replica's `slot_lease_s` is.
_LEASES = """
local function keep_until_last_lease(sk)
  local last = redis.call('ZRANGE', sk, -1, -1, 'WITHSCORES')[2]
  if last then redis.call('PEXPIREAT', sk, math.floor(tonumber(last) / 1000) + 1) end
end
"""

_ACQUIRE = _LEASES + """
redis.replicate_commands()  -- writes after TIME (the default from Redis 5 on)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window, dayus = 60000000, 86400000000
local day = math.floor(now / dayus)
local day_left = (day + 1) * dayus - now
local ticket, n, lease_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
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
    redis.call('ZADD', sk, now + lease_ms * 1000, ticket)
    keep_until_last_lease(sk)
  end
  table.insert(out, left)
  table.insert(out, images_left)
end
table.insert(out, day_left)
return out
"""

# XX: a slot already released (or expired and dropped) is not taken again by a late renewal.
_RENEW = _LEASES + """
redis.replicate_commands()
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ticket, lease_ms = ARGV[1], tonumber(ARGV[2])
for _, sk in ipairs(KEYS) do
  redis.call('ZADD', sk, 'XX', now + lease_ms * 1000, ticket)
  keep_until_last_lease(sk)
end
return 1
"""

# KEYS[1] marks the ticket released: a release retried after a try that did run (its answer
# lost on the way back) must not give the images back twice.
_RELEASE = """
local ticket, refund, day, mark_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]),
                                     tonumber(ARGV[4])
if refund > 0 and not redis.call('SET', KEYS[1], 1, 'NX', 'PX', mark_ms) then refund = 0 end
for i = 0, (#KEYS - 1) / 2 - 1 do
  local ik, sk = KEYS[2 + 2 * i], KEYS[3 + 2 * i]
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
                 slot_lease_s: float = 30.0) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # One quick retry covers a pooled connection Redis has dropped; more would hold every
        # request up when Redis is down, and `on_unavailable` decides what happens then.
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1))
        self._prefix = key_prefix
        self._lease_ms = max(1, math.ceil(slot_lease_s * 1000))
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._renew = self._redis.register_script(_RENEW)
        self._release = self._redis.register_script(_RELEASE)

    def _keys(self, bucket: Bucket) -> tuple[str, str, str]:
        base = f"{self._prefix}{bucket.scope}:"
        return base + "requests", base + "images", base + "inflight"

    async def acquire(self, ticket: str, buckets: Sequence[Bucket],
                      images: int) -> Admitted | Refused:
        keys: list[str] = []
        args: list[str | int] = [ticket, images, self._lease_ms]
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

    async def renew(self, ticket: str, buckets: Sequence[Bucket]) -> None:
        keys = [self._keys(b)[2] for b in buckets if b.limits.max_concurrent is not None]
        if keys:
            await self._call(self._renew, keys, [ticket, self._lease_ms])

    async def release(self, ticket: str, buckets: Sequence[Bucket], refund: int,
                      day: int) -> None:
        keys = [f"{self._prefix}released:{ticket}",
                *(k for b in buckets for k in self._keys(b)[1:])]
        # Retries stop once the lease is over: the mark outlives them.
        await self._call(self._release, keys, [ticket, refund, day, 2 * self._lease_ms])

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
