"""OpenTelemetry spans (request > round > backend call / judge call) and Prometheus metrics.

Both live on the app, never in module globals: each app builds its own TracerProvider and its own
CollectorRegistry, so tests and several apps in one process do not see each other's data.

Trace context follows W3C Trace Context through the SDK's propagators (`OTEL_PROPAGATORS`,
tracecontext and baggage by default): a request span is the child of the caller's `traceparent`
(`extract`), and every HTTP call to a backend or judge carries the current one on (`inject_into`,
`client_hooks()` for an httpx client). With export off no span is made, but the caller's context
still passes through unchanged, so backends stay in the caller's distributed trace.

The SDK's environment variables hold where the `telemetry:` section is silent (`None`):
OTEL_TRACES_EXPORTER, OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_EXPORTER_OTLP_(TRACES_)
ENDPOINT / PROTOCOL / HEADERS / TIMEOUT, OTEL_TRACES_SAMPLER(_ARG) and OTEL_SDK_DISABLED, the
SDK's switch that turns every signal off whatever the section says.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from importlib import metadata
from typing import Any, Literal

import httpx
from opentelemetry import propagate
from opentelemetry import trace as otel_trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field

from guard.support.errors import ConfigError

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
DEFAULT_SERVICE_NAME = "safeedit-guard"
# GenAI semantic conventions: an image generation or edit is content generation (the
# conventions name no operation for images; gen_ai.output.type says "image").
GEN_AI_OPERATION = "generate_content"
Exporter = Literal["none", "console", "otlp"]
OtlpProtocol = Literal["http/protobuf", "grpc"]


class TelemetryConfig(BaseModel):
    """The operators' `telemetry:` section. A field left unset (null) falls back to the SDK's
    OTEL_* environment variable for it; a field set here wins over the variable."""

    model_config = ConfigDict(extra="forbid")

    exporter: Exporter | None = Field(
        None, description="none | console | otlp; unset: OTEL_TRACES_EXPORTER, else none.")
    endpoint: str | None = Field(
        None, description="OTLP collector, e.g. http://otel:4318 (/v1/traces is added for "
                          "http/protobuf); unset: OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT.")
    protocol: OtlpProtocol | None = Field(
        None, description="OTLP transport; unset: OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL, else "
                          "http/protobuf. grpc needs opentelemetry-exporter-otlp-proto-grpc.")
    service_name: str | None = Field(
        None, description="service.name; unset: OTEL_SERVICE_NAME, service.name in "
                          "OTEL_RESOURCE_ATTRIBUTES, else safeedit-guard.")
    resource_attributes: dict[str, str] = Field(
        default_factory=dict, description="Resource attributes, over OTEL_RESOURCE_ATTRIBUTES.")
    sample_ratio: float | None = Field(
        None, ge=0, le=1, description="Share of new traces recorded (a caller's sampled flag is "
                                      "followed); unset: OTEL_TRACES_SAMPLER(_ARG).")


def version() -> str:
    """The installed safeedit-guard's version (`unknown` in a tree that is not installed)."""
    try:
        return metadata.version("safeedit-guard")
    except metadata.PackageNotFoundError:
        return "unknown"


def _env(*names: str) -> str | None:
    return next((v.strip() for n in names if (v := os.environ.get(n, "")).strip()), None)


def _exporter_kind(config: TelemetryConfig) -> Exporter:
    if config.exporter is not None:
        return config.exporter
    named = _env("OTEL_TRACES_EXPORTER") or "none"
    if named not in ("none", "console", "otlp"):
        raise ConfigError(f"OTEL_TRACES_EXPORTER={named!r}: the proxy exports traces to "
                          "'otlp' or 'console', or 'none'.")
    return named  # type: ignore[return-value]


def _otlp_exporter(config: TelemetryConfig) -> SpanExporter:
    protocol = config.protocol or _env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                                       "OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    endpoint = config.endpoint
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # Unset: the exporter reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT and HEADERS itself.
        return OTLPSpanExporter(endpoint=endpoint and endpoint.rstrip("/") + "/v1/traces")
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcSpanExporter,
            )
        except ImportError as exc:
            raise ConfigError("telemetry: OTLP over grpc needs the package "
                              "opentelemetry-exporter-otlp-proto-grpc; or use "
                              "protocol http/protobuf.") from exc
        return GrpcSpanExporter(endpoint=endpoint)  # type: ignore[no-any-return]
    raise ConfigError(f"telemetry: OTLP protocol {protocol!r} is not supported; "
                      "use http/protobuf or grpc.")


def _resource(config: TelemetryConfig) -> Resource:
    own = {SERVICE_VERSION: version(), **config.resource_attributes}
    if config.service_name:
        own[SERVICE_NAME] = config.service_name
    resource = Resource.create(own)  # over OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    return resource


def gen_ai_request(model: str | None, n: int) -> dict[str, Any]:
    """GenAI semantic-convention attributes of a call to an image backend."""
    return {"gen_ai.operation.name": GEN_AI_OPERATION, "gen_ai.output.type": "image",
            "gen_ai.request.model": model, "gen_ai.request.choice.count": n}


def extract(carrier: Mapping[str, str]) -> Context:
    """The caller's trace context from its headers (`traceparent`, `tracestate`, `baggage`)."""
    return propagate.extract(carrier)


def inject_into(carrier: MutableMapping[str, str]) -> None:
    """Add the current trace context to outgoing headers (nothing when there is none)."""
    propagate.inject(carrier)


