"""`safeedit policy replay`: which stored requests a candidate policy would decide differently,
worked out from the scores the traces recorded, read from a real SQLite audit store."""

from __future__ import annotations

import asyncio
import csv
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from guard.audit.sqlite import SQLiteStore
from guard.cli import main
from guard.core.policy import Policy
from guard.core.policy.loader import load_file
from guard.core.types import JudgedImage, RoundRecord, SlotResult, Trace, TraceError
from guard.offline.replay import redecide
from tests.conftest import CLIENT_KEY

HOUSE = """\
id: house
version: 1
categories:
  sexual: {threshold: 0.5, action: edit}
  violence: {threshold: 0.6, action: edit}
  hate: {threshold: 0.5, action: refuse}
rounds: {max: 3, on_exhausted: refuse}
on_judge_error: allow
"""
NOW = time.time()
REF = {"id": "house", "version": 1, "sha256": "0" * 64}


def judged(slot: int, prompt: str, scores: dict[str, float], action: str,
           refined: str | None = None, **kw: Any) -> JudgedImage:
    flagged = [c for c, s in scores.items() if s >= {"sexual": 0.5, "violence": 0.6,
                                                     "hate": 0.5}[c]]
    return JudgedImage(slot=slot, prompt=prompt, judge_id="vlm", scores=scores, flagged=flagged,
                       action=action, refined_prompt=refined, **kw)


def trace(tid: str, prompt: str, rounds: list[RoundRecord], decision: str, *, ago: float = 60,
          n: int = 1, error: TraceError | None = None, **kw: Any) -> Trace:
    results = [] if decision in ("refused", "failed") else [
        SlotResult(slot=s, decision=decision, rounds=1, prompt=prompt)  # type: ignore[arg-type]
        for s in range(n)]
    return Trace(id=tid, created_at=NOW - ago, tenant="acme", key_id="app", model="gpt-image-1",
                 request={"prompt": prompt, **({"n": n} if n > 1 else {})}, policy=REF,
                 rounds=rounds, results=results, decision=decision, error=error,
                 status=error.status if error else 200, **kw)


def prescreen(prompt: str, scores: dict[str, float], action: str,
              refined: str | None = None) -> RoundRecord:
    return RoundRecord(index=0, kind="prescreen", images=[judged(0, prompt, scores, action,
                                                                 refined)])


def generate(k: int, *images: JudgedImage, error: str | None = None) -> RoundRecord:
    return RoundRecord(index=k, kind="generate", backend="fake", images=list(images), error=error)


REFUSED = TraceError(status=400, type="invalid_request_error", code="content_policy_violation",
                     message="rejected")

# What the proxy recorded under house v1, one request per way a request can go.
TRACES = [
    trace("tr_fruit", "a bowl of fruit", [
        prescreen("a bowl of fruit", {}, "pass"),
        generate(1, judged(0, "a bowl of fruit", {"sexual": 0.2, "violence": 0.1}, "pass"))],
        "passed"),
    trace("tr_brawl", "a bar brawl", [
        prescreen("a bar brawl", {"violence": 0.95}, "edit", refined="a lively bar"),
        generate(1, judged(0, "a lively bar", {"violence": 0.2}, "pass"))], "edited"),
    trace("tr_duel", "two knights at dawn", [
        prescreen("two knights at dawn", {"violence": 0.3}, "pass"),
        generate(1, judged(0, "two knights at dawn", {"violence": 0.7}, "edit",
                           refined="two knights bowing at dawn")),
        generate(2, judged(0, "two knights bowing at dawn", {"violence": 0.1}, "pass"))],
        "edited"),
    trace("tr_flag", "a poster with a hate symbol", [
        prescreen("a poster with a hate symbol", {"hate": 0.8}, "refuse")], "refused",
        error=REFUSED),
    trace("tr_unjudged", "a red sunset", [
        prescreen("a red sunset", {}, "pass"),
        generate(1, JudgedImage(slot=0, prompt="a red sunset",
                                judge_id="(judge failed; allowed by policy)", action="pass"),
                 error="judge error: JudgeCrashed")], "passed"),
    trace("tr_twins", "two portraits", [
        prescreen("two portraits", {}, "pass"),
        generate(1, judged(0, "two portraits", {}, "pass"),
                 judged(1, "two portraits", {"sexual": 0.55}, "edit",
                        refined="two portraits, fully clothed")),
        generate(2, judged(1, "two portraits, fully clothed", {"sexual": 0.52}, "edit",
                           refined="two formal portraits")),
        generate(3, judged(1, "two formal portraits", {"sexual": 0.1}, "pass"))],
        "edited", n=2),
    trace("tr_badkey", "", [], "failed", error=TraceError(
        status=401, type="invalid_request_error", code="invalid_api_key", message="bad key")),
    trace("tr_lastyear", "a bar brawl", [
        prescreen("a bar brawl", {"violence": 0.95}, "edit", refined="a lively bar"),
        generate(1, judged(0, "a lively bar", {"violence": 0.2}, "pass"))], "edited",
        ago=400 * 86400),
]


