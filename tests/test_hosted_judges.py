"""The hosted moderation judges against a real local server that speaks each service's API.

One Starlette app on uvicorn plays OpenAI's /v1/moderations, Azure Content Safety's
image:analyze and text:analyze, Cloud Vision's images:annotate and Rekognition's
DetectModerationLabels (AWS JSON 1.1, reached through boto3). It checks what it is sent (the key
where each service wants it, the documented body) and reads the image it receives: the share of
red pixels is its violence, the share of green its sexual content, so the scores a judge reports
can only come from the service's answer, mapped the way the docs say. It fails on request the
way the services fail: 400, 401, 429 with Retry-After, 5xx, and by not answering in time.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from adapters.moderation.azure_content_safety import severity_score
from adapters.moderation.base import Reading, to_policy
from guard.core.policy import Policy
from guard.core.types import GeneratedImage, JudgeInput
from guard.http.errors import status_of
from guard.plugins import build_judge
from guard.support.errors import ConfigError, JudgeError
from tests.conftest import ADMIN_KEY, CLIENT_KEY, write_policy
from tests.servers import serve

KEY = "sk-hosted-moderation-secret-0123"
AWS_KEY_ID = "AKIAHOSTEDTESTKEY123"
AWS_SECRET = "hosted/aws/secret/key/for/tests/0123456789"
KINDS = ("openai-moderation", "azure-content-safety", "google-safesearch", "aws-rekognition")
POLICY = Policy.model_validate({"id": "t", "version": 1, "categories": {
    "sexual": {"threshold": 0.5, "action": "refuse"},
    "violence": {"threshold": 0.5, "action": "edit"},
    "shocking": {"threshold": 0.7, "action": "edit"},
    "hate": {"threshold": 0.5, "action": "refuse"}}})


# --- the services ------------------------------------------------------------------------------

def picture(red: float = 0.0, green: float = 0.0, size: tuple[int, int] = (64, 64),
            fmt: str = "PNG") -> bytes:
    """Columns of red, then green, then blue, in the given shares."""
    w, h = size
    im = Image.new("RGB", size, (30, 60, 200))
    r, g = round(w * red), round(w * green)
    if r:
        im.paste((255, 0, 0), (0, 0, r, h))
    if g:
        im.paste((0, 255, 0), (r, 0, r + g, h))
    out = io.BytesIO()
    im.save(out, format=fmt)
    return out.getvalue()


def item(image: bytes | None = None, prompt: str = "a knight", media: str = "image/png"
         ) -> JudgeInput:
    return JudgeInput(prompt=prompt, original_prompt=prompt,
                      image=GeneratedImage(data=image, media_type=media) if image else None)


def likelihood(share: float) -> str:
    return ["VERY_UNLIKELY", "UNLIKELY", "POSSIBLE", "LIKELY", "VERY_LIKELY"][round(4 * share)]


@dataclass
class Seen:
    service: str
    headers: dict[str, str]
    url: str
    body: dict[str, Any]
    image: bytes | None = None

    @property
    def image_size(self) -> tuple[int, int]:
        assert self.image is not None
        with Image.open(io.BytesIO(self.image)) as im:
            return im.size


@dataclass
class Services:
    fail: str | None = None      # 400 | 401 | 429 | 500 | slow | google-error
    fail_times: int = 1_000      # fail this many requests, then answer
    retry_after: str = "0"
    delay_s: float = 0.0
    azure_drop: tuple[str, ...] = ()      # categories Azure leaves out of its answer
    azure_extra: tuple[dict[str, Any], ...] = ()
    seen: list[Seen] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0

    def reset(self) -> None:
        """A fresh plan for the next test (the server lives for the whole module)."""
        self.__dict__.update(Services().__dict__)

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/moderations", self.openai, methods=["POST"]),
            Route("/contentsafety/{what}", self.azure, methods=["POST"]),
            Route("/v1/images:annotate", self.google, methods=["POST"]),
            Route("/", self.aws, methods=["POST"]),
        ])

    # what every service does first: record, then fail as planned or take its time

    async def _receive(self, request: Request, service: str, image_b64: Any) -> Seen:
        body = json.loads(await request.body())
        image = base64.b64decode(image_b64(body)) if image_b64(body) else None
        seen = Seen(service, dict(request.headers), str(request.url), body, image)
        self.seen.append(seen)
        return seen

    async def _failure(self, service: str, authorized: bool, echo: str) -> Response | None:
        if not authorized:
            return self._error(service, 401, f"Incorrect API key provided: {echo}")
        if self.fail and len(self.seen) <= self.fail_times:
            if self.fail == "slow":  # answers only after the client gave up
                await asyncio.sleep(2.0)
                return self._error(service, 500, "too late")
            if self.fail == "google-error" and service == "google":
                return JSONResponse({"responses": [{"error": {
                    "code": 3, "message": "Bad image data."}}]})
            return self._error(service, int(self.fail), f"failure for key {echo}")
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight -= 1
        return None

    def _error(self, service: str, status: int, message: str) -> Response:
        headers = {"retry-after": self.retry_after} if status == 429 else {}
        if service == "aws":
            kind = {400: "InvalidParameterException", 401: "UnrecognizedClientException",
                    429: "ThrottlingException", 500: "InternalServerError"}[status]
            return Response(json.dumps({"__type": kind, "message": message}),
                            status if status == 500 else 400,
                            media_type="application/x-amz-json-1.1")
        return JSONResponse({"error": {"code": str(status), "message": message}}, status,
                            headers=headers)

    # the four APIs

    async def openai(self, request: Request) -> Response:
        seen = await self._receive(request, "openai", lambda b: next(
            (p["image_url"]["url"].split(",", 1)[1] for p in b["input"]
             if p["type"] == "image_url"), None))
        auth = request.headers.get("authorization", "")
        if failed := await self._failure("openai", auth == f"Bearer {KEY}", auth):
            return failed
        text = " ".join(p["text"] for p in seen.body["input"] if p["type"] == "text")
        red, green = shares(seen.image)
        has_image, has_text = seen.image is not None, bool(text)
        both = ["text"] * has_text + ["image"] * has_image
        only_text = ["text"] * has_text
        scores = {"harassment": 0.01, "harassment/threatening": 0.0,
                  "hate": 0.9 if "hateword" in text else 0.02, "hate/threatening": 0.0,
                  "illicit": 0.03, "illicit/violent": 0.0, "self-harm": 0.0,
                  "self-harm/intent": 0.0, "self-harm/instructions": 0.0, "sexual": green,
                  "sexual/minors": 0.0, "violence": 0.6 * red, "violence/graphic": 0.8 * red}
        image_kinds = {"self-harm", "self-harm/intent", "self-harm/instructions", "sexual",
                       "violence", "violence/graphic"}
        applied = {k: both if k in image_kinds else only_text for k in scores}
        return JSONResponse({"id": "modr-1", "model": seen.body["model"], "results": [{
            "flagged": any(v > 0.5 for v in scores.values()),
            "categories": {k: v > 0.5 for k, v in scores.items()},
            "category_scores": scores, "category_applied_input_types": applied}]})

    async def azure(self, request: Request) -> Response:
        seen = await self._receive(request, "azure", lambda b: (b.get("image") or {}).get(
            "content"))
        key = request.headers.get("ocp-apim-subscription-key", "")
        if failed := await self._failure("azure", key == KEY, key):
            return failed
        what = request.path_params["what"]
        assert request.query_params["api-version"] == "2024-09-01"
        assert seen.body["outputType"] == "FourSeverityLevels"
        if what == "image:analyze":
            red, green = shares(seen.image)
            found = {"Hate": 0, "SelfHarm": 0, "Sexual": severity(green),
                     "Violence": severity(red)}
        elif what == "text:analyze":
            found = {"Hate": 4 if "hateword" in seen.body["text"] else 0, "SelfHarm": 0,
                     "Sexual": 0, "Violence": 0}
        else:
            return JSONResponse({"error": {"code": "NotFound"}}, 404)
        analysis = [{"category": k, "severity": v} for k, v in found.items()
                    if k not in self.azure_drop]
        return JSONResponse({"categoriesAnalysis": analysis + list(self.azure_extra),
                             **({"blocklistsMatch": []} if what == "text:analyze" else {})})

    async def google(self, request: Request) -> Response:
        seen = await self._receive(request, "google", lambda b: b["requests"][0]["image"][
            "content"])
        key = request.headers.get("x-goog-api-key", "")
        if failed := await self._failure("google", key == KEY, key):
            return failed
        assert seen.body["requests"][0]["features"] == [{"type": "SAFE_SEARCH_DETECTION"}]
        red, green = shares(seen.image)
        return JSONResponse({"responses": [{"safeSearchAnnotation": {
            "adult": likelihood(green), "spoof": "VERY_UNLIKELY", "medical": "UNKNOWN",
            "violence": likelihood(red), "racy": "POSSIBLE"}}]})

    async def aws(self, request: Request) -> Response:
        seen = await self._receive(request, "aws", lambda b: b["Image"]["Bytes"])
        auth = request.headers.get("authorization", "")
        if failed := await self._failure(
                "aws", auth.startswith(f"AWS4-HMAC-SHA256 Credential={AWS_KEY_ID}/"), auth):
            return failed
        assert request.headers["x-amz-target"] == "RekognitionService.DetectModerationLabels"
        assert request.headers["content-type"] == "application/x-amz-json-1.1"
        red, green = shares(seen.image)
        labels = [{"Name": "Gambling", "ParentName": "", "Confidence": 55.0,
                   "TaxonomyLevel": 1}]
        if red:
            labels += [
                {"Name": "Violence", "ParentName": "", "Confidence": 100 * red,
                 "TaxonomyLevel": 1},
                {"Name": "Graphic Violence", "ParentName": "Violence", "Confidence": 90 * red,
                 "TaxonomyLevel": 2},
                {"Name": "Weapon Violence", "ParentName": "Graphic Violence",
                 "Confidence": 95 * red, "TaxonomyLevel": 3}]
        if green:  # a level 3 label alone: its parent maps it
            labels.append({"Name": "Exposed Male Genitalia", "ParentName": "Explicit Nudity",
                           "Confidence": 100 * green, "TaxonomyLevel": 3})
        floor = seen.body.get("MinConfidence", 50)
        return Response(json.dumps({
            "ModerationLabels": [x for x in labels if x["Confidence"] >= floor],
            "ModerationModelVersion": "7.0"}), media_type="application/x-amz-json-1.1")


def shares(image: bytes | None) -> tuple[float, float]:
    if image is None:
        return 0.0, 0.0
    with Image.open(io.BytesIO(image)) as im:
        pixels = list(im.convert("RGB").getdata())
    red = sum(1 for r, g, b in pixels if r > 200 and g < 60 and b < 60)
    green = sum(1 for r, g, b in pixels if g > 200 and r < 60 and b < 60)
    return red / len(pixels), green / len(pixels)


def severity(share: float) -> int:
    return min(6, 2 * round(3 * share))


@pytest.fixture(scope="module")
def service_url() -> Iterator[tuple[Services, str]]:
    services = Services()
    with serve(services.app()) as url:
        yield services, url


@pytest.fixture
def services(service_url: tuple[Services, str], monkeypatch: pytest.MonkeyPatch
             ) -> tuple[Services, str]:
    state, url = service_url
    state.reset()
    monkeypatch.setenv("MOD_KEY", KEY)
    monkeypatch.setenv("MOD_AWS_ID", AWS_KEY_ID)
    monkeypatch.setenv("MOD_AWS_SECRET", AWS_SECRET)
    return state, url


def section(kind: str, url: str, **options: Any) -> dict[str, Any]:
    """The judge section a config would hold for `kind`, pointed at the local server."""
    where: dict[str, Any] = {
        "openai-moderation": {"api_base": url + "/v1", "api_key_env": "MOD_KEY"},
        "azure-content-safety": {"endpoint": url, "api_key_env": "MOD_KEY"},
        "google-safesearch": {"api_base": url + "/v1", "api_key_env": "MOD_KEY"},
        "aws-rekognition": {"endpoint": url, "region": "eu-west-1",
                            "access_key_id_env": "MOD_AWS_ID",
                            "secret_access_key_env": "MOD_AWS_SECRET"},
    }[kind]
    return {"kind": kind, **where, "timeout_s": 5, "backoff_s": 0.01, **options}


async def judge_with(kind: str, url: str, items: list[JudgeInput], policy: Policy = POLICY,
                     **options: Any) -> list[Any]:
    judge = build_judge(section(kind, url, **options))
    try:
        return await judge.judge(items, policy)
    finally:
        await judge.aclose()


# --- mapping: pure, literal cases ---------------------------------------------------------------

def test_a_policy_category_takes_the_max_and_unknown_service_categories_are_kept() -> None:
    reading = Reading({"violence": 0.3, "violence/graphic": 0.8, "spam": 0.4},
                      frozenset({"violence", "violence/graphic", "spam"}))
    mapping = {"violence": ("violence",), "violence/graphic": ("violence", "shocking")}
    scores, details, on = to_policy(reading, mapping, ["violence", "shocking"])
    assert scores == {"violence": 0.8, "shocking": 0.8}
    assert details == {"unmapped": {"spam": 0.4}, "unassessed": []}
    assert on == {"violence": ["text"], "shocking": ["text"]}


def test_a_verdict_reports_only_what_the_service_assessed() -> None:
    # an image: violence read on it, hate on the prompt beside it only, sexual not read at all
    reading = Reading({"hate": 0.2, "violence": 0.1, "sexual": 0.7}, frozenset({"violence"}),
                      also_text=frozenset({"hate"}))
    mapping = {"hate": ("hate",), "violence": ("violence",), "sexual": ("sexual",)}
    scores, details, on = to_policy(reading, mapping, ["hate", "violence", "sexual"],
                                    image=True)
    assert scores == {"hate": 0.2, "violence": 0.1}  # a number for nothing assessed: no score
    assert on == {"hate": ["text"], "violence": ["image"]}
    assert details["unassessed"] == ["hate", "sexual"]  # not assessed on the image itself


def test_an_assessed_category_with_nothing_reported_scores_zero() -> None:
    scores, details, on = to_policy(Reading({}, frozenset({"Explicit"})),
                                    {"Explicit": ("sexual",), "Gambling": ()}, ["sexual"],
                                    image=True)
    assert scores == {"sexual": 0.0} and details["unassessed"] == []
    assert on == {"sexual": ["image"]}


def test_azure_severity_reads_as_a_threshold() -> None:
    assert [round(severity_score(s), 3) for s in (0, 2, 4, 6, 7)] == [0.0, 0.333, 0.667, 1.0,
                                                                       1.0]


# --- each service ---------------------------------------------------------------------------

async def test_openai_sends_prompt_and_image_and_reads_only_what_it_applied_to_the_image(
        services: tuple[Services, str]) -> None:
    state, url = services
    png = picture(red=1.0)
    [verdict] = await judge_with("openai-moderation", url, [item(png, "a hateword poster")],
                                 categories={"illicit": None})
    [seen] = state.seen
    assert seen.headers["authorization"] == f"Bearer {KEY}"
    assert seen.body["model"] == "omni-moderation-latest"
    assert seen.body["input"][0] == {"type": "text", "text": "a hateword poster"}
    assert seen.body["input"][1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert seen.image == png  # small enough: sent as it is
    # violence: max(0.6 violence, 0.8 violence/graphic); shocking from violence/graphic
    assert verdict.scores["violence"] == pytest.approx(0.8)
    assert verdict.scores["shocking"] == pytest.approx(0.8)
    assert verdict.scores["sexual"] == 0.0
    # hate was applied to the prompt beside the image only: assessed on the text, not the image
    assert verdict.scores["hate"] == pytest.approx(0.9)
    assert verdict.assessed_on == {"sexual": ["text", "image"], "violence": ["text", "image"],
                                   "shocking": ["text", "image"], "hate": ["text"]}
    assert verdict.details["unassessed"] == ["hate"]
    assert verdict.details["applied"]["hate"] == ["text"]
    # mapped to nothing this policy has, or (illicit) mapped to nothing by the config
    assert set(verdict.details["unmapped"]) == {
        "harassment", "harassment/threatening", "illicit", "illicit/violent", "self-harm",
        "self-harm/intent", "self-harm/instructions"}
    assert verdict.details["unmapped"]["illicit"] == pytest.approx(0.03)
    assert verdict.refined_prompt is None and verdict.judge_id == (
        "openai-moderation:omni-moderation-latest")
    assert '"category_scores"' in verdict.raw
    assert POLICY.decide(verdict.scores).flagged == ("violence", "shocking", "hate")


async def test_openai_image_without_a_prompt_assesses_hate_on_nothing(
        services: tuple[Services, str]) -> None:
    state, url = services
    bare, worded = await judge_with("openai-moderation", url,
                                    [item(picture(), ""), item(picture(), "a hateword flag")])
    assert [p["type"] for p in state.seen[0].body["input"]] == ["image_url"]
    assert "hate" not in bare.scores and "hate" not in (bare.assessed_on or {})
    assert bare.details["unassessed"] == ["hate"]
    # what the prompt said counts, as assessed on the text; the image was not assessed for hate
    assert worded.scores["hate"] == pytest.approx(0.9)
    assert worded.assessed_on is not None and worded.assessed_on["hate"] == ["text"]


async def test_openai_prescreen_reads_the_prompt_alone(services: tuple[Services, str]) -> None:
    state, url = services
    [verdict] = await judge_with("openai-moderation", url, [item(None, "a hateword rally")])
    assert state.seen[0].body["input"] == [{"type": "text", "text": "a hateword rally"}]
    assert verdict.scores["hate"] == pytest.approx(0.9)
    assert verdict.details["unassessed"] == []
    assert POLICY.decide(verdict.scores).action == "refuse"


async def test_azure_analyzes_images_and_prompts_with_severity_scores(
        services: tuple[Services, str]) -> None:
    state, url = services
    state.azure_drop = ("Hate",)
    state.azure_extra = ({"category": "Profanity", "severity": 2},)
    image, prompt = await judge_with("azure-content-safety", url,
                                     [item(picture(red=0.5)), item(None, "a hateword")])
    by_path = {s.url.split("/contentsafety/")[1].split("?")[0]: s for s in state.seen}
    assert set(by_path) == {"image:analyze", "text:analyze"}
    assert all(s.headers["ocp-apim-subscription-key"] == KEY for s in state.seen)
    assert "authorization" not in by_path["image:analyze"].headers
    assert by_path["text:analyze"].body["text"] == "a hateword"
    assert image.scores["violence"] == pytest.approx(2 / 3)  # severity 4: medium
    assert image.scores["sexual"] == 0.0
    # Hate left out of the answer: not analysed, so no score; shocking: nothing maps to it
    assert image.details["unassessed"] == ["shocking", "hate"]
    assert "hate" not in image.scores
    assert image.assessed_on == {"sexual": ["image"], "violence": ["image"]}
    assert image.details["unmapped"] == {"Profanity": pytest.approx(1 / 3), "SelfHarm": 0.0}
    assert "hate" not in prompt.scores and prompt.details["unassessed"] == ["shocking", "hate"]


async def test_google_maps_likelihoods_and_reads_no_prompt(
        services: tuple[Services, str]) -> None:
    state, url = services
    image, prompt = await judge_with("google-safesearch", url,
                                     [item(picture(red=0.5, green=0.25)), item(None)])
    [seen] = state.seen  # the prompt-only item cost no request
    assert seen.headers["x-goog-api-key"] == KEY and KEY not in seen.url
    assert seen.url.endswith("/v1/images:annotate")
    assert image.scores["violence"] == 0.5 and image.scores["sexual"] == 0.25
    # racy and spoof are not mapped by default; medical was UNKNOWN: no score at all
    assert image.details["unmapped"] == {"racy": 0.5, "spoof": 0.0}
    assert image.details["unassessed"] == ["shocking", "hate"]
    assert prompt.scores == {} and prompt.assessed_on == {}  # it read nothing
    assert prompt.details["reads"] == ["image"]


async def test_google_per_image_error_is_a_judge_error(services: tuple[Services, str]) -> None:
    state, url = services
    state.fail = "google-error"
    with pytest.raises(JudgeError, match="could not annotate") as err:
        await judge_with("google-safesearch", url, [item(picture())])
    assert "Bad image data" in (err.value.detail or "") and len(state.seen) == 1


async def test_aws_maps_the_taxonomy_through_boto3(services: tuple[Services, str]) -> None:
    state, url = services
    big = (96, 96)  # Rekognition's smallest side is 80 px (tests/test_service_limits.py)
    red, green, webp = await judge_with("aws-rekognition", url, [
        item(picture(red=1.0, size=big)), item(picture(green=1.0, size=big)),
        item(picture(fmt="WEBP", size=big), media="image/webp")], min_confidence=20)
    seen = state.seen
    assert all(s.body["MinConfidence"] == 20 for s in seen)
    assert "/eu-west-1/rekognition/aws4_request" in seen[0].headers["authorization"]
    # Violence 100, Graphic Violence 90, Weapon Violence 95 (by way of its parent)
    assert red.scores["violence"] == 1.0 and red.scores["shocking"] == pytest.approx(0.95)
    assert red.scores["sexual"] == 0.0 and red.details["unassessed"] == []
    # a level 3 label alone, mapped by its parent "Explicit Nudity"
    assert green.scores["sexual"] == 1.0 and green.scores["violence"] == 0.0
    assert green.details["unmapped"] == {"Gambling": 0.55}
    assert green.details["model_version"] == "7.0"
    # Rekognition takes no WebP: re-encoded as JPEG; PNGs go as they are
    assert sorted((s.image or b"")[:2] for s in seen) == [b"\x89P", b"\x89P", b"\xff\xd8"]
    assert webp.scores["violence"] == 0.0


@pytest.mark.parametrize("kind", KINDS)
async def test_large_images_are_downscaled_before_upload(
        services: tuple[Services, str], kind: str) -> None:
    state, url = services
    [verdict] = await judge_with(kind, url, [item(picture(red=0.5, size=(600, 300)))],
                                 max_image_side=200)
    assert state.seen[0].image_size == (200, 100)
    assert verdict.details["resized_to"] == [200, 100]
    assert verdict.scores["violence"] > 0.2  # the service still saw the red half


# --- failures -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fail, requests, message", [
    ("400", 1, "rejected the request"),
    ("401", 1, "refused the guard's credentials"),
    ("500", 3, "failed"),
    ("429", 3, "failed"),
])
async def test_failures_are_judge_errors_retried_only_when_transient(
        services: tuple[Services, str], kind: str, fail: str, requests: int, message: str,
        caplog: pytest.LogCaptureFixture) -> None:
    state, url = services
    state.fail = fail
    caplog.set_level(logging.DEBUG)
    with pytest.raises(JudgeError, match=message) as err:
        await judge_with(kind, url, [item(picture())], retries=2)
    assert len(state.seen) == requests
    assert status_of(err.value) == 503 and err.value.code == "judge_unavailable"
    # the services echo the key they were sent: it reaches no error, detail or log line
    for text in (err.value.message, err.value.detail or "", caplog.text):
        assert KEY not in text and AWS_KEY_ID not in text and AWS_SECRET not in text


@pytest.mark.parametrize("kind", KINDS)
async def test_a_busy_service_is_retried_then_answers(services: tuple[Services, str],
                                                      kind: str) -> None:
    state, url = services
    state.fail, state.fail_times, state.retry_after = "429", 1, "0.3"
    t0 = time.perf_counter()
    [verdict] = await judge_with(kind, url, [item(picture(red=1.0))], retries=2)
    assert len(state.seen) == 2 and verdict.scores["violence"] > 0.5
    if kind != "aws-rekognition":  # AWS sends no Retry-After with its throttling
        assert time.perf_counter() - t0 >= 0.3


@pytest.mark.parametrize("kind", KINDS)
async def test_a_service_that_does_not_answer_times_out(services: tuple[Services, str],
                                                        kind: str) -> None:
    state, url = services
    state.fail = "slow"
    with pytest.raises(JudgeError, match="timed out|did not answer"):
        await judge_with(kind, url, [item(picture())], timeout_s=0.3, retries=0)


async def test_requests_in_flight_are_limited(services: tuple[Services, str]) -> None:
    state, url = services
    state.delay_s = 0.1
    verdicts = await judge_with("openai-moderation", url,
                                [item(picture()) for _ in range(6)], max_concurrency=2)
    assert len(verdicts) == 6 and state.most_in_flight == 2


def test_config_is_checked_up_front(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOD_UNSET", raising=False)
    with pytest.raises(ConfigError, match="MOD_UNSET is not set"):
        build_judge({"kind": "openai-moderation", "api_key_env": "MOD_UNSET"})
    with pytest.raises(ConfigError, match=r"judge \(azure-content-safety\): endpoint"):
        build_judge({"kind": "azure-content-safety"})
    with pytest.raises(ConfigError, match="api_key: unknown option") as err:
        build_judge({"kind": "google-safesearch", "api_key": KEY})
    assert KEY not in str(err.value)
    monkeypatch.setenv("MOD_AWS_ID", AWS_KEY_ID)
    with pytest.raises(ConfigError, match="both"):
        build_judge({"kind": "aws-rekognition", "access_key_id_env": "MOD_AWS_ID"})


def test_the_cli_finds_hosted_kinds_through_entry_points(
        services: tuple[Services, str], tmp_path: Path) -> None:
    _, url = services
    image = tmp_path / "red.png"
    image.write_bytes(picture(red=1.0))
    script = ("import sys; from guard.cli import main; sys.exit(main(sys.argv[1:]))")
    run = subprocess.run(
        [sys.executable, "-c", script, "judge", "--kind", "openai-moderation",
         "--set", f"api_base={url}/v1", "--set", "api_key_env=MOD_KEY",
         "--image", str(image), "--prompt", "a duel", "--policy", "default"],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["judge"] == "openai-moderation:omni-moderation-latest"
    assert "violence" in out["flagged"] and KEY not in run.stdout + run.stderr


# --- through the proxy, with the real openai SDK --------------------------------------------

def hosted_policy(directory: Path, kind: str, on_judge_error: str) -> str:
    reads_prompts = kind in ("openai-moderation", "azure-content-safety")
    write_policy(directory, f"""
