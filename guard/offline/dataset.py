"""Training data from the audit log: one record per judged item, for fine-tuning a judge.

`safeedit dataset export --out DIR` writes, from the audit store of the operators' config:

    DIR/README.md                          the dataset card: what is inside, counts, policy
                                           versions, how keys and tenants were pseudonymised
    DIR/data/train/metadata.jsonl          every record, one JSON object a line
    DIR/data/train/images/<sha256>.<ext>   the images the policy retained, each once

This is Hugging Face's imagefolder layout: `datasets.load_dataset(DIR, split="train")` gives the
records with an `image` column (the image decoded, or None), from the records' `file_name` (the
image's path relative to data/train/, or null). Rows without an image need a recent `datasets`
(5.x: older ones fail on a null `file_name`); an export with no image at all loads as plain
JSON Lines, `file_name` staying a column. Any JSON Lines reader reads metadata.jsonl as it is.

One record per judged item: the prompt of a prescreen round (`slot` null) or an image of a
generation round. Fields: `id` (`<trace>/<slot or "prompt">/<round>`), `trace_id`,
`created_at`, `key_id` and `tenant` (pseudonyms), `policy` (id, version, sha256), `round`,
`kind`, `slot`, `original_prompt` (the user's), `prompt` (the one judged), `history` (the slot's
earlier rounds as the judge saw them), `judge_id`, `scores`, `flagged`, `decision` (the policy's
action: pass, edit, refuse), `thought`, `refined_prompt` (the judge's), `next_prompt` (the prompt
judged in the slot's next round, when it differs), `request_decision`, `image_sha256`,
`image_status` (`exported`, `not_retained`, `unavailable`; null for a prompt), `file_name`
(relative to data/train/, or null) and `label` (the item's latest label: verdict, category, note,
created_at, labelled_by; or null).

Images: only an image the trace itself retained (`image_ref`, set when the policy's
`image_retention` kept it) is exported, and only while its copy is in the image store; the same
bytes retained by another trace do not count. Every other image is refused: its record keeps the
sha256 and says why (`not_retained` by the policy, or `unavailable`: purged, expired or no image
store), and the export's report counts them.

Pseudonyms: `k_<16 hex>` for key ids (the requester's and the labeller's), `t_<16 hex>` for
tenants, HMAC-SHA256 of the value. The HMAC key comes from the environment variable named by
`key_env` (default SAFEEDIT_DATASET_KEY): pseudonyms are then the same in every export made with
that key, so datasets can be joined, and only the key's holder can test a guess. Without it a
random key is drawn for the export and kept nowhere: pseudonyms are consistent within the export
and cannot be linked to anything else. The request's other fields (e.g. OpenAI's `user`) are not
exported; prompts are exported as written, so the dataset is as sensitive as the prompts are.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from guard.audit import ChainedStore, ImageKeepingStore
from guard.audit.images import RetainedImages
from guard.core.labels import Label
from guard.core.types import JudgedImage, Trace
from guard.plugins import AuditStore, LabelStore
from guard.support.errors import ConfigError

SPLIT_DIR = "data/train"
DATA_FILE = "data/train/metadata.jsonl"
IMAGES_DIR = "images"  # in SPLIT_DIR
KEY_ENV = "SAFEEDIT_DATASET_KEY"
_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif"}
SKIP_REASONS = {
    "not_retained": "image not retained by the policy (image_retention)",
    "unavailable": "retained copy no longer in the image store (purged or expired)",
    "judge_failed": "item not judged (the judge failed and the policy allowed it)",
}


class Pseudonyms:
    """Keyed pseudonyms (HMAC-SHA256) for key ids and tenants."""

    def __init__(self, key: bytes | None = None) -> None:
        self.keyed = key is not None
        self._key = key if key is not None else secrets.token_bytes(32)

    @classmethod
    def from_env(cls, name: str = KEY_ENV) -> Pseudonyms:
        value = os.environ.get(name)
        return cls(value.encode() if value else None)

    def __call__(self, kind: str, value: str | None) -> str | None:
        if value is None:
            return None
        mac = hmac.new(self._key, f"{kind}\0{value}".encode(), hashlib.sha256)
        return f"{kind[0]}_{mac.hexdigest()[:16]}"


@dataclass(frozen=True, slots=True)
class ExportFilter:
    since: float | None = None
    until: float | None = None
    tenant: str | None = None
    policy_id: str | None = None
    policy_version: int | None = None
    labelled_only: bool = False

    @staticmethod
    def policy_spec(spec: str | None) -> tuple[str | None, int | None]:
        """`ID` or `ID@VERSION` (the `--policy` option)."""
        if not spec:
            return None, None
        pid, sep, version = spec.partition("@")
        if sep and not version.isdigit():
            raise ConfigError(f"--policy expects ID or ID@VERSION, got {spec!r}")
        return pid, int(version) if sep else None

    def keeps(self, trace: Trace) -> bool:
        return ((self.policy_id is None or trace.policy.get("id") == self.policy_id)
                and (self.policy_version is None
                     or trace.policy.get("version") == self.policy_version))


@dataclass
class ExportReport:
    out: Path
    records: int = 0
    traces: int = 0
    images: int = 0  # image files written
    with_image: int = 0  # records with an image file
    skipped: Counter[str] = field(default_factory=Counter)  # SKIP_REASONS -> count
    labels: Counter[str] = field(default_factory=Counter)  # label verdict -> records
    decisions: Counter[str] = field(default_factory=Counter)
    policies: Counter[tuple[str, int, str]] = field(default_factory=Counter)
    keyed: bool = False
    filter: ExportFilter = field(default_factory=ExportFilter)
    # The --tenant filter as the records name it: the card is published with the data, so it
    # names the tenant by its pseudonym, never in the clear.
    tenant_pseudonym: str | None = None

    def count(self, record: Mapping[str, Any], trace: Trace) -> None:
        self.records += 1
        self.with_image += record["file_name"] is not None
        self.decisions[record["decision"]] += 1
        if record["label"] is not None:
            self.labels[record["label"]["verdict"]] += 1
        policy = trace.policy
        self.policies[(str(policy.get("id")), int(policy.get("version") or 0),
                       str(policy.get("sha256") or ""))] += 1

    def lines(self) -> list[str]:
        """What the CLI prints."""
        out = [f"exported {self.records} records ({sum(self.labels.values())} labelled) from "
               f"{self.traces} traces to {self.out}; {self.images} images"]
        for reason, count in sorted(self.skipped.items()):
            verb = "skipped" if reason == "judge_failed" else "refused"
            out.append(f"{verb}: {count} {SKIP_REASONS[reason]}")
        if not self.keyed:
            out.append(f"pseudonyms: a random key for this export only ({KEY_ENV} not set)")
        return out


async def export_dataset(store: AuditStore, out: Path, flt: ExportFilter = ExportFilter(),
                         pseudonyms: Pseudonyms | None = None) -> ExportReport:
    """Write the dataset of `store`'s judged items (as `flt` selects) under `out`, which must be
    missing or empty."""
    if not isinstance(store, ChainedStore):
        raise ConfigError(f"the {type(store).__name__} store cannot be read trace by trace")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not an empty folder")
    try:
        (out / SPLIT_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot write the dataset to {out}: {exc.strerror}") from None
    pseudo = pseudonyms or Pseudonyms.from_env()
    report = ExportReport(out, keyed=pseudo.keyed, filter=flt,
                          tenant_pseudonym=pseudo("tenant", flt.tenant))
    labels = await latest_labels(store, flt.tenant)
    images = store.images if isinstance(store, ImageKeepingStore) else None
    written: set[str] = set()
    rest = out / SPLIT_DIR / "rest.tmp"
    with _open(out / DATA_FILE) as data, _open(rest) as others:
        async for trace in _traces(store, flt):
            counted = False
            for record, judged in records_of(trace, labels, pseudo):
                if judged.judge_id.startswith("(judge failed"):  # guard.pipeline.engine._judged
                    report.skipped["judge_failed"] += 1
                    continue
                if flt.labelled_only and record["label"] is None:
                    continue
                await _attach_image(record, judged, images, out, written, report)
                line = orjson.dumps(record) + b"\n"
                (data if record["file_name"] else others).write(line)
                report.count(record, trace)
                counted = True
            report.traces += counted
    # Records with an image first: `datasets` takes the columns' types from the file's first
    # block, and `file_name` must be text there, not only nulls.
    _append(out / DATA_FILE, rest)
    (out / "README.md").write_text(dataset_card(report))
    return report


def _open(path: Path) -> BinaryIO:
    # Blocking writes of a line at a time from the export's coroutine, as `safeedit audit
    # export` does: the command has nothing else to serve meanwhile.
    return open(path, "wb")


def _append(path: Path, part: Path) -> None:
    with open(path, "ab") as out, open(part, "rb") as src:
        shutil.copyfileobj(src, out)
    part.unlink()


async def latest_labels(store: AuditStore, tenant: str | None = None
                        ) -> dict[tuple[str, int | None, int], Label]:
    """Each labelled item's latest label; none for a store that keeps no labels."""
    if not isinstance(store, LabelStore):
        return {}
    found: dict[tuple[str, int | None, int], Label] = {}
    cursor: str | None = None
    while True:
        page = await store.labels(tenant=tenant, latest_only=True, limit=1000, cursor=cursor)
        for label in page.items:
            found.setdefault(label.item, label)  # newest first
        if page.next_cursor is None:
            return found
        cursor = page.next_cursor


