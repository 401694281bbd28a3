"""A separate process that appends traces to an audit store, for the concurrent-writer tests.

    python -m tests.audit_writer '<audit options JSON>' <writer name> <count> <tasks> <go file> \
        [<all writers' names, comma-separated>]

It builds the store from the options exactly as the proxy does, waits until the go file exists
(so that all writers start together), then writes `count` traces from `tasks` concurrent
coroutines through the store's ordinary `write`, each trace's key_id naming the writer.

Given the names of all writers, it writes in batches of BATCH with a barrier after each (every
writer finishes batch k before any starts batch k+1). Inside a batch the writers race freely;
the barrier only guarantees that every batch holds rows of every writer, so a test of concurrent
appends cannot pass by one process having run alone (a loaded machine's scheduler can do that).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from guard.core.types import JudgedImage, RoundRecord, Trace
from guard.plugins import build_store


def sample_trace(writer: str, i: int, **fields: Any) -> Trace:
    """A trace shaped like a real edited request: prescreen, an unsafe round, a safe round.
    Keyword arguments replace top-level fields."""
    prompt = f"a street scene number {i} with a bloodbath"
    values: dict[str, Any] = {
        "key_id": writer, "tenant": "acme", "model": "gpt-image-1", "backend": "fake",
        "request": {"prompt": prompt, "n": 1, "size": "1024x1024"},
        "policy": {"id": "default", "version": 3, "sha256": "ab" * 32},
        "decision": "edited", "status": 200, "categories": ["violence"], "duration_ms": 812.5,
        "rounds": [
            RoundRecord(index=0, kind="prescreen", judge_ms=1.2, images=[JudgedImage(
                slot=0, prompt=prompt, judge_id="builtin", scores={"violence": 0.95},
                flagged=["violence"], action="edit", thought="violent term in the prompt",
                refined_prompt=f"a street scene number {i} with a water balloon fight")]),
            RoundRecord(index=1, kind="generate", backend="fake", backend_ms=401.0, judge_ms=20.5,
                        images=[JudgedImage(slot=0, prompt=prompt, image_sha256=f"{i:064x}",
                                            judge_id="builtin", scores={"violence": 0.72},
                                            flagged=["violence"], action="edit",
                                            refined_prompt="a calm street scene")]),
            RoundRecord(index=2, kind="generate", backend="fake", backend_ms=380.0, judge_ms=19.0,
                        images=[JudgedImage(slot=0, prompt="a calm street scene",
                                            image_sha256=f"{i + 1:064x}", judge_id="builtin",
                                            scores={"violence": 0.02}, action="pass")]),
        ],
    }
    return Trace(**{**values, **fields})


BATCH = 50


def _wait_for(*files: Path) -> None:
    while not all(f.exists() for f in files):
        time.sleep(0.005)


async def main(options: dict[str, object], writer: str, count: int, tasks: int,
               go: Path, writers: list[str]) -> None:
    store = build_store(options)
    await store.ready()  # connect (and migrate) before the start line
    go.with_name(f"{go.name}.{writer}.ready").touch()  # tells the test this writer is set
    await asyncio.to_thread(_wait_for, go)
    step = BATCH if writers else count
    for batch, start in enumerate(range(0, count, step)):
        queue = iter(range(start, min(start + step, count)))

        async def worker(queue: Iterator[int] = queue) -> None:
            for i in queue:
                await store.write(sample_trace(writer, i, created_at=time.time()))

        await asyncio.gather(*(worker() for _ in range(tasks)))
        if writers:
            go.with_name(f"{go.name}.{writer}.{batch}").touch()
            await asyncio.to_thread(_wait_for, *(go.with_name(f"{go.name}.{w}.{batch}")
                                                 for w in writers))
    await store.aclose()


if __name__ == "__main__":
    opts, name, n, t, go_file, *names = sys.argv[1:]
    asyncio.run(main(orjson.loads(opts), name, int(n), int(t), Path(go_file),
                     names[0].split(",") if names else []))
