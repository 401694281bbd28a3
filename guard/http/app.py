"""The SafeEdit Guard proxy: an OpenAI-compatible images API in front of real image backends.

Routes, request parsing and response rendering only. A request's life (trace, policy, engine,
the fail-closed audit write) is `guard.pipeline.exchange.Exchange`; authentication is
`guard.core.auth.Authenticator`, called from one place (`_api` below, `Exchange.admit` for images);
every error leaves through one handler in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from opentelemetry.sdk.trace.export import SpanExporter
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from guard.audit.query import parse_trace_query
from guard.core.auth import Principal, Role, may_see
from guard.core.config import Config, load_config
from guard.core.protocol import completed_events
from guard.http import labels as labels_api
from guard.http.errors import status_of
from guard.http.intake import parse_edit, parse_generation
from guard.http.middleware.drain import Drain
from guard.http.middleware.hosts import TrustedHostMiddleware
from guard.http.openapi import openapi_document
from guard.http.policy_reload import PolicyReloader
from guard.pipeline.exchange import TRACE_HEADER, Exchange, GuardState, Job, Reply, build_state
from guard.review import routes as review_routes
from guard.support import b64json
from guard.support.errors import Draining, GuardError, MethodNotAllowed, NotFound
from guard.support.lifecycle import close_all, readiness, start_all

log = logging.getLogger("safeedit.proxy")


class JSONResponse(Response):
    """JSON sent in parts (`b64json.dumps_parts`): a relayed image's base64 goes to the socket
    as the backend sent it, never joined into one more multi-megabyte copy of the body. A part
    may be a memoryview of the backend's body: uvicorn writes any bytes-like body as it is."""

    media_type = "application/json"

    def __init__(self, body: Any, status: int = 200, headers: dict[str, str] | None = None):
        self.parts = b64json.dumps_parts(body)
        super().__init__(b"", status, headers)
        self.headers["content-length"] = str(sum(map(len, self.parts)))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        last = len(self.parts) - 1
        for i, part in enumerate(self.parts):
            await send({"type": "http.response.body", "body": part, "more_body": i < last})


def state_of(request: Request) -> GuardState:
    return request.app.state.guard  # type: ignore[no-any-return]


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
    return JSONResponse(trace.model_dump(mode="json"))


async def list_traces(request: Request, principal: Principal) -> Response:
    query = parse_trace_query(request.query_params, principal)
    page = await state_of(request).store.query(query)
    return JSONResponse({"object": "list", "data": page.items, "next_cursor": page.next_cursor})


async def reload_policies(request: Request, principal: Principal) -> Response:
    result = await request.app.state.policy_reloader.reload()
    return JSONResponse(result.to_dict())


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    checks = {**await readiness(state_of(request).parts()),
              "accepting": not request.app.state.drain.draining}
    ok = all(checks.values())
    return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks},
                         200 if ok else 503)


async def metrics(request: Request) -> Response:
    return Response(state_of(request).metrics.render(),
                    media_type="text/plain; version=0.0.4; charset=utf-8")


async def openapi(request: Request) -> Response:
    return JSONResponse(request.app.state.openapi)


# --- one exception path -----------------------------------------------------------------------

async def guard_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GuardError)
    return JSONResponse(exc.to_dict(), status_of(exc), exc.headers)


async def internal_error(request: Request, exc: Exception) -> Response:
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return await guard_error(request, GuardError(f"Internal error ({type(exc).__name__})."))


async def not_found(request: Request, exc: Exception) -> Response:
    return await guard_error(request, NotFound(f"Unknown path {request.url.path}."))


async def method_not_allowed(request: Request, exc: Exception) -> Response:
    return await guard_error(request, MethodNotAllowed(
        f"Method {request.method} is not allowed here.", code="method_not_allowed"))


# --- the app ----------------------------------------------------------------------------------

def routes() -> list[BaseRoute]:
    return [
        Route("/v1/images/generations", generations, methods=["POST"]),
        Route("/v1/images/edits", edits, methods=["POST"]),
        Route("/v1/guard/images/{image_id}", served_image, methods=["GET"]),
        Route("/v1/guard/traces", _api(list_traces, "auditor"), methods=["GET"]),
        Route("/v1/guard/traces/{trace_id}", _api(get_trace, "auditor"), methods=["GET"]),
        Route("/v1/guard/traces/{trace_id}/labels", _api(labels_api.add_label, "auditor"),
              methods=["POST"]),
        Route("/v1/guard/labels", _api(labels_api.list_labels, "auditor"), methods=["GET"]),
        Route("/v1/guard/policies/reload", _api(reload_policies, "admin"), methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        *review_routes(),
    ]


def create_app(config: Config | None = None, *,
               span_exporter: SpanExporter | None = None) -> Starlette:
    """The proxy app for `config` (embedded defaults when None)."""
    config = config or load_config(None)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        state = build_state(config, status_of, span_exporter)
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
            yield {"drain": app.state.drain}  # `safeedit serve` drains it on SIGTERM
        finally:
            await reloader.stop()
            await close_all([part for _, part in state.parts()], starting)
            state.telemetry.shutdown()

    served = routes()
    # Probes and metrics answer while draining; the images API refuses itself, with a trace.
    drain = Drain(exempt=("/healthz", "/readyz", "/metrics", "/v1/images/"))
    # Every route answers only to trusted Host names (guard.http.middleware.hosts: DNS rebinding, links).
    app = Starlette(routes=served, lifespan=lifespan, middleware=[Middleware(
        TrustedHostMiddleware, hosts=config.server.hosts(), public_url=config.server.public_url),
        Middleware(drain.middleware)],
        exception_handlers={GuardError: guard_error, Exception: internal_error,
                            404: not_found, 405: method_not_allowed})
    app.state.drain = drain
    app.state.openapi = openapi_document(
        ((method, route.path) for route in served if isinstance(route, Route)
         for method in route.methods or ()), public_url=config.server.public_url)
    return app


__all__ = ["create_app", "GuardState"]
