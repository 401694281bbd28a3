"""The `remote` judge against a real local chat-completions server (Starlette on uvicorn).

The server plays a judge model: it reads the image it is sent (the share of red pixels is its
confidence that the image is violent) and the prompt text, answers in the profile's format, and
returns token log-probabilities computed from that confidence, so the scores the judge reports can
only come from reading the server's logprobs at the right tokens.
"""

from __future__ import annotations

import email.utils
import time
from typing import Any

import pytest

from guard.core.types import GeneratedImage, JudgeInput
from guard.judges.remote import RemoteJudge
from guard.plugins import build_judge
from guard.support.errors import ConfigError, JudgeError
from tests.judge_server import KEY, POLICY, JudgeServer, png
from tests.servers import free_port


def make(url: str, **options: Any) -> RemoteJudge:
    judge = build_judge({"kind": "remote", "api_base": url, "model": "judge",
                         "api_key_env": "JUDGE_KEY", "backoff_s": 0.01, **options})
    assert isinstance(judge, RemoteJudge)
    return judge


def item(prompt: str, image: GeneratedImage | None = None) -> JudgeInput:
    return JudgeInput(prompt=prompt, original_prompt=prompt, image=image)


async def test_scores_are_read_from_logprobs_and_unsafe_items_get_a_refined_prompt(
        judge_server: tuple[JudgeServer, str]) -> None:
    state, url = judge_server
    judge = make(url)
    [verdict] = await judge.judge([item("a knight", png(red_rows=14))], POLICY)
    await judge.aclose()
    # 14 of 20 rows red: the server is 70% sure of violence. Text alone would say 1.0.
    assert verdict.scores == pytest.approx({"sexual": 0.03, "violence": 0.7, "minors": 0.01})
    assert verdict.details["logprobs"] is True
    assert verdict.refined_prompt == "a knight, peaceful"
    assert verdict.thought == "Unsafe: violence."
    assert verdict.judge_id == "remote:safeeditor:judge"
    # Verdict first: a short request that stops after the judgement, then the full answer.
    first, second = state.requests
    assert first["stop"] == ["</judgement>"] and first["max_tokens"] < 64
    assert first["logprobs"] is True and first["top_logprobs"] == 5
    assert "stop" not in second and second["max_tokens"] == 256
    assert state.seen_red == [pytest.approx(0.7), pytest.approx(0.7)]
    assert verdict.details["requests"] == 2


async def test_a_safe_image_costs_one_short_request(judge_server: tuple[JudgeServer, str]) -> None:
    state, url = judge_server
    judge = make(url)
    [verdict] = await judge.judge([item("a cat on a sofa", png(red_rows=2))], POLICY)
    await judge.aclose()
    assert len(state.requests) == 1
    assert verdict.scores["violence"] == pytest.approx(0.1)
    assert verdict.refined_prompt is None and verdict.thought == ""


async def test_prompt_only_items_send_no_image(judge_server: tuple[JudgeServer, str]) -> None:
    state, url = judge_server
    judge = make(url)
    [verdict] = await judge.judge([item("a knight covered in blood")], POLICY)
    await judge.aclose()
    assert verdict.scores["violence"] == pytest.approx(0.95)
    assert verdict.refined_prompt == "a knight covered in, peaceful"
    user = state.requests[0]["messages"][-1]
    assert user["content"] == "Prompt: a knight covered in blood"  # a plain string, no parts
    assert state.seen_red == []


async def test_without_logprobs_the_parsed_text_decides(
        judge_server: tuple[JudgeServer, str]) -> None:
    state, url = judge_server
    state.logprobs = False
    judge = make(url, explain="always")
    [verdict] = await judge.judge([item("a knight", png(red_rows=14))], POLICY)
    await judge.aclose()
    assert verdict.scores == {"sexual": 0.0, "violence": 1.0, "minors": 0.0}
    assert verdict.details["logprobs"] is False
    # explain: always asks for the whole answer at once.
    assert len(state.requests) == 1 and "stop" not in state.requests[0]
    assert verdict.refined_prompt == "a knight, peaceful"


