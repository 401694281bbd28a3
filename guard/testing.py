"""Fakes for in-process tests: real implementations of the contracts in guard.plugins.

As httpx's MockTransport is a real transport, each fake does the job its contract describes, only
small and in memory, so an engine, an exchange or an app built with them runs its real code paths
with no sockets, models or files:

    FakeBackend        Backend and EditingBackend: real 8x8 PNGs painted in the colour a marker
                       word of the prompt names ("a red apple" is red), the prompt kept in the PNG;
                       records its calls; can be slowed down or told to fail
    FakeJudge          Judge: scores each item per policy category by rules the test sets (a word
                       in the prompt, the image's colour); writes a thought and a refined prompt
                       only where `policy.wants_explanation` says so, as real judges do
    MemoryAuditStore   AuditStore: seals each trace into a hash chain; get, and query with every
                       TraceQuery filter, newest first, in pages
    MemoryImageStore   ImageStore: bytes by sha256 with expiries, on a clock the test may set

Each fake's `fail(error, times=...)` makes its next calls (all of them when `times` is None) raise
`error`, a GuardError as a real implementation raises; a fake that records its calls still does.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from guard.audit import search
from guard.audit.common import decode_cursor, encode_cursor
from guard.core.policy import Policy
from guard.core.types import GeneratedImage, GenerationCall, JudgeInput, Trace, Verdict
from guard.plugins import PurgeResult, TracePage, TraceQuery
from guard.support.errors import GuardError

__all__ = [
    "BLACK", "BLUE", "COLOUR_WORDS", "GREEN", "GREY", "RED", "WHITE", "YELLOW", "BackendCall",
    "FakeBackend", "FakeJudge", "MemoryAuditStore", "MemoryImageStore", "colour_of",
    "edited_from", "png", "prompt_of",
]

RGB = tuple[int, int, int]
RED: RGB = (255, 0, 0)
GREEN: RGB = (0, 255, 0)
BLUE: RGB = (0, 0, 255)
YELLOW: RGB = (255, 255, 0)
BLACK: RGB = (0, 0, 0)
WHITE: RGB = (255, 255, 255)
GREY: RGB = (128, 128, 128)  # a prompt that names no colour
COLOUR_WORDS: Mapping[str, RGB] = {"red": RED, "green": GREEN, "blue": BLUE, "yellow": YELLOW,
                                   "black": BLACK, "white": WHITE}


def png(colour: RGB, **text: str) -> bytes:
    """An 8x8 PNG of one colour, with `text` in its tEXt chunks."""
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    out = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(out, "PNG", pnginfo=info)
    return out.getvalue()


def colour_of(data: bytes) -> RGB:
    """The colour of an image's top-left pixel."""
    pixel = Image.open(io.BytesIO(data)).convert("RGB").getpixel((0, 0))
    assert isinstance(pixel, tuple)
    return (int(pixel[0]), int(pixel[1]), int(pixel[2]))


def prompt_of(image: GeneratedImage | bytes) -> str | None:
    """The prompt a FakeBackend made (or edited) this image from."""
    return _text(image, "prompt")


def edited_from(image: GeneratedImage | bytes) -> str | None:
    """The sha256 of the image a FakeBackend edited into this one; None for a generated one."""
    return _text(image, "source")


def _text(image: GeneratedImage | bytes, key: str) -> str | None:
    data = image.data if isinstance(image, GeneratedImage) else image
    value = Image.open(io.BytesIO(data)).info.get(key)
    return value if isinstance(value, str) else None


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE) is not None


class _Faults:

    def __init__(self) -> None:
        self._error: GuardError | None = None
        self._left: int | None = None

    def fail(self, error: GuardError, *, times: int | None = None) -> None:
        self._error, self._left = error, times

    def _maybe_fail(self) -> None:
        if self._error is None:
            return
        error = self._error
        if self._left is not None:
            self._left -= 1
            if self._left <= 0:
                self._error = None
        raise error


# --- the backend ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BackendCall:
    kind: Literal["generate", "edit"]
    prompt: str
    n: int
    model: str | None
    images: tuple[bytes, ...] = ()  # an edit's input images
    mask: bytes | None = None


