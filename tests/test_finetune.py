"""`safeedit judge finetune` on the tiny random-weight model (tests/tiny_vlm.py): the judge's
verdicts recorded in an audit store, auditors' labels saying where it was wrong, the export,
then a LoRA fine-tune whose adapter loads back through `judge: vlm` and fixes those verdicts."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from guard.cli import main
from guard.core.labels import Label
from guard.core.policy import Policy, load_policy
from guard.core.types import GeneratedImage, JudgedImage, JudgeInput, RoundRecord, Trace
from guard.judges.vlm import VLMJudge
from guard.offline.dataset import ExportFilter, Pseudonyms, export_dataset, read_records
from guard.offline.finetune import Target, answer_text, target_of
from guard.plugins import build_judge, build_store

POLICY = """\
id: ft
version: 3
categories:
  sexual: {threshold: 0.5, action: edit}
  violence: {threshold: 0.5, action: edit}
"""
ITEMS = [("a photo of a cat on a sofa", "red"), ("a knight fighting a dragon", "blue"),
         ("a portrait, painting", "green"), ("a landscape", "yellow")]
LABELLED = 3  # the first three items get a label saying the judge was wrong; not the last


def png(colour: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, "PNG")
    return buf.getvalue()


def judge_options(model: Path, **extra: Any) -> dict[str, Any]:
    return {"kind": "vlm", "model": str(model), "max_new_tokens": 4, **extra}


async def scores_of(options: dict[str, Any], policy: Policy) -> list[dict[str, float]]:
    judge = build_judge(options)
    assert isinstance(judge, VLMJudge)
    try:
        items = [JudgeInput(prompt=p, original_prompt=p, image=GeneratedImage(data=png(c)))
                 for p, c in ITEMS]
        return [dict(v.scores) for v in await judge.judge(items, policy)]
    finally:
        await judge.aclose()


def wrong_label(scores: dict[str, float], policy: Policy) -> dict[str, Any]:
    """The label an auditor gives an item the judge got wrong: flagged -> a false positive,
    passed -> a missed violence."""
    if policy.decide(scores).flagged:
        return {"verdict": "false_positive"}
    return {"verdict": "missed", "category": "violence"}


@pytest.fixture(scope="module")
def dataset(tiny_vlm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The base judge's verdicts as traces in a SQLite store (images retained), labels on the
    first items saying they were wrong, exported with `export_dataset`."""
    root = tmp_path_factory.mktemp("finetune")
    (root / "policy.yaml").write_text(POLICY)
    policy = load_policy(root / "policy.yaml")

    async def build() -> list[dict[str, float]]:
        scores = await scores_of(judge_options(tiny_vlm_dir), policy)
        store = build_store({"kind": "sqlite", "path": str(root / "audit.db"),
                             "images_dir": str(root / "images")})
        try:
            for i, ((prompt, colour), sc) in enumerate(zip(ITEMS, scores, strict=True)):
                image = GeneratedImage(data=png(colour))
                decision = policy.decide(sc)
                trace = Trace(key_id="app", tenant="acme", policy=policy.ref,
                              request={"prompt": prompt}, decision="passed",
                              rounds=[RoundRecord(index=1, kind="generate", images=[JudgedImage(
                                  slot=0, prompt=prompt, image_sha256=image.sha256,
                                  judge_id="vlm:safeeditor:model", scores=sc,
                                  flagged=list(decision.flagged), action=decision.action)])])
                trace.retain(image)
                await store.write(trace)
                if i < LABELLED:
                    await store.add_label(Label(trace_id=trace.id, slot=0, round=1,
                                                key_id="audit", **wrong_label(sc, policy)))
            await export_dataset(store, root / "ds", ExportFilter(), Pseudonyms())
        finally:
            await store.aclose()
        return scores

    base = asyncio.run(build())
    return {"root": root, "policy": policy, "base": base, "dir": root / "ds"}