async def _traces(store: ChainedStore, flt: ExportFilter) -> AsyncIterator[Trace]:
    async for row in store.chain_rows(since=flt.since, until=flt.until, tenant=flt.tenant):
        trace = Trace.model_validate_json(row.body)
        if flt.keeps(trace):
            yield trace


def records_of(trace: Trace, labels: Mapping[tuple[str, int | None, int], Label],
               pseudo: Pseudonyms) -> Iterator[tuple[dict[str, Any], JudgedImage]]:
    """The records of one trace (image fields not yet filled), each with its judged item."""
    original = str(trace.request.get("prompt") or next(
        (j.prompt for r in trace.rounds for j in r.images), ""))
    by_slot: dict[int | None, list[tuple[int, JudgedImage]]] = {}
    for rnd in trace.rounds:
        for judged in rnd.images:
            slot = None if rnd.kind == "prescreen" else judged.slot
            by_slot.setdefault(slot, []).append((rnd.index, judged))
    prescreen = by_slot.get(None, [])
    for rnd in trace.rounds:
        for judged in rnd.images:
            slot = None if rnd.kind == "prescreen" else judged.slot
            # The judge saw the slot's earlier rounds, and the prescreen when it edited the prompt.
            earlier = [j for i, j in by_slot[slot] if i < rnd.index]
            if slot is not None:
                earlier = [j for _, j in prescreen if j.action == "edit"] + earlier
            later = [j for i, j in by_slot.get(0 if slot is None else slot, []) if i > rnd.index]
            next_prompt = later[0].prompt if later and later[0].prompt != judged.prompt else None
            label = labels.get((trace.id, slot, rnd.index))
            yield {
                "id": f"{trace.id}/{'prompt' if slot is None else slot}/{rnd.index}",
                "trace_id": trace.id, "created_at": trace.created_at,
                "key_id": pseudo("key", trace.key_id), "tenant": pseudo("tenant", trace.tenant),
                "policy": {k: trace.policy.get(k) for k in ("id", "version", "sha256")},
                "round": rnd.index, "kind": rnd.kind, "slot": slot,
                "original_prompt": original, "prompt": judged.prompt,
                "history": [{"prompt": j.prompt, "scores": j.scores, "flagged": j.flagged,
                             "thought": j.thought, "refined_prompt": j.refined_prompt}
                            for j in earlier],
                "judge_id": judged.judge_id, "scores": judged.scores, "flagged": judged.flagged,
                "decision": judged.action, "thought": judged.thought,
                "refined_prompt": judged.refined_prompt, "next_prompt": next_prompt,
                "request_decision": trace.decision, "image_sha256": judged.image_sha256,
                "image_status": None, "file_name": None,
                "label": None if label is None else {
                    "verdict": label.verdict, "category": label.category, "note": label.note,
                    "created_at": label.created_at,
                    "labelled_by": pseudo("key", label.key_id)},
            }, judged


