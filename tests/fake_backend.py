"""A real OpenAI-compatible image server for tests: a small Starlette app on uvicorn.

It records every request it receives and answers with real PNGs whose colour the test plans
per call (the marker judge reads that colour), or fails in the ways real backends fail.
"""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

COLOURS = {"blue": (30, 60, 200), "red": (255, 0, 0), "green": (0, 255, 0), "black": (0, 0, 0)}


def png(colour: str, size: int = 64, image_format: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), COLOURS[colour]).save(out, format=image_format)
    return out.getvalue()


@dataclass
class FakeBackend:
    """Per call i, `plan[i]` lists the colours of the images it returns (blue when unplanned)."""

    plan: list[list[str]] = field(default_factory=list)
    mode: str = "ok"  # ok | error500 | hang | badb64 | ratelimit | url | reject400
    size: int = 64
    latency_s: float = 0.0  # every generation takes this long, as a real model does
    image_format: str = "PNG"  # or JPEG, WEBP: what its base64 images are
    finish: Callable[[bytes], bytes] | None = None  # applied to each of them (its own manifest)
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/images/generations", self._generate, methods=["POST"]),
            Route("/v1/images/edits", self._edit, methods=["POST"]),
            Route("/v1/files/{name}", self._file, methods=["GET"]),
        ])

    async def _generate(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if self.mode == "error500":
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, 500)
        if self.mode == "ratelimit":
            return JSONResponse({"error": {"message": "slow down", "type": "rate_limit"}}, 429,
                                headers={"retry-after": "7"})
        if self.mode == "reject400":
            return JSONResponse({"error": {"message": "size not supported",
                                           "type": "invalid_request_error", "param": "size",
                                           "code": "invalid_size"}}, 400)
        if self.mode == "hang":
            await asyncio.sleep(30)
        n = int(body.get("n") or 1)
        call = len(self.requests) - 1
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        colours = self.plan[call] if call < len(self.plan) else []
        colours = (colours + ["blue"] * n)[:n]
        data: list[dict[str, Any]] = []
        for colour in colours:
            if self.mode == "badb64":
                data.append({"b64_json": "this is %% not base64!"})
            elif self.mode == "url":
                data.append({"url": f"{request.base_url}v1/files/{colour}.png"})
            else:
                data.append({"b64_json": self._b64(colour)})
        return JSONResponse({"created": 1700000000, "data": data})

    async def _edit(self, request: Request) -> Response:
        form = await request.form()
        body: dict[str, Any] = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        body["edit"] = True
        body["images"] = [await v.read() for k, v in form.multi_items()
                          if k in ("image", "image[]") and not isinstance(v, str)]
        self.requests.append(body)
        n = int(body.get("n") or 1)
        call = len(self.requests) - 1
        colours = ((self.plan[call] if call < len(self.plan) else []) + ["blue"] * n)[:n]
        return JSONResponse({"created": 1700000000, "data": [
            {"b64_json": self._b64(c)} for c in colours]})

    def _b64(self, colour: str) -> str:
        image = png(colour, self.size, self.image_format)
        return base64.b64encode(self.finish(image) if self.finish else image).decode()

    async def _file(self, request: Request) -> Response:
        return Response(png(request.path_params["name"].removesuffix(".png"), self.size),
                        media_type="image/png")

    @property
    def prompts(self) -> list[str]:
        return [r["prompt"] for r in self.requests]
