"""What the limits cost per request: limits off vs. counted in-process vs. counted in Redis.

One run, side by side:
  check   the quota check alone, in this process: `Quotas.admit` + `Quotas.release` for one
          request with all three limits set (requests_per_minute, images_per_day,
          max_concurrent), so Redis is one round trip (one Lua script) to admit, one to release
  proxy   end to end through `safeedit serve` with the demo backend in passthrough (no judge,
          so the limiter's share is as large as it gets), one process per mode, requests sent
          one at a time in turn to each (so a busy moment slows every mode alike): p50 / p99
          and the added p50 over limits off
Limits are set high enough that nothing is refused: this measures counting, not refusing.
The machine is shared: compare the rows of one run, not across runs.

Run: .venv/bin/python benchmarks/limits.py [--checks 2000] [--requests 200]
     [--redis redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import redis
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.overhead import PY, ROOT, free_port, pct, wait_up  # noqa: E402
from guard.core.config import load_config  # noqa: E402
from guard.pipeline.quotas import Quotas  # noqa: E402
from guard.support.telemetry import Metrics  # noqa: E402

HIGH = {"requests_per_minute": 10_000_000, "images_per_day": 1_000_000_000,
        "max_concurrent": 10_000}


def modes(redis_url: str, prefix: str) -> dict[str, dict[str, Any]]:
    return {"off": {}, "memory": dict(HIGH),
            "redis": {**HIGH, "redis_url": redis_url, "key_prefix": prefix}}


async def time_checks(limits: dict[str, Any], count: int) -> list[float]:
    quotas = Quotas(load_config(None, {"limits": limits}), Metrics())
    timings = []
    try:
        for i in range(count + 50):
            t0 = time.perf_counter()
            ticket = await quotas.admit(f"bench-{i}", "local", "default", 1)
            await quotas.release(ticket, 200)
            if i >= 50:  # the first ones load the scripts and open the connection
                timings.append(time.perf_counter() - t0)
    finally:
        await quotas.aclose()
    return timings


def start_proxy(limits: dict[str, Any], tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    path = tmp / f"config-{port}.yaml"
    path.write_text(yaml.safe_dump({"limits": limits, "guard": {"enabled": False},
                                    "audit": {"kind": "sqlite", "path": str(tmp / f"{port}.db")}}))
    proc = subprocess.Popen([PY, "-m", "guard.cli", "serve", "--config", str(path),
                             "--port", str(port), "--log-level", "warning"],
                            cwd=tmp, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    return proc, f"http://127.0.0.1:{port}"


def interleaved(urls: dict[str, str], requests: int) -> dict[str, list[float]]:
    body = {"prompt": "a quiet harbour at dawn, boats and gulls", "n": 1,
            "response_format": "b64_json"}
    clients = {name: httpx.Client(base_url=url, timeout=60) for name, url in urls.items()}
    timings: dict[str, list[float]] = {name: [] for name in urls}
    try:
        for i in range(requests + 5):
            for name, client in clients.items():
                t0 = time.perf_counter()
                r = client.post("/v1/images/generations", json=body)
                if r.status_code != 200:
                    raise RuntimeError(f"{name}: HTTP {r.status_code}: {r.text[:200]}")
                if i >= 5:  # warm-up: connections, first-request paths
                    timings[name].append(time.perf_counter() - t0)
    finally:
        for client in clients.values():
            client.close()
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checks", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    prefix = f"safeedit-bench:{uuid.uuid4().hex[:8]}:"
    configs = modes(args.redis, prefix)
    tmp = Path(tempfile.mkdtemp(prefix="safeedit-bench-limits-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        checks = {name: asyncio.run(time_checks(limits, args.checks))
                  for name, limits in configs.items()}
        urls = {}
        for name, limits in configs.items():  # started together, measured one at a time
            proc, urls[name] = start_proxy(limits, tmp)
            procs.append(proc)
        for url in urls.values():
            wait_up(url + "/readyz", timeout=180)
        ends = interleaved(urls, args.requests)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)
        with redis.Redis.from_url(args.redis) as client:
            mine = list(client.scan_iter(match=prefix + "*"))
            if mine:
                client.delete(*mine)

    print(f"\n{'mode':<8} {'check p50 us':>13} {'check p99 us':>13} {'proxy p50 ms':>13} "
          f"{'proxy p99 ms':>13} {'+p50 ms':>8} {'p50 ratio':>10}")
    off = pct(ends["off"], 0.5)
    for name in configs:
        p50 = pct(ends[name], 0.5)
        print(f"{name:<8} {pct(checks[name], 0.5) * 1000:>13.1f} "
              f"{pct(checks[name], 0.99) * 1000:>13.1f} {p50:>13.2f} "
              f"{pct(ends[name], 0.99):>13.2f} {p50 - off:>8.2f} {p50 / off:>10.3f}")
    print(f"\ncheck: {args.checks} admit+release pairs; proxy: {args.requests} requests at "
          f"concurrency 1 per mode, demo backend, passthrough, SQLite trace; {os.cpu_count()} CPUs.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
