"""Checks without images for gateways: POST /v1/moderations (OpenAI's) and
POST /beta/litellm_basic_guardrail_api (LiteLLM's Generic Guardrail API).

Both take a client key, as the images API does; the guardrail endpoint also takes it as
`x-api-key`, the header LiteLLM sends a guardrail's `api_key` in. The work is
guard.pipeline.moderations' and guard.pipeline.guardrail's; every call, refused or failed,
leaves a trace (the reply carries `x-guard-trace-id`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from guard.core.moderation import parse_guardrail_request, parse_moderation_request
from guard.http.intake import read_body
from guard.http.responses import JSONResponse, state_of
from guard.pipeline.exchange import Reply
from guard.pipeline.guardrail import guardrail_check
from guard.pipeline.moderations import Check, moderate
from guard.support.errors import RequestError

MODERATIONS = "/v1/moderations"
GUARDRAIL = "/beta/litellm_basic_guardrail_api"

Work = Callable[[Check, Any], Awaitable[dict[str, Any]]]


async def moderations(request: Request) -> Response:
    return await _serve(request, MODERATIONS, request.headers.get("authorization"),
                        lambda check, body: moderate(check, parse_moderation_request(body)))


async def litellm_guardrail(request: Request) -> Response:
    authorization = request.headers.get("authorization")
    api_key = request.headers.get("x-api-key")
    if not authorization and api_key:
        authorization = f"Bearer {api_key}"
    return await _serve(request, GUARDRAIL, authorization,
                        lambda check, body: guardrail_check(check, parse_guardrail_request(body)))


async def _serve(request: Request, endpoint: str, authorization: str | None,
                 work: Work) -> Response:
    state = state_of(request)
    check = Check(state, endpoint, request.headers)

    async def run() -> dict[str, Any]:
        # Inline images (data URIs) make these bodies as large as an edit's upload.
        body = await read_body(request, state.config.server.max_upload_bytes)
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise RequestError(f"We could not parse the JSON body of your request ({exc}).",
                               code="invalid_json") from None
        return await work(check, payload)

    reply = await check.open(authorization, request.headers.get("x-guard-policy"))
    if reply is None:
        reply = await check.answer(request.app.state.drain.unless_draining(run))
    return _render(await check.finish(reply))


def _render(reply: Reply) -> Response:
    return JSONResponse(reply.body if reply.body is not None else reply.error, reply.status,
                        reply.headers)
