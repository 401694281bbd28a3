"""Composite judges (`ensemble`, `cascade`) built from real judges: the builtin judge, the marker
judge, the `remote` judge against the local fake judge-model server of tests/test_remote_judge.py,
and the `vlm` judge on the tiny model. Requests to the remote server are counted, so a test can
see which items reached which stage."""

from __future__ import annotations

import asyncio
import io
import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from PIL import Image

from guard.cli import main
from guard.core.policy import Policy
from guard.core.types import GeneratedImage, JudgeInput
from guard.judges.composite import CascadeJudge, EnsembleJudge
from guard.judges.remote import RemoteJudge
from guard.judges.vlm import VLMJudge
from guard.plugins import Refiner, build_judge
from guard.support.errors import ConfigError, JudgeError
from tests.conftest import ADMIN_KEY, CLIENT_KEY, ProxyFactory, write_policy
from tests.fake_backend import FakeBackend
from tests.judge_server import JudgeServer, png
from tests.servers import free_port
from tests.tiny_vlm import tie_answer_tokens

DOCS = Path(__file__).parent.parent / "docs" / "judges.md"

# The categories the fake judge server knows, with words of their own for the builtin judge:
# "bloodbath" is surely violent (0.95), "sword" and "lingerie" are weak hints (0.35, uncertain).
POLICY = Policy.model_validate({
    "id": "composite", "version": 1,
    "categories": {"sexual": {"threshold": 0.5, "action": "edit"},
                   "violence": {"threshold": 0.6, "action": "edit"},
                   "minors": {"threshold": 0.1, "action": "refuse"}},
    "terms": {"violence": {"strong": ["bloodbath"], "weak": ["sword"],
                           "rewrites": {"bloodbath": "water balloon party"}},
              "sexual": {"weak": ["lingerie"]},
              "minors": {"strong": ["underage"]}}})  # the builtin judge assesses what has terms

BUILTIN = {"kind": "builtin", "nudenet": False}


def item(prompt: str, image: GeneratedImage | None = None) -> JudgeInput:
    return JudgeInput(prompt=prompt, original_prompt=prompt, image=image)


def colour_png(colour: str) -> GeneratedImage:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, "PNG")
    return GeneratedImage(data=buf.getvalue())




def remote(url: str, **options: Any) -> dict[str, Any]:
    return {"kind": "remote", "api_base": url, "model": "judge", "api_key_env": "JUDGE_KEY",
            "backoff_s": 0.01, "health_interval_s": 0, **options}


@pytest.fixture
def built() -> Iterator[Any]:
    """Build judges from sections; every one is closed after the test."""
    made: list[Any] = []

    def make(section: dict[str, Any]) -> Any:
        judge = build_judge(section)
        made.append(judge)
        return judge

    yield make
    for judge in made:
        asyncio.run(judge.aclose())


