"""Backends that answer with image URLs: the guard fetches them to judge them, and refuses what
would be dangerous to fetch or to decode. A real local server plays the backend and the file host.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from PIL import Image

from adapters.fetch import UrlPolicy, image_from_b64
from adapters.openai_compat import OpenAICompatBackend
from guard.errors import BackendError
from guard.types import GenerationCall
from tests.backend_servers import ImageServer, png, png_bomb
from tests.conftest import CLIENT_KEY
from tests.servers import serve

CALL = GenerationCall(prompt="a lighthouse", n=1, model="sd")


def gif() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, format="GIF")
    return out.getvalue()


@pytest.fixture
def server() -> Iterator[ImageServer]:
    backend = ImageServer(answer="url")
    with serve(backend.app()) as url:
        backend.base_url = url
        yield backend


def backend(server: ImageServer, **image_urls: Any) -> OpenAICompatBackend:
    return OpenAICompatBackend.from_config("urls", {
        "api_base": server.base_url + "/v1", "image_urls": image_urls,
        "retry": {"attempts": 1}})


async def fetch_one(server: ImageServer, **image_urls: Any) -> bytes:
    b = backend(server, **image_urls)
    try:
        (image,) = await b.generate(CALL)
        return image.data
    finally:
        await b.aclose()


async def test_loopback_url_is_refused_by_default_and_never_fetched(server) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BackendError) as info:
        await fetch_one(server)
    assert info.value.status == 502 and info.value.code == "backend_bad_response"
    assert "non-public address (127.0.0.1" in info.value.message
    assert server.file_requests == []


@pytest.mark.parametrize("allow", [{"allow_private": True},
                                   {"allow_networks": ["127.0.0.0/8"]}])
async def test_loopback_url_is_fetched_when_the_backend_allows_it(server, allow) -> None:  # type: ignore[no-untyped-def]
    server.files["image.png"] = (png((0, 255, 0)), "image/png")
    data = await fetch_one(server, **allow)
    assert Image.open(io.BytesIO(data)).getpixel((0, 0)) == (0, 255, 0)
    assert "authorization" not in server.file_requests[0]


async def test_a_name_resolving_to_loopback_is_refused_and_the_name_is_sent_as_host(server) -> None:  # type: ignore[no-untyped-def]
    port = server.base_url.rsplit(":", 1)[1]
    server.base_url = f"http://localhost:{port}"
    with pytest.raises(BackendError, match=r"non-public address \(localhost -> "):
        await fetch_one(server)
    await fetch_one(server, allow_private=True)
    assert server.file_requests[0]["host"] == f"localhost:{port}"


async def test_each_redirect_hop_is_checked_again(server) -> None:  # type: ignore[no-untyped-def]
    port = server.base_url.rsplit(":", 1)[1]
    server.redirects["image.png"] = "/files/real.png"
    server.files["real.png"] = (png((255, 0, 0)), "image/png")
    data = await fetch_one(server, allow_networks=["127.0.0.1/32"])
    assert Image.open(io.BytesIO(data)).getpixel((0, 0)) == (255, 0, 0)

    server.redirects["image.png"] = f"http://127.0.0.2:{port}/files/real.png"
    with pytest.raises(BackendError, match=r"127\.0\.0\.2"):
        await fetch_one(server, allow_networks=["127.0.0.1/32"])

    server.redirects["image.png"] = "/files/image.png"
    with pytest.raises(BackendError, match="redirected more than 2 times"):
        await fetch_one(server, allow_private=True, max_redirects=2)


@pytest.mark.parametrize("name", ["big.png", "stream-big.png"])
async def test_oversize_body_is_refused(server, name) -> None:  # type: ignore[no-untyped-def]
    server.url_for = name
    server.files[name] = (png(size=(600, 600)) + b"\0" * 300_000, "image/png")
    with pytest.raises(BackendError, match="larger than 100000 bytes") as info:
        await fetch_one(server, allow_private=True, max_bytes=100_000)
    assert info.value.code == "backend_bad_response"


@pytest.mark.parametrize("body, media_type, why", [
    (b"<html>login</html>", "text/html", "not an image"),
    (b"not a png at all", "image/png", "not a readable PNG, JPEG or WebP image"),
    (png()[:60], "image/png", "corrupt"),
    (gif(), "image/gif", "GIF images are not supported"),
])
async def test_non_image_bodies_are_refused(server, body, media_type, why) -> None:  # type: ignore[no-untyped-def]
    server.files["image.png"] = (body, media_type)
    with pytest.raises(BackendError, match=why):
        await fetch_one(server, allow_private=True)


@pytest.mark.parametrize("side", [5000, 20000])
async def test_decompression_bomb_is_refused_before_decoding(server, side) -> None:  # type: ignore[no-untyped-def]
    bomb = png_bomb(side)
    assert len(bomb) < 200_000
    server.files["image.png"] = (bomb, "image/png")
    started = time.perf_counter()
    with pytest.raises(BackendError, match="decompression bomb"):
        await fetch_one(server, allow_private=True)
    assert time.perf_counter() - started < 2


async def test_the_pixel_limit_is_the_only_bomb_rule(server) -> None:  # type: ignore[no-untyped-def]
    """10000 x 10000 is past PIL's own warning threshold (89 Mpx): the backend's limit decides."""
    server.files["image.png"] = (png_bomb(10_000), "image/png")
    with pytest.raises(BackendError, match="10000x10000 is more than 99999999 pixels"):
        await fetch_one(server, allow_private=True, max_pixels=99_999_999)
    data = await fetch_one(server, allow_private=True, max_pixels=100_000_000)
    assert data == png_bomb(10_000)


def test_base64_answers_get_the_same_image_checks_at_the_first_look() -> None:
    bomb = image_from_b64(base64.b64encode(png_bomb(5000)).decode(), "b", UrlPolicy())
    with pytest.raises(BackendError, match="decompression bomb") as info:
        bomb.validate()
    assert info.value.code == "backend_bad_response"
    with pytest.raises(BackendError, match="larger than 100 bytes"):
        image_from_b64(base64.b64encode(png()).decode(), "b", UrlPolicy(max_bytes=100)).validate()
    with pytest.raises(BackendError, match="not valid base64"):
        image_from_b64("not*base64", "b", UrlPolicy()).validate()
    image = image_from_b64(base64.b64encode(png()).decode(), "b", UrlPolicy())
    assert image.media_type == "image/png" and image.data == png()


def test_url_answers_through_the_proxy(proxy, fake_backend) -> None:  # type: ignore[no-untyped-def]
    """A client of the proxy gets the fetched image, judged, as base64; refused unless allowed."""
    fake, _ = fake_backend
    fake.mode = "url"
    base = proxy(backend_options={"image_urls": {"allow_private": True}})
    client = openai.OpenAI(base_url=base + "/v1", api_key=CLIENT_KEY, max_retries=0)
    result = client.images.generate(prompt="a red bicycle", model="sd")
    assert result.data and result.data[0].b64_json
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.getpixel((0, 0)) == (30, 60, 200)

    base = proxy()
    with pytest.raises(openai.InternalServerError) as info:
        openai.OpenAI(base_url=base + "/v1", api_key=CLIENT_KEY,
                      max_retries=0).images.generate(prompt="a red bicycle", model="sd")
    assert info.value.status_code == 502
    assert info.value.body["code"] == "backend_bad_response"  # type: ignore[index]
