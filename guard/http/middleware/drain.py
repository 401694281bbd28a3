"""Graceful drain: an instance that is told to stop (SIGTERM) first goes unready and finishes
what it started, while it still answers.

    Drain.begin()        /readyz turns false; new requests get an OpenAI-shaped 503 with
                         Retry-After, so clients and the load balancer go elsewhere
    Drain.in_flight      requests still running (counted by the Drain as ASGI middleware)
    Drain.cut()          the drain timeout passed: what still runs is cancelled, and answered
                         the same 503 when its answer had not begun

The server (`safeedit serve`) calls `begin`, keeps the socket open, serving those 503s, until
`in_flight` is 0 (calling `cut` at the drain timeout), and only then stops and runs the app's
shutdown (which flushes traces and anchors). An app publishes its Drain as `drain` in its
lifespan state.

Paths in `exempt` pass while draining: health and metrics, so that probes see the instance go
unready, and any endpoint that refuses on its own through `unless_draining` (the images API
does, so that its refusal leaves a trace).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guard.http.errors import status_of
from guard.support.errors import Draining

T = TypeVar("T")
RETRY_AFTER_S = 1  # another instance behind the load balancer can take the retry at once


class Drain:
    def __init__(self, exempt: tuple[str, ...] = ()) -> None:
        self.exempt = exempt
        self.draining = False
        self.cut_short = False
        self._running: set[asyncio.Task[Any]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def begin(self) -> None:
        self.draining = True

    def cut(self) -> None:
        """The drain timeout passed: cancel what still runs. A request that has not begun its
        answer gets the 503 (a stream already under way just ends)."""
        self.cut_short = True
        for task in self._running:
            task.cancel()

    def unless_draining(self, step: Callable[[], Awaitable[T]]) -> Callable[[], Awaitable[T]]:
        """`step`, raising `Draining` instead once draining began: for an endpoint that refuses
        on its own, with its own trace."""
        async def checked() -> T:
            if self.draining:
                raise _refusal()
            return await step()

        return checked

    def middleware(self, app: ASGIApp) -> ASGIApp:
        """The app wrapped: every HTTP request counted while it runs, new ones refused (503)
        while draining unless exempt."""
        async def counted(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            if self.draining and not scope["path"].startswith(self.exempt):
                await _refuse(send)
                return
            task = asyncio.current_task()
            assert task is not None
            answering = False

            async def watched(message: Message) -> None:
                nonlocal answering
                answering = answering or message["type"] == "http.response.start"
                await send(message)

            self._running.add(task)
            try:
                await app(scope, receive, watched)
            except asyncio.CancelledError:
                if not self.cut_short or answering:
                    raise
                task.uncancel()  # our own cut: answered here, not a cancellation upstream
                await _refuse(send)
            finally:
                self._running.discard(task)

        return counted


def _refusal() -> Draining:
    return Draining("This server is shutting down; retry the request.",
                    headers={"retry-after": str(RETRY_AFTER_S)})


async def _refuse(send: Send) -> None:
    error = _refusal()
    body = orjson.dumps(error.to_dict())
    await send({"type": "http.response.start", "status": status_of(error), "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        *((k.encode(), v.encode()) for k, v in error.headers.items())]})
    await send({"type": "http.response.body", "body": body})
