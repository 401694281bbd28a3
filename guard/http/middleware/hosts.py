"""Trusted hosts: the proxy answers only to the host names it is meant to be reached by.

A page on any website can make a local browser send requests to the proxy under a name the
attacker's DNS points at 127.0.0.1 (DNS rebinding); the only thing that gives such a request away
is its `Host` header. So every request names a trusted host or gets an OpenAI-shaped 400, before
any route runs, and the links and redirects the proxy builds from `Host` can only point at a
trusted name (or at `server.public_url` when one is set).

`/healthz`, `/readyz` and `/metrics` answer whatever the `Host`: orchestrators probe and
Prometheus scrapes a pod by its IP address, which no config can list in advance, and the three
say nothing beyond up / ready and counters (no trace, no prompt, no key).
"""

from __future__ import annotations

import orjson
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guard.http.errors import status_of
from guard.support.errors import RequestError
from guard.support.hosts import TrustedHosts

UNCHECKED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class TrustedHostMiddleware:
    """Refuse requests whose `Host` is not trusted with an OpenAI-shaped 400.

    When `public_url` is set, a redirect the app builds from the (trusted) `Host` is rewritten
    to point at `public_url` instead, as the proxy's links already do."""

    def __init__(self, app: ASGIApp, hosts: TrustedHosts, public_url: str | None = None) -> None:
        self.app = app
        self.hosts = hosts
        self.public_url = public_url.rstrip("/") if public_url else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNCHECKED_PATHS:
            await self.app(scope, receive, send)
            return
        host = Headers(scope=scope).get("host")
        if not self.hosts.allows(host):
            await _refuse(send, host)
            return
        if self.public_url is None or host is None:
            await self.app(scope, receive, send)
            return
        own = f"{scope.get('scheme', 'http')}://{host}".encode("latin-1").lower()
        public = self.public_url.encode("latin-1")

        async def send_rebased(message: Message) -> None:
            if message["type"] == "http.response.start" and 300 <= message["status"] < 400:
                message["headers"] = [
                    (k, public + v[len(own):] if k == b"location" and v.lower().startswith(own)
                     else v) for k, v in message["headers"]]
            await send(message)

        await self.app(scope, receive, send_rebased)


async def _refuse(send: Send, host: str | None) -> None:
    shown = repr(host[:100]) if host else "no Host header"
    error = RequestError(
        f"Requests to this server must name a trusted host; got {shown}. An operator can add it "
        "to server.trusted_hosts in the config.", param=None, code="untrusted_host")
    body = orjson.dumps(error.to_dict())
    await send({"type": "http.response.start", "status": status_of(error), "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
