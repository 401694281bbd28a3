"""The shipped policies: they load, they mean what their names say, and `extends` resolves."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from guard.cli import main
from guard.core.policy import POLICIES_DIR, PolicySet, load_policy
from guard.core.terms import matcher_for
from guard.support.errors import ConfigError

RANK = {"allow": 0, "edit": 1, "refuse": 2}
SHIPPED = ("default", "strict", "permissive")
CATEGORIES = {"sexual", "violence", "self_harm", "shocking", "hate", "harassment",
              "illegal_activity", "minors"}


@pytest.fixture(scope="module")
def policies() -> PolicySet:
    return PolicySet.load([POLICIES_DIR])


def test_the_three_shipped_policies_load(policies: PolicySet) -> None:
    assert set(SHIPPED) <= set(policies.ids())
    for pid in SHIPPED:
        policy = policies[pid]
        assert set(policy.categories) == CATEGORIES
        assert set(policy.terms) <= set(policy.categories)
        matcher_for(policy)  # every pattern compiles
        assert load_policy(POLICIES_DIR / f"{pid}.yaml").sha256 == policy.sha256


def test_hate_and_minors_are_refused_everywhere(policies: PolicySet) -> None:
    for pid in SHIPPED:
        cats = policies[pid].categories
        assert cats["hate"].action == "refuse" and cats["minors"].action == "refuse"
    assert policies["default"].terms["minors"].requires == ("sexual",)


def test_strict_is_stricter_than_default_on_every_category(policies: PolicySet) -> None:
    default, strict = policies["default"], policies["strict"]
    for name, cat in default.categories.items():
        tighter = strict.categories[name]
        assert tighter.threshold < cat.threshold, name
        assert RANK[tighter.action] >= RANK[cat.action], name
    assert strict.rounds.max < default.rounds.max
    assert sum(c.action == "refuse" for c in strict.categories.values()) > \
        sum(c.action == "refuse" for c in default.categories.values())


def test_permissive_is_looser_than_default_but_never_on_minors(policies: PolicySet) -> None:
    default, loose = policies["default"], policies["permissive"]
    for name, cat in default.categories.items():
        looser = loose.categories[name]
        assert looser.threshold >= cat.threshold, name
        assert RANK[looser.action] <= RANK[cat.action], name
    assert loose.categories["minors"] == default.categories["minors"]
    assert any(c.action == "allow" for c in loose.categories.values())
    assert loose.rounds.max > default.rounds.max


def test_extends_inherits_what_it_does_not_set(policies: PolicySet) -> None:
    default, strict = policies["default"], policies["strict"]
    assert strict.id == "strict" and strict.extends == "default"
    assert strict.terms == default.terms
    assert strict.prescreen == default.prescreen
    assert strict.sha256 != default.sha256


def test_a_policy_beside_the_shipped_ones_extends_them(tmp_path: Path) -> None:
    path = tmp_path / "team.yaml"
    path.write_text("id: team\nversion: 2\nextends: strict\n"
                    "categories:\n  violence: {threshold: 0.2, action: refuse}\n")
    team = load_policy(path)
    strict = load_policy(POLICIES_DIR / "strict.yaml")
    assert team.categories["violence"].action == "refuse"
    assert team.categories["sexual"] == strict.categories["sexual"]
    assert team.rounds == strict.rounds
    assert team.terms == strict.terms


@pytest.mark.parametrize("text, where", [
    ("id: typo\nversion: 1\nextends: default\nrouns: {max: 2}\n", "rouns"),
    ("id: typo\nversion: 1\nextends: default\n"
     "categories:\n  sexual: {threshold: 0.5, action: edit, treshold: 0.1}\n", "treshold"),
    ("id: typo\nversion: 1\nextends: default\nterms:\n  sexual: {strongg: [x]}\n", "strongg"),
])
def test_an_unknown_key_is_rejected(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=where):
        load_policy(path)


def test_the_shipped_policies_are_package_data_of_guard() -> None:
    shipped = {f.name for f in (resources.files("guard") / "policies").iterdir()}
    assert {f"{pid}.yaml" for pid in SHIPPED} | {"schema.json"} <= shipped


def test_validate_without_files_checks_the_shipped_and_the_local_policies(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["policy", "validate"]) == 0
    assert capsys.readouterr().out.count(": ok (") == len(SHIPPED)
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies/team.yaml").write_text(
        "id: team\nversion: 1\nextends: default\nrounds: {max: 20}\n")
    assert main(["policy", "validate"]) == 1
    assert f"{(tmp_path / 'policies/team.yaml').resolve()}:4:" in capsys.readouterr().out