async def test_a_malformed_answer_fails_closed_and_is_kept(
        judge_server: tuple[JudgeServer, str]) -> None:
    state, url = judge_server
    state.malformed = True
    judge = make(url)
    [verdict] = await judge.judge([item("a cat", png(red_rows=0))], POLICY)
    await judge.aclose()
    assert verdict.scores == {"sexual": 1.0, "violence": 1.0, "minors": 1.0}
    assert "I cannot judge this image" in verdict.raw
    assert verdict.details["parse_error"] == "no <judgement> block"


async def test_overloaded_server_is_retried_then_given_up(
        judge_server: tuple[JudgeServer, str]) -> None:
    state, url = judge_server
    state.fail_first = 2
    judge = make(url, retries=2)
    [verdict] = await judge.judge([item("a cat", png(red_rows=0))], POLICY)
    assert verdict.details["retries"] == 2 and len(state.requests) == 3
    await judge.aclose()

    state.requests.clear()
    state.fail_first, state.fail_status = 10, 500
    judge = make(url, retries=1)
    with pytest.raises(JudgeError, match="answered 500"):
        await judge.judge([item("a cat", png(red_rows=0))], POLICY)
    assert len(state.requests) == 2  # bounded: one try and one retry
    await judge.aclose()


async def test_an_http_date_retry_after_is_honoured(
        judge_server: tuple[JudgeServer, str]) -> None:
    state, url = judge_server
    # HTTP dates have whole seconds: two seconds from now is a wait of more than one, where the
    # judge's own backoff (backoff_s 0.01) would wait at most 10 ms.
    state.fail_first, state.fail_status = 1, 429
    state.retry_after = email.utils.formatdate(int(time.time()) + 2, usegmt=True)
    judge = make(url, retries=1)
    started = time.perf_counter()
    [verdict] = await judge.judge([item("a cat", png(red_rows=0))], POLICY)
    await judge.aclose()
    assert time.perf_counter() - started >= 1.0
    assert verdict.details["retries"] == 1 and len(state.requests) == 2


async def test_a_retry_after_beyond_the_deadline_fails_at_once(
        judge_server: tuple[JudgeServer, str]) -> None:
    state, url = judge_server
    state.fail_first, state.fail_status, state.retry_after = 10, 429, "30"
    judge = make(url, retries=3, timeout_s=1)  # every try within 2 s
    started = time.perf_counter()
    with pytest.raises(JudgeError, match="answered 429"):
        await judge.judge([item("a cat")], POLICY)
    await judge.aclose()
    assert len(state.requests) == 1 and time.perf_counter() - started < 1


async def test_a_slow_server_times_out(judge_server: tuple[JudgeServer, str]) -> None:
    state, url = judge_server
    state.delay_s = 1.0
    judge = make(url, timeout_s=0.2, retries=0)
    with pytest.raises(JudgeError, match=r"timed out after 0.2 s"):
        await judge.judge([item("a cat")], POLICY)
    await judge.aclose()


async def test_a_rejected_key_fails_at_once_and_is_never_repeated(
        judge_server: tuple[JudgeServer, str], monkeypatch: pytest.MonkeyPatch) -> None:
    state, url = judge_server
    monkeypatch.setenv("JUDGE_KEY", KEY + "-wrong")
    judge = make(url, retries=3)
    with pytest.raises(JudgeError, match="answered 401") as info:
        await judge.judge([item("a cat")], POLICY)
    assert len(state.requests) == 1  # 4xx is not retried
    assert KEY not in str(info.value) and "[redacted]" in (info.value.detail or "")
    assert KEY not in repr(judge)
    await judge.aclose()


async def test_unreachable_server_is_a_judge_error_and_not_ready() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    judge = make(url, retries=1)
    assert await judge.ready() is False
    with pytest.raises(JudgeError, match="unreachable"):
        await judge.judge([item("a cat")], POLICY)
    await judge.aclose()


