"""Hot reload through the real proxy: a changed policy file goes live without a restart, a broken
one never does, and no request ever runs under a half-loaded policy."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.conftest import ADMIN_KEY, CLIENT_KEY
from tests.fake_backend import png
from tests.servers import serve

SAFE = "a bowl of fruit on a wooden table"
BRAWL = "a bar brawl at night"


def live(version: int, action: str = "edit", threshold: float = 0.6) -> str:
    return (f"id: live\nversion: {version}\ncategories:\n"
            f"  violence: {{threshold: {threshold}, action: {action}}}\n"
            "  hate: {threshold: 0.5, action: refuse}\n"
            "terms:\n  violence: {strong: [brawl], rewrites: {brawl: dance}}\n")


def ref(text: str) -> tuple[int, str]:
    version = int(text.split("version: ")[1].split("\n")[0])
    return version, hashlib.sha256(text.encode()).hexdigest()


def post(base: str, prompt: str = SAFE, key: str = CLIENT_KEY) -> httpx.Response:
    return httpx.post(f"{base}/v1/images/generations", json={"prompt": prompt},
                      headers={"authorization": f"Bearer {key}"}, timeout=30)


def reload(base: str, key: str = ADMIN_KEY) -> httpx.Response:
    return httpx.post(f"{base}/v1/guard/policies/reload",
                      headers={"authorization": f"Bearer {key}"}, timeout=30)


def trace_policy(base: str, response: httpx.Response) -> tuple[int, str]:
    r = httpx.get(f"{base}/v1/guard/traces/{response.headers['x-guard-trace-id']}",
                  headers={"authorization": f"Bearer {ADMIN_KEY}"})
    return r.json()["policy"]["version"], r.json()["policy"]["sha256"]


def test_admin_reload_puts_a_new_version_live_and_says_what_changed(
        proxy, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "live.yaml").write_text(live(1))
    base = proxy(policy="live", policy_reload_s=0)
    assert post(base, BRAWL).json()["data"][0]["revised_prompt"] == "a bar dance at night"

    (tmp_path / "live.yaml").write_text(live(2, action="refuse"))
    assert post(base, BRAWL).status_code == 200  # no watcher: nothing changes by itself
    denied = reload(base, key=CLIENT_KEY)
    assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"
    r = reload(base)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["changed"] == [{
        "id": "live", "change": "updated",
        "from": {"id": "live", "version": 1, "sha256": ref(live(1))[1]},
        "to": {"id": "live", "version": 2, "sha256": ref(live(2, action="refuse"))[1]},
        "differences": ["[neutral] version: 1 -> 2",
                        "[stricter] violence: edited -> refused at score 0.60 or more"]}]
    assert {"id": "live", "version": 2, "sha256": ref(live(2, "refuse"))[1]} in body["policies"]

    refused = post(base, BRAWL)
    assert refused.json()["error"]["code"] == "content_policy_violation"
    assert trace_policy(base, refused) == ref(live(2, action="refuse"))
    assert reload(base).json()["changed"] == []  # nothing new on disk


def test_a_broken_file_is_rejected_with_its_line_and_the_running_version_kept(
        proxy, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "live.yaml").write_text(live(1))
    base = proxy(policy="live", policy_reload_s=0.05)
    (tmp_path / "live.yaml").write_text(live(2).replace("action: edit", "acton: edit"))
    r = reload(base)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "invalid_policy" and error["type"] == "invalid_request_error"
    assert error["problems"] == [{
        "file": str(tmp_path / "live.yaml"), "line": 4, "column": 30, "severity": "error",
        "field": "categories.violence.acton",
        "message": "unknown key 'acton' (did you mean 'action'?); allowed keys: threshold, "
                   "action, description, unassessed"}]
    # The error is logged; the watcher, seeing the same broken file, keeps version 1 running.
    deadline = time.monotonic() + 20
    while "policy reload rejected, running policies kept" not in caplog.text:
        assert time.monotonic() < deadline, "the watcher never logged the rejected file"
        time.sleep(0.05)
    still = post(base, BRAWL)
    assert still.status_code == 200 and trace_policy(base, still) == ref(live(1))

    # Fixed on disk: the watcher puts it live by itself.
    (tmp_path / "live.yaml").write_text(live(3, action="refuse"))
    assert wait_for_version(base, 3) == ref(live(3, action="refuse"))


def test_removing_a_policy_the_config_uses_is_rejected(
        proxy, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "live.yaml").write_text(live(1))
    base = proxy(policy="live", policy_reload_s=0)
    (tmp_path / "live.yaml").unlink()
    r = reload(base)
    assert r.status_code == 400
    assert r.json()["error"]["problems"][0]["field"] == "policy"
    assert "uses policy 'live', which the policy files no longer define" in r.text
    assert post(base).status_code == 200


def wait_for_version(base: str, version: int, timeout: float = 5.0) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    while True:
        r = post(base)
        got = trace_policy(base, r)
        if got[0] == version or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


class Gate:
    """An image backend that holds each request until the test lets it go."""

    def __init__(self) -> None:
        self.received = threading.Event()
        self.release = threading.Event()

    def app(self) -> Starlette:
        async def generate(request: Request) -> JSONResponse:
            await request.json()
            self.received.set()
            await asyncio.to_thread(self.release.wait, 10)
            return JSONResponse({"created": 1700000000, "data": [
                {"b64_json": base64.b64encode(png("blue")).decode()}]})

        return Starlette(routes=[Route("/v1/images/generations", generate, methods=["POST"])])


def test_a_request_in_flight_finishes_under_the_version_it_started_with(
        proxy, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "live.yaml").write_text(live(1))
    gate = Gate()
    with serve(gate.app()) as gate_url:
        base = proxy(policy="live", policy_reload_s=0,
                     backends={"gate": {"kind": "openai-compatible",
                                        "api_base": gate_url + "/v1", "timeout_s": 15}},
                     routes={"*": {"backend": "gate"}})
        with ThreadPoolExecutor(1) as pool:
            # The brawl prompt is edited under v1 and reaches the backend as a dance...
            in_flight = pool.submit(post, base, BRAWL)
            assert gate.received.wait(10)
            (tmp_path / "live.yaml").write_text(live(2, action="refuse"))
            assert reload(base).json()["changed"][0]["to"]["version"] == 2
            gate.release.set()
            done = in_flight.result(timeout=15)
        # ...and is judged and answered under v1, although v2 would refuse it.
        assert done.status_code == 200
        assert done.json()["guard"]["policy"]["version"] == 1
        assert trace_policy(base, done) == ref(live(1))
        assert post(base, BRAWL).status_code == 400


def test_reload_under_concurrent_requests(proxy, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Many requests while the file is rewritten several times, in place and by rename: every
    request succeeds and every trace records a (version, sha256) pair of one whole version."""
    path = tmp_path / "live.yaml"
    texts = [live(v, threshold=round(0.6 + v / 100, 2)) for v in range(1, 7)]
    path.write_text(texts[0])
    base = proxy(policy="live", policy_reload_s=0.05)
    writing = threading.Event()
    writing.set()

    def writer() -> None:
        for i, text in enumerate(texts[1:]):
            time.sleep(0.4)
            if i % 2:
                tmp = path.with_suffix(".tmp")
                tmp.write_text(text)
                os.replace(tmp, path)
            else:  # as many editors save: truncate, write part, pause, write the rest
                cut = text.index("  hate:")  # the first part alone is a valid, weaker policy
                with path.open("w") as f:
                    f.write(text[:cut])
                    f.flush()
                    time.sleep(0.02)
                    f.write(text[cut:])
        time.sleep(0.5)
        writing.clear()

    def client(_: int) -> list[dict[str, Any]]:
        got = []
        with httpx.Client(timeout=30) as http:
            while writing.is_set():
                r = http.post(f"{base}/v1/images/generations", json={"prompt": SAFE},
                              headers={"authorization": f"Bearer {CLIENT_KEY}"})
                assert r.status_code == 200, r.text
                got.append({"trace": r.headers["x-guard-trace-id"],
                            "policy": r.json()["guard"]["policy"]})
        return got

    with ThreadPoolExecutor(9) as pool:
        write = pool.submit(writer)
        results = [x for batch in pool.map(client, range(8)) for x in batch]
        write.result()

    whole = {ref(t) for t in texts}
    seen = {(r["policy"]["version"], r["policy"]["sha256"]) for r in results}
    assert seen <= whole, seen - whole
    assert len(seen) >= 2 and len(results) >= 50  # versions went live while requests ran
    # The stored traces say the same as the responses.
    listed = httpx.get(f"{base}/v1/guard/traces", params={"limit": 1000},
                       headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()["data"]
    stored = {t["id"]: (t["policy"]["version"], t["policy"]["sha256"]) for t in listed}
    assert all(stored[r["trace"]] == (r["policy"]["version"], r["policy"]["sha256"])
               for r in results)
    assert wait_for_version(base, 6) == ref(texts[-1])

