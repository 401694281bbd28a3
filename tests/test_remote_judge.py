"""The `remote` judge against a real local chat-completions server (Starlette on uvicorn).

The server plays a judge model: it reads the image it is sent (the share of red pixels is its
confidence that the image is violent) and the prompt text, answers in the profile's format, and
returns token log-probabilities computed from that confidence, so the scores the judge reports can
only come from reading the server's logprobs at the right tokens.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from guard.errors import ConfigError, JudgeError
from guard.judges import build_judge
from guard.judges.profiles import IPR_SYSTEM
from guard.judges.remote import RemoteJudge
from guard.policy import Policy
from guard.types import GeneratedImage, JudgeInput
from tests.servers import free_port, serve

KEY = "sk-judge-secret-123"
POLICY = Policy.model_validate({"id": "t", "version": 1, "categories": {
    "sexual": {"threshold": 0.5, "action": "edit"},
    "violence": {"threshold": 0.6, "action": "edit"},
    "minors": {"threshold": 0.1, "action": "refuse"}}})
TOKEN = re.compile(r" ?[A-Za-z0-9_]+|\n| |[^A-Za-z0-9_\s]")


@dataclass
class JudgeServer:
    """State and behaviour of the fake judge model server, changed per test."""

    fail_first: int = 0                 # answer 503 to this many requests first
    fail_status: int = 503
    retry_after: str = "0"              # sent with those failures
    delay_s: float = 0.0
    logprobs: bool = True
    malformed: bool = False
    requests: list[dict[str, Any]] = field(default_factory=list)
    seen_red: list[float] = field(default_factory=list)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"]),
                                 Route("/v1/models", self.models, methods=["GET"])])

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "judge", "object": "model"}]})

    async def chat(self, request: Request) -> JSONResponse:
        body = await request.json()
        self.requests.append(body)
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return JSONResponse({"error": {"message": f"Incorrect API key provided: "
                                           f"{request.headers.get('authorization')}",
                                           "type": "invalid_request_error"}}, 401)
        if len(self.requests) <= self.fail_first:
            return JSONResponse({"error": {"message": "overloaded"}}, self.fail_status,
                                headers={"retry-after": self.retry_after})
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        system, user, red = "", "", None
        for m in body["messages"]:
            content = m["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                if part["type"] == "text":
                    if m["role"] == "system":
                        system += part["text"]
                    elif m["role"] == "user":
                        user = part["text"]
                elif part["type"] == "image_url":
                    red = red_share(part["image_url"]["url"])
                    self.seen_red.append(red)
        answer = self.answer(system, user, red)
        return JSONResponse(completion(answer, body, self.logprobs))

    def answer(self, system: str, user: str, red: float | None) -> list[tuple[str, float | None]]:
        """The answer as (token text, P(unsafe) at that token or None)."""
        if self.malformed:
            return [(t, None) for t in TOKEN.findall("I cannot judge this image, sorry.")]
        p_violence = max(red or 0.0, 0.95 if "blood" in user else 0.02)
        p = {"sexual": 0.9 if "nude" in user else 0.03, "violence": p_violence, "minors": 0.01}
        if system.startswith("You are SafeEditor"):
            cats = re.findall(r"^- ([a-z_]+):", system, re.M)
            tokens: list[tuple[str, float | None]] = [("<", None), ("judgement", None),
                                                      (">", None), ("\n", None)]
            for c in cats:
                tokens += [(c, None), (":", None),
                           (" yes" if p[c] >= 0.5 else " no", p[c]), ("\n", None)]
            unsafe = [c for c in cats if p[c] >= 0.5]
            refined = re.sub(r"\bblood\w*\b", "", user.split("\n")[0].removeprefix("Prompt: "))
            rest = ("</judgement>\n<thought>" + (f"Unsafe: {', '.join(unsafe)}." if unsafe
                                                 else "Nothing unsafe.")
                    + "</thought>\n<refined_prompt>"
                    + (refined.strip() + ", peaceful" if unsafe else "none")
                    + "</refined_prompt>")
            return tokens + [(t, None) for t in TOKEN.findall(rest)]
        if system == IPR_SYSTEM:
            prompt = user.removeprefix("Original Prompt: ")
            if p_violence < 0.5:
                return [("keep", p_violence)]
            words = TOKEN.findall(prompt.replace("blood", "paint") + ", calm scene")
            return [(words[0], p_violence)] + [(w, None) for w in words[1:]]
        # shieldgemma2: one category per request, named in its policy text
        name = re.search(r'"No (\w[\w ]*?) content"', user)
        cat = name.group(1).lower().replace(" ", "_") if name else ""
        q = p.get(cat, 0.5)
        return [("Yes" if q >= 0.5 else "No", q)]


def red_share(url: str) -> float:
    head, _, data = url.partition(",")
    assert head == "data:image/png;base64"
    image = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
    pixels = list(image.getdata())
    return sum(1 for r, g, b in pixels if r > 200 and g < 60 and b < 60) / len(pixels)


def completion(answer: list[tuple[str, float | None]], body: dict[str, Any],
               logprobs: bool) -> dict[str, Any]:
    text = "".join(t for t, _ in answer)
    for stop in body.get("stop") or []:
        if stop in text:  # OpenAI semantics: the stop sequence itself is not returned
            cut = text.index(stop)
            kept, length = [], 0
            for tok, q in answer:
                if length + len(tok) > cut:
                    break
                kept.append((tok, q))
                length += len(tok)
            answer, text = kept, text[:cut]
    answer = answer[:body.get("max_tokens") or len(answer)]
    text = "".join(t for t, _ in answer)
    choice: dict[str, Any] = {"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": text}}
    if logprobs and body.get("logprobs"):
        choice["logprobs"] = {"content": [token_logprobs(t, q, body.get("top_logprobs", 1))
                                          for t, q in answer]}
    return {"id": "chatcmpl-test", "object": "chat.completion", "model": body["model"],
            "choices": [choice],
            "usage": {"prompt_tokens": 100, "completion_tokens": len(answer),
                      "total_tokens": 100 + len(answer)}}


def token_logprobs(token: str, q: float | None, top: int) -> dict[str, Any]:
    if q is None:
        return {"token": token, "logprob": 0.0, "top_logprobs": [{"token": token, "logprob": 0.0}]}
    lead = " " if token.startswith(" ") else ""
    word = token.strip()
    pairs = {"yes": "no", "no": "yes", "Yes": "No", "No": "Yes"}
    if word in pairs:
        unsafe_tok = lead + ("Yes" if word[0].isupper() else "yes")
        safe_tok = lead + ("No" if word[0].isupper() else "no")
        options = [(unsafe_tok, q), (safe_tok, 1.0 - q)]
    else:  # ipr: "keep" against the first word of a rewrite
        options = [("keep", 1.0 - q), (token if token != "keep" else "A", q)]
    options.sort(key=lambda o: -o[1])
    entries = [{"token": t, "logprob": math.log(max(p, 1e-12))} for t, p in options][:top]
    chosen = next(e["logprob"] for e in entries if e["token"] == token) \
        if any(e["token"] == token for e in entries) else math.log(1e-12)
    return {"token": token, "logprob": chosen, "top_logprobs": entries}


def png(red_rows: int, size: int = 20) -> GeneratedImage:
    """A size x size image whose top `red_rows` rows are red, the rest white."""
    image = Image.new("RGB", (size, size), "white")
    for y in range(red_rows):
        for x in range(size):
            image.putpixel((x, y), (255, 0, 0))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return GeneratedImage(data=buf.getvalue())


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[JudgeServer, str]]:
    state = JudgeServer()
    with serve(state.app()) as url:
        yield state, url + "/v1"


@pytest.fixture
def judge_server(server: tuple[JudgeServer, str],
                 monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[JudgeServer, str]]:
    state, url = server
    fresh = JudgeServer()
    for name in fresh.__dataclass_fields__:
        setattr(state, name, getattr(fresh, name))
    monkeypatch.setenv("JUDGE_KEY", KEY)
    yield state, url


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


async def test_shieldgemma2_asks_once_per_category(judge_server: tuple[JudgeServer, str]) -> None:
    state, url = judge_server
    judge = make(url, profile="shieldgemma2", profile_options={"wrap_instruction": True})
    image, text = await judge.judge([item("nude portrait", png(red_rows=6)),
                                     item("nude portrait")], POLICY)
    await judge.aclose()
    # ShieldGemma 2 judges the image alone; the prompt counts only when there is no image.
    assert image.scores == pytest.approx({"sexual": 0.03, "violence": 0.3, "minors": 0.01})
    assert text.scores == pytest.approx({"sexual": 0.9, "violence": 0.02, "minors": 0.01})
    assert len(state.requests) == 6
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
