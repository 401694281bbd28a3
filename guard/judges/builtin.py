"""The builtin judge: the embedded default that works offline on any machine.

Prompts are scored from the policy's term lists and patterns (guard.core.terms); images go
through NudeNet (its ONNX model ships in the `nudenet` wheel), whose detections of exposed
genitalia, breasts, buttocks or anus give a `sexual` score. Per category the verdict takes the
larger of the prompt's and the image's score. When the policy wants an explanation (the item is
unsafe), the rule-based refiner writes the refined prompt and the thought says what crossed which
threshold.

Images are decoded with OpenCV and run through OpenVINO or ONNX Runtime
(guard.judges.detector_runtime) in a worker thread, one batch per call, so the event loop is never
blocked. What an image costs, stage by stage, and what was tried to make it cheaper:
benchmarks/builtin_image.py and docs/judges.md.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from guard.core.policy import Decision, Policy
from guard.core.refiner import refine_prompt
from guard.core.terms import Hit, TextScores, matcher_for
from guard.core.types import JudgeInput, Verdict
from guard.judges.detector_runtime import Precision, Runtime, check_runtime, open_runtime
from guard.plugins import Explanation
from guard.support.errors import ConfigError, JudgeError

# Raised whenever the same input can score differently (recorded in every trace as the judge id):
# 2 = weak hits add up in log-odds, forms of one word count once.
VERSION = "2"

# The detector's output classes, in the order of the model's outputs (nudenet 3.4.2, 320n.onnx).
LABELS: tuple[str, ...] = (
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED",
    "BELLY_COVERED", "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE",
    "BELLY_EXPOSED", "MALE_GENITALIA_EXPOSED", "ANUS_COVERED", "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED",
)

# Which detections count as sexual, and the confidence from which each counts. Covered parts,
# faces, feet, bellies, armpits and bare male chests never count.
DEFAULT_THRESHOLD_MAP: dict[str, float] = {
    "FEMALE_GENITALIA_EXPOSED": 0.25,
    "MALE_GENITALIA_EXPOSED": 0.25,
    "ANUS_EXPOSED": 0.25,
    "FEMALE_BREAST_EXPOSED": 0.3,
    "BUTTOCKS_EXPOSED": 0.4,
}

_INPUT_SIZE = 320
_MIN_SCORE = 0.2  # NudeNet's own floor for a detection
_NMS_IOU = 0.45
_WORKERS = 2  # the judge's threads: decoding and inferences that may run at once


def sexual_score(detections: Sequence[Mapping[str, Any]],
                 threshold_map: Mapping[str, float] = DEFAULT_THRESHOLD_MAP) -> float:
    """The image's `sexual` score: the highest confidence among detections of exposed parts
    that reach their label's minimum confidence; 0.0 when none does."""
    best = 0.0
    for det in detections:
        floor = threshold_map.get(str(det.get("class")))
        score = float(det.get("score", 0.0))
        if floor is not None and score >= floor:
            best = max(best, score)
    return round(min(best, 1.0), 4)


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    nudenet: bool = Field(True, description="Inspect images with NudeNet; off: prompts only.")
    nudenet_threshold_map: dict[str, float | None] = Field(
        default_factory=dict,
        description="Per NudeNet label, the confidence from which a detection counts as sexual "
                    "(merged over the defaults; null stops a label from counting).")
    threads: int | None = Field(None, ge=1, le=64,
                                description="Threads per inference (default 1).")
    runtime: Runtime = Field("auto", description="Where NudeNet runs: openvino, onnxruntime, "
                                                 "or auto (OpenVINO where installed).")
    precision: Precision = Field(
        "auto", description="f32 (exact), bf16 (OpenVINO on a CPU with native bfloat16: about "
                            "half the cost, scores within ~0.02), or auto (the fastest of the two "
                            "this CPU and runtime offer).")
    batch_size: int = Field(8, ge=1, le=64, description="Images per detector run.")
    model_path: str | None = Field(None, description="Another NudeNet-compatible ONNX model.")


