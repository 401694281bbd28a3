"""Judging a fine-tuned adapter before it is written: the held-back split judged by the model
without and with the adapter, through the `vlm` judge itself, per class and per category.

The split (`stratified_split`) holds back whole traces until it has at least `MIN_PER_CLASS`
items of each class (safe: the target flags nothing; unsafe: it flags a category) and the
`holdout` share; with fewer there is too little to judge an adapter by. The figures
(`Evaluation`): per class, and per category with its items labelled unsafe in that category as
the positives, the counts (true and false positives, false negatives, support), precision and
recall, all from the policy's own decision on the judge's scores. `gate` passes an adapter whose
unsafe recall falls by no more than `max_recall_drop` (absolute) from the base model's.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from guard.core.policy import Policy
from guard.core.types import JudgeInput

if TYPE_CHECKING:
    from guard.offline.finetune import Example

MIN_PER_CLASS = 10
CLASSES = ("unsafe", "safe")


def class_of(flagged: Sequence[str]) -> str:
    return "unsafe" if flagged else "safe"


def stratified_split(examples: Sequence[Example], holdout: float, seed: int = 0,
                     per_class: int = MIN_PER_CLASS) -> tuple[list[Example], list[Example]]:
    """(train, held back): whole traces, in an order fixed by the seed, held back until the
    held-back split has `per_class` items of each class and `holdout` of all; ValueError when
    that would leave nothing to train on or cannot be reached."""
    traces = sorted({e.trace_id for e in examples},
                    key=lambda t: hashlib.sha256(f"{seed}:{t}".encode()).hexdigest())
    want = round(holdout * len(examples))
    counts = dict.fromkeys(CLASSES, 0)
    held: set[str] = set()
    for trace_id in traces:
        if len(held) and min(counts.values()) >= per_class \
                and sum(counts.values()) >= want:
            break
        members = [e for e in examples if e.trace_id == trace_id]
        # a trace only adds what the split still needs (or the share it still lacks)
        needed = [c for c in CLASSES if counts[c] < per_class]
        if needed and not any(class_of(e.flagged) in needed for e in members) \
                and sum(counts.values()) >= want:
            continue
        held.add(trace_id)
        for e in members:
            counts[class_of(e.flagged)] += 1
    train = [e for e in examples if e.trace_id not in held]
    if min(counts.values()) < per_class or not train:
        have = {c: sum(1 for e in examples if class_of(e.flagged) == c) for c in CLASSES}
        raise ValueError(f"too little to judge the adapter: the held-back split needs at least "
                         f"{per_class} safe and {per_class} unsafe items and some left to train "
                         f"on; the dataset has {have['safe']} safe and {have['unsafe']} unsafe")
    return train, [e for e in examples if e.trace_id in held]


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    support: int = 0  # the positives

    @property
    def precision(self) -> float | None:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else None

    @property
    def recall(self) -> float | None:
        return self.tp / self.support if self.support else None

    def add(self, truth: bool, predicted: bool) -> None:
        self.support += truth
        self.tp += truth and predicted
        self.fp += predicted and not truth
        self.fn += truth and not predicted

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "precision": self.precision, "recall": self.recall}


@dataclass
class Evaluation:
    items: int = 0
    classes: dict[str, Counts] = field(default_factory=lambda: {c: Counts() for c in CLASSES})
    categories: dict[str, Counts] = field(default_factory=dict)

    def record(self, truth: Sequence[str], predicted: Sequence[str],
               categories: Sequence[str]) -> None:
        self.items += 1
        self.classes["unsafe"].add(bool(truth), bool(predicted))
        self.classes["safe"].add(not truth, not predicted)
        for c in categories:
            self.categories.setdefault(c, Counts()).add(c in truth, c in predicted)

    @property
    def unsafe_recall(self) -> float | None:
        return self.classes["unsafe"].recall

    def to_dict(self) -> dict[str, Any]:
        return {"items": self.items,
                "classes": {k: v.to_dict() for k, v in self.classes.items()},
                "categories": {k: v.to_dict() for k, v in self.categories.items()}}


async def judge_examples(judge: Any, examples: Sequence[Example]) -> Evaluation:
    """The judge's verdicts on `examples`, decided by each one's policy, against its target."""
    out = Evaluation()
    groups: dict[str, list[Example]] = {}
    for e in examples:
        assert e.policy is not None and e.item is not None
        groups.setdefault(f"{e.policy.id}@{e.policy.version}", []).append(e)
    for group in groups.values():
        policy: Policy = group[0].policy  # type: ignore[assignment]
        items: list[JudgeInput] = [e.item for e in group]  # type: ignore[misc]
        # the verdict is what is measured: no explanation is decoded
        verdicts = await judge.judge(items, policy.verdict_only())
        for e, verdict in zip(group, verdicts, strict=True):
            out.record(e.flagged, policy.decide(verdict.scores).flagged, list(policy.categories))
    return out


def evaluate_model(model: Any, processor: Any, model_name: str, profile: str,
                   examples: Sequence[Example]) -> Evaluation:
    """`examples` judged by the `vlm` judge over an already loaded model (with its adapter as
    it is now)."""
    from guard.judges.vlm import VLMJudge
    from guard.judges.vlm.options import VLMOptions

    async def run() -> Evaluation:
        judge = VLMJudge(VLMOptions(model=model_name, profile=profile),
                         model=model, processor=processor)
        try:
            await judge.start()
            return await judge_examples(judge, examples)
        finally:
            await judge.aclose()

    return asyncio.run(run())


def gate(before: Evaluation, after: Evaluation, max_recall_drop: float) -> tuple[bool, float]:
    """Whether the adapter may be written, and how much its unsafe recall fell (absolute)."""
    drop = (before.unsafe_recall or 0.0) - (after.unsafe_recall or 0.0)
    return drop <= max_recall_drop + 1e-12, drop


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _cells(counts: Counts) -> str:
    return (f"{_fmt(counts.precision):>7} {_fmt(counts.recall):>7} "
            f"{f'{counts.tp}/{counts.fp}/{counts.fn}':>10}")


def table(before: Evaluation, after: Evaluation | None) -> list[str]:
    """The figures side by side: per class, then per category (P precision, R recall,
    tp/fp/fn the counts, n the positives)."""
    out = [f"held-back split: {before.items} items",
           f"{'':22} {'before P':>7} {'R':>7} {'tp/fp/fn':>10} | {'after P':>7} {'R':>7} "
           f"{'tp/fp/fn':>10} | {'n':>4}"]
    rows = [(f"class {c}", before.classes[c], after.classes[c] if after else None)
            for c in CLASSES]
    rows += [(f"  {c}", counts, after.categories.get(c) if after else None)
             for c, counts in before.categories.items()]
    for name, b, a in rows:
        right = _cells(a) if a is not None else f"{'':>7} {'':>7} {'':>10}"
        out.append(f"{name:22} {_cells(b)} | {right} | {b.support:>4}")
    return out


__all__ = ["MIN_PER_CLASS", "Counts", "Evaluation", "class_of", "evaluate_model", "gate",
           "judge_examples", "stratified_split", "table"]
