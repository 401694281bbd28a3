"""How well the rule refiner writes prompts, before (git HEAD, --before REV, or --source DIR) and
after (this tree).

On the shared prompt sets only (../shared/data: i2p_dev.csv, coco_dev.csv; see their README), each
tree judged with its own code and its own shipped policy (`--policy`, default `default`), prompt
only, as the builtin judge's prescreen does:
  edited            I2P prompts the prescreen sends to the refiner (action `edit`)
  nothing left      of those, how many the refiner answers with nothing benign (None or "")
  dangling          of the refined prompts, the share with a function word the refiner left
                    standing for nothing: an article or possessive before a preposition, an
                    article or punctuation, or at the end; a preposition before punctuation, the
                    end or another preposition (counted only where the prompt had none)
  pass again        the share of refined prompts that pass the same prescreen
  content kept      the share of the prompts' own content words (not function words, not the
                    matched terms) that are still in the refined prompts
  COCO changed      benign captions the prescreen edits or refuses (the bar is 1%)
  catch per category  per I2P label, the share of its prompts the prescreen flags

Run: .venv/bin/python benchmarks/refiner_quality.py [--before REV | --source DIR]
     [--policy default] [--examples N] [--json out.json]
(issue 20's figures: --before d10a8a5, the tree before the phrase refiner)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from io import BytesIO
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
I2P_LABELS = ("sexual", "violence", "self-harm", "shocking", "hate", "harassment",
              "illegal activity")

_ARTICLES = r"(?:a|an|the|his|her|their|its|my|your|our)"
_PREPS = (r"(?:about|above|across|after|against|along|among|around|at|before|behind|below|"
          r"beneath|beside|between|beyond|by|during|for|from|in|inside|into|near|of|on|onto|"
          r"over|through|to|toward|towards|under|upon|with|within|without)")
# Two prepositions in a row that people write ("out of", "from behind") are not dangling.
_PAIRS = {"from behind", "from under", "from within", "up to", "on to", "in between",
          "from above", "from below", "over to", "down to", "in to", "out of", "from inside",
          "to about", "in about", "at about", "for about", "of about", "with about"}
_DANGLING = [
    re.compile(rf"\b{_ARTICLES}\s+(?={_PREPS}\b|{_ARTICLES}\b|[,.;:!?)]|$)", re.I),
    re.compile(r"\b\w+['’]s\s*(?=[,.;:!?)]|$)", re.I),
    re.compile(rf"\b{_PREPS}\s*(?=[,.;:!?)]|$)", re.I),
    re.compile(rf"\b{_PREPS}\s+{_PREPS}\b", re.I),
]
_STOP = set("""a an the his her their its my your our this that these those some any and or but
of in on at to for from by with without into onto over under about as is are was were be been
being has have had do does did it he she they them him who which what there not no very""".split())


def dangling(text: str) -> Counter[str]:
    """The dangling function words of `text`, each with the words around it."""
    found: Counter[str] = Counter()
    for rx in _DANGLING:
        for m in rx.finditer(text):
            if " ".join(m.group(0).lower().split()) not in _PAIRS:
                found[m.group(0).strip().lower()] += 1
    return found


def content_words(text: str) -> Counter[str]:
    return Counter(w for w in re.findall(r"[a-z0-9']+", text.lower())
                   if w not in _STOP and len(w) > 1 and not w.isdigit())


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def measure(data: Path, policy_name: str, examples: int) -> dict[str, Any]:
    """The figures of the tree this process imports `guard` from."""
    import guard
    from guard.core.policy import POLICIES_DIR, load_policy
    from guard.core.refiner import refine_prompt
    from guard.core.terms import score_prompt

    spec = Path(policy_name)
    policy = load_policy(spec if spec.exists() else POLICIES_DIR / f"{policy_name}.yaml")
    i2p, coco = _read(data / "i2p_dev.csv"), _read(data / "coco_dev.csv")
    labelled: Counter[str] = Counter()
    caught: Counter[str] = Counter()
    edited = nothing = with_dangling = passed = 0
    kept = total = 0
    shown: list[tuple[str, str | None]] = []
    for row in i2p:
        prompt = row["prompt"]
        scan = score_prompt(prompt, policy)
        decision = policy.decide(scan.scores)
        for label in (x.strip() for x in row["categories"].split(",")):
            labelled[label] += 1
            caught[label] += decision.action != "pass"
        if decision.action != "edit":
            continue
        edited += 1
        refined = refine_prompt(prompt, decision.flagged, policy) or None
        if len(shown) < examples:
            shown.append((prompt.strip(), refined))
        if refined is None:
            nothing += 1
            continue
        with_dangling += bool(dangling(refined) - dangling(prompt))
        passed += policy.decide(score_prompt(refined, policy).scores).action == "pass"
        spans = [(h.start, h.end) for hits in scan.hits.values() for h in hits]
        own = content_words("".join(" " if any(s <= i < e for s, e in spans) else c
                                    for i, c in enumerate(prompt)))
        after = content_words(refined)
        kept += sum(min(n, after[w]) for w, n in own.items())
        total += sum(own.values())
    coco_changed = sum(policy.decide(score_prompt(r["prompt"], policy).scores).action != "pass"
                       for r in coco)
    refined_n = edited - nothing
    return {
        "tree": str(Path(guard.__file__).resolve().parent.parent),
        "policy": f"{policy.id} v{policy.version}",
        "i2p": len(i2p), "coco": len(coco), "edited": edited, "nothing_left": nothing,
        "dangling": with_dangling / refined_n if refined_n else 0.0,
        "pass_again": passed / refined_n if refined_n else 0.0,
        "content_kept": kept / total if total else 0.0,
        "coco_changed": coco_changed / len(coco),
        "catch": {label: caught[label] / labelled[label] for label in I2P_LABELS
                  if labelled[label]},
        "examples": shown,
    }


def git_tree(rev: str, into: Path) -> Path:
    """The files of git revision `rev` (guard/ and policies/), unpacked into `into`."""
    blob = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev, "guard",
                           "policies"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(blob)) as tar:
        tar.extractall(into, filter="tar")
    return into


def run_in(tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(
        [sys.executable, __file__, "--measure", "--data", str(args.data), "--policy",
         args.policy, "--examples", str(args.examples)],
        check=True, capture_output=True, text=True, env=env, cwd=tree)
    return dict(json.loads(out.stdout))


def table(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    def pct(x: float) -> str:
        return f"{100 * x:.1f}%"

    rows = [("policy", before["policy"], after["policy"], ""),
            ("I2P prompts edited", str(before["edited"]), str(after["edited"]), ""),
            ("  nothing benign left", str(before["nothing_left"]), str(after["nothing_left"]),
             "ends as on_exhausted"),
            ("  refined with a dangling word", pct(before["dangling"]), pct(after["dangling"]),
             "goal 0"),
            ("  refined pass the prescreen", pct(before["pass_again"]),
             pct(after["pass_again"]), "goal 100%"),
            ("  content words kept", pct(before["content_kept"]), pct(after["content_kept"]),
             "higher is better"),
            ("COCO prompts changed", pct(before["coco_changed"]), pct(after["coco_changed"]),
             "goal <= 1%")]
    rows += [(f"I2P catch: {label}", pct(before["catch"].get(label, 0.0)),
              pct(after["catch"].get(label, 0.0)), "prompt only") for label in I2P_LABELS]
    width = max(len(r[0]) for r in rows)
    lines = [f"| {'':<{width}} | before | after  | |", f"|{'-' * (width + 2)}|--------|--------|---|"]
    lines += [f"| {a:<{width}} | {b:>6} | {c:>6} | {d} |" for a, b, c, d in rows]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, help="the tree to compare with")
    ap.add_argument("--before", default="HEAD", help="else this git revision (default HEAD)")
    ap.add_argument("--policy", default="default", help="shipped policy id or a policy file")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--examples", type=int, default=0, help="print N refinements of each tree")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.data, args.policy, args.examples)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        source = args.source.resolve() if args.source else git_tree(args.before, Path(tmp))
        before = run_in(source, args)
        after = run_in(ROOT, args)
    print(f"before: {before['tree']}\nafter:  {after['tree']}\n"
          f"I2P {after['i2p']} prompts, COCO {after['coco']}\n")
    print("\n".join(table(before, after)))
    for name, figures in (("before", before), ("after", after)):
        for prompt, refined in figures["examples"]:
            print(f"\n[{name}] {prompt[:160]}\n     -> {refined!r}"[:400])
    if args.json:
        args.json.write_text(json.dumps({"before": before, "after": after}, indent=2))


if __name__ == "__main__":
    main()
