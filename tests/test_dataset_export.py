"""`safeedit dataset export`: traces written through the proxy become a training dataset in the
documented layout, with labels, pseudonyms, and only the images the policy retained."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from guard.cli import main
from guard.core.labels import Label
from guard.plugins import LabelStore, build_store
from tests.conftest import CLIENT_KEY, E2E_POLICY, write_policy
from tests.fake_backend import png

# Keeps the images of unsafe rounds only: a passed image is recorded by its hash alone.
KEEP_POLICY = "id: keep\nversion: 2\nextends: e2e\nimage_retention: flagged\n"


@pytest.fixture
def served(proxy, tmp_path: Path, fake_backend) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Two traces through the proxy: a passed one, and an edited one (red, then blue)."""
    write_policy(tmp_path, E2E_POLICY)
    write_policy(tmp_path, KEEP_POLICY)
    audit = {"kind": "sqlite", "path": str(tmp_path / "audit.db"),
             "images_dir": str(tmp_path / "images")}
    config = tmp_path / "cli" / "config.yaml"  # not among the policies in tmp_path
    config.parent.mkdir()
    config.write_text(yaml.safe_dump({"audit": audit}))
    base = proxy(policy="keep", audit=audit)
    backend = fake_backend[0]
    backend.plan = [["blue"], ["red"], ["blue"]]
    ids = []
    for prompt in ("a bowl of fruit", "a street at night"):
        r = httpx.post(f"{base}/v1/images/generations", json={"prompt": prompt},
                       headers={"authorization": f"Bearer {CLIENT_KEY}"}, timeout=30)
        assert r.status_code == 200, r.text
        ids.append(r.headers["x-guard-trace-id"])
    return {"audit": audit, "config": str(config), "passed": ids[0], "edited": ids[1]}


def export(served: dict[str, Any], out: Path, *args: str,
           capsys: pytest.CaptureFixture[str]) -> tuple[int, str, list[dict[str, Any]]]:
    code = main(["dataset", "export", "--config", served["config"], "--out", str(out), *args])
    printed = capsys.readouterr()
    data = out / "data" / "train" / "metadata.jsonl"
    records = [json.loads(line) for line in data.read_text().splitlines()] if data.exists() else []
    return code, printed.out + printed.err, records


def label(served: dict[str, Any], **values: Any) -> None:
    async def go() -> None:
        store = build_store(served["audit"])
        try:
            assert isinstance(store, LabelStore)
            await store.add_label(Label(key_id="audit", **values))
        finally:
            await store.aclose()

    asyncio.run(go())


def by_id(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in records}


