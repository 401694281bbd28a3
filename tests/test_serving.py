"""One request's life (guard/pipeline/exchange.py) through the proxy: JSON and streams alike, failures
in OpenAI's shape with their trace, one request span, auth in one place."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx
import openai
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from guard.core.config import hash_key, load_config
from guard.support.errors import ConfigError
from tests.conftest import ADMIN_KEY, AUDITOR_KEY, CLIENT_KEY, E2E_POLICY, write_policy
from tests.test_proxy import generate, sdk, trace


def break_served_writes(db: Path) -> None:
    """Make the real SQLite audit store fail on every trace of a served request (status 200),
    as a full disk or a broken table would, while a failure's trace can still be written."""
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TRIGGER no_served BEFORE INSERT ON traces WHEN NEW.status = 200 "
                     "BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END")


@pytest.fixture
def e2e_refusing(proxy, tmp_path, fake_backend):  # type: ignore[no-untyped-def]
    """The e2e proxy with `audit.on_unavailable: refuse`: fail closed, no spool."""
    write_policy(tmp_path, E2E_POLICY)
    return proxy(policy="e2e", audit={"kind": "sqlite", "path": str(tmp_path / "audit.db"),
                                      "on_unavailable": "refuse"}), fake_backend[0]


def test_streamed_request_under_audit_failure_ends_with_error_event_and_trace(e2e_refusing, tmp_path):  # type: ignore[no-untyped-def]
    base, backend = e2e_refusing
    generate(base, {"prompt": "a cat"})  # creates the database
    break_served_writes(tmp_path / "audit.db")
    with pytest.raises(openai.APIError) as info:
        list(sdk(base).images.generate(prompt="a quiet harbour", stream=True))
    body = info.value.body
    assert body["code"] == "audit_unavailable"  # type: ignore[index]
    recorded = trace(base, body["trace_id"])  # type: ignore[index]
    assert recorded["status"] == 503 and recorded["decision"] == "failed"
    assert recorded["error"]["code"] == "audit_unavailable"
    assert backend.requests, "the image was made, but never left the proxy"


def test_json_request_under_audit_failure_is_503_without_image(e2e_refusing, tmp_path):  # type: ignore[no-untyped-def]
    base, _ = e2e_refusing
    generate(base, {"prompt": "a cat"})
    break_served_writes(tmp_path / "audit.db")
    r = generate(base, {"prompt": "a quiet harbour"})
    assert r.status_code == 503
    assert "data" not in r.json() and r.json()["error"]["code"] == "audit_unavailable"
    assert trace(base, r.headers["x-guard-trace-id"])["status"] == 503


def test_by_default_a_trace_the_store_refuses_is_spooled_and_the_image_served(e2e, tmp_path):  # type: ignore[no-untyped-def]
    """`audit.on_unavailable: spool` (the default): the trace is signed and fsync'd to the spool
    (guard.audit.spool) before the reply leaves; the store takes it once it can."""
    import orjson

    base, _ = e2e
    generate(base, {"prompt": "a cat"})
    break_served_writes(tmp_path / "audit.db")
    r = generate(base, {"prompt": "a quiet harbour"})
    assert r.status_code == 200 and r.json()["data"]
    (line,) = (tmp_path / "audit.spool").read_bytes().splitlines()
    spooled = orjson.loads(line)
    assert spooled["trace"]["id"] == r.headers["x-guard-trace-id"] and spooled["sig"]
    assert httpx.get(f"{base}/readyz").json()["details"]["audit_spool"]["traces"] == 1


def test_a_streamed_request_is_one_request_span_with_its_decision(proxy, tmp_path):  # type: ignore[no-untyped-def]
    write_policy(tmp_path, E2E_POLICY)
    exporter = InMemorySpanExporter()
    base = proxy(policy="e2e", span_exporter=exporter)
    events = list(sdk(base).images.generate(prompt="a bloodbath", stream=True))
    assert [e.type for e in events] == ["image_generation.completed"]
    spans = exporter.get_finished_spans()
    requests = [s for s in spans if s.name == "guard.request"]
    assert len(requests) == 1
    (request,) = requests
    assert request.attributes["guard.decision"] == "edited"
    assert request.attributes["guard.stream"] is True
    rounds = [s for s in spans if s.name == "guard.round"]
    assert rounds and all(r.parent.span_id == request.context.span_id for r in rounds)


def test_bad_link_signature_is_a_404_in_openai_shape(e2e) -> None:  # type: ignore[no-untyped-def]
    base, _ = e2e
    r = httpx.get(f"{base}/v1/guard/images/x?exp=99999999999&sig=%C3%A9")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("param", ["policy_version", "cursor"])
def test_out_of_range_filters_are_400_naming_the_filter(e2e, param) -> None:  # type: ignore[no-untyped-def]
    base, _ = e2e
    huge = "9" * 30 if param == "policy_version" else "OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5"
    r = httpx.get(f"{base}/v1/guard/traces", params={param: huge},
                  headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == param


@pytest.mark.parametrize(("key", "status"), [(None, 401), (CLIENT_KEY, 403), (AUDITOR_KEY, 403),
                                             (ADMIN_KEY, 200)])
def test_policy_reload_is_authorised_like_every_route(e2e, key, status) -> None:  # type: ignore[no-untyped-def]
    base, _ = e2e
    headers = {"authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(f"{base}/v1/guard/policies/reload", headers=headers)
    assert r.status_code == status, r.text
    if status != 200:
        assert r.json()["error"]["type"] in ("invalid_request_error", "permission_error")


def test_time_windows_filter_the_trace_list(e2e) -> None:  # type: ignore[no-untyped-def]
    base, _ = e2e
    generate(base, {"prompt": "a cat"})
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    recent = httpx.get(f"{base}/v1/guard/traces", params={"since": "1h"}, headers=admin).json()
    future = httpx.get(f"{base}/v1/guard/traces", params={"since": "2999-01-01"},
                       headers=admin).json()
    assert recent["data"] and not future["data"]


def test_duplicate_key_ids_are_refused_at_start() -> None:
    keys = [{"id": "ops", "hash": hash_key("a"), "role": "admin"},
            {"id": "ops", "hash": hash_key("b"), "role": "auditor", "tenant": "acme"}]
    with pytest.raises(ConfigError, match="ops"):
        load_config(None, {"keys": keys})
