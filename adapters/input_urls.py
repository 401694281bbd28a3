"""Fetching an image a client names by URL (`image_url` of POST /v1/moderations).

The same guarded fetch as a backend's image links (adapters.fetch: http(s) only, every resolved
address checked and connected to as checked, redirects followed by hand, a byte limit, no
credentials, the upload checks on the bytes), plus a host allowlist checked on the first URL and
on every redirect. The URL is the client's, so every refusal is the client's 400, in the guard's
words: never the remote server's.

Options (`moderations.image_urls:` less `enabled`):
    allow ([])               host patterns: names, `*.example.com`, `*` (any public host)
    allow_private (false)    also non-public addresses (private, loopback, ...)
    allow_networks ([])      just these non-public networks, e.g. ["10.20.0.0/16"]
    max_bytes (20000000)     largest image
    timeout_s (10)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx
from pydantic import Field, ValidationError

from adapters.fetch import ImageFetcher, IPAddress, UrlPolicy
from guard.core.types import GeneratedImage
from guard.support.errors import BackendError, ConfigError, RequestError
from guard.support.hosts import TrustedHosts, pattern_name
from guard.support.inputs import validate_image


class InputUrlOptions(UrlPolicy):
    allow: list[str] = Field(default_factory=list)
    timeout_s: float = Field(10.0, gt=0)


class _Refused(BackendError):
    """Why the fetch may not go on, in words that follow "the URL"."""


class InputImageFetcher(ImageFetcher):
    """A client's image URLs, fetched under `moderations.image_urls` (`fetch_image`)."""

    def __init__(self, options: InputUrlOptions) -> None:
        super().__init__("image_url", options)
        self.options = options
        self.hosts = TrustedHosts(options.allow)

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> InputImageFetcher:
        try:
            parsed = InputUrlOptions.model_validate(dict(options))
            for pattern in parsed.allow:
                pattern_name(pattern)
        except (ValidationError, ValueError) as exc:
            raise ConfigError(f"moderations.image_urls: {exc}") from None
        return cls(parsed)

    async def fetch_image(self, url: str, param: str) -> GeneratedImage:
        try:
            current = httpx.URL(url)
        except httpx.InvalidURL:
            raise RequestError(f"Invalid '{param}': not a valid URL.", param=param,
                               code="invalid_image_url") from None
        try:
            for _ in range(self.options.max_redirects + 1):
                async with self._open(current) as response:
                    if response.is_redirect:
                        current = current.join(response.headers.get("location", ""))
                        continue
                    data = await self._read(response)
                return GeneratedImage(data=data, media_type=validate_image(
                    data, param, max_bytes=self.options.max_bytes,
                    max_pixels=self.options.max_pixels))
        except _Refused as exc:
            raise RequestError(f"Invalid '{param}': the URL {exc.message}.", param=param,
                               code="invalid_image_url") from None
        raise RequestError(f"Invalid '{param}': the URL redirected more than "
                           f"{self.options.max_redirects} times.", param=param,
                           code="invalid_image_url")

    def _error(self, what: str) -> BackendError:
        return _Refused(what)

    async def _addresses(self, url: httpx.URL) -> list[IPAddress]:
        # Called for the first URL and for every redirect, before anything connects.
        if not self.hosts.allows(url.netloc.decode("ascii", "replace")):
            raise self._error(f"names a host that moderations.image_urls.allow does not list "
                              f"({url.host or 'none'})")
        return await super()._addresses(url)
