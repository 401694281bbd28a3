"""Evaluate a policy on a set of prompts: what the prescreen judge would pass, edit and refuse.

    rows = read_prompts("prompts.csv")           # a `prompt` column; `categories` if labelled
    summary = await evaluate(judge, policy, rows, on_result=write_line)
    print(summary.format())

Each prompt goes through the judge alone (no image), as the proxy's prescreen does, and the
policy turns the verdict's scores into a decision. For I2P-style sets whose `categories` column
labels each prompt, the summary also gives the decisions per labelled category. With a
`cascade` judge, each result names the stage that decided and the summary counts them.

With labelled traces as ground truth (`labelled_rows`, from guard.offline.labelled), each
labelled item is judged again (an image with its retained copy) and the summary gives the
precision and recall per category against the reviewers' labels.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guard.core.policy import Policy
from guard.core.refiner import refine_prompt
from guard.core.types import GeneratedImage, JudgeInput
from guard.plugins import Judge
from guard.support.errors import ConfigError, GuardError

ACTIONS = ("pass", "edit", "refuse")


@dataclass(frozen=True, slots=True)
class PromptRow:
    prompt: str
    labels: tuple[str, ...] = ()
    fields: dict[str, str] = field(default_factory=dict)  # the row's other columns
    image: GeneratedImage | None = None  # a labelled image item, judged with its prompt


@dataclass(frozen=True, slots=True)
class EvalResult:
    row: int
    prompt: str
    decision: str
    flagged: tuple[str, ...]
    scores: dict[str, float]
    refined_prompt: str | None
    thought: str
    labels: tuple[str, ...]
    fields: dict[str, str]
    details: dict[str, Any]

    @property
    def stage(self) -> tuple[int, str] | None:
        """The cascade stage that decided (index, judge id), read from `details.stage` (which
        the JSON lines of --out carry); None for other judges."""
        stage = self.details.get("stage")
        if isinstance(stage, dict) and "index" in stage:
            return int(stage["index"]), str(stage.get("judge_id", ""))
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"row": self.row, "prompt": self.prompt, "decision": self.decision,
                "flagged": list(self.flagged), "scores": self.scores,
                "refined_prompt": self.refined_prompt, "thought": self.thought,
                "labels": list(self.labels), "fields": self.fields, "details": self.details}


@dataclass
class EvalSummary:
    policy: dict[str, Any]
    judge_id: str
    source: str = ""
    total: int = 0
    decisions: Counter[str] = field(default_factory=Counter)
    flagged: Counter[str] = field(default_factory=Counter)
    labels: dict[str, Counter[str]] = field(default_factory=dict)
    categories: tuple[str, ...] = ()
    stages: Counter[tuple[int, str]] = field(default_factory=Counter)  # cascade: who decided
    # Ground truth (labelled traces): per category, tp / fp / fn against the labels.
    ground_truth: bool = False
    confusion: dict[str, Counter[str]] = field(default_factory=dict)

    def add(self, result: EvalResult) -> None:
        self.total += 1
        self.decisions[result.decision] += 1
        self.flagged.update(result.flagged)
        for label in result.labels:
            self.labels.setdefault(label, Counter())[result.decision] += 1
        if result.stage is not None:
            self.stages[result.stage] += 1
        if self.ground_truth:
            for c in self.categories:
                truth, flagged = c in result.labels, c in result.flagged
                outcome = ("tp" if truth else "fp") if flagged else ("fn" if truth else "tn")
                self.confusion.setdefault(c, Counter())[outcome] += 1

    def precision_recall(self) -> dict[str, dict[str, Any]]:
        """Per category with any unsafe or flagged item: counts, precision and recall (None
        when undefined: nothing flagged, or nothing unsafe)."""
        out: dict[str, dict[str, Any]] = {}
        for c in self.categories:
            n = self.confusion.get(c, Counter())
            if n["tp"] + n["fp"] + n["fn"]:
                out[c] = {"unsafe": n["tp"] + n["fn"], "flagged": n["tp"] + n["fp"],
                          "tp": n["tp"],
                          "precision": n["tp"] / (n["tp"] + n["fp"]) if n["tp"] + n["fp"]
                          else None,
                          "recall": n["tp"] / (n["tp"] + n["fn"]) if n["tp"] + n["fn"]
                          else None}
        return out

    def rate(self, decision: str) -> float:
        return self.decisions[decision] / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy, "judge": self.judge_id, "source": self.source,
            "total": self.total,
            "rates": {a: self.rate(a) for a in ACTIONS},
            "counts": {a: self.decisions[a] for a in ACTIONS},
            "flagged": {c: self.flagged[c] for c in self.categories},
            "labels": {label: {"n": sum(c.values()), **{a: c[a] for a in ACTIONS}}
                       for label, c in sorted(self.labels.items())},
            **({"stages": [{"index": i, "judge_id": j, "count": n}
                           for (i, j), n in sorted(self.stages.items())]}
               if self.stages else {}),
            **({"precision_recall": self.precision_recall()} if self.ground_truth else {}),
        }

    def format(self) -> str:
        """The summary as a few plain-text tables."""
        def pct(n: int, d: int) -> str:
            return f"{100 * n / d:6.2f}%" if d else "     -"

        p = self.policy
        lines = [f"policy {p.get('id')} v{p.get('version')} (sha256 {str(p.get('sha256'))[:12]}),"
                 f" judge {self.judge_id}, {self.total} prompts"
                 + (f" from {self.source}" if self.source else ""),
                 "", f"{'decision':<18} {'count':>7} {'rate':>8}"]
        lines += [f"{a:<18} {self.decisions[a]:>7} {pct(self.decisions[a], self.total):>8}"
                  for a in ACTIONS]
        lines += ["", f"{'flagged category':<18} {'count':>7} {'rate':>8}"]
        lines += [f"{c:<18} {self.flagged[c]:>7} {pct(self.flagged[c], self.total):>8}"
                  for c in self.categories]
        if self.labels:
            lines += ["", "by labelled category (the `categories` column; a prompt may have several)",
                      f"{'label':<18} {'n':>7} " + " ".join(f"{a:>8}" for a in ACTIONS)]
            for label, counts in sorted(self.labels.items()):
                n = sum(counts.values())
                lines.append(f"{label:<18} {n:>7} "
                             + " ".join(f"{pct(counts[a], n):>8}" for a in ACTIONS))
        if self.stages:
            width = max(18, *(len(f"{i} {j}") for i, j in self.stages))
            lines += ["", f"{'decided by stage':<{width}} {'count':>7} {'rate':>8}"]
            lines += [f"{f'{i} {j}':<{width}} {n:>7} {pct(n, self.total):>8}"
                      for (i, j), n in sorted(self.stages.items())]
        if self.ground_truth:
            lines += ["", "against the labels (unsafe: by the reviewers; flagged: by this "
                          "judge and policy now)",
                      f"{'category':<18} {'unsafe':>7} {'flagged':>7} {'both':>7} "
                      f"{'precision':>9} {'recall':>8}"]
            for c, m in self.precision_recall().items():
                p, r = m["precision"], m["recall"]
                lines.append(f"{c:<18} {m['unsafe']:>7} {m['flagged']:>7} {m['tp']:>7} "
                             f"{'-' if p is None else f'{p:.2f}':>9} "
                             f"{'-' if r is None else f'{r:.2f}':>8}")
            if not self.precision_recall():
                lines.append("(no labelled item is unsafe or flagged in any category)")
        return "\n".join(lines)


def read_prompts(path: str | Path, limit: int | None = None) -> list[PromptRow]:
    """Rows of a CSV with a `prompt` column; a `categories` column (comma-separated labels, as in
    I2P) labels each row."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "prompt" not in reader.fieldnames:
                raise ConfigError(f"{path}: needs a `prompt` column "
                                  f"(has: {', '.join(reader.fieldnames or []) or 'none'})")
            rows: list[PromptRow] = []
            for raw in reader:
                if limit is not None and len(rows) >= limit:
                    break
                labels = tuple(dict.fromkeys(
                    s.strip() for s in (raw.get("categories") or "").split(",") if s.strip()))
                rows.append(PromptRow(
                    prompt=raw["prompt"] or "", labels=labels,
                    fields={k: v for k, v in raw.items()
                            if k not in ("prompt", "categories") and k is not None}))
            return rows
    except OSError as exc:
        raise ConfigError(f"cannot read prompts file {path}: {exc.strerror}") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"{path}: not a readable CSV file: {exc}") from exc


