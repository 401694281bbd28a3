"""`safeedit judge finetune` on the tiny random-weight model (tests/tiny_vlm.py): the judge's
verdicts recorded in an audit store, auditors' labels saying where it was wrong, the export,
then a LoRA fine-tune whose adapter loads back through `judge: vlm` and fixes those verdicts."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
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
                 "--epochs", "6", "--lr", "0.01", "--rank", "8", "--holdout", "0.2", "--json",
                 # three examples: too few to judge by (test_the_adapter_is_judged_... below)
                 "--no-eval", "--allow-one-class"])
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


# --- an adapter that cannot fool itself ----------------------------------------------------------

UNSAFE_ITEM, SAFE_ITEM = ("a knight fighting in blood", "red"), ("a cat on a sofa", "blue")
GATE_POLICY = """\
id: gate
version: 1
categories:
  sexual: {threshold: 0.5, action: edit}
  violence: {threshold: 0.01, action: edit}
"""


def write_dataset(root: Path, unsafe: int, safe: int) -> Path:
    """`unsafe` traces recorded as violence, `safe` ones as passed (the targets of unlabelled
    items are the recorded decisions), exported as `safeedit dataset export` writes them."""
    (root / "policy.yaml").write_text(GATE_POLICY)
    policy = load_policy(root / "policy.yaml")

    async def build() -> None:
        store = build_store({"kind": "sqlite", "path": str(root / "audit.db"),
                             "images_dir": str(root / "images")})
        try:
            for flagged, n in ((["violence"], unsafe), ([], safe)):
                prompt, colour = UNSAFE_ITEM if flagged else SAFE_ITEM
                for _ in range(n):
                    image = GeneratedImage(data=png(colour))
                    trace = Trace(key_id="app", tenant="acme", policy=policy.ref,
                                  request={"prompt": prompt}, decision="passed",
                                  rounds=[RoundRecord(index=1, kind="generate", images=[
                                      JudgedImage(slot=0, prompt=prompt,
                                                  image_sha256=image.sha256,
                                                  judge_id="vlm:safeeditor:model",
                                                  scores={"violence": 1.0 if flagged else 0.0},
                                                  flagged=flagged,
                                                  action="edit" if flagged else "pass")])])
                    trace.retain(image)
                    await store.write(trace)
            await export_dataset(store, root / "ds", ExportFilter(), Pseudonyms())
        finally:
            await store.aclose()

    asyncio.run(build())
    return root / "ds"


def finetune_cli(root: Path, dataset: Path, model: Path, *extra: str) -> list[str]:
    return ["judge", "finetune", "--dataset", str(dataset), "--model", str(model),
            "--policy", str(root / "policy.yaml"), "--adapter-out", str(root / "adapter"),
            "--rank", "8", "--lr", "0.01", "--json", *extra]


def test_one_class_training_is_refused_unless_allowed(
        tiny_vlm_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # every training example safe: the adapter trained on false positives only
    data = write_dataset(tmp_path, unsafe=0, safe=4)
    code = main(finetune_cli(tmp_path, data, tiny_vlm_dir, "--no-eval", "--max-steps", "1"))
    err = capsys.readouterr().err
    assert code != 0 and "training examples are safe" in err and "--allow-one-class" in err
    assert not (tmp_path / "adapter").exists()
    code = main(finetune_cli(tmp_path, data, tiny_vlm_dir, "--no-eval", "--max-steps", "1",
                             "--allow-one-class"))
    assert code == 0 and (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_too_little_held_back_to_judge_the_adapter_by(
        tiny_vlm_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_dataset(tmp_path, unsafe=9, safe=14)  # 9 unsafe: never 10 held back
    code = main(finetune_cli(tmp_path, data, tiny_vlm_dir, "--max-steps", "1"))
    err = capsys.readouterr().err
    assert code != 0 and "too little to judge the adapter" in err and "--no-eval" in err
    assert "9 unsafe" in err and not (tmp_path / "adapter").exists()


@pytest.fixture(scope="module")
def gate_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """20 unsafe and 12 safe traces: the held-back split takes 10 of each; 10 unsafe and 2 safe
    are left to train on."""
    root = tmp_path_factory.mktemp("gate")
    return root, write_dataset(root, unsafe=20, safe=12)


def test_an_adapter_that_loses_unsafe_recall_is_not_written(
        tiny_vlm_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 10 unsafe traces, all held back: it trains on safe ones alone and learns to say "no"
    data = write_dataset(tmp_path, unsafe=10, safe=16)
    code = main(finetune_cli(tmp_path, data, tiny_vlm_dir, "--max-steps", "4",
                             "--allow-one-class"))
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["written"] is False and not (tmp_path / "adapter").exists()
    before, after = report["before"], report["after"]
    assert before["classes"]["unsafe"]["support"] >= 10
    assert before["classes"]["safe"]["support"] >= 10
    assert before["classes"]["unsafe"]["recall"] == 1.0  # the base model flags at 0.01
    assert report["recall_drop"] > 0.05 and after["classes"]["unsafe"]["recall"] < 0.95
    assert report["max_recall_drop"] == 0.05
    assert any(line.startswith("class unsafe") for line in report["table"])


def test_an_adapter_that_keeps_unsafe_recall_is_written_and_can_be_judged_again(
        tiny_vlm_dir: Path, tmp_path: Path, gate_data: tuple[Path, Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    root, data = gate_data
    shutil.copy(root / "policy.yaml", tmp_path / "policy.yaml")
    code = main(finetune_cli(tmp_path, data, tiny_vlm_dir, "--max-steps", "3",
                             "--batch-size", "2"))
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["written"] is True, report["table"]
    assert report["classes"] == {"safe": 2, "unsafe": 10}
    assert report["held"] == 20 and report["recall_drop"] <= 0.05
    violence = report["after"]["categories"]["violence"]
    assert violence["support"] == 10 and violence["tp"] + violence["fn"] == 10
    adapter = tmp_path / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    # --eval-only: the same split judged again, the adapter as written against the base model,
    # the same table printed; nothing trained
    code = main([a for a in finetune_cli(tmp_path, data, tiny_vlm_dir, "--eval-only",
                                         str(adapter)) if a != "--json"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("no adapter written")
    assert "\n".join(report["table"]) in out and "unsafe recall fell by" in out
