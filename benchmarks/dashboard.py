"""The dashboard's cost by window: 100,000 traces over ten years, the page of each window timed.

Writes the log (SQLite in a temporary directory; with --postgres also PostgreSQL, in a schema of
its own that is dropped afterwards) in a child process, through the store's bulk path
(`write_many`, the same sealing as the proxy's writes). Then serves the real app (uvicorn on
127.0.0.1, in this process), signs in as an auditor of tenant acme (three traces in four) and
GETs /guard/dashboard?since=<window> for 1d, 7d, 30d, 365d and 3650d: the whole page, the
store's figures, the labels and the charts. Prints per window the first answer's seconds, the
best of --repeat, the requests counted, and this process's resident memory after it and its peak
so far (VmHWM; the log was written by the child, so the peak is the server's).

Run: .venv/bin/python benchmarks/dashboard.py [--traces 100000] [--postgres] [--repeat 3]
     [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import re
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from guard.core.config import hash_key, load_config  # noqa: E402
from guard.core.types import Trace  # noqa: E402
from guard.plugins import build_store  # noqa: E402
from proxy import create_app  # noqa: E402
from tests.audit_writer import sample_trace  # noqa: E402
from tests.servers import serve  # noqa: E402

WINDOWS = ("1d", "7d", "30d", "365d", "3650d")
AUDITOR_KEY = "sk-bench-auditor"
PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
DECISIONS = ("passed", "passed", "passed", "edited", "refused", "failed")


def write_log(options: dict[str, Any], count: int, now: float) -> None:
    """`count` traces, newest `now`, spread evenly over ten years, in batches of 5,000; copies
    of one realistic trace (prescreen, two rounds) with their own id, time, tenant, decision and
    duration, built with `model_construct` so that the time goes to the store."""
    fields = dict(sample_trace("app", 0))
    rng = random.Random(1)
    span = 3650 * 86400

    async def fill() -> None:
        store = build_store(options)
        for start in range(0, count, 5000):
            await store.write_many([Trace.model_construct(**{
                **fields, "id": "tr_" + uuid.uuid4().hex,
                "created_at": now - span + span * i / count,
                "tenant": "globex" if i % 4 == 0 else "acme",
                "decision": DECISIONS[i % len(DECISIONS)],
                "duration_ms": rng.uniform(300, 4000)})
                for i in range(start, min(start + 5000, count))])
        await store.aclose()

    asyncio.run(fill())


def memory_mb() -> tuple[float, float]:
    """(resident now, peak resident) of this process, in MB."""
    status = Path("/proc/self/status").read_text()
    rss, hwm = (int(re.search(rf"{name}:\s+(\d+) kB", status)[1])  # type: ignore[index]
                for name in ("VmRSS", "VmHWM"))
    return rss / 1024, hwm / 1024


def sign_in(client: httpx.Client) -> None:
    form = client.get("/guard/login")
    token = re.search(r'name="csrf" value="([^"]+)"', form.text)[1]  # type: ignore[index]
    client.post("/guard/login", data={"key": AUDITOR_KEY, "csrf": token})


def time_windows(options: dict[str, Any], repeat: int) -> list[dict[str, Any]]:
    raw = {
        "keys": [{"id": "audit", "hash": hash_key(AUDITOR_KEY), "role": "auditor",
                  "tenant": "acme"}],
        "backends": {"demo": {"kind": "demo"}}, "routes": {"*": {"backend": "demo"}},
        "audit": options,
    }
    rows = []
    with serve(create_app(load_config(None, raw))) as base, \
            httpx.Client(base_url=base, timeout=120) as client:
        sign_in(client)
        rss, peak = memory_mb()
        print(f"  signed in: RSS {rss:5.0f} MB  peak {peak:5.0f} MB", flush=True)
        for window in WINDOWS:
            seconds = []
            for _ in range(repeat):
                started = time.perf_counter()
                page = client.get("/guard/dashboard", params={"since": window})
                seconds.append(time.perf_counter() - started)
                assert page.status_code == 200, page.text[:500]
            total = re.search(r"<b>(\d+)</b>requests", page.text)
            rss, peak = memory_mb()
            rows.append({"window": window, "first_s": round(seconds[0], 3),
                         "best_s": round(min(seconds), 3),
                         "requests": int(total[1]) if total else 0,
                         "rss_mb": round(rss), "peak_rss_mb": round(peak)})
            print(f"  {window:>6}  first {seconds[0]:6.3f} s  best {min(seconds):6.3f} s  "
                  f"{rows[-1]['requests']:>7} requests  RSS {rss:5.0f} MB  peak {peak:5.0f} MB",
                  flush=True)
    return rows


def run(name: str, options: dict[str, Any], count: int, repeat: int) -> list[dict[str, Any]]:
    started = time.perf_counter()
    child = multiprocessing.get_context("fork").Process(target=write_log,
                                                         args=(options, count, time.time()))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"writing the {name} log failed")
    print(f"{name}: wrote {count} traces in {time.perf_counter() - started:.1f} s", flush=True)
    return time_windows(options, repeat)


async def drop_schema(schema: str) -> None:
    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--traces", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--postgres", action="store_true", help=f"also on {PG_DSN}")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict[str, Any] = {"traces": args.traces}
    with tempfile.TemporaryDirectory() as tmp:
        results["sqlite"] = run("sqlite", {"kind": "sqlite", "path": f"{tmp}/audit.db"},
                                args.traces, args.repeat)
    if args.postgres:
        schema = f"bench_dashboard_{uuid.uuid4().hex[:8]}"
        try:
            results["postgres"] = run("postgres", {"kind": "postgres", "dsn": PG_DSN,
                                                   "schema": schema}, args.traces, args.repeat)
        finally:
            asyncio.run(drop_schema(schema))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
