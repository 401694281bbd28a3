"""The fakes `loop_latency.py` measures the guard's loop against, with a latency model.

- FakeImageBackend: an OpenAI-compatible `POST /v1/images/generations` that takes `sleep_s` per
  call (the images of one call are made in parallel) and answers solid-colour PNGs that say what
  the prompt asked for: red = violent (unsafe, an `edit` category), green = hateful (a `refuse`
  category), blue = safe. With `stream: true` and `partial_images: k` it answers OpenAI's image
  SSE: `image_generation.partial_image` events at the fractions `partial_at` of `sleep_s` (already
  the final colour: an unsafe generation is visibly unsafe early), then `image_generation.completed`
  at `sleep_s`. With n > 1 every event also carries a non-standard `image_index`.
- FakeJudge: an OpenAI-compatible `POST /v1/chat/completions` that plays the `safeeditor` profile
  of the guard's `remote` judge: a verdict request (stopped at `</judgement>`, short max_tokens)
  takes `verdict_s`; anything else (the reasoning and refined prompt) takes `explain_s`. It reads
  the image's colour and the prompt's marker words, and answers the per-category checklist with
  token log-probabilities.

Marker words in a prompt (whole words):
  UNSAFE_k   the image is red; the refined prompt is UNSAFE_{k-1} (k = 1: the marker is dropped),
             so UNSAFE_k is fixed in k rounds
  STUCK      the image is red; the refined prompt is the prompt itself (the refiner has nothing new)
  ONE_OF_4   only image 0 of the call is red; the refined prompt drops the marker
  HATE_IMG   the image is green (hate: refused); the prompt itself reads as safe
  HATE_TEXT  the prompt itself scores 0.95 in `hate` (refused at the prescreen)
The prescreen (a text-only request) scores a prompt with UNSAFE_k, STUCK or ONE_OF_4 at 0.4 in
`violence`: under a 0.5 threshold (it passes) but inside a hedging band such as [0.3, 0.7].

Both fakes log every call (`calls`) with its start and end on time.perf_counter(), so a caller in
the same process can tell, per request, what the guard asked for and when. No `guard` import: the
guard's tree may be mid-refactor while this runs.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import re
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

Colour = Literal["red", "green", "blue"]
RGB: dict[Colour, tuple[int, int, int]] = {"red": (230, 20, 20), "green": (20, 210, 40),
                                           "blue": (30, 60, 220)}
EDIT_MARKER = re.compile(r"^UNSAFE_(\d+)$")
BORDERLINE = 0.4     # prescreen score of a marked prompt: passes a 0.5 threshold, inside a band
HIGH, LOW = 0.97, 0.02


def _png(colour: Colour, size: int = 64) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), RGB[colour]).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


PNG_B64: dict[Colour, str] = {c: _png(c) for c in RGB}


def colour_of_png(data: bytes) -> Colour | None:
    """Which of the three colours an image is (by its mean pixel); None if it is none of them."""
    image = Image.open(io.BytesIO(data)).convert("RGB").resize((8, 8))
    pixels = list(image.getdata())
    mean = tuple(sum(p[i] for p in pixels) / len(pixels) for i in range(3))
    for name, rgb in RGB.items():
        if all(abs(m - c) < 40 for m, c in zip(mean, rgb, strict=True)):
            return name
    return None


def image_colour(prompt: str, index: int) -> Colour:
    words = prompt.split()
    if "HATE_IMG" in words:
        return "green"
    if "ONE_OF_4" in words:
        return "red" if index == 0 else "blue"
    if "STUCK" in words or any(EDIT_MARKER.match(w) for w in words):
        return "red"
    return "blue"


def refine(prompt: str) -> str:
    """The fake judge's refined prompt (see the module docstring)."""
    out: list[str] = []
    for word in prompt.split():
        m = EDIT_MARKER.match(word)
        if m:
            if int(m.group(1)) > 1:
                out.append(f"UNSAFE_{int(m.group(1)) - 1}")
        elif word not in ("ONE_OF_4", "HATE_IMG", "HATE_TEXT"):
            out.append(word)
    return " ".join(out)


