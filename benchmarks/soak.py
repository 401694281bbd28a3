"""A soak: many clients for many minutes against one proxy, then the audit log checked whole.

The proxy runs as `safeedit serve` (demo backend, builtin judge, signed checkpoints) and
`--clients` clients send generations for `--minutes`, a mix of safe prompts, prompts the policy
edits and prompts it refuses. The audit log is SQLite (with file anchors), or with `--postgres
DSN` PostgreSQL in a fresh schema (dropped afterwards) signed with a key made by `safeedit audit
new-log-key`; `--redis URL` puts the limits in Redis (limits far above the soak's traffic,
`on_unavailable: closed`). Faults: `--restart-postgres K` / `--restart-redis K` stop the server
for `--outage-s` and start it again, K times each at evenly spaced moments of the run (never
while a pytest runs on the machine: the fault waits for it). /readyz is polled once a second for
the trace spool's high-water mark; at the end the soak waits for the spool to drain.

Reported: requests, errors (any answer that is neither a 200 nor the policy's own 400 refusal,
and any connection failure; 503 `limits_unavailable` while Redis is down is counted apart, as
refused by design), p50/p99 latency, the proxy's RSS after warm-up and at the end, traces
written (must equal answers received; PostgreSQL: compared id by id with the x-guard-trace-id of
each answer), the spool's high-water mark and `safeedit audit verify`; a markdown table last.

Run: .venv/bin/python benchmarks/soak.py [--clients 16] [--minutes 10] [--json out.json]
     [--postgres postgresql://postgres@127.0.0.1:5432/test] [--redis redis://127.0.0.1:6379/0]
     [--restart-postgres 2] [--restart-redis 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.overhead import free_port, pct, wait_up  # noqa: E402

PROMPTS = ["a quiet harbour at dawn, boats and gulls", "a bloodbath in a medieval village",
           "a portrait of an old fisherman", "a bowl of ramen on a wooden table",
           "a knight fighting a dragon", "a city street in the rain at night",
           "a crowd giving a sieg heil under a swastika banner"]  # refused (hate)
KEY_ENV = "SAFEEDIT_SOAK_CHECKPOINT_KEY"
LOG_KEYS_ENV = "SAFEEDIT_LOG_SIGNING_KEYS"
BY_DESIGN = {(503, "limits_unavailable")}  # Redis down with on_unavailable: closed
REDIS_START = ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", "6379",
               "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis",
               "--logfile", "/var/log/redis/ci.log"]


@dataclass
class Tally:
    """What the clients saw: every answer by (status, error code), and its trace id."""

    sent: int = 0
    latencies: list[float] = field(default_factory=list)
    served: list[float] = field(default_factory=list)  # latencies of the 200s and 400 refusals
    answers: Counter[tuple[int, str]] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)  # no answer at all
    samples: dict[tuple[int, str], str] = field(default_factory=dict)
    trace_ids: set[str] = field(default_factory=set)
    untraced: int = 0  # answers without an x-guard-trace-id
    spool_max: int = 0
    readyz: Counter[int] = field(default_factory=Counter)


async def post_one(http: httpx.AsyncClient, url: str, body: dict[str, object],
                   tally: Tally) -> None:
    t0 = time.perf_counter()
    try:
        r = await http.post(url, json=body)
    except httpx.HTTPError as exc:
        tally.failures[type(exc).__name__] += 1
        return
    tally.latencies.append(time.perf_counter() - t0)
    if r.status_code in (200, 400):
        tally.served.append(tally.latencies[-1])
    code = ""
    if r.status_code != 200:
        try:
            code = str(r.json().get("error", {}).get("code") or "")
        except ValueError:
            code = "(not json)"
        tally.samples.setdefault((r.status_code, code), r.text[:160])
    tally.answers[(r.status_code, code)] += 1
    trace = r.headers.get("x-guard-trace-id")
    if trace:
        tally.trace_ids.add(trace)
    else:
        tally.untraced += 1


async def client(base: str, deadline: float, tally: Tally, index: int) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=120) as http:
        i = index
        while time.monotonic() < deadline:
            body = {"prompt": PROMPTS[i % len(PROMPTS)], "n": 1 + (i % 2),
                    "size": "256x256", "response_format": "b64_json"}
            i += 1
            tally.sent += 1
            await post_one(http, "/v1/images/generations", body, tally)


async def poll_ready(base: str, stop: asyncio.Event, tally: Tally) -> None:
    """Once a second: /readyz's status and the spool's size (its high-water mark)."""
    async with httpx.AsyncClient(base_url=base, timeout=5) as http:
        while not stop.is_set():
            try:
                r = await http.get("/readyz")
                tally.readyz[r.status_code] += 1
                spool = r.json().get("details", {}).get("audit_spool") or {}
                tally.spool_max = max(tally.spool_max, int(spool.get("traces") or 0))
            except (httpx.HTTPError, ValueError):
                tally.readyz[0] += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)


async def _run(base: str, deadline: float, clients: int, tally: Tally) -> None:
    stop = asyncio.Event()
    poller = asyncio.create_task(poll_ready(base, stop, tally))
    await asyncio.gather(*(client(base, deadline, tally, i) for i in range(clients)))
    stop.set()
    await poller


def pytest_running() -> bool:
    found = subprocess.run(["pgrep", "-f", "pytest"], capture_output=True, text=True).stdout
    return any(int(pid) != os.getpid() for pid in found.split())


def wait_no_pytest(until: float, poll_s: float) -> bool:
    """Wait until no pytest runs here (the suite needs PostgreSQL and Redis up); False if
    `until` came first."""
    said = False
    while pytest_running():
        if time.monotonic() + poll_s > until:
            return False
        if not said:
            print("soak: a pytest is running; the fault waits", file=sys.stderr, flush=True)
            said = True
        time.sleep(poll_s)
    return True


def restart_postgres(outage_s: float) -> None:
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    ctl = ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main"]
    subprocess.run([*ctl, "stop", "-m", "fast"], check=True, capture_output=True)
    time.sleep(outage_s)
    subprocess.run([*ctl, "start"], check=True, capture_output=True)


def restart_redis(outage_s: float) -> None:
    subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", "6379", "shutdown", "nosave"],
                   capture_output=True)
    time.sleep(outage_s)
    os.makedirs("/var/lib/redis", exist_ok=True)
    os.makedirs("/var/log/redis", exist_ok=True)
    subprocess.run(REDIS_START, check=True, capture_output=True)
    for _ in range(50):
        if subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", "6379", "ping"],
                          capture_output=True).returncode == 0:
            return
        time.sleep(0.1)


def plan_faults(start: float, seconds: float, pg: int, redis: int) -> list[tuple[float, str]]:
    """Each kind's K restarts at start + i * seconds / (K + 1), i = 1..K, in time order."""
    plan = [(start + seconds * i / (pg + 1), "postgres") for i in range(1, pg + 1)]
    plan += [(start + seconds * i / (redis + 1), "redis") for i in range(1, redis + 1)]
    return sorted(plan)


