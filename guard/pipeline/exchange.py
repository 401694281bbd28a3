"""One request's life, the same for a JSON answer and a stream of server-sent events.

    Exchange(state, endpoint)        the trace and the request span open
      .admit(authorization, ...)     authenticate, parse, choose the policy and the route
      .run(base_url)                 the engine's loop, then the response as protocol models
      .stream(base_url)              the same run with keep-alive ticks, cancelled when the
                                     client goes away (recorded as 499)
      .finish(reply)                 the trace is closed and written; only then is the reply
                                     released, and if the audit store fails the reply becomes
                                     a 503 and no image leaves ("no trace, no image")

Every failure, expected or not, becomes a `Reply` in OpenAI's error shape carrying the trace id:
an Exchange never raises to the HTTP layer. Who writes what in a trace: the Exchange writes the
request's metadata and closes it (`Trace.finish`, where the request decision is made), the engine
writes rounds and per-image results, the audit store seals it into the chain.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from opentelemetry import trace as otel_trace
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.trace import SpanKind

from guard.audit import LoggedStore, SpoolingStore
from guard.core.auth import Authenticator, Principal, require
from guard.core.config import Config
from guard.core.policy import Policy, PolicySet, policy_sources
from guard.core.protocol import (
    GuardBlock,
    GuardImageInfo,
    ImageEditRequest,
    ImageGenerationRequest,
    ImageObject,
    ImagesResponse,
)
from guard.core.types import GenerationCall, Trace, TraceError
from guard.judges.coverage import log_coverage
from guard.pipeline.engine import EditInputs, Engine, Outcome
from guard.pipeline.links import ImageLinks
from guard.pipeline.marking import mark_images
from guard.pipeline.quotas import NO_TICKET, Quotas, Ticket
from guard.pipeline.routing import Route, Router
from guard.plugins import (
    AuditStore,
    Backend,
    Judge,
    build_backend,
    build_image_store,
    build_judge,
    build_store,
    resolve_image_store,
)
from guard.provenance import Marker
from guard.support.errors import (
    ClientDisconnected,
    GuardError,
    PermissionDenied,
    RequestError,
    Unavailable,
)
from guard.support.telemetry import (
    GEN_AI_OPERATION,
    Metrics,
    Telemetry,
    extract,
    trace_id_of,
)

log = logging.getLogger("safeedit.serving")
STREAM_KEEPALIVE_S = 5.0


@dataclass
class GuardState:
    """Everything one app serves with; built in the app's lifespan, never a module global."""

    config: Config
    policies: PolicySet  # swapped whole by a reload; a request reads it once
    judge: Judge
    router: Router
    store: AuditStore
    engine: Engine
    telemetry: Telemetry
    metrics: Metrics
    auth: Authenticator
    images: ImageLinks  # response_format url: links to images in the shared image store
    quotas: Quotas
    # The HTTP edge's map from a domain error to the status a reply carries (guard.http.errors):
    # the pipeline records and reports statuses, only the edge knows which.
    status_of: Callable[[GuardError], int]
    # Marks every image the guard judged with a signed C2PA manifest; None: provenance is off.
    marker: Marker | None = None

    def policy_for(self, principal: Principal, requested: str | None) -> Policy:
        policies = self.policies  # one reference per request: a reload swaps the whole set
        if requested:
            if not principal.may_choose_policy:
                raise PermissionDenied("This key may not choose its policy.")
            if requested not in policies:
                raise RequestError(f"Unknown policy '{requested}'.", param="x-guard-policy")
            return policies[requested]
        return policies[principal.policy or self.config.tenant_policy(principal.tenant)
                        or self.config.policy]

    def parts(self) -> list[tuple[str, Judge | AuditStore | ImageLinks | Backend | Quotas]]:
        """The parts with a lifecycle, named as /readyz reports them."""
        return [("judge", self.judge), ("audit", self.store), ("images", self.images),
                *((f"backend:{n}", b) for n, b in self.router.backends.items()),
                *((("limits", self.quotas),) if self.quotas.enabled else ())]


