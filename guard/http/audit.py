"""The audit and operations API: traces for auditors, the policy reload for admins (both
authenticated at the edge by guard.http.responses.api), probes, metrics and the OpenAPI document.
The labels API is guard.http.labels."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from guard.audit import SpoolingStore
from guard.audit.query import parse_trace_query
from guard.audit.spool import Spool
from guard.core.auth import Principal, may_see
from guard.http.responses import JSONResponse, state_of
from guard.support.errors import NotFound
from guard.support.lifecycle import readiness


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
    # Stale policy files do not make the proxy unready: it serves the versions it had.
    stale = list(request.app.state.policy_reloader.stale.values())
    details: dict[str, Any] = {"stale_policies": stale}
    if (spool := _spool(request)) is not None:
        # Traces wait in the spool while the audit store is down: served, not yet logged.
        details["audit_spool"] = {**spool.pending(), "path": str(spool.path)}
    return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks,
                         "details": details}, 200 if ok else 503)


def _spool(request: Request) -> Spool | None:
    store = state_of(request).store
    return store.spool if isinstance(store, SpoolingStore) else None


async def metrics(request: Request) -> Response:
    if (spool := _spool(request)) is not None:
        state_of(request).metrics.spool_pending.set(spool.pending()["traces"])
    return Response(state_of(request).metrics.render(),
                    media_type="text/plain; version=0.0.4; charset=utf-8")


async def openapi(request: Request) -> Response:
    return JSONResponse(request.app.state.openapi)
