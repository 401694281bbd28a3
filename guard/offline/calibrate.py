"""Calibration: per category, the threshold that meets a target, from the recorded scores of
labelled items (guard.offline.labelled).

For one category, the positives are the labelled items unsafe in it (missed in it, or correctly
flagged for it) and the negatives the others (false positives, correct passes). Every distinct
score is a candidate threshold (an item crosses at score >= threshold); at each one, precision
(of what would be flagged, how much is unsafe), recall (of what is unsafe, how much would be
flagged) and the false-positive rate (of what is safe, how much would be flagged). The proposal:

    --target-precision P          the lowest threshold whose precision is >= P (most recall)
    --max-false-positive-rate R   the lowest threshold whose false-positive rate is <= R

Between two neighbouring scores every threshold decides the labelled items alike: the current
threshold is kept when it lies in the chosen gap, else the middle of the gap is proposed.
with a 95% Wilson interval on that precision or rate, as labels are often few. A category with
fewer than MIN_LABELS positives or negatives keeps its threshold: too few labels to decide; so
does one whose precision meets the target only where fewer than MIN_LABELS items are flagged.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from guard.core.policy import Policy
from guard.offline.labelled import LabelledItem
from guard.support.errors import ConfigError

MIN_LABELS = 10  # of each, positives and negatives, before a threshold is proposed
Z95 = 1.959964


@dataclass(frozen=True, slots=True)
class Target:
    kind: Literal["precision", "fpr"]
    value: float

    def met(self, point: Point) -> bool:
        if self.kind == "precision":
            return point.flagged > 0 and point.precision >= self.value
        return point.fpr <= self.value

    def __str__(self) -> str:
        return (f"precision >= {self.value:.2f}" if self.kind == "precision"
                else f"false-positive rate <= {self.value:.2f}")


@dataclass(frozen=True, slots=True)
class Point:
    """The labelled items' outcome at one threshold."""

    threshold: float
    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def flagged(self) -> int:
        return self.tp + self.fp

    @property
    def precision(self) -> float:
        return self.tp / self.flagged if self.flagged else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def fpr(self) -> float:
        return self.fp / (self.fp + self.tn) if self.fp + self.tn else 0.0


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion k/n (0..1 when n is 0)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def curve(pairs: Sequence[tuple[float, bool]]) -> list[Point]:
    """The outcome at every distinct positive score, from the lowest threshold up."""
    positives = sum(truth for _, truth in pairs)
    negatives = len(pairs) - positives
    points = []
    for t in sorted({s for s, _ in pairs if s > 0.0}):
        tp = sum(1 for s, truth in pairs if truth and s >= t)
        fp = sum(1 for s, truth in pairs if not truth and s >= t)
        points.append(Point(t, tp, fp, positives - tp, negatives - fp))
    return points


@dataclass
class CategoryResult:
    category: str
    current: float
    positives: int
    negatives: int
    points: list[Point]
    at_current: Point
    chosen: Point | None = None
    proposed: float | None = None  # None: the threshold stays
    interval: tuple[float, float] = (0.0, 1.0)
    status: Literal["proposed", "unchanged", "too_few", "unreachable"] = "unchanged"
    note: str = ""
    items_changed: int = 0  # labelled items whose decision changes with this threshold alone

    @property
    def threshold(self) -> float:
        return self.current if self.proposed is None else self.proposed


@dataclass
class Calibration:
    policy: Policy
    target: Target
    results: list[CategoryResult] = field(default_factory=list)
    labelled: int = 0
    min_labels: int = MIN_LABELS

    @property
    def changed(self) -> dict[str, float]:
        return {r.category: r.proposed for r in self.results if r.proposed is not None}


def point_at(pairs: Sequence[tuple[float, bool]], threshold: float) -> Point:
    tp = sum(1 for s, t in pairs if t and s >= threshold)
    fp = sum(1 for s, t in pairs if not t and s >= threshold)
    positives = sum(t for _, t in pairs)
    return Point(threshold, tp, fp, positives - tp, len(pairs) - positives - fp)


