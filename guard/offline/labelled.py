"""Labelled items: what a reviewer said about one judged prompt or image, with what the judge
recorded for it, as ground truth for calibration (`safeedit policy calibrate`), evaluation
(`safeedit eval --labels`) and the dashboard's false-positive and miss rates.

A label names an item of a trace (`slot` None = the prompt, judged in the prescreen, round 0;
otherwise image `slot` of generation round `round`) and a verdict on what the guard did to it:

    correct          the flags were right: unsafe in exactly the flagged categories (none: safe)
    false_positive   flagged but safe: in `category`, or in every flagged category when none given
    missed           unsafe in `category` (required) and not flagged for it

Labels come from the label store (guard.plugins.LabelStore) or from a CSV file with the columns

    trace_id, slot, round, verdict, category      the label (slot empty for the prompt)
    flagged                                       optional: the recorded flags, comma-separated
    prompt                                        optional: the judged prompt
    score_<category>                              optional: the recorded score per category

A CSV with `score_` columns is self-contained (works offline; without `flagged` the policy given
decides the flags from the scores); without them each row is looked up in the audit store by
trace id, slot and round, where the recorded scores, flags and prompt are read.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from guard.core.labels import VERDICTS
from guard.core.policy import Policy
from guard.core.types import JudgedImage, Trace
from guard.plugins import AuditStore, LabelStore
from guard.support.errors import ConfigError

SCORE_PREFIX = "score_"
LABEL_COLUMNS = ("trace_id", "slot", "round", "verdict", "category")


class LabelLike(Protocol):
    """What a label says (guard.core.labels.Label has these fields, and more)."""

    @property
    def trace_id(self) -> str: ...
    @property
    def slot(self) -> int | None: ...
    @property
    def round(self) -> int: ...
    @property
    def verdict(self) -> str: ...
    @property
    def category(self) -> str | None: ...


class LabelsUnavailable(ConfigError):
    """The audit store keeps no labels."""


@dataclass(frozen=True, slots=True)
class CsvLabel:
    """One row of a labels CSV; `scores` empty when the row is to be looked up in the store."""

    trace_id: str
    slot: int | None
    round: int
    verdict: str
    category: str | None
    line: int
    scores: Mapping[str, float] = field(default_factory=dict)
    flagged: tuple[str, ...] | None = None
    prompt: str = ""


@dataclass(frozen=True, slots=True)
class LabelledItem:
    """A labelled item with what was recorded for it."""

    trace_id: str
    slot: int | None
    round: int
    verdict: str
    category: str | None
    scores: Mapping[str, float]
    flagged: tuple[str, ...]
    prompt: str = ""
    image_sha256: str | None = None
    action: str = "pass"

    def truth(self, category: str) -> bool:
        """Whether the item is, by its label, unsafe in `category`."""
        if self.verdict == "missed":
            return category == self.category or category in self.flagged
        if self.verdict == "false_positive":
            return self.category not in (None, category) and category in self.flagged
        return category in self.flagged

    def true_categories(self, categories: Iterable[str]) -> tuple[str, ...]:
        return tuple(c for c in categories if self.truth(c))


@dataclass
class Resolved:
    items: list[LabelledItem]
    skipped: Counter[str]


def read_labels_csv(path: str | Path) -> list[CsvLabel]:
    """The rows of a labels CSV (see the module's docstring); every bad row is a ConfigError
    naming its line."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            names = reader.fieldnames or []
            missing = [c for c in LABEL_COLUMNS if c not in names]
            if missing:
                raise ConfigError(f"{path}: a labels CSV needs the columns "
                                  f"{', '.join(LABEL_COLUMNS)} (missing: {', '.join(missing)})")
            score_columns = [n for n in names if n.startswith(SCORE_PREFIX)]
            return [_row(path, reader.line_num, raw, score_columns) for raw in reader]
    except OSError as exc:
        raise ConfigError(f"cannot read labels file {path}: {exc.strerror}") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"{path}: not a readable CSV file: {exc}") from exc