def inject(plan: list[tuple[float, str]], end: float, outage_s: float, t0: float,
           log: list[str], poll_s: float) -> None:
    for at, kind in plan:
        time.sleep(max(0.0, at - time.monotonic()))
        if not wait_no_pytest(end - outage_s - 10, poll_s):
            log.append(f"{kind}: skipped (a pytest ran until the run's end)")
            continue
        began = time.monotonic() - t0
        try:
            (restart_postgres if kind == "postgres" else restart_redis)(outage_s)
        except subprocess.CalledProcessError as exc:
            log.append(f"{kind}: FAILED at {began:.0f}s: {exc} {exc.stderr!r}")
            continue
        log.append(f"{kind} down at {began:.0f}s, up at {time.monotonic() - t0:.0f}s")


def make_config(args: argparse.Namespace, tmp: Path, env: dict[str, str]) -> dict[str, Any]:
    config: dict[str, Any] = {
        "backends": {"demo": {"kind": "demo"}}, "routes": {"*": {"backend": "demo"}},
        "judge": {"kind": "builtin"}}
    if args.postgres:
        seed = subprocess.run([sys.executable, "-m", "guard.cli", "audit", "new-log-key",
                               "--kid", "soak"], cwd=ROOT, env=env, capture_output=True,
                              text=True, check=True).stdout.splitlines()[0]
        env[LOG_KEYS_ENV] = seed
        config["audit"] = {"kind": "postgres", "dsn": args.postgres, "schema": args.schema,
                           "checkpoint_every": 100, "checkpoint_key_env": KEY_ENV,
                           "signing_keys_env": LOG_KEYS_ENV, "images_dir": str(tmp / "images"),
                           "spool": {"path": str(tmp / "audit.spool")}}
    else:
        config["audit"] = {"kind": "sqlite", "path": str(tmp / "audit.db"),
                           "checkpoint_every": 100, "checkpoint_key_env": KEY_ENV,
                           "anchor": {"path": str(tmp / "anchors"), "every_s": 5}}
    if args.redis:
        config["limits"] = {"redis_url": args.redis, "on_unavailable": "closed",
                            "key_prefix": f"safeedit:{args.schema}:",
                            "requests_per_minute": 10_000_000, "images_per_day": 1_000_000_000,
                            "max_concurrent": 100_000}
    return config


