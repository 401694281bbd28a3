"""`kind: google-safesearch`: Cloud Vision SafeSearch detection as a judge (images only).

    judge:
      kind: google-safesearch
      api_key_env: GOOGLE_VISION_KEY

Each image is `POST {api_base}/images:annotate` with
`{"requests": [{"image": {"content": <base64>}, "features": [{"type": "SAFE_SEARCH_DETECTION"}]}]}`.
The key goes in the `x-goog-api-key` header, which Google APIs accept as the `key=` query
parameter: a URL ends up in access and client logs, a header does not. The answer's
`responses[0].safeSearchAnnotation` gives a likelihood per category (adult, spoof, medical,
violence, racy), read as:

    likelihood  VERY_UNLIKELY  UNLIKELY  POSSIBLE  LIKELY  VERY_LIKELY  UNKNOWN
    score       0.0            0.25      0.5       0.75    1.0          not assessed

so a threshold of 0.5 flags POSSIBLE and above, 0.75 LIKELY and above. A per-image `error` in
the answer is a judge failure (retried when its code says the service is busy). SafeSearch
reads no text: every category of a prompt-only item (the prescreen) is unassessed, see
`unassessed` in adapters.moderation.base.

Limits (the service's, checked before upload, adapters.moderation.base): a request's JSON is at
most 10 MB and base64 adds a third, so an image goes as at most 7,000,000 bytes (PNG, JPEG or
WebP; others re-encoded as JPEG); `details.upload` says what was done to fit.

Options (besides those of adapters.moderation.base): `api_base`
(https://vision.googleapis.com/v1), `api_key_env` (null), `auth` (key): `key` sends
`api_key_env`'s key, `adc` an OAuth token of the application default credentials,
`service_account` one of the service account in `credentials_file`; `quota_project` (null)
(adapters.moderation.auth).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from adapters.moderation.auth import google_credentials
from adapters.moderation.base import (
    HostedJudge,
    HostedOptions,
    ImageLimits,
    Reading,
    Transient,
    parse_options,
    secret,
)
from guard.core.types import JudgeInput
from guard.support.errors import ConfigError, JudgeError

DEFAULT_CATEGORIES: dict[str, tuple[str, ...]] = {
    "adult": ("sexual",),
    "violence": ("violence",),
}
LIKELIHOOD: dict[str, float | None] = {
    "UNKNOWN": None, "VERY_UNLIKELY": 0.0, "UNLIKELY": 0.25, "POSSIBLE": 0.5, "LIKELY": 0.75,
    "VERY_LIKELY": 1.0,
}
# google.rpc.Code values worth another try: DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, INTERNAL,
# UNAVAILABLE
_BUSY_CODES = frozenset({4, 8, 13, 14})


class GoogleSafeSearchOptions(HostedOptions):
    api_base: str = "https://vision.googleapis.com/v1"
    api_key_env: str | None = None
    auth: Literal["key", "adc", "service_account"] = "key"
    credentials_file: str | None = None
    quota_project: str | None = None


def read_safesearch(data: Any) -> tuple[dict[str, float], frozenset[str]]:
    """Scores and assessed categories of an annotate answer. LookupError for the per-image
    error the answer carries, ValueError when malformed."""
    try:
        response = data["responses"][0]
    except (KeyError, IndexError, TypeError) as exc:
        raise ValueError("no responses[0]") from exc
    if not isinstance(response, Mapping):
        raise ValueError("responses[0] is not an object")
    if "error" in response:
        raise LookupError(response["error"])
    annotation = response.get("safeSearchAnnotation", {})
    if not isinstance(annotation, Mapping):
        raise ValueError("safeSearchAnnotation is not an object")
    scores: dict[str, float] = {}
    for name, value in annotation.items():
        if isinstance(value, str) and value in LIKELIHOOD:
            score = LIKELIHOOD[value]
            if score is not None:
                scores[str(name)] = score
    return scores, frozenset(scores)


class GoogleSafeSearchJudge(HostedJudge):
    kind = "google-safesearch"
    defaults = DEFAULT_CATEGORIES
    reads = frozenset({"image"})
    image_limits = ImageLimits(max_bytes=7_000_000,
                               formats=frozenset({"image/png", "image/jpeg", "image/webp"}))

    def __init__(self, options: GoogleSafeSearchOptions, *, credentials: Any = None) -> None:
        """`credentials`: google.auth credentials for `auth: adc | service_account` (default:
        google.auth.default(), or the service account file)."""
        if options.auth != "key" and options.api_key_env:
            raise ConfigError(f"judge ({self.kind}): auth: {options.auth} sends a token, not a "
                              "key; drop api_key_env")
        key = secret(self.kind, options.api_key_env)
        fixed: dict[str, str] = {"x-goog-api-key": key} if key else {}
        token = None
        if options.auth != "key":
            token, extra = google_credentials(self.kind, options.auth, credentials,
                                              options.credentials_file, options.quota_project,
                                              self.remember)
            fixed.update(extra)
        super().__init__(options, default_id="google-safesearch", secrets=(key,),
                         headers=fixed or None)
        self.token = token
        self.url = options.api_base.rstrip("/") + "/images:annotate"

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> GoogleSafeSearchJudge:
        return cls(parse_options(GoogleSafeSearchOptions, cls.kind, options))

    async def read(self, item: JudgeInput) -> Reading:
        assert item.image is not None  # reads images only
        data, _, extra = await self.upload(item.image)
        body = {"requests": [{"image": {"content": self.b64(data)},
                              "features": [{"type": "SAFE_SEARCH_DETECTION"}]}]}

        async def attempt() -> tuple[dict[str, float], frozenset[str], str]:
            answer, text = await self._post(self.url, body)
            try:
                return (*read_safesearch(answer), text)
            except LookupError as exc:
                error = exc.args[0]
                code = error.get("code") if isinstance(error, Mapping) else None
                kind = Transient if code in _BUSY_CODES else JudgeError
                raise kind(f"judge ({self.kind}) could not annotate the image (code {code})",
                           detail=text, secrets=self._secrets) from None
            except ValueError as exc:
                raise self.malformed(str(exc), text) from None

        scores, assessed, text = await self.retrying(attempt)
        return Reading(scores, assessed, self.raw(text), extra)


__all__ = ["DEFAULT_CATEGORIES", "LIKELIHOOD", "GoogleSafeSearchJudge", "GoogleSafeSearchOptions",
           "read_safesearch"]
