"""CPU cost of a C2PA manifest on a 1024x1024 image (guard.provenance.Marker.mark), and of
reading it back (`safeedit verify-image`'s read_image). Goal: <= 8 ms CPU to mark a PNG.

    python benchmarks/provenance.py [--rounds 30]

Images: the benchmark's noisy 1024x1024 PNG (benchmarks/fake_image_server.py; noise keeps it
near the size of a real generated PNG), and the same pixels as a JPEG and a WebP of quality 90.
Signing uses the development chain (ES256) made in a temporary folder. CPU time is the
process's (user + system, all threads; resource.getrusage), the median of `--rounds` rounds in
which each case takes its turn, so that a machine shared with other work weighs on all alike.
"mark x4 in threads" is what one n=4 request costs (the pipeline marks its images at once in
worker threads): CPU for all four, and the wall time they took together.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import c2pa
from fake_image_server import make_png  # benchmarks/ is on sys.path when run as a script
from PIL import Image

from guard.core.config import ProvenanceConfig
from guard.provenance import Facts, Marker, read_image

FACTS = Facts(trace_id="tr_" + "0" * 32, policy={"id": "default", "version": 3,
                                                  "sha256": "ab" * 32},
              decision="edited", rounds=2, categories=("violence",), log_id="cd" * 32)


def cpu_ms() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return (r.ru_utime + r.ru_stime) * 1000


def measure(cases: dict[str, Callable[[], Any]], rounds: int) -> dict[str, tuple[float, float]]:
    """(median CPU ms, median wall ms) of each case, the cases taking turns."""
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in cases}
    for fn in cases.values():
        fn()  # warm up
    for _ in range(rounds):
        for name, fn in cases.items():
            cpu, wall = cpu_ms(), time.perf_counter()
            fn()
            times[name].append((cpu_ms() - cpu, (time.perf_counter() - wall) * 1000))
    return {k: (statistics.median(c for c, _ in v), statistics.median(w for _, w in v))
            for k, v in times.items()}


def encoded(png: bytes, image_format: str) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(png)).save(out, format=image_format, quality=90)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    png = make_png(1024)
    images = {"PNG": png, "JPEG": encoded(png, "JPEG"), "WebP": encoded(png, "WEBP")}
    with tempfile.TemporaryDirectory() as keys:
        marker = Marker(ProvenanceConfig(), keys_dir=Path(keys))
        marked = {k: marker.mark(v, FACTS) for k, v in images.items()}
        pool = ThreadPoolExecutor(4)
        cases: dict[str, Callable[[], Any]] = {}
        for name, data in images.items():
            cases[f"mark {name} ({len(data) / 1e6:.2f} MB)"] = (
                lambda data=data: marker.mark(data, FACTS))
        cases["mark PNG x4 in threads"] = lambda: list(pool.map(
            lambda d: marker.mark(d, FACTS), [png] * 4))
        cases["  of which sha256 of the image"] = lambda: hashlib.sha256(png).hexdigest()
        cases["  of which the check for a backend's manifest"] = lambda: c2pa.Reader.try_create(
            "image/png", io.BytesIO(png))
        cases["read_image PNG (verify-image)"] = lambda: read_image(marked["PNG"])
        cases["read_image JPEG"] = lambda: read_image(marked["JPEG"])
        results = measure(cases, args.rounds)
        pool.shutdown()
    print(f"C2PA on a 1024x1024 image, median of {args.rounds} rounds, "
          f"{os.cpu_count()} CPUs (shared machines weigh on every case alike)")
    print(f"{'case':45s} {'CPU ms':>8s} {'wall ms':>8s}")
    for name, (cpu, wall) in results.items():
        print(f"{name:45s} {cpu:8.2f} {wall:8.2f}")
    print(f"manifest adds {len(marked['PNG']) - len(png)} bytes to the PNG, "
          f"{len(marked['JPEG']) - len(images['JPEG'])} to the JPEG")


if __name__ == "__main__":
    main()
