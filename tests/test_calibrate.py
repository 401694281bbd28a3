"""`safeedit policy calibrate`: thresholds from labelled items, from a self-contained CSV and from
the labels kept in the audit store beside traces sent through the real proxy."""

from __future__ import annotations

import asyncio
import csv
import re
from pathlib import Path

import openai
import pytest
import yaml

from guard.audit.sqlite import SQLiteStore
from guard.cli import main
from guard.core.labels import Label
from guard.core.policy import POLICIES_DIR, load_policy
from guard.offline.calibrate import Point, curve, wilson
from tests.conftest import CLIENT_KEY

DEFAULT = str(POLICIES_DIR / "default.yaml")
V = load_policy(DEFAULT).version  # the shipped default's version, whatever it is now
# violence, labelled: 20 unsafe items scored 0.61, 0.63, ..., 0.99; 20 safe ones, 16 scored
# 0.10..0.40 and 4 close to the threshold (0.62, 0.64, 0.66, 0.68). At the current threshold
# (0.6) precision is 20/24; precision reaches 0.9 (18 of 20) at thresholds in (0.64, 0.65]:
# 0.645 is proposed, the middle of that gap.
UNSAFE = [round(0.61 + 0.02 * k, 2) for k in range(20)]
SAFE = [round(0.10 + 0.02 * k, 2) for k in range(16)] + [0.62, 0.64, 0.66, 0.68]


def labels_csv(path: Path, unsafe=UNSAFE, safe=SAFE) -> Path:  # type: ignore[no-untyped-def]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["trace_id", "slot", "round", "verdict", "category", "score_violence",
                    "score_sexual"])
        for i, s in enumerate(unsafe):  # flagged at 0.6 when s >= 0.6: all of them
            w.writerow([f"tr_u{i}", 0, 1, "correct", "", s, 0.0])
        for i, s in enumerate(safe):
            flagged = s >= 0.6
            w.writerow([f"tr_s{i}", 0, 1, "false_positive" if flagged else "correct",
                        "violence" if flagged else "", s, 0.0])
    return path


def test_wilson_interval_and_curve_by_hand() -> None:
    low, high = wilson(18, 20)
    assert (round(low, 3), round(high, 3)) == (0.699, 0.972)
    assert wilson(0, 0) == (0.0, 1.0)
    assert curve([(0.2, False), (0.7, True), (0.9, True), (0.0, True)]) == [
        Point(0.2, 2, 1, 1, 0), Point(0.7, 2, 0, 1, 1), Point(0.9, 1, 0, 2, 1)]


def test_a_precision_measured_on_few_flagged_items_decides_nothing() -> None:
    from guard.offline.calibrate import Target, calibrate
    from guard.offline.labelled import LabelledItem

    def item(score: float, unsafe: bool) -> LabelledItem:
        return LabelledItem("tr", 0, 1, "missed" if unsafe else "correct",
                            "violence" if unsafe else None, {"violence": score}, ())

    # 20 unsafe and 20 safe items mixed at 0.5; only the two scored 0.99 are all unsafe
    items = [item(0.5, k % 2 == 0) for k in range(38)] + [item(0.99, True), item(0.99, True)]
    (violence,) = [r for r in calibrate(load_policy(DEFAULT), items, Target("precision", 0.9))
                   .results if r.category == "violence"]
    assert violence.status == "too_few" and violence.proposed is None
    assert violence.note == ("precision >= 0.90 is reached only where fewer than 10 labelled "
                             "items are flagged (2 at threshold 0.99): too few labels to "
                             "decide. Threshold kept.")


