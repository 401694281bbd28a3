"""Fetching the images a backend returns as URLs, safely enough to judge them.

A backend's answer decides where the guard connects next, so a URL is treated as hostile:
    - http and https only; the host is resolved once, every address it resolves to must be public
      (not private, loopback, link-local, shared, reserved or multicast; an IPv6 form that
      carries IPv4 addresses, ::ffff:a.b.c.d, NAT64, 6to4, Teredo and the rest, is judged by each
      of them and by its own form: `classify`) unless the backend's config allows it, and the
      connection goes to that checked address (the name still goes in Host and TLS SNI), so DNS
      cannot answer differently the second time;
    - redirects are followed by hand, each hop checked again, at most `max_redirects`;
    - no credentials: the backend's API key is never sent to an image URL;
    - the body is streamed and cut off at `max_bytes`; its content type must be an image (or
      octet-stream); then it gets the checks an upload gets (guard.support.inputs.validate_image): PNG,
      JPEG or WebP, PIL's verify, and at most `max_pixels` pixels, read from the header before
      anything is decoded (decompression bombs).
Base64 images from a backend get the same image checks (`image_from_b64`).

Options (`image_urls:` in a backend's section; the two limits apply to base64 answers too):
    allow_private (false)   allow every non-public address (a backend on the same private network)
    allow_networks ([])     allow just these networks, e.g. ["10.20.0.0/16"]
    max_bytes (20000000)    largest image
    max_pixels (16777216)   largest width x height (4096 x 4096)
    max_redirects (3)
    timeout_s (30)
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import AsyncIterator, Callable

import httpx
from pydantic import Field, IPvAnyNetwork

from adapters.options import Options
from guard.core.types import Base64, GeneratedImage
from guard.support.errors import BackendError, RequestError
from guard.support.inputs import MAX_PIXELS, validate_image

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_BINARY_TYPES = ("application/octet-stream", "binary/octet-stream")


class UrlPolicy(Options):
    allow_private: bool = False
    allow_networks: list[IPvAnyNetwork] = Field(default_factory=list)
    max_bytes: int = Field(20_000_000, gt=0)
    max_pixels: int = Field(MAX_PIXELS, gt=0)
    max_redirects: int = Field(3, ge=0, le=10)
    timeout_s: float = Field(30.0, gt=0)

    def allows(self, address: IPAddress) -> bool:
        if self.allow_private or any(address in net for net in self.allow_networks):
            return True
        return classify(address) is None


def classify(address: IPAddress) -> str | None:
    """Why `address` is not a public unicast address to connect to, or None when it is.

    An IPv6 address that carries an IPv4 one is judged by the IPv4 address (every one it
    carries), and then by its own form: some forms are never a public destination."""
    if isinstance(address, ipaddress.IPv6Address) and not (address.is_unspecified
                                                           or address.is_loopback):
        for network, form, public, extract in _IPV4_IN_IPV6:
            if address in network:
                for inner in extract(address):
                    reason = _special(inner)
                    if reason:
                        return f"{form}, carrying {inner}: {reason}"
                return None if public else f"{form}, never public"
    return _special(address)


# IANA's "not globally reachable" since 2010; Python before 3.11.10 / 3.12.4 knew only two parts
# (and calls 192.0.0.9 and .10, anycast services, global: no image host either).
_IETF_PROTOCOL = ipaddress.IPv4Network("192.0.0.0/24")


def _special(address: IPAddress) -> str | None:
    # Each check on its own: `is_global` alone lets multicast (both versions), IPv6 site-local
    # and the reserved ::/8 (IPv4-compatible, NAT64) through.
    for reason, hit in (("unspecified", address.is_unspecified),
                        ("loopback", address.is_loopback),
                        ("link-local", address.is_link_local),
                        ("multicast", address.is_multicast),
                        ("private", address.is_private),
                        ("reserved", address.is_reserved),
                        ("site-local", isinstance(address, ipaddress.IPv6Address)
                         and address.is_site_local),
                        ("protocol-assignment", address in _IETF_PROTOCOL),
                        ("non-global", not address.is_global)):
        if hit:
            return reason
    return None


_Carried = Callable[[ipaddress.IPv6Address], list[ipaddress.IPv4Address]]


def _octets(first: int) -> _Carried:
    return lambda a: [ipaddress.IPv4Address(a.packed[first:first + 4])]


# IPv6 forms that carry IPv4 addresses: network, name, whether the form may be a public
# destination (when all it carries is), and the IPv4 addresses it carries. Python's `is_global`
# calls most of these forms global whatever they carry.
_IPV4_IN_IPV6: tuple[tuple[ipaddress.IPv6Network, str, bool, _Carried], ...] = (
    (ipaddress.IPv6Network("::ffff:0:0/96"), "IPv4-mapped", True, _octets(12)),
    (ipaddress.IPv6Network("64:ff9b::/96"), "NAT64", True, _octets(12)),
    (ipaddress.IPv6Network("2002::/16"), "6to4", True, _octets(2)),
    # Deprecated or local forms: refused whatever they carry (a non-public IPv4 is named first).
    (ipaddress.IPv6Network("::/96"), "IPv4-compatible", False, _octets(12)),
    (ipaddress.IPv6Network("::ffff:0:0:0/96"), "IPv4-translated", False, _octets(12)),
    # Server, then client (stored with its bits inverted; `teredo` undoes that).
    (ipaddress.IPv6Network("2001::/32"), "Teredo", False, lambda a: list(a.teredo or ())),
    # RFC 8215 lets the operator pick the prefix length, so the IPv4 address may sit elsewhere
    # (RFC 6052 2.2); only the /96 place is read, to name it: the form is refused anyway.
    (ipaddress.IPv6Network("64:ff9b:1::/48"), "local-use NAT64", False, _octets(12)),
)


async def _resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class ImageFetcher:
    """Fetches image URLs for one backend under its UrlPolicy."""

    def __init__(self, backend: str, policy: UrlPolicy | None = None) -> None:
        self.backend = backend
        self.policy = policy or UrlPolicy()
        # trust_env=False: an HTTP proxy from the environment would resolve names itself and
        # undo the address check.
        self._client = httpx.AsyncClient(follow_redirects=False, trust_env=False,
                                         timeout=httpx.Timeout(self.policy.timeout_s))

    def _error(self, what: str) -> BackendError:
        return BackendError(f"backend {self.backend!r} returned an image URL that {what}",
                            code="backend_bad_response")

    async def fetch(self, url: str, *, revised_prompt: str | None = None) -> GeneratedImage:
        try:
            current = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise self._error("is not a valid URL") from exc
        for _ in range(self.policy.max_redirects + 1):
            async with self._open(current) as response:
                if response.is_redirect:
                    location = response.headers.get("location", "")
                    current = current.join(location)
                    continue
                data = await self._read(response)
            return GeneratedImage(data=data, backend_revised_prompt=revised_prompt,
                                  media_type=_check_image(data, "url", self.backend, self.policy))
        raise self._error(f"redirected more than {self.policy.max_redirects} times")

    async def _addresses(self, url: httpx.URL) -> list[IPAddress]:
        """Every address the URL's host resolves to, all checked against the policy."""
        if url.scheme not in ("http", "https") or not url.host:
            raise self._error(f"is not http(s) ({url.scheme or 'no scheme'})")
        host = url.host
        try:
            addresses: list[IPAddress] = [ipaddress.ip_address(host)]
        except ValueError:
            port = url.port or (443 if url.scheme == "https" else 80)
            try:
                addresses = [ipaddress.ip_address(a.split("%", 1)[0])
                             for a in await _resolve(host, port)]
            except OSError as exc:
                raise self._error(f"names a host that does not resolve ({host})") from exc
        if not addresses:
            raise self._error(f"names a host that does not resolve ({host})")
        refused = [a for a in addresses if not self.policy.allows(a)]
        if refused:
            raise self._error(f"points at a non-public address ({host} -> {refused[0]}: "
                              f"{classify(refused[0])}); "
                              "allow it with image_urls.allow_private or allow_networks")
        return addresses

    @contextlib.asynccontextmanager
    async def _open(self, url: httpx.URL) -> AsyncIterator[httpx.Response]:
        """GET `url` from one of its checked addresses (the name still goes in Host and SNI)."""
        headers = {"host": url.netloc.decode("ascii"), "accept": "image/*"}
        extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
        response: httpx.Response | None = None
        failure: httpx.HTTPError | None = None
        for address in await self._addresses(url):
            request = self._client.build_request("GET", url.copy_with(host=str(address)),
                                                 headers=headers, extensions=extensions)
            try:
                response = await self._client.send(request, stream=True)
                break
            except httpx.ConnectError as exc:
                failure = exc  # try the host's next address
            except httpx.TimeoutException as exc:
                raise self._error(f"timed out ({url.host})") from exc
            except httpx.HTTPError as exc:
                failure = exc
                break
        if response is None:
            raise self._error(f"could not be fetched ({url.host}: "
                              f"{type(failure).__name__})") from failure
        try:
            yield response
        finally:
            await response.aclose()

    async def _read(self, response: httpx.Response) -> bytes:
        if response.status_code != 200:
            raise self._error(f"answered HTTP {response.status_code}")
        kind = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if not (kind.startswith("image/") or kind in _BINARY_TYPES):
            raise self._error(f"is not an image (content-type {kind or 'missing'})")
        limit = self.policy.max_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise self._error(f"is larger than {limit} bytes")
        body = bytearray()
        try:
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > limit:
                    raise self._error(f"is larger than {limit} bytes")
        except httpx.HTTPError as exc:
            raise self._error(f"could not be read ({type(exc).__name__})") from exc
        return bytes(body)

    async def aclose(self) -> None:
        await self._client.aclose()


def image_from_b64(b64: Base64, backend: str, policy: UrlPolicy, *,
                   revised_prompt: str | None = None) -> GeneratedImage:
    """A backend's base64 image, kept as received; decoded and checked at its first look (the
    judge's), so a passthrough relays it untouched. A bad image is then a 502 of this backend."""
    def check(data: bytes) -> str:
        if not data:
            raise BackendError(f"backend {backend!r} returned an image that is not valid base64",
                               code="backend_bad_response")
        return _check_image(data, "b64_json", backend, policy)

    return GeneratedImage(b64=b64, check=check, backend_revised_prompt=revised_prompt)


def _check_image(data: bytes, field: str, backend: str, policy: UrlPolicy) -> str:
    """The media type of a backend's image (its `url` or `b64_json`) under the upload rules
    and the backend's limits; a refusal is the backend's fault, so a 502."""
    try:
        return validate_image(data, field, max_bytes=policy.max_bytes,
                              max_pixels=policy.max_pixels)
    except RequestError as exc:
        raise BackendError(f"backend {backend!r} returned an unusable image: {exc.message}",
                           code="backend_bad_response") from exc
