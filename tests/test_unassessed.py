"""Not assessed is a state, not a score (issue 20, part 1).

A verdict says per category what it assessed, on the prompt and on the image; ensembles and
cascades combine by coverage; the policy's `unassessed` (refuse | pass | prompt, per category too)
decides what a category no judge looked at on the image means. Through the proxy with the openai
SDK against a local server speaking OpenAI's moderation shape (omni-moderation applies hate,
harassment, illicit and sexual/minors to text only), and in-process for the engine's branches.
"""

from __future__ import annotations

import base64
import io
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from guard.cli import main
from guard.core.config import RouteConfig
from guard.core.policy import Policy
from guard.core.types import GeneratedImage, GenerationCall, JudgeInput, Trace, Verdict
from guard.judges.composite import CascadeJudge, EnsembleJudge
from guard.pipeline.engine import Engine
from guard.pipeline.routing import Router
from guard.support.errors import PolicyViolation
from guard.support.telemetry import Metrics, Telemetry, TelemetryConfig
from guard.testing import RED, FakeBackend, colour_of, png
from tests.conftest import ADMIN_KEY, CLIENT_KEY, ProxyFactory, write_policy
from tests.fake_backend import FakeBackend as ImageServer
from tests.judge_server import JudgeServer
from tests.servers import serve

OMNI = ("harassment", "harassment/threatening", "hate", "hate/threatening", "illicit",
        "illicit/violent", "self-harm", "self-harm/intent", "self-harm/instructions", "sexual",
        "sexual/minors", "violence", "violence/graphic")
ON_IMAGES = {"self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "violence",
             "violence/graphic"}
TEXT_ONLY = {"hate": "prompt", "harassment": "prompt", "illegal_activity": "prompt",
             "minors": "prompt"}


# --- a service speaking OpenAI's moderation shape -----------------------------------------------

@dataclass
class Moderation:
    """`/v1/moderations` as omni-moderation answers: "hateword" in the text is hate, a red image
    violent; what it applied each category to, as OpenAI documents it."""

    seen: list[dict[str, Any]] = field(default_factory=list)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/moderations", self.moderate, methods=["POST"])])

    async def moderate(self, request: Request) -> JSONResponse:
        body = await request.json()
        self.seen.append(body)
        text = " ".join(p["text"] for p in body["input"] if p["type"] == "text")
        url = next((p["image_url"]["url"] for p in body["input"] if p["type"] == "image_url"),
                   None)
        red = url is not None and _top_left(url) == RED
        scores = dict.fromkeys(OMNI, 0.01)
        scores.update({"hate": 0.9} if "hateword" in text else {})
        scores.update({"violence": 0.9, "violence/graphic": 0.85} if red else {})
        applied = {k: ["text"] * bool(text) + ["image"] * (url is not None and k in ON_IMAGES)
                   for k in OMNI}
        return JSONResponse({"id": "modr-1", "model": body["model"], "results": [{
            "flagged": any(v > 0.5 for v in scores.values()),
            "categories": {k: v > 0.5 for k, v in scores.items()},
            "category_scores": scores, "category_applied_input_types": applied}]})


def _top_left(data_url: str) -> tuple[int, ...]:
    raw = base64.b64decode(data_url.split(",", 1)[1])
    with Image.open(io.BytesIO(raw)) as im:
        return tuple(im.convert("RGB").getpixel((0, 0)))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def moderation_server() -> Iterator[tuple[Moderation, str]]:
    state = Moderation()
    with serve(state.app()) as url:
        yield state, url + "/v1"


@pytest.fixture
def moderation(moderation_server: tuple[Moderation, str]) -> tuple[Moderation, str]:
    state, url = moderation_server
    state.seen.clear()
    return state, url


def hosted(url: str, **options: Any) -> dict[str, Any]:
    return {"kind": "openai-moderation", "api_base": url, "retries": 0, **options}


def generate(base: str, prompt: str) -> dict[str, Any]:
    """One image through the proxy with the openai SDK; its trace."""
    client = openai.OpenAI(base_url=base + "/v1", api_key=CLIENT_KEY, max_retries=0)
    raw = client.images.with_raw_response.generate(prompt=prompt, response_format="b64_json")
    assert raw.parse().data[0].b64_json
    return trace_of(base, raw.headers["x-guard-trace-id"])


