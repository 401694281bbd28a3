"""Who the client is behind a reverse proxy: `X-Forwarded-For` counts only from a trusted proxy.

Behind the shipped nginx every connection comes from nginx's address, so whatever is limited per
client address (the review pages' failed sign-ins) must read the client nginx forwarded, or one
attacker locks every auditor out. But a header any client can write must not count from anyone
else, or rotating it evades the limit. So `server.trusted_proxies` (addresses or CIDRs; default
loopback only, as uvicorn's) names the proxies whose forwarded headers count: the client is the
right-most address of `X-Forwarded-For` that is not itself a trusted proxy, walking back from the
connection's peer; a header from anyone else is ignored. uvicorn's own proxy handling is turned
off (`safeedit serve`), so this is the one place that decides, for every route.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(entries: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)


class ForwardedClient:
    """Set `scope["client"]` to the forwarded client when the peer is a trusted proxy."""

    def __init__(self, app: ASGIApp, trusted: Iterable[str]) -> None:
        self.app = app
        self.trusted = networks(trusted)

    def _is_trusted(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.strip().strip("[]"))
        except ValueError:
            return False
        return any(address in net for net in self.trusted)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and scope.get("client"):
            peer, port = scope["client"]
            if self._is_trusted(peer):
                client = self._client(scope, peer)
                if client != peer:
                    scope = {**scope, "client": (client, 0)}
        await self.app(scope, receive, send)

    def _client(self, scope: Scope, peer: str) -> str:
        hops = [h.strip() for name, value in scope.get("headers", ())
                if name == b"x-forwarded-for" for h in value.decode("latin-1").split(",")]
        for hop in reversed(hops):
            if not hop:
                continue
            if not self._is_trusted(hop):
                try:
                    return str(ipaddress.ip_address(hop.strip("[]")))
                except ValueError:
                    return peer  # a malformed hop: trust nothing beyond the proxy itself
        return peer