async def _inject_request(request: httpx.Request) -> None:
    inject_into(request.headers)


def client_hooks() -> dict[str, list[Callable[[Any], Awaitable[None]]]]:
    """`httpx.AsyncClient(event_hooks=client_hooks())`: each request carries the current trace
    context (W3C `traceparent`), so backends and judges join the caller's trace."""
    return {"request": [_inject_request]}


def trace_headers() -> dict[str, str]:
    """The current trace context as headers, for clients that take extra headers (litellm)."""
    headers: dict[str, str] = {}
    inject_into(headers)
    return headers


def trace_id_of(span: Span) -> str | None:
    """A span's W3C trace id (32 hex digits), or None when it has no valid context."""
    context = span.get_span_context()
    return otel_trace.format_trace_id(context.trace_id) if context.is_valid else None


class Telemetry:
    def __init__(self, config: TelemetryConfig, exporter: SpanExporter | None = None) -> None:
        kind = "none" if exporter is not None else _exporter_kind(config)
        sampler: Sampler | None = (ParentBased(TraceIdRatioBased(config.sample_ratio))
                                   if config.sample_ratio is not None else None)
        # sampler None: the SDK's own from OTEL_TRACES_SAMPLER(_ARG).
        self.provider = TracerProvider(resource=_resource(config), sampler=sampler)
        if exporter is not None:
            # An injected exporter (tests) gets spans synchronously, in order.
            self.provider.add_span_processor(SimpleSpanProcessor(exporter))
        elif kind == "console":
            self.provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif kind == "otlp":
            self.provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(config)))
        disabled = (os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true")
        self.enabled = (exporter is not None or kind != "none") and not disabled
        self.tracer = self.provider.get_tracer("safeedit.guard", version())

    @contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[Span | None]:
        if not self.enabled:
            yield None
            return
        with self.tracer.start_as_current_span(name, record_exception=True) as span:
            for key, value in attributes.items():
                if value is not None:
                    span.set_attribute(key, value)
            try:
                yield span
            except Exception as exc:
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                raise

    def start_span(self, name: str, parent: Context | None = None,
                   kind: SpanKind = SpanKind.INTERNAL, **attributes: Any) -> Span:
        """A span ended by its caller, for a life that spans several tasks (a streamed request),
        the child of `parent` (a caller's context from `extract`). With export off: the
        caller's span context as a non-recording span, so it still passes on to backends."""
        if not self.enabled:
            return otel_trace.get_current_span(parent) if parent is not None else INVALID_SPAN
        span = self.tracer.start_span(name, context=parent, kind=kind)
        for key, value in attributes.items():
            if value is not None:
                span.set_attribute(key, value)
        return span

    def shutdown(self) -> None:
        self.provider.shutdown()


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("guard_requests", "Requests by endpoint, status and decision.",
                                ["endpoint", "status", "decision"], registry=r)
        self.flags = Counter("guard_category_flags",
                             "Images or prompts flagged, by category and resulting action.",
                             ["category", "action"], registry=r)
        self.images = Counter("guard_images", "Images returned or withheld, by decision.",
                              ["decision"], registry=r)
        self.rounds = Histogram("guard_rounds", "Generation rounds per request.",
                                buckets=(1, 2, 3, 4, 5, 6, 8, 10), registry=r)
        self.request_latency = Histogram("guard_request_latency_seconds",
                                         "End-to-end request latency.", ["endpoint"],
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.judge_latency = Histogram("guard_judge_latency_seconds", "Judge call latency.",
                                       ["judge", "stage"], buckets=_LATENCY_BUCKETS, registry=r)
        self.backend_latency = Histogram("guard_backend_latency_seconds",
                                         "Backend call latency.", ["backend"],
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.previews = Counter(
            "guard_previews", "Partial images judged while their generation ran, by backend and "
            "outcome (continued, or stopped: the generation was cancelled as unsafe).",
            ["backend", "outcome"], registry=r)
        self.hedges = Counter(
            "guard_hedge_images", "Images generated beside the original from a borderline "
            "prompt's refined version (policy hedge), by outcome (made, served).",
            ["outcome"], registry=r)
        self.login_throttled = Counter(
            "guard_review_login_throttled",
            "Review-page sign-ins refused after too many failures, by scope (address or key).",
            ["scope"], registry=r)
        self.quota_rejections = Counter(
            "guard_quota_rejections",
            "Images requests refused by a key's or tenant's limit, by limit "
            "(requests_per_minute, images_per_day, max_concurrent) and scope (key or tenant).",
            ["limit", "scope"], registry=r)
        self.quota_unavailable = Counter(
            "guard_quota_unavailable",
            "Images requests that found the limits' store (Redis) unreachable, by what was done "
            "(refused: on_unavailable closed; served uncounted: open).",
            ["action"], registry=r)
        self.spooled = Counter(
            "guard_audit_spooled", "Traces the audit store could not take, kept in the local "
            "spool (guard.audit.spool) and served; replayed into the store once it is back.",
            registry=r)
        self.spool_pending = Gauge(
            "guard_audit_spool_pending", "Traces in the spool, not yet in the audit store.",
            registry=r)
        # process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds,
        # process_start_time_seconds... (Linux /proc), as every Prometheus client names them.
        ProcessCollector(registry=r)
        Info("safeedit_build", "The running build: safeedit-guard's version and Python's.",
             registry=r).info({"version": version(), "python": platform.python_version()})

    def render(self) -> bytes:
        return generate_latest(self.registry)
