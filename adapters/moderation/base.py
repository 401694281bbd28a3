"""What the hosted moderation judges share: options, the HTTP call, images, category mapping.

A hosted judge sends an item to a moderation service a team already pays for and maps the
service's categories onto the policy's. It scores; it never refines (the engine's rule-based
refiner writes the refined prompt of an unsafe item).

Mapping (`categories:`, merged over the kind's documented defaults): each service category maps
to a policy category, a list of them, or null (not mapped). A policy category takes the max of
the service categories mapped to it. A service category that maps to nothing the policy has is
kept in the verdict's `details.unmapped` with its score, never dropped.

Not assessed: a policy category is assessed for an item when some service category mapped to it
was applied to the item itself (to the image for an image, to the prompt for a prompt-only
item): OpenAI says per category which inputs it applied it to, Azure lists the categories it
analysed, Google answers UNKNOWN, and an image-only service reads no prompt. A category left
unassessed is listed in `details.unassessed` and is never read as clean; `unassessed:` says what
it scores:

    unsafe (default)  1.0: fail closed, the policy's action for that category applies
    omit              left out of the scores, for a judge that another judge (an ensemble)
                      covers on that category; a standalone judge must not use it, since the
                      policy reads a missing score as 0. A prompt-only finding (OpenAI scored
                      the prompt, not the image) still counts as that category's score.

Failures are JudgeError (503 unless the policy allows unjudged images); a timeout, a connection
failure, 408, 409, 425, 429 (its Retry-After honoured) and 5xx are retried under guard.support.retry,
other 4xx fail at once. What a service answers on failure is kept only as the error's redacted
`detail`; the key is never in an error, a trace or a log line.
"""

from __future__ import annotations

import asyncio
import io
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

import httpx
import pybase64
from PIL import Image, UnidentifiedImageError
from pydantic import Field, ValidationError

from adapters.options import Options
from guard.core.policy import Policy
from guard.core.types import GeneratedImage, JudgeInput, Verdict
from guard.support.errors import ConfigError, JudgeError
from guard.support.redact import redact
from guard.support.retry import Retrying, RetryPolicy, retry_after_header

CategoryMap = Mapping[str, tuple[str, ...]]
UNASSESSED_SCORE = 1.0
RAW_CHARS = 4000
MAX_BACKOFF_S = 10.0
_TRANSIENT_STATUS = frozenset({408, 409, 425, 429})

T = TypeVar("T")


class HostedOptions(Options):
    categories: dict[str, str | list[str] | None] = Field(default_factory=dict)
    unassessed: Literal["unsafe", "omit"] = "unsafe"
    timeout_s: float = Field(10.0, gt=0, le=600)
    retries: int = Field(2, ge=0, le=10)
    backoff_s: float = Field(0.25, ge=0, le=30)
    max_concurrency: int = Field(8, ge=1, le=1024)
    max_image_side: int | None = Field(2048, ge=32, le=16_384)
    id: str | None = None


OptionsT = TypeVar("OptionsT", bound=HostedOptions)


def parse_options(model: type[OptionsT], kind: str, options: Mapping[str, Any]) -> OptionsT:
    try:
        return model.model_validate(dict(options))
    except ValidationError as exc:
        raise ConfigError.from_validation(f"judge ({kind})", exc) from None


def secret(kind: str, variable: str | None) -> str | None:
    """The value of the environment variable the config names (None when it names none)."""
    if not variable:
        return None
    value = os.environ.get(variable)
    if not value:
        raise ConfigError(f"judge ({kind}): environment variable {variable} is not set")
    return value


def category_map(defaults: CategoryMap, overrides: Mapping[str, str | list[str] | None]
                 ) -> dict[str, tuple[str, ...]]:
    """The kind's default map with the config's entries over it (null: not mapped)."""
    merged = dict(defaults)
    for name, target in overrides.items():
        merged[name] = () if target is None else (target,) if isinstance(target, str) \
            else tuple(target)
    return merged


