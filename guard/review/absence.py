"""Why a trace page shows no image where a round made one: the true reason, in words.

An image is kept when its policy's `image_retention` says so (guard.pipeline.engine) and the
audit store keeps images at all (guard.audit.images); a kept copy lasts `image_ttl_days`. So an
image is absent because the guard was off, its policy keeps hashes only, it was not flagged (or,
under `flagged_and_delivered`, neither flagged nor delivered, or its request had no flag), the
store kept no images when the trace was written, the copy was purged by retention, or the image
store does not answer. What the policy said is known only while that policy (same sha256) is
loaded; otherwise the page says so instead of guessing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from guard.audit.images import RetainedImages
from guard.core.types import JudgedImage, Trace

log = logging.getLogger("safeedit.review")


@dataclass
class Images:
    """The trace's round images: the shown ones' sha256, and the reason for each absent one."""

    shown: set[str] = field(default_factory=set)
    absent: dict[str, str] = field(default_factory=dict)


def _retention(trace: Trace, policies: Any) -> str | None:
    pid = trace.policy.get("id")
    if not pid or pid not in policies:
        return None
    policy = policies[pid]
    return policy.image_retention if policy.sha256 == trace.policy.get("sha256") else None


def _not_kept(trace: Trace, j: JudgedImage, retention: str | None, delivered: set[str]) -> str:
    setting = f" (image_retention: {retention})"
    if not trace.guard_enabled:
        return "not retained: the guard was off (passthrough), nothing was judged or kept"
    if retention is None:
        ref = trace.policy
        return (f"not retained: why is not known here, as policy {ref.get('id')} version "
                f"{ref.get('version')} (this sha256) is not loaded")
    if retention == "none":
        return "not retained: hash only by policy" + setting
    if retention == "flagged" and not j.flagged:
        return "not retained: not flagged" + setting
    if retention == "flagged_and_delivered" and not j.flagged:
        if not trace.categories:
            return "not retained: its request had no flag" + setting
        if j.image_sha256 not in delivered:
            return "not retained: neither flagged nor delivered" + setting
    return ("not retained: the audit store kept no images when this trace was written "
            "(audit images_dir: null)")


async def round_images(trace: Trace, judged: Iterable[JudgedImage], policies: Any,
                       images: RetainedImages | None) -> Images:
    """Which of `judged` (the page's round images) can be shown, and why the others cannot."""
    out = Images()
    retention = _retention(trace, policies)
    delivered = {r.image_sha256 for r in trace.results
                 if r.image_sha256 and r.decision in ("passed", "edited")}
    for j in judged:
        sha = j.image_sha256
        if sha is None or sha in out.shown or sha in out.absent:
            continue
        if not j.image_ref:
            out.absent[sha] = _not_kept(trace, j, retention, delivered)
        elif images is None:
            out.absent[sha] = ("retained, but this proxy's audit store keeps no images now "
                               "(audit images_dir: null)")
        else:
            try:
                kept = await images.has(sha)
            except Exception as exc:  # noqa: BLE001 - the page shows the trace all the same
                log.warning("image store unavailable for trace %s: %s", trace.id,
                            type(exc).__name__)
                out.absent[sha] = f"image store unavailable ({type(exc).__name__}): try later"
                continue
            if kept:
                out.shown.add(sha)
            elif images.ttl_s is not None:
                out.absent[sha] = (f"purged by retention: copies are kept "
                                   f"{images.ttl_s / 86400:g} days (audit image_ttl_days)")
            else:
                out.absent[sha] = "deleted from the image store (kept without expiry)"
    return out
