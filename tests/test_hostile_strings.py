"""Hostile strings a client controls (NUL bytes, lone surrogates, very long, RTL and zero-width,
SQL) through the real proxy into both audit stores: each request gets its normal answer, its
trace reads back with the string as sent, the listing filters find it, and the chain verifies."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from guard.audit.postgres import PostgresStore
from guard.core.config import hash_key
from guard.plugins import build_store
from guard.support.errors import ConfigError
from tests.conftest import ADMIN_KEY, CLIENT_KEY
from tests.fake_backend import png
from tests.test_audit_postgres import pg, pg_dsn  # noqa: F401 - fixtures: a fresh schema

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
LONG = "a field of poppies " * 1600  # 30,400 characters: under gpt-image-1's prompt limit
# (prompt, model, user, unknown field name): each request sends one row of these.
CASES = [
    ("a red\x00 apple", "gpt-image-1\x00; rm -rf /", "user\x00nul", "seed\x00x"),
    ("a sign that says \u202egnp.exe\u200b\u200d\ufeff", "gpt\u200b-image-1\u202e", "\u05e9\u05dc\u05d5\u05dd",
     "\u200bzero_width"),
    ("a cat'; DROP TABLE traces; --", "x'); DROP TABLE traces; --", "\"; DELETE FROM chain_head",
     "1' OR '1'='1"),
    (LONG, "m" * 100_000, "u" * 50_000, "f" * 10_000),
]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def audit(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "sqlite":
        return {"kind": "sqlite", "path": str(tmp_path / "audit.db")}
    return dict(request.getfixturevalue("pg")["options"])


def trace(base: str, trace_id: str) -> dict[str, Any]:
    r = httpx.get(f"{base}/v1/guard/traces/{trace_id}", headers=ADMIN, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def listed(base: str, **filters: str) -> list[str]:
    r = httpx.get(f"{base}/v1/guard/traces", params=filters, headers=ADMIN, timeout=30)
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["data"]]


def verify(options: dict[str, Any]) -> Any:
    async def run() -> Any:
        store = build_store(options)
        try:
            return await store.verify()  # type: ignore[attr-defined]
        finally:
            await store.aclose()

    return asyncio.run(run())


def test_hostile_strings_are_served_and_stored_as_sent(proxy, audit) -> None:  # type: ignore[no-untyped-def]
    base = proxy(audit=audit)
    client = openai.OpenAI(base_url=base + "/v1", api_key=CLIENT_KEY, max_retries=0)
    ids = []
    for prompt, model, user, field in CASES:
        raw = client.images.with_raw_response.generate(
            prompt=prompt, model=model, user=user, extra_body={field: "value\x00"})
        assert raw.http_response.status_code == 200
        (image,) = raw.parse().data or []
        assert base64.b64decode(image.b64_json or "")[:4] == b"\x89PNG"
        trace_id = raw.headers["x-guard-trace-id"]
        ids.append(trace_id)
        got = trace(base, trace_id)
        assert got["status"] == 200 and got["decision"] == "passed"
        assert got["request"]["prompt"] == prompt and got["model"] == model
        assert got["request"]["user"] == user
        assert got["request"]["unknown_fields"] == [field]
        assert got["rounds"][0]["images"][0]["prompt"] == prompt
        if len(model) < 1000:  # (a longer one does not fit in a URL)
            assert listed(base, model=model) == [trace_id]  # the index column finds it too
    assert listed(base, limit="10") == ids[::-1]

    report = verify(audit)
    assert report.ok, [str(p) for p in report.problems]
    assert report.traces == len(CASES)


def test_lone_surrogates_are_refused_cleanly_and_traced(proxy, audit) -> None:  # type: ignore[no-untyped-def]
    base = proxy(audit=audit)
    auth = {"authorization": f"Bearer {CLIENT_KEY}"}
    # In JSON: "\ud800" escapes a lone surrogate, which no UTF-8 text can hold.
    r = httpx.post(f"{base}/v1/images/generations", content=b'{"prompt": "a cat \\ud800"}',
                   headers={**auth, "content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    json_trace = trace(base, r.headers["x-guard-trace-id"])
    assert json_trace["status"] == 400 and json_trace["error"]["code"] == "invalid_json"

    # In a multipart form whose declared charset (UTF-7) spells one: "+2AA-" is U+D800.
    boundary = "hostile"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\n"
            f"a cat +2AA-\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
            f"filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n").encode()
    body += png("blue") + f"\r\n--{boundary}--\r\n".encode()
    r = httpx.post(f"{base}/v1/images/edits", content=body, timeout=30, headers={
        **auth, "content-type": f"multipart/form-data; boundary={boundary}; charset=utf-7"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"]) == ("prompt", "invalid_encoding")
    form_trace = trace(base, r.headers["x-guard-trace-id"])
    assert form_trace["status"] == 400 and form_trace["error"]["code"] == "invalid_encoding"

    report = verify(audit)
    assert report.ok and report.traces == 2


def test_a_hostile_policy_header_is_refused_and_traced(proxy, audit) -> None:  # type: ignore[no-untyped-def]
    keys = [{"id": "chooser", "hash": hash_key(CLIENT_KEY), "may_choose_policy": True},
            {"id": "admin", "hash": hash_key(ADMIN_KEY), "role": "admin"}]
    base = proxy(audit=audit, keys=keys)
    sent = "e2e'; DROP TABLE traces; --\u202e\u200b".encode()  # header bytes, UTF-8
    r = httpx.post(f"{base}/v1/images/generations", json={"prompt": "a cat"}, timeout=30,
                   headers={b"authorization": f"Bearer {CLIENT_KEY}".encode(),
                            b"x-guard-policy": sent})
    assert r.status_code == 400 and r.json()["error"]["param"] == "x-guard-policy"
    got = trace(base, r.headers["x-guard-trace-id"])
    # HTTP header values are Latin-1: the trace shows the bytes as sent, read that way.
    assert got["error"]["message"] == f"Unknown policy '{sent.decode('latin-1')}'."
    assert verify(audit).ok


def test_a_nul_in_a_trace_id_or_filter_finds_nothing_rather_than_failing(proxy, audit) -> None:  # type: ignore[no-untyped-def]
    base = proxy(audit=audit)
    r = httpx.get(f"{base}/v1/guard/traces/tr_%00x", headers=ADMIN, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert listed(base, key_id="app\x00", category="hate\x00", policy_id="\x00") == []


def test_rows_written_before_columns_were_escaped_still_verify(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An upgrade must not raise false tamper alarms: SQLite used to keep a NUL in the model
    column as it was; the column check accepts that spelling, and still catches a real edit."""
    import sqlite3

    from tests.audit_writer import sample_trace

    options = {"kind": "sqlite", "path": str(tmp_path / "audit.db")}

    async def write() -> None:
        store = build_store(options)
        for i in range(2):
            await store.write(sample_trace("app", i, model="gpt\x00image"))
        await store.aclose()

    asyncio.run(write())
    with sqlite3.connect(options["path"]) as conn:
        assert conn.execute("SELECT model FROM traces WHERE seq = 1").fetchone() == (
            "gpt\\u0000image",)
        conn.execute("UPDATE traces SET model = ? WHERE seq = 1", ("gpt\x00image",))
        conn.execute("UPDATE traces SET model = ? WHERE seq = 2", ("gpt-image-1",))
    report = verify(options)
    assert [(p.kind, p.seq) for p in report.problems] == [("changed", 2)]
    assert "indexed column model='gpt-image-1'" in report.problems[0].message


def test_a_schema_name_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(ConfigError, match="not a plain identifier"):
        PostgresStore("postgresql://127.0.0.1/test", schema="audit\n")
