"""OpenAI images API shapes, in one place, ordered like the OpenAI reference.

Requests are validated to OpenAI's limits; unknown fields are tolerated (and logged by the
caller), since OpenAI clients send new fields before proxies know them. The guard's own
extensions sit in one marked block at the end.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    WithJsonSchema,
    field_validator,
)

from guard.support.errors import RequestError

_SIZE_RE = re.compile(r"auto|[1-9]\d{1,4}x[1-9]\d{1,4}")  # no 0 side, no leading zeros
# The longest prompt each model family accepts (OpenAI reference, CreateImageRequest.prompt).
_PROMPT_LIMITS = {"dall-e-2": 1000, "dall-e-3": 4000}
_GPT_IMAGE_PROMPT_LIMIT = 32000
ResponseFormat = Literal["url", "b64_json"]
# Models that answer links unless asked otherwise (OpenAI reference, CreateImageRequest
# .response_format); None: a request naming no model gets OpenAI's default model, dall-e-2.
_LINKS_BY_DEFAULT = {None, "dall-e-2", "dall-e-3"}


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    prompt: StrictStr
    model: StrictStr | None = None
    n: StrictInt | None = Field(None, ge=1, le=10)
    quality: Literal["standard", "hd", "low", "medium", "high", "auto"] | None = None
    response_format: ResponseFormat | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: StrictInt | None = Field(None, ge=0, le=100)
    stream: StrictBool | None = None
    partial_images: StrictInt | None = Field(None, ge=0, le=3)
    size: StrictStr | None = None
    moderation: Literal["low", "auto"] | None = None
    background: Literal["transparent", "opaque", "auto"] | None = None
    style: Literal["vivid", "natural"] | None = None
    user: StrictStr | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be empty")
        return value

    @field_validator("size")
    @classmethod
    def _size_shape(cls, value: str | None) -> str | None:
        # fullmatch: `$` would also match before a final newline ("1024x1024\n")
        if value is not None and not _SIZE_RE.fullmatch(value):
            raise ValueError("size must be 'auto' or WIDTHxHEIGHT, e.g. '1024x1024'")
        return value

    @property
    def count(self) -> int:
        return self.n or 1

    def answer_format(self, deployment_default: ResponseFormat | None = None) -> ResponseFormat:
        """The format of the images answered: the request's `response_format`, else OpenAI's
        default for its model, which a deployment's default replaces (`server.
        default_response_format`) except for the gpt-image models: their clients read base64,
        the only format OpenAI answers for them."""
        if self.response_format is not None:
            return self.response_format
        model = self.model or None
        if model is not None and model.startswith("gpt-image"):
            return "b64_json"
        if deployment_default is not None:
            return deployment_default
        return "url" if model in _LINKS_BY_DEFAULT else "b64_json"

    def prompt_limit(self) -> int:
        return _PROMPT_LIMITS.get(self.model or "", _GPT_IMAGE_PROMPT_LIMIT)

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


def parse_generation_request(body: Any) -> ImageGenerationRequest:
    """Validate a decoded JSON body; every problem becomes a 400 that names its `param`."""
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.", code="invalid_request_body")
    if "prompt" not in body:
        raise RequestError("Missing required parameter: 'prompt'.", param="prompt",
                           code="missing_required_parameter")
    try:
        req = ImageGenerationRequest.model_validate(body)
    except ValidationError as exc:
        raise _to_request_error(exc) from None
    _check_limits(req)
    return req


def _check_limits(req: ImageGenerationRequest) -> None:
    if len(req.prompt) > req.prompt_limit():
        raise RequestError(
            f"Invalid 'prompt': string too long. Expected a string with maximum length "
            f"{req.prompt_limit()}, but got a string with length {len(req.prompt)} instead.",
            param="prompt", code="string_above_max_length")
    if req.model == "dall-e-3" and req.count != 1:
        raise RequestError("Invalid 'n': dall-e-3 only supports n=1.", param="n")
    if req.partial_images and not req.stream:
        raise RequestError("Invalid 'partial_images': only with stream=true.",
                           param="partial_images")


class ImageEditRequest(ImageGenerationRequest):
    """The non-file fields of a multipart /v1/images/edits request."""

    input_fidelity: Literal["high", "low"] | None = None


_FORM_INTS = ("n", "output_compression", "partial_images")


def parse_edit_form(fields: dict[str, str]) -> ImageEditRequest:
    """Validate the text fields of a multipart edit request (all strings on the wire)."""
    if "prompt" not in fields:
        raise RequestError("Missing required parameter: 'prompt'.", param="prompt",
                           code="missing_required_parameter")
    values: dict[str, Any] = dict(fields)
    for name in _FORM_INTS:
        if name in values:
            try:
                values[name] = int(values[name])
            except ValueError:
                raise RequestError(f"Invalid '{name}': expected an integer.", param=name,
                                   code="invalid_type") from None
    if "stream" in values:
        flag = values["stream"].lower()
        if flag not in ("true", "false"):
            raise RequestError("Invalid 'stream': expected true or false.", param="stream",
                               code="invalid_type")
        values["stream"] = flag == "true"
    try:
        req = ImageEditRequest.model_validate(values)
    except ValidationError as exc:
        raise _to_request_error(exc) from None
    _check_limits(req)
    return req


def _to_request_error(exc: ValidationError) -> RequestError:
    err = exc.errors()[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    value = err.get("input")
    shown = repr(value)[:80]
    return RequestError(f"Invalid '{param}': {err['msg']} (got {shown}).", param=param,
                        code="invalid_type" if "type" in err["type"] else "invalid_value")


def _base64_text(value: Any) -> str | bytes | memoryview:
    if not isinstance(value, str | bytes | memoryview):
        raise ValueError("base64 text expected")
    return value


# Base64 as text, or as ASCII bytes: a relayed image's are a memoryview of the backend's own
# response body, written into ours as received (`guard.support.b64json.dumps_parts`), never copied.
Base64Text = Annotated[Any, AfterValidator(_base64_text),
                       WithJsonSchema({"type": "string", "contentEncoding": "base64"})]


class ImageObject(BaseModel):
    """One entry of ImagesResponse.data: the image (base64 or a link) and its revised prompt."""

    b64_json: Base64Text | None = None
    url: str | None = None
    revised_prompt: str | None = None


# --- SafeEdit Guard extensions ---------------------------------------------------------------
# The response body carries a `guard` block beside OpenAI's fields; OpenAI clients ignore it.

class GuardImageInfo(BaseModel):
    index: int
    decision: Literal["passed", "edited", "refused", "failed"]
    rounds: int
    categories: list[str] = Field(default_factory=list)


class GuardBlock(BaseModel):
    trace_id: str
    decision: str
    policy: dict[str, Any]
    rounds: int
    images: list[GuardImageInfo]


class ImagesResponse(BaseModel):
    """OpenAI's ImagesResponse (the fields the proxy knows), plus the guard block."""

    created: int
    data: list[ImageObject]
    output_format: Literal["png", "jpeg", "webp"] | None = None
    guard: GuardBlock

    def render(self) -> dict[str, Any]:
        """The JSON body: absent fields are left out, as OpenAI leaves them out."""
        return self.model_dump(exclude_none=True)


_EVENT_SIZES = {"1024x1024", "1024x1536", "1536x1024", "auto"}
_EVENT_QUALITIES = {"low", "medium", "high", "auto"}


def completed_events(req: ImageGenerationRequest, response: ImagesResponse, prefix: str
                     ) -> list[dict[str, Any]]:
    """One `<prefix>.completed` streaming event per image (image_generation or image_edit),
    shaped as OpenAI's ImageGenCompletedEvent / ImageEditCompletedEvent."""
    events = []
    for image, info in zip(response.data, response.guard.images, strict=False):
        events.append({
            "type": f"{prefix}.completed",
            "b64_json": image.b64_json,
            "created_at": response.created,
            "size": req.size if req.size in _EVENT_SIZES else "auto",
            "quality": req.quality if req.quality in _EVENT_QUALITIES else "auto",
            "background": req.background or "auto",
            "output_format": req.output_format or "png",
            # The proxy does not count the backend's tokens; zeros say "not measured here".
            "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                      "input_tokens_details": {"text_tokens": 0, "image_tokens": 0}},
            "revised_prompt": image.revised_prompt,
            "guard": {"trace_id": response.guard.trace_id,
                      **info.model_dump()},
        })
    return events
