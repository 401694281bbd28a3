"""The diffusers backend with a tiny real Stable Diffusion pipeline built offline (random weights,
real architecture), loaded by path the way a real checkpoint is."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from adapters.diffusers_backend import DiffusersBackend
from guard.core.types import GenerationCall
from guard.http.errors import status_of
from guard.plugins import EditingBackend, build_backend
from guard.support.errors import BackendError, BackendRateLimited, BackendRejected, ConfigError
from tests.conftest import CLIENT_KEY
from tests.tiny_diffusers import build_tiny_sd


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


def make(path: Path, **options: Any) -> DiffusersBackend:
    backend = build_backend("sd", {"kind": "diffusers", "model": str(path), "steps": 2,
                                   **options})
    assert isinstance(backend, DiffusersBackend)
    return backend


def call(n: int = 1, **fields: Any) -> GenerationCall:
    return GenerationCall(prompt=fields.pop("prompt", "a red cat"), n=n,
                          size=fields.pop("size", "64x64"), **fields)


def size_of(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


def rgba(colour: tuple[int, int, int, int], size: tuple[int, int] = (64, 64)) -> bytes:
    out = io.BytesIO()
    Image.new("RGBA", size, colour).save(out, format="PNG")
    return out.getvalue()


def test_generates_through_the_proxy_with_the_openai_sdk(proxy, tiny_sd) -> None:  # type: ignore[no-untyped-def]
    base = proxy(backends={"sd": {"kind": "diffusers", "model": str(tiny_sd), "steps": 2}},
                 routes={"*": {"backend": "sd"}})
    client = openai.OpenAI(base_url=base + "/v1", api_key=CLIENT_KEY, max_retries=0)
    result = client.images.generate(prompt="a lighthouse at sunset", n=2, size="64x64",
                                    response_format="b64_json")
    pictures = [base64.b64decode(d.b64_json or "") for d in result.data or []]
    assert len(pictures) == 2
    assert [size_of(p) for p in pictures] == [(64, 64), (64, 64)]
    assert pictures[0] != pictures[1]
    assert httpx.get(base + "/readyz").json()["checks"]["backend:sd"] is True


async def test_device_and_dtype_are_chosen_automatically(tiny_sd) -> None:  # type: ignore[no-untyped-def]
    import torch

    backend = make(tiny_sd)
    await backend.start()
    assert await backend.ready()
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert backend.device == expected
    assert backend.dtype == ("float32" if expected == "cpu" else "bfloat16")
    await backend.aclose()


async def test_seed_makes_images_reproducible_and_each_image_differs(tiny_sd) -> None:  # type: ignore[no-untyped-def]
    backend = make(tiny_sd)
    first = await backend.generate(call(2, extra={"seed": 7}))
    again = await backend.generate(call(2, extra={"seed": 7}))
    other = await backend.generate(call(2, extra={"seed": 8}))
    assert [i.data for i in first] == [i.data for i in again]
    assert first[0].data != first[1].data
    assert other[0].data == first[1].data  # image i of seed s is seed s + i
    fixed = make(tiny_sd, seed=7)
    assert [i.data for i in await fixed.generate(call(2))] == [i.data for i in first]
    await backend.aclose()
    await fixed.aclose()


async def test_size_and_format_are_what_the_request_asked(tiny_sd) -> None:  # type: ignore[no-untyped-def]
    backend = make(tiny_sd)
    (wide,) = await backend.generate(call(size="96x64"))
    (odd,) = await backend.generate(call(size="100x60", output_format="jpeg"))
    assert size_of(wide.data) == (96, 64) and wide.media_type == "image/png"
    assert size_of(odd.data) == (100, 60) and odd.media_type == "image/jpeg"
    with pytest.raises(BackendRejected) as info:
        await backend.generate(call(size="4096x4096"))
    assert info.value.param == "size"
    await backend.aclose()


async def test_quality_and_steps_choose_the_number_of_steps(tiny_sd) -> None:  # type: ignore[no-untyped-def]
    backend = make(tiny_sd, steps_by_quality={"low": 1})
    (low,) = await backend.generate(call(quality="low", extra={"seed": 3}))
    (one,) = await backend.generate(call(extra={"seed": 3, "steps": 1}))
    (default,) = await backend.generate(call(extra={"seed": 3}))
    assert low.data == one.data != default.data
    with pytest.raises(BackendRejected, match="steps must be"):
        await backend.generate(call(extra={"steps": 10_000}))
    await backend.aclose()


async def test_one_pipeline_serves_concurrent_requests_in_turn(tiny_sd) -> None:  # type: ignore[no-untyped-def]
    backend = make(tiny_sd)
    calls = [call(2, prompt=p, extra={"seed": i}) for i, p in
             enumerate(["a red cat", "a blue dog", "a tree"])]
    alone = [[i.data for i in await backend.generate(c)] for c in calls]
    together = await asyncio.gather(*(backend.generate(c) for c in calls))
    assert [[i.data for i in r] for r in together] == alone
    await backend.aclose()


async def test_a_full_queue_answers_429(tiny_sd) -> None:  # type: ignore[no-untyped-def]
    backend = make(tiny_sd, max_queue=1)
    results = await asyncio.gather(*(backend.generate(call()) for _ in range(4)),
                                   return_exceptions=True)
    refused = [r for r in results if isinstance(r, BackendRateLimited)]
    assert len(refused) == 2 and refused[0].headers == {"retry-after": "1"}
    assert sum(isinstance(r, list) for r in results) == 2
    await backend.aclose()


async def test_edit_with_and_without_a_mask(tiny_sd) -> None:  # type: ignore[no-untyped-def]
    backend = make(tiny_sd, steps=4)
    assert isinstance(backend, EditingBackend)
    source = rgba((200, 30, 30, 255), (96, 64))
    hole = Image.new("RGBA", (96, 64), (0, 0, 0, 255))
    hole.paste((0, 0, 0, 0), (32, 16, 64, 48))  # transparent = may change
    out = io.BytesIO()
    hole.save(out, format="PNG")
    edit = GenerationCall(prompt="a blue hat", n=2, extra={"seed": 1})
    plain = await backend.edit(edit, [source], None)
    masked = await backend.edit(edit, [source], out.getvalue())
    assert [size_of(i.data) for i in plain + masked] == [(96, 64)] * 4
    assert plain[0].data != masked[0].data and plain[0].data != plain[1].data
    assert set(backend._pipes) == {"text2image", "image2image", "inpaint"}
    with pytest.raises(BackendRejected, match="one image at a time"):
        await backend.edit(edit, [source, source], None)
    await backend.aclose()


async def test_a_model_that_does_not_load_is_not_ready_and_fails_as_unavailable(tmp_path) -> None:  # type: ignore[no-untyped-def]
    backend = make(tmp_path / "no-such-model", local_files_only=True)
    await backend.start()
    assert not await backend.ready()
    with pytest.raises(BackendError) as info:
        await backend.generate(call())
    assert (status_of(info.value), info.value.code) == (502, "backend_unavailable")
    await backend.aclose()


def test_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="stepps: unknown option"):
        build_backend("sd", {"kind": "diffusers", "model": "x", "stepps": 2})
    with pytest.raises(ConfigError, match="model: Field required"):
        build_backend("sd", {"kind": "diffusers"})
    with pytest.raises(ConfigError, match="dtype"):
        build_backend("sd", {"kind": "diffusers", "model": "x", "dtype": "float8"})


def test_edits_through_the_proxy_with_the_openai_sdk(proxy, tiny_sd) -> None:  # type: ignore[no-untyped-def]
    base = proxy(backends={"sd": {"kind": "diffusers", "model": str(tiny_sd), "steps": 2}},
                 routes={"*": {"backend": "sd"}})
    client = openai.OpenAI(base_url=base + "/v1", api_key=CLIENT_KEY, max_retries=0)
    result = client.images.edit(image=("in.png", rgba((0, 90, 200, 255), (80, 64)), "image/png"),
                                prompt="a red hat", n=2, response_format="b64_json")
    assert [size_of(base64.b64decode(d.b64_json or "")) for d in result.data or []] == [(80, 64)] * 2
