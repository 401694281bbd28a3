"""An explanation that runs alone continues from the scoring pass's KV cache of its prompt
(guard.judges.vlm.prefix) instead of prefilling the prompt again: on each family that explains,
through the checkpoint's own processor, it decodes exactly what the second prefill decodes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from guard.judges.vlm import VLMJudge
from tests.test_model_families import ITEMS, policy

FAMILIES = {
    "llava": ("tiny_vlm_dir", "safeeditor"),
    "qwen2.5-vl": ("tiny_qwen2_5_vl_dir", "safeeditor"),
    "qwen2-vl": ("tiny_qwen2_vl_dir", "safeeditor"),
    "llava-onevision": ("tiny_llava_onevision_dir", "llavaguard"),
    "qwen2.5-vl+ipr": ("tiny_qwen2_5_vl_dir", "ipr"),
}


@pytest.fixture
def judges() -> Iterator[list[VLMJudge]]:
    made: list[VLMJudge] = []
    yield made
    for judge in made:
        asyncio.run(judge.aclose())


async def pair(request: Any, family: str, made: list[VLMJudge], **options: Any
               ) -> tuple[VLMJudge, VLMJudge]:
    fixture, profile = FAMILIES[family]
    config: dict[str, Any] = {"model": str(request.getfixturevalue(fixture)), "profile": profile,
                              "max_new_tokens": 12, "local_files_only": True, **options}
    if family.endswith("+ipr"):
        config["adapter"] = str(request.getfixturevalue("ipr_adapter_dir"))
    reusing = VLMJudge.from_config({**config, "reuse_prefill": True})
    prefilling = VLMJudge.from_config({**config, "reuse_prefill": False})
    made += [reusing, prefilling]
    await asyncio.gather(reusing.start(), prefilling.start())
    return reusing, prefilling


@pytest.mark.parametrize("family", list(FAMILIES))
async def test_alone_an_explanation_continues_from_the_scoring_prefill(
        request: Any, judges: list[VLMJudge], family: str) -> None:
    reusing, prefilling = await pair(request, family, judges)
    for it in ITEMS:  # with an image, without, another size
        [reused] = await reusing.judge([it], policy(0.0))
        [again] = await prefilling.judge([it], policy(0.0))
        assert reused.details["reused_prefill"] is True
        assert again.details["reused_prefill"] is False
        assert reused.details["decoded_tokens"] == again.details["decoded_tokens"] > 0
        assert reused.raw == again.raw
        assert reused.scores == again.scores


@pytest.mark.parametrize("family", ["llava", "qwen2.5-vl"])
async def test_the_continuation_fills_a_static_cache_where_the_model_decodes_with_one(
        request: Any, judges: list[VLMJudge], family: str) -> None:
    reusing, prefilling = await pair(request, family, judges, cache_implementation="static")
    assert reusing._loaded().cache_implementation == "static"
    for it in ITEMS[:2]:
        [reused] = await reusing.judge([it], policy(0.0))
        [again] = await prefilling.judge([it], policy(0.0))
        assert (reused.details["reused_prefill"], again.details["reused_prefill"]) == (True, False)
        assert reused.raw == again.raw and reused.details["decoded_tokens"] > 0
    assert reusing._loaded().cache_implementation == "static"  # no fallback was needed


async def test_a_batch_of_explanations_is_prefilled_together(
        request: Any, judges: list[VLMJudge]) -> None:
    reusing, prefilling = await pair(request, "qwen2.5-vl", judges)
    together = await reusing.judge(list(ITEMS), policy(0.0))
    assert [v.details["explain_batch_size"] for v in together] == [3, 3, 3]
    assert [v.details["reused_prefill"] for v in together] == [False] * 3
    assert [v.raw for v in together] == [v.raw for v in await prefilling.judge(list(ITEMS),
                                                                               policy(0.0))]


async def test_a_prompt_scored_behind_left_padding_is_prefilled_again(
        request: Any, judges: list[VLMJudge]) -> None:
    """The scoring batch pads shorter prompts on the left: their cached positions are not those
    they have alone, so they are never continued from."""
    from guard.judges.vlm.collate import collate
    from guard.judges.vlm.scoring import read_slots

    reusing, _ = await pair(request, "llava", judges)
    loaded = reusing._loaded()
    rows = [row for it in (ITEMS[0], ITEMS[1])
            for _, row in reusing._prepare(it, policy(1.0)).rows]
    _, starts = collate([(row.encoded, row.answer) for row in rows], loaded)
    _, kvs = read_slots(loaded, rows, keep_prompts=True)
    assert [kv is not None for kv in kvs] == [start == 0 for start in starts]
    assert sorted(starts)[0] == 0 and max(starts) > 0
    kept = next(kv for kv in kvs if kv is not None)
    assert kept.length == len(rows[starts.index(0)].encoded.ids) - 1  # the last runs again


async def test_a_failing_continuation_switches_reuse_off_and_prefills(
        request: Any, judges: list[VLMJudge], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    import guard.judges.vlm.generation as generation

    reusing, prefilling = await pair(request, "qwen2-vl", judges)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise TypeError("this transformers cannot continue from a cache")

    monkeypatch.setattr(generation, "continuation", broken)
    [first] = await reusing.judge([ITEMS[0]], policy(0.0))
    [expected] = await prefilling.judge([ITEMS[0]], policy(0.0))
    assert first.raw == expected.raw and first.details["reused_prefill"] is False
    assert "explanations prefill their prompt from now on" in caplog.text
    assert reusing._loaded().reuse_prefill is False
    [later] = await reusing.judge([ITEMS[2]], policy(0.0))
    assert later.details["reused_prefill"] is False
