"""Values that flow through one request: images, judge inputs, verdicts, and the audit trace."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import pybase64
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from guard.core.hashchain import link_hash

ImageDecision = Literal["passed", "edited", "refused", "failed"]
_DECISION_RANK: dict[str, int] = {"passed": 0, "edited": 1, "refused": 2, "failed": 3}


Base64 = str | bytes | memoryview  # base64 text; as bytes it is ASCII


def decode_b64(text: Base64) -> bytes:
    """Strict base64 decoding (binascii.Error, a ValueError, on bad input).

    pybase64 decodes with SIMD: a 1024x1024 PNG's 2.7 MB of base64 takes ~2 ms instead of the
    ~13 ms of the standard library, which was most of the passthrough's CPU per request.
    """
    return pybase64.b64decode(text, validate=True)


def worst(decisions: list[str]) -> str:
    """The request's decision is the worst of its images' decisions."""
    return max(decisions, key=_DECISION_RANK.__getitem__) if decisions else "failed"


ImageCheck = Callable[[bytes], str]


class GeneratedImage:
    """One image from a backend. A backend's base64 is kept as received and decoded only when
    someone looks (the judge, a retained copy, a link), so a passthrough relays it without paying
    for a decode, a check and a re-encode of megabytes.

    `check` (given with `b64`) validates the decoded bytes and returns their media type; it runs
    once, at the first look, and raises the adapter's own error (a BackendError) for a bad image.
    The engine calls `validate()` on every image it is about to judge, so a bad image is a
    backend failure there, never a judge failure.
    """

    __slots__ = ("_b64", "_check", "_data", "_sha256", "backend_revised_prompt", "media_type")

    def __init__(self, *, data: bytes | None = None, b64: Base64 | None = None,
                 media_type: str = "image/png", backend_revised_prompt: str | None = None,
                 check: ImageCheck | None = None) -> None:
        if data is None and b64 is None:
            raise TypeError("GeneratedImage needs data or b64")
        self._data = data
        self._b64 = b64
        self._check = check if data is None else None
        self._sha256: str | None = None
        self.media_type = media_type
        self.backend_revised_prompt = backend_revised_prompt

    @property
    def data(self) -> bytes:
        if self._data is None:
            assert self._b64 is not None
            try:
                data = decode_b64(self._b64)
            except ValueError:
                data = b""  # the check refuses it as an image, in its adapter's words
            if self._check is not None:
                self.media_type = self._check(data)
            elif not data:
                raise ValueError("image is not valid base64")
            self._data = data
        return self._data

    def validate(self) -> None:
        """Decode and check now (a no-op for images made from bytes)."""
        self.data  # noqa: B018 - the property runs the check

    @property
    def b64(self) -> str:
        return str(self.b64_bytes, "ascii")

    @property
    def b64_bytes(self) -> bytes | memoryview:
        """The base64 as ASCII bytes: the backend's own when it sent base64, a view of its
        response body (a relay writes them into its response as received, `guard.support.b64json`)."""
        if self._b64 is None:
            self._b64 = pybase64.b64encode(self.data)
        elif isinstance(self._b64, str):
            self._b64 = self._b64.encode("ascii")
        return self._b64

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = hashlib.sha256(self.data).hexdigest()
        return self._sha256


@dataclass(frozen=True, slots=True)
class GenerationCall:
    """What the loop asks a backend for: one prompt, `n` images, the client's other parameters."""

    prompt: str
    n: int
    model: str | None = None
    size: str | None = None
    quality: str | None = None
    style: str | None = None
    output_format: str | None = None
    output_compression: int | None = None
    background: str | None = None
    moderation: str | None = None
    user: str | None = None
    input_fidelity: str | None = None  # edits only: how closely to keep the input's features
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """An earlier round of the same slot, as the judge sees it."""

    prompt: str
    scores: Mapping[str, float]
    flagged: tuple[str, ...]
    thought: str = ""
    refined_prompt: str | None = None


@dataclass(frozen=True, slots=True)
class JudgeInput:
    """One thing to judge: an image (PNG/JPEG/WebP bytes) or None for a prompt-only prescreen."""

    prompt: str
    original_prompt: str
    image: GeneratedImage | None = None
    history: tuple[HistoryEntry, ...] = ()


