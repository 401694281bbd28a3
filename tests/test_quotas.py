"""Limits per key and per tenant (guard/pipeline/quotas.py), through the real openai SDK against the proxy.

The behaviour tests run twice: with the counts in the proxy's process and in the real Redis at
127.0.0.1:6379. Replicas sharing Redis are two apps on uvicorn in this process, each with its
own state, and once two real `safeedit serve` processes. Each Redis test uses its own key prefix
and deletes only its own keys. Without Redis those tests skip with the reason; with
SAFEEDIT_REQUIRE_REDIS=1 (set by .ci/run) they fail instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
import pytest
import redis
import yaml
from starlette.requests import Request
from starlette.responses import Response

from guard.core.config import Limits, hash_key, load_config
from guard.pipeline.quotas import (
    Admitted,
    Bucket,
    MemoryQuotas,
    Quotas,
    QuotaStore,
    Refused,
    Ticket,
    duration,
)
from guard.pipeline.quotas_redis import RedisQuotas
from guard.support.errors import RateLimited, Unavailable
from guard.support.telemetry import Metrics
from tests.conftest import ADMIN_KEY, CLIENT_KEY, ProxyFactory, test_keys
from tests.fake_backend import FakeBackend
from tests.servers import free_port, serve
from tests.services import REDIS_URL, require_redis
from tests.test_serve_cli import safeedit_serve

ROOT = Path(__file__).resolve().parent.parent
SECOND_KEY, GLOBEX_KEY = "sk-client-second", "sk-client-globex"


def keys(**limits: dict[str, Any]) -> list[dict[str, Any]]:
    """The test keys plus a second client of tenant acme and one of globex; `limits` by key id."""
    all_keys = [*test_keys(),
                {"id": "app2", "hash": hash_key(SECOND_KEY), "role": "client", "tenant": "acme"},
                {"id": "gx", "hash": hash_key(GLOBEX_KEY), "role": "client", "tenant": "globex"}]
    for key in all_keys:
        if key["id"] in limits:
            key["limits"] = limits[key["id"]]
    return all_keys


@dataclass
class GatedBackend(FakeBackend):
    """The fake image server, holding each generation until the test opens the gate."""

    gate: threading.Event = field(default_factory=threading.Event)
    arrived: int = 0

    def __post_init__(self) -> None:
        self.gate.set()

    async def _generate(self, request: Request) -> Response:
        self.arrived += 1
        await asyncio.to_thread(self.gate.wait)
        return await super()._generate(request)


@pytest.fixture
def fake_backend() -> Iterator[tuple[GatedBackend, str]]:
    backend = GatedBackend()
    with serve(backend.app()) as url:
        yield backend, url + "/v1"


@pytest.fixture(scope="module")
def redis_url() -> str:
    return require_redis(REDIS_URL)


@pytest.fixture
def redis_section(redis_url: str) -> Iterator[dict[str, Any]]:
    """`limits:` options for the shared Redis under a prefix of this test's own."""
    prefix = f"safeedit-test:{uuid.uuid4().hex[:12]}:"
    yield {"redis_url": redis_url, "key_prefix": prefix}
    with redis.Redis.from_url(redis_url) as client:
        mine = list(client.scan_iter(match=prefix + "*"))
        if mine:
            client.delete(*mine)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def store(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The `limits:` options naming where counts live: this process, or the shared Redis."""
    if request.param == "memory":
        return {}
    return dict(request.getfixturevalue("redis_section"))


def replicas(proxy: ProxyFactory, tmp_path: Path, count: int, **config: Any) -> list[str]:
    """`count` apps with the same config, each with its own state and audit database."""
    return [proxy(**config, audit={"kind": "sqlite", "path": str(tmp_path / f"audit{i}.db")})
            for i in range(count)]


def sdk(base: str, key: str = CLIENT_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)


def generate(base: str, key: str = CLIENT_KEY, **kw: Any) -> Any:
    """A generation through the SDK; the raw response (headers, then `.parse()`)."""
    return sdk(base, key).images.with_raw_response.generate(prompt="a bowl of fruit",
                                                            response_format="b64_json", **kw)


def refused(base: str, key: str = CLIENT_KEY, **kw: Any) -> openai.RateLimitError:
    with pytest.raises(openai.RateLimitError) as info:
        generate(base, key, **kw)
    return info.value


def said(error: openai.APIStatusError) -> str:
    """The `message` of the error body (the SDK's own message prefixes the status)."""
    assert isinstance(error.body, dict)
    return str(error.body["message"])


def trace(base: str, trace_id: str) -> dict[str, Any]:
    r = httpx.get(f"{base}/v1/guard/traces/{trace_id}",
                  headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def metric(base: str, name: str) -> dict[str, float]:
    """A metric's samples as {'label="value",...': value}."""
    text = httpx.get(base + "/metrics").text
    return {labels: float(value) for labels, value in
            re.findall(rf"^{name}{{(.*)}} (\S+)$", text, re.MULTILINE)}


def ratelimit_headers(headers: httpx.Headers) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.startswith("x-ratelimit-")}


# --- limits through the proxy, counts in this process and in Redis --------------------------

def test_requests_per_minute_gives_openai_429_with_headers_and_a_trace(
        proxy: ProxyFactory, store: dict[str, Any],
        fake_backend: tuple[GatedBackend, str]) -> None:
    base = proxy(keys=keys(), limits={**store, "requests_per_minute": 2})
    first, second = generate(base), generate(base)
    assert first.parse().data[0].b64_json and second.parse().data[0].b64_json
    assert ratelimit_headers(first.headers) == {
        "x-ratelimit-limit-requests": "2", "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "1m0s"}
    assert second.headers["x-ratelimit-remaining-requests"] == "0"

    error = refused(base)
    assert error.status_code == 429 and error.code == "rate_limit_exceeded"
    assert error.type == "requests" and error.param is None
    assert said(error).startswith("Rate limit reached for key 'app' on requests per minute "
                                    "(RPM): Limit 2, Used 2, Requested 1. Please try again in ")
    headers = error.response.headers
    assert 1 <= int(headers["retry-after"]) <= 60
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert len(fake_backend[0].requests) == 2  # the refused request never reached the backend

    refusal = trace(base, headers["x-guard-trace-id"])
    assert refusal["status"] == 429 and refusal["decision"] == "failed"  # not the policy's
    assert refusal["request"]["prompt"] == "a bowl of fruit" and not refusal["rounds"]
    assert refusal["key_id"] == "app" and refusal["tenant"] == "acme"
    assert refusal["error"]["code"] == "rate_limit_exceeded"
    assert metric(base, "guard_quota_rejections_total") == {
        'limit="requests_per_minute",scope="key"': 1.0}
    assert generate(base, GLOBEX_KEY).parse().data  # every key has its own count


def test_a_tenant_limit_is_shared_by_its_keys_and_key_defaults_apply_per_key(
        proxy: ProxyFactory, store: dict[str, Any]) -> None:
    # Every key: 1 a minute, but app2 opts out (null); tenant acme: 3 a minute for all its keys.
    base = proxy(keys=keys(app2={"requests_per_minute": None}),
                 tenants={"acme": {"limits": {"requests_per_minute": 3}}},
                 limits={**store, "requests_per_minute": 1})
    assert generate(base).headers["x-ratelimit-remaining-requests"] == "0"  # app's own: 1 - 1
    assert said(refused(base)).startswith("Rate limit reached for key 'app'")
    # app2 has no key limit, so the tenant's is the tightest it sees: 3 - 1 (app) - 1
    assert generate(base, SECOND_KEY).headers["x-ratelimit-remaining-requests"] == "1"
    assert generate(base, SECOND_KEY).headers["x-ratelimit-remaining-requests"] == "0"
    error = refused(base, SECOND_KEY)
    assert said(error).startswith("Rate limit reached for tenant 'acme' on requests per "
                                    "minute (RPM): Limit 3, Used 3")
    assert generate(base, GLOBEX_KEY).parse().data  # another tenant: only its key's limit
    assert metric(base, "guard_quota_rejections_total") == {
        'limit="requests_per_minute",scope="key"': 1.0,
        'limit="requests_per_minute",scope="tenant"': 1.0}


def test_images_per_day_counts_n_and_gives_back_what_a_failed_request_asked(
        proxy: ProxyFactory, store: dict[str, Any],
        fake_backend: tuple[GatedBackend, str]) -> None:
    backend = fake_backend[0]
    base = proxy(keys=keys(app={"images_per_day": 5}), limits=store)
    ok = generate(base, n=3)
    assert len(ok.parse().data) == 3
    assert ok.headers["x-ratelimit-limit-images"] == "5"
    assert ok.headers["x-ratelimit-remaining-images"] == "2"
    assert "x-ratelimit-limit-requests" not in ok.headers  # no requests limit set

    error = refused(base, n=3)
    assert error.type == "images"
    assert "on images per day (IPD): Limit 5, Used 3, Requested 3." in said(error)
    retry = int(error.response.headers["retry-after"])
    assert 0 < retry <= 86_400 and retry == pytest.approx(86_400 - time.time() % 86_400, abs=5)

    backend.mode = "error500"  # the backend fails: the client got nothing, its 2 images return
    with pytest.raises(openai.APIStatusError) as failed:
        generate(base, n=2)
    assert failed.value.status_code == 502
    backend.mode = "ok"
    assert generate(base, n=2).headers["x-ratelimit-remaining-images"] == "0"
    assert refused(base).type == "images"
    assert metric(base, "guard_quota_rejections_total") == {
        'limit="images_per_day",scope="key"': 2.0}


def test_a_request_asking_more_images_than_a_day_allows_is_told_so(
        proxy: ProxyFactory) -> None:
    base = proxy(keys=keys(), limits={"images_per_day": 2})
    error = refused(base, n=3)
    assert said(error) == ("This request asks for 3 images, more than the key 'app' may "
                             "have in a day (2).")


def test_max_concurrent_refuses_while_a_slow_request_holds_the_slot_json_or_stream(
        proxy: ProxyFactory, store: dict[str, Any], tmp_path: Path,
        fake_backend: tuple[GatedBackend, str]) -> None:
    backend = fake_backend[0]
    # With Redis, two replicas: the slot held on one refuses the request on the other.
    bases = replicas(proxy, tmp_path, 2 if store else 1, keys=keys(),
                     limits={**store, "max_concurrent": 1, "requests_per_minute": 100})
    first, second = bases[0], bases[-1]
    backend.gate.clear()
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(generate, first)
        wait_until(lambda: backend.arrived == 1)
        error = refused(second)  # with Redis, on the other replica
        assert error.type == "requests" and error.response.headers["retry-after"] == "1"
        assert "on concurrent requests: Limit 1, Used 1" in said(error)
        backend.gate.set()
        assert slow.result(timeout=30).parse().data
    # the slot is back; a stream holds and frees it the same way, with the same headers
    with httpx.stream("POST", f"{second}/v1/images/generations", timeout=30,
                      json={"prompt": "a bowl of fruit", "stream": True},
                      headers={"authorization": f"Bearer {CLIENT_KEY}"}) as events:
        assert events.status_code == 200
        assert events.headers["x-ratelimit-limit-requests"] == "100"
        assert "image_generation.completed" in events.read().decode()
    assert generate(first).parse().data
    assert sum(metric(b, "guard_quota_rejections_total").get(
        'limit="max_concurrent",scope="key"', 0) for b in bases) == 1.0


def wait_until(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# --- replicas sharing one Redis ------------------------------------------------------------

@pytest.mark.redis
def test_two_apps_sharing_redis_enforce_one_limit_together(
        proxy: ProxyFactory, tmp_path: Path, redis_section: dict[str, Any]) -> None:
    one, two = replicas(proxy, tmp_path, 2, keys=keys(),
                        tenants={"acme": {"limits": {"images_per_day": 5}}},
                        limits={**redis_section, "requests_per_minute": 3})
    assert generate(one).headers["x-ratelimit-remaining-requests"] == "2"
    assert generate(two).headers["x-ratelimit-remaining-requests"] == "1"
    assert generate(one, SECOND_KEY, n=2).headers["x-ratelimit-remaining-images"] == "1"
    images = refused(two, SECOND_KEY, n=2)  # the tenant's day, counted on both
    assert images.type == "images" and "Limit 5, Used 4, Requested 2." in said(images)
    last = generate(two)
    assert last.headers["x-ratelimit-remaining-requests"] == "0"
    assert last.headers["x-ratelimit-remaining-images"] == "0"
    refused_on_one = refused(one)
    assert said(refused_on_one).startswith("Rate limit reached for key 'app' on requests "
                                             "per minute (RPM): Limit 3, Used 3")


@pytest.mark.redis
@pytest.mark.slow  # two processes start one after the other: ~20 s on two idle cores
def test_two_safeedit_serve_processes_share_one_limit(tmp_path: Path,
                                                      redis_section: dict[str, Any]) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "keys": keys(), "guard": {"enabled": False},
        "limits": {**redis_section, "requests_per_minute": 2}}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with safeedit_serve(tmp_path / "a", "--config", str(config), env=env) as (_, one), \
            safeedit_serve(tmp_path / "b", "--config", str(config), env=env) as (_, two):
        assert generate(one).headers["x-ratelimit-remaining-requests"] == "1"
        assert generate(two).headers["x-ratelimit-remaining-requests"] == "0"
        error = refused(one)
        assert error.code == "rate_limit_exceeded" and int(error.response.headers["retry-after"])
        assert refused(two).status_code == 429
        ready = httpx.get(two + "/readyz").json()
        assert ready["checks"]["limits"] is True


# --- Redis unreachable ------------------------------------------------------------------------

def test_redis_down_fails_closed_with_a_traced_503_and_readyz_false(proxy: ProxyFactory) -> None:
    base = proxy(keys=keys(), limits={"redis_url": f"redis://127.0.0.1:{free_port()}/0",
                                      "timeout_s": 0.2, "requests_per_minute": 5})
    with pytest.raises(openai.InternalServerError) as info:
        generate(base)
    error = info.value
    assert error.status_code == 503 and error.code == "limits_unavailable"
    assert trace(base, error.response.headers["x-guard-trace-id"])["status"] == 503
    ready = httpx.get(base + "/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["limits"] is False
    assert metric(base, "guard_quota_unavailable_total") == {'action="refused"': 1.0}


def test_redis_down_fails_open_when_configured_and_counts_it(proxy: ProxyFactory) -> None:
    base = proxy(keys=keys(), limits={"redis_url": f"redis://127.0.0.1:{free_port()}/0",
                                      "timeout_s": 0.2, "on_unavailable": "open",
                                      "requests_per_minute": 1})
    for _ in range(2):  # over the limit, but nothing counts without Redis
        served = generate(base)
        assert served.parse().data and "x-ratelimit-limit-requests" not in served.headers
    ready = httpx.get(base + "/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["limits"] is True
    assert metric(base, "guard_quota_unavailable_total") == {'action="served"': 2.0}


def test_without_limits_there_is_no_limits_check_and_no_headers(proxy: ProxyFactory) -> None:
    base = proxy(keys=keys(), tenants={"acme": {"policy": "default"}})
    assert not ratelimit_headers(generate(base).headers)
    assert "limits" not in httpx.get(base + "/readyz").json()["checks"]


# --- the in-process store on a clock the test moves -----------------------------------------

class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_the_window_slides_the_day_turns_and_a_lost_slot_expires() -> None:
    day = 20_000 * 86_400.0
    clock = Clock(day + 86_400 - 30)  # 30 s before midnight UTC
    store = MemoryQuotas(slot_lease_s=100, clock=clock)
    bucket = (Bucket("key:k", Limits(requests_per_minute=2, images_per_day=3, max_concurrent=1)),)

    async def run() -> None:
        assert not isinstance(await store.acquire("a", bucket, 3), Refused)
        over = await store.acquire("b", bucket, 1)
        assert isinstance(over, Refused) and over.limit == "images_per_day"
        assert over.retry_after_s == 30 and duration(over.retry_after_s) == "30s"
        clock.now += 31  # a new day; "a" never released its slot
        held = await store.acquire("b", bucket, 1)
        assert isinstance(held, Refused) and held.limit == "max_concurrent"
        clock.now += 70  # a's slot has expired, and a has left the window
        second = await store.acquire("c", bucket, 1)
        assert not isinstance(second, Refused) and second.images[0].remaining == 2
        third = await store.acquire("d", bucket, 1)
        assert isinstance(third, Refused) and third.limit == "max_concurrent"
        await store.release("c", bucket, refund=1, day=second.day)
        fourth = await store.acquire("d", bucket, 1)
        assert not isinstance(fourth, Refused) and fourth.images[0].remaining == 2
        assert fourth.requests[0].remaining == 0  # c and d inside the last minute
        await store.release("d", bucket, refund=0, day=fourth.day)
        clock.now += 10
        full = await store.acquire("e", bucket, 1)
        assert isinstance(full, Refused) and full.limit == "requests_per_minute"
        assert full.retry_after_s == pytest.approx(50)  # when c leaves the window

    asyncio.run(run())


@pytest.mark.parametrize(("seconds", "text"), [
    (0.0172, "18ms"), (1, "1s"), (8.64, "8.64s"), (60, "1m0s"), (360, "6m0s"),
    (3723.5, "1h2m3.5s"), (86_400, "24h0m0s")])
def test_durations_read_like_openais_reset_headers(seconds: float, text: str) -> None:
    assert duration(seconds) == text


# --- slots are leases: renewed while a request runs, free again after a store's blip ----------

LEASE_S = 1.0  # short, so that a lease runs out within the test


class Switch:
    """A TCP relay to Redis the test can cut: while cut, the connections through it are closed
    and new ones are dropped as they come, as when Redis restarts or the network fails."""

    def __init__(self, redis_url: str) -> None:
        target = urlsplit(redis_url)
        self._target = (target.hostname or "127.0.0.1", target.port or 6379)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self._listener.getsockname()[1]}{target.path}"
        self._cut = threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            if self._cut.is_set():
                client.close()
                continue
            upstream = socket.create_connection(self._target)
            with self._lock:
                self._open |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        self._drop([source, sink])

    def _drop(self, sockets: Sequence[socket.socket]) -> None:
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the pump blocked in recv()
            except OSError:
                pass
            sock.close()
            with self._lock:
                self._open.discard(sock)

    def cut(self) -> None:
        self._cut.set()
        with self._lock:
            live = list(self._open)
        self._drop(live)

    def mend(self) -> None:
        self._cut.clear()

    def close(self) -> None:
        self.cut()
        self._listener.close()


@pytest.fixture
def switch(redis_url: str) -> Iterator[Switch]:
    relay = Switch(redis_url)
    yield relay
    relay.close()


class SwitchedMemory(MemoryQuotas):
    """The in-process store with a switch: while cut, every call fails as Redis's would."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.is_cut = False

    def cut(self) -> None:
        self.is_cut = True

    def mend(self) -> None:
        self.is_cut = False

    def _check(self) -> None:
        if self.is_cut:
            raise Unavailable("The request limits cannot be checked.", code="limits_unavailable")

    async def acquire(self, ticket: str, buckets: Sequence[Bucket],
                      images: int) -> Admitted | Refused:
        self._check()
        return await super().acquire(ticket, buckets, images)

    async def renew(self, ticket: str, buckets: Sequence[Bucket]) -> None:
        self._check()
        await super().renew(ticket, buckets)

    async def release(self, ticket: str, buckets: Sequence[Bucket], refund: int,
                      day: int) -> None:
        self._check()
        await super().release(ticket, buckets, refund, day)


@dataclass
class Blip:
    """A store of either kind and the switch that takes it away and brings it back."""

    store: QuotaStore
    cut: Callable[[], None]
    mend: Callable[[], None]


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def blip(request: pytest.FixtureRequest) -> Blip:
    if request.param == "memory":
        memory = SwitchedMemory(slot_lease_s=LEASE_S)
        return Blip(memory, memory.cut, memory.mend)
    section = request.getfixturevalue("redis_section")
    relay: Switch = request.getfixturevalue("switch")
    return Blip(RedisQuotas(relay.url, key_prefix=section["key_prefix"], timeout_s=0.2,
                            slot_lease_s=LEASE_S), relay.cut, relay.mend)


async def until_admitted(quotas: Quotas, ticket: str, images: int, within_s: float) -> Ticket:
    """Admit `ticket` as soon as the limits let it in, failing after `within_s`."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return await quotas.admit(ticket, "app", "acme", images)
        except RateLimited:
            assert time.monotonic() < deadline, f"{ticket} still refused after {within_s}s"
            await asyncio.sleep(0.01)


def test_a_release_that_fails_is_retried_and_an_unreleased_slot_lapses_with_its_lease(
        blip: Blip) -> None:
    config = load_config(None, {"keys": keys(app={"max_concurrent": 1, "images_per_day": 2}),
                                "limits": {"slot_lease_s": LEASE_S}})

    async def run() -> None:
        quotas = Quotas(config, Metrics(), blip.store)
        first = await quotas.admit("first", "app", "acme", 1)
        blip.cut()
        started = time.monotonic()
        await quotas.release(first, 502)  # fails, and neither raises nor holds the answer up
        assert time.monotonic() - started < 1.0
        blip.mend()
        # Only the retried release gives the image back (a lapsed lease frees the slot alone).
        second = await until_admitted(quotas, "second", 2, within_s=LEASE_S + 1)
        await quotas.release(second, 200)

        # A replica that died mid-request: its slot, never renewed, is free again after a lease.
        assert isinstance(await blip.store.acquire("lost", second.buckets, 0), Admitted)
        lost_at = time.monotonic()
        with pytest.raises(RateLimited):
            await quotas.admit("third", "app", "acme", 0)
        third = await until_admitted(quotas, "third", 0, within_s=LEASE_S + 1)
        assert time.monotonic() - lost_at >= LEASE_S * 0.9

        blip.cut()  # the third's release fails and is retried; shutting down ends the retries
        await quotas.release(third, 200)
        assert len(asyncio.all_tasks()) > 1
        await quotas.aclose()
        assert asyncio.all_tasks() == {asyncio.current_task()}

    asyncio.run(run())


@pytest.mark.redis
def test_a_release_retried_after_it_ran_gives_the_images_back_once(
        redis_section: dict[str, Any]) -> None:
    store = RedisQuotas(redis_section["redis_url"], key_prefix=redis_section["key_prefix"])
    bucket = (Bucket("key:k", Limits(images_per_day=3)),)

    async def run() -> None:
        first = await store.acquire("first", bucket, 2)
        assert isinstance(first, Admitted)
        assert isinstance(await store.acquire("second", bucket, 1), Admitted)
        for _ in range(2):  # the first try ran, but its answer was lost on the way back
            await store.release("first", bucket, refund=2, day=first.day)
        assert isinstance(await store.acquire("third", bucket, 2), Admitted)
        over = await store.acquire("fourth", bucket, 1)
        assert isinstance(over, Refused) and over.used == 3
        await store.aclose()

    asyncio.run(run())


def test_a_request_longer_than_its_slot_lease_keeps_its_slot(
        proxy: ProxyFactory, store: dict[str, Any],
        fake_backend: tuple[GatedBackend, str]) -> None:
    backend = fake_backend[0]
    base = proxy(keys=keys(), limits={**store, "max_concurrent": 1, "slot_lease_s": LEASE_S})
    backend.gate.clear()
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(generate, base)
        wait_until(lambda: backend.arrived == 1)
        started = time.monotonic()
        while time.monotonic() - started < 3 * LEASE_S:  # three leases, each renewed in time
            assert "on concurrent requests: Limit 1, Used 1" in said(refused(base))
            time.sleep(LEASE_S / 4)
        backend.gate.set()
        assert slow.result(timeout=30).parse().data
    assert generate(base).parse().data


def refused_with(error: type[openai.APIStatusError], base: str) -> openai.APIStatusError:
    with pytest.raises(error) as info:
        generate(base)
    return info.value


@pytest.mark.redis
def test_slots_and_images_of_requests_ending_while_redis_is_away_come_back(
        proxy: ProxyFactory, redis_section: dict[str, Any], switch: Switch,
        fake_backend: tuple[GatedBackend, str]) -> None:
    backend = fake_backend[0]
    base = proxy(keys=keys(app={"images_per_day": 4}),
                 backend_options={"retry": {"attempts": 1}},
                 limits={**redis_section, "redis_url": switch.url, "timeout_s": 0.2,
                         "max_concurrent": 3, "slot_lease_s": LEASE_S})
    backend.gate.clear()
    backend.mode = "error500"  # the client gets nothing: its images are given back
    with ThreadPoolExecutor(3) as pool:
        calls = [pool.submit(refused_with, openai.APIStatusError, base) for _ in range(3)]
        wait_until(lambda: backend.arrived == 3)
        assert "on concurrent requests: Limit 3, Used 3" in said(refused(base))
        switch.cut()  # Redis goes away as the three end
        backend.gate.set()
        assert [call.result(timeout=30).status_code for call in calls] == [502] * 3
    switch.mend()

    prefix = redis_section["key_prefix"]
    with redis.Redis.from_url(redis_section["redis_url"]) as client:
        wait_until(lambda: client.zcard(f"{prefix}key:app:inflight") == 0
                   and int(client.hget(f"{prefix}key:app:images", "used") or 0) == 0,
                   timeout_s=LEASE_S + 1)
    # The three slots and the three images are back: three more requests run at once.
    backend.mode, backend.arrived = "ok", 0
    backend.gate.clear()
    with ThreadPoolExecutor(3) as pool:
        again = [pool.submit(generate, base) for _ in range(3)]
        wait_until(lambda: backend.arrived == 3)
        backend.gate.set()
        assert all(call.result(timeout=30).parse().data for call in again)


def test_the_old_concurrency_ttl_s_is_read_as_slot_lease_s_with_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "safeedit.config"):
        config = load_config(None, {"limits": {"concurrency_ttl_s": 45}})
    assert config.limits.slot_lease_s == 45
    assert "limits.concurrency_ttl_s is deprecated" in caplog.text
    assert load_config(None, {}).limits.slot_lease_s == 30
