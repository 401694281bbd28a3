"""OpenTelemetry conventions: W3C trace context in (a caller's traceparent) and out (to backends
and judges), the trace id in the audit trace, the SDK's OTEL_* variables under the `telemetry:`
section, GenAI attributes, and the process and build-info metrics on /metrics.

Through real interfaces: the openai SDK against the proxy on uvicorn, the fake image backend and
judge model servers on loopback, and a small OTLP/HTTP collector that decodes what it receives."""

from __future__ import annotations

import platform
import re
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from guard.support.errors import ConfigError
from guard.support.telemetry import Telemetry, TelemetryConfig, version
from tests.conftest import AUDITOR_KEY, CLIENT_KEY, E2E_POLICY, write_policy
from tests.servers import serve

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
JUDGED_POLICY = """
id: judged
version: 1
categories:
  sexual: {threshold: 0.5, action: edit}
  violence: {threshold: 0.6, action: edit}
  minors: {threshold: 0.1, action: refuse}
"""
OTEL_VARIABLES = ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_TRACES_EXPORTER",
                  "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG", "OTEL_SDK_DISABLED",
                  "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                  "OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_PROTOCOL",
                  "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def parse_traceparent(value: str) -> tuple[str, str]:
    match = re.fullmatch(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}", value)
    assert match, value
    return match[1], match[2]


def generate(base: str, prompt: str, headers: dict[str, str]) -> str:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=CLIENT_KEY, max_retries=0)
    raw = client.images.with_raw_response.generate(
        model="gpt-image-1", prompt=prompt, extra_headers=headers)
    assert raw.parse().data
    return raw.headers["x-guard-trace-id"]


def audit_trace(base: str, trace_id: str) -> dict[str, Any]:
    resp = httpx.get(f"{base}/v1/guard/traces/{trace_id}",
                     headers={"authorization": f"Bearer {AUDITOR_KEY}"})
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def test_a_callers_traceparent_parents_the_spans_and_reaches_the_backend(
        proxy, tmp_path, fake_backend) -> None:  # type: ignore[no-untyped-def]
    exporter = InMemorySpanExporter()
    write_policy(tmp_path, E2E_POLICY)
    base = proxy(policy="e2e", span_exporter=exporter)
    backend = fake_backend[0]
    trace_id = generate(base, "a lighthouse at dusk", {"traceparent": TRACEPARENT})

    spans = exporter.get_finished_spans()
    (request,) = [s for s in spans if s.name == "guard.request"]
    assert request.kind == SpanKind.SERVER
    assert request.parent is not None and request.parent.span_id == int(CALLER_SPAN, 16)
    assert request.parent.is_remote
    assert {format(s.context.trace_id, "032x") for s in spans} == {CALLER_TRACE}
    assert request.attributes["gen_ai.operation.name"] == "generate_content"
    assert request.attributes["gen_ai.request.model"] == "gpt-image-1"
    (call,) = [s for s in spans if s.name == "guard.backend"]
    assert call.attributes["gen_ai.output.type"] == "image"
    assert call.attributes["gen_ai.request.choice.count"] == 1

    # the backend was called inside the backend span: it is the parent the backend sees
    sent_trace, sent_parent = parse_traceparent(backend.headers[-1]["traceparent"])
    assert (sent_trace, int(sent_parent, 16)) == (CALLER_TRACE, call.context.span_id)

    assert audit_trace(base, trace_id)["otel_trace_id"] == CALLER_TRACE


def test_without_a_caller_the_proxy_starts_the_trace_it_records(
        proxy, fake_backend) -> None:  # type: ignore[no-untyped-def]
    exporter = InMemorySpanExporter()
    base = proxy(span_exporter=exporter)
    trace_id = generate(base, "a bowl of fruit", {})
    (request,) = [s for s in exporter.get_finished_spans() if s.name == "guard.request"]
    assert request.parent is None
    ours = format(request.context.trace_id, "032x")
    assert audit_trace(base, trace_id)["otel_trace_id"] == ours
    assert parse_traceparent(fake_backend[0].headers[-1]["traceparent"])[0] == ours


def test_with_export_off_the_callers_context_still_passes_through(
        proxy, fake_backend) -> None:  # type: ignore[no-untyped-def]
    base = proxy()  # no exporter: no spans are made
    trace_id = generate(base, "a bowl of fruit", {"traceparent": TRACEPARENT})
    assert fake_backend[0].headers[-1]["traceparent"] == TRACEPARENT
    assert audit_trace(base, trace_id)["otel_trace_id"] == CALLER_TRACE
    generate(base, "a bowl of pears", {})
    assert "traceparent" not in fake_backend[0].headers[-1]  # nothing to pass on
    assert audit_trace(base, generate(base, "a pear", {}))["otel_trace_id"] is None


def test_a_litellm_backend_passes_the_context_on(proxy, fake_backend) -> None:  # type: ignore[no-untyped-def]
    _, url = fake_backend
    base = proxy(backends={"lt": {"kind": "litellm", "api_base": url, "timeout_s": 5}},
                 routes={"*": {"backend": "lt", "model": "my-sd"}})
    generate(base, "a red bicycle", {"traceparent": TRACEPARENT})
    assert fake_backend[0].headers[-1]["traceparent"] == TRACEPARENT  # export off: unchanged


def test_the_trace_page_links_the_distributed_trace(proxy) -> None:  # type: ignore[no-untyped-def]
    base = proxy()
    trace_id = generate(base, "a bowl of fruit", {"traceparent": TRACEPARENT})
    with httpx.Client(base_url=base) as client:
        form = client.get("/guard/login")
        token = re.search(r'name="csrf" value="([^"]+)"', form.text)
        assert token
        assert client.post("/guard/login", data={"key": AUDITOR_KEY, "csrf": token[1]}
                           ).status_code == 303
        page = client.get(f"/guard/traces/{trace_id}")
    assert page.status_code == 200
    assert f'id="otel-trace">{CALLER_TRACE}<' in page.text


