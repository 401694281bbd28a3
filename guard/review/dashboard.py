"""The dashboard (`/guard/dashboard`): what the guard did over a window, as charts.

Aggregation is pure functions over traces (`aggregate`) and labelled items (`label_rates`); the
traces are read through the AuditStore's query API, newest first, within a window (default the
last 7 days) and at most MAX_TRACES of them (the page says when it stopped there). Charts are
drawn with matplotlib as inline SVG (guard.support.charts): no scripts, one colour per decision.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from guard.core.types import Trace
from guard.offline.labelled import LabelledItem, LabelsUnavailable, resolve, store_labels
from guard.offline.replay import stored_traces
from guard.plugins import AuditStore, TraceQuery
from guard.support.charts import ACTION_COLOURS, DECISION_COLOURS, category_colour, render

DEFAULT_WINDOW_S = 7 * 86400
MAX_TRACES = 2000
DECISIONS = ("passed", "edited", "refused", "failed")
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True, slots=True)
class Rate:
    """k of n, as a share and as counts."""

    k: int
    n: int

    @property
    def share(self) -> float:
        return self.k / self.n if self.n else 0.0

    def __str__(self) -> str:
        return f"{100 * self.share:.0f}% ({self.k} of {self.n})" if self.n else "no data"


@dataclass
class Figures:
    """Everything the dashboard shows, for one window and tenant scope."""

    since: float
    until: float
    bucket_s: int
    total: int = 0
    truncated: bool = False
    decisions: Counter[str] = field(default_factory=Counter)
    over_time: dict[int, Counter[str]] = field(default_factory=dict)  # bucket start -> counts
    flags: dict[str, Counter[str]] = field(default_factory=dict)  # category -> action -> n
    rounds: Counter[int] = field(default_factory=Counter)
    latency_ms: dict[str, list[float]] = field(default_factory=dict)
    policies: dict[str, Counter[str]] = field(default_factory=dict)  # "id vN" -> decisions
    labels: dict[str, tuple[Rate, Rate]] = field(default_factory=dict)  # category -> (fp, miss)
    labelled: int = 0

    def percentiles(self, what: str) -> dict[int, float]:
        return {p: percentile(self.latency_ms.get(what, []), p) for p in PERCENTILES}


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile by nearest rank (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


MAX_BUCKETS = 400  # a chart's columns: a longer window gets coarser buckets, never more of them


def bucket_size(since: float, until: float) -> int:
    """Hours up to two days, else days, else as many whole days a bucket as keep a chart at
    MAX_BUCKETS columns."""
    span = max(until - since, 0.0)
    if span <= 2 * 86400:
        return 3600
    return 86400 * max(1, math.ceil(span / MAX_BUCKETS / 86400))


def aggregate(traces: Iterable[Trace], since: float, until: float) -> Figures:
    f = Figures(since, until, bucket_size(since, until))
    for t in traces:
        f.total += 1
        f.decisions[t.decision] += 1
        start = int(t.created_at // f.bucket_s * f.bucket_s)
        f.over_time.setdefault(start, Counter())[t.decision] += 1
        f.rounds[t.round_count()] += 1
        f.latency_ms.setdefault("request", []).append(t.duration_ms)
        if t.policy:
            key = f"{t.policy.get('id')} v{t.policy.get('version')}"
            f.policies.setdefault(key, Counter())[t.decision] += 1
        for rnd in t.rounds:
            if rnd.images:
                f.latency_ms.setdefault("judge", []).append(rnd.judge_ms)
            if rnd.counts and not (rnd.error and not rnd.images):
                f.latency_ms.setdefault("backend", []).append(rnd.backend_ms)
            for item in rnd.images:
                for category in item.flagged:
                    f.flags.setdefault(category, Counter())[item.action] += 1
    return f


def label_rates(items: Sequence[LabelledItem], categories: Iterable[str]
                ) -> dict[str, tuple[Rate, Rate]]:
    """Per category and for all: of the labelled items flagged, how many reviewers said were
    safe (false positives); of those unsafe by their labels, how many were not flagged (misses).
    """
    out: dict[str, tuple[Rate, Rate]] = {}
    categories = list(categories)
    for c in categories:
        flagged = [i for i in items if c in i.flagged]
        unsafe = [i for i in items if i.truth(c)]
        rates = (Rate(sum(not i.truth(c) for i in flagged), len(flagged)),
                 Rate(sum(c not in i.flagged for i in unsafe), len(unsafe)))
        if rates[0].n or rates[1].n:
            out[c] = rates
    flagged = [i for i in items if i.flagged]
    unsafe = [i for i in items if any(i.truth(c) for c in categories)]
    out["all categories"] = (Rate(sum(i.verdict == "false_positive" for i in flagged),
                                  len(flagged)),
                             Rate(sum(i.verdict == "missed" for i in unsafe), len(unsafe)))
    return out


async def figures(store: AuditStore, query: TraceQuery, limit: int = MAX_TRACES) -> Figures:
    """The figures of the window of `query` (default: the last 7 days), its tenant scope kept;
    the false-positive and miss rates from the labels given in that window, when the store
    keeps labels."""
    until = query.until if query.until is not None else time.time()
    since = query.since if query.since is not None else until - DEFAULT_WINDOW_S
    query = replace(query, since=since, until=until)
    traces = [t async for t in stored_traces(store, query, limit + 1)]
    f = aggregate(traces[:limit], since, until)
    f.truncated = len(traces) > limit
    try:
        labels = await store_labels(store, tenant=query.tenant, since=since, until=until)
    except LabelsUnavailable:
        return f
    resolved = await resolve(labels, store=store, traces={t.id: t for t in traces})
    f.labelled = len(resolved.items)
    if resolved.items:
        f.labels = label_rates(resolved.items, sorted({*f.flags, *(
            c for i in resolved.items for c in (*i.flagged, i.category) if c)}))
    return f


# --- charts -----------------------------------------------------------------------------------

def _stamp(ts: int, bucket_s: int) -> str:
    d = dt.datetime.fromtimestamp(ts, dt.UTC)
    return d.strftime("%m-%d %H:00" if bucket_s < 86400 else "%Y-%m-%d")


def _whole_numbers(axis: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def chart_over_time(f: Figures) -> str:
    # Every hour or day of the window, the quiet ones too.
    first = int(f.since // f.bucket_s * f.bucket_s)
    starts = sorted({*range(first, int(f.until), f.bucket_s), *f.over_time})
    empty: Counter[str] = Counter()

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        x = [_stamp(s, f.bucket_s) for s in starts]
        bottom = [0] * len(starts)
        for d in DECISIONS:
            counts = [f.over_time.get(s, empty)[d] for s in starts]
            if any(counts):
                bars = ax.bar(x, counts, bottom=bottom, color=DECISION_COLOURS[d],
                              label=f"{d} ({f.decisions[d]})")
                ax.bar_label(bars, labels=[str(c) if c else "" for c in counts],
                             label_type="center", color="white", fontsize=8)
                bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
        per = "hour (UTC)" if f.bucket_s < 86400 else "day (UTC)"
        ax.set(title=f"Requests per {per.split()[0]}, by decision", ylabel="requests",
               xlabel=per)
        ax.legend(loc="upper left", fontsize=8, frameon=False)
        ax.tick_params(axis="x", labelrotation=30 if len(starts) > 4 else 0, labelsize=8)
        _whole_numbers(ax.yaxis)
        if len(starts) > 16:  # hours of two days: every third one named
            for i, tick in enumerate(ax.get_xticklabels()):
                tick.set_visible(i % 3 == 0)

    return render(draw, "over-time", "Requests over time by decision")


def chart_flags(f: Figures) -> str:
    categories = sorted(f.flags, key=lambda c: sum(f.flags[c].values()))

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        left = [0] * len(categories)
        for action, label in (("refuse", "refused"), ("edit", "edited"),
                              ("pass", "allowed (recorded only)")):
            counts = [f.flags[c][action] for c in categories]
            if any(counts):
                bars = ax.barh(categories, counts, left=left, color=ACTION_COLOURS[action],
                               label=label)
                ax.bar_label(bars, labels=[str(n) if n else "" for n in counts],
                             label_type="center", color="white", fontsize=8)
                left = [a + b for a, b in zip(left, counts, strict=True)]
        ax.set(title="Flags per category, by what was done",
               xlabel="flagged prompts and images")
        _whole_numbers(ax.xaxis)
        fig.legend(loc="outside lower center", fontsize=8, frameon=False, ncols=3)

    return render(draw, "flags", "Flags per category and action",
                  height=max(2.4, 0.9 + 0.35 * len(categories)))


def chart_rounds(f: Figures) -> str:
    counts = [f.rounds[k] for k in range(max(f.rounds, default=0) + 1)]

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        names = ["none (refused first)" if k == 0 else str(k) for k in range(len(counts))]
        bars = ax.bar(names, counts, color="#3d5a80")
        ax.bar_label(bars, labels=[str(n) for n in counts], fontsize=9)
        ax.set(title="Images made per request (rounds)", xlabel="generation rounds",
               ylabel="requests")
        _whole_numbers(ax.yaxis)

    return render(draw, "rounds", "Generation rounds per request")


def chart_latency(f: Figures) -> str:
    parts = [(w, label) for w, label in (("judge", "judge (per call)"),
                                         ("backend", "image backend (per round)"),
                                         ("request", "whole request")) if f.latency_ms.get(w)]

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        width = 0.8 / len(PERCENTILES)
        for i, (p, shade) in enumerate(zip(PERCENTILES, ("#98c1d9", "#3d5a80", "#1d2430"),
                                           strict=True)):
            values = [f.percentiles(w)[p] for w, _ in parts]
            bars = ax.bar([k + (i - 1) * width for k in range(len(parts))], values, width,
                          color=shade, label=f"{p}% of calls within")
            ax.bar_label(bars, labels=[f"{v:.0f} ms" for v in values], fontsize=7)
        ax.set_xticks(range(len(parts)), [label for _, label in parts])
        top = max((f.percentiles(w)[99] for w, _ in parts), default=0.0)
        ax.set(title="How long things take", ylabel="milliseconds", ylim=(0, top * 1.35 or 1))
        ax.legend(loc="upper left", fontsize=8, frameon=False, ncols=3)

    return render(draw, "latency", "Judge and backend latency percentiles")


def chart_policies(f: Figures) -> str:
    names = sorted(f.policies)

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        for i, d in enumerate(("refused", "edited")):
            rates = [Rate(f.policies[n][d], sum(f.policies[n].values())) for n in names]
            bars = ax.bar([k + (i - 0.5) * 0.38 for k in range(len(names))],
                          [100 * r.share for r in rates], 0.38, color=DECISION_COLOURS[d],
                          label=d)
            ax.bar_label(bars, labels=[str(r) for r in rates], fontsize=7)
        ax.set_xticks(range(len(names)), names)
        ax.set(title="Refused and edited requests per policy version", ylabel="% of requests",
               ylim=(0, 115))
        ax.legend(loc="upper right", fontsize=8, frameon=False)

    return render(draw, "policies", "Refusal and edit rates per policy version")


def chart_labels(f: Figures) -> str:
    names = sorted(f.labels, key=lambda c: (c == "all categories", c), reverse=True)

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        for i, (what, hatch) in enumerate((("false positives", ""), ("misses", "//"))):
            rates = [f.labels[c][i] for c in names]
            bars = ax.barh([k + (0.5 - i) * 0.38 for k in range(len(names))],
                           [100 * r.share for r in rates], 0.38, hatch=hatch,
                           color=[category_colour(c) if c != "all categories" else "#1d2430"
                                  for c in names], edgecolor="white")
            ax.bar_label(bars, labels=[f"{what}: {r}" if r.n else "" for r in rates],
                         fontsize=7, padding=3)
        ax.set_yticks(range(len(names)), names)
        ax.set(title=f"What reviewers found ({f.labelled} labelled items)",
               xlabel="% of labelled items", xlim=(0, 160))

    return render(draw, "labels", "False-positive and miss rates from labels",
                  height=max(2.4, 1.0 + 0.55 * len(names)))


def charts(f: Figures) -> dict[str, str]:
    """Every chart of the page that has something to show, by name."""
    out = {"over_time": chart_over_time(f), "rounds": chart_rounds(f),
           "latency": chart_latency(f), "policies": chart_policies(f)}
    if f.flags:
        out["flags"] = chart_flags(f)
    if f.labels:
        out["labels"] = chart_labels(f)
    return out
