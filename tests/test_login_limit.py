"""The review sign-in form's failure limit, over HTTP against the real app on uvicorn: per client
address and per key id, 429 with Retry-After and a clear message, logged without the key,
counted in /metrics. The limiter runs on a clock the test moves, so no test waits minutes."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from guard.core.config import load_config
from guard.review import LOGIN_FAILURES, LOGIN_WINDOW_S
from guard.support.errors import ConfigError
from guard.support.ratelimit import MemoryLimiter
from tests.conftest import AUDITOR_KEY, CLIENT_KEY
from tests.conftest import test_keys as configured_keys
from tests.servers import serve


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


NGINX = "127.0.0.3"  # the reverse proxy's address, as compose's nginx has its own


@pytest.fixture(params=[None, [NGINX]], ids=["default", "behind-nginx"])
def site(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[str, Clock]]:
    from proxy import create_app

    server = {"trusted_proxies": request.param} if request.param else {}
    config = load_config(None, {"keys": configured_keys(), "judge": {"kind": "marker"},
                                "audit": {"kind": "sqlite", "path": str(tmp_path / "a.db")},
                                "server": server})
    app = create_app(config)
    clock = Clock()
    app.state.login_limiter = MemoryLimiter(LOGIN_FAILURES, LOGIN_WINDOW_S, clock=clock)
    with serve(app) as base:
        yield base, clock


def browser(base: str, address: str = "127.0.0.1", forwarded: str | None = None
            ) -> httpx.Client:
    """A client connecting from `address` (any 127.x.y.z reaches the server on Linux), sending
    `X-Forwarded-For: forwarded` when given (as a reverse proxy in front would)."""
    return httpx.Client(base_url=base, timeout=30,
                        headers={"x-forwarded-for": forwarded} if forwarded else None,
                        transport=httpx.HTTPTransport(local_address=address))


def sign_in(client: httpx.Client, key: str) -> httpx.Response:
    form = client.get("/guard/login")
    token = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert token is not None
    return client.post("/guard/login", data={"key": key, "csrf": token[1]})


def throttled(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics").text
    return {m[1]: float(m[2]) for m in re.finditer(
        r'^guard_review_login_throttled_total\{scope="(\w+)"\} (\S+)$', text, re.M)}


def test_failed_sign_ins_from_one_address_are_limited(site, caplog) -> None:  # type: ignore[no-untyped-def]
    base, clock = site
    caplog.set_level(logging.INFO, logger="safeedit.review")
    with browser(base) as client:
        for i in range(LOGIN_FAILURES):
            clock.now = 1000.0 + (0 if i < 5 else 100)  # five failures, then five more later
            assert sign_in(client, f"sk-guess-{i}").status_code == 401

        clock.now = 1150.0
        r = sign_in(client, AUDITOR_KEY)  # even the right key: the address is over its limit
        assert r.status_code == 429 and "safeedit_review" not in r.cookies
        assert r.headers["retry-after"] == "150"  # when the first five leave the window
        assert "Too many failed sign-ins from here. Try again in 3 minutes." in r.text
        assert 'role="alert"' in r.text and 'name="key"' in r.text  # the form, with the message
        assert throttled(base) == {"address": 1.0}

        clock.now = 1000.0 + LOGIN_WINDOW_S + 1  # a sliding window: five failures still count
        r = sign_in(client, AUDITOR_KEY)
        assert r.status_code == 303 and r.cookies.get("safeedit_review")

    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "too many failures for address 127.0.0.1" in logged
    assert "sk-guess" not in logged and AUDITOR_KEY not in logged


def test_a_key_id_is_limited_across_addresses(site, caplog) -> None:  # type: ignore[no-untyped-def]
    base, _ = site
    caplog.set_level(logging.INFO, logger="safeedit.review")
    with browser(base, "127.0.0.1") as first:
        for _ in range(LOGIN_FAILURES):  # a client key has the wrong role for these pages
            r = sign_in(first, CLIENT_KEY)
            assert r.status_code == 403 and "cannot open the review pages" in r.text
        assert sign_in(first, "sk-guess").status_code == 429  # this address, whatever key

    with browser(base, "127.0.0.2") as second:
        r = sign_in(second, CLIENT_KEY)  # the same key from elsewhere: its key id is limited
        assert r.status_code == 429 and int(r.headers["retry-after"]) == int(LOGIN_WINDOW_S)
        assert "Too many failed sign-ins with this key." in r.text
        assert sign_in(second, "sk-guess").status_code == 401  # this address is not limited
        assert sign_in(second, AUDITOR_KEY).status_code == 303  # nor is another key

    assert throttled(base) == {"address": 1.0, "key": 1.0}
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "too many failures for key app" in logged
    assert CLIENT_KEY not in logged


@pytest.fixture
def behind_nginx(tmp_path: Path) -> Iterator[str]:
    from proxy import create_app

    config = load_config(None, {"keys": configured_keys(), "judge": {"kind": "marker"},
                                "audit": {"kind": "sqlite", "path": str(tmp_path / "a.db")},
                                "server": {"trusted_proxies": [NGINX]}})
    with serve(create_app(config)) as base:
        yield base


def test_behind_a_trusted_proxy_one_client_s_failures_lock_out_only_that_client(
        behind_nginx: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="safeedit.review")
    with browser(behind_nginx, NGINX, forwarded="203.0.113.7") as attacker:
        for i in range(LOGIN_FAILURES):
            assert sign_in(attacker, f"sk-guess-{i}").status_code == 401
        assert sign_in(attacker, AUDITOR_KEY).status_code == 429
    # Another auditor behind the same proxy is not locked out with them (a spoofed hop to the
    # left of the proxy's own entry changes nothing: the right-most untrusted address counts).
    with browser(behind_nginx, NGINX, forwarded="203.0.113.7, 198.51.100.9") as auditor:
        assert sign_in(auditor, AUDITOR_KEY).status_code == 303
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "too many failures for address 203.0.113.7" in logged


def test_a_forwarded_header_from_an_untrusted_peer_does_not_evade_the_limit(
        behind_nginx: str) -> None:
    for i in range(LOGIN_FAILURES):  # 127.0.0.1 is not the proxy here: its header is ignored
        with browser(behind_nginx, "127.0.0.1", forwarded=f"192.0.2.{i + 1}") as rotating:
            assert sign_in(rotating, f"sk-guess-{i}").status_code == 401
    with browser(behind_nginx, "127.0.0.1", forwarded="192.0.2.200") as rotating:
        assert sign_in(rotating, AUDITOR_KEY).status_code == 429
    with browser(behind_nginx, NGINX, forwarded="198.51.100.9") as other:
        assert sign_in(other, AUDITOR_KEY).status_code == 303  # the limit is that peer's


def test_trusted_proxies_must_be_addresses_or_networks() -> None:
    assert load_config(None, {"server": {"trusted_proxies": ["10.0.0.0/8", "fd00::1"]}}
                       ).server.trusted_proxies == ["10.0.0.0/8", "fd00::1/128"]
    with pytest.raises(ConfigError, match="not an IP address or CIDR"):
        load_config(None, {"server": {"trusted_proxies": ["nginx"]}})


def test_the_limiter_forgets_the_least_recent_key_beyond_max_keys() -> None:
    limiter = MemoryLimiter(1, 60, max_keys=3, clock=Clock())

    async def run() -> list[float]:
        for address in ("a", "b", "c", "d"):
            await limiter.hit(address)
        return [await limiter.retry_after(k) for k in ("a", "b", "c", "d")]

    assert asyncio.run(run()) == [0.0, 60.0, 60.0, 60.0]