id: hosted
version: 1
prescreen: {str(reads_prompts).lower()}
on_judge_error: {on_judge_error}
categories:
  violence: {{threshold: 0.5, action: edit}}
  sexual: {{threshold: 0.5, action: refuse}}
terms:  # what the rule refiner adds: a service never refines, and no prompt is made twice
  violence: {{append: calm and peaceful}}
""")
    return "hosted"


def trace(base: str, trace_id: str) -> dict[str, Any]:
    r = httpx.get(f"{base}/v1/guard/traces/{trace_id}",
                  headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 200, r.text
    return r.json()


def test_proxy_edits_what_the_service_flags(proxy, tmp_path, fake_backend,  # type: ignore[no-untyped-def]
                                            services) -> None:
    _, url = services
    fake_backend[0].plan = [["red"], ["blue"]]
    base = proxy(judge=section("openai-moderation", url),
                 policy=hosted_policy(tmp_path, "openai-moderation", "refuse"))
    client = openai.OpenAI(base_url=base + "/v1", api_key=CLIENT_KEY, max_retries=0)
    raw = client.images.with_raw_response.generate(prompt="a duel at dawn",
                                                   response_format="b64_json")
    assert [image.b64_json is not None for image in raw.parse().data or []] == [True]
    t = trace(base, raw.headers["x-guard-trace-id"])
    assert t["decision"] == "edited"
    assert [r["kind"] for r in t["rounds"]] == ["prescreen", "generate", "generate"]
    first = t["rounds"][1]["images"][0]
    assert first["judge_id"] == "openai-moderation:omni-moderation-latest"
    assert first["flagged"] == ["violence"] and first["refined_prompt"] is None
    second = t["rounds"][2]["images"][0]
    assert (second["prompt"], second["refined_by"]) == ("a duel at dawn, calm and peaceful",
                                                        "rules")
    assert "harassment" in first["details"]["unmapped"]  # not in this policy: kept, not lost
    assert KEY not in json.dumps(t)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("on_judge_error, status", [("refuse", 503), ("allow", 200)])
def test_proxy_follows_on_judge_error_when_the_service_fails(  # type: ignore[no-untyped-def]
        proxy, tmp_path, services, kind, on_judge_error, status) -> None:
    state, url = services
    state.fail = "500"
    base = proxy(judge=section(kind, url, retries=0),
                 policy=hosted_policy(tmp_path, kind, on_judge_error))
    client = openai.OpenAI(base_url=base + "/v1", api_key=CLIENT_KEY, max_retries=0)
    if status == 503:
        with pytest.raises(openai.APIStatusError) as err:
            client.images.generate(prompt="a cat")
        assert err.value.status_code == 503
        assert err.value.body["code"] == "judge_unavailable"  # type: ignore[index]
        trace_id = err.value.response.headers["x-guard-trace-id"]
    else:
        raw = client.images.with_raw_response.generate(prompt="a cat", response_format="b64_json")
        assert [image.b64_json is not None for image in raw.parse().data or []] == [True]
        trace_id = raw.headers["x-guard-trace-id"]
    t = trace(base, trace_id)
    assert "judge error" in (t["rounds"][-1]["error"] or "")
    assert "HTTP 500" in t["rounds"][-1]["error"] and KEY not in json.dumps(t)
    if status == 200:  # returned unjudged, and traced so
        unjudged = t["rounds"][-1]["images"][0]
        assert t["decision"] == "passed" and unjudged["scores"] == {}
        assert "judge failed" in unjudged["judge_id"]
    else:
        assert t["decision"] == "failed" and t["results"] == []
