"""The SafeEdit Guard proxy: an OpenAI-compatible images API in front of real image backends.

A thin Starlette front: routes parse and authorise, the engine runs the guard loop, one handler
renders every GuardError in OpenAI's error shape, and every request, refused or failed, leaves a
trace in the audit store before its response is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from opentelemetry.sdk.trace.export import SpanExporter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from adapters import Backend, build_backend
from guard.audit import AuditStore, TraceQuery, build_store
from guard.auth import Authenticator, Principal, require
from guard.config import Config, load_config
from guard.engine import EditInputs, Engine, Outcome, request_decision
from guard.errors import (
    GuardError,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    RequestError,
)
from guard.images import ImageCache
from guard.inputs import validate_image
from guard.judges import Judge, build_judge
from guard.policy import POLICIES_DIR, Policy, PolicySet
from guard.policy_reload import PolicyReloader, reload_policies
from guard.protocol import (
    ImageGenerationRequest,
    image_object,
    parse_edit_form,
    parse_generation_request,
)
from guard.review import routes as review_routes
from guard.routing import Route as RouteTo
from guard.routing import Router
from guard.telemetry import Metrics, Telemetry
from guard.types import GenerationCall, Trace, TraceError

log = logging.getLogger("safeedit.proxy")
TRACE_HEADER = "x-guard-trace-id"


@dataclass
class GuardState:
    config: Config
    policies: PolicySet
    judge: Judge
    router: Router
    store: AuditStore
    engine: Engine
    telemetry: Telemetry
    metrics: Metrics
    auth: Authenticator
    images: ImageCache

    def policy_for(self, principal: Principal, requested: str | None) -> Policy:
        policies = self.policies  # one reference per request: a reload swaps the whole set
        if requested:
            if not principal.may_choose_policy:
                raise PermissionDenied("This key may not choose its policy.")
            if requested not in policies:
                raise RequestError(f"Unknown policy '{requested}'.", param="x-guard-policy")
            return policies[requested]
        return policies[principal.policy or self.config.tenants.get(principal.tenant)
                        or self.config.policy]


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, headers=headers,
                    media_type="application/json")


def error_response(exc: GuardError) -> Response:
    """An untraced error (audit, operations, unknown paths); images requests go through _failure."""
    return json_response(exc.to_dict(), exc.status, exc.headers)


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


async def read_json(request: Request, limit: int) -> Any:
    body = await read_body(request, limit)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"We could not parse the JSON body of your request ({exc}).",
                           code="invalid_json") from None


def state_of(request: Request) -> GuardState:
    return request.app.state.guard  # type: ignore[no-any-return]


# --- the images API ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Job:
    """A validated request: its fields and, for edits, the client's images."""

    endpoint: str
    req: ImageGenerationRequest
    inputs: EditInputs | None = None

    @property
    def event_prefix(self) -> str:
        return "image_edit" if self.inputs is not None else "image_generation"


Parser = Callable[[Request, GuardState], Awaitable[Job]]


async def generations(request: Request) -> Response:
    return await _serve(request, "/v1/images/generations", _parse_generation)


async def edits(request: Request) -> Response:
    return await _serve(request, "/v1/images/edits", _parse_edit)


async def _parse_generation(request: Request, state: GuardState) -> Job:
    body = await read_json(request, state.config.server.max_body_bytes)
    return Job("/v1/images/generations", parse_generation_request(body))


async def _parse_edit(request: Request, state: GuardState) -> Job:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise RequestError("Image edits must be sent as multipart/form-data.",
                           code="invalid_content_type")
    await read_body(request, state.config.server.max_upload_bytes)  # cached for form()
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
            validate_image(data, "image")
            images.append(data)
        elif key == "mask":
            validate_image(data, "mask")
            mask = data
        else:
            raise RequestError(f"Unexpected file field '{key}'.", param=key)
    if not images:
        raise RequestError("Missing required parameter: 'image'.", param="image",
                           code="missing_required_parameter")
    if len(images) > 16:
        raise RequestError("Invalid 'image': at most 16 images.", param="image")
    return Job("/v1/images/edits", parse_edit_form(fields), EditInputs(tuple(images), mask))


