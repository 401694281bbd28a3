"""The hosted judges and backends against the services' own specs: what they may send (each
service's documented image and text limits, fitted before upload), what they read back (every
answer capped at `max_response_bytes`, read as a stream and never whole), and Rekognition's
taxonomy versions through botocore's own Stubber, which checks each answer against the service
model."""

from __future__ import annotations

import asyncio
import io
import random
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest
from botocore.stub import ANY, Stubber
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from adapters.moderation.aws_rekognition import AwsRekognitionJudge
from adapters.moderation.azure_content_safety import AzureContentSafetyJudge
from adapters.moderation.base import prepare_image
from adapters.moderation.google_safesearch import GoogleSafeSearchJudge
from adapters.moderation.openai_moderation import OpenAIModerationJudge
from adapters.openai_compat import OpenAICompatBackend
from guard.core.policy import Policy
from guard.core.types import GeneratedImage, GenerationCall, JudgeInput, Verdict
from guard.plugins import build_judge
from guard.support.errors import BackendError, JudgeError
from tests.conftest import ADMIN_KEY, CLIENT_KEY, E2E_POLICY, write_policy
from tests.servers import serve

POLICY = Policy.model_validate({"id": "t", "version": 1, "categories": {
    "sexual": {"threshold": 0.5, "action": "refuse"},
    "violence": {"threshold": 0.5, "action": "edit"},
    "illegal_activity": {"threshold": 0.6, "action": "edit"}}})
CHUNK = b"x" * 65_536


def png(size: tuple[int, int], noise: bool = False, fmt: str = "PNG") -> bytes:
    if noise:  # incompressible: a PNG of many megabytes
        im = Image.frombytes("RGB", size, random.Random(7).randbytes(size[0] * size[1] * 3))
    else:
        im = Image.new("RGB", size, (200, 30, 30))
    out = io.BytesIO()
    im.save(out, format=fmt)
    return out.getvalue()


def image_item(data: bytes, prompt: str = "a lighthouse at dawn") -> JudgeInput:
    return JudgeInput(prompt=prompt, original_prompt=prompt,
                      image=GeneratedImage(data=data, media_type="image/png"))


def image_coverage(verdict: Verdict, category: str) -> list[str]:
    return verdict.coverage(POLICY.categories, image=True)[category]


# --- the services' image limits, fitted before upload --------------------------------------------

@pytest.mark.parametrize("judge, size, expect", [
    (AzureContentSafetyJudge, (30, 40), (50, 67)),          # upscaled to 50 px a side
    (AzureContentSafetyJudge, (4096, 1024), (2048, 512)),   # downscaled to 2048
    (AwsRekognitionJudge, (40, 60), (80, 120)),             # Rekognition: 80 px at least
    (AwsRekognitionJudge, (100, 100), (100, 100)),          # fits: sent as it is
])
def test_images_are_scaled_into_each_services_sides(judge: Any, size: tuple[int, int],
                                                    expect: tuple[int, int]) -> None:
    data = png(size)
    fitted = prepare_image(GeneratedImage(data=data), judge.image_limits)
    with Image.open(io.BytesIO(fitted.data)) as im:
        assert im.size == expect
    if size == expect:
        assert fitted.data == data and not fitted.done
    else:
        assert fitted.done["from"]["size"] == list(size)
        assert fitted.done["to"]["size"] == list(expect)
        assert fitted.media_type == "image/jpeg" and fitted.done["why"]


def test_an_image_over_a_services_byte_limit_is_reencoded_under_it() -> None:
    data = png((1400, 1400), noise=True)  # ~5.9 MB of noise
    limits = AwsRekognitionJudge.image_limits
    assert len(data) > limits.max_bytes
    fitted = prepare_image(GeneratedImage(data=data), limits)
    assert len(fitted.data) <= limits.max_bytes and fitted.data[:2] == b"\xff\xd8"
    assert fitted.done["why"] == [f"over {limits.max_bytes} bytes"]
    assert fitted.done["to"]["bytes"] == len(fitted.data)
    # Azure's 4 MB at once; Google's 7 MB of JSON-safe bytes takes it as it is
    assert len(prepare_image(GeneratedImage(data=data),
                             AzureContentSafetyJudge.image_limits).data) <= 4_000_000
    assert prepare_image(GeneratedImage(data=data),
                         GoogleSafeSearchJudge.image_limits).data == data


