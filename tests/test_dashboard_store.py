"""The dashboard's figures counted in the database (guard.plugins.DashboardStore): the SQLite and
PostgreSQL stores count what the dashboard counts of the same traces in Python, keep the tenant
scope, fill in the figures of traces written before the figures table was, and the page of a
ten-year window answers with at most MAX_BUCKETS columns."""

from __future__ import annotations

import asyncio
import random
import re
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from guard.audit.sql import SQLStore
from guard.audit.sqlite import SQLiteStore
from guard.core.types import JudgedImage, RoundRecord, Trace
from guard.plugins import DashboardStore, TraceQuery, build_store
from guard.review import dashboard
from guard.testing import MemoryAuditStore
from tests.conftest import AUDITOR_KEY
from tests.services import PG_DSN, drop_schemas, require_postgres

NOW = 1_760_000_000.0
DAY = 86400.0
CATEGORIES = ("violence", "sexual", "hate")
ACTIONS = ("pass", "edit", "refuse")


def varied_traces(n: int, seed: int = 7, days: float = 400) -> list[Trace]:
    """Traces of three tenants (one none) and three policies (one none) over `days`: prescreens,
    generate and edit rounds, failed calls with and without images, cancelled calls, flags."""
    rng = random.Random(seed)

    def judged(slot: int) -> JudgedImage:
        return JudgedImage(slot=slot, prompt="p", action=rng.choice(ACTIONS),
                           flagged=rng.sample(CATEGORIES, rng.randint(0, 2)))

    traces = []
    for _ in range(n):
        rounds = []
        if rng.random() < 0.7:
            rounds.append(RoundRecord(index=0, kind="prescreen", judge_ms=rng.choice([1.5, 2.0]),
                                      images=[judged(0)]))
        for index in range(1, rng.randint(0, 3) + 1):
            failed = rng.random() < 0.2
            rounds.append(RoundRecord(
                index=index, kind=rng.choice(["generate", "edit"]),
                backend_ms=float(rng.randint(50, 900)), judge_ms=float(rng.randint(5, 60)),
                error="backend failed" if failed else None,
                cancelled="stopped" if rng.random() < 0.1 else None,
                images=[] if failed and rng.random() < 0.7 else
                [judged(s) for s in range(rng.randint(1, 2))]))
        traces.append(Trace(
            created_at=NOW - rng.uniform(0, days * DAY), tenant=rng.choice(["acme", "globex", None]),
            key_id=rng.choice(["app", "other"]), decision=rng.choice(dashboard.DECISIONS),
            policy=rng.choice([{}, {"id": "default", "version": 3}, {"id": "strict", "version": 1}]),
            categories=rng.sample(CATEGORIES, rng.randint(0, 1)), rounds=rounds,
            duration_ms=rng.randint(100, 5000) / 4))
    return traces


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SQLStore]:
    if request.param == "sqlite":
        options: dict[str, Any] = {"kind": "sqlite", "path": str(tmp_path / "audit.db")}
    else:
        dsn = await asyncio.to_thread(require_postgres, PG_DSN)  # it runs a loop of its own
        schema = f"t_{uuid.uuid4().hex[:12]}"
        options = {"kind": "postgres", "dsn": dsn, "schema": schema}
    built = build_store(options)
    assert isinstance(built, SQLStore) and isinstance(built, DashboardStore)
    yield built
    await built.aclose()
    if request.param == "postgres":
        await drop_schemas(options["dsn"], options["schema"])


def same_figures(a: dashboard.Figures, b: dashboard.Figures) -> None:
    assert a.total and a.total == b.total
    assert a.bucket_s == b.bucket_s and a.over_time == b.over_time
    assert a.decisions == b.decisions and a.rounds == b.rounds
    assert a.flags == b.flags and a.policies == b.policies
    assert a.latency_ms == b.latency_ms and set(a.latency_ms) == {"request", "judge", "backend"}


QUERIES = [
    TraceQuery(since=NOW - 400 * DAY, until=NOW),
    TraceQuery(since=NOW - 30 * DAY, until=NOW, tenant="acme"),
    TraceQuery(since=NOW - 365 * DAY, until=NOW - 2 * DAY, tenant="globex"),
    TraceQuery(since=NOW - 2 * DAY, until=NOW + DAY),  # hours
    TraceQuery(since=NOW - 400 * DAY, until=NOW, key_id="other", category="violence"),
    TraceQuery(since=NOW - 400 * DAY, until=NOW, decision="edited", policy_id="default"),
]


