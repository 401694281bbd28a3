"""The floor for any Python relay on this stack: a dozen lines of Starlette + httpx that forward
the request body and return the backend's bytes, no parsing, no judging, no audit.

Run: python benchmarks/min_relay.py PORT BACKEND_BASE_URL. `overhead.py` measures it beside the
guard, so the guard's own share of the passthrough cost can be read off one run.
"""

from __future__ import annotations

import sys

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def app(backend: str) -> Starlette:
    client = httpx.AsyncClient(base_url=backend, timeout=120)

    async def generate(request: Request) -> Response:
        upstream = await client.post("/images/generations", content=await request.body(),
                                     headers={"content-type": "application/json"})
        return Response(upstream.content, status_code=upstream.status_code,
                        media_type="application/json")

    async def ready(request: Request) -> Response:
        return Response("ok")

    return Starlette(routes=[Route("/v1/images/generations", generate, methods=["POST"]),
                             Route("/readyz", ready)])


if __name__ == "__main__":
    uvicorn.run(app(sys.argv[2]), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
                access_log=False)