def generate(base: str, prompt: str) -> tuple[str | None, dict[str, Any]]:
    """One image through the proxy with the openai SDK: its revised prompt and the trace."""
    client = openai.OpenAI(base_url=base + "/v1", api_key=CLIENT_KEY, max_retries=0)
    raw = client.images.with_raw_response.generate(prompt=prompt, response_format="b64_json")
    data = raw.parse().data
    assert data and data[0].b64_json
    trace = httpx.get(f"{base}/v1/guard/traces/{raw.headers['x-guard-trace-id']}",
                      headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert trace.status_code == 200, trace.text
    return data[0].revised_prompt, trace.json()


# --- ensemble ------------------------------------------------------------------------------------

async def test_ensemble_takes_the_highest_score_per_category_and_lists_its_members(
        judge_server: tuple[JudgeServer, str], built: Any) -> None:
    state, url = judge_server
    judge = built({"kind": "ensemble", "members": [BUILTIN, remote(url)]})
    assert judge.id == "ensemble(builtin/2+remote:safeeditor:judge)"
    # The server reads the image (14 of 20 rows red: violence 0.7); the builtin judge reads the
    # prompt ("lingerie": sexual 0.35). Each sees only its half.
    [verdict] = await judge.judge([item("a lingerie model", png(red_rows=14))], POLICY)
    assert verdict.scores == pytest.approx({"sexual": 0.35, "violence": 0.7, "minors": 0.01})
    assert POLICY.decide(verdict.scores).flagged == ("violence",)
    builtin, server = verdict.details["members"]
    assert builtin["judge_id"] == "builtin/2" and builtin["scores"]["sexual"] == 0.35
    assert server["judge_id"] == "remote:safeeditor:judge"
    assert server["scores"]["violence"] == pytest.approx(0.7)
    assert server["details"]["requests"] == 2  # the server's own verdict, then its explanation
    assert builtin["latency_ms"] >= 0 and server["latency_ms"] > 0 and "error" not in server
    # The refined prompt and thought come from the refiner (the builtin rule refiner), which saw
    # the combined scores: violence at 0.70 is what it explains, not the server's words.
    assert verdict.details["refiner"] == "builtin/2"
    assert verdict.thought.startswith("violence scored 0.70, at or over its threshold 0.60")
    assert verdict.refined_prompt == "a lingerie model"
    assert "[remote:safeeditor:judge]" in verdict.raw  # the server's own text is kept


async def test_members_judge_concurrently(judge_server: tuple[JudgeServer, str],
                                          built: Any) -> None:
    state, url = judge_server
    state.delay_s = 0.5
    judge = built({"kind": "ensemble",
                   "members": [remote(url, id="a"), remote(url, id="b"), remote(url, id="c")]})
    started = time.perf_counter()
    [verdict] = await judge.judge([item("a cat")], POLICY)
    elapsed = time.perf_counter() - started
    assert len(state.requests) == 3
    assert all(m["latency_ms"] >= 500 for m in verdict.details["members"])
    assert elapsed < 1.2  # one server delay, not three
    assert verdict.latency_ms == pytest.approx(elapsed * 1000, rel=0.2)


async def test_a_category_can_trust_one_member(judge_server: tuple[JudgeServer, str],
                                               built: Any) -> None:
    _, url = judge_server
    image = png(red_rows=14)
    for choice in (0, "builtin/2"):  # by index or by judge id
        judge = built({"kind": "ensemble", "members": [BUILTIN, remote(url)],
                       "choose": {"violence": choice}})
        [verdict] = await judge.judge([item("a lingerie model", image)], POLICY)
        # violence from the builtin judge alone (0.0), the rest still the highest
        assert verdict.scores == pytest.approx({"sexual": 0.35, "violence": 0.0, "minors": 0.01})
        assert not POLICY.decide(verdict.scores).unsafe
        assert verdict.refined_prompt is None and verdict.thought == ""
        assert "refiner" not in verdict.details


async def test_the_refiner_is_asked_only_for_flagged_items_and_sees_the_combined_scores(
        judge_server: tuple[JudgeServer, str], built: Any) -> None:
    state, url = judge_server
    judge = built({"kind": "ensemble", "members": [BUILTIN, {"kind": "marker"}],
                   "refiner": remote(url, model="refiner")})
    safe, red = await judge.judge([item("a cat", colour_png("blue")),
                                   item("a knight", colour_png("red"))], POLICY)
    assert safe.thought == "" and safe.refined_prompt is None and "refiner" not in safe.details
    # Only the flagged item went to the refiner, and only for its explanation (a remote judge is
    # a Refiner: no verdict request of its own); the marker judge's red pixel flagged it, and
    # the refiner got that verdict as the last turn of the item's history.
    [asked] = [r for r in state.requests if r["model"] == "refiner"]
    assert "stop" not in asked
    messages = asked["messages"]
    assert messages[-1]["content"][-1]["text"] == "Prompt: a knight"
    assert "violence: yes" in messages[-2]["content"] and messages[-2]["role"] == "assistant"
    assert red.scores["violence"] == 0.97
    assert red.details["refiner"] == "remote:safeeditor:refiner"
    assert red.refined_prompt == "a knight, peaceful" and red.thought == "Unsafe: violence."


async def test_a_failing_member_fails_the_verdict_unless_skipped(built: Any) -> None:
    black = [item("a lingerie model", colour_png("black"))]  # the marker judge crashes on black
    failing = built({"kind": "ensemble", "members": [BUILTIN, {"kind": "marker"}]})
    with pytest.raises(JudgeError, match=r"ensemble member 1 \(marker\) failed: JudgeCrashed"):
        await failing.judge(black, POLICY)

    skipping = built({"kind": "ensemble", "members": [BUILTIN, {"kind": "marker"}],
                      "on_member_error": "skip", "choose": {"sexual": "marker"}})
    [verdict] = await skipping.judge(black, POLICY)
    # judged by the others; the chosen member failed, so sexual is the highest of the rest
    assert verdict.scores["sexual"] == 0.35
    assert [m.get("error") for m in verdict.details["members"]] == [None, "JudgeCrashed"]
    assert verdict.details["members"][1]["scores"] == {}

    alone = built({"kind": "ensemble", "members": [{"kind": "marker"}],
                   "on_member_error": "skip"})
    with pytest.raises(JudgeError, match="every ensemble member failed"):
        await alone.judge(black, POLICY)


def test_ensemble_through_the_proxy_keeps_every_members_scores_and_time_in_the_trace(
        proxy: ProxyFactory, fake_backend: tuple[FakeBackend, str], tmp_path: Path) -> None:
    backend, _ = fake_backend
    backend.plan = [["red"]]  # the first image is violent to the marker judge, the next blue
    write_policy(tmp_path, "id: comp\nversion: 1\nextends: default\n")
    base = proxy(policy="comp", judge={"kind": "ensemble",
                                       "members": [{"kind": "marker"}, BUILTIN]})
    revised, t = generate(base, "a knight at dawn")
    assert revised == "a knight at dawn, peaceful, unharmed"  # the rule refiner's words
    assert t["decision"] == "edited"
    first = t["rounds"][1]["images"][0]
    assert first["judge_id"] == "ensemble(marker+builtin/2)"
    assert first["flagged"] == ["violence"] and first["action"] == "edit"
    members = first["details"]["members"]
    assert [m["judge_id"] for m in members] == ["marker", "builtin/2"]
    assert members[0]["scores"]["violence"] == 0.97 and members[1]["scores"]["violence"] == 0.0
    assert all(isinstance(m["latency_ms"], float) for m in members)
    assert first["details"]["refiner"] == "builtin/2"
    assert first["thought"].startswith("violence scored 0.97")
    assert t["rounds"][2]["images"][0]["action"] == "pass"


def test_a_failing_member_is_a_503_for_the_client(
        proxy: ProxyFactory, fake_backend: tuple[FakeBackend, str]) -> None:
    backend, _ = fake_backend
    backend.plan = [["black"]]
    base = proxy(judge={"kind": "ensemble", "members": [BUILTIN, {"kind": "marker"}]})
    client = openai.OpenAI(base_url=base + "/v1", api_key=CLIENT_KEY, max_retries=0)
    with pytest.raises(openai.InternalServerError) as caught:
        client.images.generate(prompt="a knight at dawn")
    assert caught.value.status_code == 503
    assert caught.value.body["code"] == "judge_unavailable"  # type: ignore[index]


# --- cascade -------------------------------------------------------------------------------------

async def test_cascade_sends_only_uncertain_items_on(judge_server: tuple[JudgeServer, str],
                                                     built: Any) -> None:
    state, url = judge_server
    judge = built({"kind": "cascade", "stages": [BUILTIN, remote(url)],
                   "escalate": {"low": 0.2, "high": 0.8}})
    assert judge.id == "cascade(builtin/2>remote:safeeditor:judge)"
    bloodbath, cat, lingerie = await judge.judge(
        [item("a bloodbath in town"), item("a cat"), item("a lingerie model")], POLICY)
    # Surely unsafe (0.95) and surely safe (all 0) stop at the builtin judge; only 0.35 goes on.
    assert len(state.requests) == 1
    assert state.requests[0]["messages"][-1]["content"] == "Prompt: a lingerie model"
    assert bloodbath.details["stage"] == {"index": 0, "judge_id": "builtin/2"}
    assert bloodbath.refined_prompt == "a water balloon party in town"
    assert cat.details["stage"]["index"] == 0 and cat.scores["violence"] == 0.0
    assert lingerie.details["stage"] == {"index": 1, "judge_id": "remote:safeeditor:judge"}
    first, second = lingerie.details["stages"]
    assert first["handed_on"] == "uncertain" and first["scores"]["sexual"] == 0.35
    assert second["handed_on"] is None and second["details"]["requests"] == 1
    # the later stage decides: the server is sure it is not sexual
    assert lingerie.scores["sexual"] == pytest.approx(0.03)
    assert lingerie.judge_id == judge.id


def test_the_band_edges(built: Any) -> None:
    judge = built({"kind": "cascade", "stages": [BUILTIN], "escalate": {"low": 0.2, "high": 0.8}})
    assert judge.uncertain({"sexual": 0.2}, POLICY)       # low is in the band
    assert not judge.uncertain({"sexual": 0.8}, POLICY)   # high is not: surely unsafe
    assert not judge.uncertain({"sexual": 0.19}, POLICY)
    assert not judge.uncertain({"other": 0.5}, POLICY)    # not a category of the policy
    assert not judge.uncertain({}, POLICY)                # unscored counts as 0


async def test_a_stage_that_flags_without_refining_hands_the_item_on_for_its_refined_prompt(
        judge_server: tuple[JudgeServer, str], built: Any) -> None:
    state, url = judge_server
    judge = built({"kind": "cascade", "stages": [
        # judge only: never refines; an image judge, and minors judged on its sexual policy
        remote(url, profile="shieldgemma2", id="screen",
               profile_options={"policies": {"minors": "sexual"}}),
        remote(url, profile="shieldgemma2", id="screen-2",
               profile_options={"policies": {"minors": "sexual"}}),
        remote(url, model="explainer")]})
    [verdict] = await judge.judge([item("a knight covered in blood", png(red_rows=19))], POLICY)
    # Both screens are sure (0.95, over `high`) but write no refined prompt: the item goes on
    # to the next stage that writes one, whose verdict (scores too) is the answer.
    stages = verdict.details["stages"]
    assert [(s["judge_id"], s["handed_on"]) for s in stages] == [
        ("screen", "refine"), ("screen-2", "refine"), ("remote:safeeditor:explainer", None)]
    assert stages[0]["scores"]["violence"] == pytest.approx(0.95)
    assert verdict.details["stage"] == {"index": 2, "judge_id": "remote:safeeditor:explainer"}
    assert verdict.refined_prompt == "a knight covered in, peaceful"
    assert verdict.thought == "Unsafe: violence."
    assert verdict.scores["violence"] == pytest.approx(0.95)
    assert len([r for r in state.requests if r["model"] == "explainer"]) == 2


def test_cascade_through_the_proxy_names_the_deciding_stage_in_the_trace(
        proxy: ProxyFactory, fake_backend: tuple[FakeBackend, str], tmp_path: Path) -> None:
    backend, _ = fake_backend
    backend.plan = [["red"]]
    write_policy(tmp_path, "id: comp\nversion: 1\nextends: default\n"
                           "terms:\n  violence:\n    weak: [sword]\n")
    base = proxy(policy="comp", judge={"kind": "cascade",
                                       "stages": [BUILTIN, {"kind": "marker"}]})
    revised, t = generate(base, "a sword on a table")
    assert revised == "a sword on a table, calm and peaceful"  # the marker judge's words
    first = t["rounds"][1]["images"][0]
    assert first["judge_id"] == "cascade(builtin/2>marker)"
    assert first["details"]["stage"] == {"index": 1, "judge_id": "marker"}
    assert [s["handed_on"] for s in first["details"]["stages"]] == ["uncertain", None]
    assert first["details"]["stages"][0]["scores"]["violence"] == 0.35
    assert first["scores"]["violence"] == 0.97 and first["action"] == "edit"


def test_a_cascade_hands_on_an_image_its_first_stage_could_not_look_at(
        proxy: ProxyFactory, fake_backend: tuple[FakeBackend, str], tmp_path: Path) -> None:
    # The builtin judge sees nudity only: a violent image under a harmless prompt scores 0 for
    # violence there, which means "not looked at". It must reach the stage that looks.
    backend, _ = fake_backend
    backend.plan = [["red"]]
    write_policy(tmp_path, "id: comp\nversion: 1\nextends: default\n")
    base = proxy(policy="comp", judge={"kind": "cascade",
                                       "stages": [{"kind": "builtin"}, {"kind": "marker"}]})
    revised, t = generate(base, "a quiet street")
    assert revised == "a quiet street, calm and peaceful"
    judged = t["rounds"][1]["images"][0]
    first, second = judged["details"]["stages"]
    assert first["handed_on"] == "unassessed" and first["scores"]["violence"] == 0.0
    assert "violence" in first["details"]["unassessed"]
    assert "sexual" not in first["details"]["unassessed"]  # NudeNet did look for that
    assert judged["details"]["stage"] == {"index": 1, "judge_id": "marker"}
    assert judged["action"] == "edit"
    prescreen = t["rounds"][0]
    assert prescreen["kind"] == "prescreen"


def test_safeedit_eval_counts_the_deciding_stages(
        judge_server: tuple[JudgeServer, str], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    state, url = judge_server
    (tmp_path / "comp.yaml").write_text(yaml.safe_dump(POLICY.model_dump(mode="json")))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"judge": {"kind": "cascade",
                                                "stages": [BUILTIN, remote(url)]}}))
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt\na cat\na bloodbath in town\na lingerie model\na dog\n")
    out = tmp_path / "out.jsonl"
    assert main(["eval", "--policy", str(tmp_path / "comp.yaml"), "--prompts", str(prompts),
                 "--config", str(config), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"decided by stage\s+count\s+rate", printed)
    assert re.search(r"0 builtin/2\s+3\s+75\.00%", printed)
    assert re.search(r"1 remote:safeeditor:judge\s+1\s+25\.00%", printed)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["details"]["stage"]["index"] for r in rows] == [0, 0, 1, 0]
    assert len(state.requests) == 1


