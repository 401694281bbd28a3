"""`safeedit policy validate` and the schema: a compliance officer's mistakes are reported all at
once, each at its file:line:column with what would be allowed, and nothing is silently ignored."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from guard.cli import main
from guard.core.policy import POLICIES_DIR, PolicySet
from guard.core.policy.schema import (
    SCHEMA_PATH,
    file_schema,
    render_file_schema,
    undescribed_fields,
)
from guard.support.errors import ConfigError

BASE = """\
id: base
version: 1
categories:
  sexual: {threshold: 0.5, action: edit}
  violence: {threshold: 0.6, action: edit}
  hate: {threshold: 0.5, action: refuse}
  minors: {threshold: 0.1, action: refuse}
terms:
  minors: {requires: [sexual]}
"""

BROKEN = """\
id: kids
version: 2
extends: base
categories:
  sexual:
    treshold: 0.3
  violence: {threshold: 1.5, action: refuse}
  gore: {threshold: 0.4}
rounds: {max: 3, on_exhuasted: drop}
on_judge_error: no
terms:
  sexaul: {strong: [lingerie]}
prescreen: true
prescreen: false
"""


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    code = main(["policy", *argv])
    return code, capsys.readouterr().out.splitlines()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "base.yaml").write_text(BASE)
    return tmp_path


def test_every_mistake_is_reported_at_once_with_line_column_and_what_is_allowed(
        folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (folder / "kids.yaml").write_text(BROKEN)
    code = main(["policy", "validate", str(folder / "kids.yaml")])
    out, err = capsys.readouterr()
    lines = out.splitlines()
    f = folder / "kids.yaml"
    assert code == 1 and err == "7 error(s) in 1 file(s)\n"
    assert lines == [
        f"{f}:6:5: error: categories.sexual.treshold: unknown key 'treshold' "
        "(did you mean 'threshold'?); allowed keys: threshold, action, description, "
        "unassessed",
        f"{f}:7:25: error: categories.violence.threshold: got 1.5; allowed: a number from 0 to 1",
        f"{f}:8:3: error: categories.gore.action: required key 'action' is missing; "
        "allowed: one of edit, refuse, allow",
        f"{f}:9:18: error: rounds.on_exhuasted: unknown key 'on_exhuasted' "
        "(did you mean 'on_exhausted'?); allowed keys: max, on_exhausted, deadline_s",
        f"{f}:10:17: error: on_judge_error: got false; allowed: one of refuse, allow "
        "(YAML reads unquoted yes/no/on/off as true/false: quote the word)",
        f"{f}:12:3: error: terms.sexaul: terms for 'sexaul', which is not a category of this "
        "policy (did you mean 'sexual'?); categories: sexual, violence, hate, minors, gore",
        f"{f}:14:1: error: prescreen: duplicate key 'prescreen' (first at line 13); "
        "YAML would silently keep only the last one",
    ]


def test_yaml_syntax_error_points_at_the_line(folder: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    bad = folder / "typo.yaml"
    bad.write_text("id: typo\nversion: 1\ncategories:\n  hate: {threshold: 0.5, action: refuse\n"
                   "rounds: {max: 2}\n")
    code, lines = run(capsys, "validate", str(bad))
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith(f"{bad}:5:")
    assert "not valid YAML: while parsing a flow mapping (line 4)" in lines[0]


def test_a_pattern_that_is_not_a_regular_expression_is_an_error(
        folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = folder / "regex.yaml"
    bad.write_text("id: regex\nversion: 1\nextends: base\nterms:\n  violence:\n"
                   "    patterns: ['ok\\b', '(unclosed']\n")
    code, lines = run(capsys, "validate", str(bad))
    assert code == 1
    assert lines == [f"{bad}:6:24: error: terms.violence.patterns[1]: not a valid regular "
                     "expression: missing ), unterminated subpattern at position 0"]


def test_an_error_in_the_parent_is_reported_in_the_parent_file(
        folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (folder / "base.yaml").write_text(BASE.replace("action: refuse}", "action: block}", 1))
    child = folder / "kids.yaml"
    child.write_text("id: kids\nversion: 1\nextends: base\ncategories:\n"
                     "  sexual: {threshold: 0.3}\n")
    code, lines = run(capsys, "validate", str(child))
    assert code == 1
    assert lines == [f"{folder / 'base.yaml'}:6:34: error: categories.hate.action: got 'block'; "
                     "allowed: one of edit, refuse, allow"]


def test_extends_an_unknown_policy_or_in_a_cycle(folder: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    lost = folder / "lost.yaml"
    lost.write_text("id: lost\nversion: 1\nextends: bsae\n")
    code, lines = run(capsys, "validate", str(lost))
    assert code == 1
    assert lines[0].startswith(f"{lost}:3:10: error: extends: extends unknown policy 'bsae'")
    (folder / "a.yaml").write_text("id: a\nversion: 1\nextends: b\n")
    (folder / "b.yaml").write_text("id: b\nversion: 1\nextends: a\n")
    code, lines = run(capsys, "validate", str(folder / "a.yaml"))
    assert code == 1 and "goes round in a cycle: a -> b -> a" in lines[0]


def test_a_child_without_its_own_version_is_an_error(folder: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    child = folder / "kids.yaml"
    child.write_text("id: kids\nextends: base\n")
    code, lines = run(capsys, "validate", str(child))
    assert code == 1
    assert lines == [f"{child}:1:1: error: version: required key 'version' is missing; "
                     "allowed: a whole number of at least 0"]


def test_valid_files_pass_with_their_version_and_hash(folder: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    child = folder / "kids.yaml"
    child.write_text("id: kids\nversion: 4\nextends: base\ncategories:\n"
                     "  sexual: {threshold: 0.3}\n")
    code, lines = run(capsys, "validate", str(folder / "base.yaml"), str(child))
    assert code == 0
    assert lines[0].startswith(f"{folder / 'base.yaml'}: ok (base v1, sha256 ")
    assert lines[1].startswith(f"{child}: ok (kids v4, sha256 ")


def test_json_output_for_tools(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (folder / "kids.yaml").write_text(BROKEN)
    code = main(["policy", "validate", "--json", str(folder / "kids.yaml")])
    problems = json.loads(capsys.readouterr().out)
    assert code == 1 and len(problems) == 7
    assert problems[0] == {
        "file": str(folder / "kids.yaml"), "line": 6, "column": 5,
        "field": "categories.sexual.treshold", "severity": "error",
        "message": "unknown key 'treshold' (did you mean 'threshold'?); allowed keys: "
                   "threshold, action, description, unassessed"}


def test_the_proxy_refuses_to_start_on_a_broken_policy_naming_every_problem(
        folder: Path) -> None:
    (folder / "kids.yaml").write_text(BROKEN)
    with pytest.raises(ConfigError) as info:
        PolicySet.load([folder])
    assert f"{folder / 'kids.yaml'}:6:5: error: categories.sexual.treshold" in info.value.message
    assert f"{folder / 'kids.yaml'}:14:1: error: prescreen: duplicate key" in info.value.message


# --- the schema editors use ---------------------------------------------------------------------

def test_every_policy_field_has_a_description() -> None:
    assert undescribed_fields() == []


def test_committed_schema_is_the_generated_one() -> None:
    assert SCHEMA_PATH.read_text() == render_file_schema(), \
        "policies/schema.json is out of date: run `safeedit policy schema`"


def test_schema_catches_typos_in_the_editor_and_accepts_partial_children() -> None:
    validator = jsonschema.Draft202012Validator(file_schema())
    assert list(validator.iter_errors(yaml.safe_load(BASE))) == []
    child = {"id": "kids", "version": 2, "extends": "base",
             "categories": {"sexual": {"threshold": 0.3}}}
    assert list(validator.iter_errors(child)) == []
    messages = [e.message for e in validator.iter_errors(yaml.safe_load(BROKEN))]
    assert any("'treshold' was unexpected" in m for m in messages)
    assert any("1.5 is greater than the maximum of 1" in m for m in messages)
    no_categories = {"id": "x", "version": 1}
    assert any("'categories' is a required property" in e.message
               for e in validator.iter_errors(no_categories))


def test_shipped_policies_validate_and_match_the_schema(capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    shipped = sorted(POLICIES_DIR.glob("*.yaml"))
    if not shipped:
        pytest.skip("no policies shipped yet")
    code, lines = run(capsys, "validate", *map(str, shipped))
    assert code == 0, "\n".join(lines)
    validator = jsonschema.Draft202012Validator(file_schema())
    for path in shipped:
        assert [e.message for e in validator.iter_errors(yaml.safe_load(path.read_text()))] == []
