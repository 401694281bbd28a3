"""Trace listing filters, from a query string (the JSON API) or a form (the review page).

One parser for both, so both accept the same values: times as a unix timestamp, an ISO date or
datetime, or a window back from now (`90m`, `12h`, `7d`, `2w`); an auditor is always limited to
their own tenant (guard.core.auth.tenant_scope).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from guard.audit.common import decode_cursor
from guard.core.auth import Principal, tenant_scope
from guard.plugins import TraceQuery
from guard.support.errors import RequestError
from guard.support.timewindow import parse_since

TEXT_FILTERS = ("decision", "category", "tenant", "key_id", "policy_id", "model")
FILTERS = frozenset({*TEXT_FILTERS, "since", "until", "policy_version", "limit", "cursor"})
_MAX_INT = 2**63 - 1  # what SQLite and PostgreSQL bigint hold
# ASCII digits only: str.isdigit() also takes '²' and '٣', which int() refuses or reads.
_DIGITS = re.compile(r"[0-9]{1,19}")


def parse_trace_query(params: Mapping[str, str], principal: Principal,
                      default_limit: int = 50) -> TraceQuery:
    """A TraceQuery from filter values; empty values are filters not given. Unknown filters and
    bad values are 400s naming the filter."""
    values: dict[str, Any] = {}
    for name, raw in params.items():
        if name not in FILTERS:
            raise RequestError(f"Unknown filter '{name}'.", param=name)
        value = str(raw).strip()
        if not value:
            continue
        if name in ("since", "until"):
            values[name] = parse_since(value, param=name)
        elif name in ("policy_version", "limit"):
            values[name] = _whole_number(name, value)
        elif name == "cursor":
            decode_cursor(value)  # a 400 here, before any store sees it
            values[name] = value
        else:
            values[name] = value
    limit = values.setdefault("limit", default_limit)
    if not 1 <= limit <= 1000:
        raise RequestError("Invalid 'limit': between 1 and 1000.", param="limit")
    values["tenant"] = tenant_scope(principal, values.get("tenant"))
    return TraceQuery(**values)


def _whole_number(name: str, value: str) -> int:
    if not _DIGITS.fullmatch(value) or int(value) > _MAX_INT:
        raise RequestError(f"Invalid '{name}': expected a whole number.", param=name)
    return int(value)