class FakeBackend(_Faults):
    """Makes `call.n` PNGs per call, each painted in the colour of the first of `colours`' words
    in the prompt (grey when none is there). `overrides` paints the k-th image this backend makes
    (from 0) in a given colour whatever its prompt: a seed that came out differently."""

    def __init__(self, name: str = "fake", *, colours: Mapping[str, RGB] = COLOUR_WORDS,
                 overrides: Mapping[int, RGB] | None = None, delay_s: float = 0.0) -> None:
        super().__init__()
        self.name = name
        self.colours = dict(colours)
        self.overrides = dict(overrides or {})
        self.delay_s = delay_s
        self.calls: list[BackendCall] = []
        self.made = 0
        self.closed = False

    @property
    def prompts(self) -> list[str]:
        """The prompt of every call, in order."""
        return [c.prompt for c in self.calls]

    def colour_for(self, prompt: str) -> RGB:
        return next((rgb for word, rgb in self.colours.items() if _has_word(prompt, word)), GREY)

    async def generate(self, call: GenerationCall) -> list[GeneratedImage]:
        self.calls.append(BackendCall("generate", call.prompt, call.n, call.model))
        return await self._make(call, {})

    async def edit(self, call: GenerationCall, images: list[bytes],
                   mask: bytes | None) -> list[GeneratedImage]:
        self.calls.append(BackendCall("edit", call.prompt, call.n, call.model, tuple(images),
                                      mask))
        return await self._make(call, {"source": hashlib.sha256(images[0]).hexdigest()})

    async def _make(self, call: GenerationCall, text: dict[str, str]) -> list[GeneratedImage]:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        self._maybe_fail()
        out = []
        for _ in range(call.n):
            colour = self.overrides.get(self.made, self.colour_for(call.prompt))
            data = png(colour, prompt=call.prompt, number=str(self.made), **text)
            out.append(GeneratedImage(data=data, media_type="image/png"))
            self.made += 1
        return out

    async def ready(self) -> bool:
        return not self.closed

    async def aclose(self) -> None:
        self.closed = True


# --- the judge --------------------------------------------------------------------------------


class FakeJudge(_Faults):
    """Scores every policy category: 0.0, raised by `words` (a word in the item's prompt gives
    its scores) and `colours` (an image of that colour gives its scores), the larger winning.

    Where the policy wants an explanation, the thought names the categories that crossed and the
    refined prompt is `refine(prompt)`; a judge without `refine` (or one that returns None or the
    prompt itself) has nothing to suggest, and the engine refines by the policy's terms."""

    def __init__(self, *, words: Mapping[str, Mapping[str, float]] | None = None,
                 colours: Mapping[RGB, Mapping[str, float]] | None = None,
                 refine: Callable[[str], str | None] | None = None, judge_id: str = "fake",
                 delay_s: float = 0.0) -> None:
        super().__init__()
        self.id = judge_id
        self.words = dict(words or {})
        self.colours = dict(colours or {})
        self.rewrite = refine  # not `refine`: that name would make this judge a Refiner
        self.delay_s = delay_s
        self.calls: list[list[JudgeInput]] = []
        self.closed = False

    async def judge(self, items: Sequence[JudgeInput], policy: Policy) -> list[Verdict]:
        self.calls.append(list(items))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        self._maybe_fail()
        return [self._verdict(item, policy) for item in items]

    def scores(self, item: JudgeInput, policy: Policy) -> dict[str, float]:
        scores = dict.fromkeys(policy.categories, 0.0)
        found = [s for word, s in self.words.items() if _has_word(item.prompt, word)]
        if item.image is not None:
            found.append(self.colours.get(colour_of(item.image.data), {}))
        for rule in found:
            for category, score in rule.items():
                scores[category] = max(scores.get(category, 0.0), score)
        return scores

    def _verdict(self, item: JudgeInput, policy: Policy) -> Verdict:
        scores = self.scores(item, policy)
        if not policy.wants_explanation(scores):
            return Verdict(scores=scores, judge_id=self.id)
        refined = self.rewrite(item.prompt) if self.rewrite is not None else None
        return Verdict(scores=scores, judge_id=self.id,
                       thought=f"{', '.join(policy.decide(scores).flagged)} crossed the "
                               "policy's thresholds",
                       refined_prompt=refined if refined != item.prompt else None)

    async def ready(self) -> bool:
        return not self.closed

    async def aclose(self) -> None:
        self.closed = True