def test_the_remote_judge_receives_the_trace_context(
        proxy, judge_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    server, url = judge_server
    exporter = InMemorySpanExporter()
    write_policy(tmp_path, JUDGED_POLICY)  # the categories the judge model server knows
    base = proxy(span_exporter=exporter, policy="judged",
                 judge={"kind": "remote", "api_base": url, "model": "judge",
                        "api_key_env": "JUDGE_KEY", "backoff_s": 0.01, "health_interval_s": 0})
    generate(base, "a bowl of fruit", {"traceparent": TRACEPARENT})
    judged = {s.context.span_id for s in exporter.get_finished_spans() if s.name == "guard.judge"}
    assert server.headers
    for headers in server.headers:
        sent_trace, sent_parent = parse_traceparent(headers["traceparent"])
        assert sent_trace == CALLER_TRACE and int(sent_parent, 16) in judged


# --- the SDK's environment variables and the telemetry: section -------------------------------

def test_the_resource_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "guard-eu")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES",
                       "deployment.environment.name=prod,service.namespace=images")
    resource = Telemetry(TelemetryConfig()).provider.resource.attributes
    assert resource["service.name"] == "guard-eu"
    assert resource["deployment.environment.name"] == "prod"
    assert resource["service.namespace"] == "images"
    assert resource["service.version"] == version()
    monkeypatch.delenv("OTEL_SERVICE_NAME")
    assert Telemetry(TelemetryConfig()).provider.resource.attributes["service.name"] == \
        "safeedit-guard"


def test_the_telemetry_section_wins_over_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=staging,team=a")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    config = TelemetryConfig(exporter="none", service_name="from-config", sample_ratio=1.0,
                             resource_attributes={"deployment.environment.name": "prod"})
    telemetry = Telemetry(config)
    resource = telemetry.provider.resource.attributes
    assert (resource["service.name"], resource["deployment.environment.name"], resource["team"]) \
        == ("from-config", "prod", "a")
    assert not telemetry.enabled  # exporter none, whatever OTEL_TRACES_EXPORTER says
    assert "TraceIdRatioBased{1.0}" in telemetry.provider.sampler.get_description()
    from_env = Telemetry(TelemetryConfig())
    assert from_env.enabled  # OTEL_TRACES_EXPORTER=console
    assert from_env.provider.sampler.get_description() == "AlwaysOffSampler"
    from_env.shutdown()


def test_otel_sdk_disabled_turns_export_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not Telemetry(TelemetryConfig(exporter="console")).enabled


def test_an_exporter_or_protocol_it_cannot_serve_is_a_config_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER"):
        Telemetry(TelemetryConfig())
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    with pytest.raises(ConfigError, match="http/json"):
        Telemetry(TelemetryConfig())


class Collector:
    """An OTLP/HTTP collector on loopback: keeps each export's headers and decoded spans."""

    def __init__(self) -> None:
        self.exports: list[tuple[dict[str, str], ExportTraceServiceRequest]] = []

    def app(self) -> Starlette:
        async def traces(request: Request) -> Response:
            export = ExportTraceServiceRequest()
            export.ParseFromString(await request.body())
            self.exports.append((dict(request.headers), export))
            return Response(b"", media_type="application/x-protobuf")
        return Starlette(routes=[Route("/v1/traces", traces, methods=["POST"])])


@pytest.fixture
def collector() -> Iterator[tuple[Collector, str]]:
    state = Collector()
    with serve(state.app()) as url:
        yield state, url


def exported(telemetry: Telemetry, collector: Collector) -> tuple[dict[str, str], dict[str, Any]]:
    with telemetry.span("guard.test"):
        pass
    telemetry.shutdown()  # flushes the batch
    ((headers, export),) = collector.exports
    (resource_spans,) = export.resource_spans
    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    (span,) = resource_spans.scope_spans[0].spans
    assert span.name == "guard.test"
    return headers, resource


def test_otlp_endpoint_and_headers_come_from_the_environment(
        monkeypatch: pytest.MonkeyPatch, collector: tuple[Collector, str]) -> None:
    state, url = collector
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", url)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-collector-token=abc123")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "guard-eu")
    headers, resource = exported(Telemetry(TelemetryConfig()), state)
    assert headers["x-collector-token"] == "abc123"
    assert resource["service.name"] == "guard-eu"


def test_the_configured_endpoint_wins_over_the_environments(
        monkeypatch: pytest.MonkeyPatch, collector: tuple[Collector, str]) -> None:
    state, url = collector
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")  # nothing listens
    headers, resource = exported(Telemetry(TelemetryConfig(exporter="otlp", endpoint=url)), state)
    assert resource["service.name"] == "safeedit-guard"


# --- /metrics ---------------------------------------------------------------------------------

def test_metrics_have_process_and_build_info(proxy) -> None:  # type: ignore[no-untyped-def]
    text = httpx.get(proxy() + "/metrics").text
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                 "process_open_fds", "process_start_time_seconds"):
        assert re.search(rf"^{name} [0-9.e+]+$", text, re.M), name
    build = re.search(r"^safeedit_build_info\{(.*)\} 1\.0$", text, re.M)
    assert build
    labels = dict(re.findall(r'(\w+)="([^"]*)"', build[1]))
    assert labels == {"version": version(), "python": platform.python_version()}