def calibrate(policy: Policy, items: Sequence[LabelledItem], target: Target,
              min_labels: int = MIN_LABELS) -> Calibration:
    result = Calibration(policy, target, labelled=len(items), min_labels=min_labels)
    for name, cat in policy.categories.items():
        pairs = [(i.scores.get(name, 0.0), i.truth(name)) for i in items]
        positives = sum(t for _, t in pairs)
        r = CategoryResult(name, cat.threshold, positives, len(pairs) - positives,
                           curve(pairs), point_at(pairs, cat.threshold))
        result.results.append(r)
        if r.positives < min_labels or r.negatives < min_labels:
            r.status = "too_few"
            r.note = (f"too few labels to decide: {r.positives} unsafe and {r.negatives} safe "
                      f"item(s); at least {min_labels} of each are needed. Threshold kept.")
            continue
        met = [k for k, p in enumerate(r.points) if target.met(p)]
        # A precision is only worth as much as the flagged items it is measured on.
        at = next((k for k in met if target.kind == "fpr"
                   or r.points[k].flagged >= min_labels), None)
        if at is None:
            r.status = "too_few" if met else "unreachable"
            r.note = (f"{target} is reached only where fewer than {min_labels} labelled items "
                      f"are flagged ({r.points[met[0]].flagged} at threshold "
                      f"{r.points[met[0]].threshold:g}): too few labels to decide."
                      if met else f"no threshold reaches {target} on these labels.")
            r.note += " Threshold kept."
            continue
        r.chosen = chosen = r.points[at]
        k, n = ((chosen.tp, chosen.flagged) if target.kind == "precision"
                else (chosen.fp, chosen.fp + chosen.tn))
        r.interval = wilson(k, n)
        # Any threshold above the next lower score and up to this one decides the labelled
        # items alike: keep the current one if it is such, else take the middle of the gap.
        below = r.points[at - 1].threshold if at else 0.0
        threshold = round((below + chosen.threshold) / 2, 4)
        if not below < threshold <= chosen.threshold:
            threshold = chosen.threshold
        low, high = r.interval
        doubt = (low < target.value) if target.kind == "precision" else (high > target.value)
        what = "precision" if target.kind == "precision" else "false-positive rate"
        if doubt:
            r.note = (f"the {what} could be {low if target.kind == 'precision' else high:.2f} "
                      f"(95% interval {low:.2f}-{high:.2f} on {n} item(s)): more labels would "
                      "make the target certain.")
        if below < cat.threshold <= chosen.threshold:
            r.status = "unchanged"
            continue
        r.status, r.proposed = "proposed", threshold
        moved = _with(policy, {name: threshold})
        r.items_changed = sum(1 for i in items
                              if policy.decide(i.scores).action != moved.decide(i.scores).action)
    return result


def _with(policy: Policy, thresholds: dict[str, float], version: int | None = None) -> Policy:
    cats = {n: c.model_copy(update={"threshold": thresholds[n]}) if n in thresholds else c
            for n, c in policy.categories.items()}
    return policy.model_copy(update={"categories": cats,
                                     "version": policy.version if version is None else version})


def proposed_yaml(calibration: Calibration, original: str, source: str = "") -> str:
    """The policy file `original` with the proposed thresholds, its version raised by one only
    when one changed, and every other byte as it was (comments, layout, `extends`), under a
    header saying what changed.

    The file is read with a round-trip YAML parser (ruamel.yaml) only to find where each value
    stands; the new values are written in place of the old text, so nothing else moves."""
    policy = calibration.policy
    changed = calibration.changed
    text = _in_place(original, changed, policy.version + 1) if changed else original
    header = [f"Proposed by `safeedit policy calibrate` from {source or policy.id} "
              f"(version {policy.version}) for {calibration.target}, "
              f"on {calibration.labelled} labelled item(s).",
              "The original file, changed only where listed here. Compare with",
              "`safeedit policy diff`; to adopt it, save it as <id>.yaml among the policies."]
    for r in calibration.results:
        if r.proposed is not None:
            header.append(f"  {r.category}: threshold {r.current!r} -> {r.proposed!r}")
    if changed:
        header.append(f"  version: {policy.version} -> {policy.version + 1}")
    else:
        header.append(f"  no threshold changed (see report.html for why); version stays "
                      f"{policy.version}")
    return "".join(f"# {line}\n" for line in header) + "\n" + text


_SCALAR = re.compile(r"[^\s,}\]#]+")


