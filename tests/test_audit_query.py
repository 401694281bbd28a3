"""The one filter parser of the trace list and the label list (guard.audit.query): a filter both
take accepts and refuses the same values in both, every refusal naming the filter."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import pytest

from guard.audit.common import encode_cursor
from guard.audit.query import parse_label_filters, parse_trace_query
from guard.core.auth import Principal
from guard.support.errors import RequestError

ADMIN = Principal(key_id="admin", role="admin", tenant="default")
AUDITOR = Principal(key_id="auditor", role="auditor", tenant="acme")


def trace_filters(params: dict[str, str], principal: Principal = ADMIN) -> dict[str, Any]:
    return asdict(parse_trace_query(params, principal))


def label_filters(params: dict[str, str], principal: Principal = ADMIN) -> dict[str, Any]:
    return parse_label_filters(params, principal)


PARSERS: list[Callable[[dict[str, str]], dict[str, Any]]] = [trace_filters, label_filters]


@pytest.mark.parametrize("parse", PARSERS, ids=["traces", "labels"])
@pytest.mark.parametrize(("name", "value"), [
    ("limit", "0"), ("limit", "1001"), ("limit", "00001000000"), ("limit", "1_0"),
    ("limit", "+5"), ("limit", "-1"), ("limit", "²"), ("limit", "٣"), ("limit", "9" * 30),
    ("since", "soon"), ("until", "1e999"), ("cursor", "%%"), ("cursor", "9" * 5000),
    ("colour", "red"),
])
def test_a_bad_value_is_refused_alike_naming_the_filter(
        parse: Callable[[dict[str, str]], dict[str, Any]], name: str, value: str) -> None:
    with pytest.raises(RequestError) as caught:
        parse({name: value})
    assert caught.value.param == name


@pytest.mark.parametrize(("name", "value", "read"), [
    ("limit", "1", 1), ("limit", "1000", 1000), ("limit", "0050", 50), ("limit", " 7 ", 7),
    ("limit", "", 50), ("since", "1717200000", 1717200000.0),
    ("until", "2024-06-01T00:00Z", 1717200000.0), ("category", "violence", "violence"),
    ("cursor", encode_cursor(42), encode_cursor(42)),
])
def test_a_good_value_is_read_alike(name: str, value: str, read: Any) -> None:
    assert trace_filters({name: value})[name] == read
    assert label_filters({name: value})[name] == read


def test_an_auditor_lists_their_own_tenant_only() -> None:
    assert trace_filters({"tenant": "globex"}, AUDITOR)["tenant"] == "acme"
    assert label_filters({"tenant": "globex"}, AUDITOR)["tenant"] == "acme"
    assert trace_filters({})["tenant"] is None
    assert label_filters({"tenant": "globex"})["tenant"] == "globex"


def test_policy_version_stays_within_what_the_column_holds() -> None:
    """PostgreSQL's integer column: a larger version is a 400 on both stores, not a 500 on one."""
    assert trace_filters({"policy_version": "2147483647"})["policy_version"] == 2**31 - 1
    for value in ("2147483648", "9" * 19, "-1", "3.0"):
        with pytest.raises(RequestError) as caught:
            trace_filters({"policy_version": value})
        assert caught.value.param == "policy_version"


def test_each_list_takes_only_its_own_filters() -> None:
    for name, parse in (("verdict", trace_filters), ("policy_version", label_filters)):
        with pytest.raises(RequestError) as caught:
            parse({name: "1"})
        assert caught.value.param == name


def test_labels_are_each_items_latest_unless_all_are_asked_for() -> None:
    assert label_filters({})["latest_only"] is True
    assert label_filters({"all": "true"})["latest_only"] is False
    assert label_filters({"all": "0"})["latest_only"] is True
    for name, value in (("all", "maybe"), ("verdict", "meh")):
        with pytest.raises(RequestError) as caught:
            label_filters({name: value})
        assert caught.value.param == name
