"""Auditors triage at a glance (issue 22): the trace list's and the queue's prompt, endpoint, model
and category columns and their filters (`q`, `endpoint`, `decision`, `category`, `key_id`,
`policy`, `policy_version`) on SQLite (FTS5 and LIKE) and PostgreSQL (full-text search), through
`GET /v1/guard/traces` of the real proxy and in Chromium; `image_retention:
flagged_and_delivered` and the true reason for every absent image; the trace page's rounds side
by side; the label form; an auditor's own failed call left out of the dashboard's figures.

Screenshots go to tests/artifacts/triage/ (the path is printed)."""

from __future__ import annotations

import asyncio
import io
import re
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from guard.audit.images import RetainedImages
from guard.audit.search import words
from guard.audit.sql import SQLStore
from guard.core.policy.loader import load_policies
from guard.core.types import JudgedImage, RoundRecord, SlotResult, Trace
from guard.imagestore.postgres import PostgresImageStore
from guard.plugins import TraceQuery, build_store
from guard.review import absence
from guard.review.dashboard import Figures, Rate, chart_labels, chart_policies
from guard.support.errors import RequestError
from guard.testing import MemoryImageStore
from tests.conftest import ADMIN_KEY, AUDITOR_KEY, CLIENT_KEY, write_policy
from tests.services import PG_DSN, drop_schemas, require_postgres
from tests.test_review_page import browser, sign_in  # noqa: F401 - browser: a fixture

ARTIFACTS = Path(__file__).parent / "artifacts" / "triage"
POLICY = """
id: triage
version: 3
extends: default
terms:
  violence:
    strong: [bloodbath]
    rewrites: {bloodbath: water balloon fight}
    append: ""
  hate:
    strong: [hateflag]
"""


def _png(rgb: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), rgb).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def audit(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Audit options: a fresh SQLite file, or a fresh PostgreSQL schema (dropped afterwards)."""
    if request.param == "sqlite":
        yield {"kind": "sqlite", "path": str(tmp_path / "audit.db"),
               "images_dir": str(tmp_path / "images")}
        return
    dsn = require_postgres(PG_DSN)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    yield {"kind": "postgres", "dsn": dsn, "schema": schema,
           "images_dir": str(tmp_path / "images")}

    asyncio.run(drop_schemas(dsn, schema))


def _traffic(base: str, backend: Any) -> dict[str, str]:
    """Five requests of tenant acme: passed, edited over two rounds, refused, an edit, and an
    auditor's own call of the images API (refused for its role); their trace ids by name."""
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=CLIENT_KEY, max_retries=0)
    ids = {}
    for name, prompt, plan in (("beach", "A cat on the beach at sunset", [["blue"]]),
                               ("edited", "a street at night", [["red"], ["blue"]]),
                               ("refused", "a poster with a hateflag", [])):
        backend.plan += plan
        try:
            headers = client.images.with_raw_response.generate(prompt=prompt,
                                                               model="dall-e-3").headers
        except openai.APIStatusError as exc:  # refused: the trace id comes all the same
            headers = exc.response.headers
        ids[name] = headers["x-guard-trace-id"]
    edited = client.images.with_raw_response.edit(
        image=("in.png", _png((0, 90, 200)), "image/png"), prompt="make the beach sky purple")
    ids["edit"] = edited.headers["x-guard-trace-id"]
    r = httpx.post(f"{base}/v1/images/generations", json={"prompt": "does this work"},
                   headers={"authorization": f"Bearer {AUDITOR_KEY}"}, timeout=30)
    assert r.status_code == 403
    ids["auditor"] = r.headers["x-guard-trace-id"]
    return ids


def _listed(base: str, **params: str) -> list[str]:
    r = httpx.get(f"{base}/v1/guard/traces", params=params,
                  headers={"authorization": f"Bearer {AUDITOR_KEY}"})
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["data"]]


