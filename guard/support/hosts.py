"""Host names: the one parser of a `Host` value and of the trusted-host patterns of
`server.trusted_hosts`, and the set of trusted hosts they make (checked by the HTTP edge's
TrustedHostMiddleware, validated by the config)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")

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
