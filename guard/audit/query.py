"""Listing filters, from a query string (the JSON API) or a form (the review pages): the trace
list's (`parse_trace_query`) and the label list's (`parse_label_filters`).

One parser for every list, so that a filter accepts the same values wherever it is given: times
as a unix timestamp, an ISO date or datetime, or a window back from now (`90m`, `12h`, `7d`,
`2w`); whole numbers in ASCII digits within what both databases' columns hold; `limit` from 1 to
1000; `cursor` as the previous page gave it. An empty value is a filter not given; an unknown
filter or a bad value is a RequestError naming it. An auditor is always limited to their own
tenant (guard.core.auth.tenant_scope). The trace list's `q` (words of the request's prompt) and
`endpoint` (`generations`, `edits` or the path) are guard.audit.search's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from guard.audit import search
from guard.audit.common import decode_cursor
from guard.core.auth import Principal, tenant_scope
from guard.core.labels import VERDICTS
from guard.plugins import TraceQuery
from guard.support.errors import RequestError
from guard.support.timewindow import parse_since

TEXT_FILTERS = ("q", "decision", "category", "endpoint", "tenant", "key_id", "policy", "model")
# (`policy_id`: the name `policy` had before; either may be given, not both)
TRACE_FILTERS = frozenset({*TEXT_FILTERS, "policy_id", "since", "until", "policy_version", "limit",
                           "cursor"})
LABEL_FILTERS = frozenset({"trace_id", "verdict", "category", "tenant", "since", "until", "all",
                           "limit", "cursor"})
DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
_MAX_INTEGER = 2**31 - 1  # the policy_version column: an integer in both databases
# ASCII digits only: str.isdigit() also takes '²' and '٣', which int() refuses or reads.
_DIGITS = re.compile(r"[0-9]{1,19}")


def parse_trace_query(params: Mapping[str, str], principal: Principal,
                      default_limit: int = DEFAULT_LIMIT) -> TraceQuery:
    """A TraceQuery from filter values."""
    values = _parse(params, TRACE_FILTERS, principal, default_limit)
    if "policy" in values:
        if "policy_id" in values:
            raise RequestError("Give 'policy' or 'policy_id', not both.", param="policy_id")
        values["policy_id"] = values.pop("policy")
    return TraceQuery(**values)


def parse_label_filters(params: Mapping[str, str], principal: Principal) -> dict[str, Any]:
    """`LabelStore.labels` keyword arguments from filter values (`all`: every label, not only
    each item's latest)."""
    args = _parse(params, LABEL_FILTERS, principal, DEFAULT_LIMIT)
    args["latest_only"] = not args.pop("all", False)
    return args


def whole_number(name: str, value: str, low: int = 0, high: int = _MAX_INTEGER) -> int:
    """`value` as a whole number from `low` to `high`; else a RequestError naming `name`."""
    if not _DIGITS.fullmatch(value) or not low <= int(value) <= high:
        raise RequestError(f"Invalid '{name}': a whole number from {low} to {high}.", param=name)
    return int(value)


def _parse(params: Mapping[str, str], allowed: frozenset[str], principal: Principal,
           default_limit: int) -> dict[str, Any]:
    values: dict[str, Any] = {"limit": default_limit}
    for name, raw in params.items():
        if name not in allowed:
            raise RequestError(f"Unknown filter '{name}'.", param=name)
        value = str(raw).strip()
        if value:
            values[name] = _FIELDS.get(name, _text)(name, value)
    values["tenant"] = tenant_scope(principal, values.get("tenant"))
    return values


def _text(name: str, value: str) -> str:
    return value


def _cursor(name: str, value: str) -> str:
    decode_cursor(value)  # a RequestError here, before any store sees it
    return value


def _verdict(name: str, value: str) -> str:
    if value not in VERDICTS:
        raise RequestError(f"Invalid '{name}': one of {', '.join(VERDICTS)}.", param=name)
    return value


def _words(name: str, value: str) -> str:
    search.words(value)  # a RequestError here: no word in it, or too many
    return value


def _flag(name: str, value: str) -> bool:
    if value not in ("true", "false", "1", "0"):
        raise RequestError(f"Invalid '{name}': true or false.", param=name)
    return value in ("true", "1")


_FIELDS: dict[str, Callable[[str, str], Any]] = {
    "since": lambda name, value: parse_since(value, param=name),
    "until": lambda name, value: parse_since(value, param=name),
    "policy_version": whole_number,
    "limit": lambda name, value: whole_number(name, value, 1, MAX_LIMIT),
    "cursor": _cursor,
    "verdict": _verdict,
    "q": _words,
    "endpoint": lambda name, value: search.endpoint(value),
    "all": _flag,
}