def test_a_format_a_service_does_not_take_is_reencoded() -> None:
    webp = png((120, 90), fmt="WEBP")
    aws = prepare_image(GeneratedImage(data=webp), AwsRekognitionJudge.image_limits)
    assert aws.media_type == "image/jpeg" and aws.done["why"] == ["image/webp not taken"]
    openai = prepare_image(GeneratedImage(data=webp), OpenAIModerationJudge.image_limits)
    assert openai.data == webp and openai.media_type == "image/webp"


class AzureText:
    """Content Safety's text:analyze: refuses text over 10,000 characters, as the service does;
    'knife' is Violence severity 4, anything else 0."""

    def __init__(self) -> None:
        self.lengths: list[int] = []
        self.texts: list[str] = []

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/contentsafety/text:analyze", self.analyze,
                                       methods=["POST"])])

    async def analyze(self, request: Request) -> Response:
        text = (await request.json())["text"]
        self.lengths.append(len(text))
        self.texts.append(text)
        if len(text) > 10_000:
            return JSONResponse({"error": {"code": "InvalidRequestBody",
                                           "message": "text too long"}}, status_code=400)
        return JSONResponse({"blocklistsMatch": [], "categoriesAnalysis": [
            {"category": "Hate", "severity": 0}, {"category": "SelfHarm", "severity": 0},
            {"category": "Sexual", "severity": 0},
            {"category": "Violence", "severity": 4 if "knife" in text else 0}]})


async def test_a_prompt_over_azures_text_limit_is_analysed_in_pieces() -> None:
    service = AzureText()
    prompt = ("a quiet harbour at dawn " * 1200) + "a knife on the table"  # ~28,800 chars
    with serve(service.app()) as url:
        judge = build_judge({"kind": "azure-content-safety", "endpoint": url, "retries": 0})
        try:
            [verdict] = await judge.judge(
                [JudgeInput(prompt=prompt, original_prompt=prompt)], POLICY)
        finally:
            await judge.aclose()
    assert len(service.lengths) == 3 and max(service.lengths) <= 10_000
    assert "".join(service.texts) == prompt  # nothing dropped, nothing sent twice
    assert verdict.scores["violence"] == pytest.approx(4 / 6)  # the last piece's knife
    assert verdict.details["text_pieces"] == 3


# --- Rekognition: taxonomy versions, through botocore's Stubber ---------------------------------

def label(name: str, parent: str, confidence: float, level: int) -> dict[str, Any]:
    return {"Name": name, "ParentName": parent, "Confidence": confidence, "TaxonomyLevel": level}


