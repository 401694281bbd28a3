"""A compliance officer changing policy safely, through the real command line (a subprocess per
command) and the real proxy: every policy command takes an id or a file; replay names its store,
never invents one, hints at --any-policy and prints exact values and outcomes; validate
--against and hot reload refuse a file changed under a live version; calibrate keeps the file;
`policy test` runs a regression suite; the policy history in the audit store, its API and its
page in Chromium (screenshot under tests/artifacts/)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import httpx
import pytest

from guard.audit.sqlite import SQLiteStore
from guard.core.policy import POLICIES_DIR, load_policy
from tests.conftest import ADMIN_KEY, AUDITOR_KEY, CLIENT_KEY
from tests.fake_backend import png
from tests.test_calibrate import labels_csv
from tests.test_policy_replay import HOUSE, generate, judged, prescreen, trace

ROOT = Path(__file__).resolve().parent.parent


def safeedit(cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "guard.cli", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


# --- one resolver -------------------------------------------------------------------------------

def test_every_policy_command_takes_a_shipped_id_or_a_file(tmp_path: Path) -> None:
    house = tmp_path / "house.yaml"
    house.write_text("id: house\nversion: 1\nextends: default\n"
                     "categories:\n  violence: {threshold: 0.3}\n")
    explained = safeedit(tmp_path, "policy", "explain", "strict")
    assert explained.returncode == 0, explained.stderr
    assert explained.stdout.startswith("Policy 'strict', version ")
    assert f"file: {POLICIES_DIR / 'strict.yaml'}" in explained.stdout

    compared = safeedit(tmp_path, "policy", "diff", "default", "house.yaml")
    assert compared.returncode == 1, compared.stderr  # 1: they differ
    assert compared.stdout.splitlines()[0] == (
        f"default v{load_policy(POLICIES_DIR / 'default.yaml').version} "
        f"({POLICIES_DIR / 'default.yaml'}) -> house v1 (house.yaml)")
    assert "[stricter] violence:" in compared.stdout

    # An id under ./policies/ (as `safeedit serve` reads it) and one the config's policy_paths
    # name are found alike.
    (tmp_path / "policies").mkdir()
    house.rename(tmp_path / "policies" / "house.yaml")
    assert safeedit(tmp_path, "policy", "validate", "house", "strict").returncode == 0
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "kids.yaml").write_text("id: kids\nversion: 2\nextends: default\n")
    (tmp_path / "config.yaml").write_text(f"policy_paths: [{other}]\n")
    assert safeedit(tmp_path, "policy", "explain", "kids").returncode == 2
    found = safeedit(tmp_path, "policy", "explain", "kids", "--config", "config.yaml")
    assert found.returncode == 0 and "Policy 'kids', version 2" in found.stdout

    missing = safeedit(tmp_path, "policy", "explain", "nosuch")
    assert missing.returncode == 2
    assert "no policy file nosuch and no policy with id 'nosuch'" in missing.stderr
    assert "known ids: default, house, permissive, strict" in missing.stderr


# --- replay ---------------------------------------------------------------------------------------

def _store(path: Path) -> Path:
    traces = [
        # Edited in round 2: round 1's image scored 0.989, over house's 0.6.
        trace("tr_close", "two knights at dawn", [
            prescreen("two knights at dawn", {"violence": 0.3}, "pass"),
            generate(1, judged(0, "two knights at dawn", {"violence": 0.989}, "edit",
                               refined="two knights bowing")),
            generate(2, judged(0, "two knights bowing", {"violence": 0.1}, "pass"))],
            "edited"),
        # Edited at the prescreen: the original prompt was never generated.
        trace("tr_brawl", "a bar brawl", [
            prescreen("a bar brawl", {"violence": 0.95}, "edit", refined="a lively bar"),
            generate(1, judged(0, "a lively bar", {"violence": 0.2}, "pass"))], "edited"),
    ]

    async def write() -> None:
        store = SQLiteStore(path)
        for t in traces:
            await store.write(t)
        await store.aclose()

    asyncio.run(write())
    return path


def test_replay_names_its_store_and_never_invents_one(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = safeedit(empty, "policy", "replay", "--candidate", "default")
    assert refused.returncode == 2
    assert (f"no audit store at {empty / 'var' / 'audit.db'} (SQLite, from the embedded default "
            "config (name another store with --config)): nothing to read, and none is created"
            ) in refused.stderr
    assert not (empty / "var").exists()

    db = _store(tmp_path / "audit.db")
    (tmp_path / "config.yaml").write_text(f"audit: {{kind: sqlite, path: {db}}}\n")
    (tmp_path / "candidate").mkdir()
    # A renamed copy of house: its id matches no stored trace.
    (tmp_path / "candidate" / "house-copy.yaml").write_text(
        HOUSE.replace("id: house", "id: house-copy"))
    copy = safeedit(tmp_path, "policy", "replay", "--candidate", "candidate/house-copy.yaml",
                    "--config", "config.yaml", "--csv", "out.csv")
    assert copy.returncode == 0, copy.stderr
    lines = copy.stdout.splitlines()
    assert lines[0] == f"Traces read from SQLite file {db}, from the audit: of config.yaml."
    assert "0 trace(s) re-decided, 0 would change." in lines[1]
    assert lines[2] == ("  No stored trace ran under policy id 'house-copy'; the same period has "
                        "traces of house (2). To replay those under this candidate, name the "
                        "recorded id with --policy ID, or take every trace with --any-policy.")


def test_replay_prints_exact_values_and_says_why_an_outcome_is_unknown(tmp_path: Path) -> None:
    db = _store(tmp_path / "audit.db")
    (tmp_path / "config.yaml").write_text(f"audit: {{kind: sqlite, path: {db}}}\n")
    # violence from 0.99: the knights' 0.989 passes; the brawl's prompt (0.95) now passes too.
    (tmp_path / "house.yaml").write_text(HOUSE.replace(
        "violence: {threshold: 0.6, action: edit}", "violence: {threshold: 0.99, action: edit}"))
    r = safeedit(tmp_path, "policy", "replay", "--candidate", "house.yaml", "--config",
                 "config.yaml", "--any-policy", "--csv", "out.csv")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "2 trace(s) re-decided, 1 would change, 1 might (a step they need was never " \
           "recorded)." in out
    assert "      1  edited -> passed\n" in out
    assert ("      1  edited -> not known, passed or edited or refused: image 0 of round 1 "
            "would be generated from 'a bar brawl'; when recorded it was generated from "
            "'a lively bar', so its verdict is not known\n") in out
    assert "round 1 image 0: violence 0.989 < 0.99 -> pass (was edit)" in out
    assert "prescreen: violence 0.95 < 0.99 -> pass (was edit)" in out
    assert "0.99 < 0.99" not in out and "maybe" not in out


# --- validate --against and calibrate ---------------------------------------------------------

LIVE = """\
# The house policy. Comments explain each choice to the next officer.
id: house
version: 3
extends: default
categories:
  violence:   {threshold: 0.6,  action: edit}   # films with fights are common here
