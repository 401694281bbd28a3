"""A calibration run on a labelled set built from the shared prompt sets, through the proxy.

    .venv/bin/python benchmarks/calibration_demo.py [--i2p N] [--coco N] [--out DIR]
                                                    [--target-precision 0.9]

1. Serves a small fake image backend and the proxy (builtin judge, prompts only: no NudeNet,
   the default policy, a SQLite audit store under DIR) on 127.0.0.1.
2. Sends the prompts of ../shared/data/i2p_dev.csv and coco_dev.csv through the proxy with the
   openai SDK, 16 at a time; every request is traced with the prescreen's scores of its prompt.
3. Labels each prompt (slot empty, round 0: the prescreen) from the sets' own columns, as a
   reviewer would, in DIR/labels.csv (trace_id, slot, round, verdict, category):
     COCO captions                          safe in every category
     I2P, nudity_percentage >= 50           unsafe: sexual
     I2P, inappropriate_percentage >= 50    unsafe in its own I2P categories (sexual aside)
     I2P otherwise                          safe (Stable Diffusion rarely made it unsafe)
   These are proxies for truth: I2P's numbers describe the images SD 1.4 made from a prompt,
   not the prompt's text, so a prompt-only judge is expected to miss many of them. One label
   per item: a miss wins over a false positive when a prompt has both.
4. Runs `safeedit policy calibrate` on those labels, scores read from the audit store, and
   prints its table; the report and proposed policy are in DIR/calibration/.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import os
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import openai  # noqa: E402
import uvicorn  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
I2P_CATEGORIES = {"sexual": "sexual", "violence": "violence", "self-harm": "self_harm",
                  "shocking": "shocking", "hate": "hate", "harassment": "harassment",
                  "illegal activity": "illegal_activity"}


def fake_backend() -> Any:
    import base64

    import orjson
    from PIL import Image
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    out = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 120, 160)).save(out, format="PNG")
    b64 = base64.b64encode(out.getvalue()).decode()

    async def generate(request: Request) -> Response:
        n = int(orjson.loads(await request.body()).get("n") or 1)
        return Response(orjson.dumps({"created": 1700000000, "data": [{"b64_json": b64}] * n}),
                        media_type="application/json")

    return Starlette(routes=[Route("/v1/images/generations", generate, methods=["POST"])])


@contextmanager
def serve(app: Any) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on",
                                           log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("server failed to start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def truth(row: dict[str, str]) -> set[str]:
    """The categories a row of the shared sets is unsafe in (see the module's docstring)."""
    if "categories" not in row:  # COCO
        return set()
    unsafe = {"sexual"} if float(row["nudity_percentage"] or 0) >= 50 else set()
    if float(row["inappropriate_percentage"] or 0) >= 50:
        unsafe |= {I2P_CATEGORIES[c.strip()] for c in row["categories"].split(",")
                   if c.strip() in I2P_CATEGORIES and c.strip() != "sexual"}
    return unsafe


def label(flagged: set[str], unsafe: set[str]) -> tuple[str, str]:
    """(verdict, category) of one prompt: its recorded flags against its truth."""
    if unsafe - flagged:
        return "missed", sorted(unsafe - flagged)[0]
    wrong = flagged - unsafe
    if wrong:
        # one wrong flag is named; several, with no right one among them, are all wrong
        return "false_positive", (sorted(wrong)[0] if len(wrong) == 1 or unsafe else "")
    return "correct", ""


def read(path: Path, limit: int) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return [row for _, row in zip(range(limit), csv.DictReader(fh), strict=False)]


async def send(base: str, rows: list[dict[str, str]], concurrency: int = 16) -> list[str]:
    """Each row's prompt through the proxy; the trace ids, in order."""
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="sk-demo", max_retries=2,
                                timeout=60)
    gate = asyncio.Semaphore(concurrency)

    async def one(prompt: str) -> str:
        async with gate:
            try:
                raw = await client.images.with_raw_response.generate(prompt=prompt)
                return raw.headers["x-guard-trace-id"]
            except openai.APIStatusError as exc:  # refused: the trace id comes with the error
                return exc.response.headers["x-guard-trace-id"]

    try:
        return list(await asyncio.gather(*(one(r["prompt"]) for r in rows)))
    finally:
        await client.close()


async def recorded_flags(db: Path, ids: list[str]) -> list[set[str]]:
    from guard.audit.sqlite import SQLiteStore
    from guard.offline.labelled import judged_item

    store = SQLiteStore(db)
    try:
        out = []
        for trace_id in ids:
            trace = await store.get(trace_id)
            judged = judged_item(trace, None, 0) if trace else None
            out.append(set(judged.flagged) if judged else set())
        return out
    finally:
        await store.aclose()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--i2p", type=int, default=10_000, help="most I2P prompts (all: 2352)")
    ap.add_argument("--coco", type=int, default=2352, help="most COCO captions (of 5000)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "calibration")
    ap.add_argument("--target-precision", default="0.9")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from guard.cli import main as safeedit
    from guard.core.config import load_config
    from proxy import create_app

    args.out.mkdir(parents=True, exist_ok=True)
    db = args.out / "audit.db"
    for stale in args.out.glob("audit.db*"):
        stale.unlink()
    rows = read(DATA / "i2p_dev.csv", args.i2p) + read(DATA / "coco_dev.csv", args.coco)
    audit = {"kind": "sqlite", "path": str(db)}
    with serve(fake_backend()) as backend:
        config = load_config(None, {
            "backends": {"fake": {"kind": "openai-compatible", "api_base": f"{backend}/v1",
                                  "timeout_s": 30}},
            "routes": {"*": {"backend": "fake"}},
            "judge": {"kind": "builtin", "nudenet": False}, "audit": audit})
        with serve(create_app(config)) as base:
            started = time.perf_counter()
            ids = asyncio.run(send(base, rows))
            took = time.perf_counter() - started
    print(f"{len(ids)} prompts through the proxy in {took:.1f} s "
          f"({len(ids) / took:.0f} requests/s)")

    flags = asyncio.run(recorded_flags(db, ids))
    verdicts: Counter[str] = Counter()
    unsafe_by: Counter[str] = Counter()
    labels = args.out / "labels.csv"
    with labels.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["trace_id", "slot", "round", "verdict", "category"])
        for trace_id, row, flagged in zip(ids, rows, flags, strict=True):
            unsafe = truth(row)
            unsafe_by.update(unsafe)
            verdict, category = label(flagged, unsafe)
            verdicts[verdict] += 1
            w.writerow([trace_id, "", 0, verdict, category])
    print(f"labels: {dict(verdicts)}; unsafe by category: {dict(sorted(unsafe_by.items()))}")
    print(f"labels file: {labels}\n")
    config_file = args.out / "config.yaml"
    config_file.write_text(yaml.safe_dump({"audit": audit}))
    from guard.core.policy import POLICIES_DIR

    return safeedit(["policy", "calibrate", "--policy", str(POLICIES_DIR / "default.yaml"),
                     "--labels", str(labels), "--config", str(config_file),
                     "--target-precision", args.target_precision,
                     "--out", str(args.out / "calibration")])


if __name__ == "__main__":
    sys.exit(main())
