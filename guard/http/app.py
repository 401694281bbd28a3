"""The SafeEdit Guard app: an OpenAI-compatible images API in front of real image backends.

The composition root: the routes of every HTTP module (guard.http.images, .audit, .labels) and the
auditors' pages (guard.review), the middleware (trusted hosts, drain), one exception path that
renders every error in OpenAI's shape with the status of guard.http.errors, and the lifespan that
builds the app's state (guard.pipeline.exchange.build_state) and starts and closes its parts.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from opentelemetry.sdk.trace.export import SpanExporter
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from guard.audit import LoggedStore
from guard.core.config import Config, load_config
from guard.http import audit
from guard.http import labels as labels_api
from guard.http import log as log_api
from guard.http.errors import status_of
from guard.http.images import edits, generations, served_image
from guard.http.middleware.drain import Drain
from guard.http.middleware.forwarded import ForwardedClient
from guard.http.middleware.hosts import TrustedHostMiddleware
from guard.http.moderations import GUARDRAIL, MODERATIONS, litellm_guardrail, moderations
from guard.http.openapi import openapi_document
from guard.http.policy_reload import PolicyReloader
from guard.http.policy_reload import history as policy_history
from guard.http.responses import JSONResponse, api
from guard.pipeline.exchange import GuardState, build_state
from guard.review import routes as review_routes
from guard.support.errors import ConfigError, GuardError, MethodNotAllowed, NotFound
from guard.support.lifecycle import close_all, start_all

log = logging.getLogger("safeedit.proxy")


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
        Route(MODERATIONS, moderations, methods=["POST"]),
        Route(GUARDRAIL, litellm_guardrail, methods=["POST"]),
        Route("/v1/guard/traces", api(audit.list_traces, "auditor"), methods=["GET"]),
        Route("/v1/guard/traces/{trace_id}", api(audit.get_trace, "auditor"), methods=["GET"]),
        Route("/v1/guard/traces/{trace_id}/labels", api(labels_api.add_label, "auditor"),
              methods=["POST"]),
        Route("/v1/guard/labels", api(labels_api.list_labels, "auditor"), methods=["GET"]),
        Route("/v1/guard/policies/reload", api(audit.reload_policies, "admin"), methods=["POST"]),
        Route("/v1/guard/policies/history", api(policy_history, "auditor"), methods=["GET"]),
        Route("/v1/guard/log/keys", log_api.endpoint(log_api.keys), methods=["GET"]),
        Route("/v1/guard/log/sth", log_api.endpoint(log_api.sth), methods=["GET"]),
        Route("/v1/guard/log/proof/inclusion", log_api.endpoint(log_api.inclusion),
              methods=["GET"]),
        Route("/v1/guard/log/proof/consistency", log_api.endpoint(log_api.consistency),
              methods=["GET"]),
        Route("/healthz", audit.healthz, methods=["GET"]),
        Route("/readyz", audit.readyz, methods=["GET"]),
        Route("/metrics", audit.metrics, methods=["GET"]),
        Route("/openapi.json", audit.openapi, methods=["GET"]),
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
        store = state.store
        if isinstance(store, LoggedStore) and store.log is not None:
            # Before any request: a log that shrank, forked or lost its heads is not served.
            try:
                await store.log.check_start(store.accept_log_reset)
            except ConfigError as exc:
                log.critical("%s", exc)
                raise
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
    # Probes and metrics answer while draining; the images API and the checks refuse
    # themselves, with a trace.
    drain = Drain(exempt=("/healthz", "/readyz", "/metrics", "/v1/images/", MODERATIONS,
                          GUARDRAIL))
    # Every route answers only to trusted Host names (guard.http.middleware.hosts: DNS rebinding, links).
    app = Starlette(routes=served, lifespan=lifespan, middleware=[Middleware(
        TrustedHostMiddleware, hosts=config.server.hosts(), public_url=config.server.public_url),
        Middleware(ForwardedClient, trusted=config.server.trusted_proxies),
        Middleware(drain.middleware)],
        exception_handlers={GuardError: guard_error, Exception: internal_error,
                            404: not_found, 405: method_not_allowed})
    app.state.drain = drain
    app.state.openapi = openapi_document(
        ((method, route.path) for route in served if isinstance(route, Route)
         for method in route.methods or ()), public_url=config.server.public_url)
    return app


__all__ = ["create_app", "GuardState"]
