"""`safeedit policy explain` and `safeedit policy diff`: what a policy does and what a change does,
in words, with `extends` resolved, so a compliance officer never has to read Python."""

from __future__ import annotations

from pathlib import Path

import pytest

from guard.cli import main

BASE = """\
id: base
version: 1
categories:
  sexual: {threshold: 0.5, action: edit, description: nudity and sexual content}
  violence: {threshold: 0.6, action: edit}
  hate: {threshold: 0.5, action: refuse}
  minors: {threshold: 0.1, action: refuse}
terms:
  violence: {strong: [bloodbath, massacre], rewrites: {bloodbath: water balloon fight}}
"""

KIDS = """\
id: kids
version: 3
extends: base
description: For the children's storybook app.
categories:
  sexual: {threshold: 0.3}
  violence: {action: refuse}
rounds: {max: 2, on_exhausted: drop}
"""


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(["policy", *argv])
    return code, capsys.readouterr().out


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "base.yaml").write_text(BASE)
    (tmp_path / "kids.yaml").write_text(KIDS)
    return tmp_path


def test_explain_says_what_is_refused_edited_rounds_and_judge_failure(
        folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = cli(capsys, "explain", str(folder / "kids.yaml"))
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "Policy 'kids', version 3"
    assert lines[1] == f"  file: {folder / 'kids.yaml'}; extends base ({folder / 'base.yaml'})"
    assert lines[3] == "  For the children's storybook app."
    refused = lines.index("Refused (never edited; the client gets HTTP 400 "
                          "content_policy_violation):")
    edited = lines.index("Edited (the prompt is refined and the image made again):")
    # violence became a refusal in kids; where each half of the rule comes from is shown.
    assert lines[refused + 1:edited - 1] == [
        "  minors    score 0.10 or more  (from base)",
        "  hate      score 0.50 or more  (from base)",
        "  violence  score 0.60 or more  (threshold from base, action from kids)",
    ]
    assert lines[edited + 1] == ("  sexual  score 0.30 or more - nudity and sexual content  "
                                 "(threshold from kids, action from base)")
    assert "Rounds: at most 2 generations per image, the first included (up to 1 edit)." in lines
    assert ("Still unsafe after round 2, or when nothing new is left to try: that image is "
            "dropped and the safe ones are returned (refused if none is left).") in lines
    assert ("When the judge fails: the request is refused (HTTP 503, fail closed). "
            "(built-in default)") in lines
    assert "  violence  2 strong terms, 1 rewrite" in lines


def test_explain_of_a_broken_file_shows_the_problems_instead(
        folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (folder / "kids.yaml").write_text(KIDS.replace("on_exhausted: drop", "on_exhausted: skip"))
    code = main(["policy", "explain", str(folder / "kids.yaml")])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err.startswith(f"{folder / 'kids.yaml'}:8:32: error: rounds.on_exhausted: got 'skip'; "
                          "allowed: one of refuse, drop")


def test_diff_lists_effective_changes_in_words_marked_stricter_or_looser(
        folder: Path, tmp_path_factory: pytest.TempPathFactory,
        capsys: pytest.CaptureFixture[str]) -> None:
    new = tmp_path_factory.mktemp("new") / "kids.yaml"
    new.write_text("""\
id: kids
version: 4
extends: base
description: For the children's storybook app.
categories:
  sexual: {threshold: 0.2}
  violence: {action: edit, threshold: 0.7}
  weapons: {threshold: 0.5, action: refuse}
rounds: {max: 3, on_exhausted: refuse}
on_judge_error: allow
terms:
  violence: {strong: [massacre, gunfight], rewrites: {bloodbath: pillow fight}}
""")
    (new.parent / "base.yaml").write_text(BASE)
    code, out = cli(capsys, "diff", str(folder / "kids.yaml"), str(new))
    assert code == 1
    assert out.splitlines() == [
        f"kids v3 ({folder / 'kids.yaml'}) -> kids v4 ({new})",
        "  [neutral] version: 3 -> 4",
        "  [stricter] sexual: edited from score 0.20 (was 0.30): acts on more prompts and images",
        "  [looser] violence: edited at score 0.70 or more (was refused at score 0.60 or more)",
        "  [stricter] new category 'weapons': refused at score 0.50 or more",
        "  [neutral] rounds: at most 3 (was 2): more attempts to edit before giving up, fewer "
        "refusals, more latency",
        "  [stricter] still unsafe after the last round: the whole request is refused (was: that "
        "image is dropped and the safe ones are returned (refused if none is left))",
        "  [looser] when the judge fails: images are returned unjudged (fail open; the trace "
        "records it) (was: the request is refused (HTTP 503, fail closed))",
        '  [stricter] violence: strong terms added: "gunfight"',
        '  [looser] violence: strong terms removed: "bloodbath"',
        '  [neutral] violence: "bloodbath" is now rewritten to "pillow fight" (was "water balloon '
        'fight")',
        "10 difference(s): 4 stricter, 3 looser, 3 neutral",
    ]


def test_diff_sees_a_change_made_only_in_the_parent(
        folder: Path, tmp_path_factory: pytest.TempPathFactory,
        capsys: pytest.CaptureFixture[str]) -> None:
    # The kids file is byte for byte the same; its parent now lets hate through with an edit.
    other = tmp_path_factory.mktemp("next")
    (other / "kids.yaml").write_text(KIDS)
    (other / "base.yaml").write_text(BASE.replace("hate: {threshold: 0.5, action: refuse}",
                                                  "hate: {threshold: 0.5, action: edit}"))
    code, out = cli(capsys, "diff", str(folder / "kids.yaml"), str(other / "kids.yaml"))
    assert code == 1
    assert out.splitlines()[1:] == [
        "  [looser] hate: refused -> edited at score 0.50 or more",
        "1 difference(s): 1 looser",
    ]


def test_diff_of_equivalent_files_is_empty(folder: Path, tmp_path_factory: pytest.TempPathFactory,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    same = tmp_path_factory.mktemp("same")
    (same / "base.yaml").write_text(BASE)
    # Same policy, written differently: block style instead of flow style, comments added.
    (same / "kids.yaml").write_text(
        "# reviewed 2025-06\nid: kids\nversion: 3\nextends: base\n"
        "description: For the children's storybook app.\n"
        "categories:\n  sexual:\n    threshold: 0.30\n  violence:\n    action: refuse\n"
        "rounds:\n  max: 2\n  on_exhausted: drop\n")
    code, out = cli(capsys, "diff", str(folder / "kids.yaml"), str(same / "kids.yaml"))
    assert code == 0
    assert out.splitlines()[1:] == ["  no effective difference (the files differ only in form)"]
