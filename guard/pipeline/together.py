"""Judging what is ready together: slots go their own way, but images of one request that are
ready in the same turn of the event loop (and want the same kind of answer) still go to the
judge as one batch. Nothing waits for a batch to fill: a batch leaves on the next turn."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from guard.core.policy import Policy
from guard.core.types import JudgeInput, RoundRecord, Verdict

Judging = Callable[[list[JudgeInput], Policy, Sequence[RoundRecord]],
                   Awaitable[list[Verdict | None]]]


@dataclass(eq=False, slots=True)
class _Waiting:
    items: list[JudgeInput]
    record: RoundRecord
    future: asyncio.Future[list[Verdict | None]]


class ReadyTogether:
    """`judge(items, policy, record)` calls made in one turn become one call of `judging`
    (per policy view: a verdict-only batch and an explained one stay apart)."""

    def __init__(self, judging: Judging) -> None:
        self._judging = judging
        self._waiting: dict[int, tuple[Policy, list[_Waiting]]] = {}
        self._calls: set[asyncio.Task[None]] = set()

    async def judge(self, items: list[JudgeInput], policy: Policy, record: RoundRecord
                    ) -> list[Verdict | None]:
        loop = asyncio.get_running_loop()
        waiting = _Waiting(items, record, loop.create_future())
        key = id(policy)
        if key not in self._waiting:
            self._waiting[key] = (policy, [])
            loop.call_soon(self._send, key)
        self._waiting[key][1].append(waiting)
        return await waiting.future

    def _send(self, key: int) -> None:
        policy, batch = self._waiting.pop(key)
        task = asyncio.get_running_loop().create_task(self._call(policy, batch))
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _call(self, policy: Policy, batch: list[_Waiting]) -> None:
        batch = [w for w in batch if not w.future.done()]  # a cancelled round's items are not judged
        if not batch:
            return
        try:
            verdicts = await self._judging([i for w in batch for i in w.items], policy,
                                           [w.record for w in batch])
        except asyncio.CancelledError:
            for w in batch:
                w.future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - each round waiting on the batch fails with it
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(exc)
            return
        start = 0
        for w in batch:
            if not w.future.done():
                w.future.set_result(verdicts[start:start + len(w.items)])
            start += len(w.items)

    async def aclose(self) -> None:
        """Cancel the batches still at the judge (the request is over)."""
        calls = list(self._calls)
        for task in calls:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*calls, return_exceptions=True)
