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
from guard.support.ratelimit import MemoryLimiter
from tests.conftest import AUDITOR_KEY, CLIENT_KEY
from tests.conftest import test_keys as configured_keys
from tests.servers import serve


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[str, Clock]]:
    from proxy import create_app

    config = load_config(None, {"keys": configured_keys(), "judge": {"kind": "marker"},
                                "audit": {"kind": "sqlite", "path": str(tmp_path / "a.db")}})
    app = create_app(config)
    clock = Clock()
    app.state.login_limiter = MemoryLimiter(LOGIN_FAILURES, LOGIN_WINDOW_S, clock=clock)
    with serve(app) as base:
        yield base, clock


def browser(base: str, address: str = "127.0.0.1") -> httpx.Client:
    """A client connecting from `address` (any 127.x.y.z reaches the server on Linux)."""
    return httpx.Client(base_url=base, timeout=30,
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


def test_the_limiter_forgets_the_least_recent_key_beyond_max_keys() -> None:
    limiter = MemoryLimiter(1, 60, max_keys=3, clock=Clock())

    async def run() -> list[float]:
        for address in ("a", "b", "c", "d"):
            await limiter.hit(address)
        return [await limiter.retry_after(k) for k in ("a", "b", "c", "d")]

    assert asyncio.run(run()) == [0.0, 60.0, 60.0, 60.0]
