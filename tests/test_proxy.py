"""The proxy end to end: the real openai SDK against the proxy on uvicorn, in front of a real
OpenAI-compatible image server, with responses and errors checked against OpenAI's schemas."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.conftest import (
    ADMIN_KEY,
    AUDITOR_KEY,
    CLIENT_KEY,
    E2E_POLICY,
    OTHER_AUDITOR_KEY,
    write_policy,
)

# A copy of ../shared/data/openai_images_openapi.json (OpenAI, MIT), so a clean clone has it.
OPENAPI = json.loads((Path(__file__).parent / "data/openai_images_openapi.json").read_text())



def check_schema(name: str, body: Any) -> None:
    schema = {"$ref": f"#/components/schemas/{name}", "components": OPENAPI["components"]}
    jsonschema.validate(body, schema)


def sdk(base: str, key: str = CLIENT_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)


def trace(base: str, trace_id: str) -> dict[str, Any]:
    r = httpx.get(f"{base}/v1/guard/traces/{trace_id}",
                  headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 200, r.text
    return r.json()


def generate(base: str, body: dict[str, Any], key: str = CLIENT_KEY,
             **kw: Any) -> httpx.Response:
    return httpx.post(f"{base}/v1/images/generations", json=body,
                      headers={"authorization": f"Bearer {key}"}, timeout=30, **kw)


def test_safe_prompt_passes_untouched_in_one_round(e2e) -> None:  # type: ignore[no-untyped-def]
    base, backend = e2e
    raw = sdk(base).images.with_raw_response.generate(prompt="a bowl of fruit on a wooden table",
                                                        model="gpt-image-1")
    result = raw.parse()
    assert len(result.data) == 1 and result.data[0].revised_prompt is None
    assert base64.b64decode(result.data[0].b64_json)[:8] == b"\x89PNG\r\n\x1a\n"
    trace_id = raw.headers["x-guard-trace-id"]
    body = raw.http_response.json()
    check_schema("ImagesResponse", body)
    assert body["guard"]["trace_id"] == trace_id and body["guard"]["decision"] == "passed"
    assert backend.prompts == ["a bowl of fruit on a wooden table"]
    t = trace(base, trace_id)
    assert [r["kind"] for r in t["rounds"]] == ["prescreen", "generate"]
    assert t["policy"]["id"] == "e2e" and t["policy"]["version"] == 7
    assert len(t["policy"]["sha256"]) == 64
    assert t["results"][0]["decision"] == "passed" and t["key_id"] == "app"


def test_unsafe_prompt_is_edited_and_backend_gets_refined_prompt(e2e) -> None:  # type: ignore[no-untyped-def]
    base, backend = e2e
    raw = sdk(base).images.with_raw_response.generate(prompt="a bloodbath in the town square")
    result = raw.parse()
    assert result.data[0].revised_prompt == "a water balloon party in the town square"
    assert backend.prompts == ["a water balloon party in the town square"]
    t = trace(base, raw.headers["x-guard-trace-id"])
    assert len(t["rounds"]) >= 2 and t["decision"] == "edited"
    assert t["rounds"][0]["images"][0]["flagged"] == ["violence"]
    assert "violence" in t["categories"]


def test_without_prescreen_the_image_round_refines_and_regenerates(proxy, tmp_path, fake_backend) -> None:  # type: ignore[no-untyped-def]
    write_policy(tmp_path, E2E_POLICY)
    write_policy(tmp_path, "id: late\nversion: 1\nextends: e2e\nprescreen: false\n")
    base = proxy(policy="late")
    backend = fake_backend[0]
    result = sdk(base).images.generate(prompt="a bloodbath in the town square")
    assert result.data[0].revised_prompt == "a water balloon party in the town square"
    assert backend.prompts == ["a bloodbath in the town square",
                               "a water balloon party in the town square"]


def test_refuse_category_never_reaches_the_backend(e2e) -> None:  # type: ignore[no-untyped-def]
    base, backend = e2e
    with pytest.raises(openai.BadRequestError) as info:
        sdk(base).images.generate(prompt="a poster with a hateflag on it")
    assert info.value.code == "content_policy_violation"
    body = info.value.response.json()
    check_schema("ErrorResponse", body)
    assert backend.requests == []
    t = trace(base, info.value.response.headers["x-guard-trace-id"])
    assert t["decision"] == "refused" and t["status"] == 400 and t["categories"] == ["hate"]
    assert body["error"]["trace_id"] == t["id"]


def test_n3_with_one_unsafe_image_regenerates_only_that_slot(e2e) -> None:  # type: ignore[no-untyped-def]
    base, backend = e2e
    backend.plan = [["blue", "red", "blue"]]
    raw = sdk(base).images.with_raw_response.generate(prompt="a street at night", n=3)
    result = raw.parse()
    assert len(result.data) == 3
    assert [d.revised_prompt is not None for d in result.data] == [False, True, False]
    assert [r.get("n") for r in backend.requests] == [3, 1]
    assert backend.prompts[1] == result.data[1].revised_prompt != "a street at night"
    guard = raw.http_response.json()["guard"]
    assert [i["decision"] for i in guard["images"]] == ["passed", "edited", "passed"]
    assert guard["decision"] == "edited" and guard["rounds"] == 2


def test_image_in_refuse_category_refuses_request(e2e) -> None:  # type: ignore[no-untyped-def]
    base, backend = e2e
    backend.plan = [["green"]]
    with pytest.raises(openai.BadRequestError) as info:
        sdk(base).images.generate(prompt="a crowd at a rally")
    assert info.value.code == "content_policy_violation"
    assert len(backend.requests) == 1  # refused, never edited


@pytest.mark.parametrize("on_exhausted, status", [("refuse", 400), ("drop", 200)])
def test_rounds_exhausted(proxy, tmp_path, fake_backend, on_exhausted, status) -> None:  # type: ignore[no-untyped-def]
    write_policy(tmp_path, E2E_POLICY)
    write_policy(tmp_path, f"id: two\nversion: 1\nextends: e2e\n"
                           f"rounds: {{max: 2, on_exhausted: {on_exhausted}}}\n")
    base = proxy(policy="two")
    backend = fake_backend[0]
    backend.plan = [["blue", "red"], ["red"], ["red"]]
    r = generate(base, {"prompt": "two street cats", "n": 2})
    assert r.status_code == status, r.text
    assert len(backend.requests) == 2  # rounds.max = 2
    t = trace(base, r.headers["x-guard-trace-id"])
    if on_exhausted == "refuse":
        assert r.json()["error"]["code"] == "content_policy_violation"
        assert t["decision"] == "refused"
    else:
        assert len(r.json()["data"]) == 1
        assert [i["decision"] for i in r.json()["guard"]["images"]] == ["passed", "refused"]


def test_response_format_url_is_served_by_the_proxy(e2e) -> None:  # type: ignore[no-untyped-def]
    base, _ = e2e
    result = sdk(base).images.generate(prompt="a lighthouse", response_format="url")
    url = result.data[0].url
    assert url and url.startswith(base + "/v1/guard/images/")
    assert httpx.get(url).content[:4] == b"\x89PNG"
    assert httpx.get(url.replace("sig=", "sig=0")).status_code == 404


@pytest.mark.parametrize("body, param, status", [
    (b"{not json", None, 400),
    ({"prompt": "x", "n": 11}, "n", 400),
    ({"prompt": "x", "n": "2"}, "n", 400),
    ({"prompt": 42}, "prompt", 400),
    ({"n": 1}, "prompt", 400),
    ({"prompt": "x", "size": "huge"}, "size", 400),
    ({"prompt": "x", "size": "00x00"}, "size", 400),  # divided by zero in the demo backend
    ({"prompt": "x", "size": "0064x64"}, "size", 400),
    ({"prompt": "x", "quality": "ultra"}, "quality", 400),
    ({"prompt": "x", "output_compression": 101}, "output_compression", 400),
    ({"prompt": "x" * 1001, "model": "dall-e-2"}, "prompt", 400),
    ({"prompt": "x" * 2_000_000}, None, 413),
])
def test_bad_input_is_a_clear_error_with_a_trace(e2e, body, param, status) -> None:  # type: ignore[no-untyped-def]
    base, backend = e2e
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{base}/v1/images/generations", timeout=30,
                   headers={"authorization": f"Bearer {CLIENT_KEY}",
                            "content-type": "application/json"}, **kw)
    assert r.status_code == status, r.text
    check_schema("ErrorResponse", r.json())
    assert r.json()["error"]["param"] == param
    assert trace(base, r.headers["x-guard-trace-id"])["status"] == status
    assert backend.requests == []


def test_unknown_fields_are_tolerated(e2e) -> None:  # type: ignore[no-untyped-def]
    base, _ = e2e
    r = generate(base, {"prompt": "a cat", "future_field": {"x": 1}})
    assert r.status_code == 200
    assert trace(base, r.headers["x-guard-trace-id"])["request"]["unknown_fields"] == \
        ["future_field"]
    assert e2e[1].requests[0]["future_field"] == {"x": 1}  # passed on to the backend


@pytest.mark.parametrize("key, status, code", [
    (None, 401, "invalid_api_key"), ("sk-wrong", 401, "invalid_api_key"),
    (AUDITOR_KEY, 403, "insufficient_permissions")])
def test_auth_errors(e2e, key, status, code) -> None:  # type: ignore[no-untyped-def]
    base, backend = e2e
    headers = {"authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(f"{base}/v1/images/generations", json={"prompt": "a cat"}, headers=headers)
    assert r.status_code == status and r.json()["error"]["code"] == code
    check_schema("ErrorResponse", r.json())
    assert "sk-wrong" not in r.text
    assert trace(base, r.headers["x-guard-trace-id"])["status"] == status
    assert backend.requests == []


@pytest.mark.parametrize("mode, status, code", [
    ("error500", 502, "backend_error"), ("hang", 504, "backend_timeout"),
    ("badb64", 502, "backend_bad_response"), ("ratelimit", 429, "rate_limit_exceeded"),
    ("reject400", 400, "invalid_size")])
def test_backend_faults(proxy, fake_backend, mode, status, code) -> None:  # type: ignore[no-untyped-def]
    base = proxy(backend_options={"timeout_s": 0.5})
    fake_backend[0].mode = mode
    r = generate(base, {"prompt": "a cat"})
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    check_schema("ErrorResponse", r.json())
    if mode == "ratelimit":
        assert r.headers["retry-after"] == "7"
    t = trace(base, r.headers["x-guard-trace-id"])
    assert t["decision"] == "failed" and t["error"]["code"] == code


def test_backend_down_is_502(proxy, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.servers import free_port

    base = proxy(backends={"down": {"kind": "openai-compatible",
                                    "api_base": f"http://127.0.0.1:{free_port()}/v1"}},
                 routes={"*": {"backend": "down"}})
    r = generate(base, {"prompt": "a cat"})
    assert r.status_code == 502 and r.json()["error"]["code"] == "backend_unavailable"


@pytest.mark.parametrize("on_judge_error, status", [("refuse", 503), ("allow", 200)])
def test_judge_failure_follows_policy(proxy, tmp_path, fake_backend, on_judge_error, status) -> None:  # type: ignore[no-untyped-def]
    write_policy(tmp_path, f"id: j\nversion: 1\nextends: default\non_judge_error: {on_judge_error}\n")
    base = proxy(policy="j")
    fake_backend[0].plan = [["black"]]
    r = generate(base, {"prompt": "a cat"})
    assert r.status_code == status, r.text
    t = trace(base, r.headers["x-guard-trace-id"])
    assert "judge error" in (t["rounds"][-1]["error"] or "")
    if status == 503:
        assert r.json()["error"]["code"] == "judge_unavailable"


def test_traces_listing_filters_and_tenant_scope(e2e) -> None:  # type: ignore[no-untyped-def]
    base, _ = e2e
    generate(base, {"prompt": "a cat"})
    generate(base, {"prompt": "a poster with a hateflag"})
    generate(base, {"prompt": "a bloodbath"})
    auth = {"authorization": f"Bearer {AUDITOR_KEY}"}
    listed = httpx.get(f"{base}/v1/guard/traces", headers=auth).json()["data"]
    assert [t["decision"] for t in listed] == ["edited", "refused", "passed"]
    refused = httpx.get(f"{base}/v1/guard/traces?decision=refused", headers=auth).json()["data"]
    assert len(refused) == 1 and refused[0]["categories"] == ["hate"]
    violence = httpx.get(f"{base}/v1/guard/traces?category=violence", headers=auth).json()
    assert len(violence["data"]) == 1
    page = httpx.get(f"{base}/v1/guard/traces?limit=2", headers=auth).json()
    rest = httpx.get(f"{base}/v1/guard/traces?limit=2&cursor={page['next_cursor']}",
                     headers=auth).json()
    assert len(page["data"]) == 2 and len(rest["data"]) == 1 and rest["next_cursor"] is None
    other = {"authorization": f"Bearer {OTHER_AUDITOR_KEY}"}
    assert httpx.get(f"{base}/v1/guard/traces", headers=other).json()["data"] == []
    assert httpx.get(f"{base}/v1/guard/traces/{listed[0]['id']}", headers=other).status_code == 404
    client = {"authorization": f"Bearer {CLIENT_KEY}"}
    assert httpx.get(f"{base}/v1/guard/traces", headers=client).status_code == 403


def test_spans_request_round_backend_judge(proxy, tmp_path, fake_backend) -> None:  # type: ignore[no-untyped-def]
    exporter = InMemorySpanExporter()
    write_policy(tmp_path, E2E_POLICY)
    base = proxy(policy="e2e", span_exporter=exporter)
    fake_backend[0].plan = [["red"]]
    assert generate(base, {"prompt": "a cat"}).status_code == 200
    spans = {s.context.span_id: s for s in exporter.get_finished_spans()}
    by_name: dict[str, list[Any]] = {}
    for s in spans.values():
        by_name.setdefault(s.name, []).append(s)
    (request,) = by_name["guard.request"]
    assert len(by_name["guard.round"]) == 2
    assert all(r.parent.span_id == request.context.span_id for r in by_name["guard.round"])
    round_ids = {r.context.span_id for r in by_name["guard.round"]}
    assert all(b.parent.span_id in round_ids for b in by_name["guard.backend"])
    judge_parents = {j.parent.span_id for j in by_name["guard.judge"]}
    assert request.context.span_id in judge_parents  # the prescreen
    assert round_ids <= judge_parents


def test_health_ready_metrics(e2e) -> None:  # type: ignore[no-untyped-def]
    base, _ = e2e
    assert httpx.get(base + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(base + "/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["backend:fake"] is True
    generate(base, {"prompt": "a bloodbath"})
    text = httpx.get(base + "/metrics").text
    assert 'guard_requests_total{decision="edited",endpoint="/v1/images/generations",status="200"} 1.0' in text
    assert 'guard_category_flags_total{action="edit",category="violence"}' in text
    assert "guard_judge_latency_seconds_bucket" in text
    assert "guard_backend_latency_seconds_bucket" in text


def test_litellm_backend_through_the_proxy(proxy, fake_backend) -> None:  # type: ignore[no-untyped-def]
    _, url = fake_backend
    base = proxy(backends={"lt": {"kind": "litellm", "api_base": url, "timeout_s": 5}},
                 routes={"*": {"backend": "lt", "model": "my-sd"}})
    result = sdk(base).images.generate(prompt="a red bicycle", model="anything")
    assert result.data[0].b64_json
    assert fake_backend[0].requests[0]["model"] == "my-sd"
    assert fake_backend[0].requests[0]["response_format"] == "b64_json"


def test_passthrough_judges_nothing_but_still_traces(proxy, fake_backend) -> None:  # type: ignore[no-untyped-def]
    base = proxy(guard={"enabled": False})
    fake_backend[0].plan = [["red", "red"]]
    r = generate(base, {"prompt": "a bloodbath", "n": 2})
    assert r.status_code == 200 and len(r.json()["data"]) == 2
    t = trace(base, r.headers["x-guard-trace-id"])
    assert t["guard_enabled"] is False and t["decision"] == "passed"
    assert [x["kind"] for x in t["rounds"]] == ["generate"] and t["rounds"][0]["images"] == []


def test_passthrough_relays_the_backends_image_without_decoding_it(proxy, fake_backend) -> None:  # type: ignore[no-untyped-def]
    # Passthrough is a plain proxy: it relays the bytes and never looks (that is what makes it
    # as cheap as a relay); a link (response_format: url) needs the bytes, so it checks them.
    base = proxy(guard={"enabled": False})
    fake_backend[0].mode = "badb64"
    r = generate(base, {"prompt": "a cat", "response_format": "b64_json"})
    assert r.status_code == 200 and r.json()["data"][0]["b64_json"] == "this is %% not base64!"
    r = generate(base, {"prompt": "a cat", "response_format": "url"})
    assert r.status_code == 502 and r.json()["error"]["code"] == "backend_bad_response"