async def evaluate(judge: Judge, policy: Policy, rows: Sequence[PromptRow], *,
                   batch_size: int = 32, source: str = "", ground_truth: bool = False,
                   on_result: Callable[[EvalResult], None] | None = None) -> EvalSummary:
    """Judge every prompt alone (a labelled image with its prompt) and decide under `policy`;
    `on_result` sees each row in order. With `ground_truth`, each row's labels are the
    categories it is unsafe in, and the summary has precision and recall per category."""
    summary = EvalSummary(policy=policy.ref, judge_id=judge.id, source=source,
                          categories=tuple(policy.categories), ground_truth=ground_truth)
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        items = [JudgeInput(prompt=r.prompt, original_prompt=r.prompt, image=r.image)
                 for r in batch]
        verdicts = await judge.judge(items, policy)
        if len(verdicts) != len(items):
            raise GuardError(f"judge {judge.id} returned {len(verdicts)} verdicts "
                             f"for {len(items)} prompts")
        for offset, (row, verdict) in enumerate(zip(batch, verdicts, strict=True)):
            decision = policy.decide(verdict.scores)
            refined = None
            if decision.action == "edit":
                refined = (verdict.refined_prompt or "").strip() or refine_prompt(
                    row.prompt, decision.flagged, policy)
            result = EvalResult(
                row=start + offset, prompt=row.prompt, decision=decision.action,
                flagged=decision.flagged, scores=dict(verdict.scores), refined_prompt=refined,
                thought=verdict.thought, labels=row.labels, fields=row.fields,
                details=dict(verdict.details))
            summary.add(result)
            if on_result is not None:
                on_result(result)
    return summary


async def labelled_rows(items: Sequence[Any], categories: Sequence[str],
                        images: Any = None) -> tuple[list[PromptRow], Counter[str]]:
    """Rows for `evaluate(..., ground_truth=True)` from labelled items
    (guard.offline.labelled.LabelledItem): each row's labels are the categories the item
    is unsafe in. An image item from the audit store is judged with its retained copy
    (`images`: guard.audit.images.RetainedImages) and skipped when none was kept; a CSV row is
    judged by its prompt. Returns the rows and the skipped items by reason."""
    rows: list[PromptRow] = []
    skipped: Counter[str] = Counter()
    for item in items:
        image = None
        if item.slot is not None and item.image_sha256:
            found = await images.get(item.image_sha256) if images is not None else None
            if found is None:
                skipped["image not retained"] += 1
                continue
            image = GeneratedImage(data=found[0], media_type=found[1])
        if not item.prompt and image is None:
            skipped["no prompt"] += 1
            continue
        rows.append(PromptRow(
            prompt=item.prompt, labels=item.true_categories(categories), image=image,
            fields={"trace_id": item.trace_id, "slot": "" if item.slot is None else str(item.slot),
                    "round": str(item.round), "verdict": item.verdict}))
    return rows, skipped
