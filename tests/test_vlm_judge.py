"""The `vlm` judge on a tiny random-weight LLaVA-style model built on the fly (tests/tiny_vlm.py).

Random weights answer nonsense, so these tests check the mechanics a user relies on: scores are
the model's own probabilities, safe items cost one forward pass and no decoding, concurrent
requests share that forward pass, unsafe items get a decoded explanation, adapters load.
"""

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
from guard.core.types import GeneratedImage, HistoryEntry, JudgeInput
from guard.judges.profiles import SafeEditorProfile
from guard.judges.vlm import VLMJudge
from guard.judges.vlm.generation import BanFirst
from guard.plugins import build_judge
from guard.support.errors import ConfigError, JudgeError
from tests.tiny_vlm import build_tiny_lora, tie_answer_tokens

CATS = ("sexual", "violence", "minors")


def policy(threshold: float, minors: float | None = None) -> Policy:
    cats = {c: {"threshold": threshold, "action": "edit"} for c in CATS}
    cats["minors"] = {"threshold": threshold if minors is None else minors, "action": "refuse"}
    return Policy.model_validate({"id": "t", "version": 1, "categories": cats})


def png(color: str, size: tuple[int, int] = (48, 40)) -> GeneratedImage:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return GeneratedImage(data=buf.getvalue())


def item(prompt: str = "a knight fighting a dragon", image: GeneratedImage | None = None,
         **kw: Any) -> JudgeInput:
    return JudgeInput(prompt=prompt, original_prompt=prompt, image=image, **kw)


@pytest.fixture(scope="module")
def half_dir(tiny_vlm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with " yes" and " no" made indistinguishable: every safeeditor score 0.5."""
    path = tmp_path_factory.mktemp("half") / "model"
    shutil.copytree(tiny_vlm_dir, path)
    tie_answer_tokens(path, " no", " yes")
    return path


@pytest.fixture(scope="module")
def lora_dir(tiny_vlm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_lora(tiny_vlm_dir, tmp_path_factory.mktemp("lora") / "adapter")


class Forwards:
    """Counts the model's forward passes (a hook on the real module, nothing replaced)."""

    def __init__(self, model: Any) -> None:
        self.count = 0
        self.batch_sizes: list[int] = []
        self.handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module: Any, args: Any, kwargs: Any, output: Any) -> None:
        self.count += 1
        self.batch_sizes.append(int(kwargs["input_ids"].shape[0]))


@pytest.fixture
def make_judge() -> Iterator[Any]:
    judges: list[VLMJudge] = []

    async def make(model_dir: Path, **options: Any) -> VLMJudge:
        judge = VLMJudge.from_config({"model": str(model_dir), "max_new_tokens": 8, **options})
        judges.append(judge)
        await judge.start()
        return judge

    yield make
    for judge in judges:
        asyncio.run(judge.aclose())