@pytest.fixture
def rekognition(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("STUB_AWS_ID", "AKIASTUBBEDKEY000001")
    monkeypatch.setenv("STUB_AWS_SECRET", "stubbed/secret/0123456789")

    def make(**options: Any) -> tuple[AwsRekognitionJudge, Stubber]:
        judge = AwsRekognitionJudge.from_config({
            "region": "eu-west-1", "access_key_id_env": "STUB_AWS_ID",
            "secret_access_key_env": "STUB_AWS_SECRET", "retries": 0, **options})
        stubber = Stubber(judge._rekognition)
        stubber.activate()
        made.append((judge, stubber))
        return judge, stubber

    made: list[tuple[AwsRekognitionJudge, Stubber]] = []
    yield make
    for judge, stubber in made:
        stubber.deactivate()
        asyncio.run(judge.aclose())


async def test_rekognition_model_7_flags_drugs_as_illegal_activity(rekognition: Any) -> None:
    judge, stubber = rekognition()
    stubber.add_response("detect_moderation_labels", {
        "ModerationLabels": [label("Pills", "Products", 93.0, 3),
                             label("Products", "Drugs & Tobacco", 91.0, 2),
                             label("Drugs & Tobacco", "", 91.0, 1)],
        "ModerationModelVersion": "7.0",
        "ContentTypes": [{"Confidence": 99.0, "Name": "Illustrated"}]},
        {"Image": {"Bytes": ANY}, "MinConfidence": 10.0})
    stubber.add_response("detect_moderation_labels", {
        "ModerationLabels": [], "ModerationModelVersion": "7.0"},
        {"Image": {"Bytes": ANY}, "MinConfidence": 10.0})
    pills, clean = await judge.judge([image_item(png((120, 120))),
                                      image_item(png((120, 120)))], POLICY)
    stubber.assert_no_pending_responses()
    assert pills.scores["illegal_activity"] == pytest.approx(0.93)
    assert POLICY.decide(pills.scores).action == "edit"
    assert pills.details["taxonomy"] == "7"
    # nothing found on a model 7 image: every mapped category was assessed, at 0
    assert clean.scores == {"sexual": 0.0, "violence": 0.0, "illegal_activity": 0.0}
    assert "image" in image_coverage(clean, "illegal_activity")


async def test_a_mapped_label_the_answers_taxonomy_lacks_is_unassessed(rekognition: Any
                                                                     ) -> None:
    # an operator's map from model 6 days: `Drugs` is no label of model 7
    judge, stubber = rekognition(categories={
        "Drugs & Tobacco": None, "Products": None, "Pills": None,
        "Drugs & Tobacco Paraphernalia & Use": None})
    for version in ("7.0", "6.1"):
        stubber.add_response("detect_moderation_labels", {
            "ModerationLabels": [], "ModerationModelVersion": version},
            {"Image": {"Bytes": ANY}, "MinConfidence": 10.0})
    v7, v6 = [(await judge.judge([image_item(png((100, 100)))], POLICY))[0]
              for _ in range(2)]
    assert "illegal_activity" in v7.details["unassessed"]
    assert "image" not in image_coverage(v7, "illegal_activity")
    assert "image" in image_coverage(v7, "violence")  # `Violence` is a model 7 label
    # model 6 has `Drugs`: assessed, nothing found
    assert v6.details["taxonomy"] == "6" and "illegal_activity" not in v6.details["unassessed"]
    assert v6.scores["illegal_activity"] == 0.0
    # and said without a call: today's model (7) cannot produce `Drugs`
    assert not judge.coverage(POLICY).get("illegal_activity")
    assert judge.coverage(POLICY)["violence"] == {"image"}


async def test_a_model_version_not_known_here_is_read_as_the_latest(rekognition: Any) -> None:
    judge, stubber = rekognition()
    stubber.add_response("detect_moderation_labels", {
        "ModerationLabels": [label("Drugs & Tobacco Paraphernalia & Use", "Drugs & Tobacco",
                                   88.0, 2)],
        "ModerationModelVersion": "8.0"}, {"Image": {"Bytes": ANY}, "MinConfidence": 10.0})
    [verdict] = await judge.judge([image_item(png((90, 90)))], POLICY)
    assert verdict.details["taxonomy"] == "7 (assumed for model 8.0)"
    assert verdict.scores["illegal_activity"] == pytest.approx(0.88)


async def test_rekognition_gets_an_image_it_takes(rekognition: Any) -> None:
    judge, stubber = rekognition()
    sent: list[bytes] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        sent.append(params["Image"]["Bytes"])

    judge._rekognition.meta.events.register("provide-client-params.rekognition.*", record)
    stubber.add_response("detect_moderation_labels", {"ModerationLabels": [],
                                                      "ModerationModelVersion": "7.0"},
                         {"Image": {"Bytes": ANY}, "MinConfidence": 10.0})
    [verdict] = await judge.judge([image_item(png((40, 30), fmt="WEBP"))], POLICY)
    with Image.open(io.BytesIO(sent[0])) as im:
        assert im.format == "JPEG" and min(im.size) == 80
    assert verdict.details["upload"]["why"] == ["image/webp not taken", "smaller than 80 px"]


# --- every answer capped: max_response_bytes ----------------------------------------------------

class Endless:
    """Answers every POST with a body that never ends (or one far over its Content-Length)."""

    def __init__(self) -> None:
        self.sent = 0

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/{path:path}", self.endless, methods=["POST"]),
            Route("/declared/v1/{path:path}", self.declared, methods=["POST"]),
            Route("/contentsafety/{path:path}", self.endless, methods=["POST"])])

    async def endless(self, request: Request) -> Response:
        await request.body()

        async def body() -> AsyncIterator[bytes]:
            while True:
                self.sent += len(CHUNK)
                yield CHUNK
                await asyncio.sleep(0)

        return StreamingResponse(body(), media_type="application/json")

    async def declared(self, request: Request) -> Response:
        await request.body()
        return Response(b"{" + b" " * (4 << 20) + b"}", media_type="application/json")


@pytest.fixture(scope="module")
def endless() -> Iterator[tuple[Endless, str]]:
    service = Endless()
    with serve(service.app()) as url:
        yield service, url


CAP = 1 << 20


