"""The `vlm` judge on tiny random-weight models of the families users load (tests/tiny_families.py),
each with the profile meant for it: Qwen2.5-VL + an IPR-layout LoRA adapter (`ipr`), ShieldGemma 2
(`shieldgemma2`), LlavaGuard 1.2 on LLaVA-OneVision (`llavaguard`), and `safeeditor` on Qwen2.5-VL
and Qwen2-VL.

Each is loaded as a user configures it (`judge: {kind: vlm, model: <dir>, adapter: <dir>,
profile: ...}`), through the checkpoint's own processor class. Random weights answer nonsense, so
the tests check what a user relies on: the verdict-first scores are the probabilities a separate,
plain forward pass gives; the refine path decodes and its text is parsed; the adapter is applied;
and the proxy serves through each.
"""

from __future__ import annotations

import asyncio
import io
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from guard.core.policy import Policy
from guard.core.types import GeneratedImage, JudgeInput
from guard.judges.profiles import Message, get_profile
from guard.judges.profiles.llavaguard import parse_llavaguard
from guard.judges.vlm import VLMJudge
from tests.conftest import ADMIN_KEY, CLIENT_KEY, write_policy

CATS = ("sexual", "violence", "minors")


def policy(threshold: float) -> Policy:
    cats = {c: {"threshold": threshold, "action": "edit"} for c in CATS}
    cats["minors"] = {"threshold": 1.0, "action": "refuse"}
    return Policy.model_validate({"id": "t", "version": 1, "categories": cats})


def png(color: str, size: tuple[int, int] = (64, 48)) -> GeneratedImage:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return GeneratedImage(data=buf.getvalue())


def item(prompt: str, image: GeneratedImage | None = None) -> JudgeInput:
    return JudgeInput(prompt=prompt, original_prompt=prompt, image=image)


ITEMS = (item("a knight fighting a dragon, painting", png("red")),
         item("a cat on a sofa"),  # shorter, no image: padded in the same batch
         item("a portrait", png("blue", (40, 72))))


@pytest.fixture
def make_judge() -> Iterator[Any]:
    judges: list[VLMJudge] = []

    async def make(model: Path, **options: Any) -> VLMJudge:
        judge = VLMJudge.from_config({"model": str(model), "max_new_tokens": 6,
                                      "local_files_only": True, **options})
        judges.append(judge)
        await judge.start()
        return judge

    yield make
    for judge in judges:
        asyncio.run(judge.aclose())


# --- the plain way: one unpadded forward pass over the processor's inputs ---------------------

