"""What the dashboard counts of one trace, and percentiles from counted values.

`trace_figures(trace)` is the row `trace_figures` keeps per trace (guard.audit.sql writes it in
the trace's transaction); `nearest_ranks` turns (value, count) pairs into percentiles. Both are
shared by the SQL stores and the dashboard's in-memory fallback (guard.review.dashboard).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from guard.core.types import Trace


def nearest_ranks(counts: Sequence[tuple[float, int]], percentiles: Sequence[int]
                  ) -> dict[int, float]:
    """Percentiles by nearest rank (the k-th smallest, k = ceil(p * n / 100)) of values given
    as (value, how many) in ascending order."""
    total, out, seen = sum(n for _, n in counts), {}, 0
    ranks = sorted((-(-p * total // 100), p) for p in percentiles)
    for value, n in counts:
        seen += n
        while ranks and ranks[0][0] <= seen:
            out[ranks.pop(0)[1]] = value
    return out


@dataclass(frozen=True, slots=True)
class TraceFigures:
    """What the dashboard counts of one trace (guard.plugins.WindowFigures says how)."""

    rounds: int
    request_ms: float
    judge_ms: list[float]
    backend_ms: list[float]
    flags: list[tuple[str, str]]  # (category, action)


def trace_figures(trace: Trace) -> TraceFigures:
    judge, backend, flags = [], [], []
    for rnd in trace.rounds:
        if rnd.images:
            judge.append(rnd.judge_ms)
        if rnd.counts and not (rnd.error and not rnd.images):
            backend.append(rnd.backend_ms)
        flags += [(category, item.action) for item in rnd.images for category in item.flagged]
    return TraceFigures(trace.round_count(), trace.duration_ms, judge, backend, flags)
