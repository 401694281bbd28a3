"""Any OpenAI-compatible image server, called directly over httpx (no SDK, no litellm).

This is the fast path for plain OpenAI-compatible servers: the guard forwards the client's
parameters, reads `b64_json` (or fetches `url` under the backend's URL policy), and translates
failures at this edge: connection refused -> 502 backend_unavailable, timeout -> 504,
429 -> 429 with Retry-After, 5xx -> 502, 401/403 -> 502 backend_auth_failed (the operator's key,
not the client's), other 4xx -> a 400 with the backend's error `code` and `param` when they are
plain identifiers (content_policy_violation stays a refusal). The client reads the guard's own
message, naming the HTTP status; the backend's text is untrusted (it may echo the request, key
included) and reaches only the trace, redacted (guard.support.redact). 429, 5xx and connection failures
are retried under the guard's retry policy (guard.support.retry). API keys come from environment
variables named in the config and never reach a trace, a log line or an error.

Options:
    api_base (required)      e.g. http://127.0.0.1:9000/v1
    api_key_env (null)       environment variable holding the key, sent as a Bearer token
    timeout_s (60)           one attempt's connect/read timeout
    max_connections (64)     HTTP connection pool size
    max_concurrency (null)   requests in flight to this backend at once; the rest wait in line
    response_format (auto)   auto | b64_json | url | null; auto asks for b64_json except from
                             gpt-image models, which refuse the parameter
    extra_headers ({})       sent with every request (not for secrets: use api_key_env)
    retry ({})               attempts, backoff_s, max_backoff_s, deadline_s (guard.support.retry)
    image_urls ({})          allow_private, allow_networks, max_bytes, max_pixels, max_redirects,
                             timeout_s (adapters.fetch)
    max_response_bytes (256 MiB)  a larger answer (or stream) is a failed call, read no further
                             (guard.support.bodies)
    partial_images (0)       0-3: generate with `stream: true, partial_images: N` and show each
                             partial image to the guard as it arrives, so that an unsafe
                             generation is stopped early (its stream closed). Not the client's
                             request field of that name: the client still gets only judged images.
Edits: POST {api_base}/images/edits as multipart, images as `image[]`, optional `mask`.

Partial images (guard.plugins.PreviewingBackend) come as OpenAI's image SSE:
`image_generation.partial_image` events (b64_json, partial_image_index), then
`image_generation.completed` with the final image (`image_edit.*` read alike). One streamed call
makes all n images, as without streaming. OpenAI's events name no image, so with n > 1 an event
is put to an image by a non-standard `image_index` where the server sends one; a partial without
it is not judged (the final images still are, taken in the order they complete). Each partial is
judged while the stream is read on; "stop" closes the stream at once when every image of the
call is stopped (a stopped image's later events are ignored until then). A backend that answers
plain JSON (it ignores `stream`) is read as usual; one that refuses to stream (a 4xx other than
content_policy_violation), or whose stream breaks, ends before every image is completed or sends
a completed image that does not decode, is asked again without streaming for the final images; a
partial that does not parse is skipped. An `error` event is the backend's failure (a 502; its
`content_policy_violation` a refusal), its words kept to the redacted trace detail.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Any, Literal

import httpx
import orjson
from pydantic import Field

from adapters.fetch import ImageFetcher, UrlPolicy, image_from_b64
from adapters.options import Options, parse_options, secret_from_env, wants_b64
from guard.core.types import GeneratedImage, GenerationCall
from guard.plugins import Preview, PreviewHandler
from guard.support import b64json
from guard.support.bodies import (
    BACKEND_RESPONSE_BYTES,
    CappedTransport,
    ResponseTooLarge,
    too_large,
)
from guard.support.errors import BackendError, BackendRateLimited, BackendRejected, BackendTimeout
from guard.support.retry import Retrying, RetryPolicy, retry_after_header
from guard.support.telemetry import client_hooks

log = logging.getLogger("safeedit.backends")

_FORWARDED = ("size", "quality", "style", "output_format", "output_compression", "background",
              "moderation", "user")
_EDIT_FORWARDED = ("size", "quality", "output_format", "output_compression", "background", "user",
                   "input_fidelity")


class OpenAICompatOptions(Options):
    api_base: str
    api_key_env: str | None = None
    timeout_s: float = Field(60.0, gt=0)
    max_connections: int = Field(64, gt=0)
    max_concurrency: int | None = Field(None, gt=0)
    response_format: Literal["auto", "b64_json", "url"] | None = "auto"
    extra_headers: dict[str, str] = Field(default_factory=dict)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    image_urls: UrlPolicy = Field(default_factory=UrlPolicy)
    partial_images: int = Field(0, ge=0, le=3)
    max_response_bytes: int = Field(BACKEND_RESPONSE_BYTES, gt=0)


class OpenAICompatBackend:
    def __init__(self, name: str, options: OpenAICompatOptions, *, api_key: str | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.name = name
        self.options = options
        self.api_base = options.api_base.rstrip("/")
        headers = dict(options.extra_headers)
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        # What an echoing backend could send back: kept out of every error's detail.
        self._secrets = (api_key, *options.extra_headers.values())
        timeout = options.timeout_s
        limits = httpx.Limits(max_connections=options.max_connections,
                              max_keepalive_connections=options.max_connections)
        self._client = httpx.AsyncClient(
            base_url=self.api_base, headers=headers,
            transport=CappedTransport(options.max_response_bytes, transport, limits=limits),
            timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)),
            follow_redirects=False, trust_env=False,
            event_hooks=client_hooks())  # the request's trace context goes on (W3C traceparent)
        self._call = Retrying(f"backend {name!r}", options.retry, timeout_s=timeout,
                              max_concurrency=options.max_concurrency)
        self._fetcher = ImageFetcher(name, options.image_urls)

    @classmethod
    def from_config(cls, name: str, options: Mapping[str, Any]) -> OpenAICompatBackend:
        opts = parse_options(OpenAICompatOptions, name, "openai-compatible", options)
        return cls(name, opts, api_key=secret_from_env(name, opts.api_key_env))

    async def generate(self, call: GenerationCall) -> list[GeneratedImage]:
        return await self._generate(self._body(call))

    def shows_previews(self, call: GenerationCall) -> bool:
        return self.options.partial_images > 0

    async def generate_previewed(self, call: GenerationCall, on_preview: PreviewHandler
                                 ) -> list[GeneratedImage | None]:
        body = self._body(call)
        streamed = {**body, "stream": True, "partial_images": self.options.partial_images}
        try:
            return await self._call(lambda: self._read_stream(streamed, call.n, on_preview))
        except _StreamBroken as exc:
            log.warning("backend %s: %s; asking again without streaming", self.name, exc)
        except BackendRejected as exc:
            if exc.code == "content_policy_violation":
                raise
            log.warning("backend %s refused to stream (%s); asking without streaming",
                        self.name, exc.code)
        return list(await self._generate(body))

    def _body(self, call: GenerationCall) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt": call.prompt, "n": call.n}
        if call.model:
            body["model"] = call.model
        for field in _FORWARDED:
            value = getattr(call, field)
            if value is not None:
                body[field] = value
        response_format = wants_b64(self.options.response_format, call.model)
        if response_format:
            body["response_format"] = response_format
        body.update(call.extra)
        return body

    async def _generate(self, body: dict[str, Any]) -> list[GeneratedImage]:
        content = orjson.dumps(body)
        headers = {"content-type": "application/json"}
        return await self._call(lambda: self._post("/images/generations", content=content,
                                                   headers=headers))

    async def _read_stream(self, body: dict[str, Any], n: int, on_preview: PreviewHandler
                           ) -> list[GeneratedImage | None]:
        request = self._client.build_request(
            "POST", "/images/generations", content=orjson.dumps(body),
            headers={"content-type": "application/json", "accept": "text/event-stream"})
        response = await self._reach(self._client.send(request, stream=True))
        try:
            if response.status_code >= 400 or not response.headers.get(
                    "content-type", "").startswith("text/event-stream"):
                await response.aread()  # an error, or plain JSON: it ignored `stream`
                return list(await self._parse(response))
            return await self._events(response, n, on_preview)
        except ResponseTooLarge as exc:
            raise self._too_large(exc) from None
        except httpx.TimeoutException as exc:
            raise BackendTimeout(f"backend {self.name!r} timed out") from exc
        except httpx.HTTPError as exc:
            raise _StreamBroken(f"its stream broke ({type(exc).__name__})") from exc
        finally:
            await response.aclose()  # before the end: closes the connection, so it stops

    async def _events(self, response: httpx.Response, n: int, on_preview: PreviewHandler
                      ) -> list[GeneratedImage | None]:
        finals: dict[int, GeneratedImage] = {}
        stopped: set[int] = set()
        shown: list[asyncio.Future[None]] = []

        async def show(preview: Preview) -> None:
            if await on_preview(preview) == "stop":
                stopped.add(preview.index)
                if len(finals.keys() | stopped) == n:
                    reading.cancel()  # nothing left to wait for: the stream is closed now

        async def read() -> None:
            async for event, data in _sse(response):
                kind = data.get("type") if isinstance(data.get("type"), str) else event
                index = data.get("image_index", 0 if n == 1 else None)
                if kind in ("image_generation.partial_image", "image_edit.partial_image"):
                    preview = self._preview(data, index, n)
                    if preview is not None and preview.index not in stopped:
                        # Judged while the stream is read on: the next event is not held up.
                        shown.append(asyncio.ensure_future(show(preview)))
                elif kind in ("image_generation.completed", "image_edit.completed"):
                    if index is None:  # unnamed: the images in the order they complete
                        index = min(set(range(n)) - finals.keys(), default=None)
                    if not isinstance(index, int) or not 0 <= index < n or index in finals:
                        raise _StreamBroken("it completed an image it did not make")
                    finals[index] = self._completed(data)
                elif kind == "error" or event == "error":
                    raise self._stream_error(data)
                if len(finals.keys() | stopped) == n:
                    return
            raise _StreamBroken("its stream ended before every image was completed")

        reading = asyncio.ensure_future(read())
        try:
            await asyncio.wait((reading,))
            if not reading.cancelled():
                reading.result()  # its failure, if any
            await asyncio.gather(*shown)  # every handler call has returned
        finally:
            reading.cancel()
            for task in shown:
                task.cancel()
        return [None if i in stopped else finals[i] for i in range(n)]

    def _preview(self, data: dict[str, Any], index: Any, n: int) -> Preview | None:
        """The partial image of an event, or None: for no image of the call that can be named
        (not judged), or one that does not decode (skipped)."""
        if not isinstance(index, int) or not 0 <= index < n:
            return None
        image = self._streamed_image(data)
        step = data.get("partial_image_index")
        try:
            if image is None or not isinstance(step, int):
                raise BackendError("no image or no partial_image_index")
            image.validate()  # decoded once: the judge reads these bytes
        except BackendError:
            log.warning("backend %s: a partial image event without a usable image; skipped",
                        self.name)
            return None
        return Preview(index, step, image)

    def _completed(self, data: dict[str, Any]) -> GeneratedImage:
        image = self._streamed_image(data)
        if image is None:
            raise _StreamBroken("its completed event has no image")
        try:
            image.validate()
        except BackendError as exc:
            raise _StreamBroken("its completed image does not decode") from exc
        return image

    def _streamed_image(self, data: dict[str, Any]) -> GeneratedImage | None:
        b64 = data.get("b64_json")
        if not isinstance(b64, str) or not b64:
            return None
        return image_from_b64(b64, self.name, self.options.image_urls,
                              revised_prompt=data.get("revised_prompt"))

    def _stream_error(self, data: dict[str, Any]) -> BackendError:
        error: dict[str, Any] = data["error"] if isinstance(data.get("error"), dict) else data
        detail = f"error event: {orjson.dumps(data).decode(errors='replace')[:2000]}"
        if error.get("code") == "content_policy_violation":
            return BackendRejected.answered(self.name, None, error, detail=detail,
                                            secrets=self._secrets)
        return BackendError(f"The image backend {self.name!r} failed while streaming.",
                            detail=detail, secrets=self._secrets)

    async def edit(self, call: GenerationCall, images: list[bytes],
                   mask: bytes | None) -> list[GeneratedImage]:
        fields: dict[str, str] = {"prompt": call.prompt, "n": str(call.n)}
        if call.model:
            fields["model"] = call.model
        for field in _EDIT_FORWARDED:
            value = getattr(call, field)
            if value is not None:
                fields[field] = str(value)
        response_format = wants_b64(self.options.response_format, call.model)
        if response_format:
            fields["response_format"] = response_format
        fields.update({k: str(v) for k, v in call.extra.items()})
        files = [("image[]", (f"image_{i}{_suffix(data)}", data, _media_type(data)))
                 for i, data in enumerate(images)]
        if mask is not None:
            files.append(("mask", (f"mask{_suffix(mask)}", mask, _media_type(mask))))
        return await self._call(lambda: self._post("/images/edits", data=fields, files=files))

    async def _post(self, path: str, **request: Any) -> list[GeneratedImage]:
        return await self._parse(await self._reach(self._client.post(path, **request)))

    async def _reach(self, call: Awaitable[httpx.Response]) -> httpx.Response:
        """The backend's response, or what failing to reach it is in the guard's errors."""
        try:
            return await call
        except ResponseTooLarge as exc:
            raise self._too_large(exc) from None
        except httpx.TimeoutException as exc:
            raise BackendTimeout(f"backend {self.name!r} timed out") from exc
        except httpx.HTTPError as exc:
            raise BackendError(f"backend {self.name!r} is unreachable ({type(exc).__name__})",
                               code="backend_unavailable") from exc

    async def _parse(self, response: httpx.Response) -> list[GeneratedImage]:
        if response.status_code >= 400:
            raise self._failure(response)
        try:
            data = b64json.loads_raw(response.content)["data"]
            if not isinstance(data, list):
                raise TypeError("data is not a list")
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise BackendError(f"backend {self.name!r} returned a malformed response",
                               code="backend_bad_response") from exc
        return [await self._image(item) for item in data]

    async def _image(self, item: Any) -> GeneratedImage:
        if not isinstance(item, dict):
            raise BackendError(f"backend {self.name!r} returned an image without data",
                               code="backend_bad_response")
        revised = item.get("revised_prompt")
        if isinstance(item.get("b64_json"), str | memoryview):
            return image_from_b64(item["b64_json"], self.name, self.options.image_urls,
                                  revised_prompt=revised)
        if isinstance(item.get("url"), str):
            return await self._fetcher.fetch(item["url"], revised_prompt=revised)
        raise BackendError(f"backend {self.name!r} returned an image without data",
                           code="backend_bad_response")

    def _too_large(self, exc: ResponseTooLarge) -> BackendError:
        return BackendError(f"The image backend {self.name!r} {too_large(exc)}.",
                            code="backend_bad_response")

    def _failure(self, response: httpx.Response) -> BackendError:
        status, name, secrets = response.status_code, self.name, self._secrets
        detail = f"HTTP {status}: {response.text}"
        if status == 429:
            return BackendRateLimited(f"The image backend {name!r} is rate limited (HTTP 429).",
                                      headers=retry_after_header(
                                          response.headers.get("retry-after")),
                                      detail=detail, secrets=secrets)
        if status >= 500:
            return BackendError(f"The image backend {name!r} failed (HTTP {status}).",
                                detail=detail, secrets=secrets)
        if status in (401, 403):
            return BackendError(f"The image backend {name!r} refused the guard's credentials "
                                f"(HTTP {status}).", code="backend_auth_failed",
                                detail=detail, secrets=secrets)
        return BackendRejected.answered(name, status, _error_json(response), detail=detail,
                                        secrets=secrets)

    async def ready(self) -> bool:
        return not self._client.is_closed

    async def aclose(self) -> None:
        await self._client.aclose()
        await self._fetcher.aclose()


class _StreamBroken(Exception):
    """A stream the guard cannot read to its end: the image is asked for again, unstreamed."""


async def _sse(response: httpx.Response) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """(event name, JSON data) of each server-sent event; data that is not a JSON object is
    skipped (keep-alives, `[DONE]`), an event cut off by the end of the stream is dropped."""
    event, lines = "", list[str]()
    async for line in response.aiter_lines():
        if not line:
            if lines:
                try:
                    data = orjson.loads("\n".join(lines))
                except orjson.JSONDecodeError:
                    data = None
                if isinstance(data, dict):
                    yield event, data
            event, lines = "", []
        elif line.startswith("data:"):
            lines.append(line[5:].removeprefix(" "))
        elif line.startswith("event:"):
            event = line[6:].strip()


def _media_type(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def _suffix(data: bytes) -> str:
    return {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}.get(
        _media_type(data), "")


def _error_json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return {}
    err = body.get("error") if isinstance(body, dict) else None
    return err if isinstance(err, dict) else {}