class NudityDetector:
    """NudeNet's model on OpenVINO or ONNX Runtime, with decoding and post-processing in bulk.

    NudeNet's own `detect` converts every image as if it had an alpha channel and post-processes
    its 2,100 candidate boxes in a Python loop; this does the same work with OpenCV and numpy."""

    def __init__(self, model_path: str | None = None, threads: int | None = None,
                 runtime: Runtime = "auto", precision: Precision = "auto") -> None:
        import nudenet

        path = model_path or os.path.join(os.path.dirname(nudenet.__file__), "320n.onnx")
        self._runtime = open_runtime(path, runtime, precision, threads, streams=_WORKERS)
        self.name = self._runtime.name

    @classmethod
    def decode(cls, data: bytes) -> Any:
        """Image bytes to the model's input blob (1, 3, 320, 320), the image's width and height."""
        return cls.prepare(cls.read(data))

    @staticmethod
    def read(data: bytes) -> Any:
        """Image bytes (PNG, JPEG, WebP) to pixels, BGR."""
        import cv2
        import numpy as np

        mat = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if mat is None:
            raise ValueError("not a decodable image")
        return mat

    @staticmethod
    def prepare(mat: Any) -> Any:
        """Pixels (BGR) to the model's input blob, the image's width and height."""
        import cv2

        h, w = mat.shape[:2]
        if h != w:
            # Pad to a square at the bottom right, as NudeNet does, so boxes keep their scale.
            side = max(h, w)
            mat = cv2.copyMakeBorder(mat, 0, side - h, 0, side - w, cv2.BORDER_CONSTANT)
        blob = cv2.dnn.blobFromImage(mat, 1 / 255.0, (_INPUT_SIZE, _INPUT_SIZE), (0, 0, 0),
                                     swapRB=True, crop=False)
        return blob, w, h

    def detect(self, inputs: Sequence[tuple[Any, int, int]]) -> list[list[dict[str, Any]]]:
        """Detections per decoded image: {"class", "score", "box": [x, y, w, h]}."""
        import numpy as np

        if not inputs:
            return []
        outputs = self.infer(np.vstack([i[0] for i in inputs]))
        return [self.postprocess(outputs[i], w, h) for i, (_, w, h) in enumerate(inputs)]

    def infer(self, blobs: Any) -> Any:
        """The model's raw output for a batch of blobs (n, 3, 320, 320): (n, 4 + classes, 2100)."""
        return self._runtime.run(blobs)

    @staticmethod
    def postprocess(output: Any, width: int, height: int) -> list[dict[str, Any]]:
        """One image's raw output to its detections (boxes in the image's pixels)."""
        import cv2
        import numpy as np

        rows = output.T  # (candidates, 4 box + classes)
        class_scores = rows[:, 4:]
        best = class_scores.max(axis=1)
        keep = best >= _MIN_SCORE
        if not keep.any():
            return []
        rows, best = rows[keep], best[keep]
        classes = class_scores[keep].argmax(axis=1)
        xywh = rows[:, :4].astype(np.float64) * (max(width, height) / _INPUT_SIZE)
        xywh[:, 0] = np.clip(xywh[:, 0] - xywh[:, 2] / 2, 0, width)
        xywh[:, 1] = np.clip(xywh[:, 1] - xywh[:, 3] / 2, 0, height)
        xywh[:, 2] = np.minimum(xywh[:, 2], width - xywh[:, 0])
        xywh[:, 3] = np.minimum(xywh[:, 3], height - xywh[:, 1])
        picked = cv2.dnn.NMSBoxes(xywh.tolist(), best.tolist(), 0.25, _NMS_IOU)
        return [{"class": LABELS[int(classes[i])], "score": round(float(best[i]), 4),
                 "box": [int(v) for v in xywh[i]]} for i in np.asarray(picked).reshape(-1)]


IMAGE_CATEGORIES = ("sexual",)  # what the image check (NudeNet) can see


def text_categories(policy: Policy) -> list[str]:
    """The policy categories its term lists look for in a prompt (they have terms or patterns)."""
    return [c for c in policy.categories
            if (t := policy.terms.get(c)) is not None and (t.strong or t.weak or t.patterns)]


