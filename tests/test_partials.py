"""Previews judged while an image is made, and an unsafe generation stopped early (issue 18).

- the openai-compatible backend's `partial_images`: OpenAI's image SSE read from a real local
  server (tests/stream_server.py), the stream closed on "stop", and every fallback to the final
  image
- the engine in-process (guard.testing's judge): an unsafe preview stops its generation and
  stands in for the image, which is then refined
- the diffusers backend's `preview_steps` with the tiny real pipeline (tests/tiny_diffusers.py),
  interrupted on an unsafe preview
- the proxy with the openai SDK: an unsafe partial cancels its generation, the refined image is
  returned, the trace, the metrics and the auditors' page show the stop
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from adapters.openai_compat import OpenAICompatBackend
from guard.core.config import RouteConfig
from guard.core.policy import Policy
from guard.core.types import GeneratedImage, GenerationCall, Trace
from guard.pipeline.engine import Engine
from guard.pipeline.routing import Router
from guard.plugins import Preview, PreviewAction, PreviewHandler, PreviewingBackend, build_backend
from guard.support.errors import BackendError, BackendRejected
from guard.support.telemetry import Metrics, Telemetry, TelemetryConfig
from guard.testing import BLUE, RED, FakeJudge, colour_of, png
from tests.conftest import ADMIN_KEY, AUDITOR_KEY, CLIENT_KEY, E2E_POLICY, write_policy
from tests.servers import serve
from tests.stream_server import COLOURS, StreamServer


@pytest.fixture
def stream_server() -> Iterator[tuple[StreamServer, str]]:
    server = StreamServer()
    with serve(server.app()) as url:
        yield server, url + "/v1"


def compat(url: str, **options: Any) -> OpenAICompatBackend:
    backend = build_backend("stream", {"kind": "openai-compatible", "api_base": url,
                                       "timeout_s": 5, "partial_images": 2,
                                       "retry": {"attempts": 1}, **options})
    assert isinstance(backend, OpenAICompatBackend) and isinstance(backend, PreviewingBackend)
    return backend


def colour(image: GeneratedImage | None) -> str | None:
    if image is None:
        return None
    rgb = Image.open(io.BytesIO(image.data)).convert("RGB").getpixel((0, 0))
    return next(name for name, value in COLOURS.items() if value == rgb)


class Shown:
    """A preview handler that says stop at the first red preview."""

    def __init__(self) -> None:
        self.previews: list[tuple[int, int, str | None]] = []

    async def __call__(self, preview: Preview) -> PreviewAction:
        self.previews.append((preview.index, preview.step, colour(preview.image)))
        return "stop" if colour(preview.image) == "red" else "continue"


async def wait_for(condition: Callable[[], bool], timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


# --- the openai-compatible backend --------------------------------------------------------------

async def test_partials_are_shown_as_they_arrive_and_the_final_image_returned(stream_server) -> None:  # type: ignore[no-untyped-def]
    server, url = stream_server
    backend = compat(url)
    shown = Shown()
    images = await backend.generate_previewed(GenerationCall(prompt="a cat", n=1), shown)
    assert [colour(i) for i in images] == ["blue"]
    assert shown.previews == [(0, 0, "blue"), (0, 1, "blue")]
    assert server.requests[0]["stream"] is True and server.requests[0]["partial_images"] == 2
    assert server.completed == [0] and len(server.requests) == 1
    assert backend.shows_previews(GenerationCall(prompt="x", n=1))
    await backend.aclose()


async def test_stop_closes_the_stream_at_once(stream_server) -> None:  # type: ignore[no-untyped-def]
    server, url = stream_server
    server.gap_s = 0.5
    backend = compat(url)
    shown = Shown()
    started = time.perf_counter()
    images = await backend.generate_previewed(GenerationCall(prompt="LATERED cat", n=1), shown)
    assert images == [None]
    assert shown.previews == [(0, 0, "blue"), (0, 1, "red")]
    assert time.perf_counter() - started < 1.4  # two gaps, not the third before completion
    await wait_for(lambda: server.closed_early == [0])
    assert server.completed == []
    await backend.aclose()


async def test_n_images_in_one_stream_are_told_apart_by_image_index(stream_server) -> None:  # type: ignore[no-untyped-def]
    server, url = stream_server
    server.indexed, server.red_image = True, 1
    backend = compat(url)
    shown = Shown()
    images = await backend.generate_previewed(GenerationCall(prompt="a cat", n=3), shown)
    assert [colour(i) for i in images] == ["blue", None, "blue"]
    # Image 1 stopped at its first partial; its later events are not shown.
    assert shown.previews == [(0, 0, "blue"), (1, 0, "red"), (2, 0, "blue"),
                              (0, 1, "blue"), (2, 1, "blue")]
    assert [(r["n"], r["stream"], r["partial_images"]) for r in server.requests] == [
        (3, True, 2)]
    await backend.aclose()


async def test_a_stream_is_closed_once_every_image_is_stopped(stream_server) -> None:  # type: ignore[no-untyped-def]
    server, url = stream_server
    server.indexed, server.gap_s = True, 0.3
    backend = compat(url)
    images = await backend.generate_previewed(GenerationCall(prompt="MARKRED", n=2), Shown())
    assert images == [None, None]
    await wait_for(lambda: server.closed_early == [0])
    assert server.completed == []
    await backend.aclose()


async def test_without_image_index_partials_of_n_images_are_not_judged(stream_server) -> None:  # type: ignore[no-untyped-def]
    server, url = stream_server
    server.red_image = 0
    backend = compat(url)
    shown = Shown()
    images = await backend.generate_previewed(GenerationCall(prompt="a cat", n=2), shown)
    assert [colour(i) for i in images] == ["red", "blue"]  # finals in the order they came
    assert shown.previews == [] and len(server.requests) == 1
    await backend.aclose()


async def test_a_backend_that_refuses_to_stream_is_asked_without(stream_server) -> None:  # type: ignore[no-untyped-def]
    server, url = stream_server
    server.mode = "refuse"
    backend = compat(url)
    images = await backend.generate_previewed(GenerationCall(prompt="a cat", n=2), Shown())
    assert [colour(i) for i in images] == ["blue", "blue"]
    assert [r.get("stream") for r in server.requests] == [True, None]
    server.refuse_code = "content_policy_violation"
    with pytest.raises(BackendRejected) as info:
        await backend.generate_previewed(GenerationCall(prompt="a cat", n=1), Shown())
    assert info.value.code == "content_policy_violation" and len(server.requests) == 3
    await backend.aclose()


@pytest.mark.parametrize("mode", ["malformed", "cut"])
async def test_a_stream_that_cannot_be_read_to_its_end_falls_back_to_the_final_image(
        stream_server, mode: str) -> None:  # type: ignore[no-untyped-def]
    server, url = stream_server
    server.mode = mode
    backend = compat(url)
    shown = Shown()
    images = await backend.generate_previewed(GenerationCall(prompt="a cat", n=1), shown)
    assert [colour(i) for i in images] == ["blue"]
    # Asked again without streaming: the same body less `stream` and `partial_images`.
    assert [r.get("stream") for r in server.requests] == [True, None]
    assert "partial_images" not in server.requests[1] and server.requests[1]["n"] == 1
    assert {k: v for k, v in server.requests[0].items()
            if k not in ("stream", "partial_images")} == server.requests[1]
    assert shown.previews == ([] if mode == "malformed" else [(0, 0, "blue")])
    await backend.aclose()


async def test_a_backend_that_ignores_stream_answers_json_and_that_is_read(stream_server) -> None:  # type: ignore[no-untyped-def]
    server, url = stream_server
    server.mode = "json"
    backend = compat(url)
    shown = Shown()
    images = await backend.generate_previewed(GenerationCall(prompt="a cat", n=2), shown)
    assert [colour(i) for i in images] == ["blue", "blue"]
    assert shown.previews == [] and len(server.requests) == 1
    await backend.aclose()


async def test_a_partial_that_does_not_decode_is_skipped(stream_server) -> None:  # type: ignore[no-untyped-def]
    server, url = stream_server
    server.mode = "badpartial"
    backend = compat(url)
    shown = Shown()
    images = await backend.generate_previewed(GenerationCall(prompt="MARKRED", n=1), shown)
    assert [colour(i) for i in images] == ["red"]  # the final image, for the engine to judge
    assert shown.previews == [] and len(server.requests) == 1
    await backend.aclose()


async def test_an_error_event_is_a_backend_failure_without_the_key(stream_server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    server, url = stream_server
    server.mode, server.secret = "error", "sk-partials-secret-123"
    monkeypatch.setenv("PARTIALS_KEY", server.secret)
    backend = compat(url, api_key_env="PARTIALS_KEY")
    with pytest.raises(BackendError) as info:
        await backend.generate_previewed(GenerationCall(prompt="a cat", n=1), Shown())
    assert not isinstance(info.value, BackendRejected)
    for text in (str(info.value), info.value.message, info.value.detail or ""):
        assert server.secret not in text
    assert "invalid key" in (info.value.detail or "")
    await backend.aclose()


async def test_without_partial_images_the_backend_shows_none(stream_server) -> None:  # type: ignore[no-untyped-def]
    server, url = stream_server
    backend = compat(url, partial_images=0)
    assert not backend.shows_previews(GenerationCall(prompt="a cat", n=1))
    await backend.generate(GenerationCall(prompt="a cat", n=1))
    assert "stream" not in server.requests[0] and "partial_images" not in server.requests[0]
    await backend.aclose()


# --- the engine, in-process -------------------------------------------------------------------

class PreviewingFake:
    """A PreviewingBackend over guard.testing's PNGs: image i of a call is red where the prompt
    says `red` (or, in the first call, i is in `red_images`), else blue; a preview of that colour every `gap_s` at
    `steps`, the final image `gap_s` after the last. `obeys`: False ignores "stop"."""

    name = "previewing"

    def __init__(self, steps: tuple[int, ...] = (0, 1), gap_s: float = 0.02, *,
                 red_images: tuple[int, ...] = (), obeys: bool = True) -> None:
        self.steps, self.gap_s, self.red_images, self.obeys = steps, gap_s, red_images, obeys
        self.prompts: list[str] = []
        self.stopped: list[tuple[str, int]] = []
        self.cancelled = 0
        self.plain = 0  # calls without previews

    def shows_previews(self, call: GenerationCall) -> bool:
        return True

    async def generate(self, call: GenerationCall) -> list[GeneratedImage]:
        self.prompts.append(call.prompt)
        self.plain += 1
        return [GeneratedImage(data=png(BLUE)) for _ in range(call.n)]

    async def generate_previewed(self, call: GenerationCall, on_preview: PreviewHandler
                                 ) -> list[GeneratedImage | None]:
        self.prompts.append(call.prompt)

        async def one(i: int) -> GeneratedImage | None:
            first_call = len(self.prompts) == 1
            rgb = RED if "red" in call.prompt.split() or (
                first_call and i in self.red_images) else BLUE
            for step in self.steps:
                await asyncio.sleep(self.gap_s)
                preview = Preview(i, step, GeneratedImage(data=png(rgb)))
                if await on_preview(preview) == "stop" and self.obeys:
                    self.stopped.append((call.prompt, i))
                    return None
            await asyncio.sleep(self.gap_s)
            return GeneratedImage(data=png(rgb, prompt=call.prompt))

        try:
            return list(await asyncio.gather(*(one(i) for i in range(call.n))))
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


POLICY = Policy.model_validate({
    "id": "previews", "version": 1, "prescreen": False,
    "categories": {"violence": {"threshold": 0.5, "action": "edit"},
                   "hate": {"threshold": 0.5, "action": "refuse"}}})


def engine_with(backend: Any, judge: FakeJudge | None = None, *,
                enabled: bool = True) -> tuple[Engine, Metrics]:
    router = Router({backend.name: backend}, {"*": RouteConfig(backend=backend.name)})
    metrics = Metrics()
    judge = judge or FakeJudge(colours={RED: {"violence": 0.9}},
                               refine=lambda p: p.replace("red", "blue"))
    return Engine(judge, router, Telemetry(TelemetryConfig()), metrics,
                  enabled=enabled), metrics


async def run(engine: Engine, prompt: str, n: int = 1) -> tuple[Any, Trace]:
    trace = Trace()
    outcome = await engine.run(GenerationCall(prompt=prompt, n=n, model="m"),
                               engine.router.route("m"), POLICY, trace)
    return outcome, trace


async def test_engine_stops_at_an_unsafe_preview_and_regenerates_from_the_refined_prompt() -> None:
    backend = PreviewingFake()
    engine, metrics = engine_with(backend)
    outcome, trace = await run(engine, "a red apple")
    assert [(f.decision, colour_of(f.image.data)) for f in outcome.images] == [("edited", BLUE)]
    assert backend.prompts == ["a red apple", "a blue apple"]
    assert backend.stopped == [("a red apple", 0)]
    first, second = trace.rounds
    assert [(p.slot, p.step, p.flagged, p.stopped) for p in first.previews] == [
        (0, 0, ["violence"], True)]
    # The stopping preview stands in for the image: judged as such, refined by the judge.
    assert first.images[0].image_sha256 == first.previews[0].image_sha256
    assert first.images[0].refined_prompt == "a blue apple"
    assert [(p.step, p.stopped) for p in second.previews] == [(0, False), (1, False)]
    assert metrics.previews.labels("previewing", "stopped")._value.get() == 1
    assert metrics.previews.labels("previewing", "continued")._value.get() == 2


class ExplainsJudge(FakeJudge):
    """Records whether each call's policy would have an unsafe item explained."""

    def __init__(self) -> None:
        super().__init__(colours={RED: {"violence": 0.9}},
                         refine=lambda p: p.replace("red", "blue"))
        self.explains: list[bool] = []

    async def judge(self, items: Any, policy: Policy) -> Any:
        self.explains.append(policy.wants_explanation({"violence": 0.9}))
        return await super().judge(items, policy)


