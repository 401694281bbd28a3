"""The SafeEdit Guard proxy: an OpenAI-compatible images API in front of real image backends.

Routes, request parsing and response rendering only. A request's life (trace, policy, engine,
the fail-closed audit write) is `guard.serving.Exchange`; authentication is
`guard.auth.Authenticator`, called from one place (`_api` below, `Exchange.admit` for images);
every error leaves through one handler in OpenAI's error shape.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from opentelemetry.sdk.trace.export import SpanExporter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

import adapters  # noqa: F401 - registers the built-in backends
from guard.audit.query import parse_trace_query
from guard.auth import Principal, Role, may_see
from guard.config import Config, load_config
from guard.engine import EditInputs
from guard.errors import GuardError, NotFound, PayloadTooLarge, RequestError
from guard.inputs import validate_image
from guard.lifecycle import close_all, readiness, start_all
from guard.policy_reload import PolicyReloader
from guard.protocol import completed_events, parse_edit_form, parse_generation_request
from guard.review import routes as review_routes
from guard.serving import TRACE_HEADER, Exchange, GuardState, Job, Reply, build_state

log = logging.getLogger("safeedit.proxy")


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, headers=headers,
                    media_type="application/json")


def state_of(request: Request) -> GuardState:
    return request.app.state.guard  # type: ignore[no-any-return]


# --- parsing ----------------------------------------------------------------------------------

async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it passes `limit` (declared or actually sent)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body is larger than {limit} bytes.")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"Request body is larger than {limit} bytes.")
    request._body = bytes(body)  # starlette serves form() and body() from this cache
    return request._body


async def parse_generation(request: Request, state: GuardState) -> Job:
    body = await read_body(request, state.config.server.max_body_bytes)
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"We could not parse the JSON body of your request ({exc}).",
                           code="invalid_json") from None
    return Job("/v1/images/generations", parse_generation_request(payload))


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
    return Job("/v1/images/edits", parse_edit_form(fields), EditInputs(tuple(images), mask))


# --- the images API ---------------------------------------------------------------------------

Parser = Callable[[Request, GuardState], Awaitable[Job]]


async def generations(request: Request) -> Response:
    return await _serve(request, "/v1/images/generations", parse_generation)


async def edits(request: Request) -> Response:
    return await _serve(request, "/v1/images/edits", parse_edit)


async def _serve(request: Request, endpoint: str, parse: Parser) -> Response:
    state = state_of(request)
    exchange = Exchange(state, endpoint)
    refused = await exchange.admit(request.headers.get("authorization"),
                                   request.headers.get("x-guard-policy"),
                                   lambda: parse(request, state))
    if refused is not None:
        return render(await exchange.finish(refused))
    base_url = _base_url(state, request)
    assert exchange.job is not None
    if exchange.job.req.stream:
        return StreamingResponse(_events(exchange, base_url), media_type="text/event-stream",
                                 headers={TRACE_HEADER: exchange.trace.id,
                                          "cache-control": "no-cache"})
    return render(await exchange.finish(await exchange.run(base_url)))


def render(reply: Reply) -> Response:
    body = reply.images.render() if reply.images is not None else reply.error
    return json_response(body, reply.status, reply.headers)


async def _events(exchange: Exchange, base_url: str) -> AsyncIterator[bytes]:
    """Server-sent events. No unjudged image leaves the proxy: partial images are withheld, a
    keep-alive comment goes out while the loop runs, then one completed event per judged image
    (or one error event), each sent only after the trace is written."""
    assert exchange.job is not None
    async for reply in exchange.stream(base_url):
        if reply is None:
            yield b": judging\n\n"
        elif reply.images is None:
            yield _sse("error", {"type": "error", **reply.error})
        else:
            for event in completed_events(exchange.job.req, reply.images,
                                          exchange.job.event_prefix):
                yield _sse(event["type"], event)


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _base_url(state: GuardState, request: Request) -> str:
    return state.config.server.public_url or str(request.base_url).rstrip("/")


async def served_image(request: Request) -> Response:
    state = state_of(request)
    try:
        expires = int(request.query_params.get("exp", "0"))
    except ValueError:
        expires = 0
    found = state.images.get(request.path_params["image_id"], expires,
                             request.query_params.get("sig", ""))
    if found is None:
        raise NotFound("Image not found or link expired.")
    return Response(found[1], media_type=found[0])


# --- audit and operations (authenticated by `_api`) -------------------------------------------

Handler = Callable[[Request, Principal], Awaitable[Response]]


def _api(handler: Handler, role: Role) -> Callable[[Request], Awaitable[Response]]:
    """A route that needs a key with `role` (or admin): the principal is the handler's argument."""
    async def endpoint(request: Request) -> Response:
        principal = state_of(request).auth.authorize(request.headers.get("authorization"), role)
        return await handler(request, principal)

    return endpoint


