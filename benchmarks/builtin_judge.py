"""CPU cost of the builtin judge's image path: decode + NudeNet per 1024x1024 PNG.

    python benchmarks/builtin_judge.py [--images 40] [--threads 1]

Prints CPU ms (process time, all threads) and wall ms per image, one image per call and in
batches of 4, and the share spent decoding.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import time

import numpy as np
from PIL import Image

from guard.core.policy import POLICIES_DIR, load_policy
from guard.core.types import GeneratedImage, JudgeInput
from guard.judges.builtin import BuiltinJudge, NudityDetector


def make_png(seed: int, size: int = 1024) -> bytes:
    """A picture-like image: smooth colour fields with shapes and mild noise, as PNG."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.stack([120 + 100 * np.sin(6 * x + seed), 120 + 100 * np.cos(5 * y),
                    128 + 80 * np.sin(4 * (x + y))], -1)
    img += rng.normal(0, 4, img.shape)
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    pngs = [make_png(i) for i in range(args.images)]
    print(f"{len(pngs)} PNGs of 1024x1024, {np.mean([len(p) for p in pngs]) / 1e6:.2f} MB each")
    policy = load_policy(POLICIES_DIR / "default.yaml")
    judge = BuiltinJudge(threads=args.threads)
    await judge.start()
    items = [JudgeInput(prompt="a landscape", original_prompt="a landscape",
                        image=GeneratedImage(data=p)) for p in pngs]
    await judge.judge(items[:2], policy)  # warm up
    t0, c0 = time.perf_counter(), time.process_time()
    for p in pngs:
        NudityDetector.decode(p)
    decode_cpu = (time.process_time() - c0) / len(pngs) * 1000
    for batch in (1, 4):
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(0, len(items), batch):
            await judge.judge(items[i:i + batch], policy)
        cpu = (time.process_time() - c0) / len(items) * 1000
        wall = (time.perf_counter() - t0) / len(items) * 1000
        print(f"batch {batch}: {cpu:.1f} CPU ms / image, {wall:.1f} wall ms / image "
              f"(decode alone {decode_cpu:.1f} CPU ms)")
    await judge.aclose()


if __name__ == "__main__":
    asyncio.run(main())
