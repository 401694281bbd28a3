"""The PostgreSQL audit store against the real server on 127.0.0.1:5432 (database `test`).

Each test gets a fresh schema, dropped afterwards, so parallel runs do not collide. Without a
server the tests skip with the reason; with SAFEEDIT_REQUIRE_POSTGRES=1 (set by .ci/run) they
fail instead, so CI cannot pass without them.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import yaml

from guard.audit.postgres import MIGRATIONS
from guard.plugins import TraceQuery, build_store
from tests.audit_writer import BATCH, sample_trace
from tests.conftest import AUDITOR_KEY, CLIENT_KEY, OTHER_AUDITOR_KEY, write_policy
from tests.services import PG_DSN, drop_schemas, require_postgres

pytestmark = pytest.mark.postgres

DSN = PG_DSN
KEY_ENV = "SAFEEDIT_TEST_CHECKPOINT_KEY"
KEY = "test-checkpoint-key-0123456789"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pg_dsn() -> str:
    return require_postgres(DSN)


@pytest.fixture
def pg(pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Audit options for a fresh schema, and a config file naming them."""
    monkeypatch.setenv(KEY_ENV, KEY)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    options = {"kind": "postgres", "dsn": pg_dsn, "schema": schema, "checkpoint_every": 10,
               "checkpoint_key_env": KEY_ENV, "images_dir": str(tmp_path / "images")}
    config = tmp_path / "cli" / "config.yaml"  # not among the test's policy files
    config.parent.mkdir(exist_ok=True)
    config.write_text(yaml.safe_dump({"audit": options}))
    yield {"options": options, "config": str(config), "schema": schema}

    asyncio.run(drop_schemas(pg_dsn, schema))


async def sql(pg: dict[str, Any], *statements: str) -> list[Any]:
    conn = await asyncpg.connect(pg["options"]["dsn"],
                                 server_settings={"search_path": pg["schema"]})
    try:
        out = []
        for statement in statements:
            out.append(await conn.fetch(statement))
        return out
    finally:
        await conn.close()


def verify_cli(config: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "guard.cli", "audit", "verify", "--config",
                           config], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, KEY_ENV: KEY})


async def test_same_interface_as_sqlite(pg) -> None:  # type: ignore[no-untyped-def]
    store = build_store(pg["options"])
    assert await store.ready()
    base = time.time() - 100
    written = []
    for i in range(30):
        trace = sample_trace(
            "app" if i % 2 else "batch", i, tenant="acme" if i % 3 else "globex",
            decision="refused" if i % 5 == 0 else "edited", created_at=base + i,
            categories=["hate"] if i % 5 == 0 else ["violence", "self_harm"])
        written.append(await store.write(trace))
    assert [t.prev_hash for t in written[1:]] == [t.hash for t in written[:-1]]

    got = await store.get(written[7].id)
    assert got is not None and got.model_dump() == written[7].model_dump()
    assert await store.get("tr_missing") is None

    async def ids(**filters: Any) -> list[str]:
        out, cursor = [], None
        while True:
            page = await store.query(TraceQuery(limit=4, cursor=cursor, **filters))
            out += [item["id"] for item in page.items]
            if page.next_cursor is None:
                return out
            cursor = page.next_cursor

    newest_first = [t.id for t in reversed(written)]
    assert await ids() == newest_first
    assert await ids(tenant="globex") == [t.id for t in reversed(written) if t.tenant == "globex"]
    assert await ids(decision="refused", category="hate") == [
        t.id for t in reversed(written) if t.decision == "refused"]
    assert await ids(category="self_harm", key_id="batch") == [
        t.id for t in reversed(written) if "self_harm" in t.categories and t.key_id == "batch"]
    assert await ids(since=base + 10, until=base + 13) == [t.id for t in written[12:9:-1]]
    assert len(await ids(policy_id="default", policy_version=3, model="gpt-image-1")) == 30
    assert await ids(policy_version=4) == []
    report = await store.verify()
    assert report.ok and report.traces == 30 and report.checkpoints_valid == 3
    await store.aclose()


async def test_migrations_are_recorded_and_applied_once(pg) -> None:  # type: ignore[no-untyped-def]
    stores = [build_store(pg["options"]) for _ in range(3)]
    # Three "replicas" start at once: the advisory lock lets exactly one create the schema.
    assert await asyncio.gather(*(s.ready() for s in stores)) == [True, True, True]
    applied = await stores[0].migrations()
    assert applied == [(v, name) for v, name, _ in MIGRATIONS]
    (rows,) = await sql(pg, "SELECT count(*) AS n FROM safeedit_migrations")
    assert rows[0]["n"] == len(MIGRATIONS)
    (head,) = await sql(pg, "SELECT seq, hash FROM chain_head")
    assert [tuple(r) for r in head] == [(0, None)]
    for store in stores:
        await store.aclose()


