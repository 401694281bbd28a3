"""The demo backend: draws the prompt onto a picture, so the proxy works with no network and no GPU.

It makes no real images and says so on every picture it draws; it is what `make run` uses until an
operator points a route at a real backend. Edits draw the prompt over a copy of the input image
(the first one; `size` scales it), leaving the rest of the picture as it was.

Options: default_size (512).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import textwrap
from collections.abc import Mapping
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from guard.core.types import GeneratedImage, GenerationCall
from guard.support.errors import BackendRejected, ConfigError

_MAX_SIDE = 1024


class DemoBackend:
    def __init__(self, name: str = "demo", *, default_size: int = 512) -> None:
        self.name = name
        self.default_size = default_size
        self.calls = 0

    @classmethod
    def from_config(cls, name: str, options: Mapping[str, Any]) -> DemoBackend:
        opts = dict(options)
        size = int(opts.pop("default_size", 512))
        if opts:
            raise ConfigError(f"backend {name!r} (demo): unknown options {sorted(opts)}")
        return cls(name, default_size=size)

    async def generate(self, call: GenerationCall) -> list[GeneratedImage]:
        self.calls += 1
        width, height = self._size(call.size)
        fmt = {"jpeg": "JPEG", "webp": "WEBP"}.get(call.output_format or "png", "PNG")
        return await asyncio.to_thread(
            lambda: [GeneratedImage(data=_draw(call.prompt, i, width, height, fmt),
                                    media_type=f"image/{fmt.lower()}") for i in range(call.n)])

    async def edit(self, call: GenerationCall, images: list[bytes],
                   mask: bytes | None) -> list[GeneratedImage]:
        self.calls += 1
        try:
            source: Image.Image = Image.open(io.BytesIO(images[0]))
            source.load()
        except (IndexError, OSError, ValueError) as exc:
            raise BackendRejected(f"backend {self.name!r} cannot read the input image",
                                  param="image", code="invalid_image") from exc
        if call.size and call.size != "auto":
            source = source.resize(self._size(call.size))
        fmt = {"jpeg": "JPEG", "webp": "WEBP"}.get(call.output_format or "png", "PNG")
        return await asyncio.to_thread(
            lambda: [GeneratedImage(data=_draw_over(source, call.prompt, i, fmt),
                                    media_type=f"image/{fmt.lower()}") for i in range(call.n)])

    def _size(self, size: str | None) -> tuple[int, int]:
        if not size or size == "auto":
            return self.default_size, self.default_size
        w, _, h = size.partition("x")
        scale = min(1.0, _MAX_SIDE / max(int(w), int(h)))
        return max(64, int(int(w) * scale)), max(64, int(int(h) * scale))

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


def _colour(prompt: str, index: int) -> tuple[int, int, int]:
    seed = hashlib.sha256(f"{prompt}\0{index}".encode()).digest()
    return 60 + seed[0] % 150, 60 + seed[1] % 150, 60 + seed[2] % 150


def _draw(prompt: str, index: int, width: int, height: int, fmt: str) -> bytes:
    image = Image.new("RGB", (width, height), _colour(prompt, index))
    _caption(image, prompt, top=max(30, width // 12))
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def _draw_over(source: Image.Image, prompt: str, index: int, fmt: str) -> bytes:
    """The prompt on a band across the top third of a copy of `source`; the rest untouched."""
    image = source.convert("RGBA" if fmt != "JPEG" else "RGB")
    width, height = image.size
    ImageDraw.Draw(image).rectangle((0, 0, width, height // 3), fill=_colour(prompt, index))
    _caption(image, prompt, top=max(18, width // 20) + 4, bottom=height // 3)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def _caption(image: Image.Image, prompt: str, *, top: int, bottom: int | None = None) -> None:
    width = image.width
    draw = ImageDraw.Draw(image)
    font_size = max(12, width // 28)
    font = ImageFont.load_default(size=font_size)
    draw.rectangle((0, 0, width, max(18, width // 20)), fill=(20, 20, 20))
    draw.text((8, 2), "SafeEdit Guard DEMO backend - not a real image model",
              fill=(255, 210, 0), font=ImageFont.load_default(size=max(10, width // 40)))
    lines = textwrap.wrap(prompt, width=max(16, width // max(8, width // 40)))[:12]
    y = top
    for line in lines:
        if bottom is not None and y + font_size > bottom:
            break
        draw.text((12, y), line, fill=(255, 255, 255), font=font)
        y += int(font_size * 1.3)
