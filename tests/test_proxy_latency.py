"""The loop's latency mechanisms (issue 18) end to end: the openai SDK against the proxy on uvicorn,
in front of the fake image server (tests/fake_backend.py) and a real `remote` judge server
(tests/judge_server.py) or guard.testing's FakeJudge registered as a judge kind."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from guard.plugins import judges
from guard.testing import GREEN, RED, FakeJudge
from tests.conftest import ADMIN_KEY, CLIENT_KEY, E2E_POLICY, write_policy
from tests.test_proxy import generate, sdk, trace

MADE: list[FakeJudge] = []  # the judges the proxies under test built, newest last


def latency_judge(options: Mapping[str, Any]) -> FakeJudge:
    """guard.testing's FakeJudge as a judge kind: `gore` or a red image is violent, `slur` or a
    green image hateful, `borderline` nearly violent (0.4); it refines by `refine` (`same`: it
    has nothing new to suggest)."""
    refine = {"same": lambda p: p, "calm": lambda p: p + ", calm",
              "paint": lambda p: p.replace("gore", "paint").replace("borderline", "calm")}
    judge = FakeJudge(words={"gore": {"violence": 0.9}, "slur": {"hate": 0.95},
                             "borderline": {"violence": 0.4}},
                      colours={RED: {"violence": 0.9}, GREEN: {"hate": 0.99}},
                      refine=refine[options.get("refine", "paint")],
                      delay_s=float(options.get("delay_s", 0.0)))
    MADE.append(judge)
    return judge


judges.register("latency-fake", latency_judge)


def policy_file(directory: Path, text: str) -> None:
    write_policy(directory, E2E_POLICY)
    write_policy(directory, text)


def remote_judge(url: str) -> dict[str, Any]:
    return {"kind": "remote", "api_base": url, "model": "judge", "api_key_env": "JUDGE_KEY",
            "profile": "safeeditor", "retries": 0}


# --- no wasted work ---------------------------------------------------------------------------

def test_the_last_round_asks_the_remote_judge_for_a_verdict_only(  # type: ignore[no-untyped-def]
        proxy, tmp_path, fake_backend, judge_server) -> None:
    server, url = judge_server
    backend = fake_backend[0]
    backend.plan = [["red"], ["red"]]
    write_policy(tmp_path, "id: two\nversion: 1\nrounds: {max: 2}\ncategories:\n"
                           "  violence: {threshold: 0.6, action: edit}\n"
                           "  minors: {threshold: 0.1, action: refuse}\n")
    base = proxy(policy="two", judge=remote_judge(url))

    with pytest.raises(openai.BadRequestError) as info:
        sdk(base).images.generate(prompt="a street at night")

    assert info.value.code == "content_policy_violation"
    assert backend.prompts == ["a street at night", "a street at night, peaceful"]
    # The prescreen's verdict, round 1's verdict and explanation, round 2's verdict alone.
    verdict_only = ["stop" in r for r in server.requests]
    assert verdict_only == [True, True, False, True]
    t = trace(base, info.value.response.headers["x-guard-trace-id"])
    last = t["rounds"][-1]["images"][0]
    assert (last["round"], last["refined_prompt"], last["thought"]) == (2, None, "")


def test_a_judge_with_nothing_new_to_suggest_ends_the_request_at_once(  # type: ignore[no-untyped-def]
        proxy, tmp_path, fake_backend) -> None:
    backend = fake_backend[0]
    backend.plan = [["red"]]
    policy_file(tmp_path, "id: stuck\nversion: 1\nextends: e2e\nrounds: {max: 3}\n")
    base = proxy(policy="stuck", judge={"kind": "latency-fake", "refine": "same"})

    with pytest.raises(openai.BadRequestError) as info:
        sdk(base).images.generate(prompt="a street at night")

    # Neither the judge nor the rule refiner had a new prompt: no second generation of it.
    assert backend.prompts == ["a street at night"]
    assert "nothing new to try" in info.value.message
    t = trace(base, info.value.response.headers["x-guard-trace-id"])
    assert [r["kind"] for r in t["rounds"]] == ["prescreen", "generate"]
    assert t["decision"] == "refused"


# --- prescreen beside round 1 -----------------------------------------------------------------

def test_a_concurrent_prescreen_hides_behind_the_first_generation(  # type: ignore[no-untyped-def]
        proxy, tmp_path, fake_backend) -> None:
    backend = fake_backend[0]
    backend.latency_s = 0.6
    policy_file(tmp_path, "id: beside\nversion: 1\nextends: e2e\nprescreen: concurrent\n")
    base = proxy(policy="beside", judge={"kind": "latency-fake", "delay_s": 0.6})
    client = sdk(base)

    t0 = time.perf_counter()
    raw = client.images.with_raw_response.generate(prompt="a bowl of fruit")
    elapsed = time.perf_counter() - t0
    assert raw.parse().data[0].revised_prompt is None
    assert elapsed < 1.6  # prescreen 0.6 beside generation 0.6, then the image's 0.6 verdict
    t = trace(base, raw.headers["x-guard-trace-id"])
    assert [(r["kind"], r["cancelled"]) for r in t["rounds"]] == [
        ("prescreen", None), ("generate", None)]

    raw = client.images.with_raw_response.generate(prompt="gore in a bowl of fruit")
    assert raw.parse().data[0].revised_prompt == "paint in a bowl of fruit"
    # The generation of the unsafe prompt had started; it was cancelled, its image never seen.
    assert backend.prompts[-2:] == ["gore in a bowl of fruit", "paint in a bowl of fruit"]
    t = trace(base, raw.headers["x-guard-trace-id"])
    assert [(r["kind"], r["cancelled"]) for r in t["rounds"]] == [
        ("prescreen", None), ("generate", "the prescreen decided edit"), ("generate", None)]
    assert t["rounds"][1]["images"] == [] and t["decision"] == "edited"
    judge = MADE[-1]
    assert [i.prompt for b in judge.calls for i in b if i.image is not None] == [
        "a bowl of fruit", "paint in a bowl of fruit"]


# --- the deadline -----------------------------------------------------------------------------

def test_a_client_deadline_ends_the_request_with_a_traced_504(  # type: ignore[no-untyped-def]
        proxy, tmp_path, fake_backend) -> None:
    backend = fake_backend[0]
    backend.latency_s = 3.0
    policy_file(tmp_path, "id: slow\nversion: 1\nextends: e2e\n")
    base = proxy(policy="slow", judge={"kind": "latency-fake"})

    t0 = time.perf_counter()
    with pytest.raises(openai.APIStatusError) as info:
        sdk(base).images.generate(prompt="a bowl of fruit",
                                  extra_headers={"x-guard-deadline-s": "0.5"})
    assert time.perf_counter() - t0 < 1.5
    error = info.value
    assert error.status_code == 504 and error.code == "guard_deadline_exceeded"
    assert error.response.json()["error"]["type"] == "server_error"
    t = trace(base, error.response.headers["x-guard-trace-id"])
    assert (t["status"], t["decision"], t["error"]["code"]) == (
        504, "failed", "guard_deadline_exceeded")
    assert t["request"]["deadline_s"] == 0.5
    assert t["rounds"][-1]["cancelled"] == "the deadline passed"


def test_a_policy_deadline_applies_and_a_bad_header_is_refused(  # type: ignore[no-untyped-def]
        proxy, tmp_path, fake_backend) -> None:
    backend = fake_backend[0]
    backend.latency_s = 3.0
    policy_file(tmp_path, "id: quick\nversion: 1\nextends: e2e\nrounds: {deadline_s: 0.4}\n")
    base = proxy(policy="quick", judge={"kind": "latency-fake"})

    r = generate(base, {"prompt": "a bowl of fruit"})
    assert r.status_code == 504 and r.json()["error"]["code"] == "guard_deadline_exceeded"
    for bad in ("soon", "0", "-1", "nan", "inf"):
        r = httpx.post(f"{base}/v1/images/generations", json={"prompt": "a bowl of fruit"},
                       headers={"authorization": f"Bearer {CLIENT_KEY}",
                                "x-guard-deadline-s": bad})
        assert r.status_code == 400, bad
        assert r.json()["error"]["param"] == "x-guard-deadline-s"


def test_a_stream_past_its_deadline_ends_with_an_error_event(  # type: ignore[no-untyped-def]
        proxy, tmp_path, fake_backend) -> None:
    fake_backend[0].latency_s = 3.0
    policy_file(tmp_path, "id: slow\nversion: 1\nextends: e2e\n")
    base = proxy(policy="slow", judge={"kind": "latency-fake"})

    with pytest.raises(openai.APIError) as info:
        list(sdk(base).images.generate(prompt="a bowl of fruit", stream=True,
                                       extra_headers={"x-guard-deadline-s": "0.4"}))
    body = info.value.body
    assert body["code"] == "guard_deadline_exceeded"  # type: ignore[index]
    t = trace(base, body["trace_id"])  # type: ignore[index]
    assert (t["status"], t["decision"]) == (504, "failed")


def test_with_on_exhausted_drop_the_deadline_serves_the_safe_images(  # type: ignore[no-untyped-def]
        proxy, tmp_path, fake_backend) -> None:
    backend = fake_backend[0]
    backend.plan = [["red", "blue"]]
    policy_file(tmp_path, "id: dropping\nversion: 1\nextends: e2e\nprescreen: false\n"
                          "rounds: {on_exhausted: drop}\n")
    base = proxy(policy="dropping",
                 judge={"kind": "latency-fake", "delay_s": 0.4, "refine": "calm"})

    # Round 1 (judged in 0.4 s) fits the 0.7 s deadline; slot 0's second round would not.
    raw = sdk(base).images.with_raw_response.generate(
        prompt="a bowl of fruit", n=2, extra_headers={"x-guard-deadline-s": "0.7"})
    assert len(raw.parse().data) == 1
    guard = raw.http_response.json()["guard"]
    assert [(i["index"], i["decision"]) for i in guard["images"]] == [
        (0, "failed"), (1, "passed")]


# --- slots on their own clocks ----------------------------------------------------------------

def test_the_trace_keeps_each_images_own_round_and_writer(  # type: ignore[no-untyped-def]
        proxy, tmp_path, fake_backend) -> None:
    backend = fake_backend[0]
    backend.plan = [["red", "blue"]]
    policy_file(tmp_path, "id: own\nversion: 1\nextends: e2e\nterms: {violence: "
                          "{append: calm}}\n")
    base = proxy(policy="own", judge={"kind": "latency-fake", "refine": "same"})

    raw = sdk(base).images.with_raw_response.generate(prompt="a street", n=2)
    assert [d.revised_prompt for d in raw.parse().data] == ["a street, calm", None]
    body = raw.http_response.json()["guard"]
    assert body["rounds"] == 2
    assert [(i["index"], i["decision"], i["rounds"]) for i in body["images"]] == [
        (0, "edited", 2), (1, "passed", 1)]
    t = trace(base, raw.headers["x-guard-trace-id"])
    images = [(i["slot"], i["round"], i["refined_by"], r["kind"]) for r in t["rounds"]
              if r["kind"] != "prescreen" for i in r["images"]]
    assert images == [(0, 1, None, "generate"), (1, 1, None, "generate"),
                      (0, 2, "rules", "generate")]
    assert all(i["backend_ms"] > 0 for r in t["rounds"][1:] for i in r["images"])
    listed = httpx.get(f"{base}/v1/guard/traces", headers={
        "authorization": f"Bearer {ADMIN_KEY}"}).json()
    assert listed["data"][0]["rounds"] == 2


# --- hedging ----------------------------------------------------------------------------------

def test_a_hedged_borderline_prompt_is_served_from_its_refined_version(  # type: ignore[no-untyped-def]
        proxy, tmp_path, fake_backend) -> None:
    backend = fake_backend[0]
    backend.latency_s = 0.3
    backend.plan = [["red"], ["blue"]]  # the original comes out unsafe, the hedge safe
    policy_file(tmp_path, "id: hedged\nversion: 1\nextends: e2e\nprescreen: concurrent\n"
                          "hedge: {band: [0.3, 0.7]}\n")
    base = proxy(policy="hedged", judge={"kind": "latency-fake", "delay_s": 0.2})

    raw = sdk(base).images.with_raw_response.generate(prompt="a borderline street")
    assert raw.parse().data[0].revised_prompt == "a calm street"
    assert backend.prompts[:2] == ["a borderline street", "a calm street"]
    t = trace(base, raw.headers["x-guard-trace-id"])
    assert t["decision"] == "edited" and t["results"][0]["rounds"] == 1
    made = [(r["index"], r["hedge"], r["cancelled"]) for r in t["rounds"][1:]]
    assert made[:2] == [(1, False, None), (1, True, None)]
    assert all(c == "its images were served by another call" for _, _, c in made[2:])
    metrics = httpx.get(f"{base}/metrics", headers={
        "authorization": f"Bearer {ADMIN_KEY}"}).text
    assert 'guard_hedge_images_total{outcome="served"} 1.0' in metrics