async def get_trace(request: Request, principal: Principal) -> Response:
    trace = await state_of(request).store.get(request.path_params["trace_id"])
    if trace is None or not may_see(principal, trace.tenant):
        raise NotFound("No such trace.")
    return json_response(trace.model_dump(mode="json"))


async def list_traces(request: Request, principal: Principal) -> Response:
    query = parse_trace_query(request.query_params, principal)
    page = await state_of(request).store.query(query)
    return json_response({"object": "list", "data": page.items, "next_cursor": page.next_cursor})


async def reload_policies(request: Request, principal: Principal) -> Response:
    result = await request.app.state.policy_reloader.reload()
    return json_response(result.to_dict())


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    checks = await readiness(state_of(request).parts())
    ok = all(checks.values())
    return json_response({"status": "ready" if ok else "not ready", "checks": checks},
                         200 if ok else 503)


async def metrics(request: Request) -> Response:
    return Response(state_of(request).metrics.render(),
                    media_type="text/plain; version=0.0.4; charset=utf-8")


# --- one exception path -----------------------------------------------------------------------

async def guard_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GuardError)
    return json_response(exc.to_dict(), exc.status, exc.headers)


async def internal_error(request: Request, exc: Exception) -> Response:
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return await guard_error(request, GuardError(f"Internal error ({type(exc).__name__})."))


async def not_found(request: Request, exc: Exception) -> Response:
    return await guard_error(request, NotFound(f"Unknown path {request.url.path}."))


async def method_not_allowed(request: Request, exc: Exception) -> Response:
    return await guard_error(request, RequestError(
        f"Method {request.method} is not allowed here.", code="method_not_allowed", status=405))


# --- the app ----------------------------------------------------------------------------------

def routes() -> list[BaseRoute]:
    return [
        Route("/v1/images/generations", generations, methods=["POST"]),
        Route("/v1/images/edits", edits, methods=["POST"]),
        Route("/v1/guard/images/{image_id}", served_image, methods=["GET"]),
        Route("/v1/guard/traces", _api(list_traces, "auditor"), methods=["GET"]),
        Route("/v1/guard/traces/{trace_id}", _api(get_trace, "auditor"), methods=["GET"]),
        Route("/v1/guard/policies/reload", _api(reload_policies, "admin"), methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *review_routes(),
    ]


def create_app(config: Config | None = None, *,
               span_exporter: SpanExporter | None = None) -> Starlette:
    """The proxy app for `config` (embedded defaults when None)."""
    config = config or load_config(None)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state = build_state(config, span_exporter)
        app.state.guard = state
        app.state.policy_reloader = reloader = PolicyReloader.start(state)
        if state.auth.open_mode:
            log.warning("no API keys configured: open mode, any key is accepted "
                        "(bind to loopback only)")
        if not state.engine.enabled:
            log.warning("guard disabled in config: passthrough, images are NOT judged")
        # Heavy judges load off the event loop; /readyz says false until they are ready.
        starting = start_all(part for _, part in state.parts())
        try:
            yield
        finally:
            await reloader.stop()
            await close_all([part for _, part in state.parts()], starting)
            state.telemetry.shutdown()

    return Starlette(routes=routes(), lifespan=lifespan, exception_handlers={
        GuardError: guard_error, Exception: internal_error,
        404: not_found, 405: method_not_allowed})


__all__ = ["create_app", "GuardState"]