def scores(prompt: str, colour: Colour | None) -> dict[str, float]:
    """P(unsafe) per category, of the image when there is one, else of the prompt's text."""
    if colour is not None:
        return {"violence": HIGH if colour == "red" else LOW,
                "hate": HIGH if colour == "green" else LOW}
    words = prompt.split()
    marked = "STUCK" in words or "ONE_OF_4" in words or any(EDIT_MARKER.match(w) for w in words)
    return {"violence": BORDERLINE if marked else LOW,
            "hate": 0.95 if "HATE_TEXT" in words else LOW}


# --- the image backend ------------------------------------------------------------------------

@dataclass
class BackendCall:
    start: float
    prompt: str
    n: int
    stream: bool
    end: float | None = None
    closed_early: bool = False   # the guard hung up before the images were done


@dataclass
class FakeImageBackend:
    sleep_s: float = 0.5
    partial_at: tuple[float, ...] = (0.25, 0.6)
    calls: list[BackendCall] = field(default_factory=list)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/images/generations", self.generations,
                                       methods=["POST"])])

    def take_calls(self) -> list[BackendCall]:
        calls, self.calls = self.calls, []
        return calls

    def fractions(self, k: int) -> list[float]:
        if k <= len(self.partial_at):
            return list(self.partial_at[:k])
        return [(i + 1) / (k + 1) for i in range(k)]

    async def generations(self, request: Request) -> Response:
        body = await request.json()
        prompt, n = str(body.get("prompt", "")), int(body.get("n") or 1)
        colours = [image_colour(prompt, i) for i in range(n)]
        partials = int(body.get("partial_images") or 0)
        stream = bool(body.get("stream"))
        call = BackendCall(time.perf_counter(), prompt, n, stream)
        self.calls.append(call)
        sleep_s = self.sleep_s
        if stream:
            return StreamingResponse(self._events(call, colours, self.fractions(partials),
                                                  sleep_s, body),
                                     media_type="text/event-stream")
        # Sleep in steps, so that a guard hanging up (a cancelled generation) is seen.
        deadline = call.start + sleep_s
        while (left := deadline - time.perf_counter()) > 0:
            await asyncio.sleep(min(0.05, left))
            if await request.is_disconnected():
                call.closed_early, call.end = True, time.perf_counter()
                return Response(status_code=499)
        call.end = time.perf_counter()
        return JSONResponse({"created": int(time.time()),
                             "data": [{"b64_json": PNG_B64[c]} for c in colours]})

    async def _events(self, call: BackendCall, colours: Sequence[Colour],
                      fractions: Sequence[float], sleep_s: float, body: dict[str, Any]
                      ) -> AsyncIterator[str]:
        common = {"created_at": int(time.time()), "size": body.get("size") or "1024x1024",
                  "quality": body.get("quality") or "auto", "background": "opaque",
                  "output_format": "png"}
        try:
            for k, fraction in enumerate(fractions):
                await asyncio.sleep(max(0.0, call.start + fraction * sleep_s - time.perf_counter()))
                for i, colour in enumerate(colours):
                    yield _sse("image_generation.partial_image", {
                        "type": "image_generation.partial_image", "b64_json": PNG_B64[colour],
                        "partial_image_index": k, "image_index": i, **common})
            await asyncio.sleep(max(0.0, call.start + sleep_s - time.perf_counter()))
            for i, colour in enumerate(colours):
                yield _sse("image_generation.completed", {
                    "type": "image_generation.completed", "b64_json": PNG_B64[colour],
                    "image_index": i, **common,
                    "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                              "input_tokens_details": {"text_tokens": 0, "image_tokens": 0}}})
        except (asyncio.CancelledError, GeneratorExit):
            call.closed_early = True
            raise
        finally:
            call.end = time.perf_counter()


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


# --- the judge --------------------------------------------------------------------------------

@dataclass
class JudgeCall:
    start: float
    kind: Literal["verdict", "explain"]
    prompt: str
    colour: Colour | None       # None: a text-only request (the prescreen)
    end: float | None = None


@dataclass
class FakeJudge:
    verdict_s: float = 0.05
    explain_s: float = 0.15
    calls: list[JudgeCall] = field(default_factory=list)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"]),
                                 Route("/v1/models", self.models, methods=["GET"])])

    def take_calls(self) -> list[JudgeCall]:
        calls, self.calls = self.calls, []
        return calls

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "fake-judge", "object": "model"}]})

    async def chat(self, request: Request) -> JSONResponse:
        body = await request.json()
        system, prompt, colour = "", "", None
        for m in body["messages"]:   # the last user turn is the one judged (earlier: history)
            content = m["content"]
            parts: list[dict[str, Any]] = ([{"type": "text", "text": content}]
                                           if isinstance(content, str) else content)
            if m["role"] == "user":
                colour = None
            for part in parts:
                if part["type"] == "text" and m["role"] == "system":
                    system += part["text"]
                elif part["type"] == "text" and m["role"] == "user":
                    prompt = part["text"].split("\n")[0].removeprefix("Prompt: ")
                elif part["type"] == "image_url":
                    data = base64.b64decode(part["image_url"]["url"].partition(",")[2])
                    colour = colour_of_png(data)
        stop = body.get("stop") or []
        verdict = any("</judgement>" in s for s in stop) or int(body.get("max_tokens") or 0) <= 64
        call = JudgeCall(time.perf_counter(), "verdict" if verdict else "explain", prompt, colour)
        self.calls.append(call)
        await asyncio.sleep(self.verdict_s if verdict else self.explain_s)
        call.end = time.perf_counter()
        categories = re.findall(r"^- ([a-z_]+):", system, re.M) or ["violence", "hate"]
        p = scores(prompt, colour)
        tokens = _answer(categories, {c: p.get(c, LOW) for c in categories}, prompt, verdict)
        return JSONResponse(_completion(tokens, body))


