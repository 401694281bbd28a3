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
Edits: POST {api_base}/images/edits as multipart, images as `image[]`, optional `mask`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import httpx
import orjson
from pydantic import Field

from adapters.fetch import ImageFetcher, UrlPolicy, image_from_b64
from adapters.options import Options, parse_options, secret_from_env, wants_b64
from guard.core.types import GeneratedImage, GenerationCall
from guard.support import b64json
from guard.support.errors import BackendError, BackendRateLimited, BackendRejected, BackendTimeout
from guard.support.retry import Retrying, RetryPolicy

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
        self._client = httpx.AsyncClient(
            base_url=self.api_base, headers=headers, transport=transport,
            timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)),
            limits=httpx.Limits(max_connections=options.max_connections,
                                max_keepalive_connections=options.max_connections),
            follow_redirects=False, trust_env=False)
        self._call = Retrying(f"backend {name!r}", options.retry, timeout_s=timeout,
                              max_concurrency=options.max_concurrency)
        self._fetcher = ImageFetcher(name, options.image_urls)

    @classmethod
    def from_config(cls, name: str, options: Mapping[str, Any]) -> OpenAICompatBackend:
        opts = parse_options(OpenAICompatOptions, name, "openai-compatible", options)
        return cls(name, opts, api_key=secret_from_env(name, opts.api_key_env))

    async def generate(self, call: GenerationCall) -> list[GeneratedImage]:
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
        content = orjson.dumps(body)
        headers = {"content-type": "application/json"}
        return await self._call(lambda: self._post("/images/generations", content=content,
                                                   headers=headers))

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
        try:
            response = await self._client.post(path, **request)
        except httpx.TimeoutException as exc:
            raise BackendTimeout(f"backend {self.name!r} timed out") from exc
        except httpx.HTTPError as exc:
            raise BackendError(f"backend {self.name!r} is unreachable ({type(exc).__name__})",
                               code="backend_unavailable") from exc
        return await self._parse(response)

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

    def _failure(self, response: httpx.Response) -> BackendError:
        status, name, secrets = response.status_code, self.name, self._secrets
        detail = f"HTTP {status}: {response.text}"
        if status == 429:
            retry = response.headers.get("retry-after")
            return BackendRateLimited(f"The image backend {name!r} is rate limited (HTTP 429).",
                                      headers={"retry-after": retry} if retry else None,
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
