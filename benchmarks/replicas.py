"""One replica and two replicas behind a client that spreads requests over them, side by side.

Each replica is a `safeedit serve` process (demo backend, builtin judge with NudeNet) writing to
one PostgreSQL schema. `--clients` clients send generations for `--seconds` to one replica, then
to two (round robin: the load balancer's part). Reported per setup: requests, errors (any
answer neither a 200 nor the policy's own refusal), throughput, p50/p99, and traces written in
the shared audit log (must equal requests sent); then `safeedit audit verify` over the schema.
On a 2-CPU machine two replicas add no throughput (they share the CPUs); the point is that
errors stay at 0 and every request is traced once, whichever replica served it.

Run: .venv/bin/python benchmarks/replicas.py [--clients 16] [--seconds 60] [--dsn ...]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.overhead import free_port, pct, wait_up  # noqa: E402
from benchmarks.soak import PROMPTS, post_one  # noqa: E402


async def drive(bases: list[str], clients: int, seconds: float) -> dict[str, object]:
    latencies: list[float] = []
    errors: list[str] = []
    sent = 0
    turn = itertools.cycle(bases)
    deadline = time.monotonic() + seconds

    async def client(http: httpx.AsyncClient, i: int) -> None:
        nonlocal sent
        while time.monotonic() < deadline:
            body = {"prompt": PROMPTS[i % len(PROMPTS)], "size": "256x256"}
            i += 1
            sent += 1
            await post_one(http, next(turn) + "/v1/images/generations", body, latencies, errors)

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=120) as http:
        await asyncio.gather(*(client(http, i) for i in range(clients)))
    elapsed = time.monotonic() - started
    return {"replicas": len(bases), "requests": sent, "errors": len(errors),
            "error_samples": errors[:3], "req_per_s": round(sent / elapsed, 1),
            "p50_ms": round(pct(latencies, 0.5), 1), "p99_ms": round(pct(latencies, 0.99), 1)}


async def count_traces(dsn: str, schema: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(f'SELECT count(*) FROM "{schema}".traces'))
    finally:
        await conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--dsn", default=os.environ.get(
        "SAFEEDIT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="safeedit-replicas-"))
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump({
        "backends": {"demo": {"kind": "demo"}}, "routes": {"*": {"backend": "demo"}},
        "judge": {"kind": "builtin"},
        "audit": {"kind": "postgres", "dsn": args.dsn, "schema": schema}}))
    procs: list[subprocess.Popen[bytes]] = []
    bases: list[str] = []
    try:
        for name in ("a", "b"):
            port = free_port()
            cwd = tmp / name
            cwd.mkdir()
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "guard.cli", "serve", "--config", str(config),
                 "--port", str(port), "--log-level", "warning"], cwd=cwd,
                env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.DEVNULL))
            bases.append(f"http://127.0.0.1:{port}")
        for base in bases:
            wait_up(base + "/readyz", timeout=120)
        asyncio.run(drive(bases, 4, 5))  # warm-up: connections, NudeNet, first paths
        before = asyncio.run(count_traces(args.dsn, schema))
        rows = []
        for setup in (bases[:1], bases):
            row = asyncio.run(drive(setup, args.clients, args.seconds))
            after = asyncio.run(count_traces(args.dsn, schema))
            row["traces"] = after - before
            row["traces_equal_requests"] = after - before == row["requests"]
            before = after
            rows.append(row)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)
    verify = subprocess.run([sys.executable, "-m", "guard.cli", "audit", "verify", "--config",
                             str(config)], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    result = {"clients": args.clients, "seconds": args.seconds, "rows": rows,
              "verify_exit": verify.returncode, "verify": verify.stdout.strip()[-300:]}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    asyncio.run(_drop(args.dsn, schema))
    ok = all(r["errors"] == 0 and r["traces_equal_requests"] for r in rows)
    return 0 if ok and verify.returncode == 0 else 1


async def _drop(dsn: str, schema: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


if __name__ == "__main__":
    sys.exit(main())
