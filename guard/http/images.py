"""The images API: POST /v1/images/generations and /v1/images/edits (JSON or server-sent events),
and GET /v1/guard/images/{id} (the signed links of `response_format: url`).

Parsing is guard.http.intake's; a request's life (trace, policy, engine, the fail-closed audit
write) is guard.pipeline.exchange.Exchange; this module renders what the Exchange replies.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from guard.core.protocol import completed_events
from guard.http.intake import parse_edit, parse_generation
from guard.http.middleware.drain import Drain
from guard.http.responses import JSONResponse, state_of
from guard.pipeline.exchange import TRACE_HEADER, Exchange, GuardState, Job, Reply
from guard.support import b64json
from guard.support.errors import Draining, NotFound

Parser = Callable[[Request, GuardState], Awaitable[Job]]


async def generations(request: Request) -> Response:
    return await _serve(request, "/v1/images/generations", parse_generation)


async def edits(request: Request) -> Response:
    return await _serve(request, "/v1/images/edits", parse_edit)


async def _serve(request: Request, endpoint: str, parse: Parser) -> Response:
    state = state_of(request)
    exchange = Exchange(state, endpoint, request.headers)
    refused = await exchange.admit(request.headers.get("authorization"),
                                   request.headers.get("x-guard-policy"),
                                   request.app.state.drain.unless_draining(
                                       lambda: parse(request, state)))
    if refused is not None:
        return render(await exchange.finish(refused))
    base_url = _base_url(state, request)
    assert exchange.job is not None
    if exchange.job.req.stream:
        drain: Drain = request.app.state.drain

        def cut() -> Draining | None:  # cancelled by the drain timeout, not by the client
            return _cut() if drain.cut_short else None

        return StreamingResponse(_events(exchange, base_url, cut),
                                 media_type="text/event-stream",
                                 headers={**exchange.quota.headers,
                                          TRACE_HEADER: exchange.trace.id,
                                          "cache-control": "no-cache"})
    try:
        reply = await exchange.run(base_url)
    except asyncio.CancelledError:  # cut at the drain timeout (guard.http.middleware.drain): traced all the same
        await exchange.cut_short(_cut())
        raise
    return render(await exchange.finish(reply))


def _cut() -> Draining:
    return Draining("The server stopped before this request finished.")


def render(reply: Reply) -> Response:
    body = reply.images.render() if reply.images is not None else reply.error
    return JSONResponse(body, reply.status, reply.headers)


async def _events(exchange: Exchange, base_url: str,
                  cut: Callable[[], Draining | None]) -> AsyncIterator[bytes]:
    """Server-sent events. No unjudged image leaves the proxy: partial images are withheld, a
    keep-alive comment goes out while the loop runs, then one completed event per judged image
    (or one error event), each sent only after the trace is written."""
    assert exchange.job is not None
    async for reply in exchange.stream(base_url, cut=cut):
        if reply is None:
            yield b": judging\n\n"
        elif reply.images is None:
            yield _sse("error", {"type": "error", **reply.error})
        else:
            for event in completed_events(exchange.job.req, reply.images,
                                          exchange.job.event_prefix):
                yield _sse(event["type"], event)


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + b64json.dumps(data) + b"\n\n"


def _base_url(state: GuardState, request: Request) -> str:
    # Without public_url, the Host the request named: guard.http.middleware.hosts let only a trusted one in.
    return (state.config.server.public_url or str(request.base_url)).rstrip("/")


async def served_image(request: Request) -> Response:
    found = await state_of(request).images.open(request.path_params["image_id"],
                                                request.query_params.get("exp", ""),
                                                request.query_params.get("sig", ""),
                                                request.query_params.get("kid"))
    if found is None:
        raise NotFound("Image not found or link expired.")
    return Response(found[1], media_type=found[0])