@dataclass(frozen=True, slots=True)
class Verdict:
    """A judge's answer. Scores are per category in [0, 1]; the policy decides what crosses."""

    scores: Mapping[str, float]
    judge_id: str
    thought: str = ""
    refined_prompt: str | None = None
    raw: str = ""
    latency_ms: float = 0.0
    details: Mapping[str, Any] = field(default_factory=dict)
    # Per category, the inputs the judge assessed it on, a subset of INPUTS ("text": the prompt,
    # "image"); a category it did not assess is absent or empty, and has no score. None: the
    # judge does not say (see `coverage`).
    assessed_on: dict[str, list[str]] | None = None

    def coverage(self, categories: Iterable[str], *, image: bool) -> dict[str, list[str]]:
        """Per category, the inputs this verdict assessed it on (`image`: the item had one).

        A judge that does not say is taken to assess every category on every input it was given,
        except what its `details.unassessed` lists, which it did not look at in the item itself
        (the convention before `assessed_on`)."""
        if self.assessed_on is not None:
            return {c: [i for i in INPUTS if i in self.assessed_on.get(c, ())]
                    for c in categories}
        skipped = set(self.details.get("unassessed") or ())
        given = list(INPUTS) if image else ["text"]
        return {c: (["text"] if image else []) if c in skipped else given for c in categories}


INPUTS = ("text", "image")  # what a judge may assess a category on: the prompt, the image


# --- the audit trace -------------------------------------------------------------------------

class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JudgedImage(_Model):
    slot: int
    prompt: str
    image_sha256: str | None = None
    image_ref: str | None = None  # where a retained copy lives, when the policy keeps images
    judge_id: str = ""
    scores: dict[str, float] = Field(default_factory=dict)
    flagged: list[str] = Field(default_factory=list)
    action: str = "pass"
    thought: str = ""
    refined_prompt: str | None = None
    raw: str = ""
    judge_ms: float = 0.0
    details: dict[str, Any] = Field(default_factory=dict)
    # Policy categories the item could not be judged for on its own input (an image's, or the
    # prompt's at the prescreen), and what decided each: "prompt" (the prompt's verdict stood),
    # "refuse" or "pass" (the policy's `unassessed`), "image" (a prescreen: left to the image).
    unassessed: dict[str, str] = Field(default_factory=dict)
    # Each slot keeps its own clock: the round this image was made in, how long its backend call
    # took, and who wrote the prompt it was made from (a judge's id, "rules" for the rule
    # refiner, None for the client's own prompt). None in traces written before these existed.
    round: int | None = None
    backend_ms: float | None = None
    refined_by: str | None = None


class JudgedPreview(_Model):
    """A partial image judged (verdict only) while its generation ran; `stopped`: its verdict
    was unsafe and stopped that generation, the preview standing in for the image."""

    slot: int
    step: int  # the backend's count: OpenAI's partial_image_index, a diffusion step
    image_sha256: str
    judge_id: str = ""
    scores: dict[str, float] = Field(default_factory=dict)
    flagged: list[str] = Field(default_factory=list)
    action: str = "pass"
    judge_ms: float = 0.0
    stopped: bool = False


RoundKind = Literal["prescreen", "generate", "edit"]
MAKING_KINDS = ("generate", "edit")  # the kinds that count as rounds


class RoundRecord(_Model):
    """One backend call and the judging of its images (or the prescreen). Slots go their own
    way, so a round index may have several records, one per call."""

    index: int  # 0 is the prompt prescreen, 1.. are generation rounds
    kind: RoundKind
    backend: str | None = None
    backend_ms: float = 0.0
    judge_ms: float = 0.0
    images: list[JudgedImage] = Field(default_factory=list)
    error: str | None = None
    cancelled: str | None = None  # why the call was cancelled before its images were judged
    hedge: bool = False  # an extra generation beside the slot's own (policy `hedge`)
    previews: list[JudgedPreview] = Field(default_factory=list)  # partial images judged meanwhile

    @property
    def counts(self) -> bool:
        """Whether this record is a round that made images (generate or edit, not cancelled)."""
        return made_images(self.kind, self.cancelled)


def made_images(kind: str | None, cancelled: str | None) -> bool:
    """The rule of what counts as a round, for a RoundRecord or its stored JSON alike."""
    return kind in MAKING_KINDS and cancelled is None


