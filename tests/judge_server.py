"""A real local chat-completions server that plays a judge model, for the `remote`, composite and
fleet judge tests: it reads the image it is sent (the share of red pixels is its confidence that
the image is violent) and the prompt text, answers in the profile's format, and returns token
log-probabilities computed from that confidence, so the scores a judge reports can only come from
reading the server's logprobs at the right tokens."""

from __future__ import annotations

import asyncio
import base64
import io
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from guard.core.policy import Policy
from guard.core.types import GeneratedImage
from guard.judges.profiles import IPR_SYSTEM
from tests.servers import serve

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
    headers: list[dict[str, str]] = field(default_factory=list)
    seen_red: list[float] = field(default_factory=list)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"]),
                                 Route("/v1/models", self.models, methods=["GET"])])

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "judge", "object": "model"}]})

    async def chat(self, request: Request) -> JSONResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
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
                q = p.get(c, 0.02)  # a category it has no rule for: safe
                tokens += [(c, None), (":", None), (" yes" if q >= 0.5 else " no", q),
                           ("\n", None)]
            unsafe = [c for c in cats if p.get(c, 0.02) >= 0.5]
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
        # shieldgemma2: one trained policy per request, in its fixed wording
        trained = {"No Sexually Explicit content": "sexual", "No Violence/Gore content": "violence",
                   "No Dangerous Content": "dangerous"}
        cat = next((c for words, c in trained.items() if words in user), "")
        p["violence"] = max(red or 0.0, 0.02)  # its policy's own words name blood
        q = p.get(cat, 0.02 if cat == "dangerous" else 0.5)
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
def judge_server_process() -> Iterator[tuple[JudgeServer, str]]:
    """One judge server per test module (registered for every test module in conftest.py)."""
    state = JudgeServer()
    with serve(state.app()) as url:
        yield state, url + "/v1"


@pytest.fixture
def judge_server(judge_server_process: tuple[JudgeServer, str],
                 monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[JudgeServer, str]]:
    """The module's judge server, reset to its defaults, with its key in JUDGE_KEY."""
    state, url = judge_server_process
    fresh = JudgeServer()
    for name in fresh.__dataclass_fields__:
        setattr(state, name, getattr(fresh, name))
    monkeypatch.setenv("JUDGE_KEY", KEY)
    yield state, url