async def _serve(request: Request, endpoint: str, parse: Parser) -> Response:
    """Authenticate, validate, pick policy and backend, then answer as JSON or as a stream."""
    state = state_of(request)
    trace = Trace(endpoint=endpoint, guard_enabled=state.engine.enabled)
    started = time.perf_counter()
    with state.telemetry.span("guard.request", **{"guard.trace_id": trace.id,
                                                  "guard.endpoint": endpoint}) as span:
        try:
            principal = state.auth.authenticate(request.headers.get("authorization"))
            trace.key_id, trace.tenant = principal.key_id, principal.tenant
            require(principal, "client")
            job = await parse(request, state)
            trace.request = _request_record(job)
            trace.model = job.req.model
            if job.req.unknown_fields():
                log.info("tolerated unknown request fields: %s",
                         ", ".join(job.req.unknown_fields()))
            policy = state.policy_for(principal, request.headers.get("x-guard-policy"))
            trace.policy = policy.ref
            route = state.router.route(job.req.model)
            trace.backend = route.backend
        except Exception as exc:  # noqa: BLE001 - rendered by _failure, traced either way
            return await _finish(state, trace, started, _failure(trace, exc), span)
        if job.req.stream:
            return StreamingResponse(
                _stream(state, trace, started, job, policy, route, _base_url(state, request)),
                media_type="text/event-stream",
                headers={TRACE_HEADER: trace.id, "cache-control": "no-cache"})
        result = await _run(state, trace, job, policy, route, _base_url(state, request))
        return await _finish(state, trace, started, result, span)


@dataclass(slots=True)
class _Result:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]
    outcome: Outcome | None = None


async def _run(state: GuardState, trace: Trace, job: Job, policy: Policy, route: RouteTo,
               base_url: str) -> _Result:
    try:
        outcome = await state.engine.run(_call(job.req), route, policy, trace, job.inputs)
        trace.decision = request_decision(trace)
        body = _images_response(job.req, outcome, trace, state, base_url)
        return _Result(200, body, {TRACE_HEADER: trace.id}, outcome)
    except Exception as exc:  # noqa: BLE001 - rendered by _failure, traced either way
        return _failure(trace, exc)


def _failure(trace: Trace, exc: Exception) -> _Result:
    if not isinstance(exc, GuardError):
        log.error("internal error in trace %s", trace.id, exc_info=exc)
        exc = GuardError(f"Internal error ({type(exc).__name__}).")
    trace.decision = "refused" if exc.code == "content_policy_violation" else "failed"
    trace.error = TraceError(status=exc.status, type=exc.type, code=exc.code, message=exc.message)
    exc.trace_id = trace.id
    return _Result(exc.status, exc.to_dict(), {**exc.headers, TRACE_HEADER: trace.id})


async def _finish(state: GuardState, trace: Trace, started: float, result: _Result,
                  span: Any = None) -> Response:
    await _record(state, trace, started, result, span)
    return json_response(result.body, result.status, result.headers)


async def _record(state: GuardState, trace: Trace, started: float, result: _Result,
                  span: Any = None) -> None:
    """Write the trace before answering; without its trace, a request is not served."""
    trace.status = result.status
    trace.duration_ms = round((time.perf_counter() - started) * 1000, 3)
    if span is not None:
        span.set_attribute("guard.decision", trace.decision)
        span.set_attribute("http.status_code", trace.status)
    try:
        await state.store.write(trace)
    except Exception:  # noqa: BLE001 - fail closed: no audit record, no image
        log.exception("audit store failed for trace %s", trace.id)
        failed = _failure(trace, GuardError(
            "The audit store is unavailable; the request was not served.", status=503,
            code="audit_unavailable"))
        result.status, result.body, result.headers = failed.status, failed.body, failed.headers
    state.metrics.requests.labels(trace.endpoint, str(result.status), trace.decision).inc()
    state.metrics.request_latency.labels(trace.endpoint).observe(time.perf_counter() - started)


async def _stream(state: GuardState, trace: Trace, started: float, job: Job, policy: Policy,
                  route: RouteTo, base_url: str) -> AsyncIterator[bytes]:
    """Server-sent events. No unjudged image leaves the proxy: partial images are withheld, a
    keep-alive comment goes out while the loop runs, then one completed event per judged image
    (or one error event), each sent only after the trace is written."""
    with state.telemetry.span("guard.request", **{"guard.trace_id": trace.id,
                                                  "guard.endpoint": job.endpoint,
                                                  "guard.stream": True}) as span:
        task = asyncio.create_task(_run(state, trace, job, policy, route, base_url))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=STREAM_KEEPALIVE_S)
                if done:
                    break
                yield b": judging\n\n"
        except BaseException:
            # The client went away: stop spending on it, and still leave its trace.
            task.cancel()
            gone = _failure(trace, RequestError(
                "The client closed the stream before the images were judged.", status=499,
                code="client_closed_request"))
            await asyncio.shield(_record(state, trace, started, gone, span))
            raise
        result = task.result()
        await _record(state, trace, started, result, span)
    if result.outcome is None:
        yield _sse("error", {"type": "error", **result.body})
        return
    req = job.req
    for image, info in zip(result.body["data"], result.body["guard"]["images"], strict=False):
        yield _sse(f"{job.event_prefix}.completed", {
            "type": f"{job.event_prefix}.completed",
            "b64_json": image.get("b64_json"),
            "created_at": result.body["created"],
            "size": req.size if req.size in _EVENT_SIZES else "auto",
            "quality": req.quality if req.quality in _EVENT_QUALITIES else "auto",
            "background": req.background or "auto",
            "output_format": req.output_format or "png",
            # The proxy does not count the backend's tokens; zeros say "not measured here".
            "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                      "input_tokens_details": {"text_tokens": 0, "image_tokens": 0}},
            "revised_prompt": image.get("revised_prompt"),
            "guard": {"trace_id": trace.id, **info},
        })


