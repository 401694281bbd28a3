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

Options (besides those of adapters.moderation.base): `endpoint` (required), `api_key_env`
(null), `api_version` (2024-09-01).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from adapters.moderation.base import (
    HostedJudge,
    HostedOptions,
    Reading,
    parse_options,
    secret,
)
from guard.core.types import JudgeInput

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

    def __init__(self, options: AzureContentSafetyOptions) -> None:
        key = secret(self.kind, options.api_key_env)
        super().__init__(options, default_id="azure-content-safety", secrets=(key,),
                         headers={"Ocp-Apim-Subscription-Key": key} if key else None)
        base = options.endpoint.rstrip("/") + "/contentsafety"
        query = f"?api-version={options.api_version}"
        self.image_url = f"{base}/image:analyze{query}"
        self.text_url = f"{base}/text:analyze{query}"

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> AzureContentSafetyJudge:
        return cls(parse_options(AzureContentSafetyOptions, cls.kind, options))

    async def read(self, item: JudgeInput) -> Reading:
        extra: dict[str, Any] = {}
        body: dict[str, Any]
        if item.image is None:
            url, body = self.text_url, {"text": item.prompt, "outputType": "FourSeverityLevels"}
        else:
            data, _, extra = await self.upload(item.image)
            url, body = self.image_url, {"image": {"content": self.b64(data)},
                                         "outputType": "FourSeverityLevels"}
        answer, text = await self.post_json(url, body)
        try:
            scores = read_analysis(answer)
        except ValueError as exc:
            raise self.malformed(str(exc), text) from None
        return Reading(scores, frozenset(scores), self.raw(text),
                       {**extra, "applied": "image" if item.image is not None else "text"})


__all__ = ["DEFAULT_CATEGORIES", "AzureContentSafetyJudge", "AzureContentSafetyOptions",
           "read_analysis", "severity_score"]
