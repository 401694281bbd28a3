"""OpenAI's moderations API shapes (POST /v1/moderations), ordered like the OpenAI reference, the
one map from a policy's categories to OpenAI's category names, and LiteLLM's Generic Guardrail
API shapes (POST /beta/litellm_basic_guardrail_api).

A request's `input` is a string, a list of strings (one result each), or a list of text and
`image_url` parts (one result for them all, as OpenAI answers). Unknown request fields are
tolerated. The guard's own extension (the `guard` block) sits in one marked block at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from guard.support.errors import RequestError

MODELS = ("omni-moderation-latest", "omni-moderation-2024-09-26", "text-moderation-latest",
          "text-moderation-stable")
TEXT_ONLY_MODELS = ("text-moderation-latest", "text-moderation-stable")
DEFAULT_MODEL = "omni-moderation-latest"

# OpenAI's categories in the reference's order: every result names each of them.
OPENAI_CATEGORIES = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit",
    "illicit/violent", "self-harm", "self-harm/intent", "self-harm/instructions", "sexual",
    "sexual/minors", "violence", "violence/graphic",
)
# The shipped policies' categories under OpenAI's names (docs/gateways.md shows the table).
# A category not here keeps its own name; one already named as OpenAI names it maps to itself.
OPENAI_NAMES: dict[str, str] = {
    "sexual": "sexual",
    "minors": "sexual/minors",
    "violence": "violence",
    "shocking": "violence/graphic",
    "self_harm": "self-harm",
    "hate": "hate",
    "harassment": "harassment",
    "illegal_activity": "illicit",
}

InputType = Literal["text", "image"]
# Limits of one request, so that one call cannot ask the judge for unbounded work.
MAX_INPUTS = 32  # strings in a list of strings
MAX_IMAGES = 4  # image_url parts in a list of parts
MAX_TEXT = 32_000  # characters of one text


def openai_name(category: str) -> str:
    return OPENAI_NAMES.get(category, category)


# --- the request --------------------------------------------------------------------------------

class ModerationTextInput(BaseModel):
    type: Literal["text"]
    text: StrictStr


class ModerationImageURL(BaseModel):
    url: StrictStr = Field(description="A data URI (data:image/png;base64,...), or an http(s) "
                                       "URL where `moderations.image_urls` allows it.")


class ModerationImageURLInput(BaseModel):
    type: Literal["image_url"]
    image_url: ModerationImageURL


class ModerationRequest(BaseModel):
    """The body as OpenAI documents it (for the OpenAPI document); `parse_moderation_request`
    validates it by hand, so that every refusal names the exact `param`."""

    model_config = ConfigDict(extra="allow")

    input: (StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=MAX_INPUTS)]
            | Annotated[list[ModerationTextInput | ModerationImageURLInput],
                        Field(min_length=1)])
    model: Literal[MODELS] | None = None  # type: ignore[valid-type]


@dataclass(frozen=True, slots=True)
class ImageRef:
    url: str  # a data URI or an http(s) URL
    param: str  # where it was in the request, e.g. input[1].image_url.url


@dataclass(frozen=True, slots=True)
class ModerationItem:
    """What one result is about: its text (may be empty) and its images."""

    text: str
    images: tuple[ImageRef, ...] = ()


@dataclass(frozen=True, slots=True)
class ModerationJob:
    model: str
    items: tuple[ModerationItem, ...]
    unknown_fields: tuple[str, ...] = ()


def parse_moderation_request(body: Any) -> ModerationJob:
    """Validate a decoded JSON body; every problem is a 400 that names its `param`."""
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.", code="invalid_request_body")
    model = body.get("model")
    if model is None:
        model = DEFAULT_MODEL
    elif not isinstance(model, str) or model not in MODELS:
        raise RequestError(f"Invalid 'model': {str(model)[:80]!r} is not a moderation model; "
                           f"use one of {', '.join(MODELS)}.", param="model",
                           code="model_not_found")
    if "input" not in body:
        raise RequestError("Missing required parameter: 'input'.", param="input",
                           code="missing_required_parameter")
    items = _items(body["input"])
    if model in TEXT_ONLY_MODELS and any(item.images for item in items):
        raise RequestError(f"Model {model} does not support image inputs; use "
                           f"{DEFAULT_MODEL}.", param="input", code="invalid_value")
    unknown = tuple(sorted(k for k in body if k not in ("input", "model")))
    return ModerationJob(model, items, unknown)


def _items(value: Any) -> tuple[ModerationItem, ...]:
    if isinstance(value, str):
        return (ModerationItem(_text(value, "input")),)
    if not isinstance(value, list):
        raise RequestError("Invalid 'input': expected a string, an array of strings or an "
                           "array of text and image_url objects.", param="input",
                           code="invalid_type")
    if not value:
        raise RequestError("Invalid 'input': empty array. Expected an array with minimum "
                           "length 1.", param="input", code="empty_array")
    if all(isinstance(v, str) for v in value):
        if len(value) > MAX_INPUTS:
            raise RequestError(f"Invalid 'input': at most {MAX_INPUTS} strings per request.",
                               param="input", code="array_above_max_length")
        return tuple(ModerationItem(_text(v, f"input[{i}]")) for i, v in enumerate(value))
    texts: list[str] = []
    images: list[ImageRef] = []
    for i, part in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(part, dict):
            raise RequestError(f"Invalid '{where}': expected a text or image_url object (an "
                               "array mixes strings and objects).", param=where,
                               code="invalid_type")
        kind = part.get("type")
        if kind == "text":
            texts.append(_text(part.get("text"), f"{where}.text"))
        elif kind == "image_url":
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else None
            if not isinstance(url, str) or not url:
                raise RequestError(f"Invalid '{where}.image_url': expected an object with a "
                                   "`url` string.", param=f"{where}.image_url",
                                   code="invalid_type")
            images.append(ImageRef(url, f"{where}.image_url.url"))
        else:
            raise RequestError(f"Invalid '{where}.type': expected 'text' or 'image_url'.",
                               param=f"{where}.type", code="invalid_value")
    if len(images) > MAX_IMAGES:
        raise RequestError(f"Invalid 'input': at most {MAX_IMAGES} image_url parts per request.",
                           param="input", code="array_above_max_length")
    text = "\n".join(texts)
    if len(text) > MAX_TEXT:
        raise RequestError(f"Invalid 'input': the texts hold more than {MAX_TEXT} characters.",
                           param="input", code="string_above_max_length")
    return (ModerationItem(text, tuple(images)),)


def _text(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise RequestError(f"Invalid '{param}': expected a string.", param=param,
                           code="invalid_type")
    if len(value) > MAX_TEXT:
        raise RequestError(f"Invalid '{param}': string too long. Expected a string with maximum "
                           f"length {MAX_TEXT}, but got a string with length {len(value)} "
                           "instead.", param=param, code="string_above_max_length")
    return value


# --- the response -------------------------------------------------------------------------------

class Moderation(BaseModel):
    """One result. Every OpenAI category is named: one the policy has no category for scores 0,
    is never flagged and applies to no input type (`[]`: not assessed). A policy category with no
    OpenAI name appears under its own name."""

    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]
    category_applied_input_types: dict[str, list[InputType]]


# --- the guard's extension ---------------------------------------------------------------------

class ModerationGuardResult(BaseModel):
    decision: Literal["passed", "edited", "refused"] = Field(
        description="What the policy would do with this input as an images prompt.")
    categories: list[str] = Field(description="The policy's categories that crossed.")


class ModerationGuardBlock(BaseModel):
    trace_id: str
    policy: dict[str, Any]
    judge: str
    results: list[ModerationGuardResult]


class ModerationResponse(BaseModel):
    id: str = Field(description="modr-...")
    model: str
    results: list[Moderation]
    guard: ModerationGuardBlock | None = None


def moderation_result(scores: dict[str, float], flagged: set[str],
                      applied: dict[str, list[InputType]]) -> Moderation:
    """A result in OpenAI's names from the policy's: `scores`, the `flagged` categories and the
    input types each was assessed on (all by the policy's category names). Two policy categories
    under one OpenAI name (a policy naming `self-harm` and `self_harm`) count as one: the higher
    score, flagged if either is."""
    categories = dict.fromkeys(OPENAI_CATEGORIES, False)
    category_scores = dict.fromkeys(OPENAI_CATEGORIES, 0.0)
    applied_types: dict[str, list[InputType]] = {name: [] for name in OPENAI_CATEGORIES}
    for category, score in scores.items():
        name = openai_name(category)
        categories[name] = categories.get(name, False) or category in flagged
        category_scores[name] = max(category_scores.get(name, 0.0), float(score))
        types = set(applied_types.get(name, ())) | set(applied.get(category, ()))
        applied_types[name] = [t for t in ("text", "image") if t in types]  # type: ignore[misc]
    return Moderation(flagged=any(categories.values()), categories=categories,
                      category_scores=category_scores,
                      category_applied_input_types=applied_types)


# --- LiteLLM's Generic Guardrail API (POST /beta/litellm_basic_guardrail_api) -----------------
# The shapes of litellm 1.110's GenericGuardrailAPIRequest / GenericGuardrailAPIResponse
# (litellm/types/proxy/guardrails/guardrail_hooks/generic_guardrail_api.py).

MAX_GUARDRAIL_TEXTS = 64


class GuardrailRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    input_type: Literal["request", "response"]
    litellm_call_id: StrictStr | None = None
    litellm_trace_id: StrictStr | None = None
    texts: list[Annotated[StrictStr, Field(max_length=MAX_TEXT)]] | None = Field(
        None, max_length=MAX_GUARDRAIL_TEXTS)
    images: list[StrictStr] | None = Field(None, max_length=MAX_IMAGES,
                                           description="Data URIs, or http(s) URLs where "
                                                       "`moderations.image_urls` allows them.")
    structured_messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    request_data: dict[str, Any] = Field(default_factory=dict)
    request_headers: dict[str, str] | None = None
    litellm_version: StrictStr | None = None
    additional_provider_specific_params: dict[str, Any] | None = None
    model: StrictStr | None = None


GuardrailAction = Literal["NONE", "BLOCKED", "GUARDRAIL_INTERVENED"]


class GuardrailGuardBlock(BaseModel):
    trace_id: str
    decision: Literal["passed", "edited", "refused"]
    categories: list[str]
    policy: dict[str, Any]


class GuardrailResponse(BaseModel):
    action: GuardrailAction
    texts: list[str] | None = Field(None, description="With GUARDRAIL_INTERVENED: the texts "
                                                      "to use instead, refined where flagged.")
    blocked_reason: str | None = None
    guard: GuardrailGuardBlock | None = None


def parse_guardrail_request(body: Any) -> GuardrailRequest:
    """Validate a decoded JSON body; every problem is a 400 that names its `param`."""
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.", code="invalid_request_body")
    try:
        return GuardrailRequest.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise RequestError(f"Invalid '{param}': {err['msg']}.", param=param,
                           code="invalid_type" if "type" in err["type"] else "invalid_value"
                           ) from None
