"""A compliance officer's regression suite for a policy: `safeedit policy test CASES.yaml`.

    policy: default            # optional: an id or a file (relative to this file); default: the
                               # config's policy
    cases:
      - name: a fruit bowl     # optional; default: the prompt
        prompt: a bowl of fruit on a wooden table
        action: pass           # pass | edit | refuse: what the policy does with the request
      - prompt: a bar brawl
        image: images/brawl.png  # optional, relative to this file: judged with its prompt
        action: edit
        categories: [violence]   # optional: exactly these categories flagged

Each case is judged by the configured judge (judging only: nothing is generated), the prompt
alone as the proxy's prescreen does, and an image with its prompt beside it, as a generated
image is judged. The policy decides each verdict; a case's action is the strongest of its
prompt's and its image's (`refuse` > `edit` > `pass`), its categories all they flagged. An
image category the judge did not assess on the image is decided as the policy's `unassessed`
says, from the prompt's verdict where the policy says `prompt`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree as ET

import yaml

from guard.core.policy import Decision, Policy
from guard.core.types import GeneratedImage, JudgeInput, Verdict
from guard.plugins import Judge
from guard.support.errors import ConfigError
from guard.support.inputs import validate_image
from guard.support.yamlfile import load_unique

ACTIONS = ("pass", "edit", "refuse")
_RANK = {a: i for i, a in enumerate(ACTIONS)}
_CASE_KEYS = {"name", "prompt", "image", "action", "categories"}


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    prompt: str
    action: str
    categories: tuple[str, ...] | None = None  # None: not checked
    image: Path | None = None


@dataclass(frozen=True, slots=True)
class Suite:
    path: Path
    cases: list[Case]
    policy: str | None = None  # as the file names it (an id, or a path relative to the file)


@dataclass(frozen=True, slots=True)
class Outcome:
    case: Case
    action: str
    flagged: tuple[str, ...]
    scores: Mapping[str, float] = field(default_factory=dict)
    error: str = ""  # the judge failed on this case

    @property
    def failures(self) -> list[str]:
        if self.error:
            return [self.error]
        out = []
        if self.action != self.case.action:
            out.append(f"action {self.action}, expected {self.case.action}")
        if self.case.categories is not None and set(self.flagged) != set(self.case.categories):
            out.append(f"flagged [{', '.join(self.flagged)}], expected "
                       f"[{', '.join(self.case.categories)}]")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures


def read_suite(path: Path) -> Suite:
    """The cases of a cases file; every mistake in it is a ConfigError naming the case."""
    try:
        data = load_unique(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read the cases file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list) \
            or not data["cases"]:
        raise ConfigError(f"{path}: a cases file is a mapping with a non-empty `cases` list")
    unknown = set(data) - {"policy", "cases"}
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; "
                          "allowed: policy, cases")
    cases: list[Case] = []
    for i, raw in enumerate(data["cases"], start=1):
        where = f"{path}: case {i}"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: a case is a mapping (prompt, action, ...)")
        extra = set(raw) - _CASE_KEYS
        if extra:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(extra))}; allowed: "
                              f"{', '.join(sorted(_CASE_KEYS))}")
        prompt, action = raw.get("prompt"), raw.get("action")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f"{where}: `prompt` (text) is required")
        if action not in ACTIONS:
            raise ConfigError(f"{where}: `action` must be one of {', '.join(ACTIONS)}, "
                              f"not {action!r}")
        cats = raw.get("categories")
        if cats is not None and (not isinstance(cats, list)
                                 or not all(isinstance(c, str) for c in cats)):
            raise ConfigError(f"{where}: `categories` is a list of category names")
        image = None
        if raw.get("image") is not None:
            image = path.parent / str(raw["image"])
            if not image.is_file():
                raise ConfigError(f"{where}: no image file {image}")
        cases.append(Case(str(raw.get("name") or prompt), prompt, action,
                          None if cats is None else tuple(cats), image))
    policy = data.get("policy")
    return Suite(path, cases, None if policy is None else str(policy))


def check_categories(suite: Suite, policy: Policy) -> None:
    for i, case in enumerate(suite.cases, start=1):
        wrong = [c for c in case.categories or () if c not in policy.categories]
        if wrong:
            raise ConfigError(f"{suite.path}: case {i}: {', '.join(wrong)} not a category of "
                              f"policy {policy.id}; categories: {', '.join(policy.categories)}")


async def run_suite(judge: Judge, policy: Policy, suite: Suite) -> list[Outcome]:
    """Judge every case and decide it under `policy`."""
    check_categories(suite, policy)
    outcomes: list[Outcome] = []
    for case in suite.cases:
        items = [JudgeInput(prompt=case.prompt, original_prompt=case.prompt)]
        if case.image is not None:
            data = case.image.read_bytes()
            media = validate_image(data, "image", max_bytes=50 * 2**20)
            items.append(JudgeInput(prompt=case.prompt, original_prompt=case.prompt,
                                    image=GeneratedImage(data=data, media_type=media)))
        try:
            verdicts = await judge.judge(items, policy)
        except Exception as exc:  # noqa: BLE001 - a failed case is reported, the suite goes on
            outcomes.append(Outcome(case, "", (), error=f"the judge failed: {exc}"))
            continue
        decisions = [policy.decide(verdicts[0].scores)]
        if len(verdicts) > 1:
            decisions.append(_image_decision(policy, verdicts[0], verdicts[1]))
        action = max((d.action for d in decisions), key=_RANK.__getitem__)
        flagged = tuple(dict.fromkeys(c for d in decisions for c in d.flagged))
        scores = {c: max(float(v.scores.get(c, 0.0)) for v in verdicts)
                  for c in policy.categories}
        outcomes.append(Outcome(case, action, flagged, scores))
    return outcomes


def _image_decision(policy: Policy, prompt: Verdict, image: Verdict) -> Decision:
    # As the proxy decides an image: a category not assessed on the image is decided as the
    # policy's `unassessed` says, the prompt's verdict standing in where it says `prompt`.
    coverage = image.coverage(policy.categories, image=True)
    blind = [c for c, on in coverage.items() if "image" not in on]
    text = {c: float(prompt.scores.get(c, 0.0))
            for c, on in prompt.coverage(policy.categories, image=False).items() if "text" in on}
    for c in blind:
        if "text" in coverage[c]:
            text[c] = max(text.get(c, 0.0), float(image.scores.get(c, 0.0)))
    return policy.decide(image.scores, unassessed=blind, prompt=text)


def table(outcomes: Sequence[Outcome], policy: Policy, judge_id: str) -> str:
    rows = [("", "case", "expected", "got", "flagged", "why")]
    for o in outcomes:
        expected = o.case.action + (f" [{', '.join(o.case.categories)}]"
                                    if o.case.categories is not None else "")
        rows.append(("ok" if o.passed else "FAIL", _cut(o.case.name, 40), expected,
                     o.action or "-", ", ".join(o.flagged) or "-", "; ".join(o.failures)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"Policy {policy.id} v{policy.version} (sha256 {policy.sha256[:12]}), judge "
             f"{judge_id}: {len(outcomes)} case(s)", ""]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
              for r in rows]
    failed = sum(not o.passed for o in outcomes)
    lines += ["", f"{len(outcomes) - failed} passed, {failed} failed"]
    return "\n".join(lines) + "\n"


def junit(outcomes: Sequence[Outcome], policy: Policy, suite: Suite) -> str:
    """JUnit XML, one testcase per case, as CI systems read it."""
    failed = sum(not o.passed and not o.error for o in outcomes)
    errors = sum(bool(o.error) for o in outcomes)
    suite_el = ET.Element("testsuite", name=f"policy {policy.id} v{policy.version}",
                          tests=str(len(outcomes)), failures=str(failed), errors=str(errors))
    for o in outcomes:
        case = ET.SubElement(suite_el, "testcase", name=o.case.name,
                             classname=f"{suite.path.stem}.{policy.id}")
        if o.error:
            ET.SubElement(case, "error", message=o.error)
        elif not o.passed:
            ET.SubElement(case, "failure", message="; ".join(o.failures)).text = (
                f"prompt: {o.case.prompt}\nscores: "
                + ", ".join(f"{c} {s!r}" for c, s in o.scores.items()))
    root = ET.Element("testsuites")
    root.append(suite_el)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, "unicode") + "\n"


def _cut(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"

