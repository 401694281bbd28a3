"""SIGTERM drains a real `safeedit serve` process: unready at once, new requests refused with a
traced 503, the request in flight served, then exit 0 with every trace written.

The drain's timeline (seconds after SIGTERM) is printed (`pytest -s`) and kept as
drain-timeline.json in the test's tmp_path."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from starlette.requests import Request
from starlette.responses import Response

from tests.fake_backend import FakeBackend
from tests.servers import free_port, serve
from tests.test_serve_cli import ROOT, safeedit_serve


class SlowBackend(FakeBackend):
    """The fake backend, answering each generation `delay_s` after it arrived."""

    delay_s = 2.0

    async def _generate(self, request: Request) -> Response:
        response = await super()._generate(request)  # recorded in `requests` from here on
        await asyncio.sleep(self.delay_s)
        return response


def reached_backend(backend: FakeBackend, client: threading.Thread, count: int = 1) -> None:
    deadline = time.monotonic() + 60
    while len(backend.requests) < count:
        assert client.is_alive() and time.monotonic() < deadline, "never reached the backend"
        time.sleep(0.01)


def proxy_config(tmp_path: Path, backend_url: str, **server: Any) -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "server": server,
        "backends": {"slow": {"kind": "openai-compatible", "api_base": backend_url + "/v1"}},
        "routes": {"*": {"backend": "slow"}},
        "judge": {"kind": "builtin", "nudenet": False},
        "audit": {"kind": "sqlite", "path": str(tmp_path / "audit.db")},
    }))
    return config


def test_sigterm_drains_then_exits_zero(tmp_path: Path) -> None:
    backend = SlowBackend()
    with serve(backend.app()) as backend_url:
        config = proxy_config(tmp_path, backend_url, drain_timeout_s=30)
        with safeedit_serve(tmp_path, "--config", str(config)) as (proc, base):
            client = openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0, timeout=60)
            done: dict[str, Any] = {}

            def in_flight() -> None:
                done["response"] = client.images.with_raw_response.generate(
                    prompt="a lighthouse at dusk", response_format="b64_json")
                done["at"] = time.monotonic()

            thread = threading.Thread(target=in_flight, daemon=True)
            thread.start()
            reached_backend(backend, thread)  # the request is inside the backend call now
            sigterm = time.monotonic()
            os.kill(proc.pid, signal.SIGTERM)

            ready = httpx.get(base + "/readyz", timeout=5)
            while ready.status_code == 200 and time.monotonic() - sigterm < 2:
                ready = httpx.get(base + "/readyz", timeout=5)  # the signal is asynchronous
            unready = time.monotonic()
            assert ready.status_code == 503
            assert ready.json()["checks"]["accepting"] is False

            try:
                client.images.generate(prompt="a red apple")
                raise AssertionError("a new request was served while draining")
            except openai.InternalServerError as exc:
                refused_at = time.monotonic()
                refused = exc
            assert refused.status_code == 503 and refused.code == "draining"
            assert refused.response.headers["retry-after"] == "1"
            refused_trace = refused.response.headers["x-guard-trace-id"]
            assert refused.body["trace_id"] == refused_trace  # type: ignore[index]

            guard_api = httpx.get(base + "/v1/guard/traces", timeout=5)
            assert guard_api.status_code == 503 and "retry-after" in guard_api.headers
            assert guard_api.json()["error"]["code"] == "draining"

            thread.join(timeout=30)
            assert done["response"].http_response.status_code == 200
            served_trace = done["response"].headers["x-guard-trace-id"]
            assert done["response"].parse().data[0].b64_json
            assert proc.wait(timeout=30) == 0
            exited = time.monotonic()

    timeline = {"readyz_503_s": unready - sigterm, "new_request_503_s": refused_at - sigterm,
                "in_flight_done_s": done["at"] - sigterm, "exit_0_s": exited - sigterm,
                "backend_delay_s": SlowBackend.delay_s}
    (tmp_path / "drain-timeline.json").write_text(json.dumps(timeline, indent=2))
    print("\ndrain timeline (s after SIGTERM): " + ", ".join(
        f"{name} {value:.3f}" for name, value in timeline.items()))
    # Unready and refusing at once, while the request in flight still runs; exit after it.
    assert timeline["readyz_503_s"] < 1 and timeline["new_request_503_s"] < timeline[
        "in_flight_done_s"] <= timeline["exit_0_s"]

    rows = dict(sqlite3.connect(tmp_path / "audit.db").execute(
        "SELECT id, status FROM traces").fetchall())
    assert rows == {served_trace: 200, refused_trace: 503}


def test_drain_timeout_cuts_what_still_runs_with_a_traced_503(tmp_path: Path) -> None:
    backend = SlowBackend()
    backend.delay_s = 6
    with serve(backend.app()) as backend_url:
        config = proxy_config(tmp_path, backend_url, drain_timeout_s=0.5)
        with safeedit_serve(tmp_path, "--config", str(config)) as (proc, base):
            client = openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0, timeout=60)
            cut: dict[str, Any] = {}

            def in_flight() -> None:
                try:
                    client.images.generate(prompt="a lighthouse at dusk")
                except openai.APIStatusError as exc:
                    cut["error"] = exc

            thread = threading.Thread(target=in_flight, daemon=True)
            thread.start()
            reached_backend(backend, thread)
            sigterm = time.monotonic()
            os.kill(proc.pid, signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
            assert time.monotonic() - sigterm < 4  # not the backend's 6 s
            thread.join(timeout=5)

    error = cut["error"]
    assert error.status_code == 503 and error.code == "draining"
    assert error.response.headers["retry-after"] == "1"
    rows = sqlite3.connect(tmp_path / "audit.db").execute(
        "SELECT status, body FROM traces").fetchall()
    assert [(status, json.loads(body)["error"]["code"]) for status, body in rows] == [
        (503, "draining")]


def test_a_stream_cut_at_the_drain_timeout_is_traced_as_the_drain_not_as_the_client(
        tmp_path: Path) -> None:
    backend = SlowBackend()
    backend.delay_s = 6
    with serve(backend.app()) as backend_url:
        config = proxy_config(tmp_path, backend_url, drain_timeout_s=0.5)
        with safeedit_serve(tmp_path, "--config", str(config)) as (proc, base):
            seen: list[bytes] = []

            def in_flight() -> None:
                try:
                    with httpx.stream("POST", base + "/v1/images/generations", timeout=60,
                                      json={"prompt": "a lighthouse at dusk", "stream": True},
                                      headers={"authorization": "Bearer k"}) as r:
                        seen.extend(r.iter_bytes())
                except httpx.HTTPError:
                    pass  # the server ends the stream as it stops

            thread = threading.Thread(target=in_flight, daemon=True)
            thread.start()
            reached_backend(backend, thread)
            os.kill(proc.pid, signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
            thread.join(timeout=5)

    assert b"data:" not in b"".join(seen)  # no image, judged or not, left the proxy
    rows = sqlite3.connect(tmp_path / "audit.db").execute(
        "SELECT status, body FROM traces").fetchall()
    assert [(status, json.loads(body)["error"]["code"]) for status, body in rows] == [
        (503, "draining")]


def worker_pids(parent: int) -> list[int]:
    """The worker processes `parent` spawned (not multiprocessing's resource tracker)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if ppid == parent and b"spawn_main" in cmdline:
            pids.append(int(stat.parent.name))
    return pids


def test_workers_share_one_port_and_every_worker_drains(tmp_path: Path) -> None:
    backend = SlowBackend()
    backend.delay_s = 2.5
    with serve(backend.app()) as backend_url:
        config = proxy_config(tmp_path, backend_url)
        with safeedit_serve(tmp_path, "--config", str(config),
                            "--workers", "2") as (proc, base):
            assert len(worker_pids(proc.pid)) == 2
            client = openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0, timeout=60)
            with ThreadPoolExecutor(20) as pool:
                calls = [pool.submit(client.images.with_raw_response.generate,
                                     prompt=f"a lighthouse, view {i}") for i in range(20)]
                deadline = time.monotonic() + 60
                while len(backend.requests) < 20 and time.monotonic() < deadline:
                    time.sleep(0.01)
                os.kill(proc.pid, signal.SIGTERM)  # every request is in flight, in some worker
                sigterm = time.monotonic()
                while httpx.get(base + "/readyz", timeout=5).status_code == 200:
                    assert time.monotonic() - sigterm < 2  # the parent passes it on
                # Whichever worker takes a new connection, it is draining.
                assert {httpx.get(base + "/readyz", timeout=5).status_code
                        for _ in range(8)} == {503}
                responses = [call.result() for call in calls]
            assert [r.http_response.status_code for r in responses] == [200] * 20
            code = proc.wait(timeout=60)
            assert code == 0, proc.stderr.read().decode() if proc.stderr else code

    ids = {row[0] for row in sqlite3.connect(tmp_path / "audit.db").execute(
        "SELECT id FROM traces")}
    assert ids == {r.headers["x-guard-trace-id"] for r in responses}
    verified = subprocess.run([sys.executable, "-m", "guard.cli", "audit", "verify",
                               "--config", str(config)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "checked 20 traces" in verified.stdout


SLOW_START = '''
import os, time
from pathlib import Path

def create(config):
    Path(os.environ["STARTING_DIR"], str(os.getpid())).touch()
    time.sleep(4)  # a worker still loading its judge
    from proxy import create_app
    return create_app(config)
'''


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_while_still_starting_stops_clean(tmp_path: Path, workers: int) -> None:
    """A SIGTERM that reaches a worker before it serves (a rollout that changes its mind, or a
    replacement worker just spawned) stops it with exit 0: nothing was in flight."""
    (tmp_path / "slowstart.py").write_text(SLOW_START)
    starting = tmp_path / "starting"
    starting.mkdir()
    config = proxy_config(tmp_path, "http://127.0.0.1:9")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}",
           "STARTING_DIR": str(starting)}
    proc = subprocess.Popen([sys.executable, "-m", "guard.cli", "serve", "--port",
                             str(free_port()), "--config", str(config), "--app",
                             "slowstart:create", "--workers", str(workers)],
                            cwd=tmp_path, env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while len(list(starting.iterdir())) < workers:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, proc.stderr.read().decode() if proc.stderr else code
