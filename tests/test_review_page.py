"""The auditors' review pages in a real headless Chromium (Debian's, driven by Playwright), in
front of the real proxy: sign-in, the filtered list, a trace round by round, tenant scoping, and
forged requests. Saves screenshots under tests/artifacts/."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import AUDITOR_KEY, CLIENT_KEY, OTHER_AUDITOR_KEY, write_policy

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"
XSS_PROMPT = "<script>alert(1)</script><img src=x onerror=alert(2)> a cat"
POLICY = """
id: review
version: 7
extends: default
image_retention: flagged
terms:
  violence:
    strong: [bloodbath]
    rewrites: {bloodbath: water balloon fight}
    append: ""
  hate:
    strong: [hateflag]
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (make install-test installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"])
        yield b
        b.close()


@pytest.fixture
def site(proxy, tmp_path: Path, fake_backend) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """The proxy with four traces: edited over two rounds (its unsafe image retained), refused,
    passed, and one whose prompt is an XSS attempt."""
    write_policy(tmp_path, POLICY)
    base = proxy(policy="review", audit={"kind": "sqlite", "path": str(tmp_path / "audit.db"),
                                          "images_dir": str(tmp_path / "images")})
    backend = fake_backend[0]
    ids = {}
    for name, prompt, plan in (("passed", "a bowl of fruit", [["blue"]]),
                               ("edited", "a street at night", [["red"], ["blue"]]),
                               ("refused", "a poster with a hateflag", []),
                               ("xss", XSS_PROMPT, [["blue"]])):
        backend.plan += plan
        r = httpx.post(f"{base}/v1/images/generations", json={"prompt": prompt},
                       headers={"authorization": f"Bearer {CLIENT_KEY}"}, timeout=30)
        ids[name] = r.headers["x-guard-trace-id"]
    return {"base": base, "ids": ids}


def sign_in(page: Any, base: str, key: str) -> None:
    page.goto(f"{base}/guard/")
    assert page.url == f"{base}/guard/login"
    page.fill("#key", key)
    page.click("button[type=submit]")


def screenshot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / ".gitignore").write_text("*\n")
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def test_auditor_reviews_a_trace_round_by_round(browser, site) -> None:  # type: ignore[no-untyped-def]
    base, ids = site["base"], site["ids"]
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))

    sign_in(page, base, CLIENT_KEY)
    assert "cannot open the review pages" in page.inner_text("[role=alert]")
    page.fill("#key", "sk-not-a-key")
    page.click("button[type=submit]")
    assert page.inner_text("[role=alert]") == "That key is not valid."
    page.fill("#key", AUDITOR_KEY)
    page.click("button[type=submit]")
    assert page.url == f"{base}/guard/"
    (session,) = [c for c in context.cookies() if c["name"] == "safeedit_review"]
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    assert AUDITOR_KEY not in session["value"]

    rows = page.locator("#traces tbody tr")
    assert rows.count() == 4
    assert rows.nth(0).locator("a").inner_text() == ids["xss"]  # newest first
    page.select_option("select[name=decision]", "edited")
    page.click(".filters button[type=submit]")
    assert rows.count() == 1 and "decision=edited" in page.url
    assert rows.nth(0).locator(".badge").inner_text() == "edited"
    screenshot(page, "review_list.png")

    page.click(f"text={ids['edited']}")
    assert page.url == f"{base}/guard/traces/{ids['edited']}"
    assert "review version 7" in page.inner_text("#policy")
    cards = page.locator("section[data-slot='0'] article.round")
    assert cards.count() == 2
    first, second = cards.nth(0), cards.nth(1)
    # Round 1: the unsafe image, retained, shown as a real (decoded) thumbnail.
    thumb = first.locator(".thumb img")
    assert thumb.evaluate("img => img.complete && img.naturalWidth") == 64
    violence = first.locator("tr[data-category='violence']")
    assert "crossed" in (violence.get_attribute("class") or "")
    assert re.fullmatch(r"violence ✖\s+0\.970\s+0\.60 edit", violence.inner_text().strip())
    refined = first.locator(".refined").inner_text()
    # Round 2 ran on the refined prompt; its safe image was hashed, not kept.
    assert second.locator(".prompt").inner_text() == refined != "a street at night"
    assert "not retained" in second.locator(".thumb").inner_text()
    assert re.search(r"backend \d+\.\d ms", second.inner_text())
    assert "judge" in second.inner_text() and "pass" in second.locator("h3").inner_text()
    shot = screenshot(page, "review_trace.png")
    assert shot.stat().st_size > 10_000

    # Untrusted text is shown as text: no script runs, no element is injected.
    page.goto(f"{base}/guard/traces/{ids['xss']}")
    assert XSS_PROMPT in page.inner_text("dd.prompt")
    assert page.locator("main script, main img[src=x]").count() == 0
    assert dialogs == []

    page.click("header button")  # sign out
    assert page.url == f"{base}/guard/login"
    page.goto(f"{base}/guard/")
    assert page.url == f"{base}/guard/login"
    context.close()