async def test_tampering_is_named_in_postgres(pg) -> None:  # type: ignore[no-untyped-def]
    store = build_store(pg["options"])
    ids = [(await store.write(sample_trace("app", i))).id for i in range(12)]
    await sql(pg, "UPDATE traces SET body = replace(body, 'bloodbath', 'picnic') WHERE seq = 2",
              "DELETE FROM traces WHERE seq = 6",
              "UPDATE traces SET seq = -1 WHERE seq = 8", "UPDATE traces SET seq = 8 WHERE seq = 9",
              "UPDATE traces SET seq = 9 WHERE seq = -1")
    report = await store.verify()
    await store.aclose()
    problems = sorted(report.problems, key=lambda p: p.seq)
    assert [(p.kind, p.seq, p.trace_id) for p in problems[:3]] == [
        ("changed", 2, ids[1]), ("removed", 6, None), ("reordered", 8, ids[8])]
    result = await asyncio.to_thread(verify_cli, pg["config"])
    assert result.returncode == 1
    assert f"FAILED: changed: trace {ids[1]} (seq 2) was changed" in result.stdout


async def test_two_processes_writing_at_once_keep_one_chain(pg, tmp_path) -> None:  # type: ignore[no-untyped-def]
    go = tmp_path / "go"
    n = 300
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.audit_writer", orjson.dumps(pg["options"]).decode(), name,
        str(n), "8", str(go), "replica-a,replica-b", cwd=ROOT, env={**os.environ, KEY_ENV: KEY})
        for name in ("replica-a", "replica-b")]
    # Both processes connect and migrate (slow on a loaded machine), then start together.
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"go.{w}.ready").exists() for w in ("replica-a", "replica-b")):
        assert time.monotonic() < deadline, "the writers never got ready"
        await asyncio.sleep(0.05)
    go.touch()
    assert await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), 120) == [0, 0]
    (rows,) = await sql(pg, "SELECT seq, key_id, prev_hash, hash FROM traces ORDER BY seq")
    assert [r["seq"] for r in rows] == list(range(1, 2 * n + 1))
    # No fork: every hash is the prev_hash of exactly one later row, and no prev_hash repeats.
    assert len({r["prev_hash"] for r in rows}) == 2 * n
    writers = [r["key_id"] for r in rows]
    assert sum(a != b for a, b in zip(writers, writers[1:], strict=False)) >= n // BATCH, \
        "the two writers did not overlap; the test proves nothing"
    result = await asyncio.to_thread(verify_cli, pg["config"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"checked {2 * n} traces" in result.stdout
    assert f"{2 * n // 10} valid signatures" in result.stdout


def test_proxy_on_postgres(proxy, pg, tmp_path, fake_backend) -> None:  # type: ignore[no-untyped-def]
    write_policy(tmp_path, "id: e2e\nversion: 7\nextends: default\nimage_retention: flagged\n")
    base = proxy(policy="e2e", audit=pg["options"])
    fake_backend[0].plan = [["red"], ["blue"]]
    r = httpx.post(f"{base}/v1/images/generations", json={"prompt": "a street"},
                   headers={"authorization": f"Bearer {CLIENT_KEY}"}, timeout=30)
    assert r.status_code == 200 and r.json()["guard"]["decision"] == "edited"
    trace_id = r.headers["x-guard-trace-id"]
    auth = {"authorization": f"Bearer {AUDITOR_KEY}"}
    listed = httpx.get(f"{base}/v1/guard/traces?decision=edited", headers=auth).json()["data"]
    assert [t["id"] for t in listed] == [trace_id]
    other = {"authorization": f"Bearer {OTHER_AUDITOR_KEY}"}
    assert httpx.get(f"{base}/v1/guard/traces", headers=other).json()["data"] == []
    trace = httpx.get(f"{base}/v1/guard/traces/{trace_id}", headers=auth).json()
    red = trace["rounds"][1]["images"][0]
    assert red["image_ref"] and (tmp_path / "images" / red["image_ref"]).is_file()
    assert verify_cli(pg["config"]).returncode == 0
