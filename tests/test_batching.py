"""The micro-batching queue: concurrent callers share calls of the batch function, off the loop."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from guard.judges.batching import MicroBatcher


class Recorder:
    """A batch function that squares numbers and remembers every batch and its thread.

    With a `gate`, each batch says it started (`started`) and waits until the gate is set."""

    def __init__(self, delay: float = 0.0, gate: threading.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.delay = delay
        self.gate = gate
        self.started = threading.Event()

    def __call__(self, items: list[int]) -> list[int | BaseException]:
        self.batches.append(list(items))
        self.threads.add(threading.current_thread().name)
        self.started.set()
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.delay)
        return [ValueError(f"bad {i}") if i < 0 else i * i for i in items]


async def test_concurrent_callers_share_one_batch() -> None:
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch=8, max_wait_ms=100)
    results = await asyncio.gather(batcher.submit(2), batcher.submit_many([3, 4]), batcher.submit(5))
    assert results == [4, [9, 16], 25]
    assert fn.batches == [[2, 3, 4, 5]]
    await batcher.aclose()


async def test_a_full_batch_leaves_without_waiting() -> None:
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch=3, max_wait_ms=5_000)
    t0 = time.perf_counter()
    assert await batcher.submit_many([1, 2, 3, 4, 5, 6]) == [1, 4, 9, 16, 25, 36]
    assert time.perf_counter() - t0 < 2.0  # never waited the 5 s
    assert fn.batches == [[1, 2, 3], [4, 5, 6]]
    await batcher.aclose()


async def test_a_lone_item_waits_at_most_max_wait() -> None:
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch=64, max_wait_ms=30)
    t0 = time.perf_counter()
    assert await batcher.submit(7) == 49
    assert 0.025 <= time.perf_counter() - t0 < 1.0
    await batcher.aclose()


async def test_the_loop_keeps_running_while_the_batch_function_works() -> None:
    fn = Recorder(delay=0.3)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
    batcher = MicroBatcher(fn, max_batch=4, max_wait_ms=0, executor=executor)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    assert await batcher.submit(3) == 9
    task.cancel()
    assert ticks >= 10  # ~30 possible in 0.3 s; a blocked loop would give 0
    assert fn.threads == {"model_0"}
    await batcher.aclose()
    executor.shutdown()


async def test_items_arriving_during_a_batch_form_the_next_one() -> None:
    gate = threading.Event()
    fn = Recorder(gate=gate)
    batcher = MicroBatcher(fn, max_batch=8, max_wait_ms=0)
    first = asyncio.create_task(batcher.submit(1))
    assert await asyncio.to_thread(fn.started.wait, 10)  # the first batch is running now
    more = asyncio.gather(batcher.submit(2), batcher.submit(3))
    # Callbacks run in the order they were scheduled: both callers queue their items first.
    asyncio.get_running_loop().call_soon(gate.set)
    rest = await more
    assert await first == 1 and rest == [4, 9]
    assert fn.batches == [[1], [2, 3]]
    await batcher.aclose()


async def test_one_failing_item_fails_only_its_caller() -> None:
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch=8, max_wait_ms=50)
    good, bad = await asyncio.gather(batcher.submit(3), batcher.submit(-1),
                                     return_exceptions=True)
    assert good == 9
    assert isinstance(bad, ValueError) and str(bad) == "bad -1"
    assert fn.batches == [[3, -1]]
    await batcher.aclose()


async def test_a_crashing_batch_function_fails_every_caller_and_the_queue_goes_on() -> None:
    calls = []

    def crash_once(items: list[int]) -> list[int]:
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory")
        return items

    batcher = MicroBatcher(crash_once, max_batch=8, max_wait_ms=20)
    outcomes = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    assert await batcher.submit(3) == 3
    await batcher.aclose()


async def test_cancelled_callers_are_not_computed() -> None:
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch=8, max_wait_ms=100)
    gone = asyncio.create_task(batcher.submit(10))
    await asyncio.sleep(0.01)
    gone.cancel()
    assert await batcher.submit(2) == 4
    assert fn.batches == [[2]]
    await batcher.aclose()


async def test_closed_batcher_refuses_work() -> None:
    batcher = MicroBatcher(Recorder(), max_batch=2)
    await batcher.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await batcher.submit(1)
