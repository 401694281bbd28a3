"""What the hosted moderation judges share: options, the HTTP call, images, category mapping.

A hosted judge sends an item to a moderation service a team already pays for and maps the
service's categories onto the policy's. It scores; it never refines (the engine's rule-based
refiner writes the refined prompt of an unsafe item).

Mapping (`categories:`, merged over the kind's documented defaults): each service category maps
to a policy category, a list of them, or null (not mapped). A policy category takes the max of
the service categories mapped to it. A service category that maps to nothing the policy has is
kept in the verdict's `details.unmapped` with its score, never dropped.

Not assessed: a policy category is assessed on an input (the image, the prompt) when some
service category mapped to it was applied to that input: OpenAI says per category which inputs
it applied it to, Azure lists the categories it analysed, Google answers UNKNOWN, and an
image-only service reads no prompt. A verdict reports only what was assessed: per category the
inputs in `assessed_on` (guard.core.types.Verdict), scores only for those, and in
`details.unassessed` the categories the item's own input (the image, or a prompt alone) was not
assessed for. What an unassessed category means is the policy's `unassessed` to decide
(docs/judges.md); the judge's old `unassessed: unsafe | omit` option is accepted and ignored,
with a warning. `coverage(policy)` says the same without a call.

The service's limits (`image_limits`, `max_text_chars` of each kind): an image is fitted before
upload (`prepare_image`: re-encoded as JPEG when its format is not taken, scaled into the sides
allowed, then at falling quality and size under the byte limit), and `details.upload` says what
was done; a longer text is read in pieces (`text_pieces`). Every answer is read through
`guard.support.bodies.CappedTransport`: more than `max_response_bytes` (8 MiB) is a failed call,
read no further. Credentials beyond keys (Entra ID, Google's): adapters.moderation.auth.

Failures are JudgeError (503 unless the policy allows unjudged images); a timeout, a connection
failure, 408, 409, 425, 429 (its Retry-After honoured) and 5xx are retried under guard.support.retry,
other 4xx fail at once. What a service answers on failure is kept only as the error's redacted
`detail`; the key is never in an error, a trace or a log line.
"""

from __future__ import annotations

import asyncio
import io
import logging
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

from adapters.moderation.auth import BearerToken
from adapters.options import Options
from guard.core.policy import Policy
from guard.core.types import INPUTS, GeneratedImage, JudgeInput, Verdict
from guard.support.bodies import JUDGE_RESPONSE_BYTES, CappedTransport, ResponseTooLarge, too_large
from guard.support.errors import ConfigError, JudgeError
from guard.support.redact import redact
from guard.support.retry import Retrying, RetryPolicy, retry_after_header
from guard.support.telemetry import client_hooks

CategoryMap = Mapping[str, tuple[str, ...]]
RAW_CHARS = 4000
MAX_BACKOFF_S = 10.0
_TRANSIENT_STATUS = frozenset({408, 409, 425, 429})

T = TypeVar("T")
log = logging.getLogger("safeedit.judge")


class HostedOptions(Options):
    categories: dict[str, str | list[str] | None] = Field(default_factory=dict)
    unassessed: Literal["unsafe", "omit"] | None = None  # decides nothing: the policy does
    timeout_s: float = Field(10.0, gt=0, le=600)
    retries: int = Field(2, ge=0, le=10)
    backoff_s: float = Field(0.25, ge=0, le=30)
    max_concurrency: int = Field(8, ge=1, le=1024)
    max_image_side: int | None = Field(2048, ge=32, le=16_384)
    max_response_bytes: int = Field(JUDGE_RESPONSE_BYTES, gt=0)
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
    # for an image: service categories it applied to the prompt sent beside it (OpenAI)
    also_text: frozenset[str] = frozenset()


Assessed = dict[str, list[str]]  # policy category -> the inputs it was assessed on