def build_state(config: Config, status_of: Callable[[GuardError], int],
                span_exporter: SpanExporter | None = None) -> GuardState:
    """Build every part the config names; unknown policy ids fail here, not at a request.

    Parts are built through the registries of guard.plugins (built-ins and entry points alike);
    `status_of` is the HTTP edge's map from a domain error to a status."""
    policies = PolicySet.load(policy_sources(config.policy_paths))
    in_use = sorted({config.policy, *filter(None, map(config.tenant_policy, config.tenants)),
                     *(k.policy for k in config.keys if k.policy)})
    for policy_id in in_use:
        policies[policy_id]
    backends = {name: build_backend(name, section) for name, section in config.backends.items()}
    router = Router(backends, config.routes, config.fallback)
    judge = build_judge(config.judge)
    if config.guard.enabled:  # what the judge looks at, and what no judge looks at on images
        log_coverage(judge, [policies[p] for p in in_use])
    telemetry = Telemetry(config.telemetry, span_exporter)
    metrics = Metrics()
    # One image store for links and retained images, shared with every replica that uses it.
    image_options = resolve_image_store(config.image_store, config.audit)
    images = build_image_store(image_options)
    store = build_store(config.audit, images)
    return GuardState(
        config=config, policies=policies, judge=judge, router=router, store=store,
        engine=Engine(judge, router, telemetry, metrics, enabled=config.guard.enabled),
        telemetry=telemetry, metrics=metrics, auth=Authenticator(config.keys),
        images=ImageLinks.from_options(images, image_options), quotas=Quotas(config, metrics),
        status_of=status_of,
        marker=(Marker(config.provenance, keys_dir=config.keys_dir, log_id=_log_id(store))
                if config.provenance.enabled and config.guard.enabled else None))


def _log_id(store: AuditStore) -> str | None:
    """The transparency log's id (a hash of its public key), which every manifest names."""
    return store.log.keys.log_id if isinstance(store, LoggedStore) and store.log else None


@dataclass(frozen=True, slots=True)
class Job:
    """A validated images request: its fields and, for edits, the client's images."""

    endpoint: str
    req: ImageGenerationRequest
    inputs: EditInputs | None = None
    deadline_s: float | None = None  # the client's x-guard-deadline-s, parsed at the HTTP edge

    @property
    def event_prefix(self) -> str:
        return "image_edit" if self.inputs is not None else "image_generation"


@dataclass(frozen=True, slots=True)
class Reply:
    """What the HTTP layer renders: the images (or another endpoint's answer, `body`), or an
    error in OpenAI's shape."""

    status: int
    headers: dict[str, str]
    images: ImagesResponse | None = None
    error: dict[str, Any] = field(default_factory=dict)
    detail: str | None = None  # the error's redacted detail: for the trace, never rendered
    body: dict[str, Any] | None = None  # a moderation's or a guardrail check's answer

    @property
    def ok(self) -> bool:
        return self.images is not None or self.body is not None


TRACE_HEADER = "x-guard-trace-id"