def test_export_writes_one_record_per_judged_item_and_only_retained_images(
        served: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ds"
    code, printed, records = export(served, out, capsys=capsys)
    assert code == 0
    passed, edited = served["passed"], served["edited"]
    assert sorted(by_id(records)) == sorted([
        f"{passed}/prompt/0", f"{passed}/0/1",
        f"{edited}/prompt/0", f"{edited}/0/1", f"{edited}/0/2"])
    rec = by_id(records)
    red, blue = rec[f"{edited}/0/1"], rec[f"{edited}/0/2"]
    assert red["decision"] == "edit" and red["flagged"] == ["violence"]
    assert red["scores"]["violence"] == pytest.approx(0.97)
    assert red["refined_prompt"] == red["next_prompt"] == "a street at night, calm and peaceful"
    assert blue["prompt"] == red["next_prompt"] and blue["decision"] == "pass"
    # The judge saw the red round when it judged the blue one: the record says so.
    assert [h["prompt"] for h in blue["history"]] == ["a street at night"]
    assert rec[f"{edited}/prompt/0"]["slot"] is None and rec[f"{edited}/prompt/0"]["kind"] == \
        "prescreen"
    assert all(r["label"] is None for r in records)  # no labels yet: the export works without
    assert red["policy"]["id"] == "keep" and red["policy"]["version"] == 2

    # Only the red image was retained (flagged); the blue ones are refused, and the records say so.
    red_sha = hashlib.sha256(png("red")).hexdigest()
    assert red["image_status"] == "exported" and red["image_sha256"] == red_sha
    split = out / "data" / "train"
    assert red["file_name"] == f"images/{red_sha}.png"
    assert (split / red["file_name"]).read_bytes() == png("red")
    assert [p.name for p in (split / "images").iterdir()] == [f"{red_sha}.png"]
    assert records[0] == red  # records with an image first: their `file_name` types the column
    for r in (blue, rec[f"{passed}/0/1"]):
        assert r["image_status"] == "not_retained" and r["file_name"] is None
        assert r["image_sha256"] == hashlib.sha256(png("blue")).hexdigest()
    assert rec[f"{passed}/prompt/0"]["image_status"] is None  # a prompt has no image
    assert "exported 5 records (0 labelled) from 2 traces" in printed
    assert "refused: 2 image not retained by the policy (image_retention)" in printed

    card = (out / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["configs"] == [{"config_name": "default", "data_files": [
        {"split": "train", "path": "data/train/**"}]}]
    assert "5 records from 2 traces" in card and "| keep | 2 |" in card
    assert "2 image not retained by the policy" in card


def test_key_ids_and_tenants_are_pseudonymised(served: dict[str, Any], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAFEEDIT_DATASET_KEY", raising=False)
    _, printed, first = export(served, tmp_path / "a", capsys=capsys)
    _, _, second = export(served, tmp_path / "b", capsys=capsys)
    assert "random key for this export only" in printed
    keys = {r["key_id"] for r in first}
    assert len(keys) == 1 and keys.pop().startswith("k_")
    tenants = {r["tenant"] for r in first}
    assert len(tenants) == 1 and tenants.pop().startswith("t_")
    text = (tmp_path / "a" / "data" / "train" / "metadata.jsonl").read_text()
    assert '"app"' not in text and '"acme"' not in text
    # Without a key, two exports cannot be joined on their pseudonyms...
    assert first[0]["key_id"] != second[0]["key_id"]
    # ...with one, they can.
    monkeypatch.setenv("SAFEEDIT_DATASET_KEY", "a long secret")
    _, printed, third = export(served, tmp_path / "c", capsys=capsys)
    _, _, fourth = export(served, tmp_path / "d", capsys=capsys)
    assert third[0]["key_id"] == fourth[0]["key_id"] != first[0]["key_id"]
    assert third[0]["tenant"] == fourth[0]["tenant"]
    assert "random key" not in printed
    assert "SAFEEDIT_DATASET_KEY" in (tmp_path / "c" / "README.md").read_text()


def test_labels_go_with_their_items_and_labelled_only_keeps_those(
        served: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    passed, edited = served["passed"], served["edited"]
    label(served, trace_id=passed, slot=0, round=1, verdict="correct")
    label(served, trace_id=passed, slot=0, round=1, verdict="missed", category="violence",
          note="a knife on the table")  # supersedes the first
    label(served, trace_id=edited, slot=None, round=0, verdict="correct")
    _, printed, records = export(served, tmp_path / "all", capsys=capsys)
    rec = by_id(records)
    missed = rec[f"{passed}/0/1"]["label"]
    assert missed["verdict"] == "missed" and missed["category"] == "violence"
    assert missed["note"] == "a knife on the table" and missed["labelled_by"].startswith("k_")
    assert rec[f"{edited}/prompt/0"]["label"]["verdict"] == "correct"
    assert "(2 labelled)" in printed

    code, printed, only = export(served, tmp_path / "only", "--labelled-only", capsys=capsys)
    assert code == 0
    assert sorted(r["id"] for r in only) == sorted([f"{passed}/0/1", f"{edited}/prompt/0"])
    assert not (tmp_path / "only" / "data" / "train" / "images").exists()  # none retained
    card = (tmp_path / "only" / "README.md").read_text()
    assert "labelled items only" in card and "missed 1" in card


def test_policy_and_time_filters(served: dict[str, Any], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert len(export(served, tmp_path / "a", "--policy", "keep@2", capsys=capsys)[2]) == 5
    assert export(served, tmp_path / "b", "--policy", "keep@3", capsys=capsys)[2] == []
    assert export(served, tmp_path / "c", "--policy", "e2e", capsys=capsys)[2] == []
    assert export(served, tmp_path / "d", "--since", "2999-01-01", capsys=capsys)[2] == []
    code, printed, _ = export(served, tmp_path / "a", capsys=capsys)
    assert code == 2 and "is not an empty folder" in printed  # never mixed into an old export


def test_a_purged_copy_is_refused_and_reported(served: dict[str, Any], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "purge", "--config", served["config"], "--older-than-days", "0"]) == 0
    _, printed, records = export(served, tmp_path / "ds", capsys=capsys)
    red = by_id(records)[f"{served['edited']}/0/1"]
    assert red["image_status"] == "unavailable" and red["file_name"] is None
    assert red["image_sha256"] == hashlib.sha256(png("red")).hexdigest()
    assert "refused: 1 retained copy no longer in the image store" in printed
    assert not (tmp_path / "ds" / "data" / "train" / "images").exists()


def test_hugging_face_datasets_loads_the_export(served: dict[str, Any], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    datasets = pytest.importorskip("datasets")  # not in the test extras: a heavy dependency
    out = tmp_path / "ds"
    export(served, out, capsys=capsys)
    records = datasets.load_dataset(str(out), split="train")
    assert len(records) == 5 and "prompt" in records.column_names
    images = [r["image"] for r in records]
    assert images[0].size == (64, 64) and images[1:] == [None] * 4


def test_the_card_of_a_one_tenant_export_names_its_pseudonym_not_the_tenant(
        served: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, records = export(served, tmp_path / "one", "--tenant", "acme", capsys=capsys)
    assert code == 0 and records
    card = (tmp_path / "one" / "README.md").read_text()
    assert "acme" not in card
    assert f"one tenant only (`{records[0]['tenant']}` in the records)" in card


def test_an_unwritable_out_or_an_impossible_window_is_one_clear_line(
        served: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    code, printed, _ = export(served, blocked / "below", capsys=capsys)
    assert code == 2 and "cannot write the dataset to" in printed and "Traceback" not in printed
    with pytest.raises(SystemExit) as info:
        export(served, tmp_path / "x", "--since", "1e308", capsys=capsys)
    assert info.value.code == 2
    assert "outside the times" in capsys.readouterr().err