"""


def test_validate_against_refuses_a_file_changed_under_a_live_version(tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    (live / "house.yaml").write_text(LIVE)
    edited = tmp_path / "house.yaml"
    edited.write_text(LIVE.replace("0.6, ", "0.7, "))
    r = safeedit(tmp_path, "policy", "validate", str(edited), "--against", str(live))
    assert r.returncode == 1
    assert (f"{edited}:3:10: error: version: policy house version 3 is already live in "
            f"{live / 'house.yaml'} with other content; raise `version`") in r.stdout
    assert "ok (house" not in r.stdout
    # Only comments changed: the same policy. A raised version: a new one. Both are fine.
    edited.write_text(LIVE.replace("common here", "common in this market"))
    assert safeedit(tmp_path, "policy", "validate", str(edited), "--against",
                    str(live)).returncode == 0
    edited.write_text(LIVE.replace("0.6, ", "0.7, ").replace("version: 3", "version: 4"))
    ok = safeedit(tmp_path, "policy", "validate", str(edited), "--against", str(live))
    assert ok.returncode == 0 and "ok (house v4" in ok.stdout


def test_calibrate_keeps_the_file_and_raises_the_version_only_on_a_change(
        tmp_path: Path) -> None:
    (tmp_path / "house.yaml").write_text(LIVE)
    labels = labels_csv(tmp_path / "labels.csv")
    r = safeedit(tmp_path, "policy", "calibrate", "--policy", "house.yaml", "--labels",
                 str(labels), "--target-precision", "0.9", "--out", "out")
    assert r.returncode == 0, r.stderr
    assert "proposed policy: out/proposed.yaml (v4)" in r.stdout
    header, body = (tmp_path / "out" / "proposed.yaml").read_text().split("\n\n", 1)
    assert body == LIVE.replace("version: 3", "version: 4").replace("0.6, ", "0.645, ")
    assert "#   violence: threshold 0.6 -> 0.645\n#   version: 3 -> 4" in header
    # A threshold inherited from default is set in this file, beside its own categories.
    kid = ("# The kids' policy.\nid: kid\nversion: 1\nextends: default\ncategories:\n"
           "  hate: {threshold: 0.3, action: refuse}  # stricter than default\n")
    (tmp_path / "kid.yaml").write_text(kid)
    r = safeedit(tmp_path, "policy", "calibrate", "--policy", "kid.yaml", "--labels",
                 str(labels), "--target-precision", "0.9", "--out", "kid")
    assert r.returncode == 0, r.stderr
    body = (tmp_path / "kid" / "proposed.yaml").read_text().split("\n\n", 1)[1]
    assert body == kid.replace("version: 1", "version: 2").replace(
        "categories:\n", "categories:\n  violence: {threshold: 0.645}\n")
    proposed = load_policy(tmp_path / "kid" / "proposed.yaml")
    assert (proposed.extends, proposed.version) == ("default", 2)
    assert proposed.categories["violence"].threshold == 0.645
    assert proposed.categories["violence"].action == "edit"  # still inherited


# --- policy test --------------------------------------------------------------------------------

def test_policy_test_runs_a_regression_suite_with_junit(tmp_path: Path) -> None:
    shipped = safeedit(ROOT, "policy", "test", "policies/tests/default.yaml", "--junit",
                       str(tmp_path / "shipped.xml"))
    assert shipped.returncode == 0, shipped.stdout + shipped.stderr
    assert "0 failed" in shipped.stdout
    suite = ET.parse(tmp_path / "shipped.xml").getroot()[0]
    assert suite.get("failures") == "0" and int(suite.get("tests", "0")) >= 5

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "blue.png").write_bytes(png("blue"))
    (tmp_path / "cases.yaml").write_text("""\