def expected_safeeditor_scores(model_dir: Path, it: JudgeInput, pol: Policy) -> dict[str, float]:
    """The scores computed the plain way: the whole teacher-forced text through the processor,
    one unpadded row, softmax of " yes" against " no" right before each category's answer."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    [probe] = SafeEditorProfile().probes(it, pol)
    text = processor.apply_chat_template(list(probe.messages), add_generation_prompt=True,
                                         tokenize=False)
    text += "<judgement>\n" + "".join(f"{c}: no\n" for c in pol.categories)
    images = [Image.open(io.BytesIO(it.image.data)).convert("RGB")] if it.image else None
    enc = processor(text=[text], images=images, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logits = model(**enc).logits[0]
    tok = processor.tokenizer
    yes, no = tok.convert_tokens_to_ids("Ġyes"), tok.convert_tokens_to_ids("Ġno")
    ids = enc["input_ids"][0].tolist()
    answers = [i for i, t in enumerate(ids) if t == no][-len(pol.categories):]
    return {c: float(torch.softmax(logits[i - 1][[yes, no]], dim=-1)[0])
            for c, i in zip(pol.categories, answers, strict=True)}


async def test_scores_are_the_models_own_probabilities(tiny_vlm_dir: Path,
                                                       make_judge: Any) -> None:
    judge = await make_judge(tiny_vlm_dir)
    pol = policy(1.0)  # nothing crosses: this test is about the numbers
    image_item = item("a knight fighting a dragon", png("red"))
    text_item = item("a cat asleep on a sofa, painting")
    # Judged together (different lengths, so one row is padded) and each alone.
    together = await judge.judge([image_item, text_item], pol)
    for it, verdict in zip([image_item, text_item], together, strict=True):
        expected = expected_safeeditor_scores(tiny_vlm_dir, it, pol)
        assert set(verdict.scores) == set(CATS)
        assert verdict.scores == pytest.approx(expected, abs=1e-4)
    assert together[0].scores != pytest.approx(together[1].scores, abs=1e-3)


async def test_indistinguishable_answers_score_exactly_one_half(half_dir: Path,
                                                                make_judge: Any) -> None:
    judge = await make_judge(half_dir)
    [verdict] = await judge.judge([item(image=png("blue"))], policy(0.9))
    assert verdict.scores == pytest.approx(dict.fromkeys(CATS, 0.5), abs=1e-6)


async def test_safe_items_cost_one_forward_pass_and_no_decoding(half_dir: Path,
                                                                make_judge: Any) -> None:
    judge = await make_judge(half_dir)
    forwards = Forwards(judge.model)
    verdicts = await judge.judge([item(image=png("red")), item(image=png("green")), item()],
                                 policy(0.6))
    assert forwards.count == 1 and forwards.batch_sizes == [3]
    for v in verdicts:
        assert v.details["decoded_tokens"] == 0 and v.details["batch_size"] == 3
        assert v.thought == "" and v.refined_prompt is None and v.raw == ""
        assert v.judge_id == "vlm:safeeditor:model"


async def test_unsafe_items_get_a_decoded_explanation(half_dir: Path, make_judge: Any) -> None:
    judge = await make_judge(half_dir, max_new_tokens=6)
    forwards = Forwards(judge.model)
    # 0.5 reaches violence's threshold (0.5) but not minors' (0.7)
    pol = Policy.model_validate({"id": "t", "version": 1, "categories": {
        "violence": {"threshold": 0.5, "action": "edit"},
        "minors": {"threshold": 0.7, "action": "refuse"}}})
    [verdict] = await judge.judge([item(image=png("red"))], pol)
    assert forwards.count > 1  # the verdict pass, then the decoding steps
    assert 1 <= verdict.details["decoded_tokens"] <= 6
    # The explanation starts from the measured verdict, then the model's own words.
    assert verdict.raw.startswith("<judgement>\nviolence: yes\nminors: no\n</judgement>\n"
                                  "<thought>")
    assert len(verdict.raw) > len("<judgement>\nviolence: yes\nminors: no\n</judgement>\n"
                                  "<thought>")
    assert verdict.scores == pytest.approx({"violence": 0.5, "minors": 0.5}, abs=1e-6)


async def test_a_failing_static_cache_falls_back_to_the_dynamic_cache(
        half_dir: Path, make_judge: Any) -> None:
    # On an H100 (torch 2.11) the compiled static-cache path raised inside generate for a new
    # batch size; here the real model's generate fails the same way whenever it is asked for it.
    # (Alone, an explanation continues from the scoring pass instead: tests/test_prefill_reuse.)
    judge = await make_judge(half_dir, max_new_tokens=4, cache_implementation="static",
                             reuse_prefill=False)
    model = judge.model
    real_generate = model.generate
    caches: list[str | None] = []

    def generate(*args: Any, **kwargs: Any) -> Any:
        caches.append(kwargs.get("cache_implementation"))
        if kwargs.get("cache_implementation") == "static":
            raise TypeError("'_contextvars.Context' object does not support the context manager")
        return real_generate(*args, **kwargs)

    model.generate = generate
    pol = Policy.model_validate({"id": "t", "version": 1, "categories": {
        "violence": {"threshold": 0.5, "action": "edit"}}})
    [first] = await judge.judge([item(image=png("red"))], pol)
    [second] = await judge.judge([item(image=png("blue"))], pol)
    assert caches == ["static", None, None]  # tried once, then dynamic for good
    assert first.details["decoded_tokens"] >= 1 and second.details["decoded_tokens"] >= 1


async def test_explain_always_decodes_safe_items_too(half_dir: Path, make_judge: Any) -> None:
    judge = await make_judge(half_dir, explain="always")
    [verdict] = await judge.judge([item()], policy(0.9))
    assert verdict.details["decoded_tokens"] > 0
    assert verdict.raw.startswith("<judgement>\nsexual: no\nviolence: no\nminors: no\n")


async def test_concurrent_requests_share_one_forward_pass(half_dir: Path,
                                                          make_judge: Any) -> None:
    judge = await make_judge(half_dir, max_wait_ms=300, max_batch=8)
    forwards = Forwards(judge.model)
    pol = policy(0.9)
    results = await asyncio.gather(
        judge.judge([item("one", png("red"))], pol),
        judge.judge([item("two", png("blue")), item("three")], pol),
        judge.judge([item("four", png("white"))], pol))
    assert forwards.count == 1 and forwards.batch_sizes == [4]
    assert [v.details["batch_size"] for r in results for v in r] == [4, 4, 4, 4]


async def test_max_batch_splits_large_requests(half_dir: Path, make_judge: Any) -> None:
    judge = await make_judge(half_dir, max_batch=2, max_wait_ms=0)
    forwards = Forwards(judge.model)
    verdicts = await judge.judge([item(f"p{i}", png("red")) for i in range(5)], policy(0.9))
    assert len(verdicts) == 5
    assert forwards.batch_sizes == [2, 2, 1]


async def test_history_changes_what_the_judge_sees(tiny_vlm_dir: Path, make_judge: Any) -> None:
    judge = await make_judge(tiny_vlm_dir)
    pol = policy(1.0)
    earlier = HistoryEntry(prompt="a bloody knight", scores={"violence": 0.9},
                           flagged=("violence",), thought="blood", refined_prompt="a knight")
    first, second = await judge.judge(
        [item("a knight", png("red")), item("a knight", png("red"), history=(earlier,))], pol)
    assert first.scores != pytest.approx(second.scores, abs=1e-4)


@pytest.mark.parametrize("profile", ["safeeditor", "ipr", "llavaguard", "shieldgemma2"])
async def test_every_profile_scores_every_category(tiny_vlm_dir: Path, make_judge: Any,
                                                   profile: str) -> None:
    judge = await make_judge(tiny_vlm_dir, profile=profile, max_new_tokens=4)
    # Threshold 0 makes every edit category unsafe (minors, a refusal, is kept below its
    # threshold: a refusal's refined prompt would never be used, so it is never explained).
    verdicts = await judge.judge([item(image=png("red")), item()], policy(0.0, minors=1.0))
    for v in verdicts:
        # a profile of a model trained on fixed categories scores what it assessed
        assert set(v.scores) == (set(v.assessed_on) if v.assessed_on is not None else set(CATS))
        if profile in ("llavaguard", "shieldgemma2"):  # minors: no trained category of theirs
            assert "minors" in v.details["unassessed"]
        assert all(0.0 <= s <= 1.0 for s in v.scores.values())
        # Profiles that explain decode, the others do not.
        decoded = v.details["decoded_tokens"]
        assert (decoded > 0) if profile != "shieldgemma2" else (decoded == 0)
    if profile == "ipr":  # IPR has no categories: refuse-only minors is never its call
        assert all(v.scores["minors"] == 0.0 for v in verdicts)


async def test_a_lora_adapter_changes_the_judge(tiny_vlm_dir: Path, lora_dir: Path,
                                                make_judge: Any) -> None:
    pol = policy(1.0)
    it = item(image=png("red"))
    base = await make_judge(tiny_vlm_dir)
    merged = await make_judge(tiny_vlm_dir, adapter=str(lora_dir))
    unmerged = await make_judge(tiny_vlm_dir, adapter=str(lora_dir), merge_adapter=False)
    [b], [m], [u] = [await j.judge([it], pol) for j in (base, merged, unmerged)]
    assert merged.id == "vlm:safeeditor:model+adapter"
    assert m.scores != pytest.approx(b.scores, abs=1e-3)
    assert m.scores == pytest.approx(u.scores, abs=1e-4)


async def test_not_ready_until_loaded_and_load_failures_are_judge_errors(
        tiny_vlm_dir: Path, tmp_path: Path) -> None:
    judge = VLMJudge.from_config({"model": str(tiny_vlm_dir)})
    assert await judge.ready() is False  # starts loading in the judge's thread
    await judge.start()
    assert await judge.ready() is True
    await judge.aclose()

    missing = VLMJudge.from_config({"model": str(tmp_path / "nothing-here"),
                                    "local_files_only": True})
    with pytest.raises(JudgeError, match="could not load"):
        await missing.judge([item()], policy(0.5))
    assert await missing.ready() is False
    await missing.aclose()


async def test_an_unreadable_image_is_a_judge_error(tiny_vlm_dir: Path, make_judge: Any) -> None:
    judge = await make_judge(tiny_vlm_dir)
    with pytest.raises(JudgeError, match="cannot read the image"):
        await judge.judge([item(image=GeneratedImage(data=b"not an image"))], policy(0.5))
    # The judge still works afterwards.
    assert len(await judge.judge([item()], policy(0.5))) == 1


async def test_large_images_are_shrunk_before_the_processor(tiny_vlm_dir: Path,
                                                            make_judge: Any) -> None:
    judge = await make_judge(tiny_vlm_dir, max_image_side=64)
    image = judge._image(item(image=png("red", (400, 200))))
    assert image.size == (64, 32)


def test_config_is_validated_up_front() -> None:
    with pytest.raises(ConfigError, match="max_batch"):
        build_judge({"kind": "vlm", "model": "m", "max_batch": 0})
    with pytest.raises(ConfigError, match="temperature"):
        build_judge({"kind": "vlm", "model": "m", "temperature": 0.7})
    with pytest.raises(ConfigError, match="unknown judge profile"):
        build_judge({"kind": "vlm", "model": "m", "profile": "nope"})
    judge = build_judge({"kind": "vlm", "model": "/models/Qwen2.5-VL-7B", "profile": "ipr",
                         "adapter": "/models/ipr-7b"})
    assert judge.id == "vlm:ipr:Qwen2.5-VL-7B+ipr-7b"


def test_the_first_decoded_token_can_be_banned_per_row() -> None:
    import torch

    ban = BanFirst([[2], []], prompt_len=5)
    scores = torch.zeros((2, 4))
    out = ban(torch.zeros((2, 5), dtype=torch.long), scores.clone())
    assert out[0, 2] == float("-inf") and torch.isfinite(out[1]).all()
    later = ban(torch.zeros((2, 6), dtype=torch.long), scores.clone())
    assert torch.isfinite(later).all()


# --- the whole loop through the proxy ------------------------------------------------------------

LOOP_POLICY = """\
id: vlm-loop
version: 2
prescreen: true
categories:
  sexual: {{threshold: {t}, action: edit}}
  violence: {{threshold: {t}, action: edit}}
  minors: {{threshold: 0.9, action: refuse}}
