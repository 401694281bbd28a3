"""The proxy's own OpenAPI document, and every endpoint fuzzed from it with schemathesis.

The proxy is the real app on uvicorn (lifespan and all) in front of the demo backend, so no
5xx can come from a failing backend: any 5xx is the input's fault, and a bug. Every error must
leave in OpenAI's shape, and every images request must leave exactly one trace, the one it names.
"""

from __future__ import annotations

import re
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from guard.core.config import load_config
from guard.http.openapi import ERROR_SCHEMA, OPERATIONS
from tests.conftest import ADMIN_KEY, AUDITOR_KEY, CLIENT_KEY, test_keys
from tests.fake_backend import png
from tests.servers import serve

IMAGES = ("/v1/images/generations", "/v1/images/edits")
TRACED = (*IMAGES, "/v1/moderations", "/beta/litellm_basic_guardrail_api")  # one trace a call
# Each generated case goes out under one of these, chosen from the case itself (so hypothesis
# sees the same request again when it replays one): the three roles, no key, a wrong key.
KEYS = (CLIENT_KEY, CLIENT_KEY, CLIENT_KEY, ADMIN_KEY, ADMIN_KEY, ADMIN_KEY, AUDITOR_KEY, None,
        "sk-not-a-key")
CASES: Counter[str] = Counter()


class Live:
    def __init__(self, base: str) -> None:
        self.base = base
        # One client and one session for the whole run: a fresh httpx client per call builds an
        # SSL context each time, which costs more than the request itself.
        self.http = httpx.Client(base_url=base, headers={"authorization": f"Bearer {ADMIN_KEY}"})
        self.session = requests.Session()

    def traces_since(self, when: float) -> list[str]:
        """The ids of the traces written since `when`, through the traces API as an admin."""
        r = self.http.get("/v1/guard/traces", params={"since": repr(when)})
        assert r.status_code == 200, r.text
        return [item["id"] for item in r.json()["data"]]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    from proxy import create_app

    tmp = tmp_path_factory.mktemp("fuzz")
    config = load_config(None, {
        "keys": test_keys(),
        "backends": {"demo": {"kind": "demo", "default_size": 64}},
        "routes": {"*": {"backend": "demo"}},
        "judge": {"kind": "marker"},
        "audit": {"kind": "sqlite", "path": str(tmp / "audit.db")},
        "policy_paths": [str(tmp)],
    })
    with serve(create_app(config)) as base:
        live = Live(base)
        yield live
        live.http.close()
        live.session.close()
    print("\nschemathesis cases per endpoint: " +
          ", ".join(f"{label} {n}" for label, n in sorted(CASES.items())))


def _document() -> dict[str, Any]:
    from proxy import create_app

    return create_app(load_config(None)).state.openapi  # type: ignore[no-any-return]


# Loaded at collection (schemathesis' lazy `from_fixture` does not run under pytest 9); the live
# server serves this same document, which the test below checks.
schema = schemathesis.openapi.from_dict(_document())


@schema.parametrize()
@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_no_input_gets_a_5xx_and_every_error_is_openai_shaped(case: Any, live: Live) -> None:
    key = KEYS[zlib.crc32(repr((case.path_parameters, case.query, case.body, case.headers))
                          .encode()) % len(KEYS)]
    case.headers = {k: v for k, v in (case.headers or {}).items()
                    if k.lower() != "authorization"}
    if key is not None:
        case.headers["authorization"] = f"Bearer {key}"
    CASES[case.operation.label] += 1
    images = case.operation.path in TRACED and case.method == "POST"
    started = time.time()

    response = case.call(base_url=live.base, session=live.session, timeout=60)
    case.validate_response(response, checks=[
        not_a_server_error, status_code_conformance, content_type_conformance,
        response_schema_conformance])

    if response.status_code >= 400:
        assert response.headers["content-type"][0].startswith("application/json"), response.text
        body = response.json()
        jsonschema.validate(body, ERROR_SCHEMA)
        error = body["error"]
        assert isinstance(error["message"], str) and isinstance(error["type"], str)
        assert error["param"] is None or isinstance(error["param"], str)
        assert error["code"] is None or isinstance(error["code"], str)
    if images:
        assert live.traces_since(started) == [response.headers["x-guard-trace-id"][0]], \
            "an images request (or a check) must leave exactly one trace, the one it names"


