"""Lifecycles of the parts the proxy holds (judge, backends, audit store), declared, not probed.

Every part has `ready()` and `aclose()` (part of its role's Protocol). A part that needs work
before it can serve (loading a model, opening a pool) is also `Startable`: the app starts it off
the request path and `/readyz` reports false until it is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

log = logging.getLogger("safeedit.lifecycle")


@runtime_checkable
class Startable(Protocol):
    async def start(self) -> None:
        """Prepare to serve (load weights, connect); may take long, runs in the background."""
        ...


@runtime_checkable
class Part(Protocol):
    async def ready(self) -> bool: ...

    async def aclose(self) -> None: ...


def start_all(parts: Iterable[object]) -> list[asyncio.Task[None]]:
    """Start every Startable part in the background; the tasks are cancelled by `close_all`."""
    return [asyncio.create_task(part.start()) for part in parts if isinstance(part, Startable)]


async def close_all(parts: Iterable[Part], starting: Iterable[asyncio.Task[None]] = ()) -> None:
    for task in starting:
        task.cancel()
    for part in parts:
        try:
            await part.aclose()
        except Exception:  # noqa: BLE001 - one part failing to close must not keep others open
            log.warning("closing %s failed", type(part).__name__, exc_info=True)


async def readiness(parts: Iterable[tuple[str, Part]], timeout_s: float = 5.0) -> dict[str, bool]:
    """Each part's readiness; a part that fails or hangs is not ready."""
    async def one(part: Part) -> bool:
        with contextlib.suppress(Exception):
            return bool(await asyncio.wait_for(part.ready(), timeout=timeout_s))
        return False

    named = list(parts)
    results = await asyncio.gather(*(one(part) for _, part in named))
    return {name: ok for (name, _), ok in zip(named, results, strict=True)}