def test_target_precision_from_a_self_contained_csv(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    code = main(["policy", "calibrate", "--policy", DEFAULT, "--labels",
                 str(labels_csv(tmp_path / "labels.csv")), "--target-precision", "0.9",
                 "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"Calibration of default v{V} for precision >= 0.90 on 40 labelled item(s)" in printed
    # 20 unsafe, 20 safe; 0.6 -> 0.645; precision 18/18+2 with its 95% interval; recall 0.9;
    # four labelled items (scores 0.61-0.64) would now pass
    assert re.search(r"violence\s+20\s+20\s+0\.6\s+0\.645\s+0\.90 \[0\.70-0\.97\]\s+0\.90\s+0\.10"
                     r"\s+4\s+proposed", printed), printed
    assert re.search(r"sexual\s+0\s+40\s+0\.5\s+-.*too few", printed)
    assert ("sexual: too few labels to decide: 0 unsafe and 40 safe item(s); at least 10 of "
            "each are needed. Threshold kept.") in printed
    assert "the precision could be 0.70 (95% interval 0.70-0.97 on 20 item(s))" in printed

    proposed = out / "proposed.yaml"
    policy = load_policy(proposed)
    assert policy.id == "default" and policy.version == V + 1
    assert policy.categories["violence"].threshold == 0.645
    assert policy.categories["sexual"].threshold == 0.5
    assert policy.terms == load_policy(DEFAULT).terms  # everything else as it was
    text = proposed.read_text()
    assert "#   violence: threshold 0.6 -> 0.645" in text
    # The original file, comments and layout kept: only the threshold and version moved.
    original = Path(DEFAULT).read_text()
    body = text.split("\n\n", 1)[1]
    assert body == original.replace(f"\nversion: {V}\n", f"\nversion: {V + 1}\n").replace(
        "  violence:\n    threshold: 0.6\n", "  violence:\n    threshold: 0.645\n")
    assert main(["policy", "validate", str(proposed)]) == 0
    assert f"ok (default v{V + 1}" in capsys.readouterr().out

    report = (out / "report.html").read_text()
    # curves for violence, the one category with unsafe and safe items; notes for the others
    assert report.count("<svg") == 1 and "<script" not in report
    assert report.count("too few labels to decide") == 7
    assert 'style="' not in report.split("</style>", 1)[1]
    row = re.search(r'<tr id="row-violence">(.*?)</tr>', report, re.S)[1]  # type: ignore[index]
    assert re.sub(r"<[^>]+>|\s+", " ", row).split() == [
        "violence", "20", "20", "0.6", "0.645", "0.90", "0.90", "0.10", "0.70–0.97", "4",
        "proposed"]
    assert "Precision against recall" in report and "threshold (score at which it is flagged)" \
        in report


def test_max_false_positive_rate_and_too_few_labels(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    assert main(["policy", "calibrate", "--policy", DEFAULT, "--labels",
                 str(labels_csv(tmp_path / "labels.csv")), "--max-false-positive-rate", "0.05",
                 "--out", str(out)]) == 0
    # at most 1 of 20 safe items flagged: above 0.66 (only 0.68 stays above), 0.665
    assert load_policy(out / "proposed.yaml").categories["violence"].threshold == 0.665
    assert re.search(r"violence\s+20\s+20\s+0\.6\s+0\.665\s+0\.050 \[0\.009-0\.236\]",
                     capsys.readouterr().out)  # small rates with three decimals

    few = labels_csv(tmp_path / "few.csv", unsafe=UNSAFE[:4], safe=SAFE[-5:])
    assert main(["policy", "calibrate", "--policy", DEFAULT, "--labels", str(few),
                 "--target-precision", "0.9", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert ("violence: too few labels to decide: 4 unsafe and 5 safe item(s); at least 10 of "
            "each are needed. Threshold kept.") in printed
    kept = load_policy(out / "proposed.yaml")
    # Nothing changed: the version is not raised, the file is the original under the header.
    assert kept.version == V and kept.categories["violence"].threshold == 0.6
    assert f"no threshold changed (see report.html for why); version stays {V}" in \
        (out / "proposed.yaml").read_text()
    assert (out / "proposed.yaml").read_text().split("\n\n", 1)[1] == Path(DEFAULT).read_text()


def test_bad_labels_files_are_clear_errors(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.csv"
    bad.write_text("trace_id,verdict\ntr_1,correct\n")
    args = ["policy", "calibrate", "--policy", DEFAULT, "--target-precision", "0.9", "--out",
            str(tmp_path / "out"), "--labels"]
    assert main([*args, str(bad)]) == 2
    assert "needs the columns trace_id, slot, round, verdict, category (missing: slot, round, " \
           "category)" in capsys.readouterr().err
    bad.write_text("trace_id,slot,round,verdict,category,score_violence\ntr_1,0,1,missed,,0.2\n")
    assert main([*args, str(bad)]) == 2
    assert "bad.csv:2: a 'missed' label needs the category" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, str(bad), "--target-precision", "1.5"])


def test_labels_from_the_store_beside_traces_sent_through_the_proxy(  # type: ignore[no-untyped-def]
        e2e, tmp_path, capsys) -> None:
    base, backend = e2e
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=CLIENT_KEY, max_retries=0)
    ids = []
    for plan in (["red"], ["blue"], ["blue"], ["blue"]):  # edited, then three passed
        backend.plan += [plan] + ([["blue"]] if plan == ["red"] else [])
        raw = client.images.with_raw_response.generate(prompt="a quiet harbour")
        ids.append(raw.headers["x-guard-trace-id"])

    async def label() -> None:
        store = SQLiteStore(tmp_path / "audit.db")
        try:
            # the red image (violence 0.97) was fine; a blue one was violent after all
            await store.add_label(Label(trace_id=ids[0], slot=0, round=1, key_id="audit",
                                        verdict="false_positive", category="violence"))
            await store.add_label(Label(trace_id=ids[1], slot=0, round=1, key_id="audit",
                                        verdict="missed", category="violence"))
            for trace_id in ids[2:]:
                await store.add_label(Label(trace_id=trace_id, slot=0, round=1,
                                            key_id="audit", verdict="correct"))
        finally:
            await store.aclose()

    asyncio.run(label())
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"audit": {"kind": "sqlite",
                                                "path": str(tmp_path / "audit.db")}}))
    out = tmp_path / "out"
    assert main(["policy", "calibrate", "--policy", str(tmp_path / "e2e.yaml"), "--labels",
                 "store", "--config", str(config), "--target-precision", "0.8", "--out",
                 str(out), "--min-labels", "1"]) == 0
    printed = capsys.readouterr().out
    assert "Calibration of e2e v7 for precision >= 0.80 on 4 labelled item(s)" in printed
    # the one unsafe item scored 0 and the one safe item 0.97: no threshold separates them
    assert "violence: no threshold reaches precision >= 0.80 on these labels." in printed
    # Nothing changed: the proposal keeps version 7, and replays like the running policy.
    assert "Replay under e2e v7" in printed and "4 trace(s) re-decided, 0 would change" \
        in printed
    assert load_policy(out / "proposed.yaml").version == 7
    assert "Stored requests" in (out / "report.html").read_text()

    # A CSV naming items by trace id only: scores read from the same store.
    by_id = tmp_path / "by_id.csv"
    by_id.write_text("trace_id,slot,round,verdict,category\n"
                     f"{ids[0]},0,1,correct,\n{ids[1]},0,1,correct,\ntr_gone,0,1,correct,\n"
                     f"{ids[2]},3,1,correct,\n")
    assert main(["policy", "calibrate", "--policy", str(tmp_path / "e2e.yaml"), "--labels",
                 str(by_id), "--config", str(config), "--target-precision", "0.8", "--out",
                 str(out), "--min-labels", "1"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"violence\s+1\s+1\s+0\.6\s+-\s+1\.00 \[0\.21-1\.00\]\s+1\.00\s+0\.00\s+0"
                     r"\s+unchanged", printed), printed
    assert "1 label(s) skipped: no such item in its trace" in printed
    assert "1 label(s) skipped: trace not in the audit store" in printed