_EVENT_SIZES = {"1024x1024", "1024x1536", "1536x1024", "auto"}
_EVENT_QUALITIES = {"low", "medium", "high", "auto"}
STREAM_KEEPALIVE_S = 5.0


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _base_url(state: GuardState, request: Request) -> str:
    return state.config.server.public_url or str(request.base_url).rstrip("/")


def _call(req: ImageGenerationRequest) -> GenerationCall:
    return GenerationCall(prompt=req.prompt, n=req.count, model=req.model, size=req.size,
                          quality=req.quality, style=req.style, output_format=req.output_format,
                          output_compression=req.output_compression, background=req.background,
                          moderation=req.moderation, user=req.user,
                          # Fields the guard does not know go on to the backend, as a plain proxy
                          # would pass them (seed and steps for a diffusers backend, say).
                          extra=dict(req.model_extra or {}))


def _request_record(job: Job) -> dict[str, Any]:
    req = job.req
    record = req.model_dump(exclude_none=True, exclude=set(req.unknown_fields()))
    if req.unknown_fields():
        record["unknown_fields"] = req.unknown_fields()
    if job.inputs is not None:
        # Hashes, never the bytes: the trace says which images were edited.
        record["input_images"] = [hashlib.sha256(i).hexdigest() for i in job.inputs.images]
        if job.inputs.mask is not None:
            record["mask"] = hashlib.sha256(job.inputs.mask).hexdigest()
    return record


def _images_response(req: ImageGenerationRequest, outcome: Outcome, trace: Trace,
                     state: GuardState, base_url: str) -> dict[str, Any]:
    data = []
    for final in outcome.images:
        revised = final.prompt if final.prompt != req.prompt else final.image.backend_revised_prompt
        if req.response_format == "url" and not req.stream:
            image_id, expires, sig = state.images.put(final.image)
            url = f"{base_url}/v1/guard/images/{image_id}?exp={expires}&sig={sig}"
            data.append(image_object(url=url, revised_prompt=revised))
        else:
            data.append(image_object(b64_json=final.image.b64, revised_prompt=revised))
    body: dict[str, Any] = {"created": int(time.time()), "data": data}
    if req.output_format:
        body["output_format"] = req.output_format
    body["guard"] = {
        "trace_id": trace.id, "decision": trace.decision, "policy": trace.policy,
        "rounds": outcome.rounds,
        "images": [{"index": r.slot, "decision": r.decision, "rounds": r.rounds,
                    "categories": r.categories} for r in trace.results],
    }
    return body


async def served_image(request: Request) -> Response:
    state = state_of(request)
    try:
        expires = int(request.query_params.get("exp", "0"))
    except ValueError:
        expires = 0
    found = state.images.get(request.path_params["image_id"], expires,
                             request.query_params.get("sig", ""))
    if found is None:
        return error_response(NotFound("Image not found or link expired."))
    return Response(found[1], media_type=found[0])


# --- audit ------------------------------------------------------------------------------------

async def get_trace(request: Request) -> Response:
    state = state_of(request)
    try:
        principal = state.auth.authenticate(request.headers.get("authorization"))
        require(principal, "auditor")
        trace = await state.store.get(request.path_params["trace_id"])
        if trace is None or (principal.role != "admin" and trace.tenant != principal.tenant):
            raise NotFound("No such trace.")
        return json_response(trace.model_dump(mode="json"))
    except GuardError as exc:
        return error_response(exc)


async def list_traces(request: Request) -> Response:
    state = state_of(request)
    try:
        principal = state.auth.authenticate(request.headers.get("authorization"))
        require(principal, "auditor")
        query = _trace_query(request, principal)
        page = await state.store.query(query)
        return json_response({"object": "list", "data": page.items,
                              "next_cursor": page.next_cursor})
    except GuardError as exc:
        return error_response(exc)