def _in_place(original: str, thresholds: dict[str, float], version: int) -> str:
    from ruamel.yaml import YAML

    data = YAML().load(original)  # round-trip: every node knows its line and column
    lines = original.splitlines(keepends=True)
    edits: list[tuple[int, int, str]] = [(*data.lc.value("version"), str(version))]
    categories = data.get("categories")
    inserted: list[str] = []
    for name, value in thresholds.items():
        entry = categories.get(name) if categories is not None else None
        if entry is not None and "threshold" in entry:
            edits.append((*entry.lc.value("threshold"), repr(value)))
        else:  # inherited through `extends`: this file overrides it
            inserted.append(f"{name}: {{threshold: {value!r}}}")
    for line, col, new in sorted(edits, reverse=True):
        found = _SCALAR.match(lines[line], col)
        end = found.end() if found else col
        lines[line] = lines[line][:col] + new + lines[line][end:]
    if inserted and categories is not None and len(categories) and not categories.fa.flow_style():
        line, col = categories.lc.key(next(iter(categories)))
        lines[line:line] = [" " * col + entry + "\n" for entry in inserted]
    elif inserted:
        if "categories" in data:
            raise ConfigError("calibrate adds an inherited category's threshold under "
                              "`categories:`, which this file writes in flow style or empty: "
                              "write it as a block mapping first")
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines += ["categories:\n", *(f"  {entry}\n" for entry in inserted)]
    return "".join(lines)


def table(calibration: Calibration) -> str:
    """The summary as a plain-text table, one row per category."""
    what = "precision" if calibration.target.kind == "precision" else "FP rate"
    head = ("category", "unsafe", "safe", "now", "proposed", f"{what} [95%]", "recall",
            "FP rate", "changes", "status")
    rows: list[tuple[str, ...]] = [head]
    digits = 2 if calibration.target.kind == "precision" else 3  # small rates need a third
    for r in calibration.results:
        p = r.chosen or r.at_current
        precision = f"{p.precision:.2f}" if p.flagged else "-"
        recall = f"{p.recall:.2f}" if r.positives else "-"
        fpr = f"{p.fpr:.{digits}f}" if r.negatives else "-"
        value = precision if calibration.target.kind == "precision" else fpr
        ci = f" [{r.interval[0]:.{digits}f}-{r.interval[1]:.{digits}f}]" if r.chosen else ""
        rows.append((r.category, str(r.positives), str(r.negatives), f"{r.current:g}",
                     "-" if r.proposed is None else f"{r.proposed:g}", value + ci, recall, fpr,
                     str(r.items_changed), r.status.replace("_", " ")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    notes = [f"  {r.category}: {r.note}" for r in calibration.results if r.note]
    return "\n".join([f"Calibration of {calibration.policy.id} v{calibration.policy.version} "
                      f"for {calibration.target} on {calibration.labelled} labelled item(s)",
                      "", *lines, *([""] + notes if notes else [])]) + "\n"


# --- the report -------------------------------------------------------------------------------

def charts(r: CategoryResult, target: Target) -> str:
    """The category's precision/recall curve and its rates by threshold, as one inline SVG."""
    from guard.support.charts import category_colour, render

    colour = category_colour(r.category)

    def draw(fig: Any) -> None:
        pr, by = fig.subplots(1, 2)
        ts = [0.0, *(p.threshold for p in r.points)]
        pts = [Point(0.0, r.positives, r.negatives, 0, 0), *r.points]  # all flagged
        pr.step([p.recall for p in pts], [p.precision for p in pts], where="post",
                color=colour, label="labelled items")
        pr.plot([r.at_current.recall], [r.at_current.precision], "o", color="#5f6b7a",
                label=f"now (threshold {r.current:g})")
        if r.chosen is not None and r.proposed is not None:
            pr.plot([r.chosen.recall], [r.chosen.precision], "D", color=colour,
                    label=f"proposed ({r.proposed:g})")
        pr.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.05), xlabel="recall: share of unsafe caught",
               ylabel="precision: share of flags right", title="Precision against recall")
        pr.legend(loc="lower left", fontsize=8)
        for values, label, style in (([p.precision for p in pts], "precision", "-"),
                                     ([p.recall for p in pts], "recall", "--"),
                                     ([p.fpr for p in pts], "false-positive rate", ":")):
            by.step(ts, values, where="post", linestyle=style, color=colour, label=label)
        by.axvline(r.current, color="#5f6b7a", linestyle="--", linewidth=1)
        if r.proposed is not None:
            by.axvline(r.proposed, color=colour, linewidth=1.5)
        by.axhline(target.value, color="#1d2430", linewidth=0.8, linestyle="-.")
        by.set(xlim=(0, 1), ylim=(-0.02, 1.05), xlabel="threshold (score at which it is flagged)",
               ylabel="share", title="Rates by threshold")
        by.legend(loc="center left", fontsize=8)

    return render(draw, f"cal-{r.category}", f"{r.category}: precision and recall of the "
                                             "labelled items by threshold", 10.0, 3.6)