def trace_of(base: str, trace_id: str) -> dict[str, Any]:
    got = httpx.get(f"{base}/v1/guard/traces/{trace_id}",
                    headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert got.status_code == 200, got.text
    return dict(got.json())


def trace_page(base: str, trace_id: str) -> str:
    """The auditors' page of a trace, signed in as an admin."""
    with httpx.Client(base_url=base) as client:
        form = client.get("/guard/login").text
        token = re.search(r'name="csrf" value="([^"]+)"', form)
        assert token is not None
        signed = client.post("/guard/login", data={"key": ADMIN_KEY, "csrf": token[1]})
        assert signed.status_code == 303
        page = client.get(f"/guard/traces/{trace_id}")
        assert page.status_code == 200
        return page.text


def refused(base: str, prompt: str) -> tuple[str, dict[str, Any]]:
    client = openai.OpenAI(base_url=base + "/v1", api_key=CLIENT_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt=prompt, response_format="b64_json")
    assert caught.value.code == "content_policy_violation"
    trace_id = caught.value.response.headers["x-guard-trace-id"]
    return caught.value.message, trace_of(base, trace_id)


def image_of(trace: Mapping[str, Any], round_index: int = 1) -> dict[str, Any]:
    [found] = [i for r in trace["rounds"] if r["index"] == round_index and r["kind"] != "prescreen"
               for i in r["images"]]
    return dict(found)


# --- through the proxy ---------------------------------------------------------------------------

def test_a_hosted_judge_alone_passes_a_lighthouse_under_the_default_policy(
        proxy: ProxyFactory, moderation: tuple[Moderation, str],
        caplog: pytest.LogCaptureFixture) -> None:
    state, url = moderation
    with caplog.at_level(logging.INFO, logger="safeedit.judge"):
        base = proxy(judge=hosted(url))
    trace = generate(base, "a lighthouse at dawn")
    assert trace["decision"] == "passed" and trace["categories"] == []
    image = image_of(trace)
    # omni-moderation read hate & co. on the prompt beside the image, not on the image: the
    # prompt's verdict stands for them; nothing scored 1.0 for not having looked
    assert image["unassessed"] == TEXT_ONLY
    assert image["scores"]["hate"] == pytest.approx(0.01) and image["action"] == "pass"
    assert trace["rounds"][0]["kind"] == "prescreen" and trace["rounds"][0]["images"][0][
        "unassessed"] == {}  # on the prompt it assessed every category
    assert [[p["type"] for p in s["input"]] for s in state.seen] == [["text"],
                                                                      ["text", "image_url"]]
    # the trace page shows it
    assert re.search(r"not assessed on the image:\s+harassment \(the prompt",
                     trace_page(base, trace["id"]))
    # at start, the proxy said so
    assert "coverage:" in caplog.text and "the prompt's verdict stands" in caplog.text
    assert ("no judge assesses hate, harassment, illegal_activity, minors on images"
            in caplog.text)


def test_what_no_judge_looks_at_on_text_or_image_is_refused(
        proxy: ProxyFactory, moderation: tuple[Moderation, str], tmp_path: Path) -> None:
    _, url = moderation
    write_policy(tmp_path, "id: guns\nversion: 1\nextends: default\ncategories:\n"
                           "  weapons: {threshold: 0.5, action: edit}\n")
    base = proxy(policy="guns", judge=hosted(url))
    message, trace = refused(base, "a lighthouse at dawn")
    assert "not assessed for weapons" in message
    assert trace["decision"] == "refused" and trace["categories"] == ["weapons"]
    assert image_of(trace)["unassessed"] == {**TEXT_ONLY, "weapons": "refuse"}


def test_the_no_gpu_recipe_passes_a_lighthouse_and_still_sees_a_violent_image(
        proxy: ProxyFactory, moderation: tuple[Moderation, str],
        fake_backend: tuple[ImageServer, str]) -> None:
    backend, _ = fake_backend
    backend.plan = [[], ["red"]]  # the second request's first image is violent
    _, url = moderation
    base = proxy(judge={"kind": "ensemble", "members": [{"kind": "builtin"}, hosted(url)],
                        "on_member_error": "fail"})
    calm = generate(base, "a lighthouse at dawn")
    assert calm["decision"] == "passed"
    first = image_of(calm)
    assert first["unassessed"] == TEXT_ONLY  # neither member looks at images for these
    builtin, service = first["details"]["members"]
    assert builtin["assessed_on"]["sexual"] == ["text", "image"]  # NudeNet
    assert service["assessed_on"]["hate"] == ["text"]
    stormy = generate(base, "a lighthouse at dawn")
    assert stormy["decision"] == "edited"
    assert image_of(stormy)["flagged"] == ["violence", "shocking"]  # seen on the image


def test_the_fleet_recipe_passes_a_lighthouse(
        proxy: ProxyFactory, moderation: tuple[Moderation, str],
        judge_server: tuple[JudgeServer, str]) -> None:
    _, url = moderation
    _, fleet = judge_server
    base = proxy(judge={"kind": "ensemble", "choose": {"sexual": 0}, "on_member_error": "skip",
                        "members": [{"kind": "remote", "api_bases": [fleet], "model": "judge",
                                     "api_key_env": "JUDGE_KEY", "health_interval_s": 0},
                                    hosted(url)]})
    trace = generate(base, "a lighthouse at dawn")
    assert trace["decision"] == "passed"
    assert image_of(trace)["unassessed"] == {}  # the model looks at the image for everything


def test_the_old_unassessed_option_is_accepted_warns_and_decides_nothing(
        proxy: ProxyFactory, moderation: tuple[Moderation, str],
        caplog: pytest.LogCaptureFixture) -> None:
    _, url = moderation
    with caplog.at_level(logging.WARNING, logger="safeedit.judge"):
        base = proxy(judge=hosted(url, unassessed="unsafe"))
    assert "`unassessed: unsafe` no longer decides anything" in caplog.text
    assert generate(base, "a lighthouse at dawn")["decision"] == "passed"  # 1.0 before


# --- the policy's modes, in-process ---------------------------------------------------------------

class Reader:
    """A judge that looks at images for `on_image` only (a red image is violent) and reads a
    prompt alone for every category (a word of `words` gives its scores): an image-only service
    beside a text one. It never reads the prompt beside an image."""

    id = "reader"

    def __init__(self, on_image: Sequence[str] = ("violence",),
                 words: Mapping[str, Mapping[str, float]] | None = None) -> None:
        self.on_image = tuple(on_image)
        self.words = dict(words or {"slur": {"hate": 0.95}})
        self.calls: list[list[JudgeInput]] = []

    async def judge(self, items: Sequence[JudgeInput], policy: Policy) -> list[Verdict]:
        self.calls.append(list(items))
        return [self._one(item, policy) for item in items]

    def _one(self, item: JudgeInput, policy: Policy) -> Verdict:
        if item.image is not None:
            red = colour_of(item.image.data) == RED
            seen = [c for c in self.on_image if c in policy.categories]
            return Verdict(scores={c: 0.9 if red and c == "violence" else 0.0 for c in seen},
                           judge_id=self.id, assessed_on={c: ["image"] for c in seen})
        scores = dict.fromkeys(policy.categories, 0.0)
        for word, found in self.words.items():
            if word in item.prompt.split():
                scores.update(found)
        return Verdict(scores=scores, judge_id=self.id,
                       assessed_on={c: ["text"] for c in policy.categories})

    def coverage(self, policy: Policy) -> dict[str, set[str]]:
        return {c: {"text", "image"} if c in self.on_image else {"text"}
                for c in policy.categories}

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


def policy(**changes: Any) -> Policy:
    return Policy.model_validate({"id": "modes", "version": 1, "categories": {
        "violence": {"threshold": 0.5, "action": "edit"},
        "hate": {"threshold": 0.5, "action": "refuse"},
        "weapons": {"threshold": 0.5, "action": "allow"}},
        # the rule refiner's way out of a red image
        "terms": {"violence": {"weak": ["red"], "rewrites": {"red": "blue"}}}, **changes})


async def run(judge: Reader, prompt: str, rules: Policy) -> Trace:
    """One image through the engine; its trace, closed as the proxy closes it."""
    backend = FakeBackend()
    router = Router({backend.name: backend}, {"*": RouteConfig(backend=backend.name)}, None)
    engine = Engine(judge, router, Telemetry(TelemetryConfig()), Metrics())
    trace = Trace()
    await engine.run(GenerationCall(prompt=prompt, n=1, model="m"), router.route("m"), rules,
                     trace)
    trace.finish(200, None, 0.0)
    return trace


async def test_prompt_mode_the_prescreens_verdict_stands_for_the_image() -> None:
    judge = Reader()
    trace = await run(judge, "a quiet harbour", policy())
    assert trace.decision == "passed"
    assert trace.rounds[1].images[0].unassessed == {"hate": "prompt", "weapons": "prompt"}
    assert [[i.image is not None for i in batch] for batch in judge.calls] == [[False], [True]]


async def test_prompt_mode_without_a_prescreen_asks_the_judge_about_the_prompt_alone() -> None:
    judge = Reader()
    trace = await run(judge, "a quiet harbour", policy(prescreen=False))
    assert trace.decision == "passed"
    # the image, then its prompt alone (text only, for the categories the image was not seen for)
    assert [[i.image is not None for i in batch] for batch in judge.calls] == [[True], [False]]
    with pytest.raises(PolicyViolation, match="image 0 crossed: hate") as caught:
        await run(Reader(), "a slur on a wall", policy(prescreen=False))
    assert caught.value.categories == ("hate",)


async def test_refuse_and_pass_modes() -> None:
    with pytest.raises(PolicyViolation, match="image 0: not assessed for hate"):
        await run(Reader(), "a quiet harbour", policy(unassessed="refuse"))
    trace = await run(Reader(), "a quiet harbour", policy(unassessed="pass"))
    assert trace.decision == "passed"
    assert trace.rounds[1].images[0].unassessed == {"hate": "pass", "weapons": "pass"}


async def test_a_category_overrides_the_policys_unassessed() -> None:
    rules = policy(unassessed="refuse", categories={
        "violence": {"threshold": 0.5, "action": "edit"},
        "hate": {"threshold": 0.5, "action": "refuse", "unassessed": "prompt"},
        "weapons": {"threshold": 0.5, "action": "allow"}})
    trace = await run(Reader(), "a quiet harbour", rules)
    # hate: the prompt's verdict; weapons only records, so it is never refused for this
    assert trace.rounds[1].images[0].unassessed == {"hate": "prompt", "weapons": "pass"}
    rules = policy(categories={"violence": {"threshold": 0.5, "action": "edit"},
                               "hate": {"threshold": 0.5, "action": "refuse",
                                        "unassessed": "refuse"}})
    with pytest.raises(PolicyViolation, match="not assessed for hate"):
        await run(Reader(), "a quiet harbour", rules)


async def test_a_violent_image_is_still_edited_whatever_was_not_assessed() -> None:
    judge = Reader()
    trace = await run(judge, "a red ship", policy())
    assert [i.action for r in trace.rounds for i in r.images] == ["pass", "edit", "pass"]
    assert trace.rounds[2].images[0].prompt == "a blue ship"
    # the refined prompt was never prescreened: read alone once, for what the image was not
    assert [[i.image is not None for i in batch] for batch in judge.calls] == [
        [False], [True], [True], [False]]
    assert judge.calls[-1][0].prompt == "a blue ship"


# --- composites combine by coverage ---------------------------------------------------------------

async def test_an_ensemble_takes_each_category_from_the_members_that_assessed_it() -> None:
    rules = policy()
    image = JudgeInput(prompt="a slur", original_prompt="a slur",
                       image=GeneratedImage(data=png(RED)))
    eyes, ears = Reader(on_image=("violence",)), Reader(on_image=("weapons",))
    both = EnsembleJudge([eyes, ears], choose={"violence": 1})
    [verdict] = await both.judge([image], rules)
    # violence: member 1 is chosen but did not look at it, so member 0's 0.9 stands
    assert verdict.scores == {"violence": 0.9, "weapons": 0.0}
    assert verdict.assessed_on == {"violence": ["image"], "weapons": ["image"]}
    assert both.coverage(rules) == {"violence": {"text", "image"}, "hate": {"text"},
                                    "weapons": {"text", "image"}}


async def test_a_cascade_keeps_what_an_earlier_stage_saw_and_a_later_one_did_not() -> None:
    rules = policy()
    item = JudgeInput(prompt="x", original_prompt="x", image=GeneratedImage(data=png(RED)))
    chain = CascadeJudge([Reader(on_image=("violence",)), Reader(on_image=("weapons",))])
    [verdict] = await chain.judge([item], rules)
    # surely violent (0.9) but no refined prompt: handed on; the next stage looks for weapons only
    assert [s["handed_on"] for s in verdict.details["stages"]] == ["refine", None]
    assert verdict.scores == {"violence": 0.9, "weapons": 0.0}
    assert verdict.assessed_on == {"violence": ["image"], "weapons": ["image"]}


# --- `safeedit judge coverage` ---------------------------------------------------------------

def test_the_coverage_cli_prints_the_table_of_the_no_gpu_recipe(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-unused")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"judge": {"kind": "ensemble", "members": [
        {"kind": "builtin"}, {"kind": "openai-moderation", "api_key_env": "OPENAI_API_KEY"}]}}))
    assert main(["judge", "coverage", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split(None, 4)[1:] for line in out.splitlines()[2:]
            if line and not line.startswith("warning")}
    assert rows["sexual"] == ["text+image", "text+image", "text+image"]
    assert rows["violence"] == ["text", "text+image", "text+image"]
    assert rows["hate"] == ["text", "text", "text", "the prompt's verdict stands"]
    assert "warning: no judge assesses hate, harassment, illegal_activity, minors on images" \
        in out
    assert "sk-unused" not in out
    # a policy category no judge covers at all is named
    policy_file = tmp_path / "guns.yaml"
    policy_file.write_text("id: guns\nversion: 1\nextends: default\ncategories:\n"
                           "  weapons: {threshold: 0.5, action: edit}\n")
    assert main(["judge", "coverage", "--config", str(config), "--policy",
                 str(policy_file)]) == 0
    out = capsys.readouterr().out
    assert "refused: no judge reads it on the prompt either" in out
    assert "warning: no judge assesses weapons at all" in out