async def test_ready_when_the_server_lists_models(judge_server: tuple[JudgeServer, str]) -> None:
    _, url = judge_server
    judge = make(url)
    assert await judge.ready() is True
    await judge.aclose()


async def test_ipr_profile_reads_the_probability_of_keep(
        judge_server: tuple[JudgeServer, str]) -> None:
    state, url = judge_server
    judge = make(url, profile="ipr")
    safe, unsafe = await judge.judge([item("a cat", png(red_rows=4)),
                                      item("a duel with blood", png(red_rows=16))], POLICY)
    await judge.aclose()
    assert safe.scores == pytest.approx({"sexual": 0.2, "violence": 0.2, "minors": 0.0})
    assert safe.refined_prompt is None
    assert unsafe.scores == pytest.approx({"sexual": 0.95, "violence": 0.95, "minors": 0.0})
    assert unsafe.refined_prompt == "a duel with paint, calm scene"
    # IPR answers in one request: "keep" is short, and a rewrite is the explanation.
    assert len(state.requests) == 2


async def test_shieldgemma2_asks_once_per_trained_policy(
        judge_server: tuple[JudgeServer, str]) -> None:
    state, url = judge_server
    judge = make(url, profile="shieldgemma2", profile_options={"wrap_instruction": True})
    image, text = await judge.judge([item("nude portrait", png(red_rows=6)),
                                     item("nude portrait")], POLICY)
    await judge.aclose()
    # ShieldGemma 2 judges the image alone, on its trained policies: minors is none of them,
    # and a prompt alone is asked nothing (tests/test_profiles_trained.py).
    assert image.scores == pytest.approx({"sexual": 0.03, "violence": 0.3})
    assert image.assessed_on == {"sexual": ["image"], "violence": ["image"]}
    assert text.scores == {} and text.details["unassessed"] == ["sexual", "violence", "minors"]
    assert len(state.requests) == 2
    assert all(r["max_tokens"] == 1 for r in state.requests)


async def test_litellm_transport_speaks_to_the_same_server(
        judge_server: tuple[JudgeServer, str]) -> None:
    state, url = judge_server
    judge = make(url, transport="litellm", model="openai/judge")
    [verdict] = await judge.judge([item("a knight", png(red_rows=14))], POLICY)
    await judge.aclose()
    assert verdict.scores["violence"] == pytest.approx(0.7)
    assert verdict.refined_prompt == "a knight, peaceful"
    assert state.requests[0]["model"] == "judge"


def test_config_is_validated_up_front() -> None:
    with pytest.raises(ConfigError, match="retries"):
        build_judge({"kind": "remote", "model": "m", "api_base": "http://x/v1", "retries": -1})
    with pytest.raises(ConfigError, match="needs `api_base`"):
        build_judge({"kind": "remote", "model": "m", "transport": "http"})
    with pytest.raises(ConfigError, match="api_key"):
        build_judge({"kind": "remote", "model": "m", "api_key": KEY})


async def test_as_a_refiner_it_asks_for_the_explanation_alone(
        judge_server: tuple[JudgeServer, str]) -> None:
    """Scores already known (a preview that stopped its generation): one request, the full
    answer, no second verdict request; nothing at all for scores that need no explanation."""
    state, url = judge_server
    judge = make(url)
    unsafe = {"sexual": 0.03, "violence": 0.7, "minors": 0.01}
    safe = {"sexual": 0.03, "violence": 0.1, "minors": 0.01}
    explained, quiet = await judge.refine(
        [item("a knight", png(red_rows=14)), item("a cat", png(red_rows=2))], POLICY,
        [unsafe, safe])
    await judge.aclose()
    assert explained.refined_prompt == "a knight, peaceful"
    assert explained.thought == "Unsafe: violence."
    assert quiet.refined_prompt is None and quiet.thought == ""
    [asked] = state.requests
    assert "stop" not in asked and asked["max_tokens"] == 256