@pytest.fixture
def audit_db(tmp_path: Path) -> Path:
    db = tmp_path / "audit.db"

    async def write() -> None:
        store = SQLiteStore(db)
        for t in TRACES:
            await store.write(t.model_copy(deep=True))
        await store.aclose()

    asyncio.run(write())
    return db


def candidate(tmp_path: Path, **changes: Any) -> Path:
    raw = yaml.safe_load(HOUSE)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = raw
        for p in parents:
            node = node[p]
        node[last] = value
    path = tmp_path / "candidate" / "house.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def policy(path: Path) -> Policy:
    loaded = load_file(path)
    assert not loaded.errors, loaded.errors
    return next(iter(loaded.policies.values()))


def replayed(p: Policy) -> dict[str, tuple[str, str, str]]:
    out = {}
    for t in TRACES[:6]:
        r = redecide(t, p)
        out[t.id] = (r.new_text, r.changed, r.reason)
    return out


def test_the_recorded_policy_reproduces_every_recorded_decision(tmp_path: Path) -> None:
    rows = replayed(policy(candidate(tmp_path)))
    assert {tid: (new, changed) for tid, (new, changed, _) in rows.items()} == {
        "tr_fruit": ("passed", "no"), "tr_brawl": ("edited", "no"), "tr_duel": ("edited", "no"),
        "tr_flag": ("refused", "no"), "tr_unjudged": ("passed", "no"),
        "tr_twins": ("edited", "no")}


def test_cli_lists_requests_that_would_change_as_a_table_and_a_csv(
        tmp_path: Path, audit_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The candidate refuses violence instead of editing it, from 0.65, and fails closed.
    path = candidate(tmp_path, categories__violence={"threshold": 0.65, "action": "refuse"},
                     on_judge_error="refuse", version=2)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"audit": {"kind": "sqlite", "path": str(audit_db)}}))
    out_csv = tmp_path / "replay.csv"
    code = main(["policy", "replay", "--candidate", str(path), "--config", str(config),
                 "--since", "30d", "--csv", str(out_csv)])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith(f"Traces read from SQLite file {audit_db.resolve()}, from the audit: "
                          f"of {config}.\n")
    lines = out.splitlines()[1:]
    assert lines[0].startswith("Replay under house v2 (sha256 ")
    assert lines[0].endswith("): 6 trace(s) re-decided, 3 would change.")
    assert lines[1:5] == [
        "      2  edited -> refused",
        "      1  passed -> failed",
        "      1  skipped: not judged (invalid_api_key)",
        "",
    ]
    assert lines[5].split() == ["trace", "time", "(UTC)", "tenant", "policy", "was", "now",
                                "changed", "why", "prompt"]
    end = lines.index("", 6)
    table = {line.split()[0]: line for line in lines[6:end]}
    assert lines[end + 1:] == [f"CSV of all 6 replayed trace(s): {out_csv}"]
    assert set(table) == {"tr_brawl", "tr_duel", "tr_unjudged"}
    assert "prescreen: violence 0.95 >= 0.65 -> refuse (was edit)" in table["tr_brawl"]
    assert "round 1 image 0: violence 0.7 >= 0.65 -> refuse (was edit)" in table["tr_duel"]
    assert "round 1: the judge failed and the candidate fails closed" in table["tr_unjudged"]

    rows = {r["trace_id"]: r for r in csv.DictReader(out_csv.open())}
    assert set(rows) == {"tr_fruit", "tr_brawl", "tr_duel", "tr_flag", "tr_unjudged",
                         "tr_twins"}  # last year's trace is before --since
    assert rows["tr_brawl"] | {"created_at": ""} == {
        "trace_id": "tr_brawl", "created_at": "", "tenant": "acme", "key_id": "app",
        "model": "gpt-image-1", "policy_id": "house", "policy_version": "1",
        "policy_sha256": "0" * 64, "old_decision": "edited", "new_decision": "refused",
        "exact": "yes", "changed": "yes",
        "reason": "prescreen: violence 0.95 >= 0.65 -> refuse (was edit)",
        "prompt": "a bar brawl"}
    assert rows["tr_fruit"]["changed"] == "no" and rows["tr_twins"]["changed"] == "no"