def _row(path: Path, line: int, raw: Mapping[str, Any], score_columns: Sequence[str]) -> CsvLabel:
    where = f"{path}:{line}"
    verdict = (raw.get("verdict") or "").strip()
    if verdict not in VERDICTS:
        raise ConfigError(f"{where}: verdict must be one of {', '.join(VERDICTS)}, "
                          f"not {verdict!r}")
    category = (raw.get("category") or "").strip() or None
    if verdict == "missed" and category is None:
        raise ConfigError(f"{where}: a 'missed' label needs the category that was missed")
    try:
        slot_text = (raw.get("slot") or "").strip()
        slot = int(slot_text) if slot_text else None
        round_ = int((raw.get("round") or "0").strip() or 0)
        scores = {c[len(SCORE_PREFIX):]: float(raw[c]) for c in score_columns
                  if (raw.get(c) or "").strip()}
    except ValueError as exc:
        raise ConfigError(f"{where}: slot and round are whole numbers, scores are numbers "
                          f"({exc})") from exc
    if any(not 0.0 <= s <= 1.0 for s in scores.values()):
        raise ConfigError(f"{where}: scores are between 0 and 1")
    flagged_text = raw.get("flagged")
    flagged = None if flagged_text is None else tuple(
        s.strip() for s in flagged_text.split(",") if s.strip())
    trace_id = (raw.get("trace_id") or "").strip()
    if not trace_id and not scores:
        raise ConfigError(f"{where}: a row without scores needs a trace_id to look them up")
    return CsvLabel(trace_id, slot, round_, verdict, category, line, scores, flagged,
                    (raw.get("prompt") or "").strip())


def judged_item(trace: Trace, slot: int | None, round_: int) -> JudgedImage | None:
    """The item a label names in its trace: the prompt (slot None: the prescreen) or an image."""
    for rnd in trace.rounds:
        if slot is None and rnd.kind == "prescreen" and rnd.images:
            return rnd.images[0]
        if slot is not None and rnd.counts and rnd.index == round_:
            # A round may have several records (slots go their own way): the slot's own.
            found = next((j for j in rnd.images if j.slot == slot), None)
            if found is not None:
                return found
    return None


def item_of(label: LabelLike, judged: JudgedImage) -> LabelledItem:
    return LabelledItem(label.trace_id, label.slot, label.round, label.verdict, label.category,
                        dict(judged.scores), tuple(judged.flagged), judged.prompt,
                        judged.image_sha256, judged.action)


async def resolve(labels: Sequence[LabelLike | CsvLabel], policy: Policy | None = None,
                  store: AuditStore | None = None,
                  traces: Mapping[str, Trace] | None = None, *,
                  need_scores: bool = True) -> Resolved:
    """Labelled items from labels: a self-contained CSV row as it is (its flags decided by
    `policy` when it gives none), any other looked up in `traces` or the store. A CSV row is
    self-contained with scores, or, unless `need_scores`, with a prompt and its flags. Labels
    whose trace or item cannot be found are counted in `skipped`, by reason."""
    found: dict[str, Trace | None] = dict(traces or {})
    items: list[LabelledItem] = []
    skipped: Counter[str] = Counter()
    for label in labels:
        if isinstance(label, CsvLabel) and (label.scores or not need_scores and (
                label.prompt and label.flagged is not None)):
            if policy is None:
                raise ConfigError("labels with scores need the policy that decided them")
            decision = policy.decide(label.scores)
            flagged = decision.flagged if label.flagged is None else label.flagged
            items.append(LabelledItem(label.trace_id, label.slot, label.round, label.verdict,
                                      label.category, dict(label.scores), flagged, label.prompt,
                                      action=decision.action))
            continue
        if label.trace_id not in found:
            if store is None:
                raise ConfigError("labels without score columns are looked up in the audit "
                                  "store: give --config (or score_<category> columns)")
            found[label.trace_id] = await store.get(label.trace_id)
        trace = found[label.trace_id]
        if trace is None:
            skipped["trace not in the audit store"] += 1
            continue
        judged = judged_item(trace, label.slot, label.round)
        if judged is None:
            skipped["no such item in its trace"] += 1
            continue
        items.append(item_of(label, judged))
    return Resolved(items, skipped)


async def store_labels(source: Any, *, tenant: str | None = None, since: float | None = None,
                       until: float | None = None, limit: int = 100_000) -> list[LabelLike]:
    """Every label (the latest per item) of `source`, a label store, paged through."""
    if not isinstance(source, LabelStore):
        raise LabelsUnavailable("labels store not available: this audit store keeps no labels")
    out: list[LabelLike] = []
    cursor: str | None = None
    while len(out) < limit:
        page = await source.labels(tenant=tenant, since=since, until=until, latest_only=True,
                                   limit=min(1000, limit - len(out)), cursor=cursor)
        out.extend(page.items)
        cursor = page.next_cursor
        if cursor is None:
            break
    return out
