"""A soak: many clients for many minutes against one proxy, then the audit log checked whole.

The proxy runs as `safeedit serve` (demo backend, builtin judge, SQLite audit with signed
checkpoints and anchors) and `--clients` clients send generations for `--minutes`, a mix of
safe prompts, prompts the policy edits and prompts it refuses. Reported: requests, errors (any
answer that is neither a 200 nor the policy's own 400 refusal, and any connection failure),
p50/p99 latency, the proxy's RSS after warm-up and at the end, traces written (must equal
requests sent), and `safeedit audit verify`.

Run: .venv/bin/python benchmarks/soak.py [--clients 16] [--minutes 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.overhead import free_port, pct, wait_up  # noqa: E402

PROMPTS = ["a quiet harbour at dawn, boats and gulls", "a bloodbath in a medieval village",
           "a portrait of an old fisherman", "a bowl of ramen on a wooden table",
           "a knight fighting a dragon", "a city street in the rain at night"]
KEY_ENV = "SAFEEDIT_SOAK_CHECKPOINT_KEY"


async def post_one(http: httpx.AsyncClient, url: str, body: dict[str, object],
                   latencies: list[float], errors: list[str]) -> None:
    """One generation: its latency, or an error for anything but a 200 or the policy's own
    refusal (and for a connection failure)."""
    t0 = time.perf_counter()
    try:
        r = await http.post(url, json=body)
    except httpx.HTTPError as exc:
        errors.append(type(exc).__name__)
        return
    latencies.append(time.perf_counter() - t0)
    refused = r.status_code == 400 and \
        r.json().get("error", {}).get("code") == "content_policy_violation"
    if r.status_code != 200 and not refused:
        errors.append(f"HTTP {r.status_code}: {r.text[:120]}")


async def client(base: str, deadline: float, latencies: list[float], errors: list[str],
                 counter: list[int], index: int) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=120) as http:
        i = index
        while time.monotonic() < deadline:
            body = {"prompt": PROMPTS[i % len(PROMPTS)], "n": 1 + (i % 2),
                    "size": "256x256", "response_format": "b64_json"}
            i += 1
            counter[0] += 1
            await post_one(http, "/v1/images/generations", body, latencies, errors)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="safeedit-soak-"))
    db = tmp / "audit.db"
    config = {"backends": {"demo": {"kind": "demo"}}, "routes": {"*": {"backend": "demo"}},
              "judge": {"kind": "builtin"},
              "audit": {"kind": "sqlite", "path": str(db), "checkpoint_every": 100,
                        "checkpoint_key_env": KEY_ENV,
                        "anchor": {"path": str(tmp / "anchors"), "every_s": 5}}}
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, KEY_ENV: "soak-checkpoint-key-0123456789", "PYTHONPATH": str(ROOT)}
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "guard.cli", "serve", "--config", str(path),
                             "--port", str(port), "--log-level", "warning"],
                            cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_up(base + "/readyz", timeout=120)
        latencies: list[float] = []
        errors: list[str] = []
        sent = [0]
        warm = time.monotonic() + 15
        asyncio.run(_run(base, warm, args.clients, latencies, errors, sent))  # warm-up
        rss_start = psutil.Process(proc.pid).memory_info().rss
        latencies.clear()
        deadline = time.monotonic() + args.minutes * 60
        asyncio.run(_run(base, deadline, args.clients, latencies, errors, sent))
        rss_end = psutil.Process(proc.pid).memory_info().rss
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    with sqlite3.connect(db) as conn:
        traces = conn.execute("SELECT count(*) FROM traces").fetchone()[0]
    verify = subprocess.run([sys.executable, "-m", "guard.cli", "audit", "verify", "--config",
                             str(path), "--json"], cwd=ROOT, env=env, capture_output=True,
                            text=True)
    result = {
        "clients": args.clients, "minutes": args.minutes, "requests": sent[0],
        "measured": len(latencies), "errors": len(errors), "error_samples": errors[:5],
        "p50_ms": round(pct(latencies, 0.5), 1), "p99_ms": round(pct(latencies, 0.99), 1),
        "rss_start_mb": round(rss_start / 2**20, 1), "rss_end_mb": round(rss_end / 2**20, 1),
        "rss_growth_pct": round((rss_end - rss_start) / rss_start * 100, 1),
        "traces": traces, "traces_equal_requests": traces == sent[0],
        "verify_exit": verify.returncode,
    }
    print(json.dumps(result, indent=2))
    if verify.returncode != 0:
        print(verify.stdout[-2000:], verify.stderr[-2000:])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["errors"] == 0 and result["traces_equal_requests"] and \
        verify.returncode == 0 else 1


async def _run(base: str, deadline: float, clients: int, latencies: list[float],
               errors: list[str], sent: list[int]) -> None:
    await asyncio.gather(*(client(base, deadline, latencies, errors, sent, i)
                           for i in range(clients)))


if __name__ == "__main__":
    sys.exit(main())
