"""Checking an image before anything decodes it: uploads to /v1/images/edits, and what backends
return (fetched URLs and base64 answers alike).

One rule everywhere: PNG, JPEG or WebP (sniffed, never taken from a name or a content type), at
most the caller's byte limit, at most the caller's pixel limit as the header declares it, and
sound enough to pass PIL's verify. More pixels than the limit is a decompression bomb, refused
before a single pixel is decoded; PIL's own bomb warning (far above any limit here) plays no part.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image

from guard.support.errors import RequestError

MAX_PIXELS = 4096 * 4096  # the default limit: beyond it, decoding is a memory attack, not a photo
_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


def validate_image(data: bytes, param: str, *, max_bytes: int, max_pixels: int = MAX_PIXELS
                   ) -> str:
    """The media type of `data` if it is a sound PNG, JPEG or WebP image of at most `max_bytes`
    bytes and `max_pixels` pixels; otherwise a RequestError naming `param`, with code
    `image_too_large` or `invalid_image_format`."""
    def refused(why: str, code: str = "invalid_image_format") -> RequestError:
        return RequestError(f"Invalid '{param}': {why}", param=param, code=code)

    if not data:
        raise RequestError(f"Invalid '{param}': the file is empty.", param=param)
    if len(data) > max_bytes:
        raise refused(f"the image is larger than {max_bytes} bytes.", "image_too_large")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError:
        raise refused("the image declares too many pixels (a decompression bomb?).",
                      "image_too_large") from None
    except Exception:  # noqa: BLE001 - PIL raises many kinds for what it cannot read
        raise refused("not a readable PNG, JPEG or WebP image.") from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise refused(f"{width}x{height} is more than {max_pixels} pixels "
                          "(a decompression bomb?).", "image_too_large")
        media_type = _FORMATS.get(image.format or "")
        if media_type is None:
            raise refused(f"{image.format or 'unknown'} images are not supported; use PNG, "
                          "JPEG or WebP.")
        try:
            image.verify()
        except Exception:  # noqa: BLE001 - PIL raises many kinds for a corrupt file
            raise refused(f"the {image.format} image is corrupt.") from None
    return media_type


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an image `validate_image` accepted, read from its header."""
    with Image.open(io.BytesIO(data)) as image:
        return image.size