class Exchange:
    """One images request, from its first byte to its written trace."""

    def __init__(self, state: GuardState, endpoint: str,
                 headers: Mapping[str, str] | None = None) -> None:
        self.state = state
        self.trace = Trace(endpoint=endpoint, guard_enabled=state.engine.enabled)
        self.job: Job | None = None
        self._policy: Policy | None = None
        self._route: Route | None = None
        self.quota: Ticket = NO_TICKET  # its x-ratelimit-* headers go on every reply
        self._started = time.perf_counter()
        # The child of the caller's span (W3C traceparent), if it sent one; the trace records the
        # distributed trace's id, so an auditor can find the spans of this request.
        self._span = state.telemetry.start_span(
            "guard.request", extract(headers) if headers is not None else None, SpanKind.SERVER,
            **{"guard.trace_id": self.trace.id, "guard.endpoint": endpoint,
               "gen_ai.operation.name": GEN_AI_OPERATION, "gen_ai.output.type": "image"})
        self.trace.otel_trace_id = trace_id_of(self._span)

    def caller(self, authorization: str | None) -> Principal:
        """The authenticated client, recorded in the trace (raises for anyone else)."""
        principal = self.state.auth.authenticate(authorization)
        self.trace.key_id, self.trace.tenant = principal.key_id, principal.tenant
        require(principal, "client")
        return principal

    async def admit(self, authorization: str | None, policy_header: str | None,
                    parse: Callable[[], Awaitable[Job]]) -> Reply | None:
        """Authenticate, parse and route; None when admitted, else the (unfinished) error."""
        trace = self.trace
        with self._active():
            try:
                principal = self.caller(authorization)
                job = await parse()
                trace.request = _request_record(job)
                trace.model = job.req.model
                if job.req.model:
                    self._span.set_attribute("gen_ai.request.model", job.req.model)
                if job.req.unknown_fields():
                    log.info("tolerated unknown request fields: %s",
                             ", ".join(job.req.unknown_fields()))
                policy = self.state.policy_for(principal, policy_header)
                trace.policy = policy.ref
                route = self.state.router.route(job.req.model)
                trace.backend = route.backend
                self.quota = await self.state.quotas.admit(trace.id, principal.key_id,
                                                           principal.tenant, job.req.count)
            except Exception as exc:  # noqa: BLE001 - every failure is a traced reply
                return self._failure(exc)
        self.job, self._policy, self._route = job, policy, route
        if job.req.stream:
            self._span.set_attribute("guard.stream", True)
        return None

    async def run(self, base_url: str) -> Reply:
        """The guard loop for the admitted job (not yet finished: call `finish`)."""
        assert self.job is not None and self._policy is not None and self._route is not None
        job = self.job
        with self._active():
            try:
                outcome = await self.state.engine.run(_call(job.req), self._route, self._policy,
                                                      self.trace, job.inputs,
                                                      deadline_s=job.deadline_s)
                return Reply(200, {TRACE_HEADER: self.trace.id},
                             images=await self._response(outcome, base_url))
            except Exception as exc:  # noqa: BLE001 - every failure is a traced reply
                return self._failure(exc)

    async def stream(self, base_url: str, *, cut: Callable[[], GuardError | None] = lambda: None
                     ) -> AsyncIterator[Reply | None]:
        """`run` for a stream: None every keep-alive interval while the loop runs, then the
        finished reply. If the client goes away the loop is cancelled and the trace says 499;
        if the server cut it (`cut()` gives the reason: a drain timeout), the trace says that."""
        task = asyncio.create_task(self.run(base_url))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=STREAM_KEEPALIVE_S)
                if done:
                    break
                yield None
        except BaseException:
            task.cancel()
            gone = self._failure(cut() or ClientDisconnected(
                "The client closed the stream before the images were judged.",
                code="client_closed_request"))
            await asyncio.shield(self.finish(gone))
            raise
        yield await self.finish(task.result())

    async def cut_short(self, error: GuardError) -> None:
        """Finish the trace of a request cancelled before its reply (a server stopping past its
        drain timeout), with `error` saying why."""
        await asyncio.shield(self.finish(self._failure(error)))

    async def finish(self, reply: Reply) -> Reply:
        """Close and write the trace; a reply leaves only once its trace is stored."""
        state, trace = self.state, self.trace
        trace.finish(reply.status, _trace_error(reply),
                     (time.perf_counter() - self._started) * 1000)
        try:
            await state.store.write(trace)
        except Exception as exc:  # noqa: BLE001 - fail closed: no durable record, no image
            if await self._spooled(trace):  # (the spool logs it, one line a trace)
                log.debug("audit store failed for trace %s: %r", trace.id, exc)
                return await self._done(reply)
            log.exception("audit store failed for trace %s", trace.id)
            reply = self._failure(Unavailable(
                "The audit store is unavailable; the request was not served.",
                code="audit_unavailable"))
            trace.finish(reply.status, _trace_error(reply), trace.duration_ms)
            try:  # a passing fault may still let the failure itself be recorded
                await state.store.write(trace)
            except Exception:  # noqa: BLE001 - logged; the client gets the 503 either way
                log.error("audit store failed again; trace %s is lost", trace.id)
        return await self._done(reply)

    async def _spooled(self, trace: Trace) -> bool:
        """The trace kept in the store's spool (signed, fsync'd): the reply may leave."""
        store = self.state.store
        spool = store.spool if isinstance(store, SpoolingStore) else None
        if spool is None or not await spool.keep(trace):
            return False
        self.state.metrics.spooled.inc()
        return True

    async def _done(self, reply: Reply) -> Reply:
        state, trace = self.state, self.trace
        await state.quotas.release(self.quota, reply.status)
        reply = replace(reply, headers={**self.quota.headers, **reply.headers})
        self._span.set_attribute("guard.decision", trace.decision)
        self._span.set_attribute("http.status_code", reply.status)
        self._span.end()
        state.metrics.requests.labels(trace.endpoint, str(reply.status), trace.decision).inc()
        state.metrics.request_latency.labels(trace.endpoint).observe(
            time.perf_counter() - self._started)
        for result in trace.results:
            state.metrics.images.labels(result.decision if reply.ok else trace.decision).inc()
        return reply

    # --- helpers ----------------------------------------------------------------------------

    def _active(self) -> Any:
        """Make the request span current, so the engine's spans nest under it."""
        return otel_trace.use_span(self._span, end_on_exit=False)

    def _failure(self, exc: Exception) -> Reply:
        if not isinstance(exc, GuardError):
            log.error("internal error in trace %s", self.trace.id, exc_info=exc)
            exc = GuardError(f"Internal error ({type(exc).__name__}).")
        exc.trace_id = self.trace.id
        return Reply(self.state.status_of(exc), {**exc.headers, TRACE_HEADER: self.trace.id},
                     error=exc.to_dict(), detail=exc.detail)

    async def _response(self, outcome: Outcome, base_url: str) -> ImagesResponse:
        assert self.job is not None
        req, trace, state = self.job.req, self.trace, self.state
        # A stream's completed events carry base64 only, as OpenAI's do.
        links = (not req.stream and
                 req.answer_format(state.config.server.default_response_format) == "url")
        images = [final.image for final in outcome.images]
        if state.marker is not None and state.engine.enabled:  # passthrough: as the backend's
            images = await mark_images(state.marker, outcome.images, trace, encode=not links)
        data = []
        for final, image in zip(outcome.images, images, strict=True):
            revised = (final.prompt if final.prompt != req.prompt
                       else final.image.backend_revised_prompt)
            if links:
                url = base_url + await state.images.mint(image)
                data.append(ImageObject(url=url, revised_prompt=revised))
            else:
                data.append(ImageObject(b64_json=image.b64_bytes, revised_prompt=revised))
        guard = GuardBlock(
            trace_id=trace.id, decision=trace.outcome_decision(), policy=trace.policy,
            rounds=outcome.rounds,
            images=[GuardImageInfo(index=r.slot, decision=r.decision, rounds=r.rounds,
                                   categories=r.categories) for r in trace.results])
        return ImagesResponse(created=int(time.time()), data=data,
                              output_format=req.output_format, guard=guard)


