"""From an HTTP request to a `Job`: the body read under its size limit, JSON or multipart parsed,
uploaded images validated. Every refusal is a `RequestError` naming the field, before any backend
call."""

from __future__ import annotations

import math
import re

import orjson
from starlette.requests import ClientDisconnect, Request

from guard.core.protocol import parse_edit_form, parse_generation_request
from guard.pipeline.engine import EditInputs
from guard.pipeline.exchange import GuardState, Job
from guard.support.errors import ClientDisconnected, PayloadTooLarge, RequestError
from guard.support.inputs import image_size, validate_image


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it passes `limit` (declared or actually sent)."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body is larger than {limit} bytes.")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise PayloadTooLarge(f"Request body is larger than {limit} bytes.")
    except ClientDisconnect:
        raise ClientDisconnected(f"The client closed the connection after {len(body)} bytes "
                                 "of its request body.") from None
    request._body = bytes(body)  # starlette serves form() and body() from this cache
    return request._body


async def parse_generation(request: Request, state: GuardState) -> Job:
    body = await read_body(request, state.config.server.max_body_bytes)
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"We could not parse the JSON body of your request ({exc}).",
                           code="invalid_json") from None
    return Job("/v1/images/generations", parse_generation_request(payload),
               deadline_s=deadline_header(request))


async def parse_edit(request: Request, state: GuardState) -> Job:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise RequestError("Image edits must be sent as multipart/form-data.",
                           code="invalid_content_type")
    limit = state.config.server.max_upload_bytes
    await read_body(request, limit)  # cached for form()
    try:
        form = await request.form(max_files=18, max_fields=64)
    except Exception as exc:  # noqa: BLE001 - python-multipart raises several kinds
        raise RequestError(f"Malformed multipart body ({type(exc).__name__}).",
                           code="invalid_multipart") from None
    fields: dict[str, str] = {}
    images: list[bytes] = []
    mask: bytes | None = None
    for key, value in form.multi_items():
        _check_unicode(key, value if isinstance(value, str) else "")
        if isinstance(value, str):
            fields[key] = value
            continue
        data = await value.read()
        if key in ("image", "image[]"):
            validate_image(data, "image", max_bytes=limit)
            images.append(data)
        elif key == "mask":
            validate_image(data, "mask", max_bytes=limit)
            mask = data
        else:
            raise RequestError(f"Unexpected file field '{key}'.", param=key)
    if not images:
        raise RequestError("Missing required parameter: 'image'.", param="image",
                           code="missing_required_parameter")
    if len(images) > 16:
        raise RequestError("Invalid 'image': at most 16 images.", param="image")
    if mask is not None:  # OpenAI applies it to the first image, which must match its size
        (mw, mh), (iw, ih) = image_size(mask), image_size(images[0])
        if (mw, mh) != (iw, ih):
            raise RequestError(f"Invalid 'mask': the mask is {mw}x{mh} but the image is "
                               f"{iw}x{ih}; they must have the same dimensions.", param="mask")
    return Job("/v1/images/edits", parse_edit_form(fields), EditInputs(tuple(images), mask),
               deadline_s=deadline_header(request))


DEADLINE_HEADER = "x-guard-deadline-s"


def deadline_header(request: Request) -> float | None:
    """The client's deadline in seconds (`x-guard-deadline-s`), if it sent one: a positive
    number. It can only shorten the policy's `rounds.deadline_s` (or set one where it has none)."""
    raw = request.headers.get(DEADLINE_HEADER)
    if raw is None:
        return None
    try:
        seconds = float(raw.strip())
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise RequestError(f"Invalid '{DEADLINE_HEADER}': expected a positive number of "
                           "seconds.", param=DEADLINE_HEADER)
    return seconds


_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_unicode(name: str, value: str) -> None:
    """Multipart text is decoded in the charset the client names, and UTF-7 can spell a lone
    surrogate, which neither a trace nor a backend request can carry: refuse it here."""
    if _SURROGATE.search(name) or _SURROGATE.search(value):
        shown = _SURROGATE.sub("\ufffd", name)
        raise RequestError(f"Invalid '{shown}': the text is not valid Unicode (it holds a lone "
                           "surrogate).", param=shown, code="invalid_encoding")
