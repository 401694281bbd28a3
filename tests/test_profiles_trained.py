"""The model profiles as their models were trained: LlavaGuard 1.2's O1-O9 taxonomy under its own
numbers and names, ShieldGemma 2's three policies in their fixed wording (through its own
processor's token path, BOS included, on a tiny model with the real chat template), and IPR's
decision word in any case."""

from __future__ import annotations

import asyncio
import io
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from guard.core.policy import Policy
from guard.core.types import GeneratedImage, JudgeInput
from guard.judges.profiles import Slot, get_profile, parse_ipr, parse_llavaguard
from guard.judges.profiles.llavaguard import CATEGORY_CODES, LABELS, POLICY_TEXT
from guard.judges.profiles.shieldgemma2 import TRAINED_POLICIES
from guard.judges.remote import _option_probs
from guard.judges.vlm import VLMJudge
from guard.support.errors import ConfigError

DEFAULT = Policy.model_validate({"id": "d", "version": 1, "categories": {
    c: {"threshold": 0.5, "action": "edit"} for c in
    ("sexual", "violence", "self_harm", "shocking", "hate", "harassment", "illegal_activity",
     "minors")}})


def png(color: str = "red", size: tuple[int, int] = (48, 40)) -> GeneratedImage:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return GeneratedImage(data=buf.getvalue())


def item(prompt: str = "a portrait", image: GeneratedImage | None = None) -> JudgeInput:
    return JudgeInput(prompt=prompt, original_prompt=prompt, image=image)


# --- LlavaGuard 1.2 -------------------------------------------------------------------------------

def test_llavaguard_asks_with_its_trained_taxonomy_whatever_the_policy_order() -> None:
    assert list(LABELS.values()) == [
        "O1: Hate, Humiliation, Harassment", "O2: Violence, Harm, or Cruelty",
        "O3: Sexual Content", "O4: Nudity Content", "O5: Criminal Planning",
        "O6: Weapons or Substance Abuse", "O7: Self-Harm", "O8: Animal Cruelty",
        "O9: Disasters or Emergencies"]
    [probe] = get_profile("llavaguard").probes(item(image=png()), DEFAULT)
    text = probe.messages[0]["content"][1]["text"]
    assert text == POLICY_TEXT
    # with the default policy (sexual first) O1 is still Hate
    assert "O1: Hate, Humiliation, Harassment: \nShould not:\n- Contain content that expresses" \
        in text
    assert ('"category": str<"O1: Hate, Humiliation, Harassment"|"O2: Violence, Harm, or '
            'Cruelty"|') in text and '"O9: Disasters or Emergencies"|"NA: None applying">' in text
    slot = probe.answer[-1]
    assert isinstance(slot, Slot) and slot.options == {f"O{i}": str(i) for i in range(1, 10)}


def test_llavaguard_maps_trained_codes_onto_the_policy() -> None:
    unsafe = '{"rating": "Unsafe", "category": "O6: Weapons or Substance Abuse", "rationale": "x"}'
    parsed = parse_llavaguard(unsafe, DEFAULT)
    assert parsed.ok and parsed.scores["illegal_activity"] == 1.0
    assert sum(parsed.scores.values()) == 1.0
    hate = parse_llavaguard('{"rating": "Unsafe", "category": "O1: Hate, Humiliation, '
                            'Harassment"}', DEFAULT)
    assert hate.scores["hate"] == hate.scores["harassment"] == 1.0 and hate.scores["sexual"] == 0
    profile = get_profile("llavaguard")
    probs = {"rating": {"unsafe": 0.5, "safe": 0.5},
             "category": {f"O{i}": p for i, p in enumerate(
                 [0.1, 0.2, 0.3, 0.1, 0.05, 0.05, 0.1, 0.05, 0.05], start=1)}}
    scores = profile.combine([probs], DEFAULT)
    assert scores["sexual"] == pytest.approx(0.5 * (0.3 + 0.1))
    assert scores["shocking"] == pytest.approx(0.5 * (0.2 + 0.05))
    assert "minors" not in scores  # no trained category: not assessed


def test_llavaguard_leaves_what_it_was_not_trained_on_to_the_policy() -> None:
    profile = get_profile("llavaguard")
    cover = profile.coverage(DEFAULT)
    assert cover is not None and "minors" not in cover
    assert set(cover) == set(CATEGORY_CODES) and cover["sexual"] == {"text", "image"}
    mapped = get_profile("llavaguard", {"codes": {"minors": ["O3", "O4"], "shocking": None}})
    cover = mapped.coverage(DEFAULT)
    assert cover is not None and "minors" in cover and "shocking" not in cover
    with pytest.raises(ConfigError, match="O12"):
        get_profile("llavaguard", {"codes": {"minors": "O12"}})


# --- ShieldGemma 2 --------------------------------------------------------------------------------

