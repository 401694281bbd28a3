"""The demo backend's edits: the prompt drawn over a copy of the client's image."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from guard.core.types import GenerationCall
from guard.plugins import EditingBackend, build_backend
from guard.support.errors import BackendRejected


def picture(colour: tuple[int, int, int], size: tuple[int, int] = (120, 90)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


async def test_edit_draws_the_prompt_over_a_copy_of_the_input() -> None:
    backend = build_backend("demo", {"kind": "demo"})
    assert isinstance(backend, EditingBackend)
    source = picture((10, 200, 10))
    images = await backend.edit(GenerationCall(prompt="add a red hat", n=2), [source], None)
    assert len(images) == 2
    first, second = (Image.open(io.BytesIO(i.data)).convert("RGB") for i in images)
    assert first.size == (120, 90)
    assert first.getpixel((60, 80)) == (10, 200, 10)  # below the band: the input, untouched
    assert first.getpixel((60, 5)) != (10, 200, 10)   # the band with the prompt
    assert first.getpixel((110, 20)) != second.getpixel((110, 20))  # each copy is its own


async def test_edit_honours_size_and_format_and_refuses_unreadable_input() -> None:
    backend = build_backend("demo", {"kind": "demo"})
    assert isinstance(backend, EditingBackend)
    (image,) = await backend.edit(GenerationCall(prompt="x", n=1, size="256x128",
                                                 output_format="jpeg"),
                                  [picture((0, 0, 255))], None)
    assert image.media_type == "image/jpeg"
    assert Image.open(io.BytesIO(image.data)).size == (256, 128)
    with pytest.raises(BackendRejected) as info:
        await backend.edit(GenerationCall(prompt="x", n=1), [b"not an image"], None)
    assert info.value.param == "image"