def _answer(categories: Sequence[str], p: dict[str, float], prompt: str, verdict_only: bool
            ) -> list[tuple[str, float | None]]:
    """The answer as (token, P(unsafe) at that token or None)."""
    tokens: list[tuple[str, float | None]] = [("<judgement>", None), ("\n", None)]
    for c in categories:
        tokens += [(c, None), (":", None), (" yes" if p[c] >= 0.5 else " no", p[c]),
                   ("\n", None)]
    if verdict_only:
        return tokens  # stopped at </judgement>, which OpenAI's semantics leave out
    unsafe = [c for c in categories if p[c] >= 0.5]
    refined = refine(prompt)
    if not unsafe and refined == prompt:
        refined = "none"
    rest = ("</judgement>\n<thought>" + (f"Unsafe: {', '.join(unsafe)}." if unsafe
                                        else "Nothing unsafe.")
            + f"</thought>\n<refined_prompt>{refined}</refined_prompt>")
    return tokens + [(t, None) for t in re.findall(r" ?\S+|\n", rest)]


def _completion(answer: list[tuple[str, float | None]], body: dict[str, Any]) -> dict[str, Any]:
    text = "".join(t for t, _ in answer)
    choice: dict[str, Any] = {"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": text}}
    if body.get("logprobs"):
        top = int(body.get("top_logprobs") or 1)
        choice["logprobs"] = {"content": [_logprobs(t, q, top) for t, q in answer]}
    return {"id": "chatcmpl-bench", "object": "chat.completion", "model": body.get("model"),
            "choices": [choice],
            "usage": {"prompt_tokens": 100, "completion_tokens": len(answer),
                      "total_tokens": 100 + len(answer)}}


def _logprobs(token: str, q: float | None, top: int) -> dict[str, Any]:
    if q is None:
        return {"token": token, "logprob": 0.0, "top_logprobs": [{"token": token, "logprob": 0.0}]}
    options = sorted([(" yes", q), (" no", 1.0 - q)], key=lambda o: -o[1])
    entries = [{"token": t, "logprob": math.log(max(p, 1e-12))} for t, p in options]
    chosen = next(e["logprob"] for e in entries if e["token"] == token)
    return {"token": token, "logprob": chosen, "top_logprobs": entries[:top]}


# --- serving in a thread ----------------------------------------------------------------------

class ThreadServer:
    """A Starlette app served by uvicorn on 127.0.0.1:`port` in a daemon thread."""

    def __init__(self, app: Starlette, port: int) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                lifespan="off", access_log=False)
        self.server = uvicorn.Server(config)
        self.url = f"http://127.0.0.1:{port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"fake server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