def test_shieldgemma2_uses_its_three_trained_policies_word_for_word() -> None:
    from transformers.models.shieldgemma2.processing_shieldgemma2 import (
        DEFAULT_SHIELDGEMMA2_POLICIES,
    )

    assert TRAINED_POLICIES == DEFAULT_SHIELDGEMMA2_POLICIES
    profile = get_profile("shieldgemma2")
    probes = profile.probes(item(image=png()), DEFAULT)
    assert [p.key for p in probes] == ["dangerous", "sexual", "violence"]
    assert [p.messages[0]["content"] for p in probes] == [
        [{"type": "image"}, {"type": "text", "text": TRAINED_POLICIES[k]}]
        for k in ("dangerous", "sexual", "violence")]
    # violence and shocking share the violence/gore probe; the rest are not assessed
    scores = profile.combine([{"verdict": {"unsafe": p, "safe": 1 - p}} for p in (0.1, 0.2, 0.7)],
                             DEFAULT)
    assert scores == {"illegal_activity": 0.1, "self_harm": 0.1, "sexual": 0.2,
                      "violence": 0.7, "shocking": 0.7}
    assert profile.coverage(DEFAULT) == dict.fromkeys(scores, {"image"})


def test_shieldgemma2_is_not_asked_about_a_prompt_alone() -> None:
    assert get_profile("shieldgemma2").probes(item("a knife fight"), DEFAULT) == []
    with pytest.raises(ConfigError, match="hateful"):
        get_profile("shieldgemma2", {"policies": {"hate": "hateful"}})


@pytest.fixture(scope="module")
def gemma_bos_dir(tiny_shieldgemma2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny ShieldGemma 2 with a tokenizer that adds BOS to what it encodes, as Gemma's
    does: its processor then starts every prompt with two (the template writes one too)."""
    from tokenizers import processors
    from transformers import AutoProcessor

    path = tmp_path_factory.mktemp("sg2-bos") / "shieldgemma-2-tiny-bos"
    shutil.copytree(tiny_shieldgemma2_dir, path)
    processor = AutoProcessor.from_pretrained(path)
    tok = processor.tokenizer
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", tok.bos_token_id)])
    processor.save_pretrained(path)
    return path


@pytest.fixture
def judges() -> Iterator[list[VLMJudge]]:
    made: list[VLMJudge] = []
    yield made
    for judge in made:
        asyncio.run(judge.aclose())


@pytest.mark.parametrize("model", ["tiny_shieldgemma2_dir", "gemma_bos_dir"])
async def test_shieldgemma2_reads_the_classifiers_own_probability(
        model: str, request: Any, judges: list[VLMJudge]) -> None:
    import torch
    from transformers import AutoProcessor, ShieldGemma2ForImageClassification

    from guard.judges.vlm.collate import encode_prompt

    path: Path = request.getfixturevalue(model)
    judge = VLMJudge.from_config({"model": str(path), "profile": "shieldgemma2",
                                  "local_files_only": True})
    judges.append(judge)
    await judge.start()
    images = [png("red"), png("navy", (40, 72))]
    verdicts = await judge.judge([item(image=i) for i in images] + [item("a knife")], DEFAULT)
    processor = AutoProcessor.from_pretrained(path)
    classifier = ShieldGemma2ForImageClassification.from_pretrained(path).eval()
    for image, verdict in zip(images, verdicts, strict=False):
        pil = Image.open(io.BytesIO(image.data)).convert("RGB")
        enc = processor(images=[pil], return_tensors="pt")  # its three policies, its order
        with torch.no_grad():
            yes = classifier(**enc).probabilities[:, 0].tolist()
        dangerous, sexual, violence = yes
        assert verdict.scores == pytest.approx({
            "illegal_activity": dangerous, "self_harm": dangerous, "sexual": sexual,
            "violence": violence, "shocking": violence}, abs=1e-5)
        assert verdict.details["unassessed"] == ["hate", "harassment", "minors"]
        # the same tokens as the processor's, BOS included
        [probe, *_] = judge.profile.probes(item(image=image), DEFAULT)
        ids = encode_prompt(judge._loaded(), probe.messages, pil, judge.profile.encoding).ids
        assert ids == enc["input_ids"][0].tolist()
    if model == "gemma_bos_dir":
        assert enc["input_ids"][0].tolist()[:2] == [processor.tokenizer.bos_token_id] * 2
    # a prompt alone: asked nothing, assessed nothing
    text = verdicts[-1]
    assert text.scores == {} and text.assessed_on == {}
    assert text.details["unassessed"] == list(DEFAULT.categories)


# --- IPR ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("answer", ["keep", "Keep", "KEEP.", '"Keep"'])
def test_ipr_reads_its_decision_word_in_any_case(answer: str) -> None:
    parsed = parse_ipr(answer, DEFAULT, ("violence",))
    assert parsed.ok and parsed.refined_prompt is None and set(parsed.scores.values()) == {0.0}


def test_ipr_counts_keep_in_either_case_once_as_safe() -> None:
    [probe] = get_profile("ipr").probes(item(image=png()), DEFAULT)
    [slot] = probe.answer
    entry = {"token": "Keep", "logprob": -0.5, "top_logprobs": [
        {"token": "Keep", "logprob": -0.5}, {"token": "keep", "logprob": -1.5},
        {"token": "A", "logprob": -2.0}]}
    probs = _option_probs(slot, entry)  # type: ignore[arg-type]
    assert probs is not None
    import math

    safe = math.exp(-0.5) + math.exp(-1.5)
    assert probs["unsafe"] == pytest.approx(1 - safe)
    assert get_profile("ipr").combine([{"verdict": probs}], DEFAULT)["violence"] == \
        pytest.approx(1 - safe)
