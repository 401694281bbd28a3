"""Routing by model across several real backends, and fallback when the routed one is down,
through the proxy with the openai SDK."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from tests.backend_servers import ImageServer
from tests.conftest import ADMIN_KEY, CLIENT_KEY
from tests.servers import free_port, serve


@pytest.fixture
def second_server() -> Iterator[ImageServer]:
    server = ImageServer()
    with serve(server.app()) as url:
        server.base_url = url
        yield server


def start(proxy, fake_url: str, second: ImageServer, **overrides: Any) -> str:  # type: ignore[no-untyped-def]
    backends = {
        "fake": {"kind": "openai-compatible", "api_base": fake_url, "retry": {"attempts": 1}},
        "second": {"kind": "litellm", "api_base": second.base_url + "/v1",
                   "model": "openai/second-model"},
        "down": {"kind": "openai-compatible", "api_base": f"http://127.0.0.1:{free_port()}/v1",
                 "retry": {"attempts": 2, "backoff_s": 0.01}},
        "demo": {"kind": "demo", "default_size": 64},
    }
    routes = {"dall-e-3": {"backend": "fake", "model": "fake-model"},
              "sd-*": {"backend": "second"}, "flaky": {"backend": "down"}}
    return proxy(backends=backends, routes=routes, **overrides)  # type: ignore[no-any-return]


def backend_of(base: str, trace_id: str) -> str:
    r = httpx.get(f"{base}/v1/guard/traces/{trace_id}",
                  headers={"authorization": f"Bearer {ADMIN_KEY}"})
    return str(r.json()["backend"])


def generate(base: str, model: str) -> httpx.Response:
    return httpx.post(f"{base}/v1/images/generations", json={"prompt": "a cat", "model": model},
                      headers={"authorization": f"Bearer {CLIENT_KEY}"}, timeout=30)


def test_each_model_goes_to_its_backend(proxy, fake_backend, second_server) -> None:  # type: ignore[no-untyped-def]
    fake, url = fake_backend
    base = start(proxy, url, second_server)
    client = openai.OpenAI(base_url=base + "/v1", api_key=CLIENT_KEY, max_retries=0)
    client.images.generate(prompt="a cat", model="dall-e-3")
    client.images.generate(prompt="a dog", model="sd-xl")
    assert [r["model"] for r in fake.requests] == ["fake-model"]
    assert [r["model"] for r in second_server.requests] == ["second-model"]
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="a cat", model="unrouted")
    assert info.value.code == "model_not_found"


def test_fallback_answers_when_the_routed_backend_is_down(proxy, fake_backend, second_server) -> None:  # type: ignore[no-untyped-def]
    _, url = fake_backend
    base = start(proxy, url, second_server, fallback="demo")
    r = generate(base, "flaky")
    assert r.status_code == 200, r.text
    picture = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
    assert picture.size == (64, 64)  # drawn by the demo backend
    assert backend_of(base, r.headers["x-guard-trace-id"]) == "demo"


def test_no_fallback_means_the_client_sees_502(proxy, fake_backend, second_server) -> None:  # type: ignore[no-untyped-def]
    _, url = fake_backend
    base = start(proxy, url, second_server)
    r = generate(base, "flaky")
    assert r.status_code == 502 and r.json()["error"]["code"] == "backend_unavailable"


def test_a_backend_4xx_does_not_fall_back(proxy, fake_backend, second_server) -> None:  # type: ignore[no-untyped-def]
    fake, url = fake_backend
    fake.mode = "reject400"
    base = start(proxy, url, second_server, fallback="demo")
    r = generate(base, "dall-e-3")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_size"
    assert backend_of(base, r.headers["x-guard-trace-id"]) == "fake"


def test_a_rate_limited_backend_falls_back(proxy, fake_backend, second_server) -> None:  # type: ignore[no-untyped-def]
    _, url = fake_backend
    second_server.fail_first, second_server.fail_status = 99, 429
    base = start(proxy, url, second_server, fallback="fake")
    r = generate(base, "sd-1.5")
    assert r.status_code == 200, r.text
    assert backend_of(base, r.headers["x-guard-trace-id"]) == "fake"
