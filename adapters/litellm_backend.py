"""Any provider litellm speaks, in-process: OpenAI, Azure OpenAI, Bedrock, Vertex AI, or any
OpenAI-compatible server as `openai/<model>` with `api_base`.

Model strings (option `model`; default `openai/<the routed model>`):
    openai/gpt-image-1                      OpenAI (api_key_env: OPENAI_API_KEY)
    azure/<deployment>                      Azure OpenAI (api_base, api_version, api_key_env)
    bedrock/amazon.titan-image-generator-v2:0, bedrock/stability.sd3-5-large-v1:0
                                            Bedrock (credentials_env: aws_access_key_id,
                                            aws_secret_access_key; extra: aws_region_name)
    vertex_ai/imagen-3.0-generate-002       Vertex AI (credentials_env: vertex_credentials;
                                            extra: vertex_project, vertex_location)
    openai/<name> with api_base             any OpenAI-compatible image server

Options:
    model, api_base, api_version (Azure)
    api_key_env (null)       environment variable holding the API key
    credentials_env ({})     litellm keyword -> environment variable, for the other secrets
                             (aws_secret_access_key: AWS_SECRET_ACCESS_KEY, vertex_credentials: ...)
    extra ({})               other provider keywords (aws_region_name, vertex_project, ...); a
                             keyword that looks like a secret is refused here: use credentials_env
    timeout_s (60), max_concurrency (null), retry ({}), image_urls ({}): as openai-compatible
    max_response_bytes (256 MiB)  for `openai/` models (OpenAI and OpenAI-compatible servers)
                             generation answers are read through the guard's own client with
                             this cap (guard.support.bodies): a larger one is a failed call.
                             Other providers are read by litellm's own clients, uncapped here.
    response_format (auto)   auto | b64_json | url | null, sent in `extra_body` as litellm needs;
                             auto asks OpenAI and Azure models other than gpt-image-* for b64_json
Secrets are read once at start-up and are never put in a trace, a log line or an error message.
The SDK's own retries are off (max_retries=0): retrying is the guard's policy (guard.support.retry).
Errors are translated here as in the openai-compatible adapter (the guard's own message, the
provider's text only redacted in the trace); a provider's own content filter refusing the prompt
is a 400 content_policy_violation.
Edits use litellm's `aimage_edit` (OpenAI and Azure style multipart, images as `image[]`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any, Literal

from pydantic import Field

from adapters.fetch import ImageFetcher, UrlPolicy, image_from_b64
from adapters.options import Options, parse_options, secret_from_env, wants_b64
from guard.core.types import GeneratedImage, GenerationCall
from guard.support.bodies import (
    BACKEND_RESPONSE_BYTES,
    CappedTransport,
    ResponseTooLarge,
    too_large,
)
from guard.support.errors import (
    BackendError,
    BackendRateLimited,
    BackendRejected,
    BackendTimeout,
    ConfigError,
    PolicyViolation,
)
from guard.support.redact import redact_logs
from guard.support.retry import Retrying, RetryPolicy, retry_after_header
from guard.support.telemetry import trace_headers

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

_FORWARDED = ("size", "quality", "style", "user")
_EDIT_FORWARDED = ("size", "quality", "user", "input_fidelity")
_SECRET_WORDS = ("key", "secret", "token", "password", "credential")
_B64_PROVIDERS = ("openai", "azure")
_LITELLM_LOGGERS = ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy")


class LiteLLMOptions(Options):
    model: str | None = None
    api_base: str | None = None
    api_version: str | None = None
    api_key_env: str | None = None
    credentials_env: dict[str, str] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)
    timeout_s: float = Field(60.0, gt=0)
    max_concurrency: int | None = Field(None, gt=0)
    response_format: Literal["auto", "b64_json", "url"] | None = "auto"
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    image_urls: UrlPolicy = Field(default_factory=UrlPolicy)
    max_response_bytes: int = Field(BACKEND_RESPONSE_BYTES, gt=0)


class LiteLLMBackend:
    def __init__(self, name: str, options: LiteLLMOptions, *,
                 secrets: Mapping[str, str] | None = None) -> None:
        import litellm

        # Logging the full reply (megabytes of base64) costs tens of ms per request, and the
        # debug banner would print request details.
        litellm.turn_off_message_logging = True
        litellm.suppress_debug_info = True
        # Its debug log prints the provider's raw answer, which may echo the key.
        redact_logs(_LITELLM_LOGGERS, (secrets or {}).values())
        self._litellm = litellm
        self.name = name
        self.options = options
        self._secrets = dict(secrets or {})
        self._call = Retrying(f"backend {name!r}", options.retry, timeout_s=options.timeout_s,
                              max_concurrency=options.max_concurrency)
        self._fetcher = ImageFetcher(name, options.image_urls)
        self._openai: Any = None  # the capped client for `openai/` generations, made on first use

    @classmethod
    def from_config(cls, name: str, options: Mapping[str, Any]) -> LiteLLMBackend:
        opts = parse_options(LiteLLMOptions, name, "litellm", options)
        secretish = sorted(k for k in opts.extra if any(w in k.lower() for w in _SECRET_WORDS))
        if secretish:
            raise ConfigError(f"backend {name!r} (litellm): {', '.join(secretish)} in `extra` "
                              "looks like a secret; name its environment variable under "
                              "credentials_env instead")
        secrets = {kw: secret_from_env(name, env) or "" for kw, env in
                   opts.credentials_env.items()}
        api_key = secret_from_env(name, opts.api_key_env)
        if api_key:
            secrets["api_key"] = api_key
        return cls(name, opts, secrets=secrets)

    def _kwargs(self, call: GenerationCall, forwarded: tuple[str, ...]) -> dict[str, Any]:
        opts = self.options
        model = opts.model or f"openai/{call.model or 'gpt-image-1'}"
        kwargs: dict[str, Any] = {**opts.extra, "model": model, "prompt": call.prompt,
                                  "n": call.n, "timeout": opts.timeout_s, "max_retries": 0,
                                  **self._secrets}
        for field in forwarded:
            value = getattr(call, field)
            if value is not None:
                kwargs[field] = value
        if opts.api_base:
            kwargs["api_base"] = opts.api_base
            kwargs.setdefault("api_key", "unused")  # OpenAI-compatible servers often need none
        if opts.api_version:
            kwargs["api_version"] = opts.api_version
        provider = model.split("/", 1)[0] if "/" in model else "openai"
        fmt: str | None = opts.response_format
        if fmt == "auto":
            fmt = wants_b64(fmt, model) if provider in _B64_PROVIDERS else None
        extra_body = dict(call.extra)
        if fmt:
            extra_body["response_format"] = fmt
        if extra_body:
            kwargs["extra_body"] = extra_body
        if context := trace_headers():  # the request's trace context goes on (traceparent)
            kwargs["extra_headers"] = {**(kwargs.get("extra_headers") or {}), **context}
        return kwargs

    def _capped_client(self, kwargs: Mapping[str, Any]) -> Any:
        """An AsyncOpenAI client whose answers are read through CappedTransport (an `openai/`
        model: litellm uses the client given to it as it is)."""
        if self._openai is None:
            import httpx
            from openai import AsyncOpenAI

            key = kwargs.get("api_key") or os.environ.get("OPENAI_API_KEY") or "unused"
            # the SDK takes an httpx client as well as its httpx2 one, timeouts and all
            # (openai._httpx2); the cap is an httpx transport
            client = httpx.AsyncClient(transport=CappedTransport(self.options.max_response_bytes),
                                       timeout=self.options.timeout_s)
            self._openai = AsyncOpenAI(
                api_key=key, base_url=self.options.api_base, max_retries=0,
                timeout=self.options.timeout_s, http_client=client)  # type: ignore[arg-type]
        return self._openai

    async def generate(self, call: GenerationCall) -> list[GeneratedImage]:
        kwargs = self._kwargs(call, _FORWARDED)
        if str(kwargs["model"]).startswith("openai/"):
            kwargs["client"] = self._capped_client(kwargs)
        return await self._call(lambda: self._attempt(self._litellm.aimage_generation, kwargs))

    async def edit(self, call: GenerationCall, images: list[bytes],
                   mask: bytes | None) -> list[GeneratedImage]:
        kwargs = self._kwargs(call, _EDIT_FORWARDED)
        kwargs["image"] = list(images)
        if mask is not None:
            kwargs["mask"] = mask
        return await self._call(lambda: self._attempt(self._litellm.aimage_edit, kwargs))

    async def _attempt(self, fn: Any, kwargs: dict[str, Any]) -> list[GeneratedImage]:
        with self._translated():
            response = await fn(**kwargs)
        images = []
        for item in response.data or []:
            revised = getattr(item, "revised_prompt", None)
            if getattr(item, "b64_json", None):
                images.append(image_from_b64(item.b64_json, self.name, self.options.image_urls,
                                             revised_prompt=revised))
            elif getattr(item, "url", None):
                images.append(await self._fetcher.fetch(item.url, revised_prompt=revised))
            else:
                raise BackendError(f"backend {self.name!r} returned an image without data",
                                   code="backend_bad_response")
        return images

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        """litellm's exceptions -> the guard's. Messages are the guard's own, naming the backend
        and the HTTP status: a provider's text can echo the request, key included, so it goes
        only into the redacted `detail`, and is not chained (`from None`) where it is the
        provider's answer, lest a traceback print it."""
        lt = self._litellm
        name = self.name
        secrets = tuple(self._secrets.values())
        try:
            yield
        except lt.Timeout as exc:
            raise BackendTimeout(f"backend {name!r} timed out") from exc
        except lt.RateLimitError as exc:
            raise BackendRateLimited(f"The image backend {name!r} is rate limited (HTTP 429).",
                                     headers=retry_after_header(_header(exc, "retry-after")),
                                     detail=_said(exc), secrets=secrets) from None
        except lt.ContentPolicyViolationError as exc:
            raise PolicyViolation(f"The image backend {name!r} refused the prompt under its own "
                                  f"content policy{_status(exc)}.",
                                  detail=_said(exc), secrets=secrets) from None
        except (lt.AuthenticationError, lt.PermissionDeniedError) as exc:
            raise BackendError(f"The image backend {name!r} refused the guard's credentials"
                               f"{_status(exc)}.", code="backend_auth_failed",
                               detail=_said(exc), secrets=secrets) from None
        except (lt.BadRequestError, lt.NotFoundError, lt.UnprocessableEntityError) as exc:
            raise BackendRejected.answered(name, getattr(exc, "status_code", None),
                                           _provider_error(exc), detail=_said(exc),
                                           secrets=secrets) from None
        except lt.APIConnectionError as exc:
            if (big := _caused_by(exc, ResponseTooLarge)) is not None:
                raise BackendError(f"The image backend {name!r} {too_large(big)}.",
                                   code="backend_bad_response") from None
            if "timeout" in type(exc.__cause__).__name__.lower() or \
                    "timed out" in str(exc).lower():
                raise BackendTimeout(f"backend {name!r} timed out") from exc
            raise BackendError(f"backend {name!r} is unreachable",
                               code="backend_unavailable") from exc
        except BackendError:
            raise
        except Exception as exc:  # noqa: BLE001 - litellm raises many kinds; all are the backend's
            status = _status(exc) or f" ({type(exc).__name__})"
            raise BackendError(f"The image backend {name!r} failed{status}.",
                               detail=_said(exc), secrets=secrets) from None

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        await self._fetcher.aclose()
        if self._openai is not None:
            await self._openai.close()