class SlotResult(_Model):
    slot: int
    decision: ImageDecision
    rounds: int
    prompt: str
    image_sha256: str | None = None  # the image as generated (what the judge saw)
    categories: list[str] = Field(default_factory=list)
    # The image as delivered: with its C2PA manifest (guard.provenance), else image_sha256's bytes.
    # `provenance`: "c2pa" when marked, "unmarked: <why>" when sent without a manifest under
    # `provenance.on_error: unmarked`, None when provenance is off (or in passthrough).
    delivered_sha256: str | None = None
    provenance: str | None = None


class TraceError(_Model):
    status: int
    type: str
    code: str | None
    message: str
    # What the failing server said, redacted (guard.support.redact): for the operator, never the client.
    detail: str | None = None


class Trace(_Model):
    id: str = Field(default_factory=lambda: "tr_" + uuid.uuid4().hex)
    created_at: float = Field(default_factory=time.time)
    duration_ms: float = 0.0
    endpoint: str = "/v1/images/generations"
    key_id: str | None = None
    tenant: str | None = None
    model: str | None = None
    backend: str | None = None
    request: dict[str, Any] = Field(default_factory=dict)
    policy: dict[str, Any] = Field(default_factory=dict)
    guard_enabled: bool = True
    rounds: list[RoundRecord] = Field(default_factory=list)
    results: list[SlotResult] = Field(default_factory=list)
    decision: str = "failed"
    categories: list[str] = Field(default_factory=list)
    error: TraceError | None = None
    status: int = 200
    # The OpenTelemetry trace (W3C, 32 hex digits) the request ran under: the caller's when it
    # sent a traceparent, else the proxy's own; None when there was none (export off, no caller's).
    otel_trace_id: str | None = None
    prev_hash: str | None = None
    hash: str | None = None

    # Images the policy's `image_retention` keeps, by sha256; the audit store saves them beside
    # the trace. Not part of the hashed content: the trace holds each image's sha256 already.
    _retained: dict[str, GeneratedImage] = PrivateAttr(default_factory=dict)

    def retain(self, image: GeneratedImage) -> None:
        self._retained[image.sha256] = image

    @property
    def retained_images(self) -> dict[str, GeneratedImage]:
        return self._retained

    def outcome_decision(self) -> ImageDecision:
        """The worst of the per-image decisions the engine recorded."""
        return worst([r.decision for r in self.results])  # type: ignore[return-value]

    def round_count(self) -> int:
        """Rounds that made images (generate or edit), however many calls each had."""
        return len({r.index for r in self.rounds if r.counts})

    def finish(self, status: int, error: TraceError | None, duration_ms: float) -> None:
        """Close the trace: the one place where a request's decision is set.

        A request that failed is `refused` when the policy refused it and `failed` otherwise,
        whatever its images got to; a served one takes the worst of its images' decisions."""
        self.status = status
        self.error = error
        self.duration_ms = round(duration_ms, 3)
        if error is None:
            self.decision = self.outcome_decision()
        else:
            self.decision = "refused" if error.code == "content_policy_violation" else "failed"

    def canonical_bytes(self) -> bytes:
        """The trace's content as hashed for the audit chain (everything but the hashes)."""
        import orjson

        body = self.model_dump(mode="json", exclude={"prev_hash", "hash"})
        return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)

    def seal(self, prev_hash: str | None) -> None:
        self.prev_hash = prev_hash
        self.hash = link_hash(prev_hash, self.canonical_bytes())

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id, "created_at": self.created_at, "decision": self.decision,
            "categories": self.categories, "status": self.status, "model": self.model,
            "tenant": self.tenant, "key_id": self.key_id, "policy": self.policy,
            "endpoint": self.endpoint, "prompt": _shortened(self.request.get("prompt")),
            "rounds": self.round_count(),
            "duration_ms": self.duration_ms,
        }


SUMMARY_PROMPT_CHARS = 300  # a trace list's prompt; the trace itself has all of it


def _shortened(prompt: Any) -> str:
    text = prompt if isinstance(prompt, str) else ""
    return text if len(text) <= SUMMARY_PROMPT_CHARS else text[:SUMMARY_PROMPT_CHARS - 1] + "…"


@dataclass
class _Clock:
    start: float = field(default_factory=time.perf_counter)

    def ms(self) -> float:
        return (time.perf_counter() - self.start) * 1000.0


def clock() -> _Clock:
    return _Clock()
