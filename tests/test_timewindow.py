"""guard.support.timewindow.parse_since: the one reading of `since`/`until` values, literal cases."""

from __future__ import annotations

import argparse
import time

import pytest

from guard.http.errors import status_of
from guard.support.errors import RequestError
from guard.support.timewindow import parse_since, time_option

NOW = 1_750_000_000.0
JUNE_1 = 1_748_736_000.0  # 2025-06-01T00:00:00Z


@pytest.mark.parametrize("value, expected", [
    ("90s", NOW - 90),
    ("30m", NOW - 1800),
    ("12h", NOW - 43_200),
    ("7d", NOW - 604_800),
    ("2w", NOW - 1_209_600),
    ("1.5h", NOW - 5400),
    (" 24 h ", NOW - 86_400),
    ("0d", NOW),
])
def test_ages_count_back_from_now(value: str, expected: float) -> None:
    assert parse_since(value, now=NOW) == expected


@pytest.mark.parametrize("value, expected", [
    ("2025-06-01", JUNE_1),                        # a date is its midnight, UTC
    ("2025-06-01T12:00", JUNE_1 + 43_200),         # no offset: UTC
    ("2025-06-01T12:00:00Z", JUNE_1 + 43_200),
    ("2025-06-01T14:00+02:00", JUNE_1 + 43_200),
    ("2025-06-01 12:00:30", JUNE_1 + 43_230),
    ("1748736000", JUNE_1),                        # Unix seconds
    ("1748736000.5", JUNE_1 + 0.5),
])
def test_dates_times_and_unix_seconds_ignore_now(value: str, expected: float) -> None:
    assert parse_since(value, now=NOW) == expected


def test_now_defaults_to_the_clock() -> None:
    assert abs(parse_since("1h") - (time.time() - 3600)) < 5


@pytest.mark.parametrize("value", ["", "  ", "yesterday", "7x", "7 days", "-3d", "d", "7dd",
                                   "nan", "inf", "2025-13-01", "2025-06-01T25:00",
                                   # instants no page, chart or database column can hold
                                   "1e308", "1e18", "253402300800", "-1", "99999999999w"])
def test_anything_else_is_a_400_naming_the_parameter(value: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_since(value, now=NOW)
    assert (status_of(info.value), info.value.param) == (400, "since")
    assert info.value.message.startswith("Invalid 'since': ")
    with pytest.raises(RequestError) as info:
        parse_since(value, now=NOW, param="until")
    assert info.value.param == "until" and "'until'" in info.value.message


def test_as_a_command_line_option(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="safeedit")
    parser.add_argument("--until", type=time_option("until"))
    assert parser.parse_args(["--until", "2025-06-01"]).until == JUNE_1
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--until", "yesterday"])
    assert info.value.code == 2
    assert "argument --until: Invalid 'until': 'yesterday' is not a time" in capsys.readouterr().err
