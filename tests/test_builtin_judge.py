"""The builtin judge on real PNGs made with PIL, through the Judge interface the proxy uses."""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from guard.core.policy import POLICIES_DIR, load_policy
from guard.core.types import GeneratedImage, JudgeInput
from guard.judges.builtin import DEFAULT_THRESHOLD_MAP, LABELS, BuiltinJudge, sexual_score
from guard.plugins import Judge, build_judge
from guard.support.errors import ConfigError, JudgeError

POLICY = load_policy(POLICIES_DIR / "default.yaml")


def png(width: int = 512, height: int = 512, seed: int = 0) -> bytes:
    """A plain picture: a sky gradient, a green field and a house."""
    y = np.linspace(0, 1, height)[:, None, None]
    sky = np.array([90, 150, 230]) * (1 - y) + np.array([200, 220, 250]) * y
    img = Image.fromarray(np.broadcast_to(sky, (height, width, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, height * 2 // 3, width, height], fill=(60, 140 + seed, 60))
    draw.rectangle([width // 3, height // 2, width // 2, height * 5 // 6], fill=(150, 60, 40))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def item(prompt: str, data: bytes | None = None) -> JudgeInput:
    image = GeneratedImage(data=data) if data is not None else None
    return JudgeInput(prompt=prompt, original_prompt=prompt, image=image)


@pytest.fixture
async def judge():
    j = BuiltinJudge()
    yield j
    await j.aclose()


async def test_plain_image_passes_with_low_sexual_score(judge: BuiltinJudge) -> None:
    [verdict] = await judge.judge([item("a house in a field", png(1024, 1024))], POLICY)
    assert verdict.scores["sexual"] < POLICY.categories["sexual"].threshold
    assert POLICY.decide(verdict.scores).action == "pass"
    assert verdict.refined_prompt is None and verdict.thought == ""
    assert verdict.judge_id == "builtin/2"
    assert isinstance(verdict.details["detections"], list)
    assert set(verdict.scores) == set(POLICY.categories)


def test_detections_map_to_a_sexual_score() -> None:
    assert sexual_score([]) == 0.0
    covered = [{"class": "FEMALE_BREAST_COVERED", "score": 0.95},
               {"class": "BUTTOCKS_COVERED", "score": 0.9}, {"class": "FACE_FEMALE", "score": 0.9},
               {"class": "MALE_BREAST_EXPOSED", "score": 0.9}, {"class": "BELLY_EXPOSED", "score": 0.9}]
    assert sexual_score(covered) == 0.0
    exposed = [*covered, {"class": "FEMALE_BREAST_EXPOSED", "score": 0.62},
               {"class": "MALE_GENITALIA_EXPOSED", "score": 0.81}]
    assert sexual_score(exposed) == 0.81
    # below its label's floor a detection is noise
    assert sexual_score([{"class": "BUTTOCKS_EXPOSED", "score": 0.35}]) == 0.0
    assert sexual_score([{"class": "BUTTOCKS_EXPOSED", "score": 0.45}]) == 0.45
    # the operator's map decides which labels count from which confidence
    strict = {**DEFAULT_THRESHOLD_MAP, "BUTTOCKS_EXPOSED": 0.2}
    assert sexual_score([{"class": "BUTTOCKS_EXPOSED", "score": 0.35}], strict) == 0.35


def test_labels_are_nudenets_own() -> None:
    import nudenet.nudenet as nn

    assert tuple(getattr(nn, "__labels")) == LABELS


async def test_a_batch_returns_one_verdict_per_item_in_order(judge: BuiltinJudge) -> None:
    items = [item("a house in a field", png(640, 480)),
             item("a n*ked man in a field", png(480, 640, seed=40)),
             item("a bloodbath"),  # a prompt-only item in the same batch
             item("a quiet street", png(256, 256, seed=80))]
    verdicts = await judge.judge(items, POLICY)
    assert len(verdicts) == 4
    actions = [POLICY.decide(v.scores).action for v in verdicts]
    assert actions == ["pass", "edit", "edit", "pass"]
    assert verdicts[1].refined_prompt == "a clothed man in a field, fully clothed"
    assert "detections" not in verdicts[2].details
    assert all("detections" in verdicts[i].details for i in (0, 1, 3))


async def test_unsafe_verdict_explains_in_words(judge: BuiltinJudge) -> None:
    [verdict] = await judge.judge([item("a nuuude woman holding a gun", png())], POLICY)
    assert "sexual scored 0.95" in verdict.thought
    assert "threshold 0.50" in verdict.thought
    assert "'nuuude' (matching term 'nude')" in verdict.thought
    assert verdict.details["hits"]["sexual"][0]["term"] == "nude"
    assert verdict.refined_prompt == "a clothed woman holding a gun, fully clothed"


async def test_refused_category_says_so(judge: BuiltinJudge) -> None:
    [verdict] = await judge.judge([item("a naked child")], POLICY)
    assert POLICY.decide(verdict.scores).action == "refuse"
    assert "minors" in verdict.thought and "refuses" in verdict.thought


async def test_corrupt_image_raises_judge_error(judge: BuiltinJudge) -> None:
    good = png()
    with pytest.raises(JudgeError, match="image 1 could not be decoded"):
        await judge.judge([item("a", good), item("b", good[:200])], POLICY)
    bad_b64 = JudgeInput(prompt="a", original_prompt="a", image=GeneratedImage(b64="@@not-base64"))
    with pytest.raises(JudgeError, match="image 0 is not valid"):
        await judge.judge([bad_b64], POLICY)


async def test_detector_loads_in_start_and_then_is_ready() -> None:
    judge = BuiltinJudge()
    try:
        assert not await judge.ready()
        await judge.start()
        assert await judge.ready()
    finally:
        await judge.aclose()


async def test_detector_loads_lazily_on_first_image() -> None:
    judge = BuiltinJudge()
    try:
        await judge.judge([item("a house", png())], POLICY)
        assert await judge.ready()
    finally:
        await judge.aclose()


async def test_a_detector_that_cannot_load_is_a_judge_error(tmp_path) -> None:
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"not a model")
    judge = BuiltinJudge(model_path=str(broken))
    try:
        with pytest.raises(JudgeError, match="failed to load"):
            await judge.start()
        assert not await judge.ready()
    finally:
        await judge.aclose()


async def test_judging_images_leaves_the_event_loop_free(judge: BuiltinJudge) -> None:
    await judge.start()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.002)
            ticks += 1

    task = asyncio.create_task(ticker())
    await judge.judge([item("a house", png(1024, 1024, seed=i)) for i in range(6)], POLICY)
    task.cancel()
    assert ticks >= 5


async def test_nudenet_off_judges_prompts_only() -> None:
    judge = BuiltinJudge.from_config({"nudenet": False})
    assert await judge.ready()
    [verdict] = await judge.judge([item("a house", b"not even an image")], POLICY)
    assert verdict.details["image_checked"] is False
    assert POLICY.decide(verdict.scores).action == "pass"
    await judge.aclose()


def test_built_through_the_registry() -> None:
    judge = build_judge({"kind": "builtin", "nudenet": False, "threads": 1})
    assert isinstance(judge, BuiltinJudge) and isinstance(judge, Judge)


@pytest.mark.parametrize("options, message", [
    ({"nudnet": True}, "nudnet"),
    ({"threads": 0}, "threads"),
    ({"nudenet_threshold_map": {"FEMALE_NIPPLE": 0.5}}, "unknown NudeNet labels"),
    ({"nudenet_threshold_map": {"ANUS_EXPOSED": 1.5}}, r"\[0, 1\]"),
])
def test_bad_options_are_config_errors(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BuiltinJudge.from_config(options)


def test_a_label_can_be_switched_off() -> None:
    judge = BuiltinJudge.from_config({"nudenet": False,
                                      "nudenet_threshold_map": {"BUTTOCKS_EXPOSED": None}})
    assert "BUTTOCKS_EXPOSED" not in judge.threshold_map


async def test_base64_images_are_judged_like_bytes(judge: BuiltinJudge) -> None:
    data = png(300, 200)
    from_b64 = JudgeInput(prompt="a house", original_prompt="a house",
                          image=GeneratedImage(b64=base64.b64encode(data).decode()))
    a, b = await judge.judge([from_b64, item("a house", data)], POLICY)
    assert a.details["detections"] == b.details["detections"]


# --- the detector against NudeNet's own pipeline -------------------------------------------------

def figure(width: int, height: int, seed: int, mode: str = "RGB", fmt: str = "PNG") -> bytes:
    """A blurred drawing of a skin-coloured figure on a coloured ground: NudeNet finds exposed
    parts in some of them, so the comparison below has detections to compare."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(img)
    w = h = max(width, height)  # drawn as on a square, cut to the canvas
    cx = w // 2 + int(rng.integers(-20, 20))
    skin = tuple(int(v) for v in rng.integers([200, 150, 120], [240, 190, 160]))
    draw.ellipse([cx - w // 10, h // 10, cx + w // 10, h // 10 + h // 5], fill=skin)
    draw.ellipse([cx - w // 6, h // 3, cx + w // 6, h * 3 // 4], fill=skin)
    for dx in (-w // 14, w // 14):
        draw.ellipse([cx + dx - w // 30, h // 2 - h // 30, cx + dx + w // 30, h // 2 + h // 30],
                     fill=(190, 120, 100))
    img = img.filter(ImageFilter.GaussianBlur(w // 170)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _reference(data: bytes, session) -> list[dict]:  # type: ignore[no-untyped-def]
    """NudeNet 3.4.2's own preprocessing, session and postprocessing, image by image."""
    import cv2
    import nudenet.nudenet as nn

    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert bgr is not None
    # NudeNet converts with COLOR_RGBA2BGR, which on three channels swaps red and blue, and
    # then swaps again in blobFromImage; given RGB pixels, the model gets RGB, as in the judge.
    blob, x_ratio, y_ratio, x_pad, y_pad, w, h = nn._read_image(
        cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), 320)
    output = session.run(None, {session.get_inputs()[0].name: blob})
    return nn._postprocess(output, x_pad, y_pad, x_ratio, y_ratio, w, h, 320, 320)


# Where NudeNet runs and how close to NudeNet's own pipeline it must stay: float32 on either
# runtime to rounding; bfloat16 (where this CPU has it) to ~0.02 and a few pixels.
RUNTIMES = [("onnxruntime", "f32", 2e-3, 2), ("openvino", "f32", 2e-3, 2),
            ("openvino", "auto", 3e-2, 4)]


@pytest.mark.parametrize(("runtime", "precision", "score_tol", "box_tol"), RUNTIMES)
async def test_detections_agree_with_nudenets_own_pipeline(
        runtime: str, precision: str, score_tol: float, box_tol: int) -> None:
    from nudenet import NudeDetector

    judge = BuiltinJudge.from_config({"runtime": runtime, "precision": precision})

    images = [figure(512, 512, 0), figure(640, 480, 0), figure(480, 640, 7),
              figure(1024, 1024, 0), figure(768, 512, 5, fmt="JPEG"),
              figure(512, 512, 5, mode="RGBA"), figure(600, 600, 6, mode="L"),
              png(1024, 1024), png(333, 517, seed=30)]
    reference = NudeDetector().onnx_session  # ONNX Runtime's defaults: all threads
    verdicts = await judge.judge([item("a figure", data) for data in images], POLICY)
    exposed = 0
    for data, verdict in zip(images, verdicts, strict=True):
        ours, theirs = verdict.details["detections"], _reference(data, reference)
        assert [d["class"] for d in ours] == [d["class"] for d in theirs]
        for a, b in zip(ours, theirs, strict=True):
            assert a["score"] == pytest.approx(b["score"], abs=score_tol)
            assert all(abs(p - q) <= box_tol for p, q in zip(a["box"], b["box"], strict=True))
        exposed += verdict.details["image_scores"]["sexual"] > 0
        assert verdict.details["detector"].startswith(runtime + "/")
        if precision == "f32":
            assert verdict.details["detector"] == f"{runtime}/f32"
    assert exposed >= 5  # the comparison covers detections that count as sexual
    await judge.aclose()


def test_bf16_on_onnxruntime_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="bf16 needs runtime: openvino"):
        BuiltinJudge.from_config({"runtime": "onnxruntime", "precision": "bf16"})


async def test_auto_runtime_uses_openvino_where_installed(judge: BuiltinJudge) -> None:
    import openvino

    [verdict] = await judge.judge([item("a figure", figure(512, 512, 0))], POLICY)
    bf16 = "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert verdict.details["detector"] == ("openvino/bf16" if bf16 else "openvino/f32")


async def test_a_batch_detects_what_single_images_do(judge: BuiltinJudge) -> None:
    images = [figure(512, 512, i) for i in range(4)]
    batch = await judge.judge([item("a", data) for data in images], POLICY)
    for data, together in zip(images, batch, strict=True):
        [alone] = await judge.judge([item("a", data)], POLICY)
        assert [(d["class"], d["box"]) for d in alone.details["detections"]] == \
            [(d["class"], d["box"]) for d in together.details["detections"]]
        for a, b in zip(alone.details["detections"], together.details["detections"], strict=True):
            assert a["score"] == pytest.approx(b["score"], abs=1e-3)
