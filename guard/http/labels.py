"""The labels API (guard.core.labels), for auditors and admins; an auditor labels and lists only their
own tenant's traces, and another tenant's trace is a 404 as on the traces API.

    POST /v1/guard/traces/{trace_id}/labels   {"slot", "round", "verdict", "category", "note"}
                                              -> 201, the label as stored (chained)
    GET  /v1/guard/labels                     trace_id, verdict, category, since, until, tenant
                                              (admins), all=true (superseded labels too),
                                              limit, cursor -> {"object": "list", "data", ...}
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from guard.audit.query import parse_label_filters
from guard.core.auth import Principal, may_see
from guard.core.labels import Label, new_label, trace_categories
from guard.http.intake import read_body
from guard.plugins import LabelStore
from guard.support.errors import NotFound, RequestError, Unsupported

MAX_BODY_BYTES = 64 * 1024


def _store(request: Request) -> LabelStore:
    store = request.app.state.guard.store
    if not isinstance(store, LabelStore):
        raise Unsupported(f"The {type(store).__name__} audit store does not keep labels.",
                         code="labels_unsupported")
    return store


def label_json(label: Label, superseded: bool = False) -> dict[str, Any]:
    return {"object": "guard.label", **label.model_dump(mode="json"), "superseded": superseded}


async def add_label(request: Request, principal: Principal) -> Response:
    store = _store(request)
    try:
        values = orjson.loads(await read_body(request, MAX_BODY_BYTES))
    except orjson.JSONDecodeError:
        raise RequestError("The body is not valid JSON.") from None
    if not isinstance(values, dict):
        raise RequestError("The body must be a JSON object.")
    state = request.app.state.guard
    trace = await state.store.get(request.path_params["trace_id"])
    if trace is None or not may_see(principal, trace.tenant):
        raise NotFound("No such trace.")
    label = new_label(values, trace, principal, trace_categories(trace, state.policies))
    return JSONResponse(label_json(await store.add_label(label)), status_code=201)


async def list_labels(request: Request, principal: Principal) -> Response:
    page = await _store(request).labels(**parse_label_filters(request.query_params, principal))
    return JSONResponse({"object": "list", "next_cursor": page.next_cursor,
                         "data": [label_json(label, label.id in page.superseded)
                                  for label in page.items]})