def test_safeedit_judge_prints_the_deciding_stage(
        judge_server: tuple[JudgeServer, str], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    _, url = judge_server
    policy = tmp_path / "comp.yaml"
    policy.write_text(yaml.safe_dump(POLICY.model_dump(mode="json")))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"judge": {"kind": "cascade",
                                                "stages": [BUILTIN, remote(url)]}}))
    assert main(["judge", "--config", str(config), "--policy", str(policy),
                 "--prompt", "a lingerie model"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["judge"] == "cascade(builtin/2>remote:safeeditor:judge)"
    assert printed["stage"] == {"index": 1, "judge_id": "remote:safeeditor:judge"}
    assert printed["action"] == "pass"


# --- the vlm judge as a stage, lifecycle ---------------------------------------------------------

@pytest.fixture(scope="module")
def half_dir(tiny_vlm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with " yes" and " no" made indistinguishable: every score exactly 0.5."""
    path = tmp_path_factory.mktemp("half") / "model"
    shutil.copytree(tiny_vlm_dir, path)
    tie_answer_tokens(path, " no", " yes")
    return path


async def test_builtin_cascade_into_vlm_starts_and_closes_its_stages(half_dir: Path,
                                                                       built: Any) -> None:
    judge = built({"kind": "cascade", "stages": [
        BUILTIN, {"kind": "vlm", "model": str(half_dir), "max_new_tokens": 4}]})
    vlm = judge.stages[1]
    assert isinstance(vlm, VLMJudge) and vlm.model is None
    await judge.start()
    assert vlm.model is not None and await judge.ready()
    # A prompt the term lists are sure of stops at the builtin judge; an image always goes on
    # (the builtin judge cannot look at it for violence).
    sure, unsure = await judge.judge([item("a bloodbath in town"),
                                      item("a sword", colour_png("blue"))], POLICY)
    assert sure.details["stage"]["index"] == 0
    assert unsure.details["stage"] == {"index": 1, "judge_id": "vlm:safeeditor:model"}
    assert unsure.scores == pytest.approx({"sexual": 0.5, "violence": 0.5, "minors": 0.5},
                                          abs=1e-6)
    assert POLICY.decide(unsure.scores).action == "refuse"  # minors 0.5 over its 0.1
    await judge.aclose()
    assert vlm.model is None  # the model is let go


async def test_an_ensemble_is_ready_only_when_every_member_is(
        judge_server: tuple[JudgeServer, str], built: Any) -> None:
    _, url = judge_server
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    up = built({"kind": "ensemble", "members": [BUILTIN, remote(url)]})
    down = built({"kind": "ensemble", "members": [BUILTIN, remote(url), remote(dead)]})
    await up.start()
    await down.start()
    assert await up.ready() and not await down.ready()
    server_member = up.members[1]
    assert isinstance(server_member, RemoteJudge)
    await up.judge([item("a cat")], POLICY)
    assert server_member._client is not None
    await up.aclose()
    assert server_member._client is None  # closed with the ensemble


# --- configuration -------------------------------------------------------------------------------

@pytest.mark.parametrize(("section", "message"), [
    ({"kind": "ensemble", "members": []}, r"`members` needs at least one judge"),
    ({"kind": "ensemble"}, r"judge \(ensemble\): members: Field required"),
    ({"kind": "ensemble", "members": [BUILTIN], "choose": {"sexual": 3}},
     r"choose.sexual: no member 3; members: 0 \(builtin/2\)"),
    ({"kind": "ensemble", "members": [BUILTIN], "choose": {"sexual": "vlm"}},
     r"choose.sexual: no member 'vlm'"),
    ({"kind": "ensemble", "members": [BUILTIN, BUILTIN], "choose": {"sexual": "builtin/2"}},
     r"names several members; give its index"),
    ({"kind": "ensemble", "members": [BUILTIN], "on_member_error": "ignore"},
     r"on_member_error: Input should be 'fail' or 'skip'"),
    ({"kind": "ensemble", "members": [BUILTIN], "judges": []}, r"judges: unknown option"),
    ({"kind": "ensemble", "members": [BUILTIN, {"kind": "nope"}]},
     r"judge \(ensemble\) members\[1\]: unknown judge kind 'nope'"),
    ({"kind": "ensemble", "members": [BUILTIN], "refiner": {"kind": "builtin", "x": 1}},
     r"judge \(ensemble\) refiner: judge \(builtin\): x: unknown option"),
    ({"kind": "cascade", "stages": []}, r"`stages` needs at least one judge"),
    ({"kind": "cascade", "stages": [BUILTIN], "escalate": {"low": 0.8, "high": 0.8}},
     r"escalate.low \(0.8\) must be below escalate.high \(0.8\)"),
    ({"kind": "cascade", "stages": [BUILTIN], "escalate": {"low": -1}},
     r"escalate.low: Input should be greater than or equal to 0"),
    ({"kind": "cascade", "stages": [{"kind": "cascade", "stages": [{"kind": "remote"}]}]},
     r"judge \(cascade\) stages\[0\]: judge \(cascade\) stages\[0\]: judge \(remote\): "
     r"model: Field required"),
])
def test_bad_composite_sections_are_clear_config_errors(section: dict[str, Any],
                                                        message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_judge(section)


def recipes() -> dict[str, dict[str, Any]]:
    """The `judge:` sections of the recipes in docs/judges.md, by heading."""
    text = DOCS.read_text()
    section = text.split("## Composite judges", 1)[1].split("\n## ", 1)[0]
    found = re.findall(r"^### Recipe: (.+?)\n.*?```yaml\n(.*?)```", section, re.M | re.S)
    return {name: yaml.safe_load(body)["judge"] for name, body in found}


def test_the_documented_recipes_build(monkeypatch: pytest.MonkeyPatch) -> None:

    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-used")  # the hosted judge wants its key set
    found = recipes()
    assert sorted(found) == ["a judge fleet", "no GPU", "one GPU"]
    built = {name: build_judge(section) for name, section in found.items()}
    assert isinstance(built["one GPU"], CascadeJudge)
    assert [s.id for s in built["one GPU"].stages] == [
        "builtin/2", "vlm:safeeditor:Qwen2.5-VL-7B-Instruct"]
    assert isinstance(built["no GPU"], EnsembleJudge)
    assert built["no GPU"].id == "ensemble(builtin/2+openai-moderation:omni-moderation-latest)"
    fleet = built["a judge fleet"]
    assert isinstance(fleet, EnsembleJudge) and fleet.choose == {"sexual": 0}
    assert isinstance(fleet.members[0], RemoteJudge) and fleet.on_member_error == "skip"
    for judge in built.values():
        asyncio.run(judge.aclose())


async def test_an_ensemble_explains_known_scores_through_its_refiner_alone(
        judge_server: tuple[JudgeServer, str], built: Any) -> None:
    state, url = judge_server
    judge = built({"kind": "ensemble", "members": [BUILTIN, {"kind": "marker"}],
                   "refiner": remote(url, model="refiner")})
    assert isinstance(judge, Refiner)
    [explained] = await judge.refine([item("a knight", colour_png("red"))], POLICY,
                                     [{"sexual": 0.0, "violence": 0.97, "minors": 0.0}])
    assert explained.refined_prompt == "a knight, peaceful"
    assert [r["model"] for r in state.requests] == ["refiner"]  # no member judged again
