"""OpenAI's image API with `stream: true` for tests/test_partials.py, served by uvicorn
(tests.servers): it streams OpenAI's image SSE, or misbehaves as a test asks, and records what
the guard asked for and whether the guard hung up before the end.

It paints by the prompt: `MARKRED` makes every partial and the final image red (the marker
judge's violence), `LATERED` a blue first partial and red ones after; a prompt with `calm` (the
marker judge's refinement) is blue throughout.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

COLOURS = {"red": (255, 0, 0), "blue": (30, 60, 200)}


def b64png(colour: str) -> str:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), COLOURS[colour]).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def colours_for(prompt: str, partials: int) -> tuple[list[str], str]:
    if "calm" in prompt:
        return ["blue"] * partials, "blue"
    if "MARKRED" in prompt:
        return ["red"] * partials, "red"
    if "LATERED" in prompt:
        return ["blue"] + ["red"] * (partials - 1), "red"
    return ["blue"] * partials, "blue"


@dataclass
class StreamServer:
    """OpenAI's image API with `stream: true`, misbehaving as `mode` says: stream | json (ignores
    stream) | malformed | cut (ends mid-stream) | error | badpartial | refuse (a 400 for a stream,
    `refuse_code`). With `indexed`, events name their image (`image_index`); `red_image` paints
    that image of the call red unless the prompt says calm."""

    mode: str = "stream"
    gap_s: float = 0.05
    secret: str = ""
    indexed: bool = False
    red_image: int | None = None
    refuse_code: str = "unsupported_parameter"
    requests: list[dict[str, Any]] = field(default_factory=list)
    closed_early: list[int] = field(default_factory=list)  # streamed requests the guard hung up
    completed: list[int] = field(default_factory=list)     # streamed requests sent to the end

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/images/generations", self.generate,
                                       methods=["POST"])])

    def streamed(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r.get("stream")]

    async def generate(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        partials, n = int(body.get("partial_images") or 0), int(body.get("n") or 1)
        prompt = str(body["prompt"])
        images = [colours_for("MARKRED" if i == self.red_image and "calm" not in prompt
                              else prompt, partials) for i in range(n)]
        if not body.get("stream") or self.mode == "json":
            return JSONResponse({"created": 1, "data": [{"b64_json": b64png(final)}
                                                         for _, final in images]})
        if self.mode == "refuse":
            return JSONResponse({"error": {"message": "no", "type": "invalid_request_error",
                                           "code": self.refuse_code, "param": None}}, 400)
        return StreamingResponse(self.events(len(self.requests) - 1, images),
                                 media_type="text/event-stream")

    async def events(self, number: int, images: list[tuple[list[str], str]]
                     ) -> AsyncIterator[str]:
        try:
            if self.mode == "malformed":
                yield "data: {this is not json\n\n"
                yield "event: image_generation.partial_image\ndata: {\"b64_json\": 5}\n\n"
                yield "event: image_generation.completed\ndata: {\"type\": \"image_gen"
                return
            if self.mode == "error":
                error = {"message": f"invalid key {self.secret}", "type": "server_error",
                         "code": "boom"}
                yield sse("error", {"type": "error", "error": error})
                return
            for k in range(len(images[0][0])):
                await asyncio.sleep(self.gap_s)
                for i, (colours, _) in enumerate(images):
                    data = b64png(colours[k]) if self.mode != "badpartial" else "%% no b64 %%"
                    yield sse("image_generation.partial_image", {
                        "type": "image_generation.partial_image", "b64_json": data,
                        "partial_image_index": k, "size": "32x32", **self.index(i)})
                if self.mode == "cut":
                    return
            await asyncio.sleep(self.gap_s)
            for i, (_, final) in enumerate(images):
                yield sse("image_generation.completed", {
                    "type": "image_generation.completed", "b64_json": b64png(final),
                    "usage": {"total_tokens": 0}, **self.index(i)})
            self.completed.append(number)
        except (asyncio.CancelledError, GeneratorExit):
            self.closed_early.append(number)
            raise


    def index(self, i: int) -> dict[str, int]:
        return {"image_index": i} if self.indexed else {}


def sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"
