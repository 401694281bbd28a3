"""Labelling on the review pages (guard.core.labels): the label forms of a trace page, and the queue.

    POST /guard/traces/{id}/labels  one label (slot, round, verdict, category, note), from the
                                    form under each judged image and the prompt: CSRF-checked
                                    like sign-out, then POST-redirect-GET back to the item
    GET  /guard/queue               the traces nobody labelled yet: refused, edited, then a
                                    sample of the passed ones (`sample`, percent, default 10),
                                    filtered as the trace list is (prompt words, category,
                                    decision, endpoint, key, policy and version, model; tenant
                                    for admins), with the count of what is left
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from guard import review
from guard.audit.query import TEXT_FILTERS, parse_trace_query
from guard.core.auth import Principal
from guard.core.labels import (
    MAX_NOTE,
    VERDICTS,
    Label,
    QueueQuery,
    new_label,
    trace_categories,
)
from guard.core.types import Trace
from guard.http.errors import status_of
from guard.plugins import LabelStore
from guard.support.errors import GuardError, RequestError, Unsupported

DEFAULT_SAMPLE_PERCENT = "10"
QUEUE_SIZE = 50
_FORM_FIELDS = ("slot", "round", "verdict", "category", "note")
QUEUE_FILTERS = (*TEXT_FILTERS, "policy_version")


def _label_store(state: Any) -> LabelStore | None:
    return state.store if isinstance(state.store, LabelStore) else None


async def trace_labels(state: Any, trace: Trace) -> dict[str, Any]:
    """What the trace page's label blocks need: each item's labels (the current one first, then
    the ones it superseded), the verdicts and the categories a label may name."""
    store = _label_store(state)
    by_item: dict[tuple[int | None, int], list[tuple[Label, bool]]] = {}
    if store is not None:
        page = await store.labels(trace_id=trace.id, latest_only=False, limit=1000)
        for label in page.items:  # newest first
            by_item.setdefault((label.slot, label.round), []).append(
                (label, label.id in page.superseded))
    return {"item_labels": lambda slot, index: by_item.get((slot, index), []),
            "can_label": store is not None, "verdicts": VERDICTS, "max_note": MAX_NOTE,
            "label_categories": trace_categories(trace, state.policies)}


async def add_label(request: Request) -> Response:
    sessions = review._sessions(request)
    session = sessions.current(request)
    if session is None:
        return review._to_login()
    form = await request.form(max_files=0, max_fields=8)
    if (not sessions.same_origin(request)
            or not sessions.session_token_ok(session, str(form.get("csrf", "")))):
        return review._message(request, 403, "Refused", "This label was not sent from your "
                                                        "session's page.", session)
    trace = await review._visible_trace(request, session)
    if trace is None:
        return review._message(request, 404, "Not found", "There is no such trace for this key.",
                               session)
    state = review._state(request)
    store = _label_store(state)
    values = {name: str(form.get(name, "")) for name in _FORM_FIELDS}
    try:
        if store is None:
            raise Unsupported("This audit store does not keep labels.")
        label = await store.add_label(new_label(values, trace, session.principal,
                                                trace_categories(trace, state.policies)))
    except GuardError as exc:
        return review._message(request, status_of(exc), "Label not saved", exc.message, session,
                               back=(f"/guard/traces/{quote(trace.id, safe='')}",
                                     "Back to the trace"))
    item = f"item-{'prompt' if label.slot is None else label.slot}-{label.round}"
    return RedirectResponse(f"/guard/traces/{quote(trace.id, safe='')}#{item}",
                            status_code=303)


def queue_query(typed: dict[str, str], principal: Principal) -> QueueQuery:
    """The queue's filters as typed (the trace list's, and `sample` in percent); bad values are
    400s naming them."""
    try:
        sample = float(typed["sample"] or DEFAULT_SAMPLE_PERCENT)
    except ValueError:
        sample = -1.0
    if not 0 <= sample <= 100:
        raise RequestError("Invalid 'sample': a percentage from 0 to 100.", param="sample")
    q = parse_trace_query({k: v for k, v in typed.items() if k != "sample"}, principal)
    return QueueQuery(tenant=q.tenant, category=q.category, policy_id=q.policy_id,
                      policy_version=q.policy_version, decision=q.decision, key_id=q.key_id,
                      model=q.model, endpoint=q.endpoint, q=q.q, sample=sample / 100,
                      limit=QUEUE_SIZE)


async def queue_page(request: Request) -> Response:
    session = review._sessions(request).current(request)
    if session is None:
        return review._to_login()
    state = review._state(request)
    typed = {name: str(request.query_params.get(name, "")).strip()
             for name in (*QUEUE_FILTERS, "sample")}
    context: dict[str, Any] = {**review.filter_choices(state), "page": None, "message": ""}
    status = 200
    try:
        store = _label_store(state)
        if store is None:
            raise Unsupported("This audit store does not keep labels: there is no queue.")
        context["page"] = await store.review_queue(queue_query(typed, session.principal))
    except GuardError as exc:
        status, context["message"] = status_of(exc), exc.message
    typed["sample"] = typed["sample"] or DEFAULT_SAMPLE_PERCENT
    return review._render(request, "queue.html", status, session,
                          f=review._Filters(typed), **context)