async def _attach_image(record: dict[str, Any], judged: JudgedImage,
                        images: RetainedImages | None, out: Path,
                        written: set[str], report: ExportReport) -> None:
    sha = judged.image_sha256
    if sha is None:
        return
    if judged.image_ref is None:
        record["image_status"] = "not_retained"
    else:
        found = await images.get(sha) if images is not None else None
        if found is None:
            record["image_status"] = "unavailable"
        else:
            data, media_type = found
            name = f"{IMAGES_DIR}/{sha}.{_EXTENSIONS.get(media_type, 'bin')}"
            if sha not in written:
                (out / SPLIT_DIR / IMAGES_DIR).mkdir(exist_ok=True)
                (out / SPLIT_DIR / name).write_bytes(data)
                written.add(sha)
                report.images += 1
            record["image_status"], record["file_name"] = "exported", name
            return
    report.skipped[record["image_status"]] += 1


def read_records(directory: Path) -> list[dict[str, Any]]:
    """The records of an exported dataset (DATA_FILE)."""
    path = Path(directory) / DATA_FILE
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read the dataset {path}: {exc.strerror}") from exc
    return [orjson.loads(line) for line in lines if line.strip()]


# --- the dataset card -------------------------------------------------------------------------

def dataset_card(report: ExportReport) -> str:
    flt = report.filter
    policies = "\n".join(f"| {pid} | {version} | `{sha[:12]}` | {count} |"
                         for (pid, version, sha), count in sorted(report.policies.items()))
    window = ", ".join(f"{name} {_when(value)}" for name, value in
                       (("from", flt.since), ("before", flt.until)) if value is not None)
    selection = [window or "the whole audit log",
                 *([f"one tenant only (`{report.tenant_pseudonym}` in the records)"]
                   if flt.tenant else []),
                 *([f"policy {flt.policy_id}" + (f" version {flt.policy_version}"
                                                  if flt.policy_version is not None else "")]
                   if flt.policy_id else []),
                 *(["labelled items only"] if flt.labelled_only else [])]
    skipped = "\n".join(f"- {count} {SKIP_REASONS[reason]}"
                        for reason, count in sorted(report.skipped.items())) or "- none"
    labels = ", ".join(f"{verdict} {count}" for verdict, count in sorted(report.labels.items()))
    decisions = ", ".join(f"{d} {c}" for d, c in sorted(report.decisions.items()))
    pseudonyms = (f"keyed HMAC-SHA256 (key from `{KEY_ENV}`): the same in every export made "
                  "with that key" if report.keyed else
                  "HMAC-SHA256 under a random key drawn for this export and kept nowhere: "
                  "consistent within this dataset, linkable to nothing else")
    return f"""---
pretty_name: SafeEdit Guard judged items
tags:
- safety
- image-moderation
configs:
- config_name: default
  data_files:
  - split: train
    path: {SPLIT_DIR}/**
---

# SafeEdit Guard judged items

Exported by `safeedit dataset export` on {_when(time.time())}: one record per item the guard's
judge scored (a prompt in a prescreen round, an image in a generation round), with the judge's
scores, the policy's decision, the judge's thought and refined prompt, and the auditors' latest
label where there is one. Selection: {"; ".join(selection)}.

## Counts

- {report.records} records from {report.traces} traces
- decisions: {decisions or "none"}
- labels: {labels or "none"}
- {report.images} image files ({report.with_image} records with an image)

Not exported:
{skipped}

## Policy versions

| policy | version | sha256 | records |
|---|---|---|---|
{policies or "| (none) | | | 0 |"}

## Layout

Hugging Face's imagefolder layout: `datasets.load_dataset(DIR, split="train")` gives every
record with its image decoded in `image` (None where there is none; rows without an image need
`datasets` 5 or later).

- `{DATA_FILE}`: every record, one JSON object a line; `file_name` is the image's path
  relative to `{SPLIT_DIR}/`, or null
- `{SPLIT_DIR}/{IMAGES_DIR}/`: the images the policy retained, named by sha256

An image is exported only when the trace's policy retained it and its copy is still kept; any
other record keeps the image's sha256 and says why in `image_status` (`not_retained`,
`unavailable`). Fields are described in `guard/offline/dataset.py`.

## Privacy

Key ids and tenants are pseudonyms ({pseudonyms}). Prompts, thoughts and labels' notes are
exported as written.
"""


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