def test_other_tenant_sees_nothing(browser, site) -> None:  # type: ignore[no-untyped-def]
    base, ids = site["base"], site["ids"]
    context = browser.new_context()
    page = context.new_page()
    sign_in(page, base, OTHER_AUDITOR_KEY)
    assert "No traces match" in page.inner_text("main") and "tenant globex" in page.inner_text("h1")
    response = page.goto(f"{base}/guard/traces/{ids['edited']}")
    assert response.status == 404 and "no such trace" in page.inner_text("main")
    trace = httpx.get(f"{base}/v1/guard/traces/{ids['edited']}",
                      headers={"authorization": f"Bearer {AUDITOR_KEY}"}).json()
    sha = trace["rounds"][1]["images"][0]["image_sha256"]
    # With this session's cookie, the image of another tenant's trace is not served either.
    image = context.request.get(f"{base}/guard/traces/{ids['edited']}/images/{sha}")
    assert image.status == 404
    context.close()


def test_forged_requests_are_refused(site) -> None:  # type: ignore[no-untyped-def]
    base, ids = site["base"], site["ids"]
    with httpx.Client(base_url=base) as client:
        # No CSRF token bound to this browser: refused, no session issued.
        r = client.post("/guard/login", data={"key": AUDITOR_KEY, "csrf": "x"})
        assert r.status_code == 403 and "safeedit_review" not in r.cookies
        # A real form token, but the POST comes from another site.
        form = client.get("/guard/login")
        token = re.search(r'name="csrf" value="([^"]+)"', form.text)[1]  # type: ignore[index]
        r = client.post("/guard/login", data={"key": AUDITOR_KEY, "csrf": token},
                        headers={"origin": "https://evil.example"})
        assert r.status_code == 403 and "safeedit_review" not in r.cookies
        r = client.post("/guard/login", data={"key": AUDITOR_KEY, "csrf": token})
        assert r.status_code == 303 and r.cookies.get("safeedit_review")
        assert client.get(f"/guard/traces/{ids['edited']}").status_code == 200
        # A session cookie altered by hand is not a session.
        value = client.cookies["safeedit_review"]
        client.cookies.set("safeedit_review", value[:-2] + ("AA" if value[-2:] != "AA" else "BB"),
                           path="/guard")
        r = client.get(f"/guard/traces/{ids['edited']}")
        assert r.status_code == 303 and r.headers["location"] == "/guard/login"
    page = httpx.get(f"{base}/guard/login")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp
    assert page.headers["x-frame-options"] == "DENY"


def test_the_stylesheet_is_sent_verbatim(browser, proxy) -> None:  # type: ignore[no-untyped-def]
    base = proxy()
    html = httpx.get(f"{base}/guard/login").text
    style = re.search(r'<style nonce="[^"]+">(.*?)</style>', html, re.S)
    assert style is not None and '"Segoe UI"' in style[1] and "&#34;" not in style[1]
    # Escaped, the `font` declaration was invalid and the page fell back to a serif font.
    page = browser.new_page()
    page.goto(f"{base}/guard/login")
    assert page.evaluate("getComputedStyle(document.body).fontFamily").startswith("system-ui")
    assert page.evaluate("getComputedStyle(document.body).fontSize") == "14px"
    page.close()