def _trace_query(request: Request, principal: Principal) -> TraceQuery:
    params = request.query_params
    allowed = {"since", "until", "decision", "category", "tenant", "key_id", "policy_id",
               "policy_version", "model", "limit", "cursor"}
    for name in params:
        if name not in allowed:
            raise RequestError(f"Unknown filter '{name}'.", param=name)
    values: dict[str, Any] = {k: v for k, v in params.items()}
    for name, cast in (("since", float), ("until", float), ("policy_version", int),
                       ("limit", int)):
        if name in values:
            try:
                values[name] = cast(values[name])
            except ValueError:
                raise RequestError(f"Invalid '{name}': expected a number.", param=name) from None
    if not 1 <= values.get("limit", 50) <= 1000:
        raise RequestError("Invalid 'limit': between 1 and 1000.", param="limit")
    if principal.role != "admin":
        # An auditor sees only their own tenant, whatever they ask for.
        values["tenant"] = principal.tenant
    return TraceQuery(**values)


# --- operations -------------------------------------------------------------------------------

async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    state = state_of(request)
    checks: dict[str, bool] = {}
    parts: list[tuple[str, Judge | AuditStore | Backend]] = [
        ("judge", state.judge), ("audit", state.store),
        *((f"backend:{n}", b) for n, b in state.router.backends.items())]
    for name, part in parts:
        try:
            checks[name] = bool(await asyncio.wait_for(part.ready(), timeout=5))
        except Exception:  # noqa: BLE001 - any failure means not ready
            checks[name] = False
    ok = all(checks.values())
    return json_response({"status": "ready" if ok else "not ready", "checks": checks},
                         200 if ok else 503)


async def metrics(request: Request) -> Response:
    return Response(state_of(request).metrics.render(),
                    media_type="text/plain; version=0.0.4; charset=utf-8")


async def not_found(request: Request, exc: Exception) -> Response:
    return error_response(NotFound(f"Unknown path {request.url.path}."))


async def method_not_allowed(request: Request, exc: Exception) -> Response:
    return error_response(RequestError(f"Method {request.method} is not allowed here.",
                                       code="method_not_allowed", status=405))


# --- the app ----------------------------------------------------------------------------------

def build_state(config: Config, span_exporter: SpanExporter | None = None) -> GuardState:
    policies = PolicySet.load([POLICIES_DIR, *(Path(p) for p in config.policy_paths)])
    for policy_id in {config.policy, *config.tenants.values(),
                      *(k.policy for k in config.keys if k.policy)}:
        policies[policy_id]  # unknown ids fail at start, not at the first request
    backends: dict[str, Backend] = {name: build_backend(name, section)
                                    for name, section in config.backends.items()}
    router = Router(backends, config.routes, config.fallback)
    judge = build_judge(config.judge)
    telemetry = Telemetry(config.telemetry, span_exporter)
    metrics = Metrics()
    return GuardState(
        config=config, policies=policies, judge=judge, router=router,
        store=build_store(config.audit),
        engine=Engine(judge, router, telemetry, metrics, enabled=config.guard.enabled),
        telemetry=telemetry, metrics=metrics, auth=Authenticator(config.keys),
        images=ImageCache())


def create_app(config: Config | None = None, *,
               span_exporter: SpanExporter | None = None) -> Starlette:
    """The proxy app for `config` (embedded defaults when None)."""
    config = config or load_config(None)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state = build_state(config, span_exporter)
        app.state.guard = state
        app.state.policy_reloader = PolicyReloader.start(state)  # watches the policy files
        if state.auth.open_mode:
            log.warning("no API keys configured: open mode, any key is accepted "
                        "(bind to loopback only)")
        if not state.engine.enabled:
            log.warning("guard disabled in config: passthrough, images are NOT judged")
        # Heavy judges load off the event loop; /readyz says false until they are ready.
        starting = [asyncio.create_task(part.start())  # type: ignore[attr-defined]
                    for part in (state.judge, *state.router.backends.values())
                    if hasattr(part, "start")]
        try:
            yield
        finally:
            await app.state.policy_reloader.stop()
            for task in starting:
                task.cancel()
            closing: list[Judge | AuditStore | Backend] = [
                state.judge, state.store, *state.router.backends.values()]
            for part in closing:
                with contextlib.suppress(Exception):
                    await part.aclose()
            state.telemetry.shutdown()

    routes = [
        Route("/v1/images/generations", generations, methods=["POST"]),
        Route("/v1/images/edits", edits, methods=["POST"]),
        Route("/v1/guard/images/{image_id}", served_image, methods=["GET"]),
        Route("/v1/guard/traces", list_traces, methods=["GET"]),
        Route("/v1/guard/traces/{trace_id}", get_trace, methods=["GET"]),
        Route("/v1/guard/policies/reload", reload_policies, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *review_routes(),
    ]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={404: not_found, 405: method_not_allowed})


__all__ = ["create_app", "GuardState"]