def plain_logits(model: Any, processor: Any, messages: Sequence[Message], image: Any,
                 answer: str) -> Any:
    """Next-token logits after the chat prompt + `answer`, the whole text through the processor
    in one row, as anyone would run the model."""
    import torch

    text = processor.apply_chat_template(list(messages), add_generation_prompt=True,
                                         tokenize=False) + answer
    images = [Image.open(io.BytesIO(image.data)).convert("RGB")] if image else None
    enc = processor(text=[text], images=images, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return model(**enc).logits[0, -1].float()


def first_token(processor: Any, word: str) -> int:
    return int(processor.tokenizer.encode(word, add_special_tokens=False)[0])


def two_way(logits: Any, processor: Any, unsafe: str, safe: str) -> float:
    import torch

    ids = [first_token(processor, unsafe), first_token(processor, safe)]
    return float(torch.softmax(logits[ids], dim=-1)[0])


def plain_model(model_dir: Path, adapter: Path | None = None) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    model: Any = AutoModelForImageTextToText.from_pretrained(model_dir)
    if adapter is not None:  # unmerged: the adapter's own forward, not the judge's merged weights
        from guard.judges.vlm.loading import _adapter_key_mapping

        model = PeftModel.from_pretrained(model, str(adapter),
                                          key_mapping=_adapter_key_mapping(model))
    return model.eval()


def expected_ipr(model: Any, processor: Any, it: JudgeInput, pol: Policy) -> dict[str, float]:
    import torch

    [probe] = get_profile("ipr").probes(it, pol)
    logits = plain_logits(model, processor, probe.messages, it.image, "")
    # the decision word in either case ("Keep" is "keep")
    keep = float(torch.softmax(logits, dim=-1)[[first_token(processor, "keep"),
                                                 first_token(processor, "Keep")]].sum())
    return {c: (1.0 - keep if pol.categories[c].action == "edit" else 0.0) for c in CATS}


def expected_safeeditor(model: Any, processor: Any, it: JudgeInput,
                        pol: Policy) -> dict[str, float]:
    [probe] = get_profile("safeeditor").probes(it, pol)
    out, answer = {}, "<judgement>\n"
    for c in pol.categories:
        out[c] = two_way(plain_logits(model, processor, probe.messages, it.image,
                                      f"{answer}{c}:"), processor, " yes", " no")
        answer += f"{c}: no\n"
    return out


def expected_llavaguard(model: Any, processor: Any, it: JudgeInput,
                        pol: Policy) -> dict[str, float]:
    import torch

    [probe] = get_profile("llavaguard").probes(it, pol)
    opening = '{\n    "rating": "'
    unsafe = two_way(plain_logits(model, processor, probe.messages, it.image, opening),
                     processor, "Unsafe", "Safe")
    which = plain_logits(model, processor, probe.messages, it.image,
                         opening + 'Unsafe",\n    "category": "O')
    # the nine trained codes O1-O9; sexual is O3 + O4, violence O2 + O8, minors has none
    digits = [first_token(processor, str(i)) for i in range(1, 10)]
    codes = dict(zip(range(1, 10), torch.softmax(which[digits], dim=-1).tolist(), strict=True))
    return {"sexual": unsafe * (codes[3] + codes[4]), "violence": unsafe * (codes[2] + codes[8])}


# --- Qwen2.5-VL + the IPR adapter (`ipr`), and `safeeditor` on Qwen2.5-VL ---------------------

async def test_ipr_scores_are_the_adapted_models_own_probabilities(
        tiny_qwen2_5_vl_dir: Path, ipr_adapter_dir: Path, make_judge: Any) -> None:
    pol = policy(1.0)  # nothing crosses: this test is about the numbers
    judge = await make_judge(tiny_qwen2_5_vl_dir, adapter=str(ipr_adapter_dir), profile="ipr")
    assert judge.id == "vlm:ipr:Qwen2.5-VL-tiny+ipr-tiny"
    processor = judge._loaded().processor
    # The checkpoint's own processor class, with the PIL image processor where torchvision is
    # missing (transformers' Qwen2.5-VL processor otherwise insists on a video processor).
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    verdicts = await judge.judge(list(ITEMS), pol)
    model = plain_model(tiny_qwen2_5_vl_dir, ipr_adapter_dir)
    for it, verdict in zip(ITEMS, verdicts, strict=True):
        expected = expected_ipr(model, processor, it, pol)
        assert verdict.scores["minors"] == 0.0  # refuse-only: never IPR's call
        # IPR's score is 1 - P("keep") over the whole vocabulary: compare P("keep") itself.
        assert 1.0 - verdict.scores["violence"] == pytest.approx(
            1.0 - expected["violence"], rel=1e-3)
        assert verdict.scores["sexual"] == verdict.scores["violence"]
        assert verdict.details["decoded_tokens"] == 0
    assert verdicts[0].scores != verdicts[2].scores  # the image is seen


async def test_the_ipr_adapter_is_applied_whichever_layout_it_was_saved_in(
        tiny_qwen2_5_vl_dir: Path, ipr_adapter_dir: Path, tmp_path: Path,
        make_judge: Any) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    # Adapters saved before transformers 4.52 (IPR's possibly among them) name the language model's
    # layers `model.layers.*`; peft alone would load such an adapter as nothing at all.
    old = tmp_path / "ipr-old-layout"
    shutil.copytree(ipr_adapter_dir, old)
    weights = load_file(old / "adapter_model.safetensors")
    assert all(".language_model." in k for k in weights)
    save_file({k.replace("model.language_model.", "model."): v for k, v in weights.items()},
              old / "adapter_model.safetensors")

    it = ITEMS[0]
    base = await make_judge(tiny_qwen2_5_vl_dir, profile="ipr")
    new_layout = await make_judge(tiny_qwen2_5_vl_dir, profile="ipr",
                                  adapter=str(ipr_adapter_dir), merge_adapter=False)
    old_layout = await make_judge(tiny_qwen2_5_vl_dir, profile="ipr", adapter=str(old))
    pol = policy(1.0)
    [b], [n], [o] = [await j.judge([it], pol) for j in (base, new_layout, old_layout)]
    assert n.scores["violence"] != pytest.approx(b.scores["violence"], abs=1e-6)
    assert o.scores["violence"] == pytest.approx(n.scores["violence"], abs=1e-7)
    # The adapter sits on the language model's q_proj / v_proj only, as IPR trained it.
    lora = {name.rsplit(".lora_A", 1)[0] for name, _ in new_layout.model.named_parameters()
            if ".lora_A." in name}
    assert lora and all(".language_model." in n and n.endswith(("q_proj", "v_proj"))
                        for n in lora)
    # And it changes the logits themselves, not only one probability.
    processor = base._loaded().processor
    [probe] = get_profile("ipr").probes(it, pol)
    plain = [plain_logits(m, processor, probe.messages, it.image, "")
             for m in (plain_model(tiny_qwen2_5_vl_dir),
                       plain_model(tiny_qwen2_5_vl_dir, ipr_adapter_dir))]
    assert float((plain[0] - plain[1]).abs().max()) > 0.1
    assert torch.equal(plain[0], plain_logits(base.model, processor, probe.messages, it.image, ""))


async def test_ipr_refines_when_a_threshold_is_crossed(
        tiny_qwen2_5_vl_dir: Path, ipr_adapter_dir: Path, make_judge: Any) -> None:
    judge = await make_judge(tiny_qwen2_5_vl_dir, adapter=str(ipr_adapter_dir), profile="ipr")
    [verdict] = await judge.judge([ITEMS[0]], policy(0.0))
    assert 1 <= verdict.details["decoded_tokens"] <= 6
    # "keep" is banned once the verdict is unsafe: the decoded text is the refined prompt.
    assert verdict.raw.strip() and verdict.raw.strip().lower() != "keep"
    assert "parse_error" not in verdict.details
    assert verdict.refined_prompt == verdict.raw.strip().strip("`\"' ")


@pytest.mark.parametrize("family", ["Qwen2_5_VL", "Qwen2VL"])
async def test_safeeditor_on_qwen_vl(request: Any, make_judge: Any, family: str) -> None:
    model_dir = request.getfixturevalue(
        "tiny_qwen2_5_vl_dir" if family == "Qwen2_5_VL" else "tiny_qwen2_vl_dir")
    judge = await make_judge(model_dir)
    processor = judge._loaded().processor
    assert type(processor).__name__ == f"{family}Processor"
    verdicts = await judge.judge(list(ITEMS), policy(1.0))
    model = plain_model(model_dir)
    for it, verdict in zip(ITEMS, verdicts, strict=True):
        assert verdict.scores == pytest.approx(
            expected_safeeditor(model, processor, it, policy(1.0)), abs=1e-5)
    [explained] = await judge.judge([ITEMS[0]], policy(0.0))
    assert explained.raw.startswith("<judgement>\nsexual: yes\nviolence: yes\nminors: no\n"
                                    "</judgement>\n<thought>")
    assert explained.details["decoded_tokens"] > 0


# --- ShieldGemma 2 (`shieldgemma2`) -----------------------------------------------------------

async def test_shieldgemma2_scores_equal_the_shieldgemma2_classifiers_own(
        tiny_shieldgemma2_dir: Path, make_judge: Any) -> None:
    import torch
    from transformers import AutoProcessor, ShieldGemma2ForImageClassification

    judge = await make_judge(tiny_shieldgemma2_dir, profile="shieldgemma2")
    pol = policy(0.0)  # everything crosses: a judge-only profile still decodes nothing
    images = [it for it in ITEMS if it.image is not None]
    verdicts = await judge.judge(images, pol)
    # The reference: ShieldGemma 2's own processor (its chat template wraps each policy) and
    # classifier, P("Yes") per policy, as its model card runs it.
    # Its trained policies in their own wording: sexual and violence; minors is none of them.
    processor = AutoProcessor.from_pretrained(tiny_shieldgemma2_dir)
    classifier = ShieldGemma2ForImageClassification.from_pretrained(tiny_shieldgemma2_dir).eval()
    for it, verdict in zip(images, verdicts, strict=True):
        image = Image.open(io.BytesIO(it.image.data)).convert("RGB")  # type: ignore[union-attr]
        enc = processor(images=[image], policies=["sexual", "violence"], return_tensors="pt")
        with torch.no_grad():
            yes = classifier(**enc).probabilities[:, 0].tolist()
        assert verdict.scores == pytest.approx(dict(zip(["sexual", "violence"], yes,
                                                        strict=True)), abs=1e-5)
        assert verdict.details["decoded_tokens"] == 0 and verdict.raw == ""
    assert len({round(s, 6) for v in verdicts for s in v.scores.values()}) > 1


# --- LlavaGuard 1.2 on LLaVA-OneVision (`llavaguard`) -----------------------------------------

async def test_llavaguard_scores_are_the_models_own_probabilities(
        tiny_llava_onevision_dir: Path, make_judge: Any) -> None:
    judge = await make_judge(tiny_llava_onevision_dir, profile="llavaguard")
    processor = judge._loaded().processor
    assert type(processor).__name__ == "LlavaOnevisionProcessor"
    verdicts = await judge.judge(list(ITEMS), policy(1.0))
    model = plain_model(tiny_llava_onevision_dir)
    for it, verdict in zip(ITEMS, verdicts, strict=True):
        assert verdict.scores == pytest.approx(
            expected_llavaguard(model, processor, it, policy(1.0)), abs=1e-5)


async def test_llavaguard_explains_with_its_rationale(tiny_llava_onevision_dir: Path,
                                                      make_judge: Any) -> None:
    judge = await make_judge(tiny_llava_onevision_dir, profile="llavaguard", max_new_tokens=8)
    [verdict] = await judge.judge([ITEMS[0]], policy(0.0))
    prefix = '{\n    "rating": "Unsafe",\n    "category": "O'
    assert verdict.raw.startswith(prefix) and len(verdict.raw) > len(prefix) + 20
    assert verdict.details["decoded_tokens"] > 0
    # The rationale was cut at max_new_tokens: still parsed, its text kept as the thought.
    assert "parse_error" not in verdict.details, verdict.details
    assert verdict.thought and verdict.raw.endswith(verdict.thought.rstrip())


def test_a_llavaguard_rationale_cut_off_mid_sentence_still_parses() -> None:
    pol = policy(0.5)
    cut = '{\n    "rating": "Unsafe",\n    "category": "O2: Violence",\n    "rationale": "A kni'
    parsed = parse_llavaguard(cut, pol)
    assert parsed.ok and parsed.thought == "A kni"
    assert parsed.scores == {"sexual": 0.0, "violence": 1.0, "minors": 0.0}


# --- through the proxy, with the openai SDK ---------------------------------------------------

FAMILY_POLICY = """\
id: family
version: 1
prescreen: false
categories:
  sexual: {{threshold: {t}, action: edit}}
  violence: {{threshold: {t}, action: edit}}
  minors: {{threshold: 1.0, action: refuse}}
rounds: {{max: 2, on_exhausted: refuse}}
"""


def serve_family(proxy: Any, tmp_path: Path, threshold: float, **judge: Any) -> str:
    write_policy(tmp_path, FAMILY_POLICY.format(t=threshold))
    base = str(proxy(policy="family", judge={"kind": "vlm", "max_new_tokens": 6,
                                             "max_wait_ms": 2, "local_files_only": True,
                                             **judge}))
    for _ in range(400):  # the model loads off the event loop; /readyz says when it is done
        if httpx.get(base + "/readyz").status_code == 200:
            return base
        asyncio.run(asyncio.sleep(0.05))
    raise AssertionError("the judge never became ready")


def trace(base: str, trace_id: str) -> dict[str, Any]:
    r = httpx.get(f"{base}/v1/guard/traces/{trace_id}",
                  headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 200, r.text
    return dict(r.json())


def sdk(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=CLIENT_KEY, max_retries=0)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["ipr", "shieldgemma2", "llavaguard"])
def test_the_proxy_serves_through_each_family(proxy: Any, tmp_path: Path, request: Any,
                                              family: str) -> None:
    model = {"ipr": "tiny_qwen2_5_vl_dir", "shieldgemma2": "tiny_shieldgemma2_dir",
             "llavaguard": "tiny_llava_onevision_dir"}[family]
    judge: dict[str, Any] = {"model": str(request.getfixturevalue(model)), "profile": family}
    if family == "ipr":
        judge["adapter"] = str(request.getfixturevalue("ipr_adapter_dir"))
    # minors is no trained category of theirs: mapped onto their sexual ones, as a config would
    if family == "shieldgemma2":
        judge["profile_options"] = {"policies": {"minors": "sexual"}}
    if family == "llavaguard":
        judge["profile_options"] = {"codes": {"minors": ["O3", "O4"]}}
    base = serve_family(proxy, tmp_path, 1.0, **judge)
    raw = sdk(base).images.with_raw_response.generate(prompt="two street cats", n=2)
    data = raw.parse().data
    assert data is not None and len(data) == 2
    t = trace(base, raw.headers["x-guard-trace-id"])
    assert t["decision"] == "passed"
    [generated] = t["rounds"]
    judged = generated["images"]
    assert len(judged) == 2
    for image in judged:
        assert image["judge_id"].startswith(f"vlm:{family}:")
        assert set(image["scores"]) == set(CATS)
        assert all(0.0 <= s < 1.0 for s in image["scores"].values())
        assert image["details"]["batch_size"] == 2  # the request's two images, one forward pass


@pytest.mark.slow
def test_the_proxy_regenerates_with_the_ipr_adapters_refined_prompt(
        proxy: Any, tmp_path: Path, fake_backend: Any, tiny_qwen2_5_vl_dir: Path,
        ipr_adapter_dir: Path) -> None:
    base = serve_family(proxy, tmp_path, 0.0, model=str(tiny_qwen2_5_vl_dir),
                        adapter=str(ipr_adapter_dir), profile="ipr")
    with pytest.raises(openai.BadRequestError) as info:
        sdk(base).images.generate(prompt="a knight fighting a dragon")
    assert info.value.code == "content_policy_violation"
    t = trace(base, info.value.response.headers["x-guard-trace-id"])
    assert [r["kind"] for r in t["rounds"]] == ["generate", "generate"]
    first = t["rounds"][0]["images"][0]
    assert first["flagged"] == ["sexual", "violence"] and first["refined_prompt"]
    # The backend's second call got the prompt the adapter wrote.
    backend = fake_backend[0]
    assert backend.requests[0]["prompt"] == "a knight fighting a dragon"
    assert backend.requests[1]["prompt"] == first["refined_prompt"]
