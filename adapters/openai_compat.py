"""Any OpenAI-compatible image server, called directly over httpx (no SDK, no litellm).

This is the fast path for plain OpenAI-compatible servers: the guard forwards the client's
parameters, reads `b64_json` (or fetches `url`), and translates failures at this edge:
connection refused -> 502, timeout -> 504, 429 -> 429 with Retry-After, 5xx -> 502,
4xx -> the backend's own message as a 400. API keys come from environment variables named in the
config and never reach a trace, a log line or an error message.

Options: api_base (required), api_key_env, timeout_s (60), max_connections (64),
response_format (b64_json: ask the server for base64), extra_headers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import httpx
import orjson

from guard.errors import (
    BackendError,
    BackendRateLimited,
    BackendRejected,
    BackendTimeout,
    ConfigError,
)
from guard.types import GeneratedImage, GenerationCall

_FORWARDED = ("size", "quality", "style", "output_format", "output_compression", "background",
              "moderation", "user")


class OpenAICompatBackend:
    def __init__(self, name: str, api_base: str, *, api_key: str | None = None,
                 timeout_s: float = 60.0, max_connections: int = 64,
                 response_format: str | None = "b64_json",
                 extra_headers: Mapping[str, str] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.name = name
        self.api_base = api_base.rstrip("/")
        self.response_format = response_format
        headers = {"content-type": "application/json", **(extra_headers or {})}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self._client = httpx.AsyncClient(
            base_url=self.api_base, headers=headers, transport=transport,
            timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)),
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections),
            follow_redirects=False)

    @classmethod
    def from_config(cls, name: str, options: Mapping[str, Any]) -> OpenAICompatBackend:
        opts = dict(options)
        api_base = opts.pop("api_base", None)
        if not api_base:
            raise ConfigError(f"backend {name!r} (openai-compatible) needs `api_base`")
        key_env = opts.pop("api_key_env", None)
        api_key = os.environ.get(key_env) if key_env else None
        if key_env and not api_key:
            raise ConfigError(f"backend {name!r}: environment variable {key_env} is not set")
        backend = cls(name, api_base, api_key=api_key,
                      timeout_s=float(opts.pop("timeout_s", 60.0)),
                      max_connections=int(opts.pop("max_connections", 64)),
                      response_format=opts.pop("response_format", "b64_json"),
                      extra_headers=opts.pop("extra_headers", None))
        if opts:
            raise ConfigError(f"backend {name!r} (openai-compatible): unknown options {sorted(opts)}")
        return backend

    async def generate(self, call: GenerationCall) -> list[GeneratedImage]:
        body: dict[str, Any] = {"prompt": call.prompt, "n": call.n}
        if call.model:
            body["model"] = call.model
        for field in _FORWARDED:
            value = getattr(call, field)
            if value is not None:
                body[field] = value
        if self.response_format:
            body["response_format"] = self.response_format
        body.update(call.extra)
        try:
            response = await self._client.post("/images/generations", content=orjson.dumps(body))
        except httpx.TimeoutException as exc:
            raise BackendTimeout(f"backend {self.name!r} timed out") from exc
        except httpx.HTTPError as exc:
            raise BackendError(f"backend {self.name!r} is unreachable ({type(exc).__name__})",
                               code="backend_unavailable") from exc
        return await self._parse(response, call.output_format)

    async def _parse(self, response: httpx.Response, output_format: str | None
                     ) -> list[GeneratedImage]:
        status = response.status_code
        if status == 429:
            retry = response.headers.get("retry-after")
            raise BackendRateLimited(f"backend {self.name!r} is rate limited",
                                     headers={"retry-after": retry} if retry else None)
        if status >= 500:
            raise BackendError(f"backend {self.name!r} failed with HTTP {status}")
        if status >= 400:
            raise BackendRejected(f"backend {self.name!r} rejected the request: "
                                  f"{_error_message(response)}",
                                  code=_error_code(response) or "backend_rejected")
        try:
            payload = orjson.loads(response.content)
            data = payload["data"]
            if not isinstance(data, list):
                raise TypeError("data is not a list")
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise BackendError(f"backend {self.name!r} returned a malformed response",
                               code="backend_bad_response") from exc
        media = f"image/{output_format or 'png'}"
        images: list[GeneratedImage] = []
        for item in data:
            if isinstance(item, dict) and isinstance(item.get("b64_json"), str):
                images.append(GeneratedImage(b64=item["b64_json"], media_type=media,
                                             backend_revised_prompt=item.get("revised_prompt")))
            elif isinstance(item, dict) and isinstance(item.get("url"), str):
                images.append(await self._fetch(item["url"], item.get("revised_prompt")))
            else:
                raise BackendError(f"backend {self.name!r} returned an image without data",
                                   code="backend_bad_response")
        for image in images:
            try:
                image.data  # noqa: B018 - decode now, so broken base64 is the backend's fault
            except ValueError as exc:
                raise BackendError(f"backend {self.name!r} returned an image that is not valid "
                                   "base64", code="backend_bad_response") from exc
        return images

    async def _fetch(self, url: str, revised: str | None) -> GeneratedImage:
        # Issue 4 hardens this (size caps, private ranges); same-origin fetch only for now.
        if not url.startswith(self.api_base.rsplit("/v1", 1)[0]):
            raise BackendError(f"backend {self.name!r} returned an image URL on another host",
                               code="backend_bad_response")
        try:
            response = await self._client.get(url)
        except httpx.HTTPError as exc:
            raise BackendError(f"cannot fetch image from backend {self.name!r}") from exc
        if response.status_code != 200:
            raise BackendError(f"backend {self.name!r} image URL answered {response.status_code}")
        return GeneratedImage(data=response.content,
                              media_type=response.headers.get("content-type", "image/png"),
                              backend_revised_prompt=revised)

    async def ready(self) -> bool:
        return not self._client.is_closed

    async def aclose(self) -> None:
        await self._client.aclose()


def _error_json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return {}
    err = body.get("error") if isinstance(body, dict) else None
    return err if isinstance(err, dict) else {}


def _error_message(response: httpx.Response) -> str:
    return str(_error_json(response).get("message") or f"HTTP {response.status_code}")[:500]


def _error_code(response: httpx.Response) -> str | None:
    code = _error_json(response).get("code")
    return str(code) if code else None
