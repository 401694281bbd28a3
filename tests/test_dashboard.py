"""The dashboard in a real headless Chromium, in front of the real proxy: requests of two tenants
sent with the openai SDK, labels kept in the real audit store, every chart showing the seeded
counts, tenant scoping, and the page's script-free CSP. Full-page screenshots are saved under
tests/artifacts/ (kept by CI as the test output; their paths are printed)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from guard.audit.sqlite import SQLiteStore
from guard.core.config import hash_key
from guard.core.labels import Label
from guard.core.types import JudgedImage, RoundRecord, Trace
from guard.review.dashboard import (
    MAX_BUCKETS,
    Rate,
    aggregate,
    bucket_size,
    label_rates,
    percentile,
)
from tests.conftest import (
    ADMIN_KEY,
    AUDITOR_KEY,
    CLIENT_KEY,
    E2E_POLICY,
    OTHER_AUDITOR_KEY,
    test_keys,
    write_policy,
)
from tests.test_review_page import CHROMIUM, screenshot, sign_in

pytestmark = pytest.mark.browser
GLOBEX_CLIENT_KEY = "sk-client-globex"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (make install-test installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        yield b
        b.close()


@pytest.fixture
def seeded(proxy, tmp_path: Path, fake_backend) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """acme: two passed, one edited over two rounds, one refused by the prescreen; globex: three
    refused. Two labels on acme's items: a false positive (violence) and a miss (sexual)."""
    write_policy(tmp_path, E2E_POLICY)
    keys = [*test_keys(), {"id": "gapp", "hash": hash_key(GLOBEX_CLIENT_KEY), "role": "client",
                           "tenant": "globex"}]
    base = proxy(policy="e2e", keys=keys)
    backend = fake_backend[0]
    acme = openai.OpenAI(base_url=f"{base}/v1", api_key=CLIENT_KEY, max_retries=0)
    globex = openai.OpenAI(base_url=f"{base}/v1", api_key=GLOBEX_CLIENT_KEY, max_retries=0)
    ids: dict[str, str] = {}
    for name, prompt, plan in (("passed", "a bowl of fruit", [["blue"]]),
                               ("passed2", "a red bicycle", [["blue"]]),
                               ("edited", "a street at night", [["red"], ["blue"]])):
        backend.plan += plan
        raw = acme.images.with_raw_response.generate(prompt=prompt)
        ids[name] = raw.headers["x-guard-trace-id"]
    with pytest.raises(openai.BadRequestError):
        acme.images.generate(prompt="a poster with a hateflag")
    for _ in range(3):
        with pytest.raises(openai.BadRequestError):
            globex.images.generate(prompt="a hateflag on a wall")

    async def label() -> None:
        store = SQLiteStore(tmp_path / "audit.db")
        try:
            await store.add_label(Label(trace_id=ids["edited"], slot=0, round=1,
                                        verdict="false_positive", category="violence",
                                        key_id="audit"))
            await store.add_label(Label(trace_id=ids["passed"], slot=0, round=1,
                                        verdict="missed", category="sexual", key_id="audit"))
        finally:
            await store.aclose()

    # Playwright's sync API holds this thread's event loop: the store runs on its own thread.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, label()).result()
    return {"base": base, "ids": ids}


def chart(page: Any, name: str) -> str:
    """The text of one chart's SVG (titles, axis labels, bar labels, legend)."""
    svg = page.locator(f"#chart-{name} svg")
    assert svg.count() == 1, f"no {name} chart"
    return " ".join(svg.locator("text").all_text_contents())