policy: strict
cases:
  - {name: fruit with its photo, prompt: a bowl of fruit, image: images/blue.png, action: pass}
  - {name: brawl, prompt: a bloodbath in a bar, action: edit, categories: [violence]}
  - {name: wrong on purpose, prompt: a quiet harbour, action: refuse}
""")
    (tmp_path / "config.yaml").write_text("judge: {kind: builtin, nudenet: false}\n")
    r = safeedit(tmp_path, "policy", "test", "cases.yaml", "--config", "config.yaml",
                 "--junit", "out.xml")
    assert r.returncode == 1
    rows = {line.split(None, 1)[1].split("  ")[0]: line.split()[0]
            for line in r.stdout.splitlines() if line.startswith(("ok ", "FAIL "))}
    assert rows == {"fruit with its photo": "ok", "brawl": "ok", "wrong on purpose": "FAIL"}
    assert "action pass, expected refuse" in r.stdout and "2 passed, 1 failed" in r.stdout
    strict = load_policy(POLICIES_DIR / "strict.yaml")
    assert r.stdout.startswith(f"Policy strict v{strict.version}")
    suite = ET.parse(tmp_path / "out.xml").getroot()[0]
    assert (suite.get("tests"), suite.get("failures")) == ("3", "1")
    (failed,) = [c for c in suite if c.find("failure") is not None]
    assert failed.get("name") == "wrong on purpose"

    (tmp_path / "bad.yaml").write_text("cases:\n  - {prompt: a cat, action: allow}\n")
    bad = safeedit(tmp_path, "policy", "test", "bad.yaml")
    assert bad.returncode == 2
    assert "case 1: `action` must be one of pass, edit, refuse, not 'allow'" in bad.stderr


# --- the proxy: stale reloads, the new parent, the history ----------------------------------------

def live_policy(version: int, threshold: float) -> str:
    return (f"id: live\nversion: {version}\ncategories:\n"
            f"  violence: {{threshold: {threshold}, action: edit}}\n"
            "  hate: {threshold: 0.5, action: refuse}\n"
            "terms:\n  violence: {strong: [brawl], rewrites: {brawl: dance}}\n")


KIDS = "id: kids\nversion: 3\nextends: live\n"


def get(base: str, path: str, key: str = ADMIN_KEY) -> httpx.Response:
    return httpx.get(f"{base}{path}", headers={"authorization": f"Bearer {key}"}, timeout=30)


def served_policy(base: str) -> dict[str, Any]:
    r = httpx.post(f"{base}/v1/images/generations", json={"prompt": "a bowl of fruit"},
                   headers={"authorization": f"Bearer {CLIENT_KEY}"}, timeout=30)
    return get(base, f"/v1/guard/traces/{r.headers['x-guard-trace-id']}").json()["policy"]


def sha(*texts: str) -> str:
    return hashlib.sha256("".join(texts).encode()).hexdigest()


@pytest.fixture
def officer(proxy, tmp_path: Path) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """The proxy serving kids (extends live): live v1 changed in place (stale, held), then
    raised to v2 (kids keeps v3 and serves the new parent)."""
    (tmp_path / "live.yaml").write_text(live_policy(1, 0.6))
    (tmp_path / "kids.yaml").write_text(KIDS)
    base = proxy(policy="kids", policy_reload_s=0)
    first = served_policy(base)

    (tmp_path / "live.yaml").write_text(live_policy(1, 0.9))  # same version, other content
    stale = httpx.post(f"{base}/v1/guard/policies/reload",
                       headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
    held = served_policy(base)
    ready, metrics = httpx.get(f"{base}/readyz").json(), httpx.get(f"{base}/metrics").text

    (tmp_path / "live.yaml").write_text(live_policy(2, 0.9))
    raised = httpx.post(f"{base}/v1/guard/policies/reload",
                        headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
    return {"base": base, "first": first, "stale": stale, "held": held, "ready": ready,
            "metrics": metrics, "raised": raised, "after": served_policy(base),
            "ready_after": httpx.get(f"{base}/readyz").json(),
            "metrics_after": httpx.get(f"{base}/metrics").text}


def test_a_file_changed_under_its_version_is_not_served_until_the_version_is_raised(
        officer: dict[str, Any]) -> None:
    v1 = sha(KIDS, live_policy(1, 0.6))
    assert officer["first"] == {"id": "kids", "version": 3, "sha256": v1}
    assert officer["stale"].status_code == 200
    body = officer["stale"].json()
    assert body["changed"] == []  # nothing swapped: live's v1 content and kids stay as served
    (stale,) = body["stale"]
    assert stale["policy"] == "live" and stale["version"] == 1
    assert stale["serving_sha256"] == sha(live_policy(1, 0.6))
    assert officer["held"] == officer["first"]
    assert officer["ready"]["status"] == "ready"
    assert [s["policy"] for s in officer["ready"]["details"]["stale_policies"]] == ["live"]
    assert 'guard_policy_stale_reload{policy="live"} 1.0' in officer["metrics"]

    # Raised: live v2 goes live; kids keeps its own version 3 and serves the new parent, and
    # its traces record the new effective sha256 (its file, then its parent's).
    changed = {c["id"]: c for c in officer["raised"].json()["changed"]}
    assert changed["live"]["to"]["version"] == 2 and changed["kids"]["to"]["version"] == 3
    assert officer["raised"].json()["stale"] == []
    assert any("policy kids keeps version 3 and serves the new content of live" in w
               for w in officer["raised"].json()["warnings"])
    assert officer["after"] == {"id": "kids", "version": 3,
                                "sha256": sha(KIDS, live_policy(2, 0.9))}
    assert officer["ready_after"]["details"]["stale_policies"] == []
    assert 'guard_policy_stale_reload{policy="live"} 0.0' in officer["metrics_after"]


def test_the_history_api_keeps_every_version_served_and_compares_two(
        officer: dict[str, Any]) -> None:
    base = officer["base"]
    assert get(base, "/v1/guard/policies/history", CLIENT_KEY).status_code == 403
    r = get(base, "/v1/guard/policies/history?policy=live", AUDITOR_KEY)
    assert r.status_code == 200, r.text
    history = r.json()
    versions = [(v["policy_id"], v["version"], v["sha256"]) for v in history["data"]]
    assert versions == [("live", 2, sha(live_policy(2, 0.9))),
                        ("live", 1, sha(live_policy(1, 0.6)))]
    assert history["data"][1]["first_by"].startswith("start on ")
    assert history["data"][0]["first_by"].startswith("reload on ")
    assert [(e["event"], e["change"], e["version"]) for e in reversed(history["events"])] == [
        ("start", "loaded", 1), ("reload", "stale", 1), ("reload", "updated", 2)]
    everything = get(base, "/v1/guard/policies/history", AUDITOR_KEY).json()
    assert {(v["policy_id"], v["version"]) for v in everything["data"]} >= {
        ("kids", 3), ("live", 1), ("live", 2), ("default", load_policy(
            POLICIES_DIR / "default.yaml").version)}
    kids = [v for v in everything["data"] if v["policy_id"] == "kids"]
    assert [v["sha256"] for v in kids] == [sha(KIDS, live_policy(2, 0.9)),
                                           sha(KIDS, live_policy(1, 0.6))]

    a, b = versions[1][2], versions[0][2]
    compared = get(base, f"/v1/guard/policies/history?a={a}&b={b}", AUDITOR_KEY).json()
    assert [(c["effect"], c["text"]) for c in compared["diff"]["changes"]] == [
        ("neutral", "version: 1 -> 2"),
        ("looser", "violence: edited from score 0.90 (was 0.60): acts on fewer prompts and "
                   "images")]
    missing = get(base, f"/v1/guard/policies/history?a={a}&b={'0' * 64}", AUDITOR_KEY)
    assert missing.status_code == 404 and missing.json()["error"]["type"]


@pytest.mark.browser
def test_the_policy_history_page_in_chromium(officer: dict[str, Any]) -> None:
    from tests.test_review_page import CHROMIUM, screenshot, sign_in

    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (make install-test installs it)")
    from playwright.sync_api import sync_playwright

    base = officer["base"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
        sign_in(page, base, AUDITOR_KEY)
        page.goto(f"{base}/guard/policies?policy=live")
        rows = page.locator("#versions tbody tr")
        assert rows.count() == 2
        assert rows.nth(0).inner_text().split("\t")[:2] == ["live", "2"]
        events = page.locator("#events tbody tr")
        assert events.count() == 3 and "stale" in events.nth(1).inner_text()
        page.select_option("#a", sha(live_policy(1, 0.6)))
        page.select_option("#b", sha(live_policy(2, 0.9)))
        page.click(".filters button[type=submit]")
        diff = page.inner_text("#diff")
        assert "live v1" in diff and "live v2" in diff and "version: 1 -> 2" in diff
        assert "looser" in diff
        shot = screenshot(page, "policy_history.png")
        assert shot.stat().st_size > 10_000
        page.goto(f"{base}/guard/policies?a={'0' * 64}&b={'1' * 64}")
        assert "No such policy version" in page.inner_text("[role=alert]")
        browser.close()


# --- PostgreSQL ---------------------------------------------------------------------------------

@pytest.mark.postgres
def test_the_history_tables_on_postgresql() -> None:
    from guard.audit.policies import PolicyHistory, Served
    from guard.plugins import build_store
    from tests.services import PG_DSN, drop_schemas, require_postgres

    dsn = require_postgres(PG_DSN)
    schema = f"t_{uuid.uuid4().hex[:12]}"

    async def run() -> tuple[list[dict[str, Any]], tuple[str, int, str] | None]:
        store = build_store({"kind": "postgres", "dsn": dsn, "schema": schema})
        try:
            history = PolicyHistory.of(store)
            assert history is not None
            await history.record("start", "replica-a", [
                Served("house", "loaded", 1, "a" * 64, "id: house\nversion: 1\n")])
            await history.record("reload", "replica-b", [
                Served("house", "updated", 2, "b" * 64, "id: house\nversion: 2\n"),
                Served("house", "loaded", 1, "a" * 64, "id: house\nversion: 1\n")])
            return await history.versions("house"), await history.content("a" * 64)
        finally:
            await store.aclose()
            await drop_schemas(dsn, schema)

    versions, content = asyncio.run(run())
    assert [(v["version"], v["first_by"], len(v["served"])) for v in versions] == [
        (2, "reload on replica-b", 1), (1, "start on replica-a", 2)]
    assert content == ("house", 1, "id: house\nversion: 1\n")