def _trace_error(reply: Reply) -> TraceError | None:
    if reply.ok:
        return None
    body = reply.error["error"]
    return TraceError(status=reply.status, type=body["type"], code=body["code"],
                      message=body["message"], detail=reply.detail)


def _call(req: ImageGenerationRequest) -> GenerationCall:
    return GenerationCall(prompt=req.prompt, n=req.count, model=req.model, size=req.size,
                          quality=req.quality, style=req.style, output_format=req.output_format,
                          output_compression=req.output_compression, background=req.background,
                          moderation=req.moderation, user=req.user,
                          input_fidelity=(req.input_fidelity
                                          if isinstance(req, ImageEditRequest) else None),
                          # Fields the guard does not know go on to the backend, as a plain proxy
                          # would pass them (seed and steps for a diffusers backend, say).
                          extra=dict(req.model_extra or {}))


def _request_record(job: Job) -> dict[str, Any]:
    req = job.req
    record = req.model_dump(exclude_none=True, exclude=set(req.unknown_fields()))
    if req.unknown_fields():
        record["unknown_fields"] = req.unknown_fields()
    if job.deadline_s is not None:
        record["deadline_s"] = job.deadline_s
    if job.inputs is not None:
        # Hashes, never the bytes: the trace says which images were edited.
        record["input_images"] = [hashlib.sha256(i).hexdigest() for i in job.inputs.images]
        if job.inputs.mask is not None:
            record["mask"] = hashlib.sha256(job.inputs.mask).hexdigest()
    return record
