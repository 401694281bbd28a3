"""What the dashboard counts of one trace, and percentiles from counted values.

`trace_figures(trace)` is the row `trace_figures` keeps per trace (guard.audit.sql writes it in
the trace's transaction); `nearest_ranks` turns (value, count) pairs into percentiles. Both are
shared by the SQL stores and the dashboard's in-memory fallback (guard.review.dashboard).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from guard.audit.common import where_sql
from guard.core.types import Trace
from guard.plugins import WindowFigures

LATENCY_SAMPLE = 10_000  # traces whose latencies a window's percentiles are taken from, at most


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


async def count_window(dialect: Any, where: list[str], args: list[Any], bucket_s: int,
                       percentiles: Sequence[int]) -> WindowFigures:
    """A window's figures counted in the database from `trace_figures` rows meeting `where`
    (guard.plugins.WindowFigures), without reading one trace's body."""
    fetch = dialect.fetch

    def of(column: str | None = None) -> str:
        rows = f", {dialect.elements.format(column)}" if column else ""
        return f" FROM trace_figures{rows}{where_sql(where)}"

    buckets = await fetch(f"SELECT {dialect.bucket}, decision, count(*){of()}"
                          " GROUP BY 1, 2", [float(bucket_s), *args])
    rounds = await fetch(f"SELECT rounds, count(*){of()} GROUP BY rounds", args)
    policies = await fetch(f"SELECT policy_id, policy_version, decision, count(*){of()}"
                           f"{' AND' if where else ' WHERE'} (policy_id IS NOT NULL OR"
                           " policy_version IS NOT NULL) GROUP BY 1, 2, 3", args)
    flags = await fetch(f"SELECT e.value, count(*){of('flags')} GROUP BY e.value", args)
    # Latencies from every k-th trace (by seq) of a window of more than LATENCY_SAMPLE, so
    # that a long window sorts no more values than a short one.
    stride = -(-sum(n for _, _, n in buckets) // LATENCY_SAMPLE)
    if stride > 1:
        where, args = [*where, "seq % ? = 0"], [*args, stride]
    values = " UNION ALL ".join((f"SELECT 'request' AS what, request_ms AS v{of()}",
                                 f"SELECT 'judge', e.value{of('judge_ms')}",
                                 f"SELECT 'backend', e.value{of('backend_ms')}"))
    counted: dict[str, list[tuple[float, int]]] = {}
    for what, v, n in await fetch(f"SELECT what, v, count(*) FROM ({values}) AS s"
                                  " GROUP BY 1, 2 ORDER BY 1, 2", [*args, *args, *args]):
        counted.setdefault(what, []).append((v, n))
    latency = {what: nearest_ranks(counts, percentiles) for what, counts in counted.items()}
    return WindowFigures(
        over_time={(int(b) * bucket_s, d): n for b, d, n in buckets},
        rounds={r: n for r, n in rounds},
        flags={(f.partition(":")[2], f.partition(":")[0]): n for f, n in flags},
        policies={(p, v, d): n for p, v, d, n in policies}, latency_ms=latency)