# --- the document itself ------------------------------------------------------------------------

def test_the_document_is_openapi_3_1_and_documents_every_api_route(live: Live) -> None:
    from proxy import routes

    document = httpx.get(live.base + "/openapi.json").json()
    assert document == _document() and document["openapi"].startswith("3.1")
    loaded = schemathesis.openapi.from_dict(document)
    operations = {(op.method.upper(), op.path) for op in
                  (result.ok() for result in loaded.get_all_operations())}
    assert operations == set(OPERATIONS)
    served = {(method, route.path) for route in routes() if not route.path.startswith("/guard")
              for method in getattr(route, "methods", ()) if method != "HEAD"}
    assert served == set(OPERATIONS), "a route without documentation, or the reverse"
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert document["paths"]["/healthz"]["get"]["security"] == []


def test_the_openai_sdk_sends_what_the_document_describes(live: Live) -> None:
    document = httpx.get(live.base + "/openapi.json").json()
    sent: list[httpx.Request] = []
    http = httpx.Client(event_hooks={"request": [sent.append]})
    client = openai.OpenAI(base_url=live.base + "/v1", api_key=CLIENT_KEY, max_retries=0,
                           http_client=http)
    result = client.images.generate(prompt="a lighthouse at dusk", model="gpt-image-1", n=2,
                                    size="1024x1024", quality="low", output_format="png",
                                    background="opaque", moderation="low", user="u-1")
    client.images.edit(image=[("a.png", png("blue"), "image/png")] * 2, prompt="add a hat",
                       mask=("m.png", png("black"), "image/png"), size="1024x1024",
                       input_fidelity="low")
    generation, edit = sent

    def schema(name: str) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{name}", "components": document["components"]}

    operation = document["paths"][generation.url.path]["post"]
    assert "application/json" in operation["requestBody"]["content"]
    jsonschema.validate(httpx.Response(200, content=generation.content).json(),
                        schema("ImageGenerationRequest"))
    jsonschema.validate(result.model_dump(exclude_none=True) | {"guard": {
        "trace_id": "tr_x", "decision": "passed", "policy": {}, "rounds": 1, "images": []}},
        schema("ImagesResponse"))

    operation = document["paths"][edit.url.path]["post"]
    assert edit.headers["content-type"].startswith("multipart/form-data")
    assert "multipart/form-data" in operation["requestBody"]["content"]
    fields = _form_field_names(edit)
    documented = set(document["components"]["schemas"]["ImageEditForm"]["properties"])
    assert {"image", "prompt", "mask", "size", "input_fidelity"} <= {
        name.removesuffix("[]") for name in fields} <= documented


def _form_field_names(request: httpx.Request) -> set[str]:
    return {name.decode() for name in re.findall(rb'form-data; name="([^"]+)"', request.read())}


@pytest.mark.parametrize(("query", "param"), [
    ("exp=99999999999&sig=%C3%A9", None),  # once a 500: compare_digest on a non-ASCII str
    ("exp=%C2%B2&sig=00", "exp"),  # '²'.isdigit() is True, int('²') raises
    ("exp=1e9&sig=00", "exp"),
    ("exp=-1&sig=00", "exp"),
    ("exp=" + "9" * 5000 + "&sig=00", "exp"),  # past int()'s digit limit
    ("sig=00", "exp"),
])
def test_a_malformed_image_link_is_a_client_error(live: Live, query: str,
                                                  param: str | None) -> None:
    r = httpx.get(f"{live.base}/v1/guard/images/{'a' * 32}?{query}")
    assert r.status_code == (404 if param is None else 400), r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize(("query", "param"), [
    ("limit=%C2%B2", "limit"), ("limit=%D9%A3", "limit"), ("limit=%2B5", "limit"),
    ("limit=1_0", "limit"), ("policy_version=" + "9" * 30, "policy_version"),
    ("policy_version=-1", "policy_version"), ("cursor=%C3%A9", "cursor"),
    ("cursor=" + "9" * 5000, "cursor"), ("since=1e999", "since"),
])
def test_a_malformed_trace_filter_is_a_400_naming_it(live: Live, query: str, param: str) -> None:
    r = httpx.get(f"{live.base}/v1/guard/traces?{query}",
                  headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