def test_the_api_filters_by_prompt_words_endpoint_and_more(  # type: ignore[no-untyped-def]
        proxy, tmp_path: Path, fake_backend, audit: dict[str, Any]) -> None:
    write_policy(tmp_path, POLICY)
    base = proxy(policy="triage", audit=audit)
    ids = _traffic(base, fake_backend[0])
    everything = _listed(base)
    assert set(everything) == set(ids.values())

    def found(**params: str) -> set[str]:
        return {name for name, id_ in ids.items() if id_ in _listed(base, **params)}

    # Every word must begin a word of the prompt, in any order and case.
    assert found(q="beach") == {"beach", "edit"}
    assert found(q="BEACH cat") == {"beach"}
    assert found(q="sunset bea") == {"beach"}
    assert found(q="purple sunset") == set()
    assert found(endpoint="edits") == {"edit"}
    assert found(endpoint="/v1/images/generations") == {"beach", "edited", "refused", "auditor"}
    assert found(decision="edited") == {"edited"}
    assert found(category="hate") == {"refused"}
    assert found(key_id="audit") == {"auditor"}
    assert found(policy="triage", policy_version="3") == {"beach", "edited", "refused", "edit"}
    assert found(policy="triage", policy_version="4") == set()
    assert found(q="beach", endpoint="generations", decision="passed") == {"beach"}
    summary = httpx.get(f"{base}/v1/guard/traces", params={"q": "street"},
                        headers={"authorization": f"Bearer {AUDITOR_KEY}"}).json()["data"][0]
    assert summary["prompt"] == "a street at night"
    assert summary["endpoint"] == "/v1/images/generations" and summary["model"] == "dall-e-3"
    assert summary["categories"] == ["violence"]
    # flagged_and_delivered (the default policy's): the flagged image and the one delivered in
    # its place are kept; nothing of a request without a flag.
    def refs(name: str) -> list[str | None]:
        trace = httpx.get(f"{base}/v1/guard/traces/{ids[name]}",
                          headers={"authorization": f"Bearer {AUDITOR_KEY}"}).json()
        return [i["image_ref"] for r in trace["rounds"] if r["kind"] != "prescreen"
                for i in r["images"]]

    assert len(refs("edited")) == 2 and all(refs("edited"))
    assert refs("beach") == [None] and refs("edit") == [None]
    for name, value in (("q", "%_%"), ("endpoint", "variations"), ("q", "w " * 17)):
        r = httpx.get(f"{base}/v1/guard/traces", params={name: value},
                      headers={"authorization": f"Bearer {AUDITOR_KEY}"})
        assert r.status_code == 400 and r.json()["error"]["param"] == name
    r = httpx.get(f"{base}/v1/guard/traces", params={"policy": "a", "policy_id": "b"},
                  headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 400


def _trace(prompt: str, endpoint: str = "/v1/images/generations") -> Trace:
    return Trace(endpoint=endpoint, request={"prompt": prompt}, decision="passed", tenant="acme",
                 policy={"id": "default", "version": 1, "sha256": "x"})


async def test_older_traces_are_found_and_like_agrees_with_full_text(
        audit: dict[str, Any]) -> None:
    """Traces written before the search table had their rows (an older version) are found after
    the first search fills them in; SQLite's LIKE fallback finds what FTS5 finds."""
    prompts = ["Nude beach at noon", "a beachball", "ünïcode café sign", "100% off_sale",
               "two dogs\x00and a nul"]
    store = build_store(audit)
    assert isinstance(store, SQLStore)
    for p in prompts:
        await store.write(_trace(p))
    await store.write(_trace("an edited sky", "/v1/images/edits"))
    if audit["kind"] == "sqlite":
        await store.dialect.fetch("DELETE FROM trace_search")
        await store.dialect.fetch("INSERT INTO trace_search_fts (trace_search_fts)"
                                  " VALUES ('rebuild')")
    else:
        await store.dialect.fetch("DELETE FROM trace_search")
    await store.aclose()

    store = build_store(audit)  # a process of this version starts on the older rows
    assert isinstance(store, SQLStore)
    try:
        async def found(**filters: Any) -> list[str]:
            page = await store.query(TraceQuery(**filters))
            return sorted(t["prompt"] for t in page.items)

        assert await found(q="beach") == ["Nude beach at noon", "a beachball"]
        assert await found(q="nud BEACH") == ["Nude beach at noon"]
        assert await found(q="off sale 100") == ["100% off_sale"]
        assert await found(q="nul dogs") == ["two dogs\x00and a nul"]
        assert await found(q="café") == ["ünïcode café sign"]
        assert await found(endpoint="/v1/images/edits") == ["an edited sky"]
        if audit["kind"] == "sqlite":
            fts = {w: await found(q=w) for w in ("beach", "off sale", "nud", "dogs a")}
            store.dialect.prompt_match = None  # as on an SQLite built without FTS5
            assert {w: await found(q=w) for w in fts} == fts
    finally:
        await store.aclose()


def test_prompt_words_refuse_wildcards_alone() -> None:
    assert words(" Nude, BEACH!  at_noon ") == ["nude", "beach", "at", "noon"]
    for q in ("%", "_", "   ", "x" * 501, "a " * 17):
        with pytest.raises(RequestError) as caught:
            words(q)
        assert caught.value.param == "q"


# --- why an image is absent --------------------------------------------------------------------

def _judged_trace(policy: Any, flagged: bool, *, delivered: bool, ref: str | None,
                  request_flagged: bool = True) -> Trace:
    sha = "ab" * 32
    image = JudgedImage(slot=0, prompt="p", image_sha256=sha, image_ref=ref,
                        flagged=["violence"] if flagged else [])
    return Trace(policy=policy.ref, categories=["violence"] if request_flagged else [],
                 rounds=[RoundRecord(index=1, kind="generate", images=[image])],
                 results=[SlotResult(slot=0, decision="edited" if delivered else "refused",
                                     rounds=1, prompt="p", image_sha256=sha)])


async def test_every_absent_image_says_why(tmp_path: Path) -> None:
    write_policy(tmp_path, "id: hashes\nversion: 1\nextends: default\nimage_retention: none\n")
    policies = load_policies([Path(__file__).parent.parent / "policies", tmp_path]).policies
    default, strict, hashes = policies["default"], policies["strict"], policies["hashes"]
    assert default.image_retention == "flagged_and_delivered"
    store = MemoryImageStore()
    images = RetainedImages(store, ttl_days=30)

    async def why(trace: Trace, images: RetainedImages | None = images) -> str:
        found = await absence.round_images(trace, trace.rounds[0].images, policies, images)
        return found.absent.get("ab" * 32, "shown")

    assert await why(_judged_trace(hashes, True, delivered=False, ref=None)) == (
        "not retained: hash only by policy (image_retention: none)")
    assert await why(_judged_trace(strict, False, delivered=True, ref=None)) == (
        "not retained: not flagged (image_retention: flagged)")
    unflagged = _judged_trace(default, False, delivered=True, ref=None, request_flagged=False)
    assert await why(unflagged) == (
        "not retained: its request had no flag (image_retention: flagged_and_delivered)")
    assert await why(_judged_trace(default, False, delivered=False, ref=None)) == (
        "not retained: neither flagged nor delivered (image_retention: flagged_and_delivered)")
    assert "kept no images when this trace was written" in await why(
        _judged_trace(default, True, delivered=False, ref=None))
    other = _judged_trace(default, True, delivered=False, ref=None)
    other.policy = {"id": "gone", "version": 2, "sha256": "cd" * 32}
    assert "policy gone version 2 (this sha256) is not loaded" in await why(other)

    kept = _judged_trace(default, True, delivered=False, ref="ab/" + "ab" * 32)
    assert await why(kept, None) == ("retained, but this proxy's audit store keeps no images "
                                     "now (audit images_dir: null)")
    assert await why(kept) == "purged by retention: copies are kept 30 days (audit image_ttl_days)"
    data = _png((255, 0, 0))
    sha = await store.put(data, "image/png", 30 * 86400)
    for r in kept.rounds[0].images:
        r.image_sha256, r.image_ref = sha, RetainedImages.ref(sha)
    found = await absence.round_images(kept, kept.rounds[0].images, policies, images)
    assert found.shown == {sha}
    down = RetainedImages(PostgresImageStore("postgresql://nobody@127.0.0.1:1/none",
                                             command_timeout_s=2))
    try:
        found = await absence.round_images(kept, kept.rounds[0].images, policies, down)
        assert found.absent[sha].startswith("image store unavailable")
    finally:
        await down.aclose()


# --- the pages in Chromium -------------------------------------------------------------------

def _shot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS.parent / ".gitignore").write_text("*\n")
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