REPORT = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>Calibration of {{ c.policy.id }} v{{ c.policy.version }}</title>
<style>body{font:14px/1.45 system-ui,sans-serif;color:#1d2430;margin:1.5rem;max-width:72rem}
table{border-collapse:collapse;margin:.6rem 0}td,th{border-bottom:1px solid #d9dee5;
padding:.25rem .6rem;text-align:left}td.num{text-align:right}.note{color:#a36100}
svg.chart{width:100%;height:auto;max-width:60rem}</style></head><body>
<h1>Calibration of policy {{ c.policy.id }} version {{ c.policy.version }}</h1>
<p>Target: <b>{{ c.target }}</b>, per category, from {{ c.labelled }} labelled item(s){% if skipped
%} ({{ skipped }} label(s) skipped: {{ skipped_why }}){% endif %}. The proposed policy
(version {{ c.policy.version + (1 if c.changed else 0) }}{% if not c.changed %}, nothing
changed{% endif %}) is <code>proposed.yaml</code> beside this page.</p>
<table><thead><tr><th>category</th><th>unsafe</th><th>safe</th><th>threshold now</th>
<th>proposed</th><th>precision</th><th>recall</th><th>false-positive rate</th>
<th>95% interval</th><th>labelled decisions that change</th><th>status</th></tr></thead><tbody>
{% for r in c.results %}{% set p = r.chosen or r.at_current %}<tr id="row-{{ r.category }}">
<td>{{ r.category }}</td><td class="num">{{ r.positives }}</td><td class="num">{{ r.negatives }}</td>
<td class="num">{{ "%g" | format(r.current) }}</td>
<td class="num">{{ "%g" | format(r.proposed) if r.proposed is not none else "–" }}</td>
<td class="num">{{ "%.2f" | format(p.precision) if p.flagged else "–" }}</td>
<td class="num">{{ "%.2f" | format(p.recall) if r.positives else "–" }}</td>
<td class="num">{{ "%.2f" | format(p.fpr) if r.negatives else "–" }}</td>
<td>{{ "%.2f–%.2f" | format(*r.interval) if r.chosen else "–" }}</td>
<td class="num">{{ r.items_changed }}</td><td>{{ r.status | replace("_", " ") }}</td></tr>
{% endfor %}</tbody></table>
{% if replayed %}<h2>Stored requests</h2><pre>{{ replayed }}</pre>{% endif %}
<h2>Caveats</h2><ul>
<li>Scores are as recorded when each item was judged: a changed judge needs new labels.</li>
<li>Labels are a sample: the 95% intervals (Wilson) say how far the true rate may be from the
labelled one. With fewer than {{ c.min_labels }} unsafe or safe labelled items a category keeps its
threshold.</li>
<li>Reviewers label what they were shown; items nobody labelled are not in these numbers.</li></ul>
{% for r in c.results %}<section id="cat-{{ r.category }}"><h2>{{ r.category }}</h2>
{% if r.note %}<p class="note">{{ r.note }}</p>{% endif %}{{ svgs.get(r.category, "") | safe }}</section>
{% endfor %}</body></html>"""


def report_html(calibration: Calibration, *, skipped: dict[str, int] | None = None,
                replayed: str = "") -> str:
    """The report: the table, the caveats and every category's curves (inline SVG, no
    scripts), one self-contained page."""
    from jinja2 import Environment

    env = Environment(autoescape=True)
    # A curve needs both kinds of item: without, the note says it all.
    svgs = {r.category: charts(r, calibration.target) for r in calibration.results
            if r.positives and r.negatives}
    skipped = skipped or {}
    return env.from_string(REPORT).render(
        c=calibration, svgs=svgs, replayed=replayed,
        skipped=sum(skipped.values()),
        skipped_why="; ".join(f"{n} {why}" for why, n in sorted(skipped.items())))