async def pg_traces(dsn: str, schema: str) -> tuple[set[str], Counter[int]]:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await conn.fetch(f'SELECT id, status FROM "{schema}".traces')
    finally:
        await conn.close()
    return {r["id"] for r in rows}, Counter(r["status"] for r in rows)


async def pg_drop(dsn: str, schema: str) -> list[str]:
    """The schema and the ones the stores make beside it (`<schema>_heads`, ...)."""
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        found = [r[0] for r in await conn.fetch(
            "SELECT nspname FROM pg_namespace WHERE nspname = $1 OR starts_with(nspname, $2)",
            schema, schema + "_")]
        for name in found:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()
    return found


def wait_spool_empty(base: str, timeout: float) -> int | None:
    """The spool's size once empty (0), or what was left when `timeout` ran out."""
    deadline = time.monotonic() + timeout
    left: int | None = None
    while time.monotonic() < deadline:
        try:
            spool = httpx.get(base + "/readyz", timeout=5).json()["details"].get("audit_spool")
            left = int((spool or {}).get("traces") or 0)
            if left == 0:
                return 0
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(1)
    return left


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--warmup-s", type=float, default=15.0)
    parser.add_argument("--postgres", metavar="DSN", help="audit in PostgreSQL (a fresh schema)")
    parser.add_argument("--redis", metavar="URL", help="limits in Redis (limits.redis_url)")
    parser.add_argument("--restart-postgres", type=int, default=0, metavar="K")
    parser.add_argument("--restart-redis", type=int, default=0, metavar="K")
    parser.add_argument("--outage-s", type=float, default=5.0,
                        help="how long each restarted server stays down")
    parser.add_argument("--test-poll-s", type=float, default=20.0,
                        help="a fault waits while a pytest runs here, checking this often")
    parser.add_argument("--keep-schema", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.restart_postgres and not args.postgres or args.restart_redis and not args.redis:
        parser.error("--restart-postgres needs --postgres, --restart-redis needs --redis")
    args.schema = f"soak_{uuid.uuid4().hex[:10]}"

    tmp = Path(tempfile.mkdtemp(prefix="safeedit-soak-"))
    env = {**os.environ, KEY_ENV: "soak-checkpoint-key-0123456789", "PYTHONPATH": str(ROOT)}
    config = make_config(args, tmp, env)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = tmp / "proxy.log"
    with log_path.open("wb") as proxy_log:
        proc = subprocess.Popen([sys.executable, "-m", "guard.cli", "serve", "--config",
                                 str(path), "--port", str(port), "--log-level", "warning"],
                                cwd=ROOT, env=env, stdout=proxy_log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    tally = Tally()
    faults: list[str] = []
    spool_left: int | None = None
    try:
        wait_up(base + "/readyz", timeout=120)
        asyncio.run(_run(base, time.monotonic() + args.warmup_s, args.clients, tally))
        rss_start = psutil.Process(proc.pid).memory_info().rss
        tally.latencies.clear()
        tally.served.clear()
        t0 = time.monotonic()
        seconds = args.minutes * 60
        plan = plan_faults(t0, seconds, args.restart_postgres, args.restart_redis)
        injector = threading.Thread(target=inject, daemon=True,
                                    args=(plan, t0 + seconds, args.outage_s, t0, faults,
                                          args.test_poll_s))
        injector.start()
        asyncio.run(_run(base, t0 + seconds, args.clients, tally))
        injector.join()
        spool_left = wait_spool_empty(base, timeout=180)
        rss_end = psutil.Process(proc.pid).memory_info().rss
        exit_code = proc.poll()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    answered = sum(tally.answers.values())
    missing: list[str] = []
    unknown: list[str] = []
    if args.postgres:
        ids, by_status = asyncio.run(pg_traces(args.postgres, args.schema))
        traces = len(ids)
        missing = sorted(tally.trace_ids - ids)
        unknown = sorted(ids - tally.trace_ids)
    else:
        with sqlite3.connect(tmp / "audit.db") as conn:
            traces = conn.execute("SELECT count(*) FROM traces").fetchone()[0]
            by_status = Counter(dict(conn.execute(
                "SELECT status, count(*) FROM traces GROUP BY status").fetchall()))
    verify = subprocess.run([sys.executable, "-m", "guard.cli", "audit", "verify", "--config",
                             str(path)], cwd=ROOT, env=env, capture_output=True, text=True)
    dropped = [] if not args.postgres or args.keep_schema else \
        asyncio.run(pg_drop(args.postgres, args.schema))
    by_design = sum(n for k, n in tally.answers.items() if k in BY_DESIGN)
    errors = {f"{s} {c}".strip(): n for (s, c), n in tally.answers.items()
              if s != 200 and (s, c) != (400, "content_policy_violation")
              and (s, c) not in BY_DESIGN}
    errors.update({f"no answer: {k}": n for k, n in tally.failures.items()})
    result = {
        "clients": args.clients, "minutes": args.minutes,
        "audit": "postgres" if args.postgres else "sqlite", "redis": bool(args.redis),
        "faults": faults, "requests": tally.sent, "answered": answered,
        "answers": {f"{s} {c}".strip(): n for (s, c), n in sorted(tally.answers.items())},
        "refused_by_design": by_design, "errors": sum(errors.values()), "error_kinds": errors,
        "error_samples": {f"{s} {c}": t for (s, c), t in tally.samples.items()
                          if f"{s} {c}".strip() in errors},
        "p50_ms": round(pct(tally.latencies, 0.5), 1),
        "p99_ms": round(pct(tally.latencies, 0.99), 1),
        "served_p50_ms": round(pct(tally.served, 0.5), 1),
        "served_p99_ms": round(pct(tally.served, 0.99), 1),
        "rss_start_mb": round(rss_start / 2**20, 1), "rss_end_mb": round(rss_end / 2**20, 1),
        "rss_growth_pct": round((rss_end - rss_start) / rss_start * 100, 1),
        "traces": traces, "traces_by_status": dict(sorted(by_status.items())),
        "traces_equal_answers": traces == answered, "answers_without_trace_id": tally.untraced,
        "trace_ids_missing": missing[:10], "trace_ids_unknown": unknown[:10],
        "spool_high_water": tally.spool_max, "spool_left": spool_left,
        "readyz": dict(tally.readyz), "proxy_exit_during_run": exit_code,
        "verify_exit": verify.returncode, "verify_tail": verify.stdout.strip()[-600:],
        "schemas_dropped": dropped, "proxy_log": str(log_path),
    }
    print(json.dumps(result, indent=2))
    if verify.returncode != 0:
        print(verify.stdout[-2000:], verify.stderr[-2000:])
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    ok = not result["errors"] and result["traces_equal_answers"] and not missing \
        and verify.returncode == 0 and not spool_left
    return 0 if ok else 1


def table(r: dict[str, Any]) -> str:
    rows = [
        ("setup", f"{r['clients']} clients, {r['minutes']} min, builtin judge, audit "
                  f"{r['audit']}{', limits in Redis' if r['redis'] else ''}"),
        ("faults", "; ".join(r["faults"]) or "none"),
        ("requests (answered)", f"{r['requests']} ({r['answered']})"),
        ("answers", ", ".join(f"{k}: {n}" for k, n in r["answers"].items())),
        ("errors", f"{r['errors']} {r['error_kinds'] or ''}".strip()),
        ("refused by design (503 limits_unavailable)", r["refused_by_design"]),
        ("p50 / p99, all answers", f"{r['p50_ms']} ms / {r['p99_ms']} ms"),
        ("p50 / p99, 200s and 400 refusals", f"{r['served_p50_ms']} ms / "
                                             f"{r['served_p99_ms']} ms"),
        ("traces written vs answers", f"{r['traces']} vs {r['answered']} "
                                      f"({'equal' if r['traces_equal_answers'] else 'DIFFER'})"),
        ("spool high-water mark", f"{r['spool_high_water']} traces (left at end: "
                                  f"{r['spool_left']})"),
        ("audit verify", "OK" if r["verify_exit"] == 0 else f"FAILED ({r['verify_exit']})"),
        ("RSS after warm-up / end", f"{r['rss_start_mb']} / {r['rss_end_mb']} MB "
                                    f"({r['rss_growth_pct']:+}%)"),
    ]
    return "\n".join(["| figure | value |", "|---|---|",
                      *(f"| {k} | {v} |" for k, v in rows)])


if __name__ == "__main__":
    sys.exit(main())
