"""guard.support.inputs.validate_image: the one check for uploaded images and backends' images."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from adapters.fetch import UrlPolicy, image_from_b64
from guard.http.errors import status_of
from guard.support.errors import BackendError, RequestError
from guard.support.inputs import MAX_PIXELS, validate_image
from tests.backend_servers import png, png_bomb

LIMIT = 50_000_000


def encoded(fmt: str, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (8, 8)).save(out, format=fmt)
    return out.getvalue()


@pytest.mark.parametrize("fmt, media_type", [("PNG", "image/png"), ("JPEG", "image/jpeg"),
                                              ("WEBP", "image/webp")])
def test_sound_images_give_their_media_type(fmt: str, media_type: str) -> None:
    assert validate_image(encoded(fmt), "image", max_bytes=LIMIT) == media_type


@pytest.mark.parametrize("side", [5000, 20_000])
def test_the_same_bomb_is_refused_as_an_upload_and_from_a_backend(side: int) -> None:
    bomb = png_bomb(side)
    with pytest.raises(RequestError) as upload:
        validate_image(bomb, "image", max_bytes=LIMIT)
    assert (status_of(upload.value), upload.value.code, upload.value.param) == (
        400, "image_too_large", "image")
    with pytest.raises(BackendError) as backend:
        image_from_b64(base64.b64encode(bomb).decode(), "sd", UrlPolicy()).validate()
    assert (status_of(backend.value), backend.value.code) == (502, "backend_bad_response")
    why = upload.value.message.removeprefix("Invalid 'image': ")
    assert "decompression bomb" in why and why in backend.value.message


def test_more_pixels_than_the_limit_is_the_rule_not_pils_warning() -> None:
    big = png_bomb(10_000)  # 100 Mpx: past PIL's warning threshold, short of its error
    assert validate_image(big, "image", max_bytes=LIMIT, max_pixels=100_000_000) == "image/png"
    with pytest.raises(RequestError, match="10000x10000 is more than 99999999 pixels"):
        validate_image(big, "image", max_bytes=LIMIT, max_pixels=99_999_999)
    with pytest.raises(RequestError, match=f"more than {MAX_PIXELS} pixels"):
        validate_image(png_bomb(4097), "image", max_bytes=LIMIT)
    assert validate_image(png_bomb(4096), "image", max_bytes=LIMIT) == "image/png"


def test_the_byte_limit_is_the_callers() -> None:
    data = png()
    assert validate_image(data, "mask", max_bytes=len(data)) == "image/png"
    with pytest.raises(RequestError) as info:
        validate_image(data, "mask", max_bytes=len(data) - 1)
    assert info.value.code == "image_too_large" and info.value.param == "mask"
    assert f"larger than {len(data) - 1} bytes" in info.value.message


@pytest.mark.parametrize("data, code, why", [
    (b"", "invalid_value", "the file is empty"),
    (b"not an image at all", "invalid_image_format", "not a readable PNG, JPEG or WebP image"),
    (encoded("GIF", "P"), "invalid_image_format", "GIF images are not supported"),
    (png()[:60], "invalid_image_format", "the PNG image is corrupt"),
])
def test_bad_files_name_the_parameter(data: bytes, code: str, why: str) -> None:
    with pytest.raises(RequestError) as info:
        validate_image(data, "image", max_bytes=LIMIT)
    assert info.value.code == code and info.value.param == "image"
    assert info.value.message.startswith("Invalid 'image': ") and why in info.value.message
