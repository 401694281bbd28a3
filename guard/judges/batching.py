"""A micro-batching queue: gather items from concurrent callers into one call of a batch function.

    batcher = MicroBatcher(score_batch, max_batch=8, max_wait_ms=5, executor=model_thread)
    results = await batcher.submit_many(items)     # from any number of concurrent requests

The batch function is synchronous (a model's forward pass) and runs in `executor`, so the event
loop never blocks on it. A batch goes as soon as it is full, or when its oldest item has waited
`max_wait_ms`; items that arrive while the function runs form the next batch. The function returns
one result per item, in order; returning an exception instance for an item fails only that item,
raising fails the whole batch.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass(slots=True)
class _Entry(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    enqueued: float = field(default=0.0)


class MicroBatcher(Generic[T, R]):
    def __init__(self, fn: Callable[[list[T]], Sequence[R | BaseException]], *,
                 max_batch: int = 8, max_wait_ms: float = 5.0,
                 executor: Executor | None = None) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._fn = fn
        self.max_batch = max_batch
        self.max_wait = max(0.0, max_wait_ms) / 1000.0
        self._executor = executor
        self._pending: list[_Entry[T, R]] = []
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    async def submit(self, item: T) -> R:
        return (await self.submit_many([item]))[0]

    async def submit_many(self, items: Sequence[T]) -> list[R]:
        """Queue `items` together (they stay in one batch where `max_batch` allows) and wait for
        their results, in order."""
        if self._closed:
            raise RuntimeError("batcher is closed")
        loop = self._ensure_worker()
        now = loop.time()
        entries = [_Entry[T, R](item, loop.create_future(), now) for item in items]
        self._pending.extend(entries)
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            return list(await asyncio.gather(*(e.future for e in entries)))
        except BaseException:
            for e in entries:
                e.future.cancel()  # a cancelled caller's items are skipped, not computed
            raise

    def _ensure_worker(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._worker is None or self._worker.done():
            # First use, or a new event loop (the old one's futures are gone with it).
            self._loop = loop
            self._pending = []
            self._wakeup = asyncio.Event()
            self._worker = loop.create_task(self._run(), name="micro-batcher")
        return loop

    async def _run(self) -> None:
        assert self._wakeup is not None and self._loop is not None
        loop, wakeup = self._loop, self._wakeup
        while True:
            self._pending = [e for e in self._pending if not e.future.done()]
            if not self._pending:
                wakeup.clear()
                await wakeup.wait()
                continue
            deadline = self._pending[0].enqueued + self.max_wait
            while len(self._pending) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wakeup.wait(), remaining)
            batch = [e for e in self._pending[:self.max_batch] if not e.future.done()]
            del self._pending[:self.max_batch]
            if batch:
                await self._call(loop, batch)

    async def _call(self, loop: asyncio.AbstractEventLoop, batch: list[_Entry[T, R]]) -> None:
        try:
            results = await loop.run_in_executor(self._executor, self._fn,
                                                 [e.item for e in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch function returned {len(results)} results "
                                   f"for {len(batch)} items")
        except asyncio.CancelledError:
            for e in batch:
                e.future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - handed to every caller of the batch
            for e in batch:
                if not e.future.done():
                    e.future.set_exception(exc)
            return
        for e, result in zip(batch, results, strict=True):
            if e.future.done():
                continue
            if isinstance(result, BaseException):
                e.future.set_exception(result)
            else:
                e.future.set_result(result)

    async def aclose(self) -> None:
        self._closed = True
        worker, self._worker = self._worker, None
        for e in self._pending:
            e.future.cancel()
        self._pending = []
        if worker is not None and not worker.done():
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                if self._loop is asyncio.get_running_loop():
                    await worker