@dataclass(frozen=True, slots=True)
class Reading:
    """What a service said about one item, in its own categories."""

    scores: Mapping[str, float]     # service category -> score in [0, 1]
    assessed: frozenset[str]        # service categories it applied to the item itself
    raw: str = ""                   # its answer as text
    details: Mapping[str, Any] = field(default_factory=dict)  # service-specific, for the trace


def to_policy(reading: Reading, mapping: CategoryMap, categories: Iterable[str],
              unassessed: Literal["unsafe", "omit"]) -> tuple[dict[str, float], dict[str, Any]]:
    """A reading in the policy's categories: the scores and `unmapped` / `unassessed` details."""
    wanted = list(categories)
    known = set(wanted)
    evidence: dict[str, float] = {}
    covered: set[str] = set()
    unmapped: dict[str, float] = {}
    for name in sorted({*reading.scores, *reading.assessed}):
        score = reading.scores.get(name)
        targets = [p for p in mapping.get(name, ()) if p in known]
        if not targets:
            if score is not None:
                unmapped[name] = score
            continue
        for target in targets:
            if name in reading.assessed:
                covered.add(target)
                evidence.setdefault(target, 0.0)  # assessed and not reported: below its floor
            if score is not None:
                evidence[target] = max(evidence.get(target, 0.0), score)
    scores: dict[str, float] = {}
    missing: list[str] = []
    for category in wanted:
        if category in covered:
            scores[category] = evidence[category]
            continue
        missing.append(category)
        if unassessed == "unsafe":
            scores[category] = UNASSESSED_SCORE
        elif category in evidence:
            scores[category] = evidence[category]
    return scores, {"unmapped": unmapped, "unassessed": missing}


def prepare_image(image: GeneratedImage, max_side: int | None,
                  accepted: frozenset[str]) -> tuple[bytes, str, tuple[int, int] | None]:
    """The bytes to upload: as they are when the service takes them, else downscaled to
    `max_side` (and re-encoded as JPEG, which every service takes); the new size when resized."""
    data = image.data
    try:
        with Image.open(io.BytesIO(data)) as im:
            media_type = Image.MIME.get(im.format or "", image.media_type)
            if (max_side is None or max(im.size) <= max_side) and media_type in accepted:
                return data, media_type, None
            out = im.convert("RGB")
            if max_side is not None:
                out.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            buffer = io.BytesIO()
            out.save(buffer, format="JPEG", quality=90)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise JudgeError("hosted judge could not read the image to upload") from exc
    return buffer.getvalue(), "image/jpeg", out.size


class Transient(JudgeError):
    """A failure another try may not meet; to everyone but the retry policy a JudgeError."""


