"""Validation of images clients upload to /v1/images/edits: format, size, decompression bombs."""

from __future__ import annotations

import io
import warnings

from PIL import Image

from guard.errors import RequestError

MAX_IMAGE_BYTES = 50 * 1024 * 1024      # OpenAI's limit for the GPT image models
MAX_PIXELS = 4096 * 4096                 # beyond this, decoding is a memory attack, not a photo
_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


def validate_image(data: bytes, param: str) -> str:
    """Check an uploaded image without trusting its name or content type; returns its media type."""
    if not data:
        raise RequestError(f"Invalid '{param}': the file is empty.", param=param)
    if len(data) > MAX_IMAGE_BYTES:
        raise RequestError(f"Invalid '{param}': images must be under 50 MB.", param=param,
                           code="image_too_large")
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; make any excess an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                fmt = image.format or ""
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise RequestError(
                        f"Invalid '{param}': {width}x{height} is too many pixels "
                        f"(at most {MAX_PIXELS}).", param=param, code="image_too_large")
                image.verify()
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RequestError(f"Invalid '{param}': the image declares too many pixels.",
                           param=param, code="image_too_large") from None
    except Exception:  # noqa: BLE001 - PIL raises many kinds for broken files
        raise RequestError(f"Invalid '{param}': not a readable PNG, JPEG or WebP image.",
                           param=param, code="invalid_image_format") from None
    if fmt not in _FORMATS:
        raise RequestError(f"Invalid '{param}': {fmt or 'unknown'} images are not supported; "
                           "use PNG, JPEG or WebP.", param=param, code="invalid_image_format")
    return _FORMATS[fmt]