def _caused_by(exc: BaseException, kind: type[ResponseTooLarge]) -> ResponseTooLarge | None:
    """The `kind` exception somewhere in `exc`'s chain of causes (the SDK wraps it)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _said(exc: Exception) -> str:
    # What the provider answered, as far as litellm's exception keeps it: its message holds a
    # JSON error's message only, the response the whole answer.
    said = f"{type(exc).__name__}: {exc}"
    try:
        body = exc.response.text  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - no response, or one not read: the message is all there is
        return said
    return f"{said}; answer: {body}" if isinstance(body, str) and body else said


def _status(exc: Exception) -> str:
    # " (HTTP 400)" when the exception carries the provider's status, else ""
    status = getattr(exc, "status_code", None)
    return f" (HTTP {status})" if isinstance(status, int) else ""


def _header(exc: Exception, name: str) -> str | None:
    for source in (getattr(exc, "response", None), exc):
        headers = getattr(source, "headers", None) or getattr(source, "litellm_response_headers",
                                                              None)
        if headers is not None and headers.get(name):
            return str(headers.get(name))
    return None


def _provider_error(exc: Exception) -> dict[str, Any]:
    """The `error` object of the provider's JSON answer, when there is one."""
    body = getattr(exc, "body", None)
    if not isinstance(body, dict):
        response = getattr(exc, "response", None)
        try:
            body = response.json() if response is not None else None
        except Exception:  # noqa: BLE001 - any unreadable body is simply no detail
            body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return dict(body["error"])
    return body if isinstance(body, dict) and "message" in body else {}
