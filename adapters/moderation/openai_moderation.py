"""`kind: openai-moderation`: OpenAI's moderation endpoint (omni-moderation) as a judge.

    judge:
      kind: openai-moderation
      api_key_env: OPENAI_API_KEY

Each item is one `POST {api_base}/moderations` with `model` and a multimodal `input`: the
prompt as a `text` part and, for an image, the image as an `image_url` part (a data URI). Scores
are read from `results[0].category_scores`; `category_applied_input_types` says which inputs each
category was applied to: a policy category counts as assessed on the image only through a
service category applied to the image (omni-moderation applies harassment, hate, illicit and
sexual/minors to text only), and as assessed on the text (the prompt sent beside the image)
through one applied to the text. A category applied to no input at all is no finding and is left
out. Without that field (older text models) an image is assessed on nothing and a prompt on
everything.

Limits (checked before upload, adapters.moderation.base): OpenAI's image inputs are PNG, JPEG,
WebP or non-animated GIF of at most 20 MB each; others are re-encoded as JPEG, larger ones
made smaller, and `details.upload` says so.

Options (besides those of adapters.moderation.base): `api_base` (https://api.openai.com/v1),
`api_key_env` (null; sent as a Bearer token), `model` (omni-moderation-latest).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from adapters.moderation.base import (
    HostedJudge,
    HostedOptions,
    ImageLimits,
    Reading,
    parse_options,
    secret,
    unit,
)
from guard.core.types import JudgeInput

DEFAULT_CATEGORIES: dict[str, tuple[str, ...]] = {
    "harassment": ("harassment",),
    "harassment/threatening": ("harassment",),
    "hate": ("hate",),
    "hate/threatening": ("hate",),
    "illicit": ("illegal_activity",),
    "illicit/violent": ("illegal_activity",),
    "self-harm": ("self_harm",),
    "self-harm/intent": ("self_harm",),
    "self-harm/instructions": ("self_harm",),
    "sexual": ("sexual",),
    "sexual/minors": ("minors", "sexual"),
    "violence": ("violence",),
    "violence/graphic": ("violence", "shocking"),
}
# What omni-moderation applies to images as well as text (OpenAI's moderation guide); the rest
# it applies to text only. What `coverage` declares; a verdict reports what the answer says.
IMAGE_CATEGORIES = frozenset({"sexual", "self-harm", "self-harm/intent",
                              "self-harm/instructions", "violence", "violence/graphic"})


class OpenAIModerationOptions(HostedOptions):
    api_base: str = "https://api.openai.com/v1"
    api_key_env: str | None = None
    model: str = "omni-moderation-latest"


def read_moderation(data: Any, applied_to: str) -> tuple[dict[str, float], frozenset[str],
                                                           dict[str, list[str]] | None]:
    """The scores, the categories applied to `applied_to` ("image" or "text") and the
    service's `category_applied_input_types` of a moderation answer. ValueError when malformed."""
    try:
        result = data["results"][0]
        raw_scores = result["category_scores"]
    except (KeyError, IndexError, TypeError) as exc:
        raise ValueError("no results[0].category_scores") from exc
    if not isinstance(raw_scores, Mapping):
        raise ValueError("category_scores is not an object")
    scores: dict[str, float] = {}
    for name, value in raw_scores.items():
        score = unit(value)
        if score is None:
            raise ValueError(f"category_scores[{name!r}] is not a number")
        scores[str(name)] = score
    types = result.get("category_applied_input_types")
    if not isinstance(types, Mapping):
        assessed = frozenset(scores) if applied_to == "text" else frozenset()
        return scores, assessed, None
    applied = {str(k): [str(t) for t in v] for k, v in types.items() if isinstance(v, list)}
    # a category applied to no input has a number but says nothing
    scores = {k: v for k, v in scores.items() if applied.get(k)}
    return scores, frozenset(k for k, v in applied.items() if applied_to in v), applied


class OpenAIModerationJudge(HostedJudge):
    kind = "openai-moderation"
    defaults = DEFAULT_CATEGORIES
    reads = frozenset({"image", "text"})
    image_limits = ImageLimits(max_bytes=20_000_000, formats=frozenset(
        {"image/png", "image/jpeg", "image/webp", "image/gif"}))

    def __init__(self, options: OpenAIModerationOptions) -> None:
        key = secret(self.kind, options.api_key_env)
        super().__init__(options, default_id=f"openai-moderation:{options.model}",
                         secrets=(key,),
                         headers={"authorization": f"Bearer {key}"} if key else None)
        self.model = options.model
        self.url = options.api_base.rstrip("/") + "/moderations"

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> OpenAIModerationJudge:
        return cls(parse_options(OpenAIModerationOptions, cls.kind, options))

    async def read(self, item: JudgeInput) -> Reading:
        parts: list[dict[str, Any]] = []
        if item.prompt or item.image is None:
            parts.append({"type": "text", "text": item.prompt})
        extra: dict[str, Any] = {}
        if item.image is not None:
            data, media_type, extra = await self.upload(item.image)
            parts.append({"type": "image_url",
                          "image_url": {"url": f"data:{media_type};base64,{self.b64(data)}"}})
        answer, text = await self.post_json(self.url, {"model": self.model, "input": parts})
        try:
            scores, assessed, applied = read_moderation(
                answer, "text" if item.image is None else "image")
        except ValueError as exc:
            raise self.malformed(str(exc), text) from None
        # an image's prompt went beside it: what was applied to the text counts for the prompt
        beside = read_moderation(answer, "text")[1] if parts[0]["type"] == "text" \
            and item.image is not None else frozenset()
        return Reading(scores, assessed, self.raw(text), {**extra, "applied": applied},
                       also_text=beside)

    def applies_to(self, name: str) -> frozenset[str]:
        return self.reads if name in IMAGE_CATEGORIES and not self.model.startswith("text-") \
            else frozenset({"text"})


__all__ = ["DEFAULT_CATEGORIES", "OpenAIModerationJudge", "OpenAIModerationOptions",
           "read_moderation"]
