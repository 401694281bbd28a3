"""What a judge assesses, per policy category, on the prompt and on the image, known without a
call: the table the proxy logs at start and `safeedit judge coverage` prints.

A judge says it through `coverage(policy)` (guard.plugins.Covering); a `vlm` or `remote` judge
through its profile; a judge that says nothing is taken to assess everything it is given. A
composite (ensemble, cascade) assesses the union of its judges. The last column says what the
policy makes of a category no judge assesses on images (its `unassessed`), and a warning names
those categories, since for them an image is never looked at.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from guard.core.policy import Policy
from guard.judges.profiles import Profile
from guard.plugins import Covering, Judge, coverage_of

log = logging.getLogger("safeedit.judge")

Covered = dict[str, set[str]]


def declared(judge: Judge, policy: Policy) -> Covered:
    """Per policy category, the inputs ("text", "image") `judge` assesses it on."""
    profile = getattr(judge, "profile", None)
    if not isinstance(judge, Covering) and isinstance(profile, Profile):
        cover = profile.coverage(policy)
        if cover is not None:
            return {c: set(cover.get(c, ())) for c in policy.categories}
    return coverage_of(judge, policy)


def parts(judge: Judge) -> list[Judge]:
    """The judges a composite combines (its members or stages); none for a single judge."""
    return list(getattr(judge, "judges", None) or [])


def _cell(inputs: set[str]) -> str:
    return "+".join(i for i in ("text", "image") if i in inputs) or "-"


def unseen(policy: Policy, covered: Covered) -> dict[str, str]:
    """For each category no judge assesses on images, what the policy makes of that."""
    out: dict[str, str] = {}
    for name, cat in policy.categories.items():
        inputs = covered.get(name, set())
        if "image" in inputs:
            continue
        mode = policy.unassessed_mode(name)
        if cat.action == "allow":
            out[name] = "recorded only (action allow)"
        elif mode == "prompt":
            out[name] = ("the prompt's verdict stands" if "text" in inputs
                         else "refused: no judge reads it on the prompt either")
        else:
            out[name] = "refused" if mode == "refuse" else "passed (unassessed: pass)"
    return out


def coverage_table(judge: Judge, policy: Policy, *, warn: bool = True) -> str:
    """The table: one row per policy category, a column per judge (and their union for a
    composite), and what an image's verdict is where no judge looks at the image; then the
    warnings, unless `warn` is false."""
    columns: list[tuple[str, Covered]] = [(p.id, declared(p, policy)) for p in parts(judge)]
    together = declared(judge, policy)
    columns.append(("together" if columns else judge.id, together))
    blind = unseen(policy, together)
    header = ["category", *(name for name, _ in columns), "image not assessed"]
    rows = [[name, *(_cell(cov.get(name, set())) for _, cov in columns), blind.get(name, "")]
            for name in policy.categories]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"judge {judge.id} under policy {policy.id} v{policy.version}"
             " (text: the prompt; image: the image itself)"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
              for row in [header, *rows]]
    return "\n".join(lines + (warnings(policy, together, blind) if warn else [])) + "\n"


def warnings(policy: Policy, covered: Covered, blind: dict[str, str] | None = None
             ) -> list[str]:
    """A line per kind of category no judge assesses on images."""
    blind = unseen(policy, covered) if blind is None else blind
    out: list[str] = []
    if blind:
        out.append("warning: no judge assesses " + ", ".join(blind) + " on images; the "
                   "policy's `unassessed` decides (docs/judges.md)")
    nobody = [c for c, what in blind.items() if what.startswith("refused: no judge")]
    if nobody:
        out.append("warning: no judge assesses " + ", ".join(nobody) + " at all: every image "
                   "is refused for it; add a judge (or terms) that covers it")
    return out


def log_coverage(judge: Judge, policies: Sequence[Policy]) -> None:
    """At start: the table (info) and its warnings (warning) for each policy in use."""
    for policy in policies:
        log.info("coverage:\n%s", coverage_table(judge, policy, warn=False).rstrip())
        for line in warnings(policy, declared(judge, policy)):
            log.warning("policy %s: %s", policy.id, line.removeprefix("warning: "))