def test_a_higher_threshold_lets_an_edited_image_through_untouched(tmp_path: Path) -> None:
    rows = replayed(policy(candidate(tmp_path, categories__violence={
        "threshold": 0.75, "action": "edit"})))
    assert rows["tr_duel"] == ("passed", "yes",
                               "round 1 image 0: violence 0.7 < 0.75 -> pass (was edit)")
    # The prescreen still edits the brawl into the prompt the trace recorded: nothing changes.
    assert rows["tr_brawl"][:2] == ("edited", "no")


def test_fewer_rounds_or_dropping_decide_the_slow_slot(tmp_path: Path) -> None:
    rows = replayed(policy(candidate(tmp_path, rounds={"max": 2, "on_exhausted": "refuse"})))
    assert rows["tr_twins"] == ("refused", "yes", "still unsafe after 2 round(s)")
    rows = replayed(policy(candidate(tmp_path, rounds={"max": 2, "on_exhausted": "drop"})))
    # One portrait is returned, the other dropped: the request counts as refused, as it would.
    assert rows["tr_twins"][:2] == ("refused", "yes")


def test_a_step_the_trace_never_took_gives_the_possible_outcomes(tmp_path: Path) -> None:
    rows = replayed(policy(candidate(tmp_path, categories__sexual={
        "threshold": 0.15, "action": "edit"})))
    # The fruit bowl's image would now be edited, but round 2 was never made: it ends edited or
    # refused, and either way not as recorded.
    assert rows["tr_fruit"] == ("edited or refused", "yes",
                                "round 1 image 0: sexual 0.2 >= 0.15 -> edit (was pass); "
                                "image 0 of round 2 would be generated from 'a bowl of fruit'; "
                                "when recorded it was never generated, so its verdict is not "
                                "known")
    rows = replayed(policy(candidate(
        tmp_path, categories__hate={"threshold": 0.5, "action": "edit"},
        terms={"hate": {"strong": ["hate symbol"], "rewrites": {"hate symbol": "peace sign"}}})))
    # The hate poster would be rewritten and generated; the trace has no image to judge.
    assert rows["tr_flag"][:2] == ("edited or refused", "not known")


# --- traces written by the real proxy -----------------------------------------------------------

PROXY_HOUSE = """\
id: house
version: 1
categories:
  violence: {threshold: 0.6, action: edit}
  hate: {threshold: 0.5, action: refuse}
on_judge_error: allow
terms:
  violence: {strong: [brawl], rewrites: {brawl: dance}}
"""


def test_replay_agrees_with_the_engine_on_traces_the_proxy_wrote(
        proxy, fake_backend, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "house.yaml").write_text(PROXY_HOUSE)
    base = proxy(policy="house", policy_reload_s=0)
    backend = fake_backend[0]
    # Colours the marker judge reads: red = violence 0.97, green = hate 0.99, black = it crashes.
    backend.plan = [["blue"], ["blue"], ["red"], ["blue"], ["blue", "green"], ["black"]]
    asked = {"fruit": ("a bowl of fruit", 1), "brawl": ("a bar brawl", 1),
             "street": ("a street at night", 1), "park": ("two views of a park", 2),
             "lake": ("a lake at dawn", 1)}
    ids = {}
    for name, (prompt, n) in asked.items():
        r = httpx.post(f"{base}/v1/images/generations", json={"prompt": prompt, "n": n},
                       headers={"authorization": f"Bearer {CLIENT_KEY}"}, timeout=30)
        ids[r.headers["x-guard-trace-id"]] = name

    async def traces() -> list[Trace]:
        store = SQLiteStore(tmp_path / "audit.db")
        try:
            return [t for t in [await store.get(i) for i in ids] if t is not None]
        finally:
            await store.aclose()

    stored = asyncio.run(traces())
    assert {ids[t.id]: t.decision for t in stored} == {
        "fruit": "passed", "brawl": "edited", "street": "edited", "park": "refused",
        "lake": "passed"}

    def under(text: str) -> dict[str, tuple[str, str]]:
        path = tmp_path / "candidate" / "house.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        p = policy(path)
        return {ids[t.id]: (redecide(t, p).new_text, redecide(t, p).changed) for t in stored}

    same = under(PROXY_HOUSE)
    assert all(changed == "no" for _, changed in same.values()), same
    stricter = under(PROXY_HOUSE.replace("{threshold: 0.6, action: edit}",
                                         "{threshold: 0.6, action: refuse}")
                     .replace("on_judge_error: allow", "on_judge_error: refuse"))
    assert stricter == {"fruit": ("passed", "no"), "brawl": ("refused", "yes"),
                        "street": ("refused", "yes"), "park": ("refused", "no"),
                        "lake": ("failed", "yes")}
