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

import ipaddress
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

import orjson
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guard.errors import RequestError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
UNCHECKED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

_NAME = re.compile(r"[a-z0-9_](?:[a-z0-9_.-]{0,252})")  # a DNS name or dotted IPv4 address
_PORT = re.compile(r"[0-9]{1,5}")


def host_name(host: str) -> str | None:
    """The name in a `Host` value, lower-cased, without port, brackets or trailing dot; None
    when it is not a well-formed host (`name`, `name:port`, `[v6]`, `[v6]:port`)."""
    host = host.strip().lower()
    if host.startswith("["):
        inside, bracket, rest = host[1:].partition("]")
        if not bracket or (rest and not (rest[0] == ":" and _PORT.fullmatch(rest[1:]))):
            return None
        try:
            return str(ipaddress.IPv6Address(inside))
        except ValueError:
            return None
    name, colon, port = host.partition(":")
    if colon and not _PORT.fullmatch(port):
        return None
    name = name.removesuffix(".")
    return name if _NAME.fullmatch(name) and ".." not in name else None


def pattern_name(pattern: str) -> str:
    """A trusted-host pattern in canonical form: `*`, `*.example.com` or a host name / IP
    address (IPv6 with or without brackets); ValueError for anything else."""
    text = pattern.strip().lower()
    if text == "*":
        return text
    wildcard = text.startswith("*.")
    bare = text[2:] if wildcard else text
    if ":" in bare and not bare.startswith("["):
        bare = f"[{bare}]"  # a bare IPv6 address, as written in a config
    name = host_name(bare)
    if name is None or "*" in bare or (wildcard and ":" in name) or _has_port(bare):
        raise ValueError(f"{pattern!r} is not a host name, `*.domain` or `*` "
                         "(no scheme, path or port: any port is accepted)")
    return f"*.{name}" if wildcard else name


def _has_port(host: str) -> bool:
    return ("]:" in host) if host.startswith("[") else (":" in host)


class TrustedHosts:
    """Host patterns: exact names, `*.domain` (any subdomain, not the domain itself), `*`."""

    def __init__(self, patterns: Iterable[str]) -> None:
        names = {pattern_name(p) for p in patterns}
        self.any = "*" in names
        self._suffixes = tuple(n[1:] for n in names if n.startswith("*."))
        self._exact = frozenset(n for n in names if not n.startswith("*"))

    @classmethod
    def for_server(cls, patterns: Iterable[str] | None, bind: str,
                   public_url: str | None) -> TrustedHosts:
        """The configured patterns (default: the bind address and the loopback names), plus the
        host of `public_url`."""
        trusted = list(patterns) if patterns is not None else [bind, *LOOPBACK_NAMES]
        public = urlsplit(public_url).hostname if public_url else None
        return cls([*trusted, *([public] if public else [])])

    def allows(self, host: str | None) -> bool:
        name = host_name(host) if host else None
        if name is None:
            return False
        return self.any or name in self._exact or name.endswith(self._suffixes)


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
    await send({"type": "http.response.start", "status": error.status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
