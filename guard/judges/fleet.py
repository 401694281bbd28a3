"""Several judge servers behind one `remote` judge: least outstanding requests, health checks,
ejection and return.

    judge:
      kind: remote
      api_bases: [http://judge-a:8000/v1, http://judge-b:8000/v1]
      health_interval_s: 5     # GET {api_base}/models on every server this often (0: never)
      eject_after: 3           # this many failures in a row (timeout, connection error, 429,
      eject_s: 30              # 5xx) take a server out of rotation for this long, or until a
                               # health check passes

A micro-batch (one `judge()` call) goes to one server, so that server batches its requests
together and shares their prompt prefix in its cache; a retry goes to the least busy *other*
server in rotation. With every server ejected the judge still tries the one whose ejection ends
first rather than failing at once: ejection is a preference, and the policy's `on_judge_error`
decides what a judge failure means.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

from guard.support.bodies import ResponseTooLarge

log = logging.getLogger("safeedit.judge.fleet")


@dataclass(slots=True)
class Server:
    base: str
    outstanding: int = 0     # requests in flight to it
    failures: int = 0        # in a row
    ejected_until: float = 0.0
    served: int = 0          # requests answered

    def in_rotation(self, now: float) -> bool:
        return now >= self.ejected_until


class Fleet:
    def __init__(self, bases: Sequence[str], *, eject_after: int = 3, eject_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not bases:
            raise ValueError("a fleet needs at least one server")
        self.servers = [Server(base.rstrip("/")) for base in bases]
        self.eject_after, self.eject_s, self._clock = eject_after, eject_s, clock
        self._turn = itertools.count()  # breaks ties in turn, so idle servers share the load

    def pick(self, avoid: Server | None = None) -> Server:
        """The server in rotation with the fewest requests in flight (other than `avoid`, while
        there is another); with none in rotation, the one that returns first."""
        now = self._clock()
        live = [s for s in self.servers if s.in_rotation(now)]
        if not live:
            return min(self.servers, key=lambda s: s.ejected_until)
        others = [s for s in live if s is not avoid] or live
        least = min(s.outstanding for s in others)
        tied = [s for s in others if s.outstanding == least]
        return tied[next(self._turn) % len(tied)]

    @contextmanager
    def busy(self, server: Server, requests: int = 1) -> Iterator[Server]:
        server.outstanding += requests
        try:
            yield server
        finally:
            server.outstanding -= requests

    def succeeded(self, server: Server) -> None:
        server.failures = 0
        server.served += 1

    def failed(self, server: Server) -> None:
        server.failures += 1
        if server.failures >= self.eject_after and server.in_rotation(self._clock()):
            self._eject(server, f"{server.failures} failures in a row")

    def _eject(self, server: Server, why: str) -> None:
        server.ejected_until = self._clock() + self.eject_s
        log.warning("judge server %s out of rotation for %.0f s: %s", server.base, self.eject_s,
                    why)

    async def check(self, client: httpx.AsyncClient, timeout_s: float = 2.0) -> list[bool]:
        """Ask every server for its model list: a healthy answer returns an ejected server to
        rotation at once; a failed one ejects it. The results, in server order."""
        async def one(server: Server) -> bool:
            try:
                ok = (await client.get(f"{server.base}/models", timeout=timeout_s)
                      ).status_code == 200
            except (httpx.HTTPError, ResponseTooLarge):
                ok = False
            if ok and not server.in_rotation(self._clock()):
                log.warning("judge server %s back in rotation", server.base)
                server.ejected_until, server.failures = 0.0, 0
            elif not ok and server.in_rotation(self._clock()):
                self._eject(server, "health check failed")
            return ok

        return list(await asyncio.gather(*(one(s) for s in self.servers)))

    async def watch(self, client: httpx.AsyncClient, interval_s: float) -> None:
        """Health checks every `interval_s` until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            await self.check(client)

    def status(self) -> list[dict[str, object]]:
        now = self._clock()
        return [{"api_base": s.base, "in_rotation": s.in_rotation(now),
                 "outstanding": s.outstanding, "served": s.served} for s in self.servers]
