"""How the builtin judge's prompt scores decide on the shared prompt sets, before and after a
change of the scoring model: I2P (labelled unsafe prompts) and COCO captions (benign).

    python benchmarks/term_calibration.py [--policy default] [--data ../shared/data]

"Before" is the model up to policy version 1 (`old_score`: each distinct term as written adds
0.95 if strong, 0.35 if weak, combined as 1 - Π(1 - w)); "after" is guard.core.terms as it is
now. Both read the same hits, found by the same matcher, so only the scoring model differs.
Prints, per I2P label, how many prompts the policy acts on (edit or refuse) and how often that
label's own category is flagged, then the share of COCO captions whose decision changed (the
bar is at most 1%). The sets only measure: no term list is tuned to their rows.
"""

from __future__ import annotations

import argparse
import csv
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from guard.core.policy import POLICIES_DIR, Decision, Policy, load_policy
from guard.core.terms import Hit, matcher_for

ROOT = Path(__file__).resolve().parent.parent
# I2P's labels and the policy categories that stand for them.
LABEL_CATEGORY = {"sexual": "sexual", "violence": "violence", "self-harm": "self_harm",
                  "shocking": "shocking", "hate": "hate", "harassment": "harassment",
                  "illegal activity": "illegal_activity"}


def old_score(hits: Sequence[Hit]) -> float:
    """The scoring model before: noisy-OR of 0.95 per strong and 0.35 per weak distinct term
    (as written in the policy, so `fight` and `fighting` were two)."""
    weights = {h.term: 0.95 if h.strength == "strong" else 0.35 for h in hits}
    rest = 1.0
    for w in weights.values():
        rest *= 1.0 - w
    return round(1.0 - rest, 4)


def decisions(policy: Policy, prompts: Sequence[str]) -> list[tuple[Decision, Decision]]:
    """(before, after) per prompt."""
    matcher = matcher_for(policy)
    out = []
    for prompt in prompts:
        text = matcher.scan(prompt)
        before = {c: old_score(text.hits.get(c, ())) for c in text.scores}
        out.append((policy.decide(before), policy.decide(text.scores)))
    return out


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _pct(n: int, d: int) -> str:
    return f"{100 * n / d:6.2f}%" if d else "      -"


def i2p_table(rows: Sequence[Mapping[str, str]],
              decided: Sequence[tuple[Decision, Decision]]) -> list[str]:
    n: Counter[str] = Counter()
    acted: dict[str, Counter[str]] = {"before": Counter(), "after": Counter()}
    own: dict[str, Counter[str]] = {"before": Counter(), "after": Counter()}
    for row, pair in zip(rows, decided, strict=True):
        labels = [s.strip() for s in row.get("categories", "").split(",") if s.strip()]
        for label in ["(all)", *(["(hard)"] if row.get("hard") == "1" else []), *labels]:
            n[label] += 1
            for when, decision in zip(("before", "after"), pair, strict=True):
                acted[when][label] += decision.unsafe
                cat = LABEL_CATEGORY.get(label)
                own[when][label] += bool(cat and cat in decision.flagged)
    lines = [f"{'I2P label':<18} {'n':>5}  {'acted on':>8} {'before':>8} {'after':>8}   "
             f"{'own category':>12} {'before':>8} {'after':>8}"]
    for label in ["(all)", "(hard)", *sorted(k for k in n if not k.startswith("("))]:
        lines.append(f"{label:<18} {n[label]:>5}  {'':>8} {_pct(acted['before'][label], n[label])}"
                     f" {_pct(acted['after'][label], n[label])}   {'':>12} "
                     + (f"{_pct(own['before'][label], n[label])} "
                        f"{_pct(own['after'][label], n[label])}" if label in LABEL_CATEGORY
                        else f"{'-':>8} {'-':>8}"))
    return lines


def flagged_table(name: str, decided: Sequence[tuple[Decision, Decision]],
                  categories: Sequence[str]) -> list[str]:
    before = Counter(c for b, _ in decided for c in b.flagged)
    after = Counter(c for _, a in decided for c in a.flagged)
    lines = [f"{name + ' flagged category':<28} {'before':>7} {'after':>7}"]
    lines += [f"{c:<28} {before[c]:>7} {after[c]:>7}" for c in categories]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="default", help="shipped policy id or a policy file")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--show", type=int, default=0,
                    help="also print up to N I2P prompts whose decision changed")
    args = ap.parse_args()
    spec = Path(args.policy)
    policy = load_policy(spec if spec.exists() else POLICIES_DIR / f"{args.policy}.yaml")
    i2p, coco = _read(args.data / "i2p_dev.csv"), _read(args.data / "coco_dev.csv")
    i2p_decided = decisions(policy, [r["prompt"] for r in i2p])
    coco_decided = decisions(policy, [r["prompt"] for r in coco])
    print(f"policy {policy.id} v{policy.version}; I2P {len(i2p)} prompts, COCO {len(coco)}\n")
    print("\n".join(i2p_table(i2p, i2p_decided)))
    print()
    print("\n".join(flagged_table("I2P", i2p_decided, list(policy.categories))))
    changed = sum(b.flagged != a.flagged or b.action != a.action for b, a in coco_decided)
    acted = [sum(d.unsafe for d in pair) for pair in zip(*coco_decided, strict=True)]
    print(f"\nCOCO: acted on before {acted[0]} ({_pct(acted[0], len(coco)).strip()}), after "
          f"{acted[1]} ({_pct(acted[1], len(coco)).strip()}); decision changed for {changed} "
          f"({_pct(changed, len(coco)).strip()}; the bar is 1%)")
    shown = 0
    for row, (b, a) in zip(i2p, i2p_decided, strict=True):
        if shown < args.show and b.flagged != a.flagged:
            print(f"  {','.join(b.flagged) or 'pass'} -> {','.join(a.flagged) or 'pass'}: "
                  f"{row['prompt'][:100]}")
            shown += 1


if __name__ == "__main__":
    main()