def to_policy(reading: Reading, mapping: CategoryMap, categories: Iterable[str], *,
              image: bool = False) -> tuple[dict[str, float], dict[str, Any], Assessed]:
    """A reading in the policy's categories: the scores of what was assessed, the details
    (`unmapped`; `unassessed`: what the item's own input was not assessed for) and per category
    the inputs it was assessed on. A score for nothing assessed is no finding."""
    wanted = list(categories)
    known = set(wanted)
    own = "image" if image else "text"
    evidence: dict[str, float] = {}
    on: dict[str, set[str]] = {}
    unmapped: dict[str, float] = {}
    for name in sorted({*reading.scores, *reading.assessed, *reading.also_text}):
        score = reading.scores.get(name)
        targets = [p for p in mapping.get(name, ()) if p in known]
        if not targets:
            if score is not None:
                unmapped[name] = score
            continue
        inputs = {own} if name in reading.assessed else set()
        if name in reading.also_text:
            inputs.add("text")
        for target in targets if inputs else ():
            on.setdefault(target, set()).update(inputs)
            # assessed and not reported: below the service's floor
            evidence[target] = max(evidence.get(target, 0.0), score or 0.0)
    assessed_on = {c: [i for i in INPUTS if i in on[c]] for c in wanted if c in on}
    missing = [c for c in wanted if own not in on.get(c, ())]
    return ({c: evidence[c] for c in assessed_on}, {"unmapped": unmapped, "unassessed": missing},
            assessed_on)


@dataclass(frozen=True, slots=True)
class ImageLimits:
    """What a service documents it takes as an image: checked before every upload."""

    max_bytes: int                  # of the image as uploaded (before any base64)
    formats: frozenset[str]         # media types
    min_side: int = 1               # px, each side
    max_side: int | None = None     # px, each side


@dataclass(frozen=True, slots=True)
class Upload:
    """The bytes that go to the service, and what was done to fit its limits (for the trace:
    empty when the image went as it was)."""

    data: bytes
    media_type: str
    done: Mapping[str, Any] = field(default_factory=dict)


_QUALITIES = (90, 80, 70, 60)


def prepare_image(image: GeneratedImage, limits: ImageLimits,
                  max_side: int | None = None) -> Upload:
    """The image fitted to `limits` (and the judge's own `max_side`): as it is when it fits,
    else re-encoded as JPEG (every service takes it), downscaled to the largest side allowed,
    upscaled to the smallest, and at falling quality, then size, until it is under `max_bytes`."""
    data = image.data
    sides = [s for s in (max_side, limits.max_side) if s is not None]
    largest = min(sides) if sides else None
    try:
        with Image.open(io.BytesIO(data)) as im:
            media_type = Image.MIME.get(im.format or "", image.media_type)
            size = im.size
            why = [*([f"{media_type} not taken"] if media_type not in limits.formats else []),
                   *([f"larger than {largest} px"] if largest and max(size) > largest else []),
                   *([f"smaller than {limits.min_side} px"] if min(size) < limits.min_side
                     else []),
                   *([f"over {limits.max_bytes} bytes"] if len(data) > limits.max_bytes
                     else [])]
            if not why:
                return Upload(data, media_type)
            out = _fitted(im.convert("RGB"), largest, limits.min_side)
            encoded, quality = _jpeg_under(out, limits.max_bytes)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise JudgeError("hosted judge could not read the image to upload") from exc
    if encoded is None:
        raise JudgeError(f"hosted judge could not fit the image into {limits.max_bytes} bytes")
    done: dict[str, Any] = {"why": why, "from": {"size": list(size), "bytes": len(data),
                                                 "media_type": media_type},
                            "to": {"size": list(encoded[1]), "bytes": len(encoded[0]),
                                   "media_type": "image/jpeg", "quality": quality}}
    return Upload(encoded[0], "image/jpeg", done)


def _fitted(im: Image.Image, largest: int | None, smallest: int) -> Image.Image:
    w, h = im.size
    scale = 1.0
    if largest is not None and max(w, h) > largest:
        scale = largest / max(w, h)
    elif min(w, h) < smallest:
        scale = smallest / min(w, h)
        if largest is not None:
            scale = min(scale, largest / max(w, h))  # a sliver: as near as both limits allow
    if scale == 1.0:
        return im
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return im.resize(size, Image.Resampling.LANCZOS)