async def test_engine_judges_previews_verdict_only() -> None:
    judge = ExplainsJudge()
    engine, _ = engine_with(PreviewingFake(steps=(0,)), judge)
    _, trace = await run(engine, "a red apple")
    # The preview for its verdict alone; the stand-in then with its explanation.
    assert judge.explains[:2] == [False, True]
    assert trace.rounds[0].previews[0].judge_id == "fake"
    assert trace.rounds[0].images[0].refined_prompt == "a blue apple"


async def test_a_backend_that_ignores_stop_is_cancelled_once_every_image_is_stopped() -> None:
    backend = PreviewingFake(steps=(0, 1, 2, 3), gap_s=0.2, obeys=False)
    engine, _ = engine_with(backend)
    started = time.perf_counter()
    outcome, trace = await run(engine, "a red apple")
    # Round 1 was cut after its first preview (0.2 s), not run for its 1 s; round 2 ran whole.
    assert time.perf_counter() - started < 1.8  # uncut: 2 s
    assert backend.cancelled == 1
    assert trace.rounds[0].previews[0].stopped and outcome.images[0].decision == "edited"


async def test_only_the_unsafe_image_of_a_call_is_stopped() -> None:
    backend = PreviewingFake(red_images=(1,))
    engine, _ = engine_with(backend, FakeJudge(colours={RED: {"violence": 0.9}},
                                               refine=lambda p: f"{p}, calm"))
    outcome, trace = await run(engine, "a blue apple", n=2)
    assert backend.stopped == [("a blue apple", 1)]
    assert backend.prompts == ["a blue apple", "a blue apple, calm"]
    assert [f.decision for f in outcome.images] == ["passed", "edited"]
    assert [(p.slot, p.stopped) for p in trace.rounds[0].previews if p.stopped] == [(1, True)]