def test_auditor_reads_the_charts_of_their_tenant(browser, seeded) -> None:  # type: ignore[no-untyped-def]
    base = seeded["base"]
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    sign_in(page, base, AUDITOR_KEY)
    page.click("header a[href='/guard/dashboard']")
    response = page.goto(f"{base}/guard/dashboard")
    assert response.status == 200
    csp = response.headers["content-security-policy"]
    assert "script-src" not in csp and "unsafe-inline" not in csp
    assert page.locator("script").count() == 0
    assert "Dashboard · tenant acme" in page.inner_text("h1")
    assert re.sub(r"\s+", " ", page.inner_text("#totals")) == (
        "4 requests 2 passed 1 edited 1 refused 0 failed 2 labelled items")

    over_time = chart(page, "over_time")
    assert "Requests per day, by decision" in over_time
    assert len(re.findall(r"\d{4}-\d\d-\d\d", over_time)) in (7, 8)  # every day of the week
    assert "passed (2)" in over_time and "edited (1)" in over_time
    assert "refused (1)" in over_time and "failed" not in over_time

    flags = chart(page, "flags")
    assert "Flags per category, by what was done" in flags
    assert re.search(r"\bviolence\b", flags) and re.search(r"\bhate\b", flags)
    assert "edited" in flags and "refused" in flags

    rounds = chart(page, "rounds")
    # refused before any image: 1; one round: the two passed; two rounds: the edited one
    assert re.search(r"none \(refused first\) 1 2 .*1 2 1", rounds), rounds

    latency = chart(page, "latency")
    assert "judge (per call)" in latency and "image backend (per round)" in latency
    assert re.search(r"\d+ ms", latency)

    policies = chart(page, "policies")
    assert "e2e v7" in policies and policies.count("25% (1 of 4)") == 2  # refused, edited

    labels = chart(page, "labels")
    assert "What reviewers found (2 labelled items)" in labels
    # violence: its one flagged item was fine; sexual: its one unsafe item passed
    assert "false positives: 100% (1 of 1)" in labels and "misses: 100% (1 of 1)" in labels
    # Colours are presentation attributes (the CSP allows no style attributes) and are the
    # decisions' own: passed green, refused red.
    svg = page.locator("#chart-over_time svg").inner_html()
    assert 'style="' not in svg and 'fill="#1f7a3d"' in svg and 'fill="#b3261e"' in svg
    bar = page.locator("#chart-over_time svg path[fill='#1f7a3d']").first
    assert bar.evaluate("p => getComputedStyle(p).fill") == "rgb(31, 122, 61)"

    shot = screenshot(page, "dashboard_acme.png")
    assert shot.stat().st_size > 30_000
    print(f"dashboard screenshot: {shot}")
    context.close()


def test_other_tenant_and_admin_see_their_own_numbers(browser, seeded) -> None:  # type: ignore[no-untyped-def]
    base = seeded["base"]
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    sign_in(page, base, OTHER_AUDITOR_KEY)
    page.goto(f"{base}/guard/dashboard?tenant=acme")  # asking for acme changes nothing
    assert "tenant globex" in page.inner_text("h1")
    assert re.sub(r"\s+", " ", page.inner_text("#totals")).startswith(
        "3 requests 0 passed 0 edited 3 refused")
    assert "refused (3)" in chart(page, "over_time")
    assert "100% (3 of 3)" in chart(page, "policies")
    assert page.locator("#chart-labels").count() == 0  # acme's labels are not globex's
    assert "No labelled items" in page.inner_text("#no-labels")
    print(f"dashboard screenshot: {screenshot(page, 'dashboard_globex.png')}")
    context.close()

    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    sign_in(page, base, ADMIN_KEY)
    page.goto(f"{base}/guard/dashboard")
    assert re.sub(r"\s+", " ", page.inner_text("#totals")).startswith("7 requests 2 passed")
    page.fill("input[name=tenant]", "globex")
    page.click(".filters button[type=submit]")
    assert "tenant=globex" in page.url
    assert re.sub(r"\s+", " ", page.inner_text("#totals")).startswith("3 requests")
    context.close()


