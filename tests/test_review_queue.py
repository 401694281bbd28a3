"""Labelling on the review pages and the review queue, in a real headless Chromium in front of
the real proxy: labels from the trace page's forms (and their history), the queue's order,
count, sample and filters, forged label posts. (The queue's SQL on both stores: test_labels.)"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from guard.audit.labels import sample_point
from tests.conftest import AUDITOR_KEY, CLIENT_KEY, OTHER_AUDITOR_KEY, write_policy
from tests.test_review_page import POLICY, browser, screenshot, sign_in  # noqa: F401

pytestmark = pytest.mark.browser
PASSED = 6


@pytest.fixture
def site(proxy, tmp_path: Path, fake_backend) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """The proxy with a refused trace, an edited one (two rounds) and PASSED passed ones."""
    write_policy(tmp_path, POLICY)
    base = proxy(policy="review", audit={"kind": "sqlite", "path": str(tmp_path / "audit.db")})
    backend = fake_backend[0]
    ids: dict[str, Any] = {"passed": []}
    plans = [("refused", "a poster with a hateflag", []),
             ("edited", "a street at night", [["red"], ["blue"]]),
             *(("passed", f"a bowl of fruit number {i}", [["blue"]]) for i in range(PASSED))]
    for name, prompt, plan in plans:
        backend.plan += plan
        r = httpx.post(f"{base}/v1/images/generations", json={"prompt": prompt},
                       headers={"authorization": f"Bearer {CLIENT_KEY}"}, timeout=30)
        if name == "passed":
            ids["passed"].append(r.headers["x-guard-trace-id"])
        else:
            ids[name] = r.headers["x-guard-trace-id"]
    return {"base": base, "ids": ids}


def _queue(page: Any) -> list[str]:
    return [a.inner_text() for a in page.locator("#queue tbody tr td:nth-child(2) a").all()]


def _left(page: Any) -> int:
    return int(page.inner_text("#left b"))


def test_auditor_works_through_the_queue(browser, site) -> None:  # type: ignore[no-untyped-def] # noqa: F811
    base, ids = site["base"], site["ids"]
    sampled = [i for i in reversed(ids["passed"]) if sample_point(i) < 0.1]  # newest first
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    sign_in(page, base, AUDITOR_KEY)
    page.click("header a[href='/guard/queue']")
    assert page.url == f"{base}/guard/queue"
    # Refused first, then edited, then the passed ones in the default 10% sample.
    assert _queue(page) == [ids["refused"], ids["edited"], *sampled]
    assert _left(page) == 2 + len(sampled)
    assert f"{len(sampled)} passed (a 10% sample" in page.inner_text("#left")

    page.fill("input[name=sample]", "100")
    page.click(".filters button[type=submit]")
    assert _queue(page) == [ids["refused"], ids["edited"], *reversed(ids["passed"])]
    assert _left(page) == 2 + PASSED
    page.select_option("select[name=category]", "violence")
    page.click(".filters button[type=submit]")
    assert _queue(page) == [ids["edited"]] and _left(page) == 1
    page.goto(f"{base}/guard/queue?sample=100&policy_version=8")
    assert _queue(page) == [] and _left(page) == 0
    assert "Nothing left to label" in page.inner_text("main")
    page.goto(f"{base}/guard/queue?sample=300")
    assert "Invalid 'sample'" in page.inner_text("[role=alert]")
    page.goto(f"{base}/guard/queue?sample=100")
    screenshot(page, "review_queue.png")

    # Label the edited trace's first-round image: a false positive.
    page.click(f"text={ids['edited']}")
    card = page.locator("section[data-slot='0'] article[data-round='1']")
    card.locator("select[name=verdict]").select_option("false_positive")
    card.locator("select[name=category]").select_option("violence")
    card.locator("textarea[name=note]").fill("a red <b>wall</b>, not blood")
    card.locator("form.label-form button").click()
    assert page.url == f"{base}/guard/traces/{ids['edited']}#item-0-1"
    current = card.locator(".labels p.current")
    assert current.count() == 1
    assert re.match(r"false positive · violence\s+· audit · \d{4}-", current.inner_text())
    assert "a red <b>wall</b>, not blood" in current.inner_text()  # shown as text
    # On second thought: correct. The earlier label stays, marked superseded.
    card.locator("select[name=verdict]").select_option("correct")
    card.locator("form.label-form button").click()
    assert card.locator(".labels p.current").inner_text().startswith("correct")
    assert card.locator(".labels p.superseded").inner_text().startswith("false positive")
    # A miss needs its category: the form says so, and nothing is saved.
    round2 = page.locator("section[data-slot='0'] article[data-round='2']")
    round2.locator("select[name=verdict]").select_option("missed")
    round2.locator("form.label-form button").click()
    assert "needs the 'category'" in page.inner_text("main")
    page.go_back()
    screenshot(page, "review_labels.png")

    # The refused trace: its prompt (the prescreen) is the item to label.
    page.goto(f"{base}/guard/traces/{ids['refused']}")
    prompt = page.locator("article[data-round='0']")
    prompt.locator("select[name=verdict]").select_option("correct")
    prompt.locator("form.label-form button").click()
    assert page.url.endswith("#item-prompt-0")
    assert prompt.locator(".labels p.current").inner_text().startswith("correct")

    page.goto(f"{base}/guard/queue?sample=100")
    assert _queue(page) == list(reversed(ids["passed"])) and _left(page) == PASSED
    labels = httpx.get(f"{base}/v1/guard/labels", params={"all": "true"},
                       headers={"authorization": f"Bearer {AUDITOR_KEY}"}).json()["data"]
    assert [(i["verdict"], i["superseded"]) for i in labels] == [
        ("correct", False), ("correct", False), ("false_positive", True)]
    assert labels[2]["note"] == "a red <b>wall</b>, not blood"
    context.close()

    other = browser.new_context()
    page = other.new_page()
    sign_in(page, base, OTHER_AUDITOR_KEY)
    page.goto(f"{base}/guard/queue?sample=100")
    assert _queue(page) == [] and _left(page) == 0
    other.close()


def test_forged_label_posts_are_refused(site) -> None:  # type: ignore[no-untyped-def]
    base, ids = site["base"], site["ids"]
    target = f"/guard/traces/{ids['edited']}/labels"
    fields = {"slot": "0", "round": "1", "verdict": "missed", "category": "violence"}
    with httpx.Client(base_url=base) as client:
        form = client.get("/guard/login")
        token = re.search(r'name="csrf" value="([^"]+)"', form.text)[1]  # type: ignore[index]
        client.post("/guard/login", data={"key": AUDITOR_KEY, "csrf": token})
        trace_page = client.get(f"/guard/traces/{ids['edited']}")
        csrf = re.search(r'name="csrf" value="([^"]+)"', trace_page.text)[1]  # type: ignore[index]
        assert client.post(target, data={**fields, "csrf": "x"}).status_code == 403
        r = client.post(target, data={**fields, "csrf": csrf},
                        headers={"origin": "https://evil.example"})
        assert r.status_code == 403
        assert 'data-verdict="missed"' not in client.get(f"/guard/traces/{ids['edited']}").text
        r = client.post(target, data={**fields, "csrf": csrf})
        assert r.status_code == 303 and r.headers["location"].endswith("#item-0-1")
        assert 'data-verdict="missed"' in client.get(f"/guard/traces/{ids['edited']}").text
        queue = client.get("/guard/queue")
        assert "script-src" not in queue.headers["content-security-policy"]
    # Without the session cookie: to the sign-in page, nothing saved.
    r = httpx.post(base + target, data={**fields, "csrf": csrf})
    assert r.status_code == 303 and r.headers["location"] == "/guard/login"