async def test_a_preview_whose_judging_fails_changes_nothing() -> None:
    judge = FakeJudge(colours={RED: {"violence": 0.9}}, refine=lambda p: p.replace("red", "blue"))
    judge.fail(BackendError("judge down"), times=2)  # both previews of round 1
    backend = PreviewingFake()
    engine, _ = engine_with(backend, judge)
    outcome, trace = await run(engine, "a red apple")
    assert backend.stopped == []
    assert trace.rounds[0].previews == []  # not judged: recorded nowhere
    # The final red image was judged as always, and refined.
    assert trace.rounds[0].images[0].flagged == ["violence"]
    assert outcome.images[0].decision == "edited"


async def test_with_the_guard_off_nothing_is_previewed() -> None:
    backend = PreviewingFake()
    engine, metrics = engine_with(backend, enabled=False)
    outcome, trace = await run(engine, "a red apple")
    assert backend.plain == 1 and len(outcome.images) == 1
    assert all(r.previews == [] for r in trace.rounds)


# --- the diffusers backend --------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_diffusers import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd-previews"))


def diffusers_backend(path: Path, **options: Any) -> Any:
    return build_backend("sd", {"kind": "diffusers", "model": str(path), **options})


async def test_diffusers_an_unsafe_preview_interrupts_the_pipeline(tiny_sd: Path) -> None:
    backend = diffusers_backend(tiny_sd, steps=50, preview_steps=[2])
    await backend.start()
    unet_calls: list[int] = []
    hook = backend._pipes["text2image"].unet.register_forward_hook(
        lambda *args: unet_calls.append(1))
    shown: list[tuple[int, int, tuple[int, int]]] = []

    async def unsafe(preview: Preview) -> PreviewAction:
        shown.append((preview.index, preview.step,
                      Image.open(io.BytesIO(preview.image.data)).size))
        return "stop"

    try:
        images = await backend.generate_previewed(
            GenerationCall(prompt="a red cat", n=1, size="64x64"), unsafe)
    finally:
        hook.remove()
    assert images == [None]
    assert shown == [(0, 2, (64, 64))]
    assert 2 <= len(unet_calls) < 50  # interrupted a step or so after the preview's verdict
    await backend.aclose()


