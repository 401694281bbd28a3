"""A real image server for the adapter tests, served by uvicorn on 127.0.0.1 (tests.servers).

It speaks the OpenAI images API (and Azure's deployment paths), serves files for URL answers,
and misbehaves on request the way real providers do: fails the first k calls, rate limits with
Retry-After, hangs, redirects. It counts calls and how many were in flight at once.
"""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import threading
import zlib
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route


def png(colour: tuple[int, int, int] = (30, 60, 200), size: tuple[int, int] = (64, 64)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def png_bomb(side: int) -> bytes:
    """A real PNG of side x side 1-bit pixels, all black: tens of KB that decode to side^2."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    row = b"\x00" * (1 + (side + 7) // 8)
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body)
            + chunk(b"IEND", b""))


@dataclass
class ImageServer:
    fail_first: int = 0                 # the first k generation/edit calls fail with fail_status
    fail_status: int = 500
    retry_after: str | None = None      # sent with a 429
    error_code: str | None = None       # `code` and `param` of the failures' error object
    error_param: str | None = None
    hang_s: float = 0.0                 # every call sleeps this long first
    answer: str = "b64"                 # b64 | url (a file served by this server)
    url_for: str = "image.png"          # the file named in URL answers
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)
    base_url: str = ""
    file_requests: list[dict[str, str]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/images/generations", self._generate, methods=["POST"]),
            Route("/v1/images/edits", self._edit, methods=["POST"]),
            Route("/openai/deployments/{deployment}/images/generations", self._generate,
                  methods=["POST"]),
            Route("/files/{name}", self._file, methods=["GET"]),
        ])

    @property
    def calls(self) -> int:
        return len(self.requests)

    async def _generate(self, request: Request) -> Response:
        body = await request.json()
        body["path"] = request.url.path
        body["query"] = dict(request.query_params)
        return await self._answer(request, body)

    async def _edit(self, request: Request) -> Response:
        form = await request.form()
        body: dict[str, Any] = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        body["files"] = {k: [] for k, v in form.multi_items() if not isinstance(v, str)}
        for key, value in form.multi_items():
            if not isinstance(value, str):
                body["files"][key].append(await value.read())
        return await self._answer(request, body)

    async def _answer(self, request: Request, body: dict[str, Any]) -> Response:
        with self._lock:
            self.requests.append(body)
            self.headers.append(dict(request.headers))
            call = len(self.requests)
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.hang_s:
                await asyncio.sleep(self.hang_s)
            if call <= self.fail_first:
                headers = {"retry-after": self.retry_after} if self.retry_after else {}
                error = {"message": f"failure {call}", "type": "server_error",
                         "code": self.error_code, "param": self.error_param}
                return JSONResponse({"error": error}, self.fail_status, headers=headers)
            n = int(body.get("n") or 1)
            if self.answer == "url":
                data = [{"url": f"{self.base_url}/files/{self.url_for}"} for _ in range(n)]
            else:
                data = [{"b64_json": base64.b64encode(png()).decode()} for _ in range(n)]
            return JSONResponse({"created": 1700000000, "data": data})
        finally:
            with self._lock:
                self.in_flight -= 1

    async def _file(self, request: Request) -> Response:
        name = request.path_params["name"]
        self.file_requests.append(dict(request.headers))
        if name in self.redirects:
            return RedirectResponse(self.redirects[name], status_code=302)
        if name not in self.files:
            return Response(png(), media_type="image/png")
        content, media_type = self.files[name]
        if name.startswith("stream-"):  # no content-length: the size shows only while reading
            chunks = [content[i:i + 65536] for i in range(0, len(content), 65536)]
            return StreamingResponse(iter(chunks), media_type=media_type)
        return Response(content, media_type=media_type)