rounds: {{max: 2, on_exhausted: refuse}}
"""


def _proxy_with_vlm(proxy: Any, tmp_path: Path, model_dir: Path, threshold: float) -> str:
    import httpx

    from tests.conftest import write_policy

    write_policy(tmp_path, LOOP_POLICY.format(t=threshold))
    base = proxy(policy="vlm-loop", judge={"kind": "vlm", "model": str(model_dir),
                                           "max_new_tokens": 6, "max_wait_ms": 2})
    for _ in range(200):  # the model loads off the event loop; /readyz says when it is done
        ready = httpx.get(base + "/readyz")
        if ready.status_code == 200:
            break
        assert ready.json()["checks"]["judge"] is False
        asyncio.run(asyncio.sleep(0.05))
    assert ready.status_code == 200, ready.text
    return base


def _trace(base: str, trace_id: str) -> dict[str, Any]:
    import httpx

    from tests.conftest import ADMIN_KEY

    r = httpx.get(f"{base}/v1/guard/traces/{trace_id}",
                  headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 200, r.text
    return dict(r.json())


def _generate(base: str, body: dict[str, Any]) -> Any:
    import httpx

    from tests.conftest import CLIENT_KEY

    return httpx.post(f"{base}/v1/images/generations", json=body, timeout=60,
                      headers={"authorization": f"Bearer {CLIENT_KEY}"})


def test_proxy_serves_images_the_vlm_judge_finds_safe(proxy: Any, tmp_path: Path,
                                                      half_dir: Path, fake_backend: Any) -> None:
    base = _proxy_with_vlm(proxy, tmp_path, half_dir, threshold=0.6)
    r = _generate(base, {"prompt": "two street cats", "n": 2})
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 2 and r.json()["guard"]["decision"] == "passed"
    t = _trace(base, r.headers["x-guard-trace-id"])
    assert [x["kind"] for x in t["rounds"]] == ["prescreen", "generate"]
    judged = t["rounds"][1]["images"]
    assert len(judged) == 2
    for image in judged:
        assert image["judge_id"] == "vlm:safeeditor:model"
        assert image["scores"] == pytest.approx(dict.fromkeys(CATS, 0.5), abs=1e-5)
        assert image["details"]["decoded_tokens"] == 0
        assert image["details"]["batch_size"] == 2  # the request's two images, one forward pass
    assert fake_backend[0].requests[0]["prompt"] == "two street cats"


def test_proxy_regenerates_then_refuses_what_the_vlm_judge_keeps_flagging(
        proxy: Any, tmp_path: Path, half_dir: Path, fake_backend: Any) -> None:
    base = _proxy_with_vlm(proxy, tmp_path, half_dir, threshold=0.5)
    # Prescreen and every image score 0.5 >= 0.5 on sexual and violence: edit. The tiny model
    # writes no usable refined prompt and the policy has no terms to rewrite with, so after
    # round 1 nothing new is left to try: refused at once, the same prompt never made twice
    # (issue 18), though rounds.max = 2 would allow another round.
    r = _generate(base, {"prompt": "a knight fighting a dragon"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "content_policy_violation"
    assert "nothing new to try" in r.json()["error"]["message"]
    t = _trace(base, r.headers["x-guard-trace-id"])
    assert [x["kind"] for x in t["rounds"]] == ["prescreen", "generate"]
    assert len(fake_backend[0].requests) == 1
    for rnd in t["rounds"]:
        [image] = rnd["images"]
        assert image["flagged"] == ["sexual", "violence"] and image["action"] == "edit"
        # The judge explained itself: the verdict it measured, then its own decoded words.
        assert image["raw"].startswith("<judgement>\nsexual: yes\nviolence: yes\nminors: no\n")
        assert image["details"]["decoded_tokens"] > 0


def test_decoding_stops_at_the_profiles_stop_text(tiny_vlm_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer

    from guard.judges.vlm.generation import StopOnText

    tok = AutoTokenizer.from_pretrained(tiny_vlm_dir)
    prompt = tok.encode("<thought>", add_special_tokens=False)
    rows = [prompt + tok.encode(" calm</thought>\n<refined_prompt>a lake</refined_prompt>",
                                add_special_tokens=False),
            prompt + tok.encode(" calm</thought>\n<refined_prompt>a lake, at dawn with",
                                add_special_tokens=False)]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    stop = StopOnText(tok, ["</refined_prompt>"], prompt_len=len(prompt))
    assert stop(ids, None).tolist() == [True, False]


# --- a Qwen2.5-VL-style model (the benchmark's tiny configuration) -------------------------------

def _tiny_qwen() -> tuple[Any, Any]:
    import sys

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from judge_gpu import QwenLikeProcessor, build_model, build_tokenizer

    tok = build_tokenizer()
    return build_model("tiny", tok, "cpu", torch.float32, None), QwenLikeProcessor(tok)


async def test_qwen_style_model_batched_vision_windows_and_padding_change_nothing() -> None:
    from guard.judges.vlm import VLMOptions

    pol = policy(1.0)
    # 500 px: the vision tower's attention windows do not all have the same size.
    items = [item("a knight fighting a dragon", png("red", (500, 500))),
             item("a quiet lake at dawn"), item("two cats", png("blue", (300, 200)))]
    results = {}
    for mode in ("auto", "model"):
        model, processor = _tiny_qwen()  # same seed, same weights
        judge = VLMJudge(VLMOptions(model="tiny-qwen", vision_attention=mode),
                         model=model, processor=processor)
        await judge.start()
        expected_impl = "flash_padded_sdpa" if mode == "auto" else "sdpa"
        assert model.config.vision_config._attn_implementation == expected_impl
        windows: list[int] = []
        if mode == "auto":  # the vision tower really goes through the batched windows
            from transformers import AttentionInterface

            from guard.judges.vlm.attention import padded_varlen_sdpa

            def counted(*args: Any, windows: list[int] = windows, **kwargs: Any) -> Any:
                windows.append(len(kwargs["cu_seq_lens_q"]) - 1)
                return padded_varlen_sdpa(*args, **kwargs)

            AttentionInterface.register(expected_impl, counted)
        together = await judge.judge(items, pol)
        alone = [(await judge.judge([it], pol))[0] for it in items]
        assert bool(windows) == (mode == "auto") and all(n >= 1 for n in windows)
        for a, b in zip(together, alone, strict=True):  # left padding, 3D rope: no effect
            assert a.scores == pytest.approx(b.scores, abs=1e-5)
        results[mode] = [v.scores for v in together]
        await judge.aclose()
    for a, b in zip(results["auto"], results["model"], strict=True):
        assert a == pytest.approx(b, abs=1e-5)