@pytest.mark.browser
def test_auditor_triages_in_chromium(browser, proxy, tmp_path: Path,  # type: ignore[no-untyped-def] # noqa: F811
                                     fake_backend) -> None:
    write_policy(tmp_path, POLICY)
    base = proxy(policy="triage", audit={"kind": "sqlite", "path": str(tmp_path / "audit.db"),
                                         "images_dir": str(tmp_path / "images")})
    ids = _traffic(base, fake_backend[0])
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    sign_in(page, base, AUDITOR_KEY)

    # The list: what was asked, where and how, without opening a trace.
    heads = page.locator("#traces thead th").all_inner_texts()
    assert heads[:7] == ["Time (UTC)", "Trace", "Decision", "Prompt", "Endpoint", "Model",
                         "Categories"]
    row = page.locator("#traces tbody tr", has=page.locator(f"a:text-is('{ids['edited']}')"))
    assert row.locator(".prompt-cell").inner_text() == "a street at night"
    assert row.locator(".endpoint").inner_text() == "generations"
    assert "dall-e-3" in row.inner_text() and "violence" in row.locator(".cats").inner_text()
    assert row.locator(".policy").inner_text() == "triage v3"
    _shot(page, "list.png")
    page.fill("input[name=q]", "beach")
    page.select_option("select[name=endpoint]", "edits")
    page.click(".filters button[type=submit]")
    assert "q=beach" in page.url and "endpoint=edits" in page.url
    links = page.locator("#traces tbody tr td:nth-child(2) a").all_inner_texts()
    assert links == [ids["edit"]]
    assert page.input_value("input[name=q]") == "beach"
    _shot(page, "list_filtered.png")

    # The queue: the same columns and filters.
    page.goto(f"{base}/guard/queue?q=street")
    assert page.locator("#queue tbody tr td:nth-child(2) a").all_inner_texts() == [ids["edited"]]
    assert page.locator("#queue .prompt-cell").inner_text() == "a street at night"
    page.goto(f"{base}/guard/queue?decision=refused")
    assert page.locator("#queue tbody tr td:nth-child(2) a").all_inner_texts() == [ids["refused"]]
    _shot(page, "queue.png")

    # The edited trace: its rounds side by side across the width, each image kept
    # (flagged, and delivered in its place).
    page.goto(f"{base}/guard/traces/{ids['edited']}")
    cards = page.locator("section[data-slot='0'] article.round")
    assert cards.count() == 2
    first, second = cards.nth(0).bounding_box(), cards.nth(1).bounding_box()
    main = page.locator("main").bounding_box()
    assert first["width"] > 550 and second["width"] > 550  # noqa: PLR2004
    assert abs(first["y"] - second["y"]) < 1 and second["x"] >= first["x"] + first["width"]
    assert first["width"] + second["width"] > 0.9 * (main["width"] - 40)
    thumbs = [cards.nth(i).locator(".thumb img") for i in (0, 1)]
    assert [t.evaluate("img => img.complete && img.naturalWidth") for t in thumbs] == [64, 64]
    a, b = (t.bounding_box() for t in thumbs)
    assert abs(a["y"] - b["y"]) < 1 and b["x"] > a["x"] + a["width"]
    assert "refined by" in cards.nth(1).locator(".from").inner_text()
    threshold = cards.nth(0).locator("tr[data-category='violence'] td").nth(3)
    assert threshold.bounding_box()["height"] < 24  # noqa: PLR2004 - "0.60 edit" on one line
    _shot(page, "trace_edited.png")

    # The label form chooses nothing for the auditor, and an error leads back to the trace.
    form = cards.nth(0).locator("form.label-form")
    assert form.locator("select[name=verdict]").input_value() == ""
    assert form.evaluate("f => f.checkValidity()") is False
    form.locator("button[type=submit]").click()
    assert page.url == f"{base}/guard/traces/{ids['edited']}"  # the browser asked for a choice
    form.locator("select[name=verdict]").evaluate("s => s.removeAttribute('required')")
    form.locator("button[type=submit]").click()
    assert page.locator("h1").inner_text() == "Label not saved"
    assert page.locator("#back").get_attribute("href") == f"/guard/traces/{ids['edited']}"
    _shot(page, "label_error.png")
    page.click("#back")
    form = page.locator("section[data-slot='0'] article.round").nth(0).locator("form.label-form")
    form.locator("select[name=verdict]").select_option("false_positive")
    form.locator("button[type=submit]").click()
    assert "false positive" in page.locator("#item-0-1 .label.current").inner_text()

    # A passed request kept nothing, and the page says why.
    page.goto(f"{base}/guard/traces/{ids['beach']}")
    assert page.locator(".thumb .absent").inner_text().startswith(
        "not retained: its request had no flag (image_retention: flagged_and_delivered)")
    _shot(page, "trace_passed.png")

    # The auditor's own refused call: no policy to speak of, and not in the failed figures.
    page.goto(f"{base}/guard/traces/{ids['auditor']}")
    assert "the request ended before a policy was chosen" in page.inner_text("#policy")
    assert "not loaded" not in page.inner_text("main")
    page.goto(f"{base}/guard/dashboard")
    totals = page.inner_text("#totals")
    assert re.search(r"\b4\s+requests", totals) and re.search(r"\b0\s+failed", totals), totals
    assert page.locator("#chart-labels").count() == 1
    _shot(page, "dashboard.png")
    context.close()


def _tick_labels(svg: str) -> list[str]:
    return re.findall(r"<text[^>]*>([^<]*)</text>", svg)


def test_percentage_axes_stop_at_100() -> None:
    f = Figures(since=0, until=3600, bucket_s=3600)
    f.labels = {"violence": (Rate(3, 3), Rate(1, 4)), "all categories": (Rate(3, 3), Rate(1, 4))}
    f.labelled = 7
    f.policies = {"triage v3": Counter(refused=5, passed=0)}
    for svg in (chart_labels(f), chart_policies(f)):
        texts = " ".join(_tick_labels(svg))
        assert "100% (3 of 3)" in texts or "100% (5 of 5)" in texts
        numbers = [int(n) for n in re.findall(r"(?<![\d(])(\d{2,3})(?![\d%])", texts)]
        assert numbers and max(numbers) == 100, texts
