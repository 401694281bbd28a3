"""`kind: azure-content-safety`: Azure AI Content Safety as a judge.

    judge:
      kind: azure-content-safety
      endpoint: https://<resource>.cognitiveservices.azure.com
      api_key_env: CONTENT_SAFETY_KEY

An image is `POST {endpoint}/contentsafety/image:analyze?api-version=...` with
`{"image": {"content": <base64>}, "outputType": "FourSeverityLevels"}`; a prompt-only item is
`text:analyze` with `{"text": ...}`. The key goes in the `Ocp-Apim-Subscription-Key` header. The
answer's `categoriesAnalysis` lists `{category, severity}`; a category it does not list was not
analysed (not assessed). A severity becomes a score by `severity / 6` (capped at 1), so that a
threshold reads as a severity:

    severity  0 safe   2 low   4 medium   6 high
    score     0.0      0.333   0.667      1.0

A threshold of 0.3 flags Low and above, 0.5 (or 0.6) Medium and above, 0.9 High only.

Limits (the service's, checked before upload, adapters.moderation.base): an image is at most
4 MB and 50 to 2048 px a side (larger ones are downscaled, smaller ones upscaled, re-encoded as
JPEG when needed, and `details.upload` says so); a text at most 10,000 characters, so a longer
prompt is analysed in pieces (cut at spaces) and each category takes its highest severity
(`details.text_pieces`).

Options (besides those of adapters.moderation.base): `endpoint` (required), `api_key_env`
(null), `api_version` (2024-09-01), `auth` (key): `key` sends `api_key_env`'s key, `entra` a
Microsoft Entra ID token (`entra_scope`, https://cognitiveservices.azure.com/.default) from
azure-identity's DefaultAzureCredential or the credential given to the judge
(adapters.moderation.auth).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from adapters.moderation.auth import AZURE_SCOPE, azure_entra
from adapters.moderation.base import (
    HostedJudge,
    HostedOptions,
    ImageLimits,
    Reading,
    parse_options,
    secret,
)
from guard.core.types import JudgeInput
from guard.support.errors import ConfigError

DEFAULT_CATEGORIES: dict[str, tuple[str, ...]] = {
    "Hate": ("hate",),
    "SelfHarm": ("self_harm",),
    "Sexual": ("sexual",),
    "Violence": ("violence",),
}
HIGHEST_SEVERITY = 6


class AzureContentSafetyOptions(HostedOptions):
    endpoint: str
    api_key_env: str | None = None
    api_version: str = "2024-09-01"
    auth: Literal["key", "entra"] = "key"
    entra_scope: str = AZURE_SCOPE


def severity_score(severity: int) -> float:
    """A Content Safety severity (0, 2, 4, 6; 0-7 with eight levels) as a score in [0, 1]."""
    return min(1.0, max(0, severity) / HIGHEST_SEVERITY)


def read_analysis(data: Any) -> dict[str, float]:
    """Scores per category of an analyze answer. ValueError when malformed."""
    analysis = data.get("categoriesAnalysis") if isinstance(data, Mapping) else None
    if not isinstance(analysis, list):
        raise ValueError("no categoriesAnalysis list")
    scores: dict[str, float] = {}
    for entry in analysis:
        severity = entry.get("severity") if isinstance(entry, Mapping) else None
        if not isinstance(entry.get("category"), str) or isinstance(severity, bool) \
                or not isinstance(severity, int):
            raise ValueError(f"unreadable entry {entry!r:.80}")
        scores[entry["category"]] = severity_score(severity)
    return scores


class AzureContentSafetyJudge(HostedJudge):
    kind = "azure-content-safety"
    defaults = DEFAULT_CATEGORIES
    reads = frozenset({"image", "text"})
    # ContentSafetyImageData: "at most 2048 x 2048 pixels and 4 MB, at least 50 x 50 pixels";
    # AnalyzeTextOptions: "at most 10k Unicode characters"
    image_limits = ImageLimits(max_bytes=4_000_000, min_side=50, max_side=2048,
                               formats=frozenset({"image/png", "image/jpeg", "image/webp"}))
    max_text_chars = 10_000

    def __init__(self, options: AzureContentSafetyOptions, *, credential: Any = None) -> None:
        """`credential`: an azure.core TokenCredential for `auth: entra` (default:
        DefaultAzureCredential)."""
        if options.auth == "entra" and options.api_key_env:
            raise ConfigError(f"judge ({self.kind}): auth: entra sends a token, not a key; "
                              "drop api_key_env")
        key = secret(self.kind, options.api_key_env)
        super().__init__(options, default_id="azure-content-safety", secrets=(key,),
                         headers={"Ocp-Apim-Subscription-Key": key} if key else None)
        if options.auth == "entra":
            self.token = azure_entra(self.kind, credential, options.entra_scope, self.remember)
        base = options.endpoint.rstrip("/") + "/contentsafety"
        query = f"?api-version={options.api_version}"
        self.image_url = f"{base}/image:analyze{query}"
        self.text_url = f"{base}/text:analyze{query}"

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> AzureContentSafetyJudge:
        return cls(parse_options(AzureContentSafetyOptions, cls.kind, options))

    async def read(self, item: JudgeInput) -> Reading:
        if item.image is None:
            return await self._read_text(item.prompt)
        data, _, extra = await self.upload(item.image)
        body = {"image": {"content": self.b64(data)}, "outputType": "FourSeverityLevels"}
        scores, text = await self._analyze(self.image_url, body)
        return Reading(scores, frozenset(scores), self.raw(text), {**extra, "applied": "image"})

    async def _read_text(self, prompt: str) -> Reading:
        pieces = self.text_pieces(prompt)
        scores: dict[str, float] = {}
        assessed: set[str] | None = None
        texts: list[str] = []
        for piece in pieces:
            found, text = await self._analyze(
                self.text_url, {"text": piece, "outputType": "FourSeverityLevels"})
            for name, score in found.items():
                scores[name] = max(scores.get(name, 0.0), score)
            # assessed on the prompt only where every piece was
            assessed = set(found) if assessed is None else assessed & set(found)
            texts.append(text)
        extra: dict[str, Any] = {"applied": "text"}
        if len(pieces) > 1:
            extra["text_pieces"] = len(pieces)
        return Reading(scores, frozenset(assessed or ()), self.raw("\n".join(texts)), extra)

    async def _analyze(self, url: str, body: dict[str, Any]) -> tuple[dict[str, float], str]:
        answer, text = await self.post_json(url, body)
        try:
            return read_analysis(answer), text
        except ValueError as exc:
            raise self.malformed(str(exc), text) from None


__all__ = ["DEFAULT_CATEGORIES", "AzureContentSafetyJudge", "AzureContentSafetyOptions",
           "read_analysis", "severity_score"]
