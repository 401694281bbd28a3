"""The start or end of a time window as people type it: `7d`, `12h`, `2025-06-01`, `1717200000`.

One parser for every `since`/`until` the guard takes (the CLI's options, the review pages'
filters, the traces API), so the same text means the same instant everywhere.
"""

from __future__ import annotations

import argparse
import math
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime

from guard.support.errors import RequestError

# The instants a window may name: from the Unix epoch to the last second datetime (and so every
# page, chart and database column that shows or stores one) can represent.
EARLIEST = 0.0
LATEST = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()
_AGO = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_since(value: str, now: float | None = None, *, param: str = "since") -> float:
    """The instant `value` names, in Unix seconds.

    `value` is an age before `now` (default: the current time): `90s`, `30m`, `12h`, `7d`,
    `2w`; an ISO 8601 date or date and time, UTC unless it carries an offset (`Z` included);
    or Unix seconds, between 1970 and the end of year 9999. Anything else is a RequestError
    naming `param`.
    """
    when = _instant(value, now, param)
    if not EARLIEST <= when <= LATEST:
        raise RequestError(f"Invalid '{param}': {value!r} is outside the times this can show "
                           "(from 1970 to the end of year 9999).", param=param)
    return when


def _instant(value: str, now: float | None, param: str) -> float:
    text = value.strip()
    if ago := _AGO.fullmatch(text):
        return (time.time() if now is None else now) - float(ago[1]) * _UNIT_S[ago[2]]
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if math.isfinite(seconds):
            return seconds
    try:
        when = datetime.fromisoformat(text)
    except (ValueError, OverflowError):
        raise RequestError(f"Invalid '{param}': {value!r} is not a time; use an age (30m, 12h, "
                           "7d, 2w), a date or time (2025-06-01, 2025-06-01T12:00Z) or Unix "
                           "seconds.", param=param) from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def time_option(param: str) -> Callable[[str], float]:
    """`parse_since` as an argparse `type=`: bad text is a usage error, like any bad option."""
    def parse(value: str) -> float:
        try:
            return parse_since(value, param=param)
        except RequestError as exc:
            raise argparse.ArgumentTypeError(exc.message) from None

    return parse