@pytest.mark.parametrize("decoder", ["vae", "approx"])
async def test_diffusers_safe_previews_let_every_image_finish(tiny_sd: Path, decoder: str) -> None:
    backend = diffusers_backend(tiny_sd, steps=3, preview_steps=[1, 2, 9], max_batch=2,
                                preview_decoder=decoder)
    shown: list[tuple[int, int]] = []

    async def safe(preview: Preview) -> PreviewAction:
        preview.image.validate()
        shown.append((preview.index, preview.step))
        return "continue"

    images = await backend.generate_previewed(
        GenerationCall(prompt="a blue house", n=3, size="64x64"), safe)
    assert all(image is not None for image in images) and len(images) == 3
    assert sorted(shown) == [(0, 1), (0, 2), (1, 1), (1, 2), (2, 1), (2, 2)]
    assert backend.shows_previews(GenerationCall(prompt="x", n=1))
    await backend.aclose()


async def test_diffusers_through_the_engine_an_unsafe_preview_is_stopped_and_refined(
        tiny_sd: Path) -> None:
    backend = diffusers_backend(tiny_sd, steps=30, preview_steps=[1])
    # The judge finds `cat` violent in whatever it looks at (a preview included): the tiny
    # model's random images say nothing, the prompt says it all.
    judge = FakeJudge(words={"cat": {"violence": 0.9}}, refine=lambda p: p.replace("cat", "dog"))
    engine, metrics = engine_with(backend, judge)
    unet_calls: list[int] = []
    await backend.start()
    hook = backend._pipes["text2image"].unet.register_forward_hook(
        lambda *args: unet_calls.append(1))
    try:
        outcome, trace = await run(engine, "a photo of a cat")
    finally:
        hook.remove()
    assert [(f.decision, f.prompt) for f in outcome.images] == [("edited", "a photo of a dog")]
    first, second = [r for r in trace.rounds if r.kind == "generate"]
    assert [(p.step, p.stopped) for p in first.previews] == [(1, True)]
    assert [(p.step, p.stopped) for p in second.previews] == [(1, False)]
    assert len(unet_calls) < 30 + 30  # round 1 was interrupted; round 2 ran its 30 steps
    await backend.aclose()