@pytest.mark.parametrize("query", QUERIES, ids=["all", "acme-30d", "globex", "hours", "key+category",
                                                "decision+policy"])
async def test_the_store_counts_what_python_counts(store: SQLStore, query: TraceQuery) -> None:
    traces = varied_traces(600)
    memory = MemoryAuditStore()
    for trace in traces:
        await memory.write(trace.model_copy(deep=True))
    await store.write_many(traces[:500])
    for trace in traces[500:]:
        await store.write(trace)
    assert not isinstance(memory, DashboardStore)  # counted by the Python fallback
    in_db, in_python = [await dashboard.figures(s, query) for s in (store, memory)]
    same_figures(in_db, in_python)
    assert not in_db.truncated and in_db.labels == {} and in_db.labelled == 0


async def test_an_auditor_counts_only_their_tenant(store: SQLStore) -> None:
    traces = varied_traces(300)
    await store.write_many(traces)
    window = TraceQuery(since=NOW - 400 * DAY, until=NOW)
    everyone = await store.figures(window, 86400 * 2, dashboard.PERCENTILES)
    counts = {}
    for tenant in ("acme", "globex"):
        own = await store.figures(TraceQuery(since=window.since, until=window.until,
                                             tenant=tenant), 86400 * 2, dashboard.PERCENTILES)
        counts[tenant] = sum(own.over_time.values())
        assert counts[tenant] == sum(t.tenant == tenant for t in traces)
        assert own == dashboard.count([t for t in traces if t.tenant == tenant], 86400 * 2)
    assert sum(everyone.over_time.values()) == len(traces) > sum(counts.values())


async def test_traces_written_before_the_figures_table_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    traces = varied_traces(200)
    old = SQLiteStore(path)
    await old.write_many(traces)
    await old.aclose()
    with sqlite3.connect(path) as conn:  # back to the schema before migration 5
        conn.execute("DROP TABLE trace_figures")
        conn.execute("PRAGMA user_version = 4")
    store = SQLiteStore(path)
    try:
        window = TraceQuery(since=NOW - 400 * DAY, until=NOW)
        same_figures(await dashboard.figures(store, window),
                     dashboard.aggregate(traces, NOW - 400 * DAY, NOW))
        await store.write(varied_traces(1, seed=8)[0])  # and written with a trace from now on
        assert (await dashboard.figures(store, window)).total == 201
    finally:
        await store.aclose()


def test_a_ten_year_window_has_at_most_400_columns(proxy, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    now = time.time()
    traces = [t.model_copy(update={"created_at": now - (NOW - t.created_at) * 9})
              for t in varied_traces(2000, days=400)]  # spread over ten years
    store = SQLiteStore(tmp_path / "audit.db")
    asyncio.run(store.write_many(traces))
    asyncio.run(store.aclose())
    f = dashboard.aggregate(traces, now - 3650 * DAY, now)
    assert len(range(int(f.since // f.bucket_s * f.bucket_s), int(now), f.bucket_s)) <= 400
    base = proxy()
    with httpx.Client(base_url=base, timeout=60) as client:
        form = client.get("/guard/login")
        token = re.search(r'name="csrf" value="([^"]+)"', form.text)[1]  # type: ignore[index]
        client.post("/guard/login", data={"key": AUDITOR_KEY, "csrf": token})
        page = client.get("/guard/dashboard", params={"since": "3650d", "tenant": "globex"})
    assert page.status_code == 200 and page.text.count("<svg") >= 4
    acme = sum(t.tenant == "acme" for t in traces)
    assert re.search(rf"<b>{acme}</b>requests", page.text)  # the auditor's tenant only
    assert "Requests per 10 days, by decision" in page.text
    named = re.findall(r"\d{4}-\d\d-\d\d", page.text[page.text.index('id="chart-over_time"'):
                                                     page.text.index('id="chart-rounds"')])
    assert 0 < len(named) <= dashboard.NAMED_COLUMNS
