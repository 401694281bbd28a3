"""POST /v1/moderations through the real openai SDK against the proxy on uvicorn.

The judge is the marker judge (tests/marker_judge.py): texts are scored by the builtin judge's
term lists of the policy (E2E_POLICY: "bloodbath" is violence, "hateflag" hate), images by their
top-left pixel (red: violence 0.97, green: hate 0.99, black: the judge crashes). Image URLs are
served by a real local HTTP server.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from guard.core.moderation import OPENAI_CATEGORIES, moderation_result
from tests.conftest import (
    ADMIN_KEY,
    AUDITOR_KEY,
    CLIENT_KEY,
    E2E_POLICY,
    ProxyFactory,
    write_policy,
)
from tests.fake_backend import png
from tests.servers import serve

RED = png("red")
CROSSBOW_POLICY = """
id: tenant-mod
version: 3
extends: e2e
categories:
  weapons:
    threshold: 0.5
    action: refuse
terms:
  weapons:
    strong: [crossbow]
"""


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def image_part(url: str) -> Any:  # an SDK ModerationImageURLInputParam
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.fixture
def base(proxy: ProxyFactory, tmp_path: Path) -> str:
    write_policy(tmp_path, E2E_POLICY)
    return proxy(policy="e2e")


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=CLIENT_KEY, max_retries=0)


def trace(base: str, trace_id: str) -> dict[str, Any]:
    r = httpx.get(f"{base}/v1/guard/traces/{trace_id}",
                  headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


@pytest.fixture
def images_server() -> Iterator[str]:
    async def red(request: Request) -> Response:
        return Response(RED, media_type="image/png")

    async def text(request: Request) -> Response:
        return Response(b"not an image", media_type="text/plain")

    async def away(request: Request) -> Response:
        return RedirectResponse(request.query_params["to"], status_code=302)

    app = Starlette(routes=[Route("/red.png", red), Route("/page.txt", text),
                            Route("/away", away)])
    with serve(app) as url:
        yield url


def test_text_is_judged_under_openai_names(base: str) -> None:
    raw = client(base).moderations.with_raw_response.create(input="a bloodbath at dawn")
    resp = raw.parse()
    assert resp.id.startswith("modr-") and resp.model == "omni-moderation-latest"
    result = resp.results[0]
    assert result.flagged and result.categories.violence
    assert result.category_scores.violence >= 0.6
    assert not result.categories.hate and result.category_scores.hate == 0.0
    # What the policy assessed, on what; what it has no category for, on nothing.
    assert result.category_applied_input_types.violence == ["text"]
    assert result.category_applied_input_types.harassment_threatening == []
    assert result.category_scores.harassment_threatening == 0.0
    stored = trace(base, raw.headers["x-guard-trace-id"])
    assert stored["endpoint"] == "/v1/moderations" and stored["status"] == 200
    assert stored["decision"] == "edited" and stored["categories"] == ["violence"]
    assert stored["policy"]["id"] == "e2e" and stored["model"] == "omni-moderation-latest"
    judged = stored["rounds"][0]["images"][0]
    assert judged["prompt"] == "a bloodbath at dawn" and judged["flagged"] == ["violence"]


def test_a_list_of_strings_has_one_result_each_in_order(base: str) -> None:
    resp = client(base).moderations.create(
        input=["a calm lake", "a hateflag parade", "a bloodbath"],
        model="text-moderation-latest")
    assert resp.model == "text-moderation-latest"
    assert [r.flagged for r in resp.results] == [False, True, True]
    assert resp.results[1].categories.hate and not resp.results[1].categories.violence
    assert resp.results[2].categories.violence
    guard = resp.model_extra["guard"]  # type: ignore[index]
    assert [r["decision"] for r in guard["results"]] == ["passed", "refused", "edited"]


def test_an_image_data_uri_is_judged(base: str) -> None:
    resp = client(base).moderations.create(input=[
        {"type": "text", "text": "a quiet street"}, image_part(data_uri(RED))])
    assert len(resp.results) == 1  # text and image parts are one input, as OpenAI answers
    result = resp.results[0]
    assert result.flagged and result.categories.violence
    assert result.category_scores.violence == pytest.approx(0.97)
    assert result.category_applied_input_types.violence == ["text", "image"]
    # An image alone was never assessed as text.
    alone = client(base).moderations.create(input=[image_part(data_uri(png("blue")))])
    assert not alone.results[0].flagged
    assert alone.results[0].category_applied_input_types.sexual == ["image"]


def test_applied_input_types_are_what_the_judge_says_it_assessed(
        proxy: ProxyFactory, tmp_path: Path) -> None:
    # The builtin judge with NudeNet off reads the text and never the image: it says so
    # (Verdict.assessed_on), and the result says so, although an image was sent.
    write_policy(tmp_path, E2E_POLICY)
    base = proxy(policy="e2e", judge={"kind": "builtin", "nudenet": False})
    resp = client(base).moderations.create(input=[
        {"type": "text", "text": "a bloodbath"}, image_part(data_uri(RED))])
    applied = resp.results[0].category_applied_input_types
    assert applied.violence == ["text"] and applied.sexual == ["text"]
    assert resp.results[0].categories.violence


def test_the_judge_account_of_what_it_assessed_is_used() -> None:
    # moderation_result's view of what each category was assessed on, as a judge that says.
    result = moderation_result({"sexual": 0.9, "violence": 0.1, "weapons": 0.7},
                               {"sexual", "weapons"},
                               {"sexual": ["image"], "violence": ["text", "image"]})
    assert result.category_applied_input_types["sexual"] == ["image"]
    assert result.category_applied_input_types["weapons"] == []
    assert result.categories["weapons"] and result.flagged
    assert list(result.categories)[:len(OPENAI_CATEGORIES)] == list(OPENAI_CATEGORIES)


@pytest.mark.parametrize(("kwargs", "param", "code"), [
    ({"input": [image_part(data_uri(RED))], "model": "text-moderation-stable"}, "input",
     "invalid_value"),
    ({"input": "x", "model": "gpt-4o"}, "model", "model_not_found"),
    ({"input": []}, "input", "empty_array"),
    ({"input": ["a", {"type": "text", "text": "b"}]}, "input[0]", "invalid_type"),
    ({"input": [{"type": "audio", "text": "b"}]}, "input[0].type", "invalid_value"),
    ({"input": [image_part("data:image/png;base64,!!!")]}, "input[0].image_url.url",
     "invalid_image_url"),
    ({"input": [image_part(data_uri(b"GIF89a not really"))]}, "input[0].image_url.url",
     "invalid_image_format"),
    ({"input": [image_part("ftp://example.com/a.png")]}, "input[0].image_url.url",
     "invalid_image_url"),
])
def test_bad_input_is_a_traced_openai_400(base: str, kwargs: dict[str, Any], param: str,
                                          code: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client(base).moderations.create(**kwargs)
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["param"] == param and error["code"] == code
    assert error["type"] == "invalid_request_error"
    stored = trace(base, error["trace_id"])
    assert stored["status"] == 400 and stored["decision"] == "failed"
    assert stored["endpoint"] == "/v1/moderations"


def test_missing_input_and_keys(base: str) -> None:
    r = httpx.post(f"{base}/v1/moderations", json={"model": "omni-moderation-latest"},
                   headers={"authorization": f"Bearer {CLIENT_KEY}"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_required_parameter"
    r = httpx.post(f"{base}/v1/moderations", json={"input": "hello"})
    assert r.status_code == 401
    assert trace(base, r.headers["x-guard-trace-id"])["status"] == 401
    r = httpx.post(f"{base}/v1/moderations", json={"input": "hello"},
                   headers={"authorization": f"Bearer {AUDITOR_KEY}"})
    assert r.status_code == 403


def test_a_judge_failure_is_a_503_never_a_pass(base: str) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        client(base).moderations.create(input=[image_part(data_uri(png("black")))])
    assert caught.value.status_code == 503
    assert caught.value.body["code"] == "judge_unavailable"  # type: ignore[index]


def test_the_tenant_policy_applies(proxy: ProxyFactory, tmp_path: Path) -> None:
    write_policy(tmp_path, E2E_POLICY)
    write_policy(tmp_path, CROSSBOW_POLICY)
    base = proxy(policy="e2e", tenants={"acme": "tenant-mod"})
    raw = client(base).moderations.with_raw_response.create(input="a crossbow on a wall")
    result = raw.parse().results[0]
    # A policy category with no OpenAI name appears under its own name.
    assert result.flagged and result.categories.model_extra["weapons"] is True  # type: ignore[index]
    assert result.category_applied_input_types.model_extra["weapons"] == ["text"]  # type: ignore[index]
    stored = trace(base, raw.headers["x-guard-trace-id"])
    assert stored["policy"]["id"] == "tenant-mod" and stored["decision"] == "refused"


def test_image_urls_are_refused_unless_allowed(base: str, images_server: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client(base).moderations.create(input=[image_part(images_server + "/red.png")])
    assert caught.value.body["code"] == "image_url_not_allowed"  # type: ignore[index]


def test_image_urls_through_the_allowlist(proxy: ProxyFactory, tmp_path: Path,
                                          images_server: str) -> None:
    write_policy(tmp_path, E2E_POLICY)
    base = proxy(policy="e2e", moderations={"image_urls": {
        "enabled": True, "allow": ["127.0.0.1"], "allow_networks": ["127.0.0.0/8"]}})
    raw = client(base).moderations.with_raw_response.create(
        input=[image_part(images_server + "/red.png")])
    result = raw.parse().results[0]
    assert result.flagged and result.categories.violence
    stored = trace(base, raw.headers["x-guard-trace-id"])
    assert stored["request"]["images"][0]["host"] == "127.0.0.1"
    refused = {
        "/page.txt": "is not an image",
        "/away?to=http://localhost/red.png": "allow does not list (localhost)",
        "/missing.png": "answered HTTP 404",
    }
    for path, words in refused.items():
        with pytest.raises(openai.BadRequestError) as caught:
            client(base).moderations.create(input=[image_part(images_server + path)])
        assert words in caught.value.message, caught.value.message
        assert caught.value.body["code"] == "invalid_image_url"  # type: ignore[index]


def test_an_allowed_host_still_needs_a_public_address(proxy: ProxyFactory, tmp_path: Path,
                                                      images_server: str) -> None:
    write_policy(tmp_path, E2E_POLICY)
    base = proxy(policy="e2e", moderations={"image_urls": {"enabled": True,
                                                           "allow": ["*"]}})
    with pytest.raises(openai.BadRequestError) as caught:
        client(base).moderations.create(input=[image_part(images_server + "/red.png")])
    assert "non-public address" in caught.value.message


def test_the_key_request_limit_counts_moderations(proxy: ProxyFactory, tmp_path: Path) -> None:
    write_policy(tmp_path, E2E_POLICY)
    base = proxy(policy="e2e", limits={"requests_per_minute": 1})
    client(base).moderations.create(input="a calm lake")
    with pytest.raises(openai.RateLimitError) as caught:
        client(base).moderations.create(input="a calm lake")
    assert caught.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