# --- through the proxy, with the openai SDK ---------------------------------------------------

def test_proxy_cancels_an_unsafe_partial_and_returns_the_refined_image(  # type: ignore[no-untyped-def]
        proxy, tmp_path, stream_server) -> None:
    server, url = stream_server
    server.gap_s = 0.2
    write_policy(tmp_path, E2E_POLICY)
    base = proxy(policy="e2e", backends={"fake": {
        "kind": "openai-compatible", "api_base": url, "timeout_s": 5, "partial_images": 2}})
    client = openai.OpenAI(base_url=base + "/v1", api_key=CLIENT_KEY, max_retries=0)
    raw = client.images.with_raw_response.generate(prompt="a street at night MARKRED",
                                                   model="gpt-image-1")
    result = raw.parse()
    assert result.data and result.data[0].revised_prompt == (
        "a street at night MARKRED, calm and peaceful")
    picture = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json or "")))
    assert picture.convert("RGB").getpixel((0, 0)) == COLOURS["blue"]
    # Round 1's stream was closed at its first (red) partial; round 2's ran to its end.
    assert [r["prompt"] for r in server.streamed()] == [
        "a street at night MARKRED", "a street at night MARKRED, calm and peaceful"]
    asyncio.run(wait_for(lambda: server.closed_early == [0]))
    assert server.completed == [1]
    trace = httpx.get(f"{base}/v1/guard/traces/{raw.headers['x-guard-trace-id']}",
                      headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()
    made = [r for r in trace["rounds"] if r["kind"] == "generate"]
    assert [(p["step"], p["flagged"], p["stopped"]) for p in made[0]["previews"]] == [
        (0, ["violence"], True)]
    assert made[0]["images"][0]["image_sha256"] == made[0]["previews"][0]["image_sha256"]
    assert [(p["step"], p["stopped"]) for p in made[1]["previews"]] == [(0, False), (1, False)]
    assert trace["decision"] == "edited"
    metrics = httpx.get(base + "/metrics").text
    assert 'guard_previews_total{backend="fake",outcome="stopped"} 1.0' in metrics
    # The auditors' page says so too.
    with httpx.Client(base_url=base) as browser:
        form = browser.get("/guard/login").text
        token = re.search(r'name="csrf" value="([^"]+)"', form)
        assert token is not None
        browser.post("/guard/login", data={"key": AUDITOR_KEY, "csrf": token[1]})
        page = browser.get(f"/guard/traces/{trace['id']}").text
    assert "preview 0: edit (violence), generation stopped here" in page
