"""A separate process that appends traces to an audit store, for the concurrent-writer tests.

    python -m tests.audit_writer '<audit options JSON>' <writer name> <count> <tasks> <go file>

It builds the store from the options exactly as the proxy does, waits until the go file exists
(so that all writers start together), then writes `count` traces from `tasks` concurrent
coroutines through the store's ordinary `write`, each trace's key_id naming the writer.
"""

from __future__ import annotations

import asyncio
import sys
import time
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


def _wait_for(go: Path) -> None:
    while not go.exists():
        time.sleep(0.005)


async def main(options: dict[str, object], writer: str, count: int, tasks: int,
               go: Path) -> None:
    store = build_store(options)
    await store.ready()  # connect (and migrate) before the start line
    go.with_name(f"{go.name}.{writer}.ready").touch()  # tells the test this writer is set
    await asyncio.to_thread(_wait_for, go)
    queue = iter(range(count))

    async def worker() -> None:
        for i in queue:
            await store.write(sample_trace(writer, i, created_at=time.time()))

    await asyncio.gather(*(worker() for _ in range(tasks)))
    await store.aclose()


if __name__ == "__main__":
    opts, name, n, t, go_file = sys.argv[1:]
    asyncio.run(main(orjson.loads(opts), name, int(n), int(t), Path(go_file)))
