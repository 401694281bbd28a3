"""An OpenAI-compatible image server that answers every request with the same 1024x1024 PNG.

Run: python benchmarks/fake_image_server.py PORT [SIDE] (default 1024). The PNG is made once at start (smooth colour
with noise, ~2 MB, like a photo), so the server's own cost per request is small and constant.
"""

from __future__ import annotations

import base64
import io
import sys

import numpy as np
import orjson
import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def make_png(side: int = 1024, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    base = np.stack([x * 200, y * 180, (1 - x) * 160], axis=-1)
    noisy = np.clip(base + rng.normal(0, 18, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(noisy).save(out, format="PNG")
    return out.getvalue()


def app(side: int = 1024) -> Starlette:
    b64 = base64.b64encode(make_png(side)).decode()

    async def generate(request: Request) -> Response:
        body = orjson.loads(await request.body())
        n = int(body.get("n") or 1)
        return Response(orjson.dumps({"created": 1700000000, "data": [{"b64_json": b64}] * n}),
                        media_type="application/json")

    return Starlette(routes=[Route("/v1/images/generations", generate, methods=["POST"])])


if __name__ == "__main__":
    uvicorn.run(app(int(sys.argv[2]) if len(sys.argv) > 2 else 1024), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
                access_log=False)
