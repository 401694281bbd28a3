"""Auditors' labels through the real API (the proxy on uvicorn, httpx as the client), on SQLite
and on PostgreSQL: adding them, every refusal naming its field, tenant scoping, a later label
superseding an earlier one while both stay, labels leaving the trace untouched, and
`safeedit audit verify` catching a tampered label."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import yaml

from guard.audit.labels import sample_point
from guard.core.labels import Label, QueueQuery
from guard.plugins import LabelStore, build_store
from tests.audit_writer import sample_trace
from tests.conftest import (
    ADMIN_KEY,
    AUDITOR_KEY,
    CLIENT_KEY,
    E2E_POLICY,
    OTHER_AUDITOR_KEY,
    write_policy,
)
from tests.services import drop_schemas
from tests.test_audit_postgres import pg_dsn  # noqa: F401 - the fixture: skip or fail without PG

ROOT = Path(__file__).resolve().parent.parent
SAFEEDIT = str(ROOT / ".venv" / "bin" / "safeedit")


def _auth(key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key else {}


class Site:
    """The proxy with three traces (passed, edited over two rounds, refused from its prompt)."""

    def __init__(self, base: str, backend: Any, audit: dict[str, Any]) -> None:
        self.base, self.audit = base, audit
        self.ids: dict[str, str] = {}
        for name, prompt, plan in (("passed", "a bowl of fruit", [["blue"]]),
                                   ("edited", "a street at night", [["red"], ["blue"]]),
                                   ("refused", "a poster with a hateflag", [])):
            backend.plan += plan
            r = httpx.post(f"{base}/v1/images/generations", json={"prompt": prompt},
                           headers=_auth(CLIENT_KEY), timeout=30)
            assert r.status_code == (400 if name == "refused" else 200), r.text
            self.ids[name] = r.headers["x-guard-trace-id"]

    def label(self, trace: str, body: dict[str, Any] | bytes,
              key: str | None = AUDITOR_KEY) -> httpx.Response:
        content = body if isinstance(body, bytes) else orjson.dumps(body)
        return httpx.post(f"{self.base}/v1/guard/traces/{self.ids.get(trace, trace)}/labels",
                          content=content, headers={**_auth(key),
                                                    "content-type": "application/json"})

    def labels(self, key: str | None = AUDITOR_KEY, **params: Any) -> httpx.Response:
        return httpx.get(f"{self.base}/v1/guard/labels", params=params, headers=_auth(key))

    def trace(self, name: str) -> dict[str, Any]:
        r = httpx.get(f"{self.base}/v1/guard/traces/{self.ids[name]}",
                      headers=_auth(AUDITOR_KEY))
        assert r.status_code == 200
        return r.json()  # type: ignore[no-any-return]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def site(request: pytest.FixtureRequest, proxy: Any, tmp_path: Path,
         fake_backend: Any) -> Iterator[Site]:
    write_policy(tmp_path, E2E_POLICY)
    if request.param == "sqlite":
        audit: dict[str, Any] = {"kind": "sqlite", "path": str(tmp_path / "audit.db")}
    else:
        audit = {"kind": "postgres", "dsn": request.getfixturevalue("pg_dsn"),
                 "schema": f"t_{uuid.uuid4().hex[:12]}", "images_dir": str(tmp_path / "img")}
    yield Site(proxy(policy="e2e", audit=audit), fake_backend[0], audit)
    if request.param == "postgres":
        asyncio.run(drop_schemas(audit["dsn"], audit["schema"]))


def _pg(dsn: str, sql: str, *args: Any) -> None:
    async def go() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(sql, *args)
        finally:
            await conn.close()

    asyncio.run(go())


def test_an_auditor_labels_an_image_and_the_prompt(site: Site) -> None:
    r = site.label("edited", {"slot": 0, "round": 1, "verdict": "false_positive",
                              "category": "violence", "note": "a red wall, not blood"})
    assert r.status_code == 201, r.text
    image = r.json()
    assert image["object"] == "guard.label" and image["id"].startswith("lb_")
    assert (image["trace_id"], image["slot"], image["round"]) == (site.ids["edited"], 0, 1)
    assert image["verdict"] == "false_positive" and image["category"] == "violence"
    assert image["note"] == "a red wall, not blood"
    assert (image["key_id"], image["tenant"]) == ("audit", "acme")
    assert image["prev_hash"] is None and len(image["hash"]) == 64

    r = site.label("refused", {"slot": None, "round": 0, "verdict": "correct"}, key=ADMIN_KEY)
    assert r.status_code == 201, r.text
    prompt = r.json()
    assert prompt["slot"] is None and prompt["key_id"] == "admin"
    assert prompt["prev_hash"] == image["hash"]  # one chain

    listed = site.labels().json()
    assert listed["object"] == "list" and listed["next_cursor"] is None
    assert [item["id"] for item in listed["data"]] == [prompt["id"], image["id"]]  # newest first
    assert listed["data"][1] == {**image, "superseded": False}
    only = site.labels(trace_id=site.ids["edited"]).json()["data"]
    assert [item["id"] for item in only] == [image["id"]]
    assert [i["id"] for i in site.labels(verdict="correct").json()["data"]] == [prompt["id"]]
    assert [i["id"] for i in site.labels(category="violence").json()["data"]] == [image["id"]]
    page = site.labels(limit=1).json()
    assert [i["id"] for i in page["data"]] == [prompt["id"]] and page["next_cursor"]
    rest = site.labels(limit=1, cursor=page["next_cursor"]).json()
    assert [i["id"] for i in rest["data"]] == [image["id"]] and rest["next_cursor"] is None
    assert site.labels(since="1h").json()["data"] and not site.labels(until="1h").json()["data"]


@pytest.mark.parametrize(("trace", "body", "param", "words"), [
    ("edited", {"slot": 3, "round": 1, "verdict": "correct"}, "slot", "no judged image slot 3"),
    ("edited", {"slot": 0, "round": 7, "verdict": "correct"}, "round", "round 1, 2"),
    ("passed", {"slot": None, "round": 1, "verdict": "correct"}, "round", "the prompt"),
    ("edited", {"slot": 0, "round": 1, "verdict": "missed"}, "category", "needs the 'category'"),
    ("edited", {"slot": 0, "round": 2, "verdict": "missed", "category": "weather"}, "category",
     "not a category of policy 'e2e'"),
    ("edited", {"slot": 0, "round": 1, "verdict": "wrong"}, "verdict", "one of correct"),
    ("edited", {"slot": 0, "round": "one", "verdict": "correct"}, "round", "whole number"),
    ("edited", {"slot": -1, "round": 1, "verdict": "correct"}, "slot", "whole number"),
    ("edited", {"slot": 0, "round": 1, "verdict": "correct", "note": "x" * 4001}, "note",
     "at most 4000"),
    ("edited", {"slot": 0, "round": 1, "verdict": "correct", "score": 1}, "score", "Unknown"),
    ("edited", b"{not json", None, "not valid JSON"),
    ("edited", b"[1, 2]", None, "a JSON object"),
], ids=["slot", "round", "prompt-round", "missed-without-category", "category", "verdict",
        "round-type", "negative-slot", "note", "unknown-field", "not-json", "not-an-object"])
def test_a_bad_label_is_a_400_naming_the_field(site: Site, trace: str, body: Any,
                                                param: str | None, words: str) -> None:
    r = site.label(trace, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert words in error["message"]
    assert site.labels().json()["data"] == []


def test_labels_are_scoped_to_the_tenant_and_the_role(site: Site) -> None:
    body = {"slot": 0, "round": 2, "verdict": "missed", "category": "violence"}
    r = site.label("edited", body, key=OTHER_AUDITOR_KEY)  # an auditor of another tenant
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert site.label("edited", body, key=CLIENT_KEY).status_code == 403
    assert site.label("edited", body, key=None).status_code == 401
    assert site.label("tr_nope", body).status_code == 404
    assert site.label("edited", body).status_code == 201

    assert site.labels(key=OTHER_AUDITOR_KEY, tenant="acme").json()["data"] == []
    assert len(site.labels(key=AUDITOR_KEY, tenant="globex").json()["data"]) == 1  # own only
    assert len(site.labels(key=ADMIN_KEY).json()["data"]) == 1
    assert site.labels(key=ADMIN_KEY, tenant="globex").json()["data"] == []
    assert site.labels(key=CLIENT_KEY).status_code == 403
    for params, param in (({"verdict": "meh"}, "verdict"), ({"all": "maybe"}, "all"),
                          ({"limit": "0"}, "limit"), ({"limit": "00001000000"}, "limit"),
                          ({"since": "soon"}, "since"),
                          ({"cursor": "%%"}, "cursor"), ({"color": "red"}, "color")):
        r = site.labels(**params)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_a_later_label_supersedes_the_earlier_and_both_stay(site: Site) -> None:
    item = {"slot": 0, "round": 1}
    first = site.label("edited", {**item, "verdict": "correct"}).json()
    other = site.label("edited", {**item, "round": 2, "verdict": "correct"}).json()
    second = site.label("edited", {**item, "verdict": "false_positive", "category": "violence",
                                   "note": "on second thought"}, key=ADMIN_KEY).json()
    assert second["prev_hash"] == other["hash"]

    current = site.labels().json()["data"]
    assert [(i["id"], i["superseded"]) for i in current] == [(second["id"], False),
                                                             (other["id"], False)]
    history = site.labels(all="true").json()["data"]
    assert [(i["id"], i["superseded"]) for i in history] == [
        (second["id"], False), (other["id"], False), (first["id"], True)]
    # A filter applies to each item's current label: the superseded "correct" is not current.
    assert [i["id"] for i in site.labels(verdict="correct").json()["data"]] == [other["id"]]
    assert [i["id"] for i in site.labels(verdict="correct", all="true").json()["data"]] == [
        other["id"], first["id"]]


def test_labels_never_change_the_trace_and_verify(site: Site, tmp_path: Path) -> None:
    before = site.trace("edited")
    for verdict in ("correct", "false_positive"):
        body = {"slot": 0, "round": 1, "verdict": verdict, "category": "violence"}
        assert site.label("edited", body).status_code == 201
    assert site.label("refused", {"round": 0, "verdict": "correct"}).status_code == 201
    assert site.trace("edited") == before  # the same content and the same hash

    code, report = _verify(site.audit, tmp_path)
    assert code == 0, report
    assert report["ok"] and report["traces"] == 3
    assert report["label_chain"]["labels"] == 3 and report["label_chain"]["ok"]


def test_verify_names_a_tampered_label(site: Site, tmp_path: Path) -> None:
    body = {"slot": 0, "round": 1, "verdict": "correct"}
    first = site.label("edited", body).json()
    site.label("edited", {**body, "round": 2})
    # The database's admin turns the auditor's "correct" into a "missed": the chain says no.
    sql = "UPDATE labels SET body = replace(body, '\"correct\"', '\"missed\"') WHERE seq = 1"
    if site.audit["kind"] == "sqlite":
        with sqlite3.connect(site.audit["path"]) as conn:
            conn.execute(sql)
    else:
        _pg(site.audit["dsn"], f'SET search_path TO "{site.audit["schema"]}"; {sql}')
    code, report = _verify(site.audit, tmp_path)
    assert code == 1 and not report["ok"]
    assert report["problems"] == []  # the traces are intact
    problem = report["label_chain"]["first_problem"]
    assert problem["kind"] == "changed" and problem["label_id"] == first["id"]
    assert f"label {first['id']} (seq 1) was changed" in problem["message"]
    text = subprocess.run([SAFEEDIT, "audit", "verify", "--config", _config(site.audit, tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert text.returncode == 1
    assert f"FAILED (labels): changed: label {first['id']} (seq 1) was changed" in text.stdout


def _config(audit: dict[str, Any], tmp_path: Path) -> str:
    config = tmp_path / "cli" / "config.yaml"
    config.parent.mkdir(exist_ok=True)
    config.write_text(yaml.safe_dump({"audit": audit}))
    return str(config)


def _verify(audit: dict[str, Any], tmp_path: Path) -> tuple[int, dict[str, Any]]:
    result = subprocess.run([SAFEEDIT, "audit", "verify", "--json", "--config",
                             _config(audit, tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, orjson.loads(result.stdout)


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_the_sample_is_the_same_in_both_stores(kind: str, request: pytest.FixtureRequest,
                                                tmp_path: Path) -> None:
    """The queue's sample of passed traces is `sample_point(id) < rate` in SQL too: stable per
    trace, the same on SQLite and PostgreSQL; labelled traces leave the queue."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    options: dict[str, Any] = (
        {"kind": "sqlite", "path": str(tmp_path / "audit.db")} if kind == "sqlite" else
        {"kind": "postgres", "dsn": request.getfixturevalue("pg_dsn"), "schema": schema,
         "images_dir": str(tmp_path / "images")})

    async def go() -> None:
        store = build_store(options)
        assert isinstance(store, LabelStore)
        traces = [sample_trace("app", i, decision="passed") for i in range(60)]
        await store.write_many(traces)  # type: ignore[attr-defined]
        try:
            for rate in (0.0, 0.25, 0.5, 1.0):
                page = await store.review_queue(QueueQuery(sample=rate, limit=100))
                expected = [t.id for t in reversed(traces) if sample_point(t.id) < rate]
                assert [item["id"] for item in page.items] == expected
                assert page.left == ({"passed": len(expected)} if expected else {})
            await store.add_label(Label(trace_id=traces[0].id, slot=0, round=1,
                                        verdict="correct", key_id="audit"))
            page = await store.review_queue(QueueQuery(sample=1.0, limit=100))
            assert traces[0].id not in [item["id"] for item in page.items]
            assert page.total == 59
        finally:
            await store.aclose()
            if kind == "postgres":
                await drop_schemas(options["dsn"], schema)

    asyncio.run(go())
