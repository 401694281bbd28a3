"""The dashboard (`/guard/dashboard`): what the guard did over a window, as charts.

A window (default the last 7 days) is counted by the audit store itself where it can
(guard.plugins.DashboardStore: the SQL stores count in the database, so that neither time nor
memory grows with the window); for any other store its traces are read through the AuditStore's
query API, newest first, at most MAX_TRACES of them (the page says when it stopped there), and
counted here (`count`, the same counts). A chart has at most MAX_BUCKETS columns. The rates from
labels are pure functions of labelled items (`label_rates`). Charts are drawn with matplotlib as
inline SVG (guard.support.charts): no scripts, one colour per decision.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from guard.audit.figures import nearest_ranks, trace_figures
from guard.audit.search import caller_refused
from guard.core.types import Trace
from guard.offline.labelled import LabelledItem, LabelsUnavailable, resolve, store_labels
from guard.offline.replay import stored_traces
from guard.plugins import AuditStore, DashboardStore, TraceQuery, WindowFigures
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
    latency_ms: dict[str, dict[int, float]] = field(default_factory=dict)  # what -> p -> ms
    policies: dict[str, Counter[str]] = field(default_factory=dict)  # "id vN" -> decisions
    labels: dict[str, tuple[Rate, Rate]] = field(default_factory=dict)  # category -> (fp, miss)
    labelled: int = 0

    def percentiles(self, what: str) -> dict[int, float]:
        return {p: self.latency_ms.get(what, {}).get(p, 0.0) for p in PERCENTILES}


def percentile(values: Sequence[float], p: int) -> float:
    """The p-th percentile by nearest rank, as the stores count it (0 for no values)."""
    return nearest_ranks(sorted(Counter(values).items()), [p]).get(p, 0.0)


MAX_BUCKETS = 400  # a chart's columns: a longer window gets coarser buckets, never more of them
LABELLED_COLUMNS = 48  # columns that show their counts
NAMED_COLUMNS = 16  # columns named on the axis, at most


def bucket_size(since: float, until: float) -> int:
    """Hours up to two days, else days, else as many whole days a bucket as keep a chart at
    MAX_BUCKETS columns."""
    span = max(until - since, 0.0)
    if span <= 2 * 86400:
        return 3600
    return 86400 * max(1, math.ceil(span / MAX_BUCKETS / 86400))


def count(traces: Iterable[Trace], bucket_s: int,
          percentiles: Sequence[int] = PERCENTILES) -> WindowFigures:
    """The counts a DashboardStore makes, of traces in memory."""
    over_time: Counter[tuple[int, str]] = Counter()
    rounds: Counter[int] = Counter()
    flags: Counter[tuple[str, str]] = Counter()
    policies: Counter[tuple[str | None, int | None, str]] = Counter()
    latency: dict[str, list[float]] = {"request": [], "judge": [], "backend": []}
    for t in traces:
        if caller_refused(t):  # an auditor trying the images API: not the tenant's traffic
            continue
        figures = trace_figures(t)
        over_time[int(t.created_at // bucket_s * bucket_s), t.decision] += 1
        rounds[figures.rounds] += 1
        policy = (t.policy.get("id"), t.policy.get("version"))
        if policy != (None, None):
            policies[(*policy, t.decision)] += 1
        flags.update(figures.flags)
        latency["request"].append(figures.request_ms)
        latency["judge"] += figures.judge_ms
        latency["backend"] += figures.backend_ms
    return WindowFigures(over_time, rounds, flags, policies, {
        what: {p: percentile(values, p) for p in percentiles}
        for what, values in latency.items() if values})


def tally(counts: WindowFigures, since: float, until: float, bucket_s: int) -> Figures:
    """The page's figures from a window's counts."""
    f = Figures(since, until, bucket_s, rounds=Counter(counts.rounds),
                latency_ms={what: dict(ps) for what, ps in counts.latency_ms.items()})
    for (start, decision), n in counts.over_time.items():
        f.over_time.setdefault(start, Counter())[decision] += n
        f.decisions[decision] += n
        f.total += n
    for (category, action), n in counts.flags.items():
        f.flags.setdefault(category, Counter())[action] += n
    for (policy_id, version, decision), n in counts.policies.items():
        f.policies.setdefault(f"{policy_id} v{version}", Counter())[decision] += n
    return f


def aggregate(traces: Iterable[Trace], since: float, until: float) -> Figures:
    bucket_s = bucket_size(since, until)
    return tally(count(traces, bucket_s), since, until, bucket_s)


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
    bucket_s = bucket_size(since, until)
    traces: dict[str, Trace] = {}
    if isinstance(store, DashboardStore):
        f = tally(await store.figures(query, bucket_s, PERCENTILES), since, until, bucket_s)
    else:
        read = [t async for t in stored_traces(store, query, limit + 1)]
        traces = {t.id: t for t in read[:limit]}
        f = tally(count(traces.values(), bucket_s), since, until, bucket_s)
        f.truncated = len(read) > limit
    try:
        labels = await store_labels(store, tenant=query.tenant, since=since, until=until)
    except LabelsUnavailable:
        return f
    resolved = await resolve(labels, store=store, traces=traces)
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
        x = range(len(starts))
        bottom = [0] * len(starts)
        for d in DECISIONS:
            counts = [f.over_time.get(s, empty)[d] for s in starts]
            if not any(counts):
                continue
            top = [b + c for b, c in zip(bottom, counts, strict=True)]
            label = f"{d} ({f.decisions[d]})"
            if len(starts) <= LABELLED_COLUMNS:
                bars = ax.bar(x, counts, bottom=bottom, color=DECISION_COLOURS[d], label=label)
                ax.bar_label(bars, labels=[str(c) if c else "" for c in counts],
                             label_type="center", color="white", fontsize=8)
            else:  # one outline per decision: hundreds of bars and their counts draw slowly
                ax.stairs(top, [i - 0.5 for i in range(len(starts) + 1)], baseline=bottom,
                          fill=True, color=DECISION_COLOURS[d], label=label)
            bottom = top
        per = ("hour" if f.bucket_s < 86400 else "day" if f.bucket_s == 86400
               else f"{f.bucket_s // 86400} days")
        ax.set(title=f"Requests per {per}, by decision", ylabel="requests", xlabel=f"{per} (UTC)")
        ax.legend(loc="upper left", fontsize=8, frameon=False)
        ax.tick_params(axis="x", labelrotation=30 if len(starts) > 4 else 0, labelsize=8)
        _whole_numbers(ax.yaxis)
        # At most NAMED_COLUMNS named (hours of two days: every third), the others unnamed:
        # naming each of hundreds of columns is unreadable and slow to draw.
        step = max(1, math.ceil(len(starts) / NAMED_COLUMNS))
        ax.set_xticks(x[::step], [_stamp(s, f.bucket_s) for s in starts[::step]])

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
            xs = [k + (i - 0.5) * 0.38 for k in range(len(names))]
            ax.bar(xs, [100 * r.share for r in rates], 0.38, color=DECISION_COLOURS[d], label=d)
            for x, r in zip(xs, rates, strict=True):
                _rate_label(ax, x, r, vertical=True)
        ax.set_xticks(range(len(names)), names)
        ax.set(title="Refused and edited requests per policy version", ylabel="% of requests",
               ylim=(0, 100))
        ax.legend(loc="upper right", fontsize=8, frameon=False)

    return render(draw, "policies", "Refusal and edit rates per policy version")


def chart_labels(f: Figures) -> str:
    names = sorted(f.labels, key=lambda c: (c == "all categories", c), reverse=True)

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        for i, (what, hatch) in enumerate((("false positives", ""), ("misses", "//"))):
            rates = [f.labels[c][i] for c in names]
            ys = [k + (0.5 - i) * 0.38 for k in range(len(names))]
            ax.barh(ys, [100 * r.share for r in rates], 0.38, hatch=hatch,
                    color=[category_colour(c) if c != "all categories" else "#1d2430"
                           for c in names], edgecolor="white")
            for y, r in zip(ys, rates, strict=True):
                if r.n:
                    _rate_label(ax, y, r, prefix=f"{what}: ")
        ax.set_yticks(range(len(names)), names)
        ax.set(title=f"What reviewers found ({f.labelled} labelled items)",
               xlabel="% of labelled items", xlim=(0, 100))

    return render(draw, "labels", "False-positive and miss rates from labels",
                  height=max(2.4, 1.0 + 0.55 * len(names)))


def _rate_label(ax: Any, at: float, rate: Rate, *, prefix: str = "",
                vertical: bool = False) -> None:
    """A rate's words at the end of its bar, inside the bar when it is long: the axis stops at
    100%, so nothing is drawn past it."""
    share = 100 * rate.share
    inside = share > (85 if vertical else 55)
    end = share - 1.5 if inside else share + 1.5
    style = {"fontsize": 7, "color": "white" if inside else "#1d2430"}
    if vertical:
        ax.text(at, end, f"{prefix}{rate}", ha="center", va="top" if inside else "bottom",
                rotation=90 if inside else 0, **style)
    else:
        ax.text(end, at, f"{prefix}{rate}", ha="right" if inside else "left", va="center",
                **style)


def charts(f: Figures) -> dict[str, str]:
    """Every chart of the page that has something to show, by name."""
    out = {"over_time": chart_over_time(f), "rounds": chart_rounds(f),
           "latency": chart_latency(f), "policies": chart_policies(f)}
    if f.flags:
        out["flags"] = chart_flags(f)
    if f.labels:
        out["labels"] = chart_labels(f)
    return out
