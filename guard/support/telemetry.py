"""OpenTelemetry spans (request > round > backend call / judge call) and Prometheus metrics.

Both live on the app, never in module globals: each app builds its own TracerProvider and its own
CollectorRegistry, so tests and several apps in one process do not see each other's data.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import INVALID_SPAN, Span, Status, StatusCode
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class TelemetryConfig(BaseModel):
    """The operators' `telemetry:` section."""

    model_config = ConfigDict(extra="forbid")

    exporter: Literal["none", "console", "otlp"] = "none"
    endpoint: str | None = Field(None, description="OTLP/HTTP endpoint, e.g. http://otel:4318.")
    service_name: str = "safeedit-guard"


class Telemetry:
    def __init__(self, config: TelemetryConfig, exporter: SpanExporter | None = None) -> None:
        self.provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}))
        if exporter is not None:
            # An injected exporter (tests) gets spans synchronously, in order.
            self.provider.add_span_processor(SimpleSpanProcessor(exporter))
        elif config.exporter == "console":
            self.provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif config.exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            endpoint = (config.endpoint or "http://127.0.0.1:4318").rstrip("/") + "/v1/traces"
            self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        self.enabled = exporter is not None or config.exporter != "none"
        self.tracer = self.provider.get_tracer("safeedit.guard")

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

    def start_span(self, name: str, **attributes: Any) -> Span:
        """A span ended by its caller, for a life that spans several tasks (a streamed request);
        a non-recording span when export is off."""
        if not self.enabled:
            return INVALID_SPAN
        span = self.tracer.start_span(name)
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

    def render(self) -> bytes:
        return generate_latest(self.registry)
