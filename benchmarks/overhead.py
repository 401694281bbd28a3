"""What the guard costs: direct backend calls vs. the proxy in passthrough vs. the builtin judge.

One run, side by side, against a local fake backend answering a 1024x1024 PNG (~2 MB):
  direct       client -> backend
  relay        client -> a 12-line Starlette + httpx relay (benchmarks/min_relay.py) -> backend:
               the floor of any Python relay of these bodies on this machine
  passthrough  client -> proxy (guard.enabled: false) -> backend
  builtin      client -> proxy (builtin judge: prescreen + NudeNet on every image) -> backend
at concurrency 1 and 16. Prints p50/p99 latency, added latency over direct, and the proxy's
CPU ms per request (from the proxy process's own CPU times). Each process is separate, so the
proxy's CPU is its own; the machine is shared, so compare the rows of one run, not across runs.

The targets take turns in `--rounds` rounds, so the machine's noise weighs on all alike.

Run: .venv/bin/python benchmarks/overhead.py [--requests 200] [--rounds 5] [--json out.json]
     [--baseline DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_up(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(url)


def start_proxy(backend_url: str, tmp: Path, enabled: bool, source: Path = ROOT
                ) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = {
        "backends": {"bench": {"kind": "openai-compatible", "api_base": backend_url}},
        "routes": {"*": {"backend": "bench"}},
        "audit": {"kind": "sqlite", "path": str(tmp / f"audit-{port}.db")},
        "guard": {"enabled": enabled},
        "judge": {"kind": "builtin"},
    }
    path = tmp / f"config-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([PY, "-m", "guard.cli", "serve", "--config", str(path),
                             "--port", str(port), "--log-level", "warning"],
                            cwd=source, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(source)})
    url = f"http://127.0.0.1:{port}"
    wait_up(url + "/readyz", timeout=120)
    return proc, url + "/v1"


def cpu_s(proc: psutil.Process | None) -> float:
    return sum(proc.cpu_times()[:2]) if proc else 0.0


async def load(base: str, requests: int, concurrency: int,
               proc: psutil.Process | None = None) -> tuple[list[float], float]:
    """Latencies of `requests` requests, `concurrency` at a time, after a warm-up; and the CPU
    seconds `proc` spent on them (not on the warm-up)."""
    latencies: list[float] = []
    body = {"prompt": "a quiet harbour at dawn, boats and gulls", "n": 1,
            "response_format": "b64_json"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=120,
                                 headers={"authorization": "Bearer bench"}) as client:
        queue = list(range(requests))

        async def worker() -> None:
            while queue:
                queue.pop()
                t0 = time.perf_counter()
                r = await client.post("/images/generations", json=body)
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    raise RuntimeError(f"{base}: HTTP {r.status_code}: {r.text[:200]}")

        for _ in range(min(5, requests)):  # warm-up: connections, first-request paths
            await client.post("/images/generations", json=body)
        latencies.clear()
        cpu0 = cpu_s(proc)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, cpu_s(proc) - cpu0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds in which the targets take turns (default 5)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--baseline", type=Path,
                        help="another checkout of the proxy (e.g. `git worktree add /tmp/base "
                             "HEAD~3`), measured beside this one as base-passthrough and "
                             "base-builtin")
    args = parser.parse_args()
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

    tmp = Path(tempfile.mkdtemp(prefix="safeedit-bench-"))
    bport = free_port()
    backend = subprocess.Popen([PY, str(ROOT / "benchmarks/fake_image_server.py"), str(bport)])
    procs: list[subprocess.Popen[bytes]] = [backend]
    try:
        backend_url = f"http://127.0.0.1:{bport}/v1"
        wait_up(f"http://127.0.0.1:{bport}/v1/images/generations")
        targets: dict[str, tuple[str, psutil.Process | None]] = {"direct": (backend_url, None)}
        rport = free_port()
        relay = subprocess.Popen([PY, str(ROOT / "benchmarks/min_relay.py"), str(rport),
                                  backend_url])
        procs.append(relay)
        wait_up(f"http://127.0.0.1:{rport}/readyz")
        targets["relay"] = (f"http://127.0.0.1:{rport}/v1", psutil.Process(relay.pid))
        sources = [("", ROOT)] + ([("base-", args.baseline.resolve())] if args.baseline else [])
        for prefix, source in sources:
            for name, enabled in (("passthrough", False), ("builtin", True)):
                proc, url = start_proxy(backend_url, tmp, enabled, source)
                procs.append(proc)
                targets[prefix + name] = (url, psutil.Process(proc.pid))

        rows = []
        per_round = max(1, args.requests // args.rounds)
        for concurrency in (1, 16):
            lats: dict[str, list[float]] = {name: [] for name in targets}
            cpus: dict[str, list[float]] = {name: [] for name in targets}
            # The targets take turns, round by round, so that the machine's noise weighs on all
            # of them alike; CPU per request is the median of the rounds.
            for _ in range(args.rounds):
                for name, (url, proc) in targets.items():
                    lat, cpu = asyncio.run(load(url, per_round, concurrency, proc))
                    lats[name] += lat
                    cpus[name].append(cpu * 1000 / len(lat))
            for name, (_, proc) in targets.items():
                lat = lats[name]
                rows.append({"mode": name, "concurrency": concurrency, "requests": len(lat),
                             "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99),
                             "mean_ms": statistics.fmean(lat) * 1000,
                             "proxy_cpu_ms_per_req": statistics.median(cpus[name]) if proc
                             else None})
        direct = {r["concurrency"]: r for r in rows if r["mode"] == "direct"}
        print(f"\n{'mode':<17} {'conc':>4} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} "
              f"{'+p99 ms':>8} {'proxy CPU ms/req':>17}")
        for r in rows:
            d = direct[r["concurrency"]]
            r["added_p50_ms"] = r["p50_ms"] - d["p50_ms"]
            r["added_p99_ms"] = r["p99_ms"] - d["p99_ms"]
            cpu = "-" if r["proxy_cpu_ms_per_req"] is None else f"{r['proxy_cpu_ms_per_req']:.1f}"
            print(f"{r['mode']:<17} {r['concurrency']:>4} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
                  f"{r['added_p50_ms']:>8.1f} {r['added_p99_ms']:>8.1f} {cpu:>17}")
        print(f"\n{args.requests} requests per row in {args.rounds} rounds (CPU: the rounds' "
              f"median); 1024x1024 PNG; {os.cpu_count()} CPUs; "
              "builtin = prescreen + NudeNet per image + SQLite trace.")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