class HostedJudge:
    """One moderation service: a subclass says what it reads and how (`read`)."""

    kind: ClassVar[str]
    defaults: ClassVar[CategoryMap]
    reads: ClassVar[frozenset[str]]  # "image", "text"
    accepted_images: ClassVar[frozenset[str]] = frozenset(
        {"image/png", "image/jpeg", "image/webp"})

    def __init__(self, options: HostedOptions, *, default_id: str,
                 secrets: Sequence[str | None] = (), headers: Mapping[str, str] | None = None
                 ) -> None:
        self.options = options
        self.id = options.id or default_id
        self.categories = category_map(self.defaults, options.categories)
        self._secrets = tuple(s for s in secrets if s)
        self._headers = dict(headers or {})
        self._client: httpx.AsyncClient | None = None
        self._closed = False
        policy = RetryPolicy(attempts=options.retries + 1, backoff_s=options.backoff_s,
                             max_backoff_s=MAX_BACKOFF_S)
        self._call = Retrying(f"judge ({self.kind})", policy, timeout_s=options.timeout_s,
                              retryable=lambda exc: isinstance(exc, Transient),
                              expired=JudgeError, max_concurrency=options.max_concurrency)

    def __repr__(self) -> str:  # never the key
        return f"{type(self).__name__}(id={self.id!r})"

    async def read(self, item: JudgeInput) -> Reading:
        raise NotImplementedError

    # --- the judge ------------------------------------------------------------------------------

    async def judge(self, items: Sequence[JudgeInput], policy: Policy) -> list[Verdict]:
        return list(await asyncio.gather(*(self._one(item, policy) for item in items)))

    async def _one(self, item: JudgeInput, policy: Policy) -> Verdict:
        t0 = time.perf_counter()
        what = "text" if item.image is None else "image"
        if what in self.reads:
            reading = await self.read(item)
        else:
            reading = Reading({}, frozenset(), details={"reads": sorted(self.reads)})
        scores, details = to_policy(reading, self.categories, policy.categories,
                                    self.options.unassessed)
        return Verdict(scores=scores, judge_id=self.id, raw=reading.raw,
                       latency_ms=(time.perf_counter() - t0) * 1000.0,
                       details={**details, **reading.details})

    async def upload(self, image: GeneratedImage) -> tuple[bytes, str, dict[str, Any]]:
        """The image's bytes for the service, and what the trace records of a resize."""
        data, media_type, resized = await asyncio.to_thread(
            prepare_image, image, self.options.max_image_side, self.accepted_images)
        return data, media_type, {"resized_to": list(resized)} if resized else {}

    @staticmethod
    def b64(data: bytes) -> str:
        return pybase64.b64encode(data).decode("ascii")

    # --- the service ----------------------------------------------------------------------------

    async def retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        return await self._call(attempt)

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            if self._closed:
                raise JudgeError(f"judge ({self.kind}) is closed")
            self._client = httpx.AsyncClient(
                headers=self._headers, timeout=self.options.timeout_s, trust_env=False,
                follow_redirects=False,
                limits=httpx.Limits(max_connections=self.options.max_concurrency))
        return self._client

    async def post_json(self, url: str, body: Mapping[str, Any]) -> tuple[Any, str]:
        """POST `body` as JSON, retried; the answer parsed and as text."""
        return await self._call(lambda: self._post(url, body))

    async def _post(self, url: str, body: Mapping[str, Any]) -> tuple[Any, str]:
        try:
            resp = await self._http().post(url, json=body)
        except httpx.TimeoutException as exc:
            raise Transient(f"judge ({self.kind}) timed out after "
                            f"{self.options.timeout_s:g} s") from exc
        except httpx.HTTPError as exc:
            raise Transient(f"judge ({self.kind}) is unreachable "
                            f"({type(exc).__name__})") from exc
        if resp.status_code >= 400:
            raise self.failure(resp.status_code, resp.text, resp.headers.get("retry-after"))
        try:
            return resp.json(), resp.text
        except ValueError:
            raise JudgeError(f"judge ({self.kind}) answered with invalid JSON",
                             detail=resp.text, secrets=self._secrets) from None

    def failure(self, status: int, text: str, retry_after: str | None = None) -> JudgeError:
        """The JudgeError for a service's HTTP failure: its words only in the redacted detail."""
        transient = status in _TRANSIENT_STATUS or status >= 500
        if status in (401, 403):
            what = f"refused the guard's credentials (HTTP {status})"
        elif transient:
            what = f"failed (HTTP {status})"
        else:
            what = f"rejected the request (HTTP {status})"
        return (Transient if transient else JudgeError)(
            f"judge ({self.kind}) {what}", detail=f"HTTP {status}: {text}",
            headers=retry_after_header(retry_after),
            secrets=self._secrets)

    def malformed(self, why: str, text: str) -> JudgeError:
        return JudgeError(f"judge ({self.kind}) answered in an unexpected shape: {why}",
                          detail=text, secrets=self._secrets)

    def raw(self, text: str) -> str:
        return redact(text, self._secrets, limit=RAW_CHARS)

    # --- lifecycle ------------------------------------------------------------------------------

    async def ready(self) -> bool:
        return not self._closed

    async def aclose(self) -> None:
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


def unit(value: Any) -> float | None:
    """A service's score as a float in [0, 1], or None when it is not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value):
        return None
    return min(1.0, max(0.0, float(value)))