class BuiltinJudge:
    """Term lists and patterns on prompts, NudeNet on images, the rule-based refiner."""

    id = f"builtin/{VERSION}"

    def __init__(self, *, nudenet: bool = True,
                 nudenet_threshold_map: Mapping[str, float | None] | None = None,
                 threads: int | None = None, batch_size: int = 8,
                 model_path: str | None = None, runtime: Runtime = "auto",
                 precision: Precision = "auto") -> None:
        merged: dict[str, float | None] = {**DEFAULT_THRESHOLD_MAP,
                                           **(nudenet_threshold_map or {})}
        unknown = sorted(set(merged) - set(LABELS))
        if unknown:
            raise ConfigError(f"judge.nudenet_threshold_map: unknown NudeNet labels {unknown}; "
                              f"known: {', '.join(LABELS)}")
        bad = [k for k, v in merged.items() if v is not None and not 0.0 <= v <= 1.0]
        if bad:
            raise ConfigError(f"judge.nudenet_threshold_map: {bad} must be in [0, 1] or null")
        self.threshold_map = {k: v for k, v in merged.items() if v is not None}
        check_runtime(runtime, precision)
        self.nudenet = nudenet
        self.batch_size = batch_size
        self._threads = threads
        self._model_path = model_path
        self._runtime: tuple[Runtime, Precision] = (runtime, precision)
        self._detector: NudityDetector | None = None
        self._loading: asyncio.Future[NudityDetector] | None = None
        self._pool = ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="builtin-judge")

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> BuiltinJudge:
        """Build from the operator config's judge section (without `kind`)."""
        try:
            opts = _Options.model_validate(dict(options))
        except ValidationError as exc:
            raise ConfigError.from_validation("judge (builtin)", exc) from exc
        return cls(**opts.model_dump())

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Load the detector off the event loop (the proxy calls this at start-up)."""
        if self.nudenet:
            await self._get_detector()

    async def ready(self) -> bool:
        return not self.nudenet or self._detector is not None

    def coverage(self, policy: Policy) -> dict[str, set[str]]:
        """Term lists on the prompt; NudeNet on the image, for nudity only."""
        out = {c: {"text"} for c in text_categories(policy)}
        for c in IMAGE_CATEGORIES if self.nudenet else ():
            if c in policy.categories:
                out.setdefault(c, set()).add("image")
        return out

    async def aclose(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _get_detector(self) -> NudityDetector:
        if self._detector is not None:
            return self._detector
        if self._loading is None:
            loop = asyncio.get_running_loop()
            self._loading = asyncio.ensure_future(loop.run_in_executor(
                self._pool, lambda: NudityDetector(self._model_path, self._threads,
                                                   *self._runtime)))
        try:
            self._detector = await asyncio.shield(self._loading)
        except Exception as exc:
            self._loading = None  # the next call tries again
            raise JudgeError(f"builtin judge: the NudeNet detector failed to load: {exc}") from exc
        return self._detector

    # --- judging -------------------------------------------------------------------------

    async def judge(self, items: Sequence[JudgeInput], policy: Policy) -> list[Verdict]:
        started = time.perf_counter()
        matcher = matcher_for(policy)
        texts = [matcher.scan(item.prompt) for item in items]
        detections: list[list[dict[str, Any]] | None] = [None] * len(items)
        with_image = [i for i, item in enumerate(items) if item.image is not None]
        if with_image and self.nudenet:
            found = await self._detect([items[i] for i in with_image], with_image)
            for i, dets in zip(with_image, found, strict=True):
                detections[i] = dets
        latency = round((time.perf_counter() - started) * 1000, 3)
        return [self._verdict(item, text, dets, policy, latency)
                for item, text, dets in zip(items, texts, detections, strict=True)]

    async def refine(self, items: Sequence[JudgeInput], policy: Policy,
                     scores: Sequence[Mapping[str, float]]) -> list[Explanation]:
        """The rule refiner alone (guard.judges.Refiner), for items other judges scored: the
        thought names the prompt's words behind each flagged category, the refined prompt
        rewrites or removes them. Nothing is scored or detected here."""
        matcher = matcher_for(policy)
        out = []
        for item, item_scores in zip(items, scores, strict=True):
            if not policy.wants_explanation(item_scores):
                out.append(Explanation())
                continue
            decision = policy.decide(item_scores)
            thought = _explain(decision, item_scores, matcher.scan(item.prompt), None, None,
                               policy, self.threshold_map)
            out.append(Explanation(thought, refine_prompt(item.prompt, decision.flagged, policy)))
        return out

    async def _detect(self, items: Sequence[JudgeInput],
                      positions: Sequence[int]) -> list[list[dict[str, Any]]]:
        detector = await self._get_detector()
        loop = asyncio.get_running_loop()
        blobs: list[bytes] = []
        for pos, item in zip(positions, items, strict=True):
            assert item.image is not None
            try:
                blobs.append(item.image.data)
            except ValueError as exc:
                raise JudgeError(f"builtin judge: image {pos} is not valid: {exc}") from exc
        decoded = await asyncio.gather(
            *(loop.run_in_executor(self._pool, NudityDetector.decode, b) for b in blobs),
            return_exceptions=True)
        for pos, result in zip(positions, decoded, strict=True):
            if isinstance(result, BaseException):
                raise JudgeError(f"builtin judge: image {pos} could not be decoded "
                                 f"(not a PNG, JPEG or WebP image?)") from result
        ready = [d for d in decoded if not isinstance(d, BaseException)]
        out: list[list[dict[str, Any]]] = []
        for start in range(0, len(ready), self.batch_size):
            chunk = ready[start:start + self.batch_size]
            try:
                out += await loop.run_in_executor(self._pool, detector.detect, chunk)
            except Exception as exc:
                raise JudgeError(f"builtin judge: the NudeNet detector failed: {exc}") from exc
        return out

    def _verdict(self, item: JudgeInput, text: TextScores,
                 detections: list[dict[str, Any]] | None, policy: Policy,
                 latency: float) -> Verdict:
        assessed_on = {c: ["text"] for c in text_categories(policy)}
        scores = {c: s for c, s in text.scores.items() if c in assessed_on}
        details: dict[str, Any] = {"hits": text.hits_dict()}
        image_score = None
        if detections is not None:
            image_score = sexual_score(detections, self.threshold_map)
            scores["sexual"] = max(scores.get("sexual", 0.0), image_score)
            details["detections"] = detections
            if self._detector is not None:
                details["detector"] = self._detector.name
            details["image_scores"] = {"sexual": image_score}
        elif item.image is not None:
            details["image_checked"] = False
        seen = IMAGE_CATEGORIES if detections is not None else ()
        for c in seen:
            if c in policy.categories:
                assessed_on.setdefault(c, []).append("image")
        # What the item's own input was not checked for (NudeNet sees nudity only; a category
        # without terms is not looked for in a prompt): "not looked at", never "clean".
        own = "image" if item.image is not None else "text"
        missing = [c for c in policy.categories if own not in assessed_on.get(c, ())]
        if item.image is not None or missing:
            details["unassessed"] = missing
        thought, refined = "", None
        decision = policy.decide(scores)  # which categories to explain and refine
        if decision.unsafe:  # the rules' thought costs nothing: kept for refusals too
            thought = _explain(decision, scores, text, detections, image_score, policy,
                               self.threshold_map)
        if policy.wants_explanation(scores):
            refined = refine_prompt(item.prompt, decision.flagged, policy)
        return Verdict(scores=scores, judge_id=self.id, thought=thought, refined_prompt=refined,
                       latency_ms=latency, details=details, assessed_on=assessed_on)


def _explain(decision: Decision, scores: Mapping[str, float], text: TextScores,
             detections: list[dict[str, Any]] | None, image_score: float | None,
             policy: Policy, threshold_map: Mapping[str, float]) -> str:
    parts = []
    for cat in decision.flagged:
        reasons = []
        hits = text.hits.get(cat, ())
        if hits:
            reasons.append("the prompt contains " + _hit_words(hits))
        if cat == "sexual" and detections and image_score:
            seen = [d for d in detections if d["class"] in threshold_map
                    and d["score"] >= threshold_map[d["class"]]]
            if seen:
                reasons.append("the image shows " + ", ".join(
                    f"{d['class'].lower().replace('_', ' ')} (confidence {d['score']:.2f})"
                    for d in sorted(seen, key=lambda d: -d["score"])))
        threshold = policy.categories[cat].threshold
        parts.append(f"{cat} scored {scores[cat]:.2f}, at or over its threshold {threshold:.2f}: "
                     + ("; ".join(reasons) or "no single cause recorded") + ".")
    action = {"edit": "The prompt is refined and the image made again.",
              "refuse": "The policy refuses this category."}.get(decision.action)
    return " ".join([*parts, action] if action else parts)


def _hit_words(hits: Sequence[Hit]) -> str:
    words = []
    for h in hits:
        label = f"'{h.text}'"
        if h.text.lower() != h.term.lower():
            label += f" (matching {'pattern' if h.kind == 'pattern' else 'term'} '{h.term}')"
        words.append(f"{label}, {h.strength}")
    return "; ".join(dict.fromkeys(words))