def test_finetune_lowers_the_loss_and_its_adapter_fixes_a_wrong_verdict(
        dataset: dict[str, Any], tiny_vlm_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = dataset["root"] / "adapter"
    code = main(["judge", "finetune", "--dataset", str(dataset["dir"]),
                 "--model", str(tiny_vlm_dir), "--adapter-out", str(adapter),
                 "--policy", str(dataset["root"] / "policy.yaml"), "--unlabelled", "skip",
                 "--epochs", "6", "--lr", "0.01", "--rank", "8", "--holdout", "0.2", "--json"])
    out = capsys.readouterr()
    assert code == 0
    report = json.loads(out.out)
    assert "finetune" in out.err and "step" in out.err  # the progress bar
    assert report["skipped"] == {"unlabelled (--unlabelled skip)": 1}
    assert report["train"] == 2 and report["held"] == 1 and report["steps"] == 12
    losses = report["losses"]
    assert sum(losses[-3:]) < sum(losses[:3]) / 2  # the training loss falls...
    assert report["held_loss_after"] < report["held_loss_before"] / 2  # ...and on a held item
    assert (adapter / "adapter_config.json").is_file()

    # The adapter loads back as the judge's `adapter:` and now agrees with the auditors on the
    # labelled training items, which the base model got wrong.
    policy: Policy = dataset["policy"]
    tuned = asyncio.run(scores_of(judge_options(tiny_vlm_dir, adapter=str(adapter)), policy))
    trained = [r for r in read_records(dataset["dir"]) if r["id"] in report["train_ids"]]
    assert len(trained) == 2
    for record in trained:
        index = next(i for i, (prompt, _) in enumerate(ITEMS) if prompt == record["prompt"])
        target = target_of(record, policy)
        assert record["label"] is not None and target is not None
        assert policy.decide(dataset["base"][index]).flagged != target.flagged  # wrong before
        assert policy.decide(tuned[index]).flagged == target.flagged  # right now


def test_targets_follow_the_labels() -> None:
    policy = Policy.model_validate({"id": "p", "version": 1, "categories": {
        "sexual": {"threshold": 0.5, "action": "edit"},
        "violence": {"threshold": 0.5, "action": "edit"}}})
    base = {"slot": 0, "prompt": "a fight", "flagged": ["violence"], "thought": "blood",
            "refined_prompt": "a hug", "next_prompt": "a hug"}
    assert target_of(base, policy) == Target(("violence",), "blood", "a hug")
    assert target_of({**base, "label": {"verdict": "correct"}}, policy) == \
        Target(("violence",), "blood", "a hug")
    assert target_of({**base, "label": {"verdict": "false_positive"}}, policy) == Target(())
    missed = {"slot": 0, "prompt": "a beach", "flagged": [], "thought": "",
              "refined_prompt": None, "next_prompt": None,
              "label": {"verdict": "missed", "category": "sexual"}}
    assert target_of(missed, policy) == Target(("sexual",), "The image is unsafe under: sexual.")
    assert target_of({**missed, "label": None}, policy, unlabelled="skip") is None
    # A missed category on an item edited for another: the later round's prompt refines it.
    both = {**base, "refined_prompt": None, "label": {"verdict": "missed", "category": "sexual"}}
    assert target_of(both, policy) == Target(("sexual", "violence"),
                                             "The image is unsafe under: sexual, violence.",
                                             "a hug")

    assert answer_text(Target(("violence",), "blood", "a hug"), "safeeditor", policy, "x") == (
        "<judgement>\nsexual: no\nviolence: yes\n</judgement>\n<thought>blood</thought>\n"
        "<refined_prompt>a hug</refined_prompt>")
    assert answer_text(Target(("sexual",)), "safeeditor", policy, "x") == \
        "<judgement>\nsexual: yes\nviolence: no\n</judgement>"
    assert answer_text(Target(()), "ipr", policy, "a beach") == "keep"
    assert answer_text(Target(("violence",), "", "a hug"), "ipr", policy, "a fight") == "a hug"
