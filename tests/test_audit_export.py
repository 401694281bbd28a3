"""`safeedit audit export` and `verify` on a 100,000-trace SQLite log, run as real processes with
their peak memory measured: the export streams, so memory does not grow with the log."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from guard.core.hashchain import link_hash
from guard.core.types import Trace
from guard.plugins import build_store
from tests.audit_writer import sample_trace

pytestmark = pytest.mark.slow  # ~10 s to write the log on two idle cores

N = 100_000
BASE_TIME = 1_700_000_000.0
ROOT = Path(__file__).resolve().parent.parent
# Runs a command and prints its peak resident memory (KiB): the wrapper's only child is it.
PEAK_RSS = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
            "sys.exit(r.returncode)")


@pytest.fixture(scope="module")
def big_log(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """100,000 traces of about 1.8 KB each (prescreen and two rounds), written through the store's
    bulk path (`write_many`: the same sealing and chain as `write`, one commit per 5,000).
    Traces are copies of one validated trace with their own id and time, built with
    `model_construct` so that the fixture spends its time in the store, not in pydantic."""
    tmp = tmp_path_factory.mktemp("big-log")
    options = {"kind": "sqlite", "path": str(tmp / "audit.db")}
    fields = dict(sample_trace("app", 0))

    async def fill() -> None:
        store = build_store(options)
        for start in range(0, N, 5000):
            await store.write_many([Trace.model_construct(**{
                **fields, "id": "tr_" + uuid.uuid4().hex, "created_at": BASE_TIME + i,
                "tenant": "acme" if i % 4 else "globex"}) for i in range(start, start + 5000)])
        await store.aclose()

    started = time.perf_counter()
    asyncio.run(fill())
    print(f"\nwrote {N} traces in {time.perf_counter() - started:.1f} s")
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump({"audit": options}))
    return {"config": str(config), "dir": tmp}


def run_measured(*args: str) -> tuple[subprocess.CompletedProcess[str], float, float]:
    """(result, peak RSS in MB, seconds) of `safeedit <args>` in its own process."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, sys.executable, "-m", "guard.cli",
                             *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=os.environ.copy())
    elapsed = time.perf_counter() - started
    *out, peak_kib = result.stdout.rstrip("\n").split("\n")
    result.stdout = "\n".join(out)
    return result, int(peak_kib) / 1024, elapsed


def test_export_100k_traces_streams_in_under_200_mb(big_log) -> None:  # type: ignore[no-untyped-def]
    out = big_log["dir"] / "all.jsonl"
    result, peak_mb, seconds = run_measured("audit", "export", "--config", big_log["config"],
                                            "--format", "jsonl", "--output", str(out))
    assert result.returncode == 0, result.stderr
    print(f"\nexport jsonl: {N} traces, {out.stat().st_size / 1e6:.0f} MB written, "
          f"peak RSS {peak_mb:.0f} MB, {seconds:.1f} s")
    assert peak_mb < 200
    assert out.stat().st_size > 150e6  # the output is larger than the limit: it was streamed
    assert f"exported {N} traces" in result.stderr
    seen: dict[int, tuple[str | None, str]] = {}
    with out.open("rb") as f:
        for number, line in enumerate(f, start=1):
            if number in (1, 2, 50_000, N):
                record = orjson.loads(line)
                assert record["seq"] == number
                assert record["rounds"][1]["images"][0]["scores"] == {"violence": 0.72}
                # Anyone can re-check a line: hash = sha256(prev_hash + canonical JSON).
                body = {k: v for k, v in record.items() if k not in ("seq", "prev_hash", "hash")}
                canonical = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
                assert link_hash(record["prev_hash"], canonical) == record["hash"]
                seen[number] = (record["prev_hash"], record["hash"])
    assert number == N
    assert seen[1][0] is None and seen[2][0] == seen[1][1]


def test_export_csv_since_and_tenant(big_log) -> None:  # type: ignore[no-untyped-def]
    since = dt.datetime.fromtimestamp(BASE_TIME + N - 1000, dt.UTC).isoformat()
    result, peak_mb, _ = run_measured("audit", "export", "--config", big_log["config"],
                                      "--format", "csv", "--since", since, "--tenant", "globex")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 250  # every 4th of the last 1,000
    assert rows[0]["seq"] == str(N - 1000 + 1) and rows[-1]["seq"] == str(N - 3)
    assert {r["tenant"] for r in rows} == {"globex"}
    first = rows[0]
    assert first["time_utc"].startswith(dt.datetime.fromtimestamp(
        BASE_TIME + N - 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    assert (first["decision"], first["categories"], first["policy_id"], first["rounds"]) == (
        "edited", "violence", "default", "2")
    assert first["prompt"] == "a street scene number 0 with a bloodbath" and first["hash"]


def test_verify_100k_traces(big_log) -> None:  # type: ignore[no-untyped-def]
    result, peak_mb, seconds = run_measured("audit", "verify", "--config", big_log["config"])
    print(f"\nverify: {N} traces in {seconds:.1f} s, peak RSS {peak_mb:.0f} MB")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"checked {N} traces (seq 1..{N})" in result.stdout and "OK" in result.stdout
    assert peak_mb < 200


@pytest.mark.parametrize("prompt", ['=HYPERLINK("http://evil.example","click")', "+1+cmd|' /C calc'!A0",
                                    "-2+3", "@SUM(1)", "\tindented"])
def test_csv_cells_a_spreadsheet_would_run_are_written_as_text(tmp_path: Path, prompt: str) -> None:
    options = {"kind": "sqlite", "path": str(tmp_path / "audit.db")}

    async def write() -> None:
        store = build_store(options)
        fields = dict(sample_trace("app", 0))
        await store.write(Trace.model_validate({**fields, "request": {"prompt": prompt},
                                                "tenant": "=tenant", "created_at": BASE_TIME}))
        await store.aclose()

    asyncio.run(write())
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"audit": options}))
    result, _, _ = run_measured("audit", "export", "--config", str(config), "--format", "csv")
    assert result.returncode == 0, result.stderr
    row = next(csv.DictReader(io.StringIO(result.stdout)))
    assert row["prompt"] == "'" + prompt and row["tenant"] == "'=tenant"
    assert row["seq"] == "1" and row["policy_version"].isdigit()  # numbers stay numbers
