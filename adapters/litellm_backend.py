"""Any provider litellm speaks: OpenAI, Azure OpenAI, Bedrock, Vertex AI, or an OpenAI-compatible
server as `openai/<model>` with `api_base`.

Options: model (litellm model string; default: "openai/" + the routed model), api_base,
api_key_env (environment variable holding the key; never logged), api_version (Azure),
timeout_s (60), response_format (b64_json, sent through extra_body as litellm requires),
extra (provider-specific keyword arguments, e.g. aws_region_name, vertex_project).
The SDK's own retries are off (max_retries=0): retrying belongs to the guard, not the SDK.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from guard.errors import (
    BackendError,
    BackendRateLimited,
    BackendRejected,
    BackendTimeout,
    ConfigError,
    PolicyViolation,
)
from guard.types import GeneratedImage, GenerationCall

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

_FORWARDED = ("size", "quality", "style", "user")


class LiteLLMBackend:
    def __init__(self, name: str, *, model: str | None = None, api_base: str | None = None,
                 api_key: str | None = None, api_version: str | None = None,
                 timeout_s: float = 60.0, response_format: str | None = "b64_json",
                 extra: Mapping[str, Any] | None = None) -> None:
        import litellm

        # Logging the full reply (megabytes of base64) costs tens of ms per request.
        litellm.turn_off_message_logging = True
        litellm.suppress_debug_info = True
        self._litellm = litellm
        self.name = name
        self.model = model
        self.api_base = api_base
        self._api_key = api_key
        self.api_version = api_version
        self.timeout_s = timeout_s
        self.response_format = response_format
        self.extra = dict(extra or {})

    @classmethod
    def from_config(cls, name: str, options: Mapping[str, Any]) -> LiteLLMBackend:
        opts = dict(options)
        key_env = opts.pop("api_key_env", None)
        api_key = os.environ.get(key_env) if key_env else None
        if key_env and not api_key:
            raise ConfigError(f"backend {name!r}: environment variable {key_env} is not set")
        backend = cls(name, model=opts.pop("model", None), api_base=opts.pop("api_base", None),
                      api_key=api_key, api_version=opts.pop("api_version", None),
                      timeout_s=float(opts.pop("timeout_s", 60.0)),
                      response_format=opts.pop("response_format", "b64_json"),
                      extra=opts.pop("extra", None))
        if opts:
            raise ConfigError(f"backend {name!r} (litellm): unknown options {sorted(opts)}")
        return backend

    async def generate(self, call: GenerationCall) -> list[GeneratedImage]:
        lt = self._litellm
        kwargs: dict[str, Any] = {
            "model": self.model or f"openai/{call.model or 'gpt-image-1'}",
            "prompt": call.prompt, "n": call.n, "timeout": self.timeout_s, "max_retries": 0,
            **self.extra,
        }
        for field in _FORWARDED:
            value = getattr(call, field)
            if value is not None:
                kwargs[field] = value
        if self.api_base:
            kwargs["api_base"] = self.api_base
        if self._api_key:
            kwargs["api_key"] = self._api_key
        elif self.api_base:
            kwargs["api_key"] = "unused"  # OpenAI-compatible servers often need none
        if self.api_version:
            kwargs["api_version"] = self.api_version
        if self.response_format:
            kwargs["extra_body"] = {"response_format": self.response_format}
        try:
            response = await lt.aimage_generation(**kwargs)
        except lt.Timeout as exc:
            raise BackendTimeout(f"backend {self.name!r} timed out") from exc
        except lt.RateLimitError as exc:
            retry = _retry_after(exc)
            raise BackendRateLimited(f"backend {self.name!r} is rate limited",
                                     headers={"retry-after": retry} if retry else None) from exc
        except lt.ContentPolicyViolationError as exc:
            raise PolicyViolation(f"backend {self.name!r} refused the prompt under its own "
                                  "content policy") from exc
        except (lt.BadRequestError, lt.AuthenticationError, lt.NotFoundError) as exc:
            # The provider's message can echo request details but not our key; keep it short.
            raise BackendRejected(f"backend {self.name!r} rejected the request "
                                  f"({type(exc).__name__})") from exc
        except lt.APIConnectionError as exc:
            if "timed out" in str(exc).lower() or "timeout" in type(exc.__cause__).__name__.lower():
                raise BackendTimeout(f"backend {self.name!r} timed out") from exc
            raise BackendError(f"backend {self.name!r} is unreachable",
                               code="backend_unavailable") from exc
        except Exception as exc:  # noqa: BLE001 - litellm raises many kinds; all are the backend's
            raise BackendError(f"backend {self.name!r} failed ({type(exc).__name__})") from exc
        images = []
        for item in response.data or []:
            b64 = getattr(item, "b64_json", None)
            if not b64:
                raise BackendError(f"backend {self.name!r} returned no base64 image "
                                   "(set response_format: b64_json)", code="backend_bad_response")
            image = GeneratedImage(b64=b64, backend_revised_prompt=getattr(item, "revised_prompt",
                                                                           None))
            try:
                image.data  # noqa: B018 - decode now, so broken base64 is the backend's fault
            except ValueError as exc:
                raise BackendError(f"backend {self.name!r} returned an image that is not valid "
                                   "base64", code="backend_bad_response") from exc
            images.append(image)
        return images

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


def _retry_after(exc: Exception) -> str | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    return headers.get("retry-after") if headers is not None else None