def _jpeg_under(im: Image.Image, max_bytes: int
                ) -> tuple[tuple[bytes, tuple[int, int]] | None, int | None]:
    """JPEG bytes under `max_bytes` at the best quality that fits, then at 3/4 the size each
    time (never under 16 px)."""
    while True:
        for quality in _QUALITIES:
            buffer = io.BytesIO()
            im.save(buffer, format="JPEG", quality=quality)
            if buffer.tell() <= max_bytes:
                return (buffer.getvalue(), im.size), quality
        w, h = im.size
        if min(w, h) * 3 // 4 < 16:
            return None, None
        im = im.resize((w * 3 // 4, h * 3 // 4), Image.Resampling.LANCZOS)


class Transient(JudgeError):
    """A failure another try may not meet; to everyone but the retry policy a JudgeError."""


class HostedJudge:
    """One moderation service: a subclass says what it reads and how (`read`)."""

    kind: ClassVar[str]
    defaults: ClassVar[CategoryMap]
    reads: ClassVar[frozenset[str]]  # "image", "text"
    image_limits: ClassVar[ImageLimits]
    max_text_chars: ClassVar[int | None] = None  # longer text is read in pieces of this size

    def __init__(self, options: HostedOptions, *, default_id: str,
                 secrets: Sequence[str | None] = (), headers: Mapping[str, str] | None = None
                 ) -> None:
        self.options = options
        self.id = options.id or default_id
        self.categories = category_map(self.defaults, options.categories)
        if options.unassessed is not None:
            log.warning("judge (%s): `unassessed: %s` no longer decides anything: a judge reports "
                        "only what it assessed, and the policy's `unassessed` decides what the "
                        "rest means (docs/judges.md)", self.kind, options.unassessed)
        self._keys = self._secrets = tuple(s for s in secrets if s)
        self._tokens: tuple[str, ...] = ()
        self._headers = dict(headers or {})
        self.token: BearerToken | None = None  # a subclass's credential (adapters.moderation.auth)
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
        scores, details, assessed_on = to_policy(reading, self.categories, policy.categories,
                                                 image=item.image is not None)
        return Verdict(scores=scores, judge_id=self.id, raw=reading.raw,
                       latency_ms=(time.perf_counter() - t0) * 1000.0,
                       details={**details, **reading.details}, assessed_on=assessed_on)

    def applies_to(self, name: str) -> frozenset[str]:
        """The inputs the service applies its category `name` to (by default all it reads)."""
        return self.reads

    def coverage(self, policy: Policy) -> dict[str, set[str]]:
        """Per policy category, the inputs the mapped service categories are applied to."""
        out: dict[str, set[str]] = {}
        for name, targets in self.categories.items():
            for target in targets:
                if target in policy.categories:
                    out.setdefault(target, set()).update(self.applies_to(name))
        return out

    async def upload(self, image: GeneratedImage) -> tuple[bytes, str, dict[str, Any]]:
        """The image's bytes for the service, and what the trace records of fitting it to the
        service's limits (`upload`; `resized_to` when its size changed)."""
        fitted = await asyncio.to_thread(prepare_image, image, self.image_limits,
                                         self.options.max_image_side)
        if not fitted.done:
            return fitted.data, fitted.media_type, {}
        extra: dict[str, Any] = {"upload": dict(fitted.done)}
        if fitted.done["to"]["size"] != fitted.done["from"]["size"]:
            extra["resized_to"] = fitted.done["to"]["size"]
        return fitted.data, fitted.media_type, extra

    def text_pieces(self, text: str) -> list[str]:
        """`text` in pieces the service takes (`max_text_chars`), cut at spaces where it can."""
        limit = self.max_text_chars
        if limit is None or len(text) <= limit:
            return [text]
        pieces: list[str] = []
        while len(text) > limit:
            cut = text.rfind(" ", limit // 2, limit + 1)
            cut = cut if cut > 0 else limit
            pieces.append(text[:cut])
            text = text[cut:]
        return [*pieces, text] if text else pieces

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
            limits = httpx.Limits(max_connections=self.options.max_concurrency)
            self._client = httpx.AsyncClient(
                headers=self._headers, timeout=self.options.timeout_s, trust_env=False,
                follow_redirects=False,
                transport=CappedTransport(self.options.max_response_bytes, limits=limits),
                event_hooks=client_hooks())  # the request's trace context goes on
        return self._client

    async def post_json(self, url: str, body: Mapping[str, Any]) -> tuple[Any, str]:
        """POST `body` as JSON, retried; the answer parsed and as text."""
        return await self._call(lambda: self._post(url, body))

    async def _post(self, url: str, body: Mapping[str, Any]) -> tuple[Any, str]:
        headers = await self.token.headers() if self.token is not None else None
        try:
            resp = await self._http().post(url, json=body, headers=headers)
        except ResponseTooLarge as exc:
            raise JudgeError(f"judge ({self.kind}) {too_large(exc)}") from None
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

    def remember(self, secret: str) -> None:
        """A secret learnt later (a token): kept out of errors and traces like the key."""
        if secret and secret not in self._secrets:
            self._tokens = (*self._tokens[-3:], secret)  # the last few: some may be in use
            self._secrets = (*self._keys, *self._tokens)

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
