"""The auditors' review pages at /guard/: server-rendered HTML, no front-end build step.

    /guard/login                    sign in with an auditor (or admin) key; POST sets the session
    /guard/                         traces with their prompts, endpoints, models and
                                    categories, filterable as GET /v1/guard/traces (prompt
                                    words, time, decision, category, endpoint, key, policy and
                                    version, model; tenant for admins), newest first, cursor
                                    pagination
    /guard/traces/{id}              one trace: every round side by side across the page per
                                    image, with the image (thumbnail where retained, else why
                                    not: guard.review.absence), prompt, scores against the
                                    policy's thresholds, thought, refined prompt, timings
    /guard/traces/{id}/images/{sha} a retained image (?size=thumb for a thumbnail)
    /guard/traces/{id}/labels       POST: label a judged image or the prompt (guard.review.labeling)
    /guard/queue                    the review queue: traces not labelled yet (labeling)
    /guard/dashboard                charts of a window (?since=, ?until=, default the last 7
                                    days; ?tenant= for admins): guard.review.dashboard

An auditor sees only their tenant's traces, as on the JSON API. Pages send a strict CSP (no
scripts at all), no-store caching and frame denial; sessions and CSRF are in `session`.
Failed sign-ins are limited per client address and per key id (`LOGIN_FAILURES` in
`LOGIN_WINDOW_S`, guard.support.ratelimit); beyond that the form answers 429 with Retry-After.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import secrets
from typing import Any
from urllib.parse import quote, urlencode

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from guard.audit import ImageKeepingStore
from guard.audit.query import TEXT_FILTERS, parse_trace_query
from guard.audit.search import ENDPOINTS
from guard.core.auth import Principal, may_see
from guard.core.types import JudgedImage, RoundRecord, Trace
from guard.http.errors import status_of
from guard.plugins import TraceQuery
from guard.review import absence, dashboard, labeling, policies
from guard.review.session import Session, Sessions
from guard.review.templates import environment
from guard.support.errors import AuthenticationError, GuardError
from guard.support.ratelimit import Limiter, MemoryLimiter

log = logging.getLogger("safeedit.review")
_env = environment()
DECISIONS = ("passed", "edited", "refused", "failed")
THUMB_PX = 320


def routes() -> list[BaseRoute]:
    return [
        Route("/guard/", index, methods=["GET"]),
        Route("/guard/login", login_form, methods=["GET"]),
        Route("/guard/login", login, methods=["POST"]),
        Route("/guard/logout", logout, methods=["POST"]),
        Route("/guard/traces/{trace_id}", trace_page, methods=["GET"]),
        Route("/guard/dashboard", dashboard_page, methods=["GET"]),
        Route("/guard/traces/{trace_id}/images/{sha256}", trace_image, methods=["GET"]),
        Route("/guard/traces/{trace_id}/labels", labeling.add_label, methods=["POST"]),
        Route("/guard/queue", labeling.queue_page, methods=["GET"]),
        *policies.routes(),  # the policy history (guard.review.policies)
    ]


def _state(request: Request) -> Any:
    return request.app.state.guard


def _sessions(request: Request) -> Sessions:
    sessions = getattr(request.app.state, "review_sessions", None)
    if sessions is None:
        state = _state(request)
        sessions = request.app.state.review_sessions = Sessions(state.config, state.auth)
    return sessions  # type: ignore[no-any-return]


LOGIN_FAILURES, LOGIN_WINDOW_S = 10, 300.0


def _login_limiter(request: Request) -> Limiter:
    limiter = getattr(request.app.state, "login_limiter", None)
    if limiter is None:
        limiter = request.app.state.login_limiter = MemoryLimiter(LOGIN_FAILURES, LOGIN_WINDOW_S)
    return limiter  # type: ignore[no-any-return]


def _render(request: Request, template: str, status: int = 200,
            session: Session | None = None, **context: Any) -> HTMLResponse:
    nonce = secrets.token_urlsafe(16)
    csrf = _sessions(request).session_token(session) if session else ""
    html = _env.get_template(template).render(nonce=nonce, session=session, csrf=csrf, **context)
    return HTMLResponse(html, status_code=status, headers={
        "content-security-policy": (f"default-src 'none'; style-src 'nonce-{nonce}'; "
                                    "img-src 'self'; form-action 'self'; "
                                    "frame-ancestors 'none'; base-uri 'none'"),
        "x-content-type-options": "nosniff", "x-frame-options": "DENY",
        "referrer-policy": "no-referrer", "cache-control": "no-store"})


def _message(request: Request, status: int, title: str, message: str,
             session: Session | None = None, back: tuple[str, str] | None = None
             ) -> HTMLResponse:
    """A page that says `message`, with a link `back` (url, words; default: the traces)."""
    return _render(request, "message.html", status, session, title=title, message=message,
                   back=back or ("/guard/", "Back to the traces"))


def _to_login() -> RedirectResponse:
    return RedirectResponse("/guard/login", status_code=303)


# --- signing in and out ---------------------------------------------------------------------

async def login_form(request: Request, message: str = "", status: int = 200) -> Response:
    sessions = _sessions(request)
    if not message and sessions.current(request) is not None:
        return RedirectResponse("/guard/", status_code=303)
    seed, new = sessions.login_seed(request)
    response = _render(request, "login.html", status, message=message,
                       login_csrf=sessions.login_token(seed))
    if new:
        sessions.set_login_seed(response, request, seed)
    return response


async def login(request: Request) -> Response:
    sessions = _sessions(request)
    if not sessions.same_origin(request):
        return _message(request, 403, "Refused", "Sign-in requests must come from this site.")
    limiter = _login_limiter(request)
    address = request.client.host if request.client else "unknown"
    if wait := await limiter.retry_after(f"address:{address}"):
        return await _throttled(request, wait, "address", address)
    form = await request.form(max_files=0, max_fields=8)
    token, key = str(form.get("csrf", "")), str(form.get("key", "")).strip()
    if not sessions.login_token_ok(request, token):
        return await login_form(request, "The sign-in form expired. Please try again.", 403)
    try:
        principal = _state(request).auth.authenticate(f"Bearer {key}")
    except AuthenticationError:
        await limiter.hit(f"address:{address}")
        log.info("review sign-in from %s failed: no such key", address)
        return await login_form(request, "That key is not valid.", 401)
    if wait := await limiter.retry_after(f"key:{principal.key_id}"):
        return await _throttled(request, wait, "key", principal.key_id)
    if principal.role not in ("auditor", "admin"):
        await limiter.hit(f"address:{address}")
        await limiter.hit(f"key:{principal.key_id}")
        log.info("review sign-in from %s with key %s failed: role %s", address,
                 principal.key_id, principal.role)
        return await login_form(
            request, f"This key's role ({principal.role}) cannot open the review pages; "
                     "use an auditor key.", 403)
    response = RedirectResponse("/guard/", status_code=303)
    sessions.issue(response, request, principal)
    return response


async def _throttled(request: Request, wait: float, scope: str, who: str) -> Response:
    """The 429 for a sign-in over the failure limit (`scope` address or key, `who` the address
    or key id; never the key); logged and counted."""
    log.warning("review sign-in refused: too many failures for %s %s", scope, who)
    _state(request).metrics.login_throttled.labels(scope).inc()
    minutes = math.ceil(wait / 60)
    response = await login_form(
        request, f"Too many failed sign-ins {'with this key' if scope == 'key' else 'from here'}."
                 f" Try again in {minutes} minute{'s' if minutes != 1 else ''}.", 429)
    response.headers["retry-after"] = str(math.ceil(wait))
    return response


async def logout(request: Request) -> Response:
    sessions = _sessions(request)
    session = sessions.current(request)
    form = await request.form(max_files=0, max_fields=4)
    if (session is None or not sessions.same_origin(request)
            or not sessions.session_token_ok(session, str(form.get("csrf", "")))):
        return _message(request, 403, "Refused", "This sign-out request was not sent from "
                                                 "your session's page.", session)
    response = _to_login()
    sessions.clear(response, request)
    return response


# --- the list -------------------------------------------------------------------------------

def _query(params: Any, principal: Principal) -> tuple[TraceQuery, dict[str, str]]:
    """The query the filters make, and the filters as typed (to show them again)."""
    typed = {name: str(params.get(name, "")).strip()
             for name in ("since", "until", *TEXT_FILTERS, "policy_version", "cursor")}
    return parse_trace_query(typed, principal), typed


async def index(request: Request) -> Response:
    session = _sessions(request).current(request)
    if session is None:
        return _to_login()
    state = _state(request)
    context = filter_choices(state)
    typed = {k: str(v) for k, v in request.query_params.items()}
    try:
        query, typed = _query(request.query_params, session.principal)
        page = await state.store.query(query)
    except GuardError as exc:
        return _render(request, "list.html", status_of(exc), session, f=_Filters(typed), items=[],
                       message=exc.message, first_query="", next_query=None, **context)
    kept = {k: v for k, v in typed.items() if v and k != "cursor"}
    next_query = urlencode({**kept, "cursor": page.next_cursor}) if page.next_cursor else None
    return _render(request, "list.html", 200, session, f=_Filters(typed), items=page.items,
                   message="", first_query=urlencode(kept), next_query=next_query, **context)


def filter_choices(state: Any) -> dict[str, Any]:
    """The choices of the list's and the queue's filter forms."""
    return {"decisions": DECISIONS, "endpoints": ENDPOINTS,
            "categories": sorted({c for pid in state.policies.ids()
                                  for c in state.policies[pid].categories})}


class _Filters(dict[str, str]):
    """Template access by attribute, empty for a filter not given."""

    def __getattr__(self, name: str) -> str:
        return self.get(name, "")


# --- the dashboard --------------------------------------------------------------------------

async def dashboard_page(request: Request) -> Response:
    session = _sessions(request).current(request)
    if session is None:
        return _to_login()
    typed = {name: str(request.query_params.get(name, "")).strip()
             for name in ("since", "until", "tenant")}
    try:
        query = parse_trace_query(typed, session.principal)
        figures = await dashboard.figures(_state(request).store, query)
    except GuardError as exc:
        return _render(request, "dashboard.html", status_of(exc), session, f=_Filters(typed),
                       fig=None, charts={}, message=exc.message)
    charts = await asyncio.to_thread(dashboard.charts, figures) if figures.total else {}
    return _render(request, "dashboard.html", 200, session, f=_Filters(typed), fig=figures,
                   charts=charts, message="")


# --- one trace ------------------------------------------------------------------------------

async def _visible_trace(request: Request, session: Session) -> Trace | None:
    trace: Trace | None = await _state(request).store.get(request.path_params["trace_id"])
    if trace is None or not may_see(session.principal, trace.tenant):
        return None
    return trace


def _thresholds(state: Any, ref: dict[str, Any]) -> tuple[dict[str, Any], str]:
    pid = ref.get("id")
    if not pid:  # refused before a policy was chosen: the page says so where the policy is
        return {}, ""
    if pid not in state.policies:
        return {}, f"Policy {pid!r} is not loaded here: thresholds are not shown."
    policy = state.policies[pid]
    note = ""
    if policy.sha256 != ref.get("sha256"):
        note = (f"This trace ran under {pid} version {ref.get('version')}; the loaded file is "
                f"version {policy.version} (another sha256). Thresholds shown are the loaded "
                "version's; the crossed marks are the ones recorded at the time.")
    return dict(policy.categories), note


async def trace_page(request: Request) -> Response:
    session = _sessions(request).current(request)
    if session is None:
        return _to_login()
    trace = await _visible_trace(request, session)
    if trace is None:
        return _message(request, 404, "Not found", "There is no such trace for this key.",
                        session)
    state = _state(request)
    images = state.store.images if isinstance(state.store, ImageKeepingStore) else None
    prescreen: RoundRecord | None = None
    slots: dict[int, list[tuple[RoundRecord, JudgedImage]]] = {}
    failed: list[RoundRecord] = []
    for rnd in trace.rounds:
        if rnd.kind == "prescreen":
            prescreen = rnd
            continue
        if rnd.error and not rnd.images:
            failed.append(rnd)
        for judged in rnd.images:
            slots.setdefault(judged.slot, []).append((rnd, judged))
    shown = await absence.round_images(trace, (j for cards in slots.values() for _, j in cards),
                                       state.policies, images)
    thresholds, note = _thresholds(state, trace.policy)
    base = f"/guard/traces/{quote(trace.id, safe='')}/images/"
    return _render(request, "trace.html", 200, session, t=trace, prescreen=prescreen,
                   slots=sorted(slots.items()), failed_rounds=failed,
                   results={r.slot: r for r in trace.results}, thresholds=thresholds,
                   policy_note=note, images=shown, image_url=lambda sha: base + sha,
                   **await labeling.trace_labels(state, trace))


async def trace_image(request: Request) -> Response:
    session = _sessions(request).current(request)
    if session is None:
        return Response(status_code=401)
    trace = await _visible_trace(request, session)
    sha = request.path_params["sha256"]
    store = _state(request).store
    images = store.images if isinstance(store, ImageKeepingStore) else None
    # Only images this trace retained: content addresses are shared across tenants.
    if trace is None or images is None or not any(
            j.image_sha256 == sha and j.image_ref for r in trace.rounds for j in r.images):
        return Response(status_code=404)
    found = await images.get(sha)
    if found is None:
        return Response(status_code=404)
    data, media_type = found
    if request.query_params.get("size") == "thumb":
        try:
            data, media_type = await asyncio.to_thread(_thumbnail, data)
        except OSError:  # not an image Pillow reads: no thumbnail, the link still works
            return Response(status_code=404)
    return Response(data, media_type=media_type, headers={
        "cache-control": "private, max-age=300", "x-content-type-options": "nosniff",
        "content-security-policy": "default-src 'none'"})


def _thumbnail(data: bytes) -> tuple[bytes, str]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.thumbnail((THUMB_PX, THUMB_PX))
        out = io.BytesIO()
        im.save(out, format="PNG")
    return out.getvalue(), "image/png"
