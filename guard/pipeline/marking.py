"""The images a request delivers, each with its C2PA manifest (guard.provenance), marked before
the trace is written so that the trace holds what was delivered: per slot, `delivered_sha256`
(the marked bytes) beside `image_sha256` (the image as generated and judged), and `provenance`.

Signing is CPU work in the native c2pa library: each image is marked in a worker thread, all of
a request's images at once, never on the event loop. A failure follows `provenance.on_error`:
`refuse` raises ProvenanceFailed (no image leaves), `unmarked` delivers that image as generated
and says so in its slot's result; an image never leaves unmarked without its trace saying so.
"""

from __future__ import annotations

import asyncio
import logging

from guard.core.types import GeneratedImage, SlotResult, Trace
from guard.pipeline.run import FinalImage
from guard.provenance import Facts, Marker
from guard.support.errors import ProvenanceFailed

log = logging.getLogger("safeedit.provenance")


async def mark_images(marker: Marker, finals: list[FinalImage], trace: Trace, *,
                      encode: bool) -> list[GeneratedImage]:
    """`finals`' images as delivered; `encode`: also make their base64 off the event loop."""
    results = {r.slot: r for r in trace.results}
    marked = await asyncio.gather(
        *(asyncio.to_thread(_mark, marker, final.image, _facts(marker, trace, results[final.slot]),
                            encode) for final in finals),
        return_exceptions=True)
    delivered: list[GeneratedImage] = []
    refusal: ProvenanceFailed | None = None
    for final, got in zip(finals, marked, strict=True):
        result = results[final.slot]
        if isinstance(got, GeneratedImage):
            result.provenance, image = "c2pa", got
        elif isinstance(got, ProvenanceFailed):
            why = got.detail or got.message
            if marker.refuses:
                result.provenance = f"failed: {why}"
                refusal = refusal or got
                continue
            log.warning("trace %s: image %d delivered without its C2PA manifest (%s)",
                        trace.id, final.slot, why)
            result.provenance, image = f"unmarked: {why}", final.image
        else:
            raise got
        result.delivered_sha256 = image.sha256
        delivered.append(image)
    if refusal is not None:
        raise refusal
    return delivered


def _facts(marker: Marker, trace: Trace, result: SlotResult) -> Facts:
    return Facts(trace_id=trace.id, policy=trace.policy, decision=result.decision,
                 rounds=result.rounds, categories=tuple(result.categories), log_id=marker.log_id)


def _mark(marker: Marker, image: GeneratedImage, facts: Facts, encode: bool) -> GeneratedImage:
    marked = GeneratedImage(data=marker.mark(image.data, facts), media_type=image.media_type,
                            backend_revised_prompt=image.backend_revised_prompt)
    marked.sha256  # noqa: B018 - hashed here, in the worker thread
    if encode:
        marked.b64_bytes  # noqa: B018 - likewise its base64
    return marked
