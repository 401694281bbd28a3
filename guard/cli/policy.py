"""`safeedit policy`: check, explain, compare and replay policy files before they go live.

    safeedit policy validate [FILE...]          every problem at once, file:line:column; exit 1
    safeedit policy explain FILE                what the policy does, `extends` resolved
    safeedit policy diff OLD NEW                the effective differences, in words
    safeedit policy replay --candidate FILE     re-decide stored traces under a candidate
    safeedit policy calibrate --policy FILE --labels store|CSV --target-precision P --out DIR
                                                thresholds from labelled items, with a report
    safeedit policy schema [--check]            regenerate policies/schema.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from guard.core.policy.loader import Loaded, Problem, load_file
from guard.support.timewindow import time_option


def register(sub: Any) -> None:
    p = sub.add_parser("policy", help="check, explain, compare and replay policy files",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = p.add_subparsers(dest="policy_command", required=True, metavar="SUBCOMMAND")

    v = cmds.add_parser("validate", help="check policy files; exit status 1 on any error")
    v.add_argument("files", nargs="*", type=Path,
                   help="policy files (default: the shipped policies and ./policies/)")
    v.add_argument("--json", action="store_true", help="problems as JSON, one list")
    v.set_defaults(func=validate)

    e = cmds.add_parser("explain", help="what a policy does, in plain language")
    e.add_argument("file", type=Path)
    e.set_defaults(func=explain)

    d = cmds.add_parser("diff", help="effective differences between two policies "
                                     "(exit 0: same, 1: different, 2: invalid file)")
    d.add_argument("old", type=Path)
    d.add_argument("new", type=Path)
    d.set_defaults(func=diff)

    r = cmds.add_parser("replay", help="which stored requests a candidate policy would decide "
                                       "differently, from their recorded scores")
    r.add_argument("--candidate", required=True, type=Path, help="the candidate policy file")
    r.add_argument("--since", type=time_option("since"),
                   help="from this time: 2025-06-01, 2025-06-01T12:00, 24h, 7d, 2w or Unix "
                        "seconds (default: all)")
    r.add_argument("--until", type=time_option("until"), help="up to this time (same forms)")
    which = r.add_mutually_exclusive_group()
    which.add_argument("--policy", help="replay traces recorded under this policy id "
                                        "(default: the candidate's id)")
    which.add_argument("--any-policy", action="store_true",
                       help="replay traces whatever policy they ran under")
    r.add_argument("--tenant", help="only this tenant's traces")
    r.add_argument("--config", help="operators' config naming the audit store "
                                    "(default: embedded defaults, var/audit.db)")
    r.add_argument("--limit", type=int, default=10_000, help="most traces read (10000)")
    r.add_argument("--csv", type=Path,
                   help="CSV of every replayed trace (default: replay-<id>-v<version>.csv)")
    r.add_argument("--all", action="store_true", help="list unchanged traces too")
    r.set_defaults(func=replay)

    c = cmds.add_parser("calibrate", help="thresholds that meet a target precision or "
                                          "false-positive rate, from labelled items")
    c.add_argument("--policy", required=True, type=Path, help="the policy file to calibrate")
    c.add_argument("--labels", required=True,
                   help="`store` (the labels kept beside the audit store of --config) or a "
                        "labels CSV: trace_id, slot, round, verdict, category, and optionally "
                        "flagged, prompt and score_<category> columns (self-contained)")
    goal = c.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target-precision", type=_share, metavar="P",
                      help="of the items flagged, at least this share unsafe (0-1)")
    goal.add_argument("--max-false-positive-rate", type=_share, metavar="R",
                      help="of the safe items, at most this share flagged (0-1)")
    c.add_argument("--out", required=True, type=Path,
                   help="folder for proposed.yaml and report.html")
    c.add_argument("--config", help="operators' config naming the audit store (labels looked "
                                    "up by trace id; stored requests replayed)")
    c.add_argument("--tenant", help="only this tenant's labels and traces")
    c.add_argument("--since", type=time_option("since"), help="labels and traces from this "
                                                              "time (2025-06-01, 7d, ...)")
    c.add_argument("--min-labels", type=int, default=None,
                   help="unsafe and safe labelled items needed per category (default 10)")
    c.set_defaults(func=calibrate)

    s = cmds.add_parser("schema", help="write the policy JSON Schema (policies/schema.json)")
    s.add_argument("--check", action="store_true",
                   help="only check the file is up to date (exit 1 if not)")
    s.add_argument("--output", type=Path, help="where to write (default: policies/schema.json)")
    s.set_defaults(func=schema)


# --- validate / explain / diff ------------------------------------------------------------------

def validate(args: argparse.Namespace) -> int:
    from guard.core.policy import POLICIES_DIR, local_policies_dir
    from guard.core.policy.loader import policy_files

    dirs = [POLICIES_DIR, *filter(None, [local_policies_dir()])]
    files = args.files or policy_files(dirs)
    if not files:
        print(f"no policy files given or found under {', '.join(map(str, dirs))}",
              file=sys.stderr)
        return 1
    problems: list[Problem] = []
    ok: list[str] = []
    for file in files:
        loaded = load_file(file)
        problems += [p for p in loaded.problems if p not in problems]
        for policy in loaded.policies.values():
            ok.append(f"{file}: ok ({policy.id} v{policy.version}, sha256 {policy.sha256[:12]})")
    problems.sort(key=lambda p: (p.path, p.line, p.column))
    errors = [p for p in problems if p.severity == "error"]
    if args.json:
        print(json.dumps([p.to_dict() for p in problems], indent=2))
    else:
        for problem in problems:
            print(problem)
        for line in ok:
            print(line)
        bad = len({p.path for p in errors})
        if errors:
            print(f"{len(errors)} error(s) in {bad} file(s)", file=sys.stderr)
    return 1 if errors else 0


def _load_or_report(path: Path) -> Loaded | None:
    loaded = load_file(path)
    for problem in loaded.problems:
        print(problem, file=sys.stderr)
    return None if loaded.errors else loaded


def explain(args: argparse.Namespace) -> int:
    from guard.offline.explain import explain as explain_policy

    loaded = _load_or_report(args.file)
    if loaded is None:
        return 1
    (pid, policy), = loaded.policies.items()
    print(explain_policy(policy, loaded.chains[pid]), end="")
    return 0


def diff(args: argparse.Namespace) -> int:
    from guard.offline.explain import diff as diff_policies

    old, new = _load_or_report(args.old), _load_or_report(args.new)
    if old is None or new is None:
        return 2
    a, b = next(iter(old.policies.values())), next(iter(new.policies.values()))
    print(f"{a.id} v{a.version} ({args.old}) -> {b.id} v{b.version} ({args.new})")
    changes = diff_policies(a, b)
    for change in changes:
        print(f"  {change}")
    if not changes:
        print("  no effective difference" + (" (the files differ only in form)"
                                             if a.sha256 != b.sha256 else ""))
        return 0
    effects = {e: sum(c.effect == e for c in changes) for e in ("stricter", "looser", "neutral")}
    print(f"{len(changes)} difference(s): " + ", ".join(f"{n} {e}" for e, n in effects.items()
                                                       if n))
    return 1


# --- replay -------------------------------------------------------------------------------------

def replay(args: argparse.Namespace) -> int:
    from guard.core.config import load_config
    from guard.offline.replay import render, to_csv
    from guard.offline.replay import replay as run_replay
    from guard.plugins import TraceQuery, build_store

    loaded = _load_or_report(args.candidate)
    if loaded is None:
        return 1
    candidate = next(iter(loaded.policies.values()))
    config = load_config(args.config)
    query = TraceQuery(since=args.since, until=args.until, tenant=args.tenant,
                       policy_id=None if args.any_policy else (args.policy or candidate.id))

    async def run() -> Any:
        store = build_store(config.audit)
        try:
            return await run_replay(store, candidate, query, limit=args.limit)
        finally:
            await store.aclose()

    report = asyncio.run(run())
    print(render(report, everything=args.all), end="")
    out = args.csv or Path(f"replay-{candidate.id}-v{candidate.version}.csv")
    out.write_text(to_csv(report.rows))
    print(f"\nCSV of all {len(report.rows)} replayed trace(s): {out}")
    return 0


# --- calibrate ----------------------------------------------------------------------------------

def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a share between 0 and 1, not {text!r}")
    return value


def calibrate(args: argparse.Namespace) -> int:
    from guard.offline.calibrate import MIN_LABELS, Target, proposed_yaml, report_html, table

    loaded = _load_or_report(args.policy)
    if loaded is None:
        return 1
    policy = next(iter(loaded.policies.values()))
    target = (Target("precision", args.target_precision) if args.target_precision is not None
              else Target("fpr", args.max_false_positive_rate))
    min_labels = MIN_LABELS if args.min_labels is None else max(1, args.min_labels)
    calibration, skipped = asyncio.run(_calibrate(args, policy, target, min_labels))
    args.out.mkdir(parents=True, exist_ok=True)
    proposed = args.out / "proposed.yaml"
    proposed.write_text(proposed_yaml(calibration, str(args.policy)))
    check = load_file(proposed)
    if check.errors:  # a bug, never the user's: say so plainly
        for problem in check.errors:
            print(problem, file=sys.stderr)
        return 1
    replayed = ""
    if args.config or args.labels == "store":
        replayed = asyncio.run(_replay(args, policy, next(iter(check.policies.values()))))
    report = args.out / "report.html"
    report.write_text(report_html(calibration, skipped=skipped, replayed=replayed))
    print(table(calibration), end="")
    for why, n in sorted(skipped.items()):
        print(f"  {n} label(s) skipped: {why}")
    if replayed:
        print("\n" + replayed, end="")
    print(f"\nproposed policy: {proposed} (v{policy.version + 1})\nreport: {report}")
    return 0


async def _calibrate(args: argparse.Namespace, policy: Any, target: Any,
                     min_labels: int) -> tuple[Any, dict[str, int]]:
    from guard.core.config import load_config
    from guard.offline.calibrate import calibrate as run_calibrate
    from guard.offline.labelled import read_labels_csv, resolve, store_labels
    from guard.plugins import build_store

    from_store = args.labels == "store"
    labels: list[Any] = [] if from_store else read_labels_csv(args.labels)
    needs_store = from_store or args.config or any(not label.scores for label in labels)
    store = build_store(load_config(args.config).audit) if needs_store else None
    try:
        if from_store:
            labels = await store_labels(store, tenant=args.tenant, since=args.since)
        resolved = await resolve(labels, policy, store)
    finally:
        if store is not None:
            await store.aclose()
    return run_calibrate(policy, resolved.items, target, min_labels), dict(resolved.skipped)


async def _replay(args: argparse.Namespace, policy: Any, candidate: Any) -> str:
    """What the proposal would change on the stored requests of the calibrated policy."""
    from guard.core.config import load_config
    from guard.offline.replay import render
    from guard.offline.replay import replay as run_replay
    from guard.plugins import TraceQuery, build_store

    store = build_store(load_config(args.config).audit)
    try:
        report = await run_replay(store, candidate, TraceQuery(
            since=args.since, tenant=args.tenant, policy_id=policy.id))
    finally:
        await store.aclose()
    return render(report).split("\n\n")[0] + "\n"


# --- schema -------------------------------------------------------------------------------------

def schema(args: argparse.Namespace) -> int:
    from guard.core.policy.schema import SCHEMA_PATH, render_file_schema, undescribed_fields

    missing = undescribed_fields()
    if missing:
        print("fields without a description: " + ", ".join(missing), file=sys.stderr)
        return 1
    path = args.output or SCHEMA_PATH
    current = path.read_text() if path.exists() else None
    if args.check:
        if current != render_file_schema():
            print(f"{path} is out of date: run `safeedit policy schema`", file=sys.stderr)
            return 1
        print(f"{path} is up to date")
        return 0
    if current != render_file_schema():
        path.write_text(render_file_schema())
        print(f"wrote {path}")
    else:
        print(f"{path} is up to date")
    return 0