def test_window_and_errors_are_said_in_words(seeded) -> None:  # type: ignore[no-untyped-def]
    base = seeded["base"]
    with httpx.Client(base_url=base, timeout=60) as client:
        assert client.get("/guard/dashboard").headers["location"] == "/guard/login"
        form = client.get("/guard/login")
        token = re.search(r'name="csrf" value="([^"]+)"', form.text)[1]  # type: ignore[index]
        client.post("/guard/login", data={"key": AUDITOR_KEY, "csrf": token})
        future = client.get("/guard/dashboard", params={"since": "2999-01-01"})
        assert future.status_code == 200 and "No requests in this window." in future.text
        bad = client.get("/guard/dashboard", params={"since": "last tuesday"})
        assert bad.status_code == 400 and "since" in bad.text and "<svg" not in bad.text
        ok = client.get("/guard/dashboard")
        assert ok.text.count("<svg") == 6 and "<script" not in ok.text
        # Windows no chart can show are refused in words, never a 500 or a dropped connection.
        for since in ("1e308", "253402300800", "1e18", "99999999999w"):
            far = client.get("/guard/dashboard", params={"since": since})
            assert far.status_code == 400 and "outside the times" in far.text, since
        decade = client.get("/guard/dashboard", params={"since": "3650d"})
        assert decade.status_code == 200 and decade.text.count("<svg") == 6


# --- the aggregation alone ------------------------------------------------------------------

def _trace(decision: str, rounds: list[RoundRecord], at: float = 0.0) -> Trace:
    return Trace(decision=decision, rounds=rounds, created_at=at,
                 policy={"id": "p", "version": 1}, duration_ms=10.0)


def test_aggregate_counts_what_a_reader_expects() -> None:
    now = time.time()
    flagged = JudgedImage(slot=0, prompt="x", flagged=["violence"], action="edit",
                          scores={"violence": 0.9})
    clean = JudgedImage(slot=0, prompt="x")
    traces = [
        _trace("edited", [RoundRecord(index=1, kind="generate", backend_ms=100, judge_ms=5,
                                      images=[flagged]),
                          RoundRecord(index=2, kind="generate", backend_ms=300, judge_ms=7,
                                      images=[clean])], now),
        _trace("passed", [RoundRecord(index=1, kind="generate", backend_ms=200, judge_ms=6,
                                      images=[clean])], now - 3 * 86400),
    ]
    f = aggregate(traces, now - 7 * 86400, now)
    assert f.bucket_s == 86400 and len(f.over_time) == 2
    assert f.rounds == {2: 1, 1: 1} and f.flags == {"violence": {"edit": 1}}
    assert f.percentiles("backend") == {50: 200, 90: 300, 99: 300}
    assert f.policies == {"p v1": {"edited": 1, "passed": 1}}
    assert percentile([], 50) == 0.0 and str(Rate(1, 4)) == "25% (1 of 4)"


@pytest.mark.parametrize("days", [3, 30, 400, 3650, 20000])
def test_a_long_window_gets_coarser_buckets_never_more_than_400(days: int) -> None:
    size = bucket_size(0, days * 86400)
    assert size % 86400 == 0 and days * 86400 / size <= MAX_BUCKETS
    assert size == 86400 or days * 86400 / (size - 86400) > MAX_BUCKETS  # as fine as it can be


def test_label_rates_say_false_positives_of_flagged_and_misses_of_unsafe() -> None:
    def item(verdict: str, flagged: tuple[str, ...], category: str | None = None) -> Any:
        from guard.offline.labelled import LabelledItem

        return LabelledItem("tr", 0, 1, verdict, category, {}, flagged)

    items = [item("correct", ("violence",)), item("false_positive", ("violence",), "violence"),
             item("missed", (), "violence"), item("correct", ())]
    rates = label_rates(items, ["violence", "sexual"])
    assert [str(r) for r in rates["violence"]] == ["50% (1 of 2)", "50% (1 of 2)"]
    assert "sexual" not in rates  # nothing flagged or unsafe in it
    assert [str(r) for r in rates["all categories"]] == ["50% (1 of 2)", "50% (1 of 2)"]
