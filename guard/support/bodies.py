"""A cap on every response body read from a service: an httpx transport that stops at it.

A judge or a backend that answers far more than any answer of its kind could be (a 100 MB JSON
body, a stream that never ends) would otherwise be read whole into the proxy's memory. Wrapped
around the transport an `httpx.AsyncClient` sends through, `CappedTransport` refuses an answer
whose `Content-Length` is over the cap before reading it, and counts the bytes of the others as
they stream in, raising `ResponseTooLarge` at the first chunk past the cap: no more than the cap
(and one chunk) is ever held, however the caller reads the body (`.json()`, `aread`,
`aiter_lines`). The count is of the bytes on the wire (a compressed body is counted compressed).

`ResponseTooLarge` is not an `httpx.HTTPError` on purpose: it is no network failure to retry but
a failed call, and each edge translates it to its own domain error (a `JudgeError`, a
`BackendError`) with `too_large(...)`'s words.

    max_response_bytes   judges (hosted, remote) 8 MiB; image backends 256 MiB
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx

MiB = 1 << 20
JUDGE_RESPONSE_BYTES = 8 * MiB
BACKEND_RESPONSE_BYTES = 256 * MiB


class ResponseTooLarge(Exception):
    """A service answered more bytes than `max_response_bytes` allows."""

    def __init__(self, limit: int, host: str) -> None:
        super().__init__(f"{host} answered more than {limit} bytes")
        self.limit = limit
        self.host = host


def too_large(exc: ResponseTooLarge) -> str:
    """The words for an error: what was over which cap (no body, nothing the service said)."""
    return (f"answered more than max_response_bytes ({exc.limit} bytes); "
            "the answer was not read")


class _Counted(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, limit: int, host: str) -> None:
        self._inner = inner
        self._limit = limit
        self._host = host

    async def __aiter__(self) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in self._inner:
            seen += len(chunk)
            if seen > self._limit:
                raise ResponseTooLarge(self._limit, self._host)
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


class CappedTransport(httpx.AsyncBaseTransport):
    """`inner` (by default httpx's own transport with `limits`) with every body capped."""

    def __init__(self, limit: int, inner: httpx.AsyncBaseTransport | None = None, *,
                 limits: httpx.Limits | None = None) -> None:
        if limit <= 0:
            raise ValueError("the cap must be positive")
        self.limit = limit
        self._inner = inner or httpx.AsyncHTTPTransport(limits=limits or httpx.Limits())

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        host = request.url.host
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            await response.aclose()
            raise ResponseTooLarge(self.limit, host)
        stream = response.stream
        assert isinstance(stream, httpx.AsyncByteStream)
        return httpx.Response(response.status_code, headers=response.headers,
                              stream=_Counted(stream, self.limit, host),
                              extensions=response.extensions)

    async def aclose(self) -> None:
        await self._inner.aclose()


__all__ = ["BACKEND_RESPONSE_BYTES", "JUDGE_RESPONSE_BYTES", "CappedTransport",
           "ResponseTooLarge", "too_large"]
