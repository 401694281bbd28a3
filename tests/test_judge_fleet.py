"""A fleet of real local judge servers behind one `remote` judge (guard.judges.fleet): a
micro-batch stays on one server, load goes where fewest requests are in flight, a failing server
leaves the rotation without the client noticing and comes back when its health check passes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse

from guard.judges.remote import RemoteJudge
from guard.plugins import build_judge
from tests.conftest import CLIENT_KEY, write_policy
from tests.judge_server import KEY, POLICY, JudgeServer, png
from tests.servers import free_port, serve
from tests.test_remote_judge import item


@dataclass
class Replica(JudgeServer):
    """A judge server that can go down as a whole: chat and health check both answer 503."""

    down: bool = False

    async def models(self, request: Request) -> JSONResponse:
        if self.down:
            return JSONResponse({"error": {"message": "down"}}, 503)
        return await super().models(request)

    async def chat(self, request: Request) -> JSONResponse:
        if self.down:
            self.requests.append({})
            return JSONResponse({"error": {"message": "down"}}, 503)
        return await super().chat(request)


@pytest.fixture
def replicas(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[Replica, str]]]:
    monkeypatch.setenv("JUDGE_KEY", KEY)
    with ExitStack() as stack:
        servers = [Replica() for _ in range(3)]
        yield [(s, stack.enter_context(serve(s.app())) + "/v1") for s in servers]


def fleet_judge(urls: list[str], **options: Any) -> RemoteJudge:
    judge = build_judge({"kind": "remote", "api_bases": urls, "model": "judge",
                         "api_key_env": "JUDGE_KEY", "backoff_s": 0.01, "profile": "ipr",
                         "health_interval_s": 0, **options})
    assert isinstance(judge, RemoteJudge)
    return judge


async def test_a_micro_batch_goes_to_one_server_and_batches_take_turns(replicas) -> None:  # type: ignore[no-untyped-def]
    judge = fleet_judge([url for _, url in replicas])
    try:
        for _ in range(3):
            await judge.judge([item("a cat", png(0)) for _ in range(4)], POLICY)
    finally:
        await judge.aclose()
    # Each batch of four landed whole on one server, and the idle servers took turns.
    assert sorted(len(s.requests) for s, _ in replicas) == [4, 4, 4]


async def test_load_goes_to_the_server_with_fewest_requests_in_flight(replicas) -> None:  # type: ignore[no-untyped-def]
    (slow, _), (fast, _), _ = replicas
    slow.delay_s, fast.delay_s = 0.6, 0.01
    judge = fleet_judge([replicas[0][1], replicas[1][1]])

    async def later(i: int) -> None:
        await asyncio.sleep(0.03 * i)
        await judge.judge([item("a cat", png(0))], POLICY)

    try:
        await asyncio.gather(*(later(i) for i in range(20)))
    finally:
        await judge.aclose()
    # Turn-taking alone would split 10/10; the slow server holds its requests longer, so the
    # fast one is the less busy almost every time.
    assert len(slow.requests) + len(fast.requests) == 20
    assert len(fast.requests) >= 3 * len(slow.requests)


async def test_a_failing_server_leaves_the_rotation_unnoticed_and_returns_when_healthy(replicas) -> None:  # type: ignore[no-untyped-def]
    (bad, _), (good, _), _ = replicas
    bad.down = True
    judge = fleet_judge([replicas[0][1], replicas[1][1]], eject_after=2, eject_s=600)
    try:
        verdicts = []
        for _ in range(6):
            verdicts += await judge.judge([item("a cat", png(0))], POLICY)
        # Every verdict came from the healthy server; the failing one was tried until ejected.
        assert all(v.details["server"] == replicas[1][1] for v in verdicts)
        assert len(bad.requests) == 2
        assert judge.fleet is not None
        assert [s["in_rotation"] for s in judge.fleet.status()] == [False, True]
        for _ in range(4):
            await judge.judge([item("a cat", png(0))], POLICY)
        assert len(bad.requests) == 2  # out of rotation: not tried any more

        bad.down = False
        assert await judge.ready()  # a health check: the server answers again, so it returns
        assert [s["in_rotation"] for s in judge.fleet.status()] == [True, True]
        for _ in range(4):
            await judge.judge([item("a cat", png(0))], POLICY)
        assert len(bad.requests) > 2
    finally:
        await judge.aclose()


async def test_background_health_checks_eject_a_server_before_a_request_meets_it(replicas) -> None:  # type: ignore[no-untyped-def]
    (gone, _), (good, _), _ = replicas
    judge = fleet_judge([replicas[0][1], replicas[1][1]], health_interval_s=0.05)
    await judge.start()
    try:
        gone.down = True
        assert judge.fleet is not None
        deadline = time.monotonic() + 10
        while judge.fleet.status()[0]["in_rotation"]:  # until a health check has ejected it
            assert time.monotonic() < deadline, "the health checks never ejected the server"
            await asyncio.sleep(0.01)
        for _ in range(4):
            await judge.judge([item("a cat", png(0))], POLICY)
        assert gone.requests == [] and len(good.requests) == 4
    finally:
        await judge.aclose()


def test_the_proxy_judges_through_a_fleet_with_one_server_unreachable(proxy, tmp_path, replicas) -> None:  # type: ignore[no-untyped-def]
    (good, url), *_ = replicas
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    write_policy(tmp_path, "id: fleet\nversion: 1\nextends: default\n")
    base = proxy(policy="fleet", judge={
        "kind": "remote", "api_bases": [dead, url], "model": "judge", "api_key_env": "JUDGE_KEY",
        "profile": "ipr", "backoff_s": 0.01, "eject_after": 1, "health_interval_s": 0})
    headers = {"authorization": f"Bearer {CLIENT_KEY}"}
    for _ in range(3):
        r = httpx.post(f"{base}/v1/images/generations", json={"prompt": "a lighthouse"},
                       headers=headers, timeout=30)
        assert r.status_code == 200, r.text
    assert len(good.requests) >= 3
    ready = httpx.get(f"{base}/readyz").json()
    assert ready["checks"]["judge"] is True  # one server up is enough