@pytest.mark.parametrize("section", [
    {"kind": "openai-moderation", "api_base": "{url}/v1"},
    {"kind": "azure-content-safety", "endpoint": "{url}"},
    {"kind": "google-safesearch", "api_base": "{url}/v1"},
    {"kind": "remote", "model": "judge", "api_base": "{url}/v1", "logprobs": False},
    {"kind": "openai-moderation", "api_base": "{url}/declared/v1"},
])
async def test_a_judge_stops_reading_an_answer_at_its_cap(endless: tuple[Endless, str],
                                                          section: dict[str, Any]) -> None:
    service, url = endless
    service.sent = 0
    options = {k: v.format(url=url) if isinstance(v, str) else v for k, v in section.items()}
    judge = build_judge({**options, "retries": 2, "timeout_s": 10,
                         "max_response_bytes": CAP})
    t0 = time.monotonic()
    try:
        with pytest.raises(JudgeError, match=r"more than max_response_bytes \(1048576 bytes\)"):
            await judge.judge([image_item(png((100, 100)))], POLICY)
    finally:
        await judge.aclose()
    assert time.monotonic() - t0 < 8  # not retried, not read on
    # what the server wrote before the judge hung up: the cap, and what sockets buffer
    assert service.sent < 16 * CAP


async def test_the_judges_default_cap_is_8_mib() -> None:
    judge = build_judge({"kind": "openai-moderation"})
    remote = build_judge({"kind": "remote", "model": "m", "api_base": "http://127.0.0.1:9/v1"})
    try:
        assert judge.options.max_response_bytes == 8 << 20  # type: ignore[attr-defined]
        assert remote.options.max_response_bytes == 8 << 20  # type: ignore[attr-defined]
    finally:
        await judge.aclose()
        await remote.aclose()


@pytest.mark.parametrize("partial_images", [0, 1])
async def test_a_backend_stops_reading_an_answer_at_its_cap(endless: tuple[Endless, str],
                                                            partial_images: int) -> None:
    service, url = endless
    service.sent = 0
    backend = OpenAICompatBackend.from_config("sd", {
        "api_base": f"{url}/v1", "max_response_bytes": CAP,
        "partial_images": partial_images})
    assert OpenAICompatBackend.from_config("sd", {"api_base": url}).options \
        .max_response_bytes == 256 << 20
    call = GenerationCall(prompt="a lighthouse", n=1)
    try:
        with pytest.raises(BackendError, match="max_response_bytes") as err:
            if partial_images:
                async def shown(preview: Any) -> None:
                    return None
                await backend.generate_previewed(call, shown)
            else:
                await backend.generate(call)
    finally:
        await backend.aclose()
    assert err.value.code == "backend_bad_response"
    assert service.sent < 16 * CAP


async def test_the_litellm_backend_stops_reading_an_openai_answer_at_its_cap(
        endless: tuple[Endless, str]) -> None:
    from adapters.litellm_backend import LiteLLMBackend

    service, url = endless
    service.sent = 0
    backend = LiteLLMBackend.from_config("lite", {
        "model": "openai/img", "api_base": f"{url}/v1", "max_response_bytes": CAP,
        "retry": {"attempts": 1}})
    try:
        with pytest.raises(BackendError, match="max_response_bytes") as err:
            await backend.generate(GenerationCall(prompt="a lighthouse", n=1))
    finally:
        await backend.aclose()
    assert err.value.code == "backend_bad_response"
    assert service.sent < 16 * CAP


def test_the_proxy_fails_a_call_whose_answer_is_too_large(
        proxy: Any, tmp_path: Any, endless: tuple[Endless, str]) -> None:
    """Through the proxy and the openai SDK: a backend, then a judge, answering without end."""
    _, url = endless
    write_policy(tmp_path, E2E_POLICY)
    client_of = lambda base: openai.OpenAI(base_url=base + "/v1", api_key=CLIENT_KEY,  # noqa: E731
                                           max_retries=0)
    backend = proxy(policy="e2e", backends={"big": {
        "kind": "openai-compatible", "api_base": f"{url}/v1", "max_response_bytes": CAP,
        "timeout_s": 10}}, routes={"*": {"backend": "big"}})
    judge = proxy(policy="e2e", judge={"kind": "openai-moderation", "api_base": f"{url}/v1",
                                       "max_response_bytes": CAP, "retries": 0})
    for base, status, code in ((backend, 502, "backend_bad_response"),
                               (judge, 503, "judge_unavailable")):
        with pytest.raises(openai.APIStatusError) as err:
            client_of(base).images.generate(prompt="a lighthouse at dawn")
        assert err.value.status_code == status, err.value.body
        trace_id = err.value.response.headers["x-guard-trace-id"]
        r = httpx.get(f"{base}/v1/guard/traces/{trace_id}",
                      headers={"authorization": f"Bearer {ADMIN_KEY}"})
        assert r.status_code == 200 and r.json()["decision"] == "failed"
        assert "max_response_bytes (1048576 bytes)" in r.text  # the trace says why
        if code == "backend_bad_response":
            assert err.value.code == code