# --- the stores -------------------------------------------------------------------------------


class MemoryAuditStore(_Faults):
    """Traces in a list, sealed into one hash chain in the order written (as Trace.seal)."""

    def __init__(self) -> None:
        super().__init__()
        self.traces: list[Trace] = []  # sealed copies, in chain order
        self.closed = False

    async def write(self, trace: Trace) -> Trace:
        self._maybe_fail()
        trace.seal(self.traces[-1].hash if self.traces else None)
        self.traces.append(trace.model_copy(deep=True))  # later changes to `trace` stay out
        return trace

    async def get(self, trace_id: str) -> Trace | None:
        found = next((t for t in self.traces if t.id == trace_id), None)
        return found.model_copy(deep=True) if found is not None else None

    async def query(self, q: TraceQuery) -> TracePage:
        end = decode_cursor(q.cursor) if q.cursor else len(self.traces)
        seqs = [seq for seq in range(min(end, len(self.traces)) - 1, -1, -1)
                if _matches(self.traces[seq], q)]
        page = seqs[:q.limit]
        more = len(seqs) > q.limit
        return TracePage([self.traces[s].summary() for s in page],
                         encode_cursor(page[-1]) if more and page else None)

    async def ready(self) -> bool:
        return not self.closed

    async def aclose(self) -> None:
        self.closed = True


def _matches(trace: Trace, q: TraceQuery) -> bool:
    wanted: dict[str, object] = {
        "decision": q.decision, "tenant": q.tenant, "key_id": q.key_id, "model": q.model,
        "policy_id": q.policy_id, "policy_version": q.policy_version}
    actual: dict[str, object] = {
        "decision": trace.decision, "tenant": trace.tenant, "key_id": trace.key_id,
        "model": trace.model, "policy_id": trace.policy.get("id"),
        "policy_version": trace.policy.get("version")}
    return (all(value is None or actual[name] == value for name, value in wanted.items())
            and (q.category is None or q.category in trace.categories)
            and (q.since is None or trace.created_at >= q.since)
            and (q.until is None or trace.created_at < q.until) and search.matches(trace, q))


@dataclass(slots=True)
class _Copy:
    media_type: str
    data: bytes
    expires_at: float | None
    stored_at: float


class MemoryImageStore:
    """Image bytes by sha256 in a dict. `clock` (time.time by default) is the store's now."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.copies: dict[str, _Copy] = {}
        self._secret = secrets.token_bytes(32)
        self.closed = False

    async def put(self, data: bytes, media_type: str, ttl_s: float | None) -> str:
        image_id = hashlib.sha256(data).hexdigest()
        now = self.clock()
        expires = None if ttl_s is None else now + ttl_s
        old = self.copies.get(image_id)
        if old is not None and expires is not None:  # the later expiry wins; None is the latest
            expires = None if old.expires_at is None else max(expires, old.expires_at)
        self.copies[image_id] = _Copy(media_type, data, expires, now)
        return image_id

    def _live(self, image_id: str, now: float | None) -> _Copy | None:
        copy = self.copies.get(image_id)
        at = self.clock() if now is None else now
        if copy is None or (copy.expires_at is not None and copy.expires_at <= at):
            return None
        return copy

    async def get(self, image_id: str, now: float | None = None) -> tuple[str, bytes] | None:
        copy = self._live(image_id, now)
        return (copy.media_type, copy.data) if copy is not None else None

    async def has(self, image_id: str, now: float | None = None) -> bool:
        return self._live(image_id, now) is not None

    async def purge(self, before: float, *, stored_before: float | None = None,
                    dry_run: bool = False) -> PurgeResult:
        gone = [image_id for image_id, c in self.copies.items()
                if (c.expires_at is not None and c.expires_at < before)
                or (stored_before is not None and c.stored_at < stored_before)]
        result = PurgeResult(removed=len(gone), kept=len(self.copies) - len(gone),
                             freed_bytes=sum(len(self.copies[i].data) for i in gone))
        if not dry_run:
            for image_id in gone:
                del self.copies[image_id]
        return result

    async def shared_secret(self) -> bytes:
        return self._secret

    async def ready(self) -> bool:
        return not self.closed

    async def aclose(self) -> None:
        self.closed = True
