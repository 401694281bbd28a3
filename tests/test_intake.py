"""guard.http.intake through the real proxy: a client that hangs up mid-body, fields validated by a
full match, and a mask that must fit its image."""

from __future__ import annotations

import io
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from tests.conftest import ADMIN_KEY, CLIENT_KEY
from tests.fake_backend import png

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def sdk(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=CLIENT_KEY, max_retries=0)


def trace(base: str, trace_id: str) -> dict[str, Any]:
    r = httpx.get(f"{base}/v1/guard/traces/{trace_id}", headers=ADMIN, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def png_file(colour: str, size: int) -> io.BytesIO:
    data = io.BytesIO(png(colour, size))
    data.name = f"{colour}.png"
    return data


@pytest.mark.parametrize(("path", "content_type"), [
    ("/v1/images/generations", "application/json"),
    ("/v1/images/edits", "multipart/form-data; boundary=x"),
])
def test_a_client_that_hangs_up_mid_body_is_traced_as_499(proxy, fake_backend, path, content_type) -> None:  # type: ignore[no-untyped-def]
    base = proxy()
    url = urlsplit(base)
    head = (f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\n"
            f"Authorization: Bearer {CLIENT_KEY}\r\nContent-Type: {content_type}\r\n"
            "Content-Length: 400\r\nExpect: 100-continue\r\n\r\n").encode()
    with socket.create_connection((url.hostname, url.port), timeout=10) as conn:
        conn.sendall(head)
        # The proxy asks for the body when it starts reading it (RFC 9110 §10.1.1).
        assert conn.recv(64).startswith(b"HTTP/1.1 100 ")
        conn.sendall(b'{"prompt": "a lighthouse at dusk", "size": "10' + b" " * 150)

    deadline = time.monotonic() + 10
    while not (found := httpx.get(f"{base}/v1/guard/traces", headers=ADMIN).json()["data"]):
        assert time.monotonic() < deadline, "no trace written for the dropped request"
        time.sleep(0.05)
    (summary,) = found
    assert summary["status"] == 499 and summary["decision"] == "failed"
    error = trace(base, summary["id"])["error"]
    assert error["code"] == "client_closed_request" and error["status"] == 499
    assert fake_backend[0].requests == []


@pytest.mark.parametrize("size", ["1024x1024\n", "auto\n", "1024x1024\n\n", " 1024x1024"])
def test_a_size_with_anything_around_it_is_refused(proxy, fake_backend, size) -> None:  # type: ignore[no-untyped-def]
    base = proxy()
    with pytest.raises(openai.BadRequestError) as err:
        sdk(base).images.generate(prompt="a lighthouse", size=size)  # type: ignore[arg-type]
    body = err.value.body
    assert isinstance(body, dict) and body["param"] == "size"
    assert err.value.response.status_code == 400
    trace_id = err.value.response.headers["x-guard-trace-id"]
    assert trace(base, trace_id)["error"]["code"] == "invalid_value"
    assert fake_backend[0].requests == []


def test_a_mask_must_have_the_images_dimensions(proxy, fake_backend) -> None:  # type: ignore[no-untyped-def]
    base = proxy()
    with pytest.raises(openai.BadRequestError) as err:
        sdk(base).images.edit(image=png_file("blue", 64), mask=png_file("black", 32),
                              prompt="a lighthouse")
    body = err.value.body
    assert isinstance(body, dict) and body["param"] == "mask"
    assert "the mask is 32x32 but the image is 64x64" in body["message"]
    assert fake_backend[0].requests == []

    # The same edit with a fitting mask is served.
    result = sdk(base).images.edit(image=png_file("blue", 64), mask=png_file("black", 64),
                                   prompt="a lighthouse")
    assert result.data and len(result.data) == 1 and len(fake_backend[0].requests) == 1
